"""Krylov solvers for general (non-symmetric) linear systems ``A x = b`` on ``dict[str, Tensor]`` trees.

Pure functions of a ``matvec(x) = A x`` closure: nothing here knows about losses or autograd, so
the same solvers serve the transpose solve of :func:`hypergradients.root_hypergradient`
(``A = (∂F/∂w)ᵀ``, one vector-Jacobian product per matvec) and any other operator.

* :func:`gmres` — restarted GMRES (Saad & Schultz 1986): minimises ``‖b − A x‖`` over the Krylov
  space of each cycle of ``restart`` iterations; one matvec per iteration, ``restart`` basis
  trees of memory. Monotone residual; the robust default.
* :func:`bicgstab` — BiCGStab (van der Vorst 1992): two matvecs per iteration, constant memory
  (seven trees), residual not monotone; often fewer matvecs than restarted GMRES on large
  systems, and it can break down (handled by restarting from the true residual).
* :func:`cgls` — conjugate gradient on the normal equations ``AᵀA x = Aᵀb`` (CGLS, Hestenes &
  Stiefel 1952): needs the adjoint product too and converges like CG at ``cond(A)²``; the
  fallback when the others stall.

Every solver returns a :class:`KrylovResult`. ``residual`` is always the *true* relative
residual ``‖b − A x‖/‖b‖`` of the returned ``x`` (recomputed, not the recurrence's estimate,
which drifts in floating point: when the estimate meets ``tol`` and the true residual does not,
the solver continues from the true one). ``converged`` is ``residual ≤ tol``. Scalars (Hessenberg
matrix, rotations) are kept in float64 on the CPU whatever the dtype of the trees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .. import tree
from ..tree import Tree

MatVec = Callable[[Tree], Tree]


class KrylovResult(NamedTuple):
    """``x`` the solution; ``iterations`` Krylov iterations; ``residual`` the true
    ``‖b − A x‖/‖b‖``; ``converged`` whether ``residual ≤ tol``; ``matvecs`` the products with
    ``A`` (and, for :func:`cgls`, with ``Aᵀ``) spent, residual checks included."""

    x: Tree
    iterations: int
    residual: float
    converged: bool
    matvecs: int


def _check(iters: int, tol: float, restart: int | None = None) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if restart is not None and (isinstance(restart, bool) or not isinstance(restart, int) or restart < 1):
        raise ValueError(f"restart must be a positive integer, got {restart!r}")


def _start(b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None) -> Tree:
    if x0 is None:
        return tree.zeros_like(b)
    if x0.keys() != b.keys() or any(x0[k].shape != b[k].shape for k in b):
        raise ValueError("x0 must have the keys and shapes of b")
    return {k: t.detach().clone() for k, t in x0.items()}


def _residual(matvec: MatVec, b: Mapping[str, Tensor], x: Tree, zero: bool) -> Tree:
    """``b − A x`` (no matvec when ``x`` is known to be zero)."""
    return {k: t.clone() for k, t in b.items()} if zero else tree.sub(b, matvec(x))


def gmres(matvec: MatVec, b: Mapping[str, Tensor], *, x0: Mapping[str, Tensor] | None = None,
          iters: int = 200, tol: float = 1e-10, restart: int = 30) -> KrylovResult:
    """Restarted GMRES(``restart``) for ``A x = b``: at most ``iters`` Arnoldi iterations in total.

    Each cycle builds an orthonormal basis ``V`` of ``K_m(A, r) = span{r, Ar, …, A^{m−1}r}`` by
    modified Gram–Schmidt (``A V_m = V_{m+1} H̄_m``, ``H̄_m`` upper Hessenberg), and takes
    ``x ← x + V_m y`` with ``y = argmin ‖‖r‖e₁ − H̄_m y‖``, solved by Givens rotations whose running
    product gives the residual norm for free. A cycle ends after ``restart`` iterations, when
    that estimate meets ``‖r‖ ≤ tol·‖b‖``, or at an exact breakdown (``A^j r`` already in the
    space: the solution is in it). The next cycle starts from the true residual ``b − A x`` (one
    matvec); it is also the reported ``residual``. Memory: ``restart + 1`` trees.

    Converges for any non-singular ``A`` without restarts (at most ``n`` iterations in exact
    arithmetic); restarted GMRES can stagnate on indefinite non-normal matrices, where a
    larger ``restart`` helps.
    """
    _check(iters, tol, restart)
    bn = float(tree.norm(b))
    x = _start(b, x0)
    if bn == 0.0:
        return KrylovResult(tree.zeros_like(b), 0, 0.0, True, 0)
    total = 0
    matvecs = 0
    zero = x0 is None
    while True:
        r = _residual(matvec, b, x, zero)
        matvecs += 0 if zero else 1
        zero = False
        beta = float(tree.norm(r))
        if beta <= tol * bn or total >= iters or not math.isfinite(beta):
            return KrylovResult(x, total, beta / bn, beta <= tol * bn, matvecs)
        m = min(restart, iters - total)
        V = [tree.scale(r, 1.0 / beta)]
        Hm = torch.zeros(m + 1, m, dtype=torch.float64)
        cs: list[float] = []
        sn: list[float] = []
        g = [beta] + [0.0] * m
        k = 0
        for j in range(m):
            w = matvec(V[j])
            total += 1
            matvecs += 1
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
        if not bool((diag > 0).all()):  # a zero pivot: A is singular on this Krylov space
            k = int((diag > 0).nonzero().max()) + 1 if bool((diag > 0).any()) else 0
            R = Hm[:k, :k]
        if k == 0:
            return KrylovResult(x, total, beta / bn, False, matvecs)
        y = torch.linalg.solve_triangular(R, torch.tensor(g[:k], dtype=torch.float64)[:, None],
                                          upper=True)[:, 0]
        for i in range(k):
            x = tree.axpy(float(y[i]), V[i], x)


def bicgstab(matvec: MatVec, b: Mapping[str, Tensor], *, x0: Mapping[str, Tensor] | None = None,
             iters: int = 100, tol: float = 1e-10) -> KrylovResult:
    """BiCGStab for ``A x = b``: at most ``iters`` iterations of two matvecs each.

    van der Vorst's recurrences with the shadow residual ``r̂ = r₀``: a BiCG step
    (``p ← r + β(p − ωv)``, ``α = ρ/⟨r̂, Ap⟩``, ``ρ = ⟨r̂, r⟩``) followed by a one-step
    minimal-residual smoothing (``ω = ⟨As, s⟩/‖As‖²``). When the recurrence residual meets
    ``tol``, or at a breakdown (``|ρ|`` or ``|⟨r̂, Ap⟩|`` below ``eps·‖r̂‖·‖·‖``, ``ω = 0``), the true
    residual is computed (one matvec); if it is still above ``tol`` the iteration restarts from it
    with a new shadow, and gives up when a fresh restart breaks down at once. No breakdown:
    exact in ``n`` iterations in exact arithmetic; the residual is not monotone.
    """
    _check(iters, tol)
    bn = float(tree.norm(b))
    x = _start(b, x0)
    if bn == 0.0:
        return KrylovResult(tree.zeros_like(b), 0, 0.0, True, 0)
    eps = max(torch.finfo(t.dtype).eps for t in b.values())
    matvecs = 0 if x0 is None else 1
    r = _residual(matvec, b, x, x0 is None)
    it = 0
    while True:  # one pass per (re)start, from the true residual r
        rn = float(tree.norm(r))
        if rn <= tol * bn or it >= iters or not math.isfinite(rn):
            return KrylovResult(x, it, rn / bn, rn <= tol * bn, matvecs)
        shadow = r
        sn = rn
        rho = alpha = omega = 1.0
        v = tree.zeros_like(b)
        p = tree.zeros_like(b)
        progressed = False
        while it < iters:
            rho_new = float(tree.dot(shadow, r))
            if abs(rho_new) <= eps * sn * float(tree.norm(r)):
                break
            beta = (rho_new / rho) * (alpha / omega)
            p = tree.add(r, tree.scale(tree.axpy(-omega, v, p), beta))
            v = matvec(p)
            matvecs += 1
            sv = float(tree.dot(shadow, v))
            if abs(sv) <= eps * sn * float(tree.norm(v)):
                break
            alpha = rho_new / sv
            s = tree.axpy(-alpha, v, r)
            it += 1
            progressed = True
            if float(tree.norm(s)) <= tol * bn:
                x = tree.axpy(alpha, p, x)
                break
            t = matvec(s)
            matvecs += 1
            tt = float(tree.dot(t, t))
            omega = float(tree.dot(t, s)) / tt if tt > 0 else 0.0
            x = tree.axpy(omega, s, tree.axpy(alpha, p, x))
            r = tree.axpy(-omega, t, s)
            rho = rho_new
            if omega == 0.0 or float(tree.norm(r)) <= tol * bn:
                break
        r = tree.sub(b, matvec(x))
        matvecs += 1
        if not progressed:  # a fresh restart broke down at once: nothing more to gain
            rn = float(tree.norm(r))
            return KrylovResult(x, it, rn / bn, rn <= tol * bn, matvecs)


def cgls(matvec: MatVec, rmatvec: MatVec, b: Mapping[str, Tensor], *,
         x0: Mapping[str, Tensor] | None = None, iters: int = 200, tol: float = 1e-10) -> KrylovResult:
    """CGLS: conjugate gradient on the normal equations ``AᵀA x = Aᵀb`` for ``A x = b``.

    ``matvec(x) = A x``, ``rmatvec(y) = Aᵀ y``; one of each per iteration (``iters`` bounds the
    iterations). It minimises ``‖b − A x‖`` over a growing Krylov space of ``AᵀA``, monotonically,
    for any ``A`` (singular or not), but at the convergence rate of CG at ``cond(A)²``. The
    residual ``r = b − A x`` is updated recursively; when it meets ``tol`` the true one is
    computed (one matvec) and the iteration restarts from it if it does not.
    """
    _check(iters, tol)
    bn = float(tree.norm(b))
    x = _start(b, x0)
    if bn == 0.0:
        return KrylovResult(tree.zeros_like(b), 0, 0.0, True, 0)
    matvecs = 0 if x0 is None else 1
    r = _residual(matvec, b, x, x0 is None)
    it = 0
    while True:
        rn = float(tree.norm(r))
        if rn <= tol * bn or it >= iters or not math.isfinite(rn):
            return KrylovResult(x, it, rn / bn, rn <= tol * bn, matvecs)
        s = rmatvec(r)
        matvecs += 1
        p = s
        gamma = float(tree.dot(s, s))
        progressed = False
        while it < iters and gamma > 0.0:  # Aᵀr = 0: x already minimises ‖b − Ax‖
            q = matvec(p)
            matvecs += 1
            qq = float(tree.dot(q, q))
            if qq == 0.0:
                break
            a = gamma / qq
            x = tree.axpy(a, p, x)
            r = tree.axpy(-a, q, r)
            it += 1
            progressed = True
            if float(tree.norm(r)) <= tol * bn:
                break
            s = rmatvec(r)
            matvecs += 1
            gamma_new = float(tree.dot(s, s))
            p = tree.add(s, tree.scale(p, gamma_new / gamma))
            gamma = gamma_new
        if not progressed:
            return KrylovResult(x, it, rn / bn, False, matvecs)
        r = tree.sub(b, matvec(x))
        matvecs += 1
