"""The augmentation-network family: the paper's 6,659-weight U-Net, the default network's identity
start and the authors' configuration (``x + tanh(u)``, one noise number per image, PyTorch's default
initialisation; checked against the same network built from ``torch.nn`` modules), fixed noise
within one hypergradient, its hypergradient against central finite differences of ``L_V(w*(λ))``
(noise fixed, inner problem re-solved by Newton), and the trainer and the own-loop hyper step
with resume bit for bit."""

from __future__ import annotations

import math
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


def test_the_default_network_has_the_papers_6659_weights_and_starts_as_the_identity() -> None:
    # depth 2, wf 3 (8 and 16 filters), RGB + the noise channel: 296+584 + 1168+2320 + 520+1160+584 + 27.
    assert unet_count(3) == 6659
    fam = AugmentNet(3)
    assert fam.count() == 6659 and fam.describe().groups == {
        "down0": 880,
        "down1": 3488,
        "up0": 2264,
        "last": 27,
    }
    assert unet_count(3, noise=False) == 6659 - 8 * 9  # the noise channel is one input plane of conv1
    x = torch.randn(2, 3, 8, 8)
    b = fam.batch(
        Batch(x, torch.zeros(2, dtype=torch.long), torch.arange(2)), fam.tensors(), noise=Noise(1).sampler()
    )
    assert torch.equal(b.x, x)  # the last convolution starts at zero
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, H, W\); got \(2, 192\)"):
        fam.augment(x.reshape(2, -1), fam.tensors(), None)
    with pytest.raises(ValueError, match=r"divisible by 2; got \(7, 7\)"):
        fam.augment(torch.randn(2, 3, 7, 7), fam.tensors(), None)


class _TorchUNet(nn.Module):
    """The authors' network (models/unet.py with padding, no batch norm, transposed convolutions,
    a noise channel and the tanh identity residual) built from torch.nn modules: an independent
    statement of the layers that AugmentNet evaluates functionally."""

    def __init__(self, channels: int, depth: int = 2, wf: int = 3) -> None:
        super().__init__()
        self.depth = depth
        prev = channels + 1
        self.down = nn.ModuleList()
        for i in range(depth):
            f = 2 ** (wf + i)
            self.down.append(
                nn.Sequential(
                    nn.Conv2d(prev, f, 3, padding=1), nn.ReLU(), nn.Conv2d(f, f, 3, padding=1), nn.ReLU()
                )
            )
            prev = f
        self.upconv, self.upblock = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(depth - 1)):
            f = 2 ** (wf + i)
            self.upconv.append(nn.ConvTranspose2d(prev, f, 2, stride=2))
            self.upblock.append(
                nn.Sequential(
                    nn.Conv2d(prev, f, 3, padding=1), nn.ReLU(), nn.Conv2d(f, f, 3, padding=1), nn.ReLU()
                )
            )
            prev = f
        self.last = nn.Conv2d(prev, channels, 1)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h, skips = torch.cat([x, noise], 1), []
        for i, block in enumerate(self.down):
            h = block(h)
            if i < self.depth - 1:
                skips.append(h)
                h = nn.functional.max_pool2d(h, 2)
        for j, (up, block) in enumerate(zip(self.upconv, self.upblock, strict=True)):
            h = block(torch.cat([up(h), skips[-j - 1]], 1))
        return x + torch.tanh(self.last(h))

    def ours(self) -> dict[str, torch.Tensor]:
        """The module's weights under AugmentNet's keys (without the family's prefix)."""
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.down):
            for j, conv in (("conv1", block[0]), ("conv2", block[2])):
                out[f"down{i}.{j}.weight"], out[f"down{i}.{j}.bias"] = conv.weight, conv.bias
        for k, (up, block) in enumerate(zip(self.upconv, self.upblock, strict=True)):
            i = self.depth - 2 - k
            out[f"up{i}.upconv.weight"], out[f"up{i}.upconv.bias"] = up.weight, up.bias
            for j, conv in (("conv1", block[0]), ("conv2", block[2])):
                out[f"up{i}.{j}.weight"], out[f"up{i}.{j}.bias"] = conv.weight, conv.bias
        out["last.weight"], out["last.bias"] = self.last.weight, self.last.bias
        return out


def test_the_authors_network_is_their_unet_with_6659_weights() -> None:
    fam = AugmentNet.paper(3, dtype=DT, seed=1)
    assert (fam.depth, fam.wf, fam.residual, fam.noise_shape, fam.identity_init) == (
        2,
        3,
        "tanh",
        "image",
        False,
    )
    assert fam.count() == 6659 and AugmentNet.paper(1).count() == 6497
    torch.manual_seed(0)
    ref = _TorchUNet(3).to(DT)
    assert sum(p.numel() for p in ref.parameters()) == 6659
    mine = {k[len("augment.") :]: v for k, v in fam.tensors().items()}
    assert {k: tuple(v.shape) for k, v in ref.ours().items()} == {k: tuple(v.shape) for k, v in mine.items()}
    # Load our weights into the torch.nn network: the same output for the same images and noise
    # (float64; the two evaluate the same operations in the same order, so rounding differs at most
    # in the last bits of a few sums: 1e-12 absolute on values of order 1).
    with torch.no_grad():
        for k, p in ref.ours().items():
            p.copy_(mine[k])
    x = torch.rand(4, 3, 8, 8, dtype=DT)
    eps = fam.draw(x, Noise(3).sampler())
    assert eps is not None and eps.shape == (4, 1, 8, 8)
    # one N(0, 1) number per image, the same at every pixel, different between images
    assert torch.equal(eps, eps[:, :, :1, :1].expand_as(eps)) and len(set(eps[:, 0, 0, 0].tolist())) == 4
    with torch.no_grad():
        assert torch.allclose(fam.augment(x, fam.tensors(), eps), ref(x, eps), rtol=0, atol=1e-12)
        # the default initialisation does not start at the identity; the tanh bounds the change by 1
        assert float((fam.augment(x, fam.tensors(), eps) - x).abs().max()) > 1e-3
        big = {k: 100 * v for k, v in fam.tensors().items()}
        assert float((fam.augment(x, big, eps) - x).abs().max()) <= 1.0
    # the library's default keeps the identity start, per-pixel noise and the linear residual
    default = AugmentNet(3)
    assert (default.residual, default.noise_shape, default.identity_init) == ("linear", "pixel", True)
    pix = default.draw(x, Noise(3).sampler())
    assert pix is not None and pix.shape == (4, 1, 8, 8) and len(set(pix[0, 0].flatten().tolist())) == 64
    with pytest.raises(ValueError, match=r"noise_shape must be 'pixel' or 'image', got 'row'"):
        AugmentNet(1, noise_shape="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"residual must be 'linear' or 'tanh', got 'relu'"):
        AugmentNet(1, residual="relu")  # type: ignore[arg-type]


def test_default_initialisation_is_pytorchs() -> None:
    # Every layer drawn as PyTorch draws it: U(−b, b) with b = 1/√fan_in, fan_in from the weight's
    # dim 1 times the kernel (for the transposed convolution: its output channels, 8·2·2 = 32).
    # With 400+ uniform draws the largest |value| lies within 1% of b (P(miss) < 0.99^400 < 2e-2 per
    # tensor; the draws are seeded, so the test is deterministic).
    fam = AugmentNet.paper(1, dtype=DT, seed=0)
    ref = _TorchUNet(1).to(DT)
    for k, p in ref.ours().items():
        t = fam.tensors()[f"augment.{k}"].detach()
        w = ref.ours()[k[: -len("bias")] + "weight"] if k.endswith("bias") else p
        b = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(w)[0])
        assert float(t.abs().max()) <= b, k
        if t.numel() >= 400:
            assert float(t.abs().max()) >= 0.99 * b, k
    assert 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(ref.upconv[0].weight)[0]) == 1 / math.sqrt(32)


def test_at_the_identity_start_only_the_last_layer_has_a_hypergradient() -> None:
    # The last 1×1 convolution is zero, so ∂x̃/∂λ vanishes for every other weight: their
    # hypergradient is exactly 0 (both residuals: tanh'(0) = 1), the last layer's is not.
    for residual in ("linear", "tanh"):
        model = _model()
        fam = AugmentNet(1, wf=1, dtype=DT, residual=residual, noise_shape="image")  # type: ignore[arg-type]
        hyper = hg.HyperOptimizer(model, [fam], method=hg.Identity())
        x, y = _data(12, 1)
        g, _ = hyper.hypergradient((x, y), (x, y))
        for k, v in g.items():
            assert (float(v.abs().max()) > 0) == k.startswith("augment.last."), (residual, k)


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
    assert torch.equal(
        plain.batch(batch, plain.tensors(), noise=Noise(1).sampler()).x,
        plain.batch(batch, plain.tensors(), noise=Noise(2).sampler()).x,
    )


@pytest.mark.parametrize(
    ("with_original", "residual", "noise_shape"),
    [(False, "linear", "pixel"), (True, "linear", "pixel"), (False, "tanh", "image")],
)
def test_hypergradient_with_fixed_noise_matches_finite_differences(
    with_original: bool, residual: str, noise_shape: str
) -> None:
    model = _model()
    # wf=1: 2 and 4 filters (206 weights); random start so every weight carries a gradient.
    fam = AugmentNet(
        1,
        wf=1,
        identity_init=False,
        with_original=with_original,
        dtype=DT,
        seed=2,
        residual=residual,
        noise_shape=noise_shape,
    )  # type: ignore[arg-type]
    wd = WeightDecay(model, init=0.1, include=lambda n, p: True)  # a unique minimiser w*
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
        u = {
            k: torch.randn(v.shape, generator=gen, dtype=DT)
            if k.startswith("augment")
            else torch.zeros_like(v)
            for k, v in h.items()
        }
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
    hg.fit(
        model,
        [fam],
        (x[:32], y[:32]),
        (x[32:], y[32:]),
        rounds=rounds,
        inner_steps=2,
        batch_size=8,
        method=hg.Neumann(iters=3, alpha=0.1),
        checkpoint_dir=tmp,
        checkpoint_every=2,
        resume=resume,
    )
    return (
        {k: v.detach().clone() for k, v in fam.tensors().items()},
        {k: p.detach().clone() for k, p in model.named_parameters()},
    )


def test_fit_moves_the_network_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    full_h, full_w = _fit(tmp_path / "full", 4, False)
    _fit(tmp_path / "cut", 2, False)
    res_h, res_w = _fit(tmp_path / "cut", 4, True)
    assert float(full_h["augment.last.weight"].abs().sum()) > 0  # moved off the identity
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
            torch.set_rng_state(state["rng"])  # (the noise itself comes back with hyper's state)
            first = state["i"]
        for i in range(first, 5):
            if stop is not None and i == stop:
                return {}, {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "hyper": hyper.state_dict(),
                    "rng": torch.get_rng_state(),
                    "i": i,
                }
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
