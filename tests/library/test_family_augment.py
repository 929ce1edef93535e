"""The augmentation-network family: the paper's 6,659-weight U-Net, the identity start, fixed noise
within one hypergradient, its hypergradient against central finite differences of ``L_V(w*(λ))``
(noise fixed, inner problem re-solved by Newton), and the trainer and the own-loop hyper step
with resume bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients.core import tree
from hypergradients.hparams import Batch, Noise, WeightDecay
from hypergradients.hparams.augment import AugmentNet, unet_count
from hypergradients.hparams.objective import Objective, cross_entropy

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(DT)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=DT) + 0.7 * y.to(DT)[:, None, None, None]
    return x, y


def _newton(inner, w0: dict, h: dict, iters: int = 40) -> dict:  # type: ignore[no-untyped-def]
    """Newton on the strictly convex (softmax + L2 on every weight) inner problem: ‖∇‖ < 1e-14.

    torch.autograd.functional, not torch.func: the noise is drawn inside ``inner``, and vmap
    refuses random operations."""
    x = tree.flatten(w0).clone()
    for _ in range(iters):
        f = lambda v: inner(tree.unflatten(v, w0), h)  # noqa: E731
        xr = x.detach().requires_grad_(True)
        gr = torch.autograd.grad(f(xr), xr)[0]
        if float(gr.norm()) < 1e-14:
            break
        hess = torch.autograd.functional.hessian(f, x)
        x = x - torch.linalg.solve(hess, gr)
    return tree.unflatten(x, w0)


def test_the_papers_network_has_6659_weights_and_starts_as_the_identity() -> None:
    # depth 2, wf 3 (8 and 16 filters), RGB + the noise channel: 296+584 + 1168+2320 + 520+1160+584 + 27.
    assert unet_count(3) == 6659
    fam = AugmentNet(3)
    assert fam.count() == 6659 and fam.describe().groups == {"down0": 880, "down1": 3488, "up0": 2264, "last": 27}
    assert unet_count(3, noise=False) == 6659 - 8 * 9   # the noise channel is one input plane of conv1
    x = torch.randn(2, 3, 8, 8)
    b = fam.batch(Batch(x, torch.zeros(2, dtype=torch.long), torch.arange(2)), fam.tensors(),
                  noise=Noise(1).sampler())
    assert torch.equal(b.x, x)                         # the last convolution starts at zero
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, H, W\); got \(2, 192\)"):
        fam.augment(x.reshape(2, -1), fam.tensors(), None)
    with pytest.raises(ValueError, match=r"divisible by 2; got \(7, 7\)"):
        fam.augment(torch.randn(2, 3, 7, 7), fam.tensors(), None)


def test_noise_is_fixed_by_the_noise_sample_and_with_original_doubles_the_batch() -> None:
    model = _model()
    fam = AugmentNet(1, wf=1, identity_init=False, with_original=True, dtype=DT)
    obj = Objective(model, [fam], cross_entropy)
    x, y = _data(6, 0)
    batch = Batch(x, y, torch.arange(6))
    w, h = dict(model.named_parameters()), fam.tensors()
    a = obj.train(w, h, batch, forward=obj.copy_buffers, noise=Noise(5))
    assert torch.equal(a, obj.train(w, h, batch, forward=obj.copy_buffers, noise=Noise(5)))
    assert not torch.equal(a, obj.train(w, h, batch, forward=obj.copy_buffers, noise=Noise(6)))
    b = fam.batch(batch, h, noise=Noise(5).sampler())
    assert b.x.shape == (12, 1, 4, 4) and torch.equal(b.x[:6], x) and b.y.tolist() == y.tolist() * 2
    # without the noise channel the draw does not matter
    plain = AugmentNet(1, wf=1, noise=False, identity_init=False, dtype=DT)
    assert torch.equal(plain.batch(batch, plain.tensors(), noise=Noise(1).sampler()).x,
                       plain.batch(batch, plain.tensors(), noise=Noise(2).sampler()).x)


@pytest.mark.parametrize("with_original", [False, True])
def test_hypergradient_with_fixed_noise_matches_finite_differences(with_original: bool) -> None:
    model = _model()
    # wf=1: 2 and 4 filters (206 weights); random start so every weight carries a gradient.
    fam = AugmentNet(1, wf=1, identity_init=False, with_original=with_original, dtype=DT, seed=2)
    wd = WeightDecay(model, init=0.1, include=lambda n, p: True)   # a unique minimiser w*
    obj = Objective(model, [fam, wd], cross_entropy)
    x, y = _data(12, 1)
    xv, yv = _data(20, 2)
    bt, bv = Batch(x, y, torch.arange(12)), Batch(xv, yv, torch.arange(20))
    noise = Noise(11)

    def inner(w: dict, h: dict) -> torch.Tensor:
        return obj.train(w, h, bt, forward=obj.copy_buffers, noise=noise)

    def outer(w: dict, h: dict) -> torch.Tensor:
        return obj.val(w, bv)

    h = {k: v.detach() for k, v in {**fam.tensors(), **wd.tensors()}.items()}
    w = _newton(inner, {k: p.detach() for k, p in model.named_parameters()}, h)
    g = hg.hypergradient(outer, inner, w, h, method=hg.Exact())
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        u = {k: torch.randn(v.shape, generator=gen, dtype=DT) if k.startswith("augment") else torch.zeros_like(v)
             for k, v in h.items()}
        eps = 1e-6

        def val_at(t: float, u: dict = u) -> float:
            hh = {k: h[k] + t * u[k] for k in h}
            return float(outer(_newton(inner, w, hh), hh).detach())

        fd = (val_at(eps) - val_at(-eps)) / (2 * eps)
        # Newton solves to ‖∇‖ < 1e-14; the U-Net is piecewise smooth (ReLU, max-pool) and a step of
        # 1e-6 in a random direction crosses no kink here, so the central difference errs by
        # ε²·L'''/6 ~ 1e-12 and rounding ~1e-16/ε ~ 1e-10: 1e-6 relative is wide.
        assert float(tree.dot(g, u)) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert all(float(v.abs().sum()) > 0 for k, v in g.items() if k.startswith("augment"))


def _fit(tmp: Path, rounds: int, resume: bool) -> tuple[dict, dict]:
    model = _model()
    fam = AugmentNet(1, wf=1, dtype=DT, seed=3)
    x, y = _data(48, 4)
    hg.fit(model, [fam], (x[:32], y[:32]), (x[32:], y[32:]), rounds=rounds, inner_steps=2, batch_size=8,
           method=hg.Neumann(iters=3, alpha=0.1), checkpoint_dir=tmp, checkpoint_every=2, resume=resume)
    return ({k: v.detach().clone() for k, v in fam.tensors().items()},
            {k: p.detach().clone() for k, p in model.named_parameters()})


def test_fit_moves_the_network_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    full_h, full_w = _fit(tmp_path / "full", 4, False)
    _fit(tmp_path / "cut", 2, False)
    res_h, res_w = _fit(tmp_path / "cut", 4, True)
    assert float(full_h["augment.last.weight"].abs().sum()) > 0    # moved off the identity
    assert all(torch.equal(full_h[k], res_h[k]) for k in full_h)
    assert all(torch.equal(full_w[k], res_w[k]) for k in full_w)


def test_own_loop_hyper_optimizer_resumes_bit_for_bit() -> None:
    x, y = _data(30, 5)

    def run(stop: int | None, state: dict | None) -> tuple[dict, dict]:
        model = _model()
        fam = AugmentNet(1, wf=1, dtype=DT, seed=4, with_original=True)
        hyper = hg.HyperOptimizer(model, [fam], method=hg.CG(iters=5, damping=0.1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        first = 0
        torch.manual_seed(1)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            hyper.load_state_dict(state["hyper"])
            torch.set_rng_state(state["rng"])   # (the noise itself comes back with hyper's state)
            first = state["i"]
        for i in range(first, 5):
            if stop is not None and i == stop:
                return {}, {"model": model.state_dict(), "opt": opt.state_dict(), "hyper": hyper.state_dict(),
                            "rng": torch.get_rng_state(), "i": i}
            sl = slice(4 * i, 4 * i + 4)
            opt.zero_grad()
            hyper.train_loss((x[sl], y[sl])).backward()
            opt.step()
            assert hyper.step((x[sl], y[sl]), (x[20:], y[20:])).applied
        return {k: v.detach().clone() for k, v in hyper.hparams.items()}, {}

    full, _ = run(None, None)
    _, saved = run(2, None)
    resumed, _ = run(None, saved)
    assert float(full["augment.last.weight"].abs().sum()) > 0
    assert all(torch.equal(full[k], resumed[k]) for k in full)
