"""The training layer's one of each: one callback class, grouped settings with the flat keywords as
their equivalents, one place for the defaults, one default loss, and names with one meaning each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients.hparams import Batch, ModelForward
from hypergradients.hparams.objective import cross_entropy
from hypergradients.training.callbacks import MetricsWriter, TensorBoardCallback
from hypergradients.training.files import load_checkpoint
from hypergradients.training.fit import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

DT = torch.float64
Data = tuple[torch.Tensor, torch.Tensor]


def _data() -> tuple[Data, Data]:
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(40, 5, generator=g, dtype=DT), torch.randn(20, 5, generator=g, dtype=DT)
    return (X, (X[:, 0] > 0).long()), (Xv, (Xv[:, 0] > 0).long())


def _model() -> tuple[nn.Module, list[hg.Family]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    return model, [hg.WeightDecay(model, granularity="layer", init=1e-2)]


def _linear() -> tuple[nn.Module, list[hg.Family]]:
    """Logistic regression: a positive-definite Hessian, so Neumann(alpha="auto") runs through."""
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(DT)
    return model, [hg.WeightDecay(model, init=1e-1)]


def _strip(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in metrics]


class Recorder(hg.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_fit_start(self, history: Any) -> None:
        self.seen.append(("fit_start", len(history)))

    def on_before_hyper_step(self, hyper: hg.HyperOptimizer) -> None:
        self.seen.append(("before_hyper_step", hyper.steps))

    def on_hyper_step(self, hyper: hg.HyperOptimizer, result: hg.HyperStep) -> None:
        assert result.applied
        self.seen.append(("hyper_step", hyper.steps))

    def on_round_end(self, record: dict[str, Any]) -> None:
        self.seen.append(("round_end", record["round"]))

    def on_checkpoint(self, path: Path, round: int) -> None:
        assert path.name == CHECKPOINT and load_checkpoint(path)["round"] == round
        self.seen.append(("checkpoint", round))

    def on_fit_end(self, result: hg.TrainResult) -> None:
        self.seen.append(("fit_end", len(result.metrics)))


class Counter(hg.Callback):
    """A callback with state: the rounds it has seen, over resumes."""

    def __init__(self) -> None:
        self.n = 0

    def on_round_end(self, record: dict[str, Any]) -> None:
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: Any) -> None:
        self.n = int(state["n"])


def test_callback_hooks_run_in_order(tmp_path: Path) -> None:
    model, fams = _model()
    rec = Recorder()
    hg.fit(
        model,
        fams,
        *_data(),
        rounds=3,
        inner_steps=2,
        batch_size=8,
        method=hg.CG(iters=3, damping=0.1),
        checkpoints=hg.Checkpoints(tmp_path, every=2),
        callbacks=[rec],
    )
    per_round = [
        [("before_hyper_step", r - 1), ("hyper_step", r), ("round_end", r)]
        + ([("checkpoint", r)] if r in (2, 3) else [])
        for r in (1, 2, 3)
    ]
    assert rec.seen == [("fit_start", 0), *[e for es in per_round for e in es], ("fit_end", 3)]


def test_callback_state_is_saved_in_checkpoints_and_restored_on_resume(tmp_path: Path) -> None:
    model, fams = _model()
    first = Counter()
    hg.fit(
        model,
        fams,
        *_data(),
        rounds=2,
        inner_steps=2,
        batch_size=8,
        method=hg.CG(iters=3, damping=0.1),
        checkpoint_dir=tmp_path,
        callbacks=[first, Recorder()],
    )
    assert load_checkpoint(tmp_path / CHECKPOINT)["callbacks"] == {"Counter": {"n": 2}}  # Recorder: no state
    model, fams = _model()
    again, rec = Counter(), Recorder()
    hg.fit(
        model,
        fams,
        *_data(),
        rounds=4,
        inner_steps=2,
        batch_size=8,
        method=hg.CG(iters=3, damping=0.1),
        checkpoint_dir=tmp_path,
        resume=True,
        callbacks=[again, rec],
    )
    assert again.n == 4 and rec.seen[0] == ("fit_start", 2)
    assert load_checkpoint(tmp_path / CHECKPOINT)["callbacks"] == {"Counter": {"n": 4}}


def test_two_callbacks_with_state_need_their_own_keys(tmp_path: Path) -> None:
    model, fams = _model()
    with pytest.raises(
        ValueError,
        match="two callbacks with state have the key 'Counter': give one of them its own state_key",
    ):
        hg.fit(
            model,
            fams,
            *_data(),
            rounds=1,
            inner_steps=1,
            checkpoint_dir=tmp_path,
            callbacks=[Counter(), Counter()],
        )
    assert not any(tmp_path.iterdir())  # refused before anything was written

    class Second(Counter):
        @property
        def state_key(self) -> str:
            return "second"

    model, fams = _model()
    a, b = Counter(), Second()
    hg.fit(model, fams, *_data(), rounds=1, inner_steps=1, checkpoint_dir=tmp_path, callbacks=[a, b])
    assert load_checkpoint(tmp_path / CHECKPOINT)["callbacks"] == {"Counter": {"n": 1}, "second": {"n": 1}}


def test_plain_functions_and_the_hyper_step_hooks_are_callbacks_too() -> None:
    model, fams = _model()
    seen: list[tuple[str, int]] = []
    rec = Recorder()
    hg.fit(
        model,
        fams,
        *_data(),
        rounds=2,
        inner_steps=1,
        method=hg.CG(iters=3, damping=0.1),
        callbacks=[lambda r: seen.append(("function", r["round"])), rec],
        before_hyper_step=[lambda h: seen.append(("before", h.steps))],
        after_hyper_step=[lambda h, res: seen.append(("after", h.steps))],
    )
    assert seen == [
        ("before", 0),
        ("after", 1),
        ("function", 1),
        ("before", 1),
        ("after", 2),
        ("function", 2),
    ]
    assert issubclass(MetricsWriter, hg.Callback) and issubclass(TensorBoardCallback, hg.Callback)
    with pytest.raises(TypeError, match=r"a callback must be a hypergradients\.Callback or a function f"):
        hg.fit(model, fams, *_data(), rounds=1, inner_steps=1, callbacks=[3])  # type: ignore[list-item]


def test_grouped_settings_are_the_flat_keywords(tmp_path: Path) -> None:
    """Each flat keyword is one field of one group: the same run, bit for bit, either way."""
    train, val = _data()
    runs = []
    for grouped in (False, True):
        model, fams = _model()
        folder = tmp_path / str(grouped)
        common: dict[str, Any] = dict(
            rounds=3, inner_steps=2, inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)
        )
        if grouped:
            res = hg.fit(
                model,
                fams,
                train,
                val,
                **common,
                hyper=hg.HyperSettings(
                    method=hg.Neumann(iters=5, alpha="auto"),
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
                    project=lambda hp: None,
                    on_solver_error="skip",
                    warm_start=False,
                    hvp_mode="forward",
                ),
                batches=hg.Batches(size=8, val_size=10, hyper_size=12, seed=3),
                evaluation=hg.Evaluation({"val": val}, every=2),
                checkpoints=hg.Checkpoints(folder, every=2, resume=True),
            )
        else:
            res = hg.fit(
                model,
                fams,
                train,
                val,
                **common,
                method=hg.Neumann(iters=5, alpha="auto"),
                hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
                project=lambda hp: None,
                on_solver_error="skip",
                warm_start=False,
                hvp_mode="forward",
                batch_size=8,
                val_batch_size=10,
                hyper_batch_size=12,
                seed=3,
                eval_sets={"val": val},
                eval_every=2,
                checkpoint_dir=folder,
                checkpoint_every=2,
                resume=True,
            )
        runs.append(res)
        assert (
            (folder / CHECKPOINT).exists()
            and "val_loss" in res.metrics[1]
            and "val_loss" not in res.metrics[0]
        )
    assert _strip(runs[0].metrics) == _strip(runs[1].metrics)


class _Attention(nn.Module):
    """Self-attention through scaled_dot_product_attention, whose fused CPU kernel has no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 5 tokens, 4) -> logits (B, 3)
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).split(4, dim=2))  # one head: (B, 1, 5, 4)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).mean((1, 2)))


def test_fit_takes_hvp_mode_for_a_model_without_double_backward() -> None:
    """fit(hvp_mode="finite-difference") trains a model whose attention kernel has no second derivative;
    with the default products the hyper step refuses and names that mode."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    for mode in ("reverse", "finite-difference"):
        torch.manual_seed(0)
        model = _Attention()
        fams = [hg.WeightDecay(model, granularity="global")]
        if mode == "reverse":
            with pytest.raises(hg.HypergradientError, match="finite-difference"):
                hg.fit(model, fams, (x, y), (x, y), rounds=1, inner_steps=1, method=hg.CG(iters=2))
            continue
        res = hg.fit(
            model, fams, (x, y), (x, y), rounds=2, inner_steps=1, method=hg.CG(iters=2), hvp_mode=mode
        )
        assert res.hyper_steps == 2 and res.metrics[-1]["hvps"] >= 2


def test_a_group_and_one_of_its_keywords_are_refused_together() -> None:
    model, fams = _model()
    with pytest.raises(
        ValueError,
        match=r"give batch_size inside batches=hg.Batches\(\.\.\., size=\.\.\.\) or as "
        "batch_size=, not both",
    ):
        hg.fit(model, fams, *_data(), rounds=1, inner_steps=1, batches=hg.Batches(size=4), batch_size=8)
    with pytest.raises(TypeError, match="fit\\(\\) got an unexpected keyword argument 'batchsize'"):
        hg.fit(model, fams, *_data(), rounds=1, inner_steps=1, batchsize=8)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"batch_size \(Batches.size\) must be an integer >= 1, got 0"):
        hg.fit(model, fams, *_data(), rounds=1, inner_steps=1, batch_size=0)
    with pytest.raises(
        ValueError, match=r"checkpoint_every \(Checkpoints.every\) must be an integer >= 1, got 0"
    ):
        hg.Checkpoints("x", every=0)
    with pytest.raises(ValueError, match=r"give warm_start inside settings=hg\.HyperSettings"):
        hg.HyperOptimizer(model, fams, settings=hg.HyperSettings(), warm_start=False)


def test_one_place_decides_the_defaults() -> None:
    """fit and HyperOptimizer take the same hyper step by default (Neumann-20 with the solver state
    carried); hg.hypergradient alone defaults to CG."""
    model, fams = _model()
    assert hg.HyperOptimizer(model, fams).settings == hg.HyperSettings()
    d = hg.HyperSettings()
    assert d.method == hg.Neumann(iters=20, alpha="auto") and d.warm_start is True
    assert d.on_solver_error == "damp" and d.project is None
    used: list[hg.HyperSettings] = []
    model, fams = _linear()
    res = hg.fit(
        model,
        fams,
        *_data(),
        rounds=3,
        inner_steps=2,
        after_hyper_step=[lambda h, r: used.append(h.settings)],
    )
    assert used[0] == hg.HyperSettings()
    # warm start: λ_max is estimated at the first hyper step and reused at the next ones
    assert [r["solver_lambda_max_age"] for r in res.metrics] == [0.0, 1.0, 2.0]
    w = {"w": torch.ones(2, dtype=DT)}
    lam = {"l": torch.zeros((), dtype=DT)}
    _, info = hg.hypergradient(
        lambda p, h: (p["w"] ** 2).sum(),
        lambda p, h: ((p["w"] - 1) ** 2).sum() * h["l"].exp(),
        w,
        lam,
        return_info=True,
    )
    assert info.method == "CG"


def test_one_default_loss_for_both_forms() -> None:
    out = torch.randn(4, 3, dtype=DT)
    y = torch.tensor([0, 2, 1, 1])
    ref = torch.nn.functional.cross_entropy(out, y, reduction="none")
    assert torch.equal(cross_entropy(out, y), ref)
    assert torch.equal(cross_entropy(out, Batch(out, y, torch.arange(4))), ref)
    from hypergradients.training import fit as fit_module
    from hypergradients.training import hyper as hyper_module

    assert fit_module.cross_entropy is cross_entropy and hyper_module.classification_loss is cross_entropy
    assert hg.HyperOptimizer(*_model()).objective.loss_fn is cross_entropy


def test_each_name_means_one_thing() -> None:
    import hypergradients.hparams as hp

    assert issubclass(hg.Forward, hg.PathMethod)  # the forward-mode method
    assert ModelForward is hp.base.ModelForward and not hasattr(hp.base, "Forward")
    with pytest.warns(
        DeprecationWarning, match="hypergradients.hparams.Forward is now hypergradients.hparams.ModelForward"
    ):
        assert hp.Forward is ModelForward
    from hypergradients.core import modules, tree

    assert not hasattr(modules, "Batch") and hp.base.Tree is tree.Tree
    from hypergradients.hparams.objective import Objective
    from hypergradients.paths import methods
    from hypergradients.paths.tuner import PathHyperparameters, PathTuner

    assert (
        hg.PathHyperparameters is PathHyperparameters and PathTuner.__module__ == "hypergradients.paths.tuner"
    )
    assert not hasattr(methods, "PathTuner") and Objective.__module__ == "hypergradients.hparams.objective"


def test_fit_warm_start_default_changes_nothing_for_runs_that_give_it() -> None:
    """An explicit warm_start=False is the run of before (each hyper step from scratch)."""
    model, fams = _linear()
    res = hg.fit(model, fams, *_data(), rounds=2, inner_steps=2, warm_start=False)
    assert [r["solver_lambda_max_age"] for r in res.metrics] == [0.0, 0.0]
    assert all(math.isfinite(r["hypergrad_norm"]) for r in res.metrics)
