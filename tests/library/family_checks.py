"""Checks every hyperparameter family's tests share: the hypergradient (noise fixed) against central
finite differences of ``L_V(w*(λ))`` with the inner problem re-solved by Newton, and bit-for-bit
resume through ``fit`` and through an own loop with ``HyperOptimizer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hypergradients as hg
from hypergradients.core import tree
from hypergradients.hparams import Batch, Family, Noise
from hypergradients.hparams.objective import Objective, cross_entropy
from hypergradients.training import hyper

Tree = dict[str, Tensor]


def newton(
    inner: Callable[[Tree, Tree], Tensor], w0: Tree, h: Tree, *, iters: int = 60, tol: float = 1e-12
) -> Tree:
    """Damped Newton on a strictly convex inner problem (float64), to ‖∇‖ ≤ tol.

    ``torch.autograd.functional.hessian`` (no vmap: the families draw random numbers, which vmap
    refuses); halving the step until the loss decreases keeps it globally convergent."""
    x = tree.flatten(tree.detach(w0))
    hd = tree.detach(h)

    def f(v: Tensor) -> Tensor:
        return inner(tree.unflatten(v, w0), hd)

    extra = 2  # Newton converges quadratically: two more steps past tol reach rounding level
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, x)
        if float(g.norm()) <= tol:
            extra -= 1
            if extra < 0:
                return tree.unflatten(x, w0)
        H = torch.autograd.functional.hessian(f, x)
        step = torch.linalg.solve(H, g)
        # backtrack only while the loss clearly rises (near the minimum its changes are rounding)
        t, f0 = 1.0, float(f(x))
        while float(f(x - t * step)) > f0 + 1e-13 * max(1.0, abs(f0)) and t > 1e-8:
            t /= 2
        x = x - t * step
    g = torch.autograd.functional.jacobian(f, x)
    assert float(g.norm()) <= 10 * tol, f"Newton did not converge: ‖∇‖ = {float(g.norm()):.3g}"
    return tree.unflatten(x, w0)


def hypergradient_vs_fd(
    model: nn.Module,
    families: Sequence[Family],
    bt: Batch,
    bv: Batch,
    coords: Sequence[tuple[str, tuple[int, ...]]],
    *,
    eps: float = 1e-4,
    noise: Noise | None = None,
    loss_fn: Any = cross_entropy,
) -> list[tuple[float, float]]:
    """``[(implicit, finite difference)]`` for each ``(key, index)`` in ``coords``.

    ``w*`` by Newton from the model's weights (only ``requires_grad`` parameters are trained); the
    hypergradient by ``hg.Exact`` at ``w*``; the reference by ``(L_V(w*(λ+εe)) − L_V(w*(λ−εe)))/2ε``
    with ``w*`` re-solved by Newton from ``w*(λ)`` and the same noise (so both sides differentiate
    the same deterministic ``L_T(·; ε)``)."""
    noise = Noise(1234) if noise is None else noise
    obj = Objective(model, families, loss_fn)
    lam = tree.detach(hyper.collect_hparams(families))
    w0 = tree.detach({k: p for k, p in model.named_parameters() if p.requires_grad})

    def inner(w: Tree, h: Tree) -> Tensor:
        return obj.train(w, h, bt, forward=obj.copy_buffers, noise=noise)

    def outer(w: Tree, h: Tree) -> Tensor:
        return obj.val(w, bv)

    w_star = newton(inner, w0, lam)
    g = hg.hypergradient(outer, inner, w_star, lam, method=hg.Exact())
    out = []
    for key, idx in coords:
        vals = []
        for sgn in (1.0, -1.0):
            hp = tree.detach(lam)
            hp[key] = hp[key].clone()
            hp[key][idx] += sgn * eps
            vals.append(float(outer(newton(inner, w_star, hp), hp)))
        out.append((float(g[key][idx]), (vals[0] - vals[1]) / (2 * eps)))
    return out


def _strip(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in metrics]


def fit_resume_is_bit_for_bit(
    make: Callable[[], tuple[nn.Module, list[Family]]],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    tmp_path: Path,
    **kw: Any,
) -> hg.TrainResult:
    """``fit`` for 4 rounds straight, and for 2 rounds then resumed to 4 from the checkpoint (a new
    model and new families, as a new process would build them): the same metrics, weights and
    hyperparameters, bit for bit. Returns the straight run's result."""
    torch.manual_seed(0)
    model, fams = make()
    ref = hg.fit(model, fams, train, val, rounds=4, checkpoint_dir=tmp_path / "ref", checkpoint_every=2, **kw)
    torch.manual_seed(0)
    m2, f2 = make()
    hg.fit(m2, f2, train, val, rounds=2, checkpoint_dir=tmp_path / "run", checkpoint_every=2, **kw)
    torch.manual_seed(99)  # a resumed run must not depend on the state the process is in
    m3, f3 = make()
    res = hg.fit(
        m3, f3, train, val, rounds=4, checkpoint_dir=tmp_path / "run", checkpoint_every=2, resume=True, **kw
    )
    assert res.resumed_from == 2
    assert _strip(ref.metrics) == _strip(res.metrics)
    for (k, a), b in zip(model.state_dict().items(), m3.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    ha, hb = hyper.collect_hparams(fams), hyper.collect_hparams(f3)
    for k in ha:
        assert torch.equal(ha[k], hb[k]), k
    return ref


def own_loop_resume_is_bit_for_bit(
    make: Callable[[], tuple[nn.Module, list[Family]]],
    batches: Callable[[int], tuple[Batch, Batch, Batch]],
    *,
    method: hg.Method,
    steps: int = 6,
    every: int = 2,
    lr: float = 0.05,
    save_rng: bool = True,
) -> None:
    """A plain PyTorch loop with ``HyperOptimizer.step`` every ``every`` steps: run ``steps`` straight,
    and again with everything saved at half-way (model, both optimizers' states via
    ``hyper.state_dict()``, torch's RNG unless ``save_rng=False``: then the resumed half runs from
    another global RNG state) and restored into new objects: bit for bit."""

    def run(stop_at: int | None, state: dict[str, Any] | None) -> tuple[nn.Module, hg.HyperOptimizer, Any]:
        torch.manual_seed(0)
        model, fams = make()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        hyper = hg.HyperOptimizer(model, fams, method=method)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            hyper.load_state_dict(state["hyper"])
            if save_rng:
                torch.set_rng_state(state["rng"])
            else:
                torch.manual_seed(99)
            start = state["i"]
        for i in range(start, steps):
            if stop_at is not None and i == stop_at:
                return (
                    model,
                    hyper,
                    {
                        "model": {k: v.clone() for k, v in model.state_dict().items()},
                        "opt": opt.state_dict(),
                        "hyper": hyper.state_dict(),
                        "rng": torch.get_rng_state(),
                        "i": i,
                    },
                )
            b, bh, bv = batches(i)
            opt.zero_grad()
            hyper.train_loss(b).backward()  # L_T with fresh noise from hyper.noise_generator
            opt.step()
            if i % every == every - 1:
                res = hyper.step(bh, bv)
                assert res.applied
        return model, hyper, None

    m_ref, h_ref, _ = run(None, None)
    _, _, saved = run(steps // 2, None)
    m_res, h_res, _ = run(None, saved)
    for (k, a), b in zip(m_ref.state_dict().items(), m_res.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for k in h_ref.hparams:
        assert torch.equal(h_ref.hparams[k], h_res.hparams[k]), k
    assert h_ref.steps == h_res.steps == steps // every
    moved = any(not torch.equal(h_ref.hparams[k], t) for k, t in hyper.collect_hparams(make()[1]).items())
    assert moved, "the hyper steps did not move the hyperparameters: the check would prove nothing"
