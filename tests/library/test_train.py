"""The trainer (Algorithm 1): it tunes, it handles buffers, it stops on NaN without saving over a
good checkpoint, and a run killed with SIGKILL and resumed ends bit-for-bit like one never stopped."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients.hparams import WeightDecay
from hypergradients.training.files import UnreadableFileError, load_checkpoint, save_atomic
from hypergradients.training.fit import (
    CHECKPOINT,
    METRICS,
    NonFiniteError,
    SkippedHyperStepsWarning,
    TensorBoardCallback,
    evaluate,
    fit,
)

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _overfit_problem(
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Few noisy examples, many features: weight decay clearly helps (the validation loss says how much)."""
    g = torch.Generator().manual_seed(seed)
    d = 40
    w_true = torch.randn(d, generator=g, dtype=DT)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(n, d, generator=g, dtype=DT)
        logits = X @ w_true / math.sqrt(d) + 0.8 * torch.randn(n, generator=g, dtype=DT)
        return X, (logits > 0).long()

    return draw(30), draw(200)


def test_trainer_tunes_weight_decay_and_improves_validation_loss() -> None:
    train, val = _overfit_problem()
    runs = {}
    for tuned in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(40, 2).to(DT)
        fams = [WeightDecay(model, granularity="global", init=1e-4)] if tuned else []
        runs[tuned] = fit(
            model,
            fams,
            train,
            val,
            rounds=20,
            inner_steps=20,
            inner_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
            hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.3),
            method=hg.CG(iters=30, tol=1e-8),
            batch_size=30,
            eval_sets={"val": val},
        )
    plain, tuned_run = runs[False], runs[True]
    assert plain.hyperparameters == 0 and tuned_run.hyperparameters == 1
    decay = float(tuned_run.natural["weight_decay"])
    assert decay > 5e-3, decay  # pushed up > 50x from 1e-4 (observed: 1.2e-2)
    # Deterministic run; observed 1.09 vs 1.90 nats, so a 0.3 margin leaves room for BLAS differences.
    assert tuned_run.final["val_loss"] < plain.final["val_loss"] - 0.3, (tuned_run.final, plain.final)
    assert len(tuned_run.metrics) == 20 and all(r["hypergrad_norm"] >= 0 for r in tuned_run.metrics)
    assert tuned_run.metrics[-1]["inner_steps"] == 400


def test_hypergradient_leaves_batch_norm_statistics_alone() -> None:
    """With the hyper learning rate 0, the hypergradient's many forward passes (1 vs 6 Neumann terms)
    must not change the trained model at all: buffers are copied for it, updated by inner steps only."""
    g = torch.Generator().manual_seed(1)
    X, Xv = torch.randn(64, 5, generator=g, dtype=DT), torch.randn(32, 5, generator=g, dtype=DT)
    y, yv = (X.sum(1) > 0).long(), (Xv.sum(1) > 0).long()
    states = []
    for iters in (1, 6):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
        before = model[1].running_mean.clone()
        fam = WeightDecay(model, granularity="layer", init=1e-2)
        res = fit(
            model,
            [fam],
            (X, y),
            (Xv, yv),
            rounds=4,
            inner_steps=3,
            batch_size=16,
            hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
            method=hg.Neumann(iters=iters, alpha=0.05),
            on_solver_error="raise",
        )
        assert not torch.equal(model[1].running_mean, before)  # inner steps do update them
        assert all(r["hypergrad_norm"] > 0 for r in res.metrics)
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


class _Corrupt:
    """A callback that sets a weight to NaN after round ``at`` (as a diverging update would)."""

    def __init__(self, model: nn.Module, at: int) -> None:
        self.model, self.at = model, at

    def __call__(self, rec: dict) -> None:
        if rec["round"] == self.at:
            with torch.no_grad():
                self.model.weight[0, 0] = float("nan")


def test_nonfinite_loss_stops_with_round_name_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    train, val = _overfit_problem()
    torch.manual_seed(0)
    model = nn.Linear(40, 2).to(DT)
    with pytest.raises(
        NonFiniteError,
        match=r"round 4: the training loss 'inner_loss' is not finite .*"
        r"the last good checkpoint is .*checkpoint\.pt",
    ) as ei:
        fit(
            model,
            [WeightDecay(model)],
            train,
            val,
            rounds=10,
            inner_steps=2,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            callbacks=[_Corrupt(model, 3)],
            method=hg.CG(iters=5),
        )
    assert ei.value.round == 4 and ei.value.name == "inner_loss"
    assert ei.value.checkpoint == tmp_path / CHECKPOINT
    st = load_checkpoint(tmp_path / CHECKPOINT)
    assert st["round"] == 2 and all(bool(torch.isfinite(t).all()) for t in st["model"].values())
    assert len((tmp_path / METRICS).read_text().splitlines()) == 3


def test_nonfinite_weight_is_never_checkpointed(tmp_path: Path) -> None:
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    fit(model, [], train, val, rounds=2, inner_steps=1, checkpoint_dir=tmp_path, checkpoint_every=2)
    good = load_checkpoint(tmp_path / CHECKPOINT)["model"]
    model2 = nn.Linear(40, 2).to(DT)
    with pytest.raises(NonFiniteError, match=r"round 2: 'weight' is not finite; not saving over"):
        fit(
            model2,
            [],
            train,
            val,
            rounds=2,
            inner_steps=1,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            callbacks=[_Corrupt(model2, 2)],
        )
    kept = load_checkpoint(tmp_path / CHECKPOINT)["model"]
    assert all(torch.equal(good[k], kept[k]) for k in good)
    # A fresh (not resumed) run in the same folder starts a fresh metrics file: 2 lines, not 2 + 2.
    assert len((tmp_path / METRICS).read_text().splitlines()) == 2


def test_nonfinite_validation_loss_in_the_hyper_step_stops_the_run() -> None:
    train, (xv, yv) = _overfit_problem()
    xv = xv.clone()
    xv[3, 0] = float("nan")
    model = nn.Linear(40, 2).to(DT)
    with pytest.raises(
        NonFiniteError,
        match=r"round 1: on the hyper step's batch, the loss 'val_loss' is "
        "not finite",
    ) as ei:
        fit(model, [WeightDecay(model)], train, (xv, yv), rounds=2, inner_steps=1, method=hg.CG(iters=5))
    assert ei.value.name == "val_loss" and ei.value.checkpoint is None


def test_nonfinite_hyperparameter_stops_the_run() -> None:
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    with pytest.raises(
        NonFiniteError,
        match=r"round 1: the hyperparameter 'weight_decay' is not finite.*"
        "no checkpoint was written",
    ):
        fit(
            model,
            [WeightDecay(model)],
            train,
            val,
            rounds=3,
            inner_steps=2,
            method=hg.CG(iters=5),
            hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=float("inf")),
        )


def test_solver_failure_is_damped_skipped_with_a_warning_or_raised() -> None:
    """A Neumann series that diverges (α far above 2/λ_max): by default the hyper step is retried with
    the safe α the error carries (recorded per round); "skip" leaves λ alone and warns with the count
    and the reasons; "raise" raises."""
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    fam = WeightDecay(model, init=1e-3)
    before = fam.tensors()["weight_decay"].detach().clone()
    with pytest.warns(
        SkippedHyperStepsWarning,
        match=r"2 of 2 hyper steps were skipped.*Neumann series "
        r"diverged: 2",
    ):
        res = fit(
            model,
            [fam],
            train,
            val,
            rounds=2,
            inner_steps=1,
            method=hg.Neumann(iters=10, alpha=1e4),
            on_solver_error="skip",
        )
    assert res.skipped_hyper_steps == 2 and res.hyper_steps == 0
    assert "Neumann series diverged" in res.metrics[0]["skip_reason"]
    assert res.skip_reasons == {"Neumann series diverged": 2}
    assert torch.equal(fam.tensors()["weight_decay"].detach(), before)  # λ untouched by a skipped step
    res = fit(model, [fam], train, val, rounds=2, inner_steps=1, method=hg.Neumann(iters=10, alpha=1e4))
    assert res.skipped_hyper_steps == 0 and res.hyper_steps == 2 and res.retried_hyper_steps == 2
    for r in res.metrics:
        assert r["solver_retry"] == "alpha" and 0 < r["solver_alpha"] < 1.0 and "skip_reason" not in r
    assert not torch.equal(fam.tensors()["weight_decay"].detach(), before)
    with pytest.raises(hg.NeumannDivergenceError, match="Neumann series diverged"):
        fit(
            model,
            [fam],
            train,
            val,
            rounds=1,
            inner_steps=1,
            method=hg.Neumann(iters=10, alpha=1e4),
            on_solver_error="raise",
        )


def _nonconvex() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    train, val = _overfit_problem()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 2)).to(DT), train, val


def test_negative_curvature_is_damped_by_default() -> None:
    """CG on a small tanh network far from a minimum meets negative curvature at every hyper step:
    skipping all of them would leave the decay untuned; the default retries with growing damping."""
    model, train, val = _nonconvex()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fam = WeightDecay(model, init=1e-3)
    kw = dict(rounds=4, inner_steps=1, method=hg.CG(iters=20, tol=1e-8), batch_size=30)
    with pytest.warns(SkippedHyperStepsWarning, match=r"4 of 4 hyper steps were skipped.*negative curvature"):
        skipped = fit(model, [fam], train, val, on_solver_error="skip", **kw)  # type: ignore[arg-type]
    assert skipped.skipped_hyper_steps == 4
    model.load_state_dict(state)
    fam = WeightDecay(model, init=1e-3)
    res = fit(model, [fam], train, val, **kw)  # type: ignore[arg-type]
    assert res.skipped_hyper_steps == 0 and res.hyper_steps == 4 and res.retried_hyper_steps == 4
    for r in res.metrics:
        assert r["solver_retry"] == "damping" and r["solver_damping"] > 0 and r["hypergrad_norm"] > 0
    assert float(res.natural["weight_decay"]) != pytest.approx(1e-3, rel=1e-6)


def test_neumann_with_negative_curvature_is_retried_with_a_smaller_alpha() -> None:
    """With alpha='auto' (α = 1/λ_max) the series still diverges on an indefinite Hessian: the retry
    halves α below the safe one (the growth (1 + α|λ_min|)^K shrinks with α)."""
    method = hg.Neumann(iters=40, alpha="auto", power_iters=5)
    model, train, val = _nonconvex()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(SkippedHyperStepsWarning, match=r"3 of 3 hyper steps were skipped \(Neumann series "):
        fit(
            model,
            [WeightDecay(model)],
            train,
            val,
            rounds=3,
            inner_steps=1,
            method=method,
            batch_size=30,
            on_solver_error="skip",
        )
    model.load_state_dict(state)
    res = fit(model, [WeightDecay(model)], train, val, rounds=3, inner_steps=1, method=method, batch_size=30)
    assert res.hyper_steps == 3 and res.retried_hyper_steps == 3
    assert all(r["solver_retry"] == "alpha" and 0 < r["solver_alpha"] < 1 for r in res.metrics)


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path: Path) -> None:
    """Every checkpoint loads with weights_only=True (no code can run), RNG states included."""
    import random

    np = pytest.importorskip("numpy")  # the trainer saves numpy's generator where numpy is loaded
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    random.random()
    np.random.rand()  # the legacy global state is what the trainer saves
    fit(
        model,
        [WeightDecay(model)],
        train,
        val,
        rounds=2,
        inner_steps=1,
        checkpoint_dir=tmp_path,
        method=hg.CG(iters=5),
    )
    st = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert st["round"] == 2 and st["version"] == 3
    py, npy = random.getstate(), np.random.get_state()
    random.random()
    np.random.rand()
    from hypergradients.training.fit import _set_rng_state

    _set_rng_state(st["rng"])  # the states saved at the end are the ones after the run
    assert random.getstate() == py
    got = np.random.get_state()
    assert got[0] == npy[0] and np.array_equal(got[1], npy[1]) and got[2:] == npy[2:]


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_checkpoint_names_the_file_and_deletes_nothing(damage: str, tmp_path: Path) -> None:
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    fit(model, [], train, val, rounds=2, inner_steps=1, checkpoint_dir=tmp_path)
    ck = tmp_path / CHECKPOINT
    raw = ck.read_bytes()
    ck.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": b"\x00garbage" * 50}[damage])
    with pytest.raises(
        UnreadableFileError,
        match=rf"cannot read the checkpoint '{ck}': it is truncated, empty "
        r"or not a checkpoint .*delete it",
    ) as ei:
        fit(model, [], train, val, rounds=3, inner_steps=1, checkpoint_dir=tmp_path, resume=True)
    assert ei.value.path == ck and ck.exists()


def test_stale_temp_checkpoints_are_removed_at_start(tmp_path: Path) -> None:
    train, val = _overfit_problem()
    stale = [tmp_path / ".checkpoint.pt.tmp-4242", tmp_path / ".checkpoint.pt.tmp-4242-abcd"]
    for s in stale:
        s.write_bytes(b"half")
    fit(nn.Linear(40, 2).to(DT), [], train, val, rounds=1, inner_steps=1, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, METRICS]


def test_bad_arguments_are_refused() -> None:
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1, got 0"):
        fit(model, [], train, val, rounds=1, inner_steps=0)
    with pytest.raises(ValueError, match="on_solver_error must be 'damp', 'skip' or 'raise', got 'ignore'"):
        fit(model, [], train, val, rounds=1, inner_steps=1, on_solver_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hyperparameter key 'weight_decay' is used by two families"):
        fit(model, [WeightDecay(model), WeightDecay(model)], train, val, rounds=1, inner_steps=1)


def test_evaluate_and_atomic_save(tmp_path: Path) -> None:
    model = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0], dtype=DT))
    x, y = torch.zeros(4, 3, dtype=DT), torch.tensor([0, 1, 1, 1])
    out = evaluate(model, {"s": (x, y)})
    # logits (0, 1): CE is log(1 + e) for class 0 and log(1 + e^-1) for class 1.
    assert out["s_loss"] == pytest.approx((math.log(1 + math.e) + 3 * math.log(1 + math.exp(-1))) / 4)
    assert out["s_acc"] == 0.75
    save_atomic({"a": torch.ones(2)}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    assert torch.equal(torch.load(tmp_path / "c.pt")["a"], torch.ones(2))


def test_tensorboard_callback_without_tensorboard_says_how_to_install(tmp_path: Path) -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'hypergradients\[tensorboard\]'"):
            TensorBoardCallback(tmp_path)
    else:
        cb = TensorBoardCallback(tmp_path)
        cb({"round": 1, "val_loss": 0.5})
        cb.close()
        assert any(tmp_path.iterdir())


_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from torch import nn
    import hypergradients as hg
    from hypergradients.hparams import WeightDecay
    from hypergradients.training.fit import fit

    out, resume, pause = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(96, 6, generator=g), torch.randn(48, 6, generator=g)
    y, yv = (X[:, 0] - X[:, 1] > 0).long(), (Xv[:, 0] - Xv[:, 1] > 0).long()
    torch.manual_seed(0)
    # Batch norm (buffers) and dropout (the global RNG) both have to come back exactly.
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 2))
    fam = WeightDecay(model, granularity="weight", init=1e-2)

    def cb(rec):
        print(rec["round"], flush=True)
        time.sleep(pause)

    res = fit(model, [fam], (X, y), (Xv, yv), rounds=12, inner_steps=3, batch_size=16, val_batch_size=24,
              inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
              hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
              method=hg.Neumann(iters=4, alpha="auto", power_iters=4), eval_sets={"val": (Xv, yv)},
              callbacks=[cb], checkpoint_dir=out, checkpoint_every=2, resume=resume)
    torch.save({"model": model.state_dict(), "hp": {k: t.detach() for k, t in fam.tensors().items()},
                "metrics": res.metrics, "resumed_from": res.resumed_from}, out / "final.pt")
""")


def _worker(
    tmp_path: Path, out: Path, resume: bool, pause: float, *, watch: bool = False
) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    err = open(tmp_path / f"{out.name}-{int(resume)}.err", "w")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), "1" if resume else "0", str(pause)],
        stdout=subprocess.PIPE if watch else subprocess.DEVNULL,
        stderr=err,
        text=True,
        env=env,
    )
    err.close()  # the child holds its own descriptor
    return proc


def _finish(proc: subprocess.Popen, tmp_path: Path, name: str) -> None:
    assert proc.wait(timeout=300) == 0, (tmp_path / name).read_text()


def _strip(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in metrics]


def test_kill_and_resume_is_bit_for_bit(tmp_path: Path) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _worker(tmp_path, ref_dir, False, 0.0)
    killed = _worker(tmp_path, run_dir, False, 0.4, watch=True)
    assert killed.stdout is not None
    deadline = time.monotonic() + 120
    with killed.stdout:
        for line in killed.stdout:  # wait until the round-4 checkpoint exists, then kill mid-run
            if int(line) >= 5 and (run_dir / CHECKPOINT).exists():
                break
            assert time.monotonic() < deadline, "worker too slow"
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL and not (run_dir / "final.pt").exists()
    _finish(ref, tmp_path, "ref-0.err")
    _finish(_worker(tmp_path, run_dir, True, 0.0), tmp_path, "run-1.err")
    a = torch.load(ref_dir / "final.pt", weights_only=True)
    b = torch.load(run_dir / "final.pt", weights_only=True)
    assert a["resumed_from"] is None and b["resumed_from"] >= 4
    assert _strip(a["metrics"]) == _strip(b["metrics"])  # exact float equality, every round
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["hp"]:
        assert torch.equal(a["hp"][k], b["hp"][k]), k
    lines = [json.loads(s) for s in (run_dir / METRICS).read_text().splitlines()]
    assert [r["round"] for r in lines] == list(
        range(1, 13)
    )  # rows after the checkpoint rewritten, not doubled


def test_fit_projects_hyperparameters_and_runs_hooks_around_each_hyper_step() -> None:
    """Unprojected, this run pushes the decay from 1e-4 above 5e-3 (see the first test); a clamp of
    log d at log 1e-3 holds it there exactly, and the hooks see every hyper step in order."""
    train, val = _overfit_problem()
    torch.manual_seed(0)
    model = nn.Linear(40, 2).to(DT)
    seen: list[tuple[str, int]] = []
    cap = math.log(1e-3)

    def clamp(hp: dict[str, torch.Tensor]) -> None:
        hp["weight_decay"].clamp_(max=cap)

    res = fit(
        model,
        [WeightDecay(model, granularity="global", init=1e-4)],
        train,
        val,
        rounds=20,
        inner_steps=20,
        inner_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.3),
        method=hg.CG(iters=30, tol=1e-8),
        batch_size=30,
        project=clamp,
        before_hyper_step=[lambda h: seen.append(("before", h.steps))],
        after_hyper_step=[lambda h, r: seen.append(("after", h.steps))],
    )
    assert float(res.natural["weight_decay"]) == pytest.approx(1e-3, rel=1e-12)
    assert max(r["weight_decay"] for r in res.metrics) <= 1e-3 * (1 + 1e-12)
    assert seen == [(w, i + (w == "after")) for i in range(20) for w in ("before", "after")]


def test_nonfinite_hypergradient_stops_the_run_naming_the_key() -> None:
    """Finite losses, an overflowing hypergradient (decay 1e10, Identity(scale=1e308))."""
    train, val = _overfit_problem()
    model = nn.Linear(40, 2).to(DT)
    with pytest.raises(
        NonFiniteError,
        match=r"round 1: the hypergradient of 'weight_decay' is not finite \(NaN "
        "or inf\\); no checkpoint was written",
    ) as ei:
        fit(
            model,
            [WeightDecay(model, init=1e10)],
            train,
            val,
            rounds=2,
            inner_steps=1,
            method=hg.Identity(scale=1e308),
            inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
        )
    assert ei.value.name == "weight_decay" and ei.value.round == 1


def test_fit_with_a_frozen_layer_tunes_the_decay_of_the_others_and_leaves_it_alone() -> None:
    (X, y), (Xv, yv) = _overfit_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone()
    fam = WeightDecay(model, granularity="layer", init=1e-2)
    res = fit(
        model,
        [fam],
        (X, y),
        (Xv, yv),
        rounds=3,
        inner_steps=5,
        batch_size=16,
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        method=hg.CG(iters=5),
    )
    assert res.hyper_steps == 3 and torch.equal(model[0].weight, frozen) and fam.covered == ["2.weight"]
    assert float(res.natural["weight_decay.2.weight"]) != pytest.approx(1e-2, rel=1e-6)  # it moved


def test_resume_from_another_setups_checkpoint_raises_before_touching_the_model(tmp_path: Path) -> None:
    (X, y), (Xv, yv) = _overfit_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    fit(
        model,
        [WeightDecay(model, init=1e-2)],
        (X, y),
        (Xv, yv),
        rounds=1,
        inner_steps=2,
        batch_size=16,
        checkpoint_dir=tmp_path,
        method=hg.CG(iters=2),
    )
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(X.shape[1], 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(KeyError, match="has no hyperparameter 'l2'"):
        fit(
            fresh,
            [WeightDecay(fresh, name="l2")],
            (X, y),
            (Xv, yv),
            rounds=2,
            inner_steps=2,
            batch_size=16,
            checkpoint_dir=tmp_path,
            resume=True,
            method=hg.CG(iters=2),
        )
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
