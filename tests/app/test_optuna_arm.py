"""The Optuna (TPE) arm: budget rule, seeding, the incumbent curve and the time to match a target."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from hypergradients.app.experiments.optuna_arm import (
    Space,
    Trial,
    incumbent,
    require_optuna,
    steps_to_match,
    time_to_match,
    tpe,
)

pytest.importorskip("optuna")


class FakeClock:
    """Each objective call advances the clock by one second: the budget rule becomes exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _objective(clock: FakeClock):
    def f(p: dict[str, float]) -> tuple[float, float]:
        clock.t += 1.0
        v = (math.log10(p["decay"]) + 2.0) ** 2  # minimum at decay = 1e-2
        return v, v + 0.5

    return f


def test_trials_start_while_under_budget_and_tpe_finds_the_minimum():
    clock = FakeClock()
    res = tpe(_objective(clock), {"decay": Space(1e-5, 1.0)}, budget_s=30.0, seed=0, clock=clock)
    # trials start at t = 0, 1, ..., 29 (elapsed below 30): exactly 30 of them
    assert len(res.trials) == 30 and res.trials[-1].elapsed_s == 30.0
    assert res.best.val == min(t.val for t in res.trials)
    # 30 TPE trials on a 1-D log interval of 5 decades: within a quarter decade of the minimum
    # (a random search has a 1 − 0.9^30 ≈ 96 % chance too; TPE concentrates near it)
    assert abs(math.log10(res.best.params["decay"]) + 2.0) < 0.25
    assert all(1e-5 <= t.params["decay"] <= 1.0 for t in res.trials)


def test_same_seed_same_trials():
    runs = []
    for _ in range(2):
        clock = FakeClock()
        runs.append(tpe(_objective(clock), {"decay": Space(1e-5, 1.0)}, budget_s=5.0, seed=3, clock=clock))
    assert len(runs[0].trials) == 5
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]


def test_min_trials_run_even_without_budget():
    clock = FakeClock()
    res = tpe(_objective(clock), {"decay": Space(1e-5, 1.0)}, budget_s=0.0, min_trials=2, clock=clock)
    assert len(res.trials) == 2


def test_incumbent_and_time_to_match():
    trials = [
        Trial(0, {}, 3.0, 2.0, 1.0),
        Trial(1, {}, 4.0, 0.1, 2.0),  # better test, worse val: not deployed
        Trial(2, {}, 2.0, 1.5, 3.0),
        Trial(3, {}, 1.0, 0.9, 4.0),
    ]
    assert incumbent(trials) == [(1.0, 3.0, 2.0), (2.0, 3.0, 2.0), (3.0, 2.0, 1.5), (4.0, 1.0, 0.9)]
    assert time_to_match(trials, 1.5) == 3.0
    assert time_to_match(trials, 0.9) == 4.0
    assert time_to_match(trials, 0.5) is None


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\] must have low < high \(and low > 0"):
        tpe(lambda p: (0.0, 0.0), {"decay": Space(0.0, 1.0)}, budget_s=1.0)


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"hypergradients\[optuna\]"):
        require_optuna()


# --- the weight-decay experiment's optuna arm ------------------------------------------------------


def _wd_run(tmp_path, *sets, resume=False):
    from hypergradients.app.config import resolve
    from hypergradients.app.experiments import RunContext, get

    exp = get("weight-decay")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=list(sets))
    data = exp.check(cfg) if exp.check else None
    return exp.run(
        RunContext(
            config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False, resume=resume, data=data
        )
    )


def test_fixed_decay_in_the_optimizer_is_the_families_penalty():
    # The optuna arm gives the decay to the optimizer as weight_decay=d (adds d·w to the gradient);
    # the tuned arms add WeightDecay's ½ d Σ w² over the matrices: the same gradient, exactly.
    from hypergradients.hparams import WeightDecay

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
    fam = WeightDecay(model, granularity="global", init=0.3)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    grads = torch.autograd.grad(fam.penalty(params, fam.tensors()), list(params.values()), allow_unused=True)
    for (k, p), g in zip(params.items(), grads, strict=True):
        expected = 0.3 * p if p.ndim >= 2 else torch.zeros_like(p)
        got = torch.zeros_like(p) if g is None else g
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15), k  # exp(log 0.3) rounding only


def test_weight_decay_optuna_arm_gets_the_global_budget_and_resumes(tmp_path):
    res = _wd_run(tmp_path, "arms=['global','optuna']")
    glob, opt = res.rows
    assert opt["method"] == "global decay (Optuna TPE)" and opt["hyperparameters"] == 1
    # A budget of training steps: every trial trains as many inner steps as the IFT arm (smoke: 3 × 3).
    assert opt["steps_per_trial"] == 9 and opt["budget_steps"] == opt["trials"] * 9 and opt["trials"] >= 1
    assert len(opt["trial_log"]) == opt["trials"] and 1e-6 <= opt["decay"] <= 1.0
    assert [t["steps"] for t in opt["trial_log"]] == [9 * (i + 1) for i in range(opt["trials"])]
    for name in ("result.json", "metrics.jsonl", "decays.pt", "test_losses.pt"):
        assert (tmp_path / "optuna" / name).is_file(), name
    assert "Against Optuna on a budget of training steps" in (tmp_path / "report.md").read_text()
    again = _wd_run(tmp_path, "arms=['global','optuna']", resume=True)  # both arms read back, not rerun
    assert [r["test_loss"] for r in again.rows] == [glob["test_loss"], opt["test_loss"]]
    assert again.rows[1]["trials"] == opt["trials"]


def test_weight_decay_optuna_refusals(tmp_path):
    from hypergradients.app.config import ConfigError

    with pytest.raises(ConfigError, match=r"optuna\.low"):
        _wd_run(tmp_path / "b", "arms=['global','optuna']", "optuna.low=2.0")
    assert not (tmp_path / "b").exists()


def test_a_step_budget_gives_the_same_trials_whatever_the_clock() -> None:
    """budget_steps // steps_per_trial trials, each recording the steps spent, however slow the clock."""
    space = {"x": Space(1e-3, 1.0)}

    def objective(p: dict[str, float]) -> tuple[float, float]:
        return (p["x"] - 0.1) ** 2, (p["x"] - 0.2) ** 2

    ticks = iter(range(0, 10_000, 1000))  # a clock that jumps 1000 s per call: a wall budget would stop
    r = tpe(objective, space, budget_steps=250, steps_per_trial=50, seed=0, clock=lambda: float(next(ticks)))
    assert [t.steps for t in r.trials] == [50, 100, 150, 200, 250]
    assert r.budget_steps == 250 and r.budget_s is None
    target = min(t.test for t in r.trials)
    hit = steps_to_match(r.trials, target)
    assert hit is None or hit in {t.steps for t in r.trials}
    with pytest.raises(ValueError, match="give one budget"):
        tpe(objective, space, budget_s=1.0, budget_steps=10, steps_per_trial=5)
    with pytest.raises(ValueError, match="steps_per_trial"):
        tpe(objective, space, budget_steps=10)
