"""Shared problems with known answers, all float64.

Each problem gives ``inner_loss``, ``outer_loss``, the trained weights ``w*`` (closed form or a
Newton solve to gradient norm ~1e-14), hyperparameters, and a reference hypergradient:

* :func:`ridge` — ridge regression with one L2 per feature. ``w*(λ) = A⁻¹Xᵀy/n`` with
  ``A = XᵀX/n + diag(e^λ)``; the hypergradient is ``g_i = −e^{λ_i} w*_i (A⁻¹ ∇L_V)_i``.
* :func:`logistic` — multiclass logistic regression with one L2 per weight; reference from the
  dense Hessian and dense mixed partial (``torch.func.hessian``/``jacrev``), solved densely.
* :func:`mlp` — a small tanh MLP with per-layer L2; reference by central finite differences of
  ``L_V(w*(λ))`` with the inner problem re-solved by Newton for each perturbed ``λ``.

Operations without a double backward, each with a twin that has one: :class:`OnceTanh` (a tanh
whose backward is ``@once_differentiable``) in :func:`regression`, and the fused
``scaled_dot_product_attention`` in :func:`attention`.

The Newton solve, ``cosine`` and ``rel_dist`` are the tests' own: the library's tests import
nothing from the application layer (``test_layout.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from hypergradients.core import tree

DT = torch.float64
Tree = dict[str, Tensor]
Loss = Callable[[Tree, Tree], Tensor]

__all__ = [
    "ALL",
    "OnceTanh",
    "OnceTanhJvp",
    "Problem",
    "attention",
    "conditioned_logistic",
    "cosine",
    "dense_pieces",
    "lambda_max",
    "logistic",
    "low_rank_plus_floor",
    "mlp",
    "mlp_parts",
    "neumann_reference",
    "newton_solve",
    "regression",
    "regression_point",
    "rel_dist",
    "rel_err",
    "ridge",
    "spd_quadratic",
]


@dataclass
class Problem:
    name: str
    inner_loss: Loss
    outer_loss: Loss
    params: Tree  # w*
    hparams: Tree
    reference: Tree  # the exact IFT hypergradient at (w*, λ)
    hessian: Tensor  # dense H at w*, flattened in params' key order
    mixed: Tensor  # dense ∂²L_T/∂w∂λᵀ (n_w × n_λ), flattened in key order
    v: Tensor  # ∂L_V/∂w at w*, flattened
    direct: Tensor  # ∂L_V/∂λ, flattened
    quadratic: bool


def _flat_fn(loss: Loss, params: Tree, hparams: Tree, *, of: str) -> Callable[[Tensor], Tensor]:
    """``loss`` as a function of the flattened params (``of='w'``) or hparams (``of='l'``)."""
    if of == "w":
        return lambda x: loss(tree.unflatten(x, params), hparams)
    return lambda x: loss(params, tree.unflatten(x, hparams))


def dense_pieces(
    inner: Loss, outer: Loss, params: Tree, hparams: Tree
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(H, M, v, direct)`` densely: ``M = ∂²L_T/∂w∂λᵀ`` by jacobian of the flat gradient."""
    w = tree.flatten(params)
    lam = tree.flatten(hparams)
    H = torch.func.hessian(_flat_fn(inner, params, hparams, of="w"))(w)

    def grad_w(lv: Tensor) -> Tensor:
        hp = tree.unflatten(lv, hparams)
        return torch.func.grad(lambda x: inner(tree.unflatten(x, params), hp))(w)

    M = torch.func.jacrev(grad_w)(lam)
    v = torch.func.grad(_flat_fn(outer, params, hparams, of="w"))(w)
    direct = torch.func.grad(_flat_fn(outer, params, hparams, of="l"))(lam)
    return H, M, v, direct


class NewtonResult(NamedTuple):
    x: Tensor
    grad_norm: float
    iters: int


def newton(
    grad: Callable[[Tensor], Tensor],
    hessian: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    tol: float,
    max_iter: int = 100,
    f: Callable[[Tensor], Tensor] | None = None,
    shift_indefinite: bool = False,
) -> NewtonResult:
    """Newton's method on a flat vector: ``x ← x − t·(H + μI)⁻¹∇f(x)`` until ``‖∇f(x)‖ ≤ tol``.

    ``t = 1`` without ``f``; with ``f``, ``t`` halves from 1 until the Armijo condition
    ``f(x − t·step) ≤ f(x) − 1e-4·t·∇fᵀstep`` holds (or ``t ≤ 1e-10``). ``μ = 0``, unless
    ``shift_indefinite`` and ``λ_min(H) ≤ 0``: then ``μ = −λ_min + 1e-3``, so that the step descends
    on a non-convex ``f``.
    """
    x = x0.detach().clone()
    g = grad(x)
    gn = float(g.norm())
    it = 0
    while gn > tol and it < max_iter:
        H = hessian(x)
        if shift_indefinite:
            lam_min = float(torch.linalg.eigvalsh(H)[0])
            if lam_min <= 0:
                H = H + (-lam_min + 1e-3) * torch.eye(len(x), dtype=H.dtype)
        step = torch.linalg.solve(H, g)
        t = 1.0
        if f is not None:
            with torch.no_grad():
                fx, slope = float(f(x)), float(g @ step)
                while float(f(x - t * step)) > fx - 1e-4 * t * slope and t > 1e-10:
                    t *= 0.5
        x = x - t * step
        g = grad(x)
        gn = float(g.norm())
        it += 1
    return NewtonResult(x, gn, it)


def cosine(a: Tree, b: Tree) -> float:
    """Cosine similarity ``⟨a, b⟩/(‖a‖‖b‖)``, 0 when either is zero (no direction)."""
    na, nb = float(tree.norm(a)), float(tree.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(tree.dot(a, b)) / (na * nb)


def rel_dist(a: Tree, ref: Tree) -> float:
    """Relative L2 distance ``‖a − ref‖/‖ref‖``."""
    return float(tree.norm(tree.sub(a, ref))) / float(tree.norm(ref))


def newton_solve(
    inner: Loss, params: Tree, hparams: Tree, *, tol: float = 1e-13, max_iter: int = 200
) -> Tree:
    """Minimise ``inner(·, hparams)`` to ‖∇‖ ≤ tol by :func:`newton` (Armijo backtracking,
    the Hessian shifted where it is indefinite: the MLP's inner problem is not convex)."""
    f = _flat_fn(inner, params, hparams, of="w")
    res = newton(
        torch.func.grad(f),
        torch.func.hessian(f),
        tree.flatten(params),
        tol=tol,
        max_iter=max_iter,
        f=f,
        shift_indefinite=True,
    )
    assert res.grad_norm <= 10 * tol, f"Newton did not converge: ‖∇‖ = {res.grad_norm:.3g}"
    return tree.unflatten(res.x, params)


def _finish(
    name: str,
    inner: Loss,
    outer: Loss,
    params: Tree,
    hparams: Tree,
    *,
    quadratic: bool,
    reference: Tree | None = None,
) -> Problem:
    H, M, v, direct = dense_pieces(inner, outer, params, hparams)
    if reference is None:
        reference = tree.unflatten(direct - M.T @ torch.linalg.solve(H, v), hparams)
    return Problem(name, inner, outer, params, hparams, reference, H, M, v, direct, quadratic)


def ridge(n: int = 40, d: int = 6, n_val: int = 30, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    w_true = torch.randn(d, generator=gen, dtype=DT)
    y = X @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=DT)
    Xv = torch.randn(n_val, d, generator=gen, dtype=DT)
    yv = Xv @ w_true + 0.5 * torch.randn(n_val, generator=gen, dtype=DT)
    lam = {"log_l2": torch.linspace(-2.0, 0.5, d, dtype=DT)}

    def inner(p: Tree, h: Tree) -> Tensor:
        r = X @ p["w"] - y
        return 0.5 * (r @ r) / n + 0.5 * torch.sum(torch.exp(h["log_l2"]) * p["w"] ** 2)

    def outer(p: Tree, h: Tree) -> Tensor:
        r = Xv @ p["w"] - yv
        return 0.5 * (r @ r) / n_val

    def w_star(log_l2: Tensor) -> Tensor:
        A = X.T @ X / n + torch.diag(torch.exp(log_l2))
        return torch.linalg.solve(A, X.T @ y / n)

    ws = w_star(lam["log_l2"])
    A = X.T @ X / n + torch.diag(torch.exp(lam["log_l2"]))
    vv = Xv.T @ (Xv @ ws - yv) / n_val
    closed = -torch.exp(lam["log_l2"]) * ws * torch.linalg.solve(A, vv)
    prob = _finish("ridge", inner, outer, {"w": ws}, lam, quadratic=True, reference={"log_l2": closed})
    prob.w_star_fn = w_star  # type: ignore[attr-defined]
    return prob


def logistic(n: int = 60, d: int = 5, c: int = 3, n_val: int = 40, seed: int = 1) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    W_true = torch.randn(d, c, generator=gen, dtype=DT)
    y = torch.argmax(X @ W_true + torch.randn(n, c, generator=gen, dtype=DT), dim=1)
    Xv = torch.randn(n_val, d, generator=gen, dtype=DT)
    yv = torch.argmax(Xv @ W_true + torch.randn(n_val, c, generator=gen, dtype=DT), dim=1)
    lam = {"log_l2": -1.0 + 0.3 * torch.randn(d, c, generator=gen, dtype=DT)}

    def inner(p: Tree, h: Tree) -> Tensor:
        ce = torch.nn.functional.cross_entropy(X @ p["W"] + p["b"], y)
        return ce + 0.5 * torch.sum(torch.exp(h["log_l2"]) * p["W"] ** 2) + 0.5e-2 * torch.sum(p["b"] ** 2)

    def outer(p: Tree, h: Tree) -> Tensor:
        return torch.nn.functional.cross_entropy(Xv @ p["W"] + p["b"], yv)

    start = {"W": torch.zeros(d, c, dtype=DT), "b": torch.zeros(c, dtype=DT)}
    ws = newton_solve(inner, start, lam)
    return _finish("logistic", inner, outer, ws, lam, quadratic=False)


def mlp_parts(
    n: int = 30, d: int = 3, h: int = 4, n_val: int = 20, seed: int = 2
) -> tuple[Loss, Loss, Tree, Tree]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    y = torch.sin(X.sum(1)) + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    Xv = torch.randn(n_val, d, generator=gen, dtype=DT)
    yv = torch.sin(Xv.sum(1)) + 0.1 * torch.randn(n_val, generator=gen, dtype=DT)

    def f(p: Tree, x: Tensor) -> Tensor:
        return torch.tanh(x @ p["W1"] + p["b1"]) @ p["w2"] + p["b2"]

    def inner(p: Tree, hp: Tree) -> Tensor:
        r = f(p, X) - y
        return (
            0.5 * torch.mean(r**2)
            + 0.5 * torch.exp(hp["log_l2_1"]) * torch.sum(p["W1"] ** 2)
            + 0.5 * torch.exp(hp["log_l2_2"]) * torch.sum(p["w2"] ** 2)
            + 0.5e-2 * (torch.sum(p["b1"] ** 2) + p["b2"] ** 2).sum()
        )

    def outer(p: Tree, hp: Tree) -> Tensor:
        return 0.5 * torch.mean((f(p, Xv) - yv) ** 2)

    start = {
        "W1": 0.5 * torch.randn(d, h, generator=gen, dtype=DT),
        "b1": torch.zeros(h, dtype=DT),
        "w2": 0.5 * torch.randn(h, generator=gen, dtype=DT),
        "b2": torch.zeros(1, dtype=DT),
    }
    lam = {"log_l2_1": torch.tensor(-3.0, dtype=DT), "log_l2_2": torch.tensor(-2.5, dtype=DT)}
    return inner, outer, start, lam


def mlp(fd_eps: float = 1e-5) -> Problem:
    inner, outer, start, lam = mlp_parts()
    ws = newton_solve(inner, start, lam)
    # Central differences of λ ↦ L_V(w*(λ), λ), w*(λ) re-solved by Newton from w*.
    flat = tree.flatten(lam)
    fd = torch.zeros_like(flat)
    for i in range(flat.numel()):
        vals = []
        for sgn in (1.0, -1.0):
            lp = flat.clone()
            lp[i] += sgn * fd_eps
            hp = tree.unflatten(lp, lam)
            vals.append(outer(newton_solve(inner, ws, hp), hp))
        fd[i] = (vals[0] - vals[1]) / (2 * fd_eps)
    prob = _finish("mlp", inner, outer, ws, lam, quadratic=False)
    prob.fd_reference = tree.unflatten(fd, lam)  # type: ignore[attr-defined]
    return prob


def spd_quadratic(A: Tensor, B: Tensor, t: Tensor, lam: Tensor) -> Problem:
    """``L_T = ½wᵀAw − wᵀBλ``, ``L_V = ½‖w − t‖²``: ``w* = A⁻¹Bλ``, ``dL_V/dλ = BᵀA⁻¹(w* − t)``."""

    def inner(p: Tree, h: Tree) -> Tensor:
        return 0.5 * p["w"] @ (A @ p["w"]) - p["w"] @ (B @ h["lam"])

    def outer(p: Tree, h: Tree) -> Tensor:
        return 0.5 * torch.sum((p["w"] - t) ** 2)

    ws = torch.linalg.solve(A, B @ lam)
    ref = B.T @ torch.linalg.solve(A, ws - t)
    return _finish("spd", inner, outer, {"w": ws}, {"lam": lam}, quadratic=True, reference={"lam": ref})


def neumann_reference(prob: Problem, K: int, alpha: float) -> Tree:
    """``∂L_V/∂λ − Mᵀ α Σ_{j<K} (I − αH)^j v`` with explicit matrix powers."""
    n = prob.hessian.shape[0]
    step = torch.eye(n, dtype=DT) - alpha * prob.hessian
    S = torch.zeros(n, n, dtype=DT)
    P = torch.eye(n, dtype=DT)
    for _ in range(K):
        S = S + P
        P = P @ step
    p = alpha * S @ prob.v
    return tree.unflatten(prob.direct - prob.mixed.T @ p, prob.hparams)


# ‖a − b‖/‖b‖, under the name the tests use
rel_err = rel_dist


def lambda_max(prob: Problem) -> float:
    return float(torch.linalg.eigvalsh(prob.hessian)[-1])


ALL = {"ridge": ridge, "logistic": logistic, "mlp": mlp}


def conditioned_logistic(kappa: float, seed: int = 0, d: int = 60, n: int = 150, n_val: int = 100) -> Problem:
    """Binary logistic regression with one L2 per weight whose Hessian at ``w*`` has condition ``≈ kappa``.

    Feature scales fall geometrically from 1 to 1e-2, so the data term alone is badly
    conditioned; a common L2 strength ``μ`` (times ``e^{0.3 z}``, ``z ~ N(0, 1)`` per weight) sets
    ``λ_min(H)``, and ``μ`` is rescaled until ``cond(H)`` is within 1 % of ``kappa`` (``w*`` by
    Newton in closed form each time). Reference: the dense IFT solve.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=DT)
    X = torch.randn(n + n_val, d, generator=gen, dtype=DT) * scales
    w_true = torch.randn(d, generator=gen, dtype=DT) * 3 / math.sqrt(d) / scales.clamp(min=0.3)
    y = (torch.rand(n + n_val, generator=gen, dtype=DT) < torch.sigmoid(X @ w_true)).to(DT)
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    z = 0.3 * torch.randn(d, generator=gen, dtype=DT)

    def hessian(w: Tensor, lam: Tensor) -> Tensor:
        s = torch.sigmoid(Xt @ w)
        return (Xt * (s * (1 - s))[:, None]).T @ Xt / n + torch.diag(lam)

    log_mu = 0.0
    for _ in range(20):
        lam = torch.exp(log_mu + z)
        # Newton from 0: quadratic convergence, ~10 steps
        w = newton(
            lambda w, lam=lam: Xt.T @ (torch.sigmoid(Xt @ w) - yt) / n + lam * w,
            lambda w, lam=lam: hessian(w, lam),
            torch.zeros(d, dtype=DT),
            tol=1e-13,
        ).x
        ev = torch.linalg.eigvalsh(hessian(w, lam))
        ratio = float(ev[-1] / ev[0]) / kappa
        if abs(math.log(ratio)) < 0.01:
            break
        log_mu += math.log(ratio)  # μ ≈ λ_min: scale it by the miss
    hp = {"log_l2": log_mu + z}

    def inner(p: Tree, h: Tree) -> Tensor:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(Xt @ p["w"], yt)
        return bce + 0.5 * torch.sum(torch.exp(h["log_l2"]) * p["w"] ** 2)

    def outer(p: Tree, h: Tree) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ p["w"], yv)

    return _finish(f"logistic-cond{kappa:g}", inner, outer, {"w": w}, hp, quadratic=False)


def low_rank_plus_floor(n: int = 40, r: int = 5, floor: float = 2.0, seed: int = 0) -> Problem:
    """``L_T = ½wᵀHw − wᵀBλ`` with ``H = Q diag(s) Qᵀ + floor·I`` exactly (``Q`` n×r orthonormal,
    ``s`` from 1 to 1e3): weight decay ``floor`` on a rank-r data term; ``L_V = ½‖w − t‖²``."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, 3, r, dtype=DT)) @ Q.T + floor * torch.eye(n, dtype=DT)
    A = 0.5 * (A + A.T)
    B = torch.randn(n, 3, generator=gen, dtype=DT)
    t = torch.randn(n, generator=gen, dtype=DT)
    return spd_quadratic(A, B, t, torch.randn(3, generator=gen, dtype=DT))


# ---------------------------------------------------------------- operations without double backward
class OnceTanh(torch.autograd.Function):
    """tanh whose backward is first-order only (as in many custom CUDA kernels)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class OnceTanhJvp(torch.autograd.Function):
    """:class:`OnceTanh` in the ``torch.func`` style (``setup_context`` and a forward-mode ``jvp``):
    ``torch.func`` runs it, and differentiates its graph-free backward to a wrong second derivative."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx: Any, t: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


def regression(act: Callable[[Tensor], Tensor]) -> tuple[Loss, Loss]:
    """A one-hidden-layer regression ``(inner, outer)`` with activation ``act`` (``OnceTanh.apply``
    or its twin ``torch.tanh``) and ``hparams = {"log_l2": (2,) tensor}``."""
    gen = torch.Generator().manual_seed(5)
    X, Xv = torch.randn(30, 3, generator=gen, dtype=DT), torch.randn(20, 3, generator=gen, dtype=DT)
    y, yv = torch.sin(X.sum(1)), torch.sin(Xv.sum(1))

    def f(p: Tree, x: Tensor) -> Tensor:
        return act(x @ p["W1"] + p["b1"]) @ p["w2"]

    def inner(p: Tree, h: Tree) -> Tensor:
        return (
            0.5 * torch.mean((f(p, X) - y) ** 2)
            + 0.5 * torch.exp(h["log_l2"][0]) * torch.sum(p["W1"] ** 2)
            + 0.5 * torch.exp(h["log_l2"][1]) * (torch.sum(p["w2"] ** 2) + torch.sum(p["b1"] ** 2))
        )

    def outer(p: Tree, h: Tree) -> Tensor:
        return 0.5 * torch.mean((f(p, Xv) - yv) ** 2)

    return inner, outer


def attention(fused: bool) -> tuple[Loss, Loss]:
    """One attention layer and a linear head; ``fused`` uses ``F.scaled_dot_product_attention``, whose
    CPU kernel has no double backward, else the same maths written out (the twin)."""
    gen = torch.Generator().manual_seed(6)
    X, Xv = torch.randn(8, 4, 3, generator=gen, dtype=DT), torch.randn(6, 4, 3, generator=gen, dtype=DT)
    y, yv = X.sum((1, 2)).sin(), Xv.sum((1, 2)).sin()

    def f(p: Tree, x: Tensor) -> Tensor:
        q, k, v = x @ p["Wq"], x @ p["Wk"], x @ p["Wv"]
        if fused:  # (batch, heads, tokens, features): the layout that selects the fused kernel
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return a.mean(1) @ p["wo"]

    def inner(p: Tree, h: Tree) -> Tensor:
        l2 = sum(torch.sum(t**2) for t in p.values())
        return 0.5 * torch.mean((f(p, X) - y) ** 2) + 0.5 * torch.exp(h["log_l2"]) * l2

    def outer(p: Tree, h: Tree) -> Tensor:
        return 0.5 * torch.mean((f(p, Xv) - yv) ** 2)

    return inner, outer


def regression_point(seed: int = 7) -> tuple[Tree, Tree]:
    """Random weights (not a minimum) and hyperparameters for :func:`regression`."""
    gen = torch.Generator().manual_seed(seed)
    w = {
        "W1": 0.5 * torch.randn(3, 4, generator=gen, dtype=DT),
        "b1": torch.zeros(4, dtype=DT),
        "w2": 0.5 * torch.randn(4, generator=gen, dtype=DT),
    }
    return w, {"log_l2": torch.tensor([-3.0, -2.5], dtype=DT)}
