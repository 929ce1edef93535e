"""Krylov-subspace solvers of ``M p = v`` on ``dict[str, Tensor]`` trees, from products with ``M`` only.

* :func:`cg` — conjugate gradient: ``M`` symmetric positive definite (``H + δI``); raises
  :class:`~hypergradients.NegativeCurvatureError` (returning no ``p``) when it meets ``dᵀMd ≤ 0``.
  Optionally also stops on an error estimate from its Ritz values (``hg.Auto``).
* :func:`minres` — MINRES (Paige & Saunders 1975): ``M`` symmetric, indefinite allowed (a Hessian
  at a saddle); minimises ``‖v − Mp‖`` over the Krylov space with a three-term recurrence: one
  product per iteration, constant memory (seven trees).
* :func:`gmres` — restarted GMRES (Saad & Schultz 1986): any non-singular ``M``; minimises
  ``‖v − Mp‖`` over the Krylov space of each cycle of ``restart`` iterations; one product per
  iteration, ``restart`` basis trees of memory. Monotone residual; the robust default for a
  non-symmetric ``M`` (the transpose Jacobian of a root condition).
* :func:`bicgstab` — BiCGStab (van der Vorst 1992): two products per iteration, constant memory
  (seven trees), residual not monotone; often fewer products than restarted GMRES on large
  systems, and it can break down (handled by restarting from the true residual).
* :func:`cgls` — conjugate gradient on the normal equations ``MᵀM p = Mᵀv`` (CGLS, Hestenes &
  Stiefel 1952): needs the transpose product too (``op.rmv``) and converges like CG at
  ``cond(M)²``; the fallback when the others stall.

For MINRES, GMRES, BiCGStab and CGLS, ``residual`` is the *true* relative residual ``‖v − Mp‖/‖v‖``
of the returned ``p`` (recomputed, not the recurrence's estimate, which drifts in floating point:
when the estimate meets ``tol`` and the true residual does not, the solver continues from the true
one) and ``converged`` is ``residual ≤ tol``. CG reports its recursively updated residual, which
costs nothing. Scalars (Hessenberg matrix, rotations) are kept in float64 on the CPU whatever the
dtype of the trees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import tree
from ..errors import HypergradientError, NegativeCurvatureError
from ..operators import LinearOperator
from ..tree import Tree
from .solve import Solve, ratio


def _check(iters: int, tol: float, restart: int | None = None) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise HypergradientError(f"iters must be an integer >= 0, got {iters!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise HypergradientError(f"tol must be a finite number >= 0, got {tol!r}")
    if restart is not None and (isinstance(restart, bool) or not isinstance(restart, int) or restart < 1):
        raise HypergradientError(f"restart must be a positive integer, got {restart!r}")


def _start(v: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None) -> Tree:
    if x0 is None:
        return tree.zeros_like(v)
    if x0.keys() != v.keys() or any(x0[k].shape != v[k].shape for k in v):
        raise HypergradientError("x0 must have the keys and shapes of v")
    return {k: t.detach().clone() for k, t in x0.items()}


def _residual(op: LinearOperator, v: Mapping[str, Tensor], x: Tree, zero: bool) -> Tree:
    """``v − M x`` (no product when ``x`` is known to be zero)."""
    return {k: t.clone() for k, t in v.items()} if zero else tree.sub(v, op(x))


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


def cg(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    iters: int,
    tol: float = 1e-10,
    x0: Mapping[str, Tensor] | None = None,
    error_tol: float | None = None,
    lambda_min: float | None = None,
) -> Solve:
    """Conjugate gradient on ``A p = v``, ``A = op`` (``H + δI`` for ``op.damped(δ)``): ≤ ``iters`` products.

    Stops when ``‖r‖ ≤ tol·‖v‖`` (the recursively updated residual, so the check is free) and,
    with ``error_tol`` given, also ``‖r‖ ≤ error_tol·θ_min·‖p‖``. Since ``p − A⁻¹v = −A⁻¹r``, the
    relative error ``‖p − A⁻¹v‖/‖p‖`` is at most ``‖r‖/(λ_min(A)‖p‖)``; ``θ_min`` is the smallest
    Ritz value (:func:`ritz_extremes`), or the smaller ``lambda_min`` passed in (an estimate kept
    from a previous solve with a nearby operator). ``θ_min ≥ λ_min``, so it is an estimate, not a
    bound, but a good one once CG has run long enough to meet the residual rule: the
    residual rule alone allows an error up to ``cond(A)·tol``. The Ritz extremes, ``θ_min`` and
    ``θ_max`` of ``A``, are reported as ``extra["lambda_min"]``/``["lambda_max"]`` and the estimate
    as ``extra["error_estimate"]`` whenever ``error_tol`` is given.

    ``x0`` warm-starts (one extra product for the initial residual). ``extra["damping"]`` is the
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
    if x0 is None:
        x: Tree = tree.zeros_like(v)
        r: Tree = {k: t.clone() for k, t in v.items()}
    else:
        x = {k: t.detach().clone() for k, t in x0.items()}
        r = tree.sub(v, A(x))
    if vn == 0.0:
        return Solve(tree.zeros_like(v), 0, 0.0, True)
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
        extra["error_estimate"] = ratio(math.sqrt(rs), lo * float(tree.norm(x)))
        return extra["error_estimate"] <= error_tol  # type: ignore[operator]

    it = 0
    met = False
    while True:
        met = math.sqrt(rs) <= tol * vn and (error_tol is None or error_met())
        if met or it >= iters:
            break
        ad = A(d)
        curv = float(tree.dot(d, ad))
        if not curv > 0.0:
            dd = float(tree.dot(d, d))  # only for the message: not computed on the fast path
            raise NegativeCurvatureError(
                f"CG met non-positive curvature dᵀHd/dᵀd = {curv / dd:.3g} at iteration {it + 1}: the "
                "Hessian is not positive definite at these weights (they may not be a minimum of the "
                "inner loss). Train the inner problem closer to a minimum, add damping "
                "(hg.CG(damping=...) larger than that magnitude), or use hg.MINRES, which solves a symmetric "
                "indefinite system (the derivative of the stationary point itself).",
                curvature=curv / dd if dd > 0 else curv,
                iteration=it + 1,
            )
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
    return Solve(x, it, res, met, extra)


def minres(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    iters: int = 200,
    tol: float = 1e-10,
    x0: Mapping[str, Tensor] | None = None,
) -> Solve:
    """MINRES for a symmetric ``M p = v``, definite or not: at most ``iters`` products (plus one per pass
    for the true residual).

    The Lanczos recurrence ``M V_k = V_{k+1} T̄_k`` (``T̄_k`` tridiagonal) with ``p_k = x0 + V_k y_k``,
    ``y_k = argmin ‖β₁e₁ − T̄_k y‖``, solved by Givens rotations applied as the columns arrive, so
    ``p`` is updated by a three-term recurrence of search directions and the residual norm
    ``φ̄_k = ‖v − Mp_k‖`` comes for free (Paige & Saunders 1975; the arrangement of SciPy's
    ``minres``). Unlike CG it needs no definiteness: on a Hessian at a saddle it converges to the
    solution of the indefinite system, which is the derivative of that stationary point. A pass ends
    when ``φ̄ ≤ tol·‖v‖``, at an exact breakdown (the Krylov space is invariant: the solution is in it)
    or at ``iters``; then the true residual is computed (one product) and, if it is still above
    ``tol``, a new pass starts from it.
    """
    _check(iters, tol)
    if not op.symmetric:
        raise HypergradientError(f"MINRES needs a symmetric operator; {op.name} is not: use gmres")
    vn = float(tree.norm(v))
    x = _start(v, x0)
    if vn == 0.0:
        return Solve(tree.zeros_like(v), 0, 0.0, True)
    eps = max(torch.finfo(t.dtype).eps for t in v.values())
    zero = x0 is None
    it = 0
    while True:  # one pass per (re)start, from the true residual
        r = _residual(op, v, x, zero)
        zero = False
        beta1 = float(tree.norm(r))
        if beta1 <= tol * vn or it >= iters or not math.isfinite(beta1):
            return Solve(x, it, beta1 / vn, beta1 <= tol * vn)
        r1 = r2 = y = r  # r1, r2: the last two Lanczos vectors, each times its β
        oldb, beta, dbar, epsln, phibar = 0.0, beta1, 0.0, 0.0, beta1
        cs, sn = -1.0, 0.0
        w = w2 = tree.zeros_like(v)
        first = True
        while it < iters:
            q = tree.scale(y, 1.0 / beta)  # the Lanczos vector
            y = op(q)
            if not first:
                y = tree.axpy(-beta / oldb, r1, y)
            alfa = float(tree.dot(q, y))
            y = tree.axpy(-alfa / beta, r2, y)
            r1, r2 = r2, y
            oldb, beta = beta, float(tree.norm(y))
            # The previous rotation on the new column of T̄, then the rotation that zeroes β.
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = max(math.hypot(gbar, beta), eps)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            w1, w2 = w2, w
            w = tree.scale(tree.axpy(-delta, w2, tree.axpy(-oldeps, w1, q)), 1.0 / gamma)
            x = tree.axpy(phi, w, x)
            it += 1
            first = False
            if phibar <= tol * vn or beta == 0.0 or not math.isfinite(beta):
                break


def gmres(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    iters: int = 200,
    tol: float = 1e-10,
    restart: int = 30,
    x0: Mapping[str, Tensor] | None = None,
) -> Solve:
    """Restarted GMRES(``restart``) for ``M p = v``: at most ``iters`` Arnoldi iterations in total.

    Each cycle builds an orthonormal basis ``V`` of ``K_m(M, r) = span{r, Mr, …, M^{m−1}r}`` by
    modified Gram–Schmidt (``M V_m = V_{m+1} H̄_m``, ``H̄_m`` upper Hessenberg), and takes
    ``p ← p + V_m y`` with ``y = argmin ‖‖r‖e₁ − H̄_m y‖``, solved by Givens rotations whose running
    product gives the residual norm for free. A cycle ends after ``restart`` iterations, when
    that estimate meets ``‖r‖ ≤ tol·‖v‖``, or at an exact breakdown (``M^j r`` already in the
    space: the solution is in it). The next cycle starts from the true residual ``v − M p`` (one
    product); it is also the reported ``residual``. Memory: ``restart + 1`` trees.

    Converges for any non-singular ``M`` without restarts (at most ``n`` iterations in exact
    arithmetic); restarted GMRES can stagnate on indefinite non-normal matrices, where a
    larger ``restart`` helps.
    """
    _check(iters, tol, restart)
    bn = float(tree.norm(v))
    x = _start(v, x0)
    if bn == 0.0:
        return Solve(tree.zeros_like(v), 0, 0.0, True)
    total = 0
    zero = x0 is None
    while True:
        r = _residual(op, v, x, zero)
        zero = False
        beta = float(tree.norm(r))
        if beta <= tol * bn or total >= iters or not math.isfinite(beta):
            return Solve(x, total, beta / bn, beta <= tol * bn)
        m = min(restart, iters - total)
        V = [tree.scale(r, 1.0 / beta)]
        Hm = torch.zeros(m + 1, m, dtype=torch.float64)
        cs: list[float] = []
        sn: list[float] = []
        g = [beta] + [0.0] * m
        k = 0
        for j in range(m):
            w = op(V[j])
            total += 1
            for i in range(j + 1):  # modified Gram–Schmidt
                h = float(tree.dot(w, V[i]))
                Hm[i, j] = h
                w = tree.axpy(-h, V[i], w)
            hn = float(tree.norm(w))
            Hm[j + 1, j] = hn
            for i in range(j):  # the previous rotations, applied to the new column
                a, c = float(Hm[i, j]), float(Hm[i + 1, j])
                Hm[i, j] = cs[i] * a + sn[i] * c
                Hm[i + 1, j] = -sn[i] * a + cs[i] * c
            a, c = float(Hm[j, j]), hn
            den = math.hypot(a, c)
            cs.append(a / den if den > 0 else 1.0)
            sn.append(c / den if den > 0 else 0.0)
            Hm[j, j] = den
            Hm[j + 1, j] = 0.0
            g[j + 1] = -sn[j] * g[j]
            g[j] = cs[j] * g[j]
            k = j + 1
            if abs(g[j + 1]) <= tol * bn or hn == 0.0 or not math.isfinite(hn):
                break
            V.append(tree.scale(w, 1.0 / hn))
        R = Hm[:k, :k]
        diag = R.diagonal().abs()
        if not bool((diag > 0).all()):  # a zero pivot: M is singular on this Krylov space
            k = int((diag > 0).nonzero().max()) + 1 if bool((diag > 0).any()) else 0
            R = Hm[:k, :k]
        if k == 0:
            return Solve(x, total, beta / bn, False)
        y = torch.linalg.solve_triangular(R, torch.tensor(g[:k], dtype=torch.float64)[:, None], upper=True)[
            :, 0
        ]
        for i in range(k):
            x = tree.axpy(float(y[i]), V[i], x)


def bicgstab(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    iters: int = 100,
    tol: float = 1e-10,
    x0: Mapping[str, Tensor] | None = None,
) -> Solve:
    """BiCGStab for ``M p = v``: at most ``iters`` iterations of two products each.

    van der Vorst's recurrences with the shadow residual ``r̂ = r₀``: a BiCG step
    (``d ← r + β(d − ωs)``, ``α = ρ/⟨r̂, Md⟩``, ``ρ = ⟨r̂, r⟩``) followed by a one-step
    minimal-residual smoothing (``ω = ⟨Mz, z⟩/‖Mz‖²``). When the recurrence residual meets
    ``tol``, or at a breakdown (``|ρ|`` or ``|⟨r̂, Md⟩|`` below ``eps·‖r̂‖·‖·‖``, ``ω = 0``), the true
    residual is computed (one product); if it is still above ``tol`` the iteration restarts from it
    with a new shadow, and gives up when a fresh restart breaks down at once. No breakdown:
    exact in ``n`` iterations in exact arithmetic; the residual is not monotone.
    """
    _check(iters, tol)
    bn = float(tree.norm(v))
    x = _start(v, x0)
    if bn == 0.0:
        return Solve(tree.zeros_like(v), 0, 0.0, True)
    eps = max(torch.finfo(t.dtype).eps for t in v.values())
    r = _residual(op, v, x, x0 is None)
    it = 0
    while True:  # one pass per (re)start, from the true residual r
        rn = float(tree.norm(r))
        if rn <= tol * bn or it >= iters or not math.isfinite(rn):
            return Solve(x, it, rn / bn, rn <= tol * bn)
        shadow = r
        sn = rn
        rho = alpha = omega = 1.0
        md = tree.zeros_like(v)  # M d
        d = tree.zeros_like(v)
        progressed = False
        while it < iters:
            rho_new = float(tree.dot(shadow, r))
            if abs(rho_new) <= eps * sn * float(tree.norm(r)):
                break
            beta = (rho_new / rho) * (alpha / omega)
            d = tree.add(r, tree.scale(tree.axpy(-omega, md, d), beta))
            md = op(d)
            sv = float(tree.dot(shadow, md))
            if abs(sv) <= eps * sn * float(tree.norm(md)):
                break
            alpha = rho_new / sv
            s = tree.axpy(-alpha, md, r)
            it += 1
            progressed = True
            if float(tree.norm(s)) <= tol * bn:
                x = tree.axpy(alpha, d, x)
                break
            t = op(s)
            tt = float(tree.dot(t, t))
            omega = float(tree.dot(t, s)) / tt if tt > 0 else 0.0
            x = tree.axpy(omega, s, tree.axpy(alpha, d, x))
            r = tree.axpy(-omega, t, s)
            rho = rho_new
            if omega == 0.0 or float(tree.norm(r)) <= tol * bn:
                break
        r = tree.sub(v, op(x))
        if not progressed:  # a fresh restart broke down at once: nothing more to gain
            rn = float(tree.norm(r))
            return Solve(x, it, rn / bn, rn <= tol * bn)


def cgls(
    op: LinearOperator,
    v: Mapping[str, Tensor],
    *,
    iters: int = 200,
    tol: float = 1e-10,
    x0: Mapping[str, Tensor] | None = None,
) -> Solve:
    """CGLS: conjugate gradient on the normal equations ``MᵀM p = Mᵀv`` for ``M p = v``.

    One product with ``M`` (``op``) and one with ``Mᵀ`` (``op.rmv``) per iteration (``iters`` bounds
    the iterations). It minimises ``‖v − M p‖`` over a growing Krylov space of ``MᵀM``,
    monotonically, for any ``M`` (singular or not), but at the convergence rate of CG at
    ``cond(M)²``. The residual ``r = v − M p`` is updated recursively; when it meets ``tol`` the true
    one is computed (one product) and the iteration restarts from it if it does not.
    """
    _check(iters, tol)
    bn = float(tree.norm(v))
    x = _start(v, x0)
    if bn == 0.0:
        return Solve(tree.zeros_like(v), 0, 0.0, True)
    r = _residual(op, v, x, x0 is None)
    it = 0
    while True:
        rn = float(tree.norm(r))
        if rn <= tol * bn or it >= iters or not math.isfinite(rn):
            return Solve(x, it, rn / bn, rn <= tol * bn)
        s = op.rmv(r)
        d = s
        gamma = float(tree.dot(s, s))
        progressed = False
        while it < iters and gamma > 0.0:  # Mᵀr = 0: x already minimises ‖v − Mx‖
            q = op(d)
            qq = float(tree.dot(q, q))
            if qq == 0.0:
                break
            a = gamma / qq
            x = tree.axpy(a, d, x)
            r = tree.axpy(-a, q, r)
            it += 1
            progressed = True
            if float(tree.norm(r)) <= tol * bn:
                break
            s = op.rmv(r)
            gamma_new = float(tree.dot(s, s))
            d = tree.add(s, tree.scale(d, gamma_new / gamma))
            gamma = gamma_new
        if not progressed:
            return Solve(x, it, rn / bn, False)
        r = tree.sub(v, op(x))
