"""Inverse-Hessian-vector solvers: ``p ≈ H⁻¹ v`` from Hessian-vector products only.

Every kernel has the signature ``kernel(op, v, *, options) -> Solve``: ``op`` a
:class:`~hypergradients.HessianOperator` (``op(x) = Hx`` on trees, ``op.mv_batched`` for
a batch; damping is ``op.damped(δ)``, not a kernel option), ``v`` the right-hand side, and the
:class:`Solve` holds the solution and what it cost. None of them forms ``H`` except :func:`exact`,
which refuses above a size limit. The method objects (:mod:`hypergradients.core.solvers`) wrap these
kernels in the one solver protocol ``solve(op, v, state) -> (p, state, stats)``.

* :func:`identity` — ``p = s·v`` (T1−T2, Luketina et al. 2016): zero HVPs.
* :func:`neumann` — ``p = α Σ_{j=0}^{K−1} (I − αH)^j v`` (Lorraine et al. 2020, Alg. 3), exactly
  K terms with the ``α`` factor: ``K−1`` HVPs. Since ``αH Σ_{j<K} (I−αH)^j = I − (I−αH)^K``, the
  residual is ``Hp − v = −(I−αH)^K v``: one more HVP gives it exactly.
* :func:`cg` — conjugate gradient on ``A p = v`` (``A = op``, e.g. ``H + δI``); needs A positive
  definite and raises :class:`~hypergradients.NegativeCurvatureError` (returning no ``p``)
  when it meets ``dᵀAd ≤ 0``. Optionally also stops on an error estimate from its Ritz values (``hg.Auto``).
* :func:`nystrom` — a rank-k randomized Nyström approximation ``Ĥ = U Λ Uᵀ`` from one batched
  sketch ``Y = HΩ`` (k HVPs, Frangella, Tropp & Udell 2023; Hataya & Yamada 2023 use columns
  of H), then ``p = (Ĥ + ρI)⁻¹ v`` in closed form by the Woodbury identity; with ``floor=μ`` it
  sketches ``H − μI`` instead and inverts ``Ĥ + μI``, exact when ``H`` is rank ≤ k plus ``μI``.
* :func:`exact` — dense ``H`` from n batched HVPs and ``torch.linalg.solve``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .. import tree
from ..derivatives import power_iteration
from ..errors import HypergradientError, NegativeCurvatureError, NeumannDivergenceError, ProblemTooLargeError
from ..operators import HessianOperator
from ..tree import Tree

MatVec = Callable[[Tree], Tree]


@dataclass
class Solve:
    """Result of an inverse-HVP solve.

    ``residual`` is ``‖Hp − v‖/‖v‖`` (``None`` where it was not computed), ``converged`` whether
    the solver met its own tolerance (``None`` for fixed-budget methods with no tolerance),
    ``hvps`` the Hessian-vector products spent, ``extra`` method-specific facts (``alpha``,
    ``lambda_max``, ``rho``).
    """

    p: Tree
    iterations: int
    hvps: int
    residual: float | None
    converged: bool | None
    extra: dict[str, float] = field(default_factory=dict)


def _rel(num: Tensor | float, den: float) -> float:
    n = float(num)
    return n / den if den > 0 else n


def relative_residual(op: HessianOperator, p: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> float:
    """``‖op·p − v‖/‖v‖`` (one HVP); ``‖op·p‖`` when ``v = 0``."""
    return _rel(tree.norm(tree.sub(op(p), v)), float(torch.linalg.vector_norm(tree.flatten(v))))


def identity(op: HessianOperator, v: Mapping[str, Tensor], *, scale: float = 1.0,
             residual: bool = False) -> Solve:
    """``p = scale · v``: no HVP; ``residual=True``: one HVP reports ``‖Hp − v‖/‖v‖``."""
    p = tree.scale(v, scale)
    if not residual:
        return Solve(p, 0, 0, None, None)
    vn = float(tree.norm(v))
    r = tree.sub(op(p), v)
    return Solve(p, 0, 1, _rel(tree.norm(r), vn), None)


def estimate_lambda_max(op: MatVec, like: Mapping[str, Tensor], *, iters: int = 20) -> float:
    """``λ_max(H)`` by power iteration (``iters`` HVPs); see :func:`~.derivatives.power_iteration`."""
    return power_iteration(op, like, iters=iters)


class SeriesGrewError(HypergradientError):
    """A Neumann term outgrew ``stale_growth·‖v‖``: the ``α`` given is no longer safe for this H.

    Raised only when :func:`neumann` is given ``stale_growth`` (a cached ``λ_max``): the caller
    re-estimates ``λ_max`` and runs the series again. ``term`` is the index of the term.
    """

    def __init__(self, message: str, *, term: int) -> None:
        super().__init__(message)
        self.term = term


_CHECK_EVERY = 4


def neumann(op: HessianOperator, v: Mapping[str, Tensor], *, iters: int, alpha: float,
            residual: bool = True, max_growth: float = 10.0, stale_growth: float | None = None) -> Solve:
    """``p = α Σ_{j=0}^{K−1} (I − αH)^j v`` with ``K = iters`` (``K−1`` HVPs, one more for the residual).

    The series converges for SPD ``H`` iff ``0 < α < 2/λ_max(H)``; then every term is no larger
    than ``v``. A term that grows past ``max_growth·‖v‖`` (or becomes non-finite; checked every
    4th term and at the last) means the series diverges: a :class:`NeumannDivergenceError`
    names the estimated ``λ_max`` and a safe ``α = 1/λ_max``.

    ``stale_growth=c`` (for an ``α`` from a cached ``λ_max``): a checked term above ``c·‖v‖`` raises
    :class:`SeriesGrewError` first, so that the caller re-estimates ``λ_max``. With ``c = 1``
    that is exact: for SPD ``H`` every eigenvalue of ``I − αH`` lies in ``(−1, 1)`` iff
    ``α < 2/λ_max``, and then no term can exceed ``‖v‖``.
    """
    if iters < 1:
        raise HypergradientError(f"Neumann needs iters >= 1 (the number of series terms), got {iters}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise HypergradientError(f"Neumann needs a finite alpha > 0, got {alpha}; or use alpha='auto'")
    vn = float(tree.norm(v))
    term: Tree = {k: t.clone() for k, t in v.items()}  # private: updated in place below
    acc: Tree = {k: t.clone() for k, t in v.items()}
    hvps = 0

    def check(t: Tree, j: int) -> None:
        tn = float(tree.norm(t))
        if stale_growth is not None and not (tn <= stale_growth * max(vn, 1e-300)):
            raise SeriesGrewError(f"Neumann term {j} grew to {tn:.3g} vs ‖v‖ = {vn:.3g} with alpha={alpha:g}",
                                  term=j)
        if math.isfinite(tn) and tn <= max_growth * max(vn, 1e-300):
            return
        lam = estimate_lambda_max(op, v)
        safe = 1.0 / lam if lam > 0 else float("nan")
        hint = ("" if alpha * lam < 2.0 else
                f"; alpha·λ_max ≈ {alpha * lam:.3g} ≥ 2, so the series cannot converge")
        raise NeumannDivergenceError(
            f"Neumann series diverged at term {j}: ‖(I − αH)^{j} v‖ = {tn:.3g} vs ‖v‖ = {vn:.3g} with "
            f"alpha={alpha:g}. Estimated λ_max(H) ≈ {lam:.4g}{hint}. Use alpha < 2/λ_max ≈ "
            f"{2 * safe:.3g}, e.g. alpha={safe:.3g} or alpha='auto'. If alpha is already below that, H "
            "has negative curvature here (the weights are not at a minimum): train the inner problem "
            "longer or use a damped method such as hg.CG(damping=...).",
            lambda_max=lam, safe_alpha=safe)

    for j in range(1, iters):
        hv = op(term)
        for k in term:  # term ← (I − αH) term, in place: no new buffers per iteration
            term[k].add_(hv[k], alpha=-alpha)
        hvps += 1
        # The growth check costs a norm (a pass over the weights): every _CHECK_EVERY terms and at
        # the last one is enough to stop a diverging series long before it overflows.
        if j % _CHECK_EVERY == 0 or j == iters - 1:
            check(term, j)
        for k in acc:
            acc[k].add_(term[k])
    p = {k: t.mul_(alpha) for k, t in acc.items()}  # acc is private: scale it in place
    res: float | None = None
    if residual:
        # H p − v = −(I − αH)^K v: the next term of the series.
        nxt = tree.axpy(-alpha, op(term), term)
        hvps += 1
        res = _rel(tree.norm(nxt), vn)
    return Solve(p, iters, hvps, res, None, {"alpha": alpha})


def ritz_extremes(alphas: Sequence[float], betas: Sequence[float]) -> tuple[float, float]:
    """Smallest and largest eigenvalue of CG's Lanczos tridiagonal ``T_k`` (Golub & Van Loan §11.3).

    After k CG steps with step sizes ``α_j`` and ratios ``β_j = ‖r_{j+1}‖²/‖r_j‖²``,
    ``T_k[j, j] = 1/α_j + β_{j−1}/α_{j−1}`` and ``T_k[j, j+1] = √β_j/α_j``; its eigenvalues (Ritz
    values) lie in ``[λ_min, λ_max]`` of the operator and approach the extremes first: ``θ_max``
    from below, ``θ_min`` from above. A k×k eigenvalue problem, no HVP.
    """
    k = len(alphas)
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas[:k], dtype=torch.float64)
    diag = 1.0 / a
    diag[1:] += b[:-1] / a[:-1]
    off = torch.sqrt(b[:-1]) / a[:-1]
    T = torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
    th = torch.linalg.eigvalsh(T)
    return float(th[0]), float(th[-1])


def cg(op: HessianOperator, v: Mapping[str, Tensor], *, iters: int, tol: float = 1e-10,
       x0: Mapping[str, Tensor] | None = None, error_tol: float | None = None,
       lambda_min: float | None = None) -> Solve:
    """Conjugate gradient on ``A p = v`` with ``A = op`` (``H + δI`` for ``op.damped(δ)``): ≤ ``iters`` HVPs.

    Stops when ``‖r‖ ≤ tol·‖v‖`` (the recursively updated residual, so the check is free) and,
    with ``error_tol`` given, also ``‖r‖ ≤ error_tol·θ_min·‖p‖``. Since ``p − A⁻¹v = −A⁻¹r``, the
    relative error ``‖p − A⁻¹v‖/‖p‖`` is at most ``‖r‖/(λ_min(A)‖p‖)``; ``θ_min`` is the smallest
    Ritz value (:func:`ritz_extremes`), or the smaller ``lambda_min`` passed in (an estimate kept
    from a previous solve with a nearby operator). ``θ_min ≥ λ_min``, so it is an estimate, not a
    bound, but a good one once CG has run long enough to meet the residual rule: the
    residual rule alone allows an error up to ``cond(A)·tol``. The Ritz extremes, ``θ_min`` and
    ``θ_max`` of ``A``, are reported as ``extra["lambda_min"]``/``["lambda_max"]`` and the estimate
    as ``extra["error_estimate"]`` whenever ``error_tol`` is given.

    ``x0`` warm-starts (one extra HVP for the initial residual). ``extra["damping"]`` is the
    operator's shift ``δ``. A direction with ``dᵀAd ≤ 0`` raises :class:`NegativeCurvatureError`
    (no ``p`` is returned): CG's answer would be meaningless.
    """
    if iters < 0:
        raise HypergradientError(f"CG needs iters >= 0, got {iters}")
    if tol < 0:
        raise HypergradientError(f"CG needs tol >= 0, got {tol}")
    if error_tol is not None and not error_tol > 0:
        raise HypergradientError(f"CG needs error_tol > 0 (or None), got {error_tol}")

    A = op
    vn = float(tree.norm(v))
    hvps = 0
    if x0 is None:
        x: Tree = tree.zeros_like(v)
        r: Tree = {k: t.clone() for k, t in v.items()}
    else:
        x = {k: t.detach().clone() for k, t in x0.items()}
        r = tree.sub(v, A(x))
        hvps += 1
    if vn == 0.0:
        return Solve(tree.zeros_like(v), 0, hvps, 0.0, True)
    d: Tree = {k: t.clone() for k, t in r.items()}
    rs = float(tree.dot(r, r))
    alphas: list[float] = []
    betas: list[float] = []
    extra: dict[str, float] = {"damping": op.shift}

    def error_met() -> bool:
        # Only evaluated once the residual rule holds: a k×k eigenproblem and a norm, no HVP.
        lo = lambda_min if lambda_min is not None and lambda_min > 0 else None
        if alphas:
            t_lo, t_hi = ritz_extremes(alphas, betas)
            lo = t_lo if lo is None else min(lo, t_lo)
            extra["lambda_max"] = t_hi
        if lo is None or not lo > 0:
            return False
        extra["lambda_min"] = lo
        extra["error_estimate"] = _rel(math.sqrt(rs), lo * float(tree.norm(x)))
        return extra["error_estimate"] <= error_tol  # type: ignore[operator]

    it = 0
    met = False
    while True:
        met = math.sqrt(rs) <= tol * vn and (error_tol is None or error_met())
        if met or it >= iters:
            break
        ad = A(d)
        hvps += 1
        curv = float(tree.dot(d, ad))
        if not curv > 0.0:
            dd = float(tree.dot(d, d))  # only for the message: not computed on the fast path
            raise NegativeCurvatureError(
                f"CG met non-positive curvature dᵀHd/dᵀd = {curv / dd:.3g} at iteration {it + 1}: the "
                "Hessian is not positive definite at these weights (they may not be a minimum of the "
                "inner loss). Train the inner problem closer to a minimum, add damping "
                "(hg.CG(damping=...) larger than that magnitude), or use hg.Neumann with a small alpha.",
                curvature=curv / dd if dd > 0 else curv, iteration=it + 1)
        a = rs / curv
        for k in x:
            x[k].add_(d[k], alpha=a)
            r[k].add_(ad[k], alpha=-a)
        rs_new = float(tree.dot(r, r))
        beta = rs_new / rs
        if error_tol is not None:
            alphas.append(a)
            betas.append(beta)
        for k in d:  # d ← r + β d, in place (d is private)
            d[k].mul_(beta).add_(r[k])
        rs = rs_new
        it += 1
    if error_tol is not None and "error_estimate" not in extra:
        error_met()  # out of iterations before the residual rule held: report the estimates anyway
    res = math.sqrt(rs) / vn
    return Solve(x, it, hvps, res, met, extra)


def _check_dense_size(n: int, max_size: int, what: str) -> None:
    if n > max_size:
        raise ProblemTooLargeError(
            f"{what} would materialise a {n}×{n} Hessian ({n * n * 8 / 2**30:.2f} GiB in float64), above "
            f"its max_size={max_size} weights. Use hg.CG, hg.Neumann or hg.Nystrom (matrix-free), or raise "
            "max_size if you have the memory.")


def dense_hessian(op: HessianOperator, like: Mapping[str, Tensor], *, chunk: int = 256) -> Tensor:
    """The n×n matrix of ``op`` from batched HVPs with the identity's columns (``n`` HVPs)."""
    flat = tree.flatten(like)
    n = flat.numel()
    cols = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        eye = torch.zeros(m, n, dtype=flat.dtype, device=flat.device)
        eye[torch.arange(m), torch.arange(start, start + m)] = 1.0
        hv = op.mv_batched(tree.unflatten_rows(eye, like))
        cols.append(torch.cat([hv[k].reshape(m, -1) for k in like], dim=1))
    return torch.cat(cols, dim=0)


def exact(op: HessianOperator, v: Mapping[str, Tensor], *, max_size: int = 5000) -> Solve:
    """Dense solve ``A p = v``, ``A = op`` (``H + δI`` for ``op.damped(δ)``; n HVPs to build it).

    Refuses above ``max_size`` weights. ``extra["damping"]`` is the operator's shift. The solve is
    a Cholesky factorisation, which succeeds exactly when ``A`` is (numerically) positive definite:
    then ``extra["positive_definite"] = 1``. Otherwise ``A`` is solved by LU,
    ``extra["positive_definite"] = 0`` and ``extra["lambda_min"]`` is ``A``'s smallest eigenvalue
    (one symmetric eigendecomposition, spent only in that case). ``converged`` is False when ``A``
    is indefinite, ``λ_min < −√eps·max|λ|`` (the weights are not a minimum); a smallest eigenvalue
    within that rounding margin of zero is a flat direction of a minimum (a symmetry of the
    model), which keeps ``converged=True``.
    """
    n = tree.numel(v)
    _check_dense_size(n, max_size, "hg.Exact")
    H = dense_hessian(op, v)  # the shift is on the diagonal already, exactly (σ·0 off it)
    H = 0.5 * (H + H.T)  # autograd's H is symmetric up to rounding
    damping = op.shift
    b = tree.flatten(v)
    extra = {"damping": damping}
    L, info = torch.linalg.cholesky_ex(H)
    pd = int(info) == 0
    try:
        x = torch.cholesky_solve(b[:, None], L)[:, 0] if pd else torch.linalg.solve(H, b)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        raise HypergradientError(
            f"hg.Exact: the Hessian is singular at these weights ({e}). A weight the inner loss does not "
            "depend on, or an unregularised flat direction, makes H singular: add damping "
            "(hg.Exact(damping=...)) or regularise the inner loss.") from e
    res = _rel(torch.linalg.vector_norm(H @ x - b), float(torch.linalg.vector_norm(b)))
    if not math.isfinite(res):
        raise HypergradientError("hg.Exact: the dense solve produced non-finite values; H is singular or "
                                 "ill-conditioned here: add damping (hg.Exact(damping=...)).")
    extra["positive_definite"] = float(pd)
    indefinite = False
    if not pd:
        ev = torch.linalg.eigvalsh(H)
        extra["lambda_min"] = float(ev[0])
        # An eigenvalue is known to about √eps of the largest one here: H is assembled from n HVPs,
        # each rounded relative to the terms it sums, which may cancel.
        indefinite = float(ev[0]) < -math.sqrt(torch.finfo(H.dtype).eps) * float(ev.abs().max())
    return Solve(tree.unflatten(x, v), 1, n, res, not indefinite, extra)


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


def nystrom(op: HessianOperator, v: Mapping[str, Tensor], *, rank: int, rho: float | None = None,
            seed: int = 0, floor: float | Literal["auto"] | None = None, residual: bool = False) -> Solve:
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
    res: float | None = None
    hvps = rank
    if residual:
        res = relative_residual(op, p, v)
        hvps += 1
    return Solve(p, rank, hvps, res, None, dict(factor.extra))


def nystrom_factor(op: HessianOperator, like: Mapping[str, Tensor], *, rank: int, rho: float | None = None,
                   seed: int = 0, floor: float | Literal["auto"] | None = None) -> NystromFactor:
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
    Y = torch.cat([t.reshape(rank, -1) for t in op.mv_batched(tree.unflatten_rows(omega.T.contiguous(), v))
                   .values()], dim=1).T  # n×k
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
                "not be a minimum). Train the inner problem closer to a minimum.", curvature=theta,
                iteration=0)
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
            what = (f"ΩᵀHΩ − {mu:g}·I is not positive definite: the floor exceeds the smallest curvature "
                    "on the sketch. Pass a floor below λ_min(H), or floor='auto'")
        else:
            what = ("the sketched Hessian ΩᵀHΩ is not positive definite, so H has negative curvature at "
                    "these weights (they may not be a minimum). Train the inner problem closer to a "
                    "minimum or use a damped method (hg.CG(damping=...))")
        raise NegativeCurvatureError(f"hg.Nystrom: {what}.", curvature=float("nan"), iteration=0) from e
    B = torch.linalg.solve_triangular(C, Ynu.T, upper=False).T  # Ynu C⁻ᵀ
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    lam = torch.clamp(S * S - nu, min=0.0)
    if floor is not None:
        shift = mu + (rho or 0.0)
        return NystromFactor(U, lam + shift, shift,
                             {"rho": rho or 0.0, "floor": mu, "lambda_max": float(lam.max()) + mu})
    if rho is None:
        low = max(float(lam.min()), float(lam.max()) * eps * n, torch.finfo(b.dtype).tiny)
        extra = {"rho": low, "lambda_max": float(lam.max())}
        if auto:
            extra["floor"] = 0.0
        return NystromFactor(U, torch.clamp(lam, min=low), low, extra)
    return NystromFactor(U, lam + rho, rho, {"rho": rho, "lambda_max": float(lam.max())})
