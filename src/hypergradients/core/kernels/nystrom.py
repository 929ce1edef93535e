"""Randomized Nyström approximations of a symmetric positive semi-definite operator, and their inverse.

A rank-k approximation ``Ĥ = U Λ Uᵀ`` from one batched sketch ``Y = HΩ`` (k products, Frangella,
Tropp & Udell 2023; Hataya & Yamada 2023 use columns of H), then ``p = (Ĥ + ρI)⁻¹ v`` in closed form
by the Woodbury identity; with ``floor=μ`` it sketches ``H − μI`` instead and inverts ``Ĥ + μI``,
exact when ``H`` is rank ≤ k plus ``μI``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .. import tree
from ..errors import HypergradientError, NegativeCurvatureError
from ..operators import LinearOperator
from ..tree import Tree
from .solve import Solve, relative_residual


@dataclass
class NystromFactor:
    """A factored Nyström inverse: ``p = U diag(1/d) Uᵀv + (v − UUᵀv)/c`` (see :func:`nystrom`).

    ``U`` (n×k) has orthonormal columns; ``d`` (k) and ``c`` are the inverse's eigenvalues on
    ``span(U)`` and off it; ``extra`` the facts :func:`nystrom` reports (``rho``, ``floor``,
    ``lambda_max``). Applying it costs no HVP: the factor can serve several right-hand sides.
    """

    U: Tensor
    d: Tensor
    c: float
    extra: dict[str, float]

    def apply(self, v: Mapping[str, Tensor]) -> Tree:
        b = tree.flatten(v)
        utb = self.U.T @ b
        return tree.unflatten(self.U @ (utb / self.d) + (b - self.U @ utb) / self.c, v)


def nystrom(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    rank: int,
    rho: float | None = None,
    seed: int = 0,
    floor: float | Literal["auto"] | None = None,
    residual: bool = False,
) -> Solve:
    """``p ≈ H⁻¹ v`` from ``Ĥ = U diag(Λ) Uᵀ``, the rank-``k`` randomized Nyström approximation of ``H``.

    One batched sketch ``Y = HΩ`` with ``Ω`` an orthonormalised ``n×k`` Gaussian (k HVPs), then
    the numerically stable construction of Tropp et al. (2017): shift ``ν``, Cholesky of
    ``Ωᵀ(Y + νΩ)``, SVD. The inverse is closed form:

    * ``rho`` given (Hataya & Yamada 2023): ``p = (Ĥ + ρI)⁻¹ v = U diag(1/(Λ+ρ)) Uᵀv + (v − UUᵀv)/ρ``
      (Woodbury);
    * ``rho=None``: the uncaptured spectrum is set to the smallest captured eigenvalue ``Λ_k``
      (an upper estimate of it), ``p = U diag(1/Λ) Uᵀv + (v − UUᵀv)/Λ_k``: exact on the captured
      subspace, never amplifying the rest by more than ``1/Λ_k``.

    ``floor=μ`` (floor-aware): ``H = A + μI`` with ``A`` of low rank, e.g. a data term plus weight
    decay ``μ``. Sketching ``H`` itself spends the sketch on ``μI``, which has no low-rank
    structure, so the plain approximation is poor however small ``rank(A)`` is. Instead the same
    HVPs give the sketch of ``A = H − μI``, ``Y − μΩ`` (free), whose Nyström approximation ``Â`` is
    exact when ``rank ≥ rank(A)``; then ``p = (Â + (μ+ρ)I)⁻¹ v = U diag(1/(Λ+μ+ρ)) Uᵀv +
    (v − UUᵀv)/(μ+ρ)`` (``ρ = 0`` when ``rho`` is None), the exact inverse of ``H + ρI`` in that
    case. ``μ`` must not exceed ``λ_min(H)`` (``H − μI`` must be positive semi-definite).
    ``floor="auto"`` estimates μ from the sketch it already has (no HVP): ``θ = λ_min(ΩᵀHΩ)``, the
    smallest eigenvalue of the k×k core with eigenvector ``e``, less the norm of its Ritz residual
    ``HΩe − θΩe = Ye − θΩe``. When ``H`` is rank r plus ``μI`` and ``rank > r``, ``ΩᵀAΩ`` is
    singular, so ``θ = μ`` and the residual is 0: the floor exactly. (Lanczos or power iterations
    would cost HVPs and approach ``λ_min`` from above, the unsafe side for ``H − μI ⪰ 0``.) A
    nearly flat floor gives a small residual, and subtracting it keeps ``Ωᵀ(H − μI)Ω`` clear of
    singular, so the sketch cannot blow up along ``Ωe``. A residual above ``θ/2`` means the
    sketch shows no floor (a spread-out spectrum): the plain ``rho``/``rho=None`` rule is used and
    ``extra["floor"]`` is 0.

    ``residual=True``: one more HVP reports the residual. The factor itself is
    :func:`nystrom_factor`.
    """
    factor = nystrom_factor(op, v, rank=rank, rho=rho, seed=seed, floor=floor)
    p = factor.apply(v)
    res = relative_residual(op, p, v) if residual else None
    return Solve(p, rank, res, None, dict(factor.extra))


def nystrom_factor(
    op: LinearOperator,
    like: Mapping[str, Tensor],
    *,
    rank: int,
    rho: float | None = None,
    seed: int = 0,
    floor: float | Literal["auto"] | None = None,
) -> NystromFactor:
    """The :class:`NystromFactor` of :func:`nystrom` (``rank`` HVPs in one batch), for ``like``'s shapes."""
    v = like
    n = tree.numel(v)
    if not 1 <= rank <= n:
        raise HypergradientError(f"Nystrom rank must be in [1, {n}] (the number of weights), got {rank}")
    if rho is not None and not rho > 0:
        raise HypergradientError(f"Nystrom rho must be > 0 (or None for automatic), got {rho}")
    if floor is not None and floor != "auto" and not (isinstance(floor, (int, float)) and floor > 0):
        raise HypergradientError(f"Nystrom floor must be > 0, 'auto' or None, got {floor!r}")
    b = tree.flatten(v)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, rank, generator=gen, dtype=b.dtype).to(b.device)
    omega, _ = torch.linalg.qr(omega)
    Y = torch.cat(
        [t.reshape(rank, -1) for t in op.mv_batched(tree.unflatten_rows(omega.T.contiguous(), v)).values()],
        dim=1,
    ).T  # n×k
    mu = 0.0
    auto = floor == "auto"
    if floor == "auto":
        core0 = omega.T @ Y
        th, vecs = torch.linalg.eigh(0.5 * (core0 + core0.T))
        theta = float(th[0])
        if not theta > 0:
            raise NegativeCurvatureError(
                f"hg.Nystrom(floor='auto'): the smallest curvature on the sketch, λ_min(ΩᵀHΩ) = "
                f"{theta:.3g}, is not positive: H is not positive definite at these weights (they may "
                "not be a minimum). Train the inner problem closer to a minimum.",
                curvature=theta,
                iteration=0,
            )
        # The Ritz pair (θ, Ωe) has residual HΩe − θΩe = Ye − θΩe (no HVP), and some eigenvalue of
        # H lies within its norm of θ (Krylov–Bogoliubov). A flat floor makes it vanish; a nearly
        # flat one leaves it small, and μ = θ − ‖·‖ keeps Ωᵀ(H − μI)Ω clear of singular, so the
        # sketch of the (then slightly indefinite) H − μI cannot blow up along Ωe. A residual over
        # θ/2 means the sketch shows no floor (a spread spectrum): then the plain method.
        mu = theta - float(torch.linalg.vector_norm(Y @ vecs[:, 0] - theta * (omega @ vecs[:, 0])))
        if not mu >= 0.5 * theta:
            floor = None  # reported as floor 0
            mu = 0.0
    elif floor is not None:
        mu = float(floor)
    if mu:
        Y = Y - mu * omega  # the sketch of H − μI, from the same HVPs
    eps = torch.finfo(b.dtype).eps
    nu = math.sqrt(n) * eps * float(torch.linalg.matrix_norm(Y, ord=2))
    Ynu = Y + nu * omega
    core = omega.T @ Ynu
    core = 0.5 * (core + core.T)
    try:
        C = torch.linalg.cholesky(core)
    except RuntimeError as e:
        if floor is not None and floor != "auto":
            what = (
                f"ΩᵀHΩ − {mu:g}·I is not positive definite: the floor exceeds the smallest curvature "
                "on the sketch. Pass a floor below λ_min(H), or floor='auto'"
            )
        else:
            what = (
                "the sketched Hessian ΩᵀHΩ is not positive definite, so H has negative curvature at "
                "these weights (they may not be a minimum). Train the inner problem closer to a "
                "minimum or use a damped method (hg.CG(damping=...))"
            )
        raise NegativeCurvatureError(f"hg.Nystrom: {what}.", curvature=float("nan"), iteration=0) from e
    B = torch.linalg.solve_triangular(C, Ynu.T, upper=False).T  # Ynu C⁻ᵀ
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = torch.clamp(S * S - nu, min=0.0)
    if floor is not None:
        shift = mu + (rho or 0.0)
        return NystromFactor(
            U, lam + shift, shift, {"rho": rho or 0.0, "floor": mu, "lambda_max": float(lam.max()) + mu}
        )
    if rho is None:
        low = max(float(lam.min()), float(lam.max()) * eps * n, torch.finfo(b.dtype).tiny)
        extra = {"rho": low, "lambda_max": float(lam.max())}
        if auto:
            extra["floor"] = 0.0
        return NystromFactor(U, torch.clamp(lam, min=low), low, extra)
    return NystromFactor(U, lam + rho, rho, {"rho": rho, "lambda_max": float(lam.max())})
