"""fit(path_hparams=): optimizer hyperparameters tuned through the last T inner steps while the
families' hyperparameters are tuned by implicit differentiation in the same run.

* The tuner's hypergradient is the truncated unrolled one: equal (≤1e-10 relative, the same
  products) to ``hg.Unrolled(steps=T, optimizer=..., batches=...)`` from the weights and optimizer
  state T steps back, and to central finite differences of the replayed validation loss
  (ε = 1e-5 relative: O(ε²) truncation, O(1e-16/ε) rounding; 1e-6 relative tolerance).
* The trained path is the replayed path: the replay's end weights equal the model's bit for bit.
* fit moves both kinds of hyperparameters, and a resumed run ends bit for bit like an unbroken one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import hypergradients as hg
import problems as P
from hypergradients import optim
from hypergradients.core import tree
from hypergradients.hparams import WeightDecay
from hypergradients.paths.tuner import PathHyperparameters, PathTuner
from hypergradients.paths.unroll import reverse
from hypergradients.training.settings import PATH_HYPER_OPTIMIZER as _ADAM

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _data(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    Xt, Xv = torch.randn(64, 6, generator=g, dtype=DT), torch.randn(48, 6, generator=g, dtype=DT)
    w = torch.randn(6, 3, generator=g, dtype=DT)
    return (Xt, (Xt @ w).argmax(1)), (Xv, (Xv @ w).argmax(1))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _ce(model: nn.Module, w: Mapping[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    return torch.nn.functional.cross_entropy(torch.func.functional_call(model, dict(w), (b[0],)), b[1])


def test_tuner_load_state_dict_of_another_setup_raises_and_changes_nothing() -> None:
    # All or nothing: each state below used to raise only after some parts were assigned.
    (Xt, yt), _ = _data()
    model = _model()

    def tuner(opt: optim.Optimizer, values: dict[str, Tensor]) -> PathTuner:
        t = PathTuner(
            PathHyperparameters(values, opt, steps=2), dict(model.named_parameters()), hyper_optimizer=_ADAM
        )
        t.begin_round(2)
        for i in range(2):
            t.step(
                dict(model.named_parameters()),
                lambda w, replay, i=i: _ce(model, w, (Xt[8 * i : 8 * i + 8], yt[8 * i : 8 * i + 8])),
            )
        g, _ = t.hypergradient(lambda w: _ce(model, w, (Xt, yt)))
        t.apply(g)
        return t

    def snapshot(t: PathTuner) -> list[object]:
        st = t.state_dict()
        return [{k: v.clone() for k, v in st["values"].items()}, str(st["hyper_opt"]), str(st["opt_state"])]

    hb = lambda: optim.heavy_ball("lr", "mom")  # noqa: E731
    dst = tuner(hb(), {"lr": torch.tensor(0.2, dtype=DT), "mom": torch.tensor(0.7, dtype=DT)})
    # a state of the same setup but another run: loading any part of it would show
    good = tuner(hb(), {"lr": torch.tensor(0.3, dtype=DT), "mom": torch.tensor(0.5, dtype=DT)}).state_dict()
    before = snapshot(dst)
    adam = tuner(optim.adam("lr"), {"lr": torch.tensor(0.01, dtype=DT)}).state_dict()
    foreign = {
        "opt_state": {**good, "opt_state": adam["opt_state"]},  # Adam's moments for heavy ball
        "hyper_opt": {**good, "hyper_opt": adam["hyper_opt"]},  # one value's optimizer for two
        "values": {**good, "values": {"lr": torch.tensor(5.0, dtype=DT)}},  # 'mom' missing
    }
    for what, st in foreign.items():
        with pytest.raises((ValueError, KeyError)):
            dst.load_state_dict(st)
        after = snapshot(dst)
        assert all(torch.equal(after[0][k], v) for k, v in before[0].items()) and after[1:] == before[1:], (
            what
        )
    dst.load_state_dict(good)  # and the real one loads whole
    assert all(torch.equal(dst.values[k], v) for k, v in good["values"].items())


def test_tuner_hypergradient_is_truncated_unrolled_and_matches_finite_differences() -> None:
    (Xt, yt), (Xv, yv) = _data()
    model = _model()
    batches = [(Xt[8 * i : 8 * i + 8], yt[8 * i : 8 * i + 8]) for i in range(8)]
    T, n = 5, 8
    opt = optim.heavy_ball("lr", "mom")
    values = {"lr": torch.tensor(0.2, dtype=DT), "mom": torch.tensor(0.7, dtype=DT)}
    tuner = PathTuner(
        PathHyperparameters(values, opt, steps=T), dict(model.named_parameters()), hyper_optimizer=_ADAM
    )
    w_init = {k: v.detach().clone() for k, v in model.named_parameters()}  # the model changes in place
    tuner.begin_round(n)
    for b in batches:
        tuner.step(dict(model.named_parameters()), lambda w, replay, b=b: _ce(model, w, b))
    g, out = tuner.hypergradient(lambda w: _ce(model, w, (Xv, yv)))

    # The reference: the first n−T steps plainly (weights and momentum buffer are constants),
    # then Unrolled over the last T batches from there.
    w, s = dict(w_init), opt.init(w_init)
    for b in batches[: n - T]:
        wl = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        gr = torch.autograd.grad(_ce(model, wl, b), list(wl.values()))
        w, s = opt.update(dict(zip(wl, gr, strict=True)), s, tree.detach(wl), tree.detach(values))
    assert s.steps == n - T

    def inner(ww: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return _ce(model, ww, b)

    def outer(ww: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        return _ce(model, ww, (Xv, yv))

    hp = tree.detach(values)
    ref, info = hg.hypergradient(
        outer,
        inner,
        w,
        hp,
        return_info=True,
        method=hg.Unrolled(steps=T, optimizer=opt, batches=batches[n - T :]),
    )
    # hg.Unrolled starts from a zero momentum buffer, the tuner from the one training left: the
    # reference is the same reverse pass started from that state.
    ref_s, _, out_s, w_end = reverse(
        outer,
        inner,
        w,
        {k: v.clone().requires_grad_(True) for k, v in hp.items()},
        steps=T,
        optimizer=opt,
        batches=batches[n - T :],
        opt_state=s,
    )
    num = tree.norm(tree.sub(g, ref_s)) / tree.norm(ref_s)
    assert float(num) <= 1e-10
    assert float(tree.norm(tree.sub(g, ref))) > 1e-6  # the carried momentum matters
    # The trained path is the replayed one.
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), w_end[k])
    assert out == float(out_s)
    assert info.final_params is not None

    # Central finite differences of the replayed validation loss.
    def replay(h: dict[str, Tensor]) -> float:
        ww, ss = dict(w), s
        for b in batches[n - T :]:
            wl = {k: v.clone().requires_grad_(True) for k, v in ww.items()}
            gr = torch.autograd.grad(_ce(model, wl, b), list(wl.values()))
            ww, ss = opt.update(dict(zip(wl, gr, strict=True)), ss, tree.detach(wl), h)
        return float(_ce(model, ww, (Xv, yv)))

    for k in hp:
        e = 1e-5 * abs(float(hp[k]))
        hpp = {j: v.clone() + (e if j == k else 0.0) for j, v in hp.items()}
        hpm = {j: v.clone() - (e if j == k else 0.0) for j, v in hp.items()}
        fd = (replay(hpp) - replay(hpm)) / (2 * e)
        assert abs(float(g[k]) - fd) <= 1e-6 * abs(fd), (k, float(g[k]), fd)


def _fit(
    tmp: Path | None, rounds: int, *, resume: bool = False
) -> tuple[hg.TrainResult, nn.Module, dict[str, Tensor], WeightDecay]:
    train, val = _data()
    model = _model()
    fam = WeightDecay(model, granularity="global", init=1e-3)
    values = {"lr": torch.tensor(0.1, dtype=DT), "mom": torch.tensor(0.5, dtype=DT)}
    ph = PathHyperparameters(
        values,
        optim.heavy_ball("lr", "mom"),
        steps=4,
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.02),
        project=lambda v: (v["lr"].clamp_(min=1e-3), v["mom"].clamp_(0.0, 0.99)),
    )
    res = hg.fit(
        model,
        [fam],
        train,
        val,
        rounds=rounds,
        inner_steps=6,
        batch_size=16,
        method=hg.CG(iters=10),
        path_hparams=ph,
        checkpoint_dir=tmp,
        checkpoint_every=2,
        resume=resume,
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
    )
    return res, model, values, fam


def test_fit_tunes_path_and_implicit_hyperparameters_together() -> None:
    res, model, values, fam = _fit(None, 4)
    lrs = [m["path.lr"] for m in res.metrics]
    moms = [m["path.mom"] for m in res.metrics]
    assert len(set(lrs)) == 4 and len(set(moms)) == 4  # the path hyper step moved them every round
    assert all(m["path_hypergrad_norm"] > 0 for m in res.metrics)
    assert float(values["lr"].detach()) == lrs[-1]
    assert res.hyper_steps == 4  # the implicit hyper step ran too, and moved the decay
    assert all(float(t.detach()) != float(torch.tensor(1e-3, dtype=DT).log()) for t in fam.tensors().values())
    with pytest.raises(ValueError, match="inner_optimizer or path_hparams, not both"):
        hg.fit(
            model,
            [fam],
            *_data(),
            rounds=1,
            inner_steps=1,
            path_hparams=PathHyperparameters({"lr": torch.tensor(0.1, dtype=DT)}, optim.sgd("lr")),
            inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        )
    with pytest.raises(hg.HypergradientError, match=r"the optimizer reads \['lr', 'mom'\]"):
        PathHyperparameters({"lr": torch.tensor(0.1)}, optim.heavy_ball("lr", "mom"))


def test_fit_schedule_only_last_T_entries_move() -> None:
    train, val = _data()
    model = _model()
    K = 2 * 6
    values = {"sched": torch.full((K,), 0.1, dtype=DT)}
    ph = PathHyperparameters(
        values, optim.sgd("sched"), steps=3, hyper_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01)
    )
    hg.fit(model, [], train, val, rounds=2, inner_steps=6, batch_size=16, path_hparams=ph)
    moved = (values["sched"].detach() != 0.1).nonzero().flatten().tolist()
    # Round 1 differentiates global steps 3..5, round 2 steps 9..11: the schedule is indexed by
    # the global inner step and the truncated window leaves the others alone.
    assert moved == [3, 4, 5, 9, 10, 11]


def test_resume_with_path_hyperparameters_is_bit_for_bit(tmp_path: Path) -> None:
    full, m_full, v_full, f_full = _fit(tmp_path / "a", 4)
    _fit(tmp_path / "b", 2)
    part, m_part, v_part, f_part = _fit(tmp_path / "b", 4, resume=True)
    assert part.resumed_from == 2
    for (k, a), (_, b) in zip(m_full.state_dict().items(), m_part.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    for k in v_full:
        assert torch.equal(v_full[k].detach(), v_part[k].detach()), k
    for k, t in f_full.tensors().items():
        assert torch.equal(t.detach(), f_part.tensors()[k].detach()), k
    assert f_full.tensors()
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in full.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in part.metrics]


class _OnceTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return P.OnceTanh.apply(x)  # type: ignore[no-any-return]


def test_tuner_refuses_an_op_without_second_derivative() -> None:
    """fit(path_hparams=) replays the window through the same reverse sweep as hg.Unrolled: a
    @once_differentiable backward in the model is refused there too, not silently dropped."""
    (Xt, yt), (Xv, yv) = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), _OnceTanh(), nn.Linear(8, 3)).to(DT)
    tuner = PathTuner(
        PathHyperparameters({"lr": torch.tensor(0.2, dtype=DT)}, optim.sgd("lr"), steps=2),
        dict(model.named_parameters()),
        hyper_optimizer=_ADAM,
    )
    tuner.begin_round(3)
    for i in range(3):
        b = (Xt[8 * i : 8 * i + 8], yt[8 * i : 8 * i + 8])
        tuner.step(dict(model.named_parameters()), lambda w, replay, b=b: _ce(model, w, b))
    with pytest.raises(hg.HypergradientError, match=r"OnceTanh.*once_differentiable.*fit\(path_hparams="):
        tuner.hypergradient(lambda w: _ce(model, w, (Xv, yv)))


def test_tuner_refuses_a_schedule_shorter_than_the_steps_it_will_take() -> None:
    """A schedule is indexed by the global inner step: the round that would need entry 4 of a
    4-entry schedule is refused when it begins, naming K = 5, not midway at its first missing step."""
    (Xt, yt), _ = _data()
    model = _model()
    tuner = PathTuner(
        PathHyperparameters({"lr": torch.full((4,), 0.1, dtype=DT)}, optim.sgd("lr"), steps=2),
        dict(model.named_parameters()),
        hyper_optimizer=_ADAM,
    )
    tuner.begin_round(3)  # steps 0..2
    for i in range(3):
        b = (Xt[8 * i : 8 * i + 8], yt[8 * i : 8 * i + 8])
        tuner.step(dict(model.named_parameters()), lambda w, replay, b=b: _ce(model, w, b))
    tuner.begin_round(1)  # step 3: the last entry
    with pytest.raises(hg.HypergradientError, match=r"'lr'.*4 entries.*K = 5 steps.*shape \(5,\)"):
        tuner.begin_round(2)  # steps 3..4
