"""``fit``'s checkpoint versions: version 3 nests ``HyperOptimizer.state_dict()``; a version-2
checkpoint (the hyper state's parts copied field by field beside the rest) still resumes, bit for
bit; anything older is refused with the message that says to delete it.

``tests/library/data/fit_checkpoint_v2.pt`` was written by the version-2 code (the commit before version 3)
with :func:`setup`'s run, 2 rounds, checkpointed after round 2::

    model, fams, train, val, kw = setup()
    hg.fit(model, fams, train, val, rounds=2, checkpoint_dir=out, checkpoint_every=2, **kw)

Its floats were computed on one machine, so the tests compare what a resume loads with what the
file holds (exact on any machine); the bit-for-bit test writes its own version-2 file from a
version-3 one (:func:`as_version_2`, checked against the real file's layout) and compares a run
resumed from it with an uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients.training.files import UnreadableFileError, load_checkpoint, save_atomic
from hypergradients.training.fit import CHECKPOINT, CHECKPOINT_VERSION, check_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

DT = torch.float64
V2 = Path(__file__).parent / "data" / "fit_checkpoint_v2.pt"
Data = tuple[torch.Tensor, torch.Tensor]


def setup() -> tuple[nn.Module, list[hg.Family], Data, Data, dict[str, Any]]:
    """Weight decay and dropout (a noise generator), CG warm-started (a solver state), SGD with
    momentum inside and Adam outside (two optimizer states), minibatches (three streams)."""
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(48, 6, generator=g, dtype=DT), torch.randn(24, 6, generator=g, dtype=DT)
    y, yv = (X[:, 0] - X[:, 1] > 0).long(), (Xv[:, 0] - Xv[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    fams: list[hg.Family] = [
        hg.WeightDecay(model, granularity="layer", init=1e-2),
        hg.Dropout(model, ["0"], init=0.8, temperature=0.5),
    ]
    kw: dict[str, Any] = dict(
        inner_steps=2,
        batch_size=8,
        val_batch_size=12,
        method=hg.CG(iters=3, damping=0.1),
        warm_start=True,
        inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
    )
    return model, fams, (X, y), (Xv, yv), kw


def as_version_2(st: dict[str, Any]) -> dict[str, Any]:
    """A version-3 checkpoint in version 2's layout: the hyper state's parts at the top level."""
    hyper = st["hyper"]
    out = {k: v for k, v in st.items() if k not in ("hyper", "callbacks")}
    out.update(
        version=2,
        skipped=hyper["skipped"],
        retried=hyper["retried"],
        skip_reasons=hyper["skip_reasons"],
        hparams=hyper["hparams"],
        hyper_opt=hyper["optimizer"],
        solver=hyper["solver"],
        noise=hyper["noise"],
    )
    return out


def _strip(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in metrics]


def test_checkpoint_nests_the_hyper_optimizers_state(tmp_path: Path) -> None:
    model, fams, train, val, kw = setup()
    hyper_state: list[dict[str, Any]] = []
    res = hg.fit(
        model,
        fams,
        train,
        val,
        rounds=2,
        checkpoint_dir=tmp_path,
        **kw,
        after_hyper_step=[lambda h, r: hyper_state.append(h.state_dict())],
    )
    st = load_checkpoint(tmp_path / CHECKPOINT)
    assert st["version"] == CHECKPOINT_VERSION == 3 and res.rounds == 2
    assert set(st["hyper"]) == set(hyper_state[-1])  # HyperOptimizer.state_dict(), as it is
    for k, t in hyper_state[-1]["hparams"].items():
        assert torch.equal(st["hyper"]["hparams"][k], t)
    assert st["hyper"]["solver"] is not None and st["hyper"]["noise"] is not None
    assert st["hyper"]["steps"] == 2
    assert not {"hparams", "hyper_opt", "solver", "noise", "skipped"} & set(st)  # no copies beside it


def test_the_real_version_2_file_has_the_layout_the_tests_write(tmp_path: Path) -> None:
    real = load_checkpoint(V2)
    model, fams, train, val, kw = setup()
    hg.fit(model, fams, train, val, rounds=2, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    ours = as_version_2(load_checkpoint(tmp_path / CHECKPOINT))
    assert real["version"] == 2 and set(real) == set(ours)
    assert set(real["hparams"]) == set(ours["hparams"]) and set(real["solver"]) == set(ours["solver"])


def test_a_version_2_checkpoint_resumes_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's own values come back: the model, the hyperparameters and their optimizer, the
    solver state, the noise generator, the counts, the inner optimizer and the metrics."""
    shutil.copy(V2, tmp_path / CHECKPOINT)
    real = load_checkpoint(V2)
    check_checkpoint(tmp_path)
    loaded: list[dict[str, Any]] = []
    load = hg.HyperOptimizer.load_state_dict

    def spy(self: hg.HyperOptimizer, state: Any) -> None:
        load(self, state)
        loaded.append(self.state_dict())

    monkeypatch.setattr(hg.HyperOptimizer, "load_state_dict", spy)
    model, fams, train, val, kw = setup()
    made: list[torch.optim.Optimizer] = []
    kw["inner_optimizer"] = lambda ps: made.append(torch.optim.SGD(ps, lr=0.1, momentum=0.9)) or made[-1]
    seen: list[dict[str, Any]] = []
    res = hg.fit(
        model, fams, train, val, rounds=2, checkpoint_dir=tmp_path, resume=True, **kw, callbacks=[seen.append]
    )
    assert res.resumed_from == 2 and seen == [] and _strip(res.metrics) == _strip(real["metrics"])
    for k, t in real["model"].items():
        assert torch.equal(model.state_dict()[k], t), k
    (hyper,) = loaded
    assert set(hyper["hparams"]) == set(real["hparams"])
    assert all(torch.equal(t, real["hparams"][k]) for k, t in hyper["hparams"].items())
    assert all(torch.equal(t, real["hparams"][k]) for f in fams for k, t in f.tensors().items())
    assert hyper["optimizer"]["state"].keys() == real["hyper_opt"]["state"].keys()
    for i, s in real["hyper_opt"]["state"].items():
        assert all(torch.equal(hyper["optimizer"]["state"][i][k], v) for k, v in s.items())
    assert torch.equal(hyper["noise"], real["noise"])
    assert hyper["solver"]["calls"] == real["solver"]["calls"] == 2
    assert all(torch.equal(hyper["solver"]["p"][k], v) for k, v in real["solver"]["p"].items())
    assert (hyper["steps"], hyper["skipped"], hyper["retried"]) == (2, real["skipped"], real["retried"])
    inner = made[0].state_dict()["state"]
    assert all(
        torch.equal(inner[i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in real["inner_opt"]["state"].items()
    )


def test_a_version_2_checkpoint_resumes_bit_for_bit(tmp_path: Path) -> None:
    model, fams, train, val, kw = setup()
    full = hg.fit(model, fams, train, val, rounds=4, **kw)
    end = {k: v.clone() for k, v in model.state_dict().items()}
    model, fams, train, val, kw = setup()
    hg.fit(model, fams, train, val, rounds=2, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    save_atomic(as_version_2(load_checkpoint(tmp_path / CHECKPOINT)), tmp_path / CHECKPOINT)
    model, fams, train, val, kw = setup()
    res = hg.fit(model, fams, train, val, rounds=4, checkpoint_dir=tmp_path, resume=True, **kw)
    assert res.resumed_from == 2
    assert _strip(res.metrics) == _strip(full.metrics)  # exact float equality, every round
    assert all(torch.equal(model.state_dict()[k], v) for k, v in end.items())


@pytest.mark.parametrize("version", [1, 4, None])
def test_other_versions_are_refused_with_the_fix(version: int | None, tmp_path: Path) -> None:
    st = dict(load_checkpoint(V2))
    if version is None:
        del st["version"]
    else:
        st["version"] = version
    save_atomic(st, tmp_path / CHECKPOINT)
    model, fams, train, val, kw = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        UnreadableFileError,
        match=rf"it is not a checkpoint of hypergradients\.fit of version 2 "
        rf"or 3 \(version {version}\).*delete it to start this "
        "training over from round 0",
    ):
        hg.fit(model, fams, train, val, rounds=3, checkpoint_dir=tmp_path, resume=True, **kw)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
