"""The Neumann series, its one-term case (the identity), and power iteration.

* :func:`neumann` — ``p = α Σ_{j=0}^{K−1} (I − αM)^j v`` (Lorraine et al. 2020, Alg. 3), exactly
  K terms with the ``α`` factor: ``K−1`` products. Since ``αM Σ_{j<K} (I−αM)^j = I − (I−αM)^K``,
  the residual is ``Mp − v = −(I−αM)^K v``: one more product gives it exactly. For a fixed point
  ``w = T(w, λ)``, ``M = I − Jᵀ`` and ``α = 1`` is the classic series ``Σ_j (Jᵀ)^j v``.
* :func:`identity` — ``p = s·v``, the series' first term with ``α = s`` (T1−T2, Luketina et al.
  2016), or ``s·v/D`` with a diagonal ``D`` (an optimizer's preconditioner): zero products.
* :func:`power_iteration` — the dominant eigenvalue's magnitude, behind ``alpha="auto"``.

Neither needs ``M`` symmetric: the series converges whenever the spectral radius of ``I − αM`` is
below one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .. import tree
from ..errors import HypergradientError, NeumannDivergenceError
from ..operators import LinearOperator
from ..tree import Tree
from .solve import Solve, ratio

MatVec = Callable[[Tree], Tree]


def power_iteration(matvec: MatVec, like: Mapping[str, Tensor], *, iters: int = 20, seed: int = 0) -> float:
    """Estimate the largest eigenvalue magnitude ``max |λ_i|`` of an operator, ``iters`` products.

    Power iteration from a random unit vector (fixed seed, so results are reproducible and the same on
    every rank of a data-parallel group); the estimate is ``‖M v_k‖`` at the last unit iterate ``v_k``.
    For a symmetric ``M`` it never exceeds ``max |λ_i|``, never decreases with ``k``
    (``‖Mv‖² = vᵀM²v ≤ ‖M²v‖`` for a unit ``v``) and is at least the Rayleigh quotient's magnitude
    ``|vᵀMv|``. The norm, not the Rayleigh quotient, is returned because on an indefinite ``M`` the
    quotient mixes eigenvalues of both signs and can sit near zero (for ``diag(5, −5)`` from
    ``(1, 1)/√2`` it is exactly 0 at every step), which would make ``alpha = 1/λ_max`` far too large.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in like.items()}
    nv = tree.norm(v)
    v = tree.scale(v, 1.0 / nv)
    est = 0.0
    for _ in range(max(1, iters)):
        hv = matvec(v)
        nh = float(tree.norm(hv))
        if nh == 0.0 or not math.isfinite(nh):
            break
        est = nh
        v = tree.scale(hv, 1.0 / nh)
    return est


def identity(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    scale: float = 1.0,
    residual: bool = False,
    diagonal: Mapping[str, Tensor] | None = None,
) -> Solve:
    """``p = scale · v``, or ``scale · v / D`` elementwise with a positive ``diagonal`` ``D`` (``M``
    taken as ``diag(D)/scale``): no product; ``residual=True``: one product reports ``‖Mp − v‖/‖v‖``."""
    p = tree.scale(v if diagonal is None else {k: v[k] / diagonal[k] for k in v}, scale)
    if not residual:
        return Solve(p, 0, None, None)
    vn = float(tree.norm(v))
    r = tree.sub(op(p), v)
    return Solve(p, 0, ratio(tree.norm(r), vn), None)


class SeriesGrewError(HypergradientError):
    """A Neumann term outgrew ``stale_growth·‖v‖``: the ``α`` given is no longer safe for this operator.

    Raised only when :func:`neumann` is given ``stale_growth`` (a cached ``λ_max``): the caller
    re-estimates ``λ_max`` and runs the series again. ``term`` is the index of the term.
    """

    def __init__(self, message: str, *, term: int) -> None:
        super().__init__(message)
        self.term = term


_CHECK_EVERY = 4


def _diverged(
    op: LinearOperator, v: Mapping[str, Tensor], j: int, tn: float, vn: float, alpha: float
) -> NeumannDivergenceError:
    lam = power_iteration(op, v)
    safe = 1.0 / lam if lam > 0 else float("nan")
    if op.symmetric:
        hint = (
            ""
            if alpha * lam < 2.0
            else f"; alpha·λ_max ≈ {alpha * lam:.3g} ≥ 2, so the series cannot converge"
        )
        return NeumannDivergenceError(
            f"Neumann series diverged at term {j}: ‖(I − α{op.name})^{j} v‖ = {tn:.3g} vs ‖v‖ = {vn:.3g} "
            f"with alpha={alpha:g}. Estimated λ_max({op.name}) ≈ {lam:.4g}{hint}. Use alpha < 2/λ_max ≈ "
            f"{2 * safe:.3g}, e.g. alpha={safe:.3g} or alpha='auto'. If alpha is already below that, "
            f"{op.name} has negative curvature here (the weights are not at a minimum): train the inner "
            "problem longer, use a damped method such as hg.CG(damping=...), or hg.MINRES, which solves the "
            "indefinite system.",
            lambda_max=lam,
            safe_alpha=safe,
        )
    what = (
        "the fixed-point map is not a contraction here: the series Σ (∂T/∂w)ᵀʲ v needs the "
        "eigenvalues of ∂T/∂w inside the unit disc"
        if op.fixed_point
        else "the series needs the eigenvalues of I − α·∂F/∂w inside the unit disc"
    )
    return NeumannDivergenceError(
        f"Neumann series diverged at term {j}: ‖term‖ = {tn:.3g} vs ‖v‖ = {vn:.3g} with alpha={alpha:g}; "
        f"{what}. The dominant eigenvalue of ∂F/∂w is estimated as {lam:.4g}: try alpha={safe:.3g} (a "
        "damped series), or hg.GMRES, which needs no contraction.",
        lambda_max=lam,
        safe_alpha=safe,
    )


def neumann(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    iters: int,
    alpha: float,
    residual: bool = True,
    max_growth: float = 10.0,
    stale_growth: float | None = None,
) -> Solve:
    """``p = α Σ_{j=0}^{K−1} (I − αM)^j v`` with ``K = iters`` (``K−1`` products, one more for the residual).

    For a symmetric positive definite ``M`` the series converges iff ``0 < α < 2/λ_max(M)``; then
    every term is no larger than ``v``. A term that grows past ``max_growth·‖v‖`` (or becomes
    non-finite; checked every 4th term and at the last) means the series diverges: a
    :class:`NeumannDivergenceError` names the estimated ``λ_max`` and a safe ``α = 1/λ_max``.

    ``stale_growth=c`` (for an ``α`` from a cached ``λ_max``): a checked term above ``c·‖v‖`` raises
    :class:`SeriesGrewError` first, so that the caller re-estimates ``λ_max``. With ``c = 1``
    that is exact for a symmetric positive definite ``M``: every eigenvalue of ``I − αM`` lies in
    ``(−1, 1)`` iff ``α < 2/λ_max``, and then no term can exceed ``‖v‖``.
    """
    if iters < 1:
        raise HypergradientError(f"Neumann needs iters >= 1 (the number of series terms), got {iters}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise HypergradientError(f"Neumann needs a finite alpha > 0, got {alpha}; or use alpha='auto'")
    vn = float(tree.norm(v))
    term: Tree = {k: t.clone() for k, t in v.items()}  # private: updated in place below
    acc: Tree = {k: t.clone() for k, t in v.items()}

    def check(t: Tree, j: int) -> None:
        tn = float(tree.norm(t))
        if stale_growth is not None and not (tn <= stale_growth * max(vn, 1e-300)):
            raise SeriesGrewError(
                f"Neumann term {j} grew to {tn:.3g} vs ‖v‖ = {vn:.3g} with alpha={alpha:g}", term=j
            )
        if not (math.isfinite(tn) and tn <= max_growth * max(vn, 1e-300)):
            raise _diverged(op, v, j, tn, vn, alpha)

    for j in range(1, iters):
        mt = op(term)
        for k in term:  # term ← (I − αM) term, in place: no new buffers per iteration
            term[k].add_(mt[k], alpha=-alpha)
        # The growth check costs a norm (a pass over the weights): every _CHECK_EVERY terms and at
        # the last one is enough to stop a diverging series long before it overflows.
        if j % _CHECK_EVERY == 0 or j == iters - 1:
            check(term, j)
        for k in acc:
            acc[k].add_(term[k])
    p = {k: t.mul_(alpha) for k, t in acc.items()}  # acc is private: scale it in place
    res: float | None = None
    if residual:
        # M p − v = −(I − αM)^K v: the next term of the series.
        res = ratio(tree.norm(tree.axpy(-alpha, op(term), term)), vn)
    return Solve(p, iters, res, None, {"alpha": alpha})
