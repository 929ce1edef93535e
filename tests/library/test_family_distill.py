"""Distilled data: the batch it puts in place of the real one, its hypergradient (examples and soft
labels) against central finite differences of ``L_V(w*(λ))`` with the inner problem re-solved by
Newton, the step size through ``hg.Unrolled(lr=key)``, the trainer and the own-loop hyper step
with resume bit for bit, and the figure (matplotlib imported only there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients.core import tree
from hypergradients.hparams import Batch, WeightDecay
from hypergradients.hparams.distill import DistilledData, save_distilled_figure
from hypergradients.hparams.objective import Objective, cross_entropy

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(DT)


def _val(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    # Class-dependent means so that the validation loss has a real signal to pass on.
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=DT) + 0.7 * y.to(DT)[:, None, None, None]
    return x, y


def _losses(model: nn.Module, fams: list, val: tuple[torch.Tensor, torch.Tensor]):  # type: ignore[no-untyped-def]
    obj = Objective(model, fams, cross_entropy)
    dummy = Batch(val[0][:1], val[1][:1], torch.arange(1))  # replaced by the distilled set
    vb = Batch(val[0], val[1], torch.arange(len(val[1])))

    def inner(w: dict, h: dict) -> torch.Tensor:
        return obj.train(w, h, dummy, forward=obj.copy_buffers)

    def outer(w: dict, h: dict) -> torch.Tensor:
        return obj.val(w, vb)

    return inner, outer


def _newton(inner, w0: dict, h: dict, iters: int = 40) -> dict:  # type: ignore[no-untyped-def]
    """Newton on the strictly convex (softmax + L2 on every weight) inner problem: ‖∇‖ < 1e-14."""
    x = tree.flatten(w0).clone()
    for _ in range(iters):
        f = lambda v: inner(tree.unflatten(v, w0), h)  # noqa: E731
        gr = torch.func.grad(f)(x)
        if float(gr.norm()) < 1e-14:
            break
        x = x - torch.linalg.solve(torch.func.hessian(f)(x), gr)
    return tree.unflatten(x, w0)


def test_batch_is_the_distilled_set_with_class_order_labels() -> None:
    fam = DistilledData((1, 4, 4), 3, per_class=2, dtype=DT)
    h = fam.tensors()
    b = fam.batch(
        Batch(torch.zeros(5, 1, 4, 4, dtype=DT), torch.zeros(5, dtype=torch.long), torch.arange(5)), h
    )
    assert b.x is h["distill.x"] and b.y.tolist() == [0, 0, 1, 1, 2, 2] and b.index.tolist() == list(range(6))
    assert fam.count() == 6 * 16
    soft = DistilledData((16,), 3, per_class=1, soft_labels=True, lr=0.1, dtype=DT)
    assert soft.count() == 3 * 16 + 3 * 3 + 1
    p = soft.natural()["distill.labels"]
    # label_init a = 3: the true class gets e^3 / (e^3 + 2).
    expected = torch.exp(torch.tensor(3.0, dtype=DT)) / (torch.exp(torch.tensor(3.0, dtype=DT)) + 2)
    torch.testing.assert_close(p.diagonal(), expected.expand(3))
    torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"init has shape \(2, 16\); expected .*\(3, 16\)"):
        DistilledData((16,), 3, init=torch.zeros(2, 16))
    with pytest.raises(KeyError, match="learns no step size"):
        _ = fam.lr_key


@pytest.mark.parametrize("soft", [False, True])
def test_hypergradient_matches_finite_differences_at_the_newton_optimum(soft: bool) -> None:
    model = _model()
    fam = DistilledData((1, 4, 4), 3, per_class=2, soft_labels=soft, dtype=DT, seed=3)
    # Decay on every weight and bias: the inner problem (6 points, 51 weights) gets a unique minimiser.
    wd = WeightDecay(model, init=0.1, include=lambda n, p: True)
    inner, outer = _losses(model, [fam, wd], _val())
    h = {k: v.detach() for k, v in {**fam.tensors(), **wd.tensors()}.items()}
    w0 = {k: p.detach() for k, p in model.named_parameters()}
    w = _newton(inner, w0, h)
    g = hg.hypergradient(outer, inner, w, h, method=hg.Exact())
    gen = torch.Generator().manual_seed(7)
    for key in [k for k in h if k.startswith("distill")]:
        for _ in range(2):
            u = torch.randn(h[key].shape, generator=gen, dtype=DT)
            eps = 1e-5

            def val_at(t: float, key: str = key, u: torch.Tensor = u) -> float:
                hh = dict(h)
                hh[key] = h[key] + t * u
                return float(outer(_newton(inner, w, hh), hh))

            fd = (val_at(eps) - val_at(-eps)) / (2 * eps)
            # Newton reaches ‖∇‖ < 1e-14, so w*(λ ± εu) is exact to ~1e-14; the central difference
            # errs by ε²·L'''/6 ~ 1e-10 and by rounding ~1e-16/ε ~ 1e-11: 1e-7 relative is wide.
            assert float((g[key] * u).sum()) == pytest.approx(fd, rel=1e-7, abs=1e-10)


def test_step_size_through_unrolled_matches_finite_differences_and_implicit_refuses_it() -> None:
    model = _model()
    fam = DistilledData((1, 4, 4), 3, per_class=1, soft_labels=True, lr=0.3, dtype=DT, seed=4)
    inner, outer = _losses(model, [fam], _val())
    h = {k: v.detach() for k, v in fam.tensors().items()}
    w0 = {k: p.detach() for k, p in model.named_parameters()}
    steps = 6

    def path_val(hh: dict) -> float:
        # The definition: `steps` plain gradient steps from w0 with α = hh["distill.lr"], then L_V.
        w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
        for _ in range(steps):
            gr = torch.autograd.grad(inner(w, hh), list(w.values()))
            w = {
                k: (v - hh["distill.lr"] * gk).detach().requires_grad_(True)
                for (k, v), gk in zip(w.items(), gr, strict=True)
            }
        return float(outer(w, hh).detach())

    g = hg.hypergradient(outer, inner, w0, h, method=hg.Unrolled(steps=steps, lr=fam.lr_key))
    gen = torch.Generator().manual_seed(9)
    for key in h:
        u = torch.randn(h[key].shape, generator=gen, dtype=DT)
        eps = 1e-6
        fd = (path_val({**h, key: h[key] + eps * u}) - path_val({**h, key: h[key] - eps * u})) / (2 * eps)
        # A smooth function of λ in float64: central differences err by ~ε² + 1e-16/ε ~ 1e-10.
        assert float((g[key] * u).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert float(g["distill.lr"].abs()) > 0
    with pytest.raises(hg.PathOnlyHyperparameterError, match=r"distill\.lr"):
        hg.hypergradient(outer, inner, w0, h, method=hg.CG(iters=5))
    # The projection keeps α positive.
    hh = {"distill.lr": torch.tensor(-1.0, dtype=DT)}
    fam.project(hh)
    assert float(hh["distill.lr"]) == 1e-6


def _fit(tmp: Path, rounds: int, resume: bool) -> tuple[dict, dict]:
    model = _model()
    fam = DistilledData((1, 4, 4), 3, per_class=2, soft_labels=True, dtype=DT, seed=5)
    wd = WeightDecay(model, init=0.1, include=lambda n, p: True)
    x, y = _val(60, seed=2)
    hg.fit(
        model,
        [fam, wd],
        (x[:36], y[:36]),
        (x[36:], y[36:]),
        rounds=rounds,
        inner_steps=3,
        batch_size=8,
        method=hg.CG(iters=10),
        checkpoint_dir=tmp,
        checkpoint_every=2,
        resume=resume,
    )
    return (
        {k: v.detach().clone() for k, v in {**fam.tensors(), **wd.tensors()}.items()},
        {k: p.detach().clone() for k, p in model.named_parameters()},
    )


def test_fit_moves_the_examples_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    start = DistilledData((1, 4, 4), 3, per_class=2, soft_labels=True, dtype=DT, seed=5).tensors()
    full_h, full_w = _fit(tmp_path / "full", 4, False)
    _fit(tmp_path / "cut", 2, False)
    res_h, res_w = _fit(tmp_path / "cut", 4, True)
    assert not torch.equal(full_h["distill.x"], start["distill.x"].detach())
    assert all(torch.equal(full_h[k], res_h[k]) for k in full_h)
    assert all(torch.equal(full_w[k], res_w[k]) for k in full_w)


def test_own_loop_hyper_optimizer_with_the_step_size_and_state_dict_resume() -> None:
    x, y = _val(30, seed=3)

    def run(stop: int | None, state: dict | None) -> tuple[dict, dict]:
        model = _model()
        fam = DistilledData((1, 4, 4), 3, per_class=1, soft_labels=True, lr=0.2, dtype=DT, seed=6)
        hyper = hg.HyperOptimizer(
            model,
            [fam],
            method=hg.Unrolled(steps=4, lr=fam.lr_key),
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05),
            project=fam.project,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        first = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            hyper.load_state_dict(state["hyper"])
            first = state["i"]
        for i in range(first, 6):
            if stop is not None and i == stop:
                return {}, {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "hyper": hyper.state_dict(),
                    "i": i,
                }
            opt.zero_grad()
            hyper.train_loss((x[:4], y[:4])).backward()  # the distilled set replaces this batch
            opt.step()
            res = hyper.step((x[:4], y[:4]), (x[4:], y[4:]))
            assert res.applied and res.hypergradient is not None
            assert float(res.hypergradient["distill.lr"].abs()) > 0
        return {k: v.detach().clone() for k, v in hyper.hparams.items()}, {}

    full, _ = run(None, None)
    _, saved = run(3, None)
    resumed, _ = run(None, saved)
    assert full["distill.lr"] != 0.2
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_figure_is_written_and_the_family_does_not_import_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the figure needs it; the family does not
    fam = DistilledData((1, 4, 4), 3, per_class=2, soft_labels=True, dtype=DT)
    out = save_distilled_figure(fam, tmp_path / "distilled.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"image_shape \(3, 3\) cannot show"):
        save_distilled_figure(fam, tmp_path / "x.png", image_shape=(3, 3))
    code = (
        "import sys, hypergradients.hparams.distill as d; d.DistilledData((4,), 2); "
        "sys.exit(1 if 'matplotlib' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
