"""The implicit methods: one class per inverse-HVP solver, each a ``solve(op, v, state)``.

Each class is a frozen record of its options plus :meth:`solve` (the protocol of
:class:`~hypergradients.ImplicitMethod`); the numerical kernels are in
:mod:`hypergradients.core.kernels.symmetric`. What each one keeps in its :class:`~hypergradients.SolverState`:

* :class:`CG`, :class:`Auto` — the last ``p`` (warm start) and Auto's Ritz extremes of ``H``;
* :class:`Neumann` (``alpha="auto"``) — the power-iteration ``λ_max``, re-estimated every
  ``refresh_every`` calls or as soon as the series grows;
* :class:`Nystrom` — the factored sketch, re-sketched once its residual has grown;
* :class:`Exact`, :class:`Identity` — nothing (a call count).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from . import tree
from .errors import HypergradientError, NegativeCurvatureError
from .kernels import symmetric as linear
from .method import ImplicitMethod, IndefiniteHessianWarning, Stats, nonneg_float, positive_int
from .operators import HessianOperator
from .state import SolverState, StateMismatchError
from .tree import Tree


def _stats(s: linear.Solve) -> Stats:
    return Stats(s.iterations, s.residual, s.converged, s.extra)


def _carry(state: SolverState | None) -> SolverState:
    return SolverState() if state is None else state


@dataclass(frozen=True)
class Exact(ImplicitMethod):
    """``p = (H + δI)⁻¹ v`` by a dense solve; ``H`` built from n HVPs. Refuses above ``max_size`` weights.

    The solve is a Cholesky factorisation, which also tells whether ``H + δI`` is positive definite
    (the weights a minimum) at no extra cost. Where it is not, ``p`` comes from an LU solve (the
    derivative of a stationary point that is not a minimum), ``info.converged`` is False,
    ``info.extra`` has ``positive_definite = 0`` and ``lambda_min`` (its smallest eigenvalue), and an
    :class:`~hypergradients.IndefiniteHessianWarning` names the damping that would make it definite.
    """

    damping: float = 0.0
    max_size: int = 5000

    def __post_init__(self) -> None:
        nonneg_float("Exact.damping", self.damping)
        positive_int("Exact.max_size", self.max_size)

    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        s = linear.exact(op.damped(self.damping), v, max_size=self.max_size)
        if not s.converged:
            lo = s.extra["lambda_min"]
            # stacklevel 4: warn → solve → compute → hypergradient → the user's call.
            warnings.warn(
                f"hg.Exact: H + δI (δ = {self.damping:g}) is not positive definite at these weights "
                f"(smallest eigenvalue {lo:.3g}): they are not a minimum of inner_loss, which the implicit "
                "hypergradient assumes (info.grad_norm is ‖∂L_T/∂w‖ there; info.converged is False). Train "
                f"the inner problem further, or damp: hg.Exact(damping=...) above "
                f"{max(0.0, self.damping - lo):.3g}.", IndefiniteHessianWarning, stacklevel=4)
        return s.p, _carry(state), _stats(s)


@dataclass(frozen=True)
class CG(ImplicitMethod):
    """Conjugate gradient on ``(H + δI) p = v``: at most ``iters`` HVPs, stops at ``‖r‖ ≤ tol‖v‖``.

    Needs ``H + δI`` positive definite: a direction with ``dᵀ(H + δI)d ≤ 0`` raises
    :class:`~hypergradients.NegativeCurvatureError` (``.curvature``, the Rayleigh quotient
    found, and ``.iteration``) and returns no hypergradient: a partial CG solution is not an
    approximation of ``H⁻¹v`` once the curvature is not positive. :class:`Auto` instead retries
    with damping; the trainer's ``on_solver_error`` decides there. With a state it starts from the
    previous ``p`` (one HVP for the initial residual; ``info.extra["warm_start"] = 1``). Shares
    its state with :class:`Auto`.
    """

    iters: int = 50
    tol: float = 1e-10
    damping: float = 0.0

    shares_state_with: ClassVar[tuple[str, ...]] = ("Auto",)

    def __post_init__(self) -> None:
        positive_int("CG.iters", self.iters)
        nonneg_float("CG.tol", self.tol)
        nonneg_float("CG.damping", self.damping)

    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        st = _carry(state)
        x0 = st.warm(v, method="CG")
        s = linear.cg(op.damped(self.damping), v, iters=self.iters, tol=self.tol, x0=x0)
        if x0 is not None:
            s.extra["warm_start"] = 1.0
        return s.p, st.replace(p=tree.detach(s.p)), _stats(s)


@dataclass(frozen=True)
class Neumann(ImplicitMethod):
    """``p = α Σ_{j=0}^{K−1} (I − αH)^j v`` with ``K = iters`` (Lorraine et al. 2020, Algorithm 3).

    Exactly K terms, the factor ``α`` included (``K−1`` HVPs). ``alpha="auto"`` estimates
    ``λ_max(H)`` by ``power_iters`` power iterations and uses ``α = 1/λ_max``, safely inside the
    convergence region ``0 < α < 2/λ_max``. A diverging series raises
    :class:`~hypergradients.NeumannDivergenceError` with the estimated ``λ_max`` and a safe α.

    With a state (consecutive calls, e.g. the hyper steps of a training run), ``alpha="auto"``
    keeps ``λ_max`` there and reuses it, saving the ``power_iters`` HVPs, until either

    * ``refresh_every`` calls have used it (default 10; 1 estimates at every call, as without a
      state), or
    * the series grows: a checked term ``(I − αH)^j v`` longer than ``v``. For SPD ``H`` that
      happens exactly when ``α = 1/λ_cached ≥ 2/λ_max(H)`` (the Hessian's top has more than
      doubled), so the cached α would diverge; ``λ_max`` is then re-estimated and the series
      rerun (the HVPs of the failed one are spent; ``info.extra["refreshed_on_growth"] = 1``).

    A growing ``λ_max`` that stays below twice the cached one keeps the series convergent, just
    slower on the top directions, until the next refresh. ``info.extra["lambda_max_age"]`` is the
    number of earlier calls that used the same estimate (0: estimated in this call).
    """

    iters: int = 20
    alpha: float | Literal["auto"] = "auto"
    power_iters: int = 20
    max_growth: float = 10.0
    refresh_every: int = 10

    def __post_init__(self) -> None:
        positive_int("Neumann.iters", self.iters)
        positive_int("Neumann.power_iters", self.power_iters)
        positive_int("Neumann.refresh_every", self.refresh_every)
        if self.alpha != "auto":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or \
                    not (self.alpha > 0 and math.isfinite(self.alpha)):
                raise HypergradientError(f"Neumann.alpha must be a finite number > 0 or 'auto', "
                                         f"got {self.alpha!r}")
        if not self.max_growth > 1:
            raise HypergradientError(f"Neumann.max_growth must be > 1, got {self.max_growth!r}")

    def _estimate(self, op: HessianOperator, v: Tree) -> float:
        lam_max = linear.estimate_lambda_max(op, v, iters=self.power_iters)
        if not lam_max > 0:
            raise HypergradientError("Neumann(alpha='auto'): the estimated λ_max(H) is "
                                     f"{lam_max:g}; the Hessian is zero or not positive here. "
                                     "Pass an explicit alpha or use hg.CG.")
        return lam_max

    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        st = _carry(state)
        if self.alpha != "auto":
            s = linear.neumann(op, v, iters=self.iters, alpha=float(self.alpha), residual=residual,
                               max_growth=self.max_growth)
            return s.p, st, _stats(s)
        cached = st.lambda_max if (state is not None and state.method == "Neumann"
                                   and st.lambda_max is not None and st.lambda_max > 0
                                   and st.lambda_max_age + 1 < self.refresh_every) else None
        extra: dict[str, float] = {}
        if cached is not None:
            try:
                s = linear.neumann(op, v, iters=self.iters, alpha=1.0 / cached, residual=residual,
                                   max_growth=self.max_growth, stale_growth=1.0)
                s.extra.update({"lambda_max": cached, "lambda_max_age": float(st.lambda_max_age + 1)})
                return s.p, st.replace(lambda_max_age=st.lambda_max_age + 1), _stats(s)
            except linear.SeriesGrewError:
                extra["refreshed_on_growth"] = 1.0
        lam_max = self._estimate(op, v)
        s = linear.neumann(op, v, iters=self.iters, alpha=1.0 / lam_max, residual=residual,
                           max_growth=self.max_growth)
        s.extra.update({"lambda_max": lam_max, "lambda_max_age": 0.0, **extra})
        return s.p, st.replace(lambda_max=lam_max, lambda_max_age=0), _stats(s)


@dataclass(frozen=True)
class Identity(ImplicitMethod):
    """``p = scale · v``: ``H`` approximated by ``I/scale`` (T1−T2, Luketina et al. 2016). No HVPs."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise HypergradientError(f"Identity.scale must be a finite number, got {self.scale!r}")

    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        s = linear.identity(op, v, scale=self.scale, residual=residual)
        return s.p, _carry(state), _stats(s)


@dataclass(frozen=True)
class Nystrom(ImplicitMethod):
    """``p = (Ĥ + ρI)⁻¹ v`` with a rank-``rank`` randomized Nyström ``Ĥ`` (``rank`` HVPs, one batch).

    After Hataya & Yamada (2023), with a Gaussian sketch instead of sampled columns (Frangella,
    Tropp & Udell 2023), which captures the top of the spectrum far better per HVP. ``rho`` damps
    as ``(Ĥ + ρI)⁻¹``; ``rho=None`` instead sets the uncaptured spectrum to the smallest captured
    eigenvalue (see :func:`.kernels.symmetric.nystrom`). Good where H is low rank plus a small
    floor; on well-conditioned problems CG is better.

    ``floor=μ`` is for a Hessian that is low rank plus a *large* flat floor, ``H = A + μI`` (weight
    decay ``μ`` on an over-parameterised model): it sketches ``H − μI`` with the same HVPs and
    inverts ``Â + μI`` exactly, which equals ``H⁻¹`` when ``rank ≥ rank(A)``; the plain sketch
    would spend itself on ``μI``. ``μ`` must be at most ``λ_min(H)``. ``floor="auto"`` estimates
    μ from the sketch itself, no HVP (the smallest Ritz value of ``ΩᵀHΩ`` less its residual norm:
    the floor exactly when ``rank > rank(A)``), and falls back to the plain method where the
    sketch shows no floor. ``floor=None`` (default) is the plain method. The floor used is
    ``info.extra["floor"]`` (0 for a fallback). At equal HVPs CG is as accurate or better on a
    single solve (``docs/benchmarks.md``); Nyström's edge is one batched HVP call.

    With a state, the factored sketch is kept and reused by the next calls while it stays
    accurate. The check costs one HVP: the reused ``p`` gives the residual ``‖Hp − v‖/‖v‖``
    under the *current* H and v, which is compared with the residual the sketch had when fresh
    (measured then, one HVP, only when a state is carried); within ``reuse`` times that (default
    1.5) the reused ``p`` is returned (``rank`` HVPs saved, ``info.extra["sketch_reused"] = 1``,
    ``info.iterations = 0``), otherwise the call sketches afresh. ``reuse=None`` sketches at every
    call. Options that change the sketch (``rank``, ``rho``, ``seed``, ``floor``) also re-sketch.
    """

    rank: int = 20
    rho: float | None = None
    seed: int = 0
    floor: float | Literal["auto"] | None = None
    reuse: float | None = 1.5

    def __post_init__(self) -> None:
        positive_int("Nystrom.rank", self.rank)
        if self.rho is not None and not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise HypergradientError(f"Nystrom.rho must be > 0 or None (automatic), got {self.rho!r}")
        if self.floor is not None and self.floor != "auto" and (
                isinstance(self.floor, bool) or not isinstance(self.floor, (int, float))
                or not (self.floor > 0 and math.isfinite(self.floor))):
            raise HypergradientError(f"Nystrom.floor must be a finite number > 0, 'auto' or None, "
                                     f"got {self.floor!r}")
        if self.reuse is not None and (isinstance(self.reuse, bool) or not isinstance(
                self.reuse, (int, float)) or not (self.reuse >= 1 and math.isfinite(self.reuse))):
            raise HypergradientError(f"Nystrom.reuse must be a finite number >= 1 or None (never reuse), "
                                     f"got {self.reuse!r}")

    def _config(self) -> list[object]:
        return [self.rank, self.rho, self.seed, self.floor]

    def _reusable(self, st: SolverState, v: Tree) -> linear.NystromFactor | None:
        sk = st.sketch
        if self.reuse is None or sk is None or sk.get("config") != self._config() \
                or sk.get("residual") is None:
            return None  # nothing to reuse, or a sketch made with other options: sketch afresh
        U, like = sk["U"], tree.flatten(v)
        if not isinstance(U, torch.Tensor) or U.shape != (like.numel(), self.rank) or U.dtype != like.dtype:
            got = (f"{tuple(U.shape)}, {U.dtype}, {U.device}" if isinstance(U, torch.Tensor)
                   else type(U).__name__)
            raise StateMismatchError(
                f"hg.Nystrom: the state's sketch U has {got}, but these weights need "
                f"({like.numel()}, {self.rank}), {like.dtype}: it belongs to other weights. "
                "Pass a fresh hg.SolverState() for these weights.")
        # A state loaded on another device (CPU checkpoint, GPU weights): moved, not refused.
        return linear.NystromFactor(U.to(like.device), sk["d"].to(like.device), float(sk["c"]),
                                    dict(sk["extra"]))

    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        st = _carry(state)
        old = self._reusable(st, v) if state is not None else None
        if old is not None:
            p = old.apply(v)
            res = linear.relative_residual(op, p, v)
            if res <= self.reuse * st.sketch["residual"]:  # type: ignore[index]
                return p, st, Stats(0, res, None, {**old.extra, "sketch_reused": 1.0})
        f = linear.nystrom_factor(op, v, rank=self.rank, rho=self.rho, seed=self.seed, floor=self.floor)
        p = f.apply(v)
        res_fresh: float | None = None
        if residual or (state is not None and self.reuse is not None):
            # A carried state needs the fresh residual as the yardstick of later reuse.
            res_fresh = linear.relative_residual(op, p, v)
        sketch = {"U": f.U, "d": f.d, "c": f.c, "extra": dict(f.extra), "config": self._config(),
                  "residual": res_fresh}
        return p, st.replace(sketch=sketch), Stats(self.rank, res_fresh if residual else None, None,
                                                   dict(f.extra))


@dataclass(frozen=True)
class Auto(ImplicitMethod):
    """Let the library choose: conjugate gradient until ``p`` is accurate, warm-started.

    CG is the fastest implicit solver per unit of accuracy on SPD Hessians (it is optimal over
    the Krylov space that Neumann also searches), and unlike Neumann needs no step size. It stops
    when both

    * the relative residual ``‖Hp − v‖/‖v‖ ≤ tol`` (default 1e-2), and
    * the estimated relative error ``‖r‖/(θ_min‖p‖) ≤ error_tol`` (default 3e-2), where ``θ_min``
      is the smallest Ritz value of CG's own Lanczos tridiagonal (free: scalars CG computes
      anyway; see :func:`hypergradients.core.kernels.symmetric.cg`).

    The second rule is what keeps the default's promise, cosine ≥ 0.999 with the exact
    hypergradient, on ill-conditioned Hessians: since ``p − H⁻¹v = −H⁻¹r``, a residual of ``tol``
    allows a relative error up to ``cond(H)·tol``, and at ``cond(H) ≈ 1e3`` the residual rule
    alone gives cosines down to 0.9967. ``error_tol=3e-2`` is the loosest of 1e-1, 3e-2, 1e-2
    that kept every cosine ≥ 0.999 on logistic problems with ``cond(H)`` from 1e1 to 1e4 (worst
    0.99995; 1e-1 gave 0.99899): ``docs/benchmarks.md``, ``benchmarks/auto_tolerance.py``. On
    well-conditioned problems the first rule binds and nothing changes. ``error_tol=None``
    drops the second rule (CG to relative residual ``tol`` only); pass a smaller ``tol`` for
    reference values. With a :class:`~hypergradients.SolverState` it starts from the previous
    solution, which after a small hyper step usually meets both rules in a few HVPs, and keeps the
    Ritz extremes (``θ_min`` from a warm start's short run alone would be too large). If CG meets
    negative curvature (weights not at a minimum), it is rerun on ``H + δI`` with ``δ`` grown from
    ``2|dᵀHd|/dᵀd`` (the curvature found) until CG runs through, reported as
    ``info.extra["damping"]``: a Levenberg-style answer instead of an error.
    ``info.extra`` also has ``lambda_min``/``lambda_max`` (the Ritz extremes of ``H + δI``) and
    ``error_estimate``. Shares its state with :class:`CG`.
    """

    tol: float = 1e-2
    max_iters: int = 200
    error_tol: float | None = 3e-2

    shares_state_with: ClassVar[tuple[str, ...]] = ("CG",)

    def __post_init__(self) -> None:
        nonneg_float("Auto.tol", self.tol)
        positive_int("Auto.max_iters", self.max_iters)
        if self.error_tol is not None and (isinstance(self.error_tol, bool) or not isinstance(
                self.error_tol, (int, float)) or not (self.error_tol > 0 and math.isfinite(self.error_tol))):
            raise HypergradientError(f"Auto.error_tol must be a finite number > 0 or None, "
                                     f"got {self.error_tol!r}")

    def _cg(self, op: HessianOperator, v: Tree, x0: Tree | None, lambda_min: float | None) -> linear.Solve:
        def run(damping: float, start: Tree | None) -> linear.Solve:
            hint = None if lambda_min is None else lambda_min + damping
            return linear.cg(op.damped(damping), v, iters=self.max_iters, tol=self.tol, x0=start,
                             error_tol=self.error_tol, lambda_min=hint)

        try:
            return run(0.0, x0)
        except NegativeCurvatureError as e:
            curv = e.curvature
        # Rayleigh quotients under-estimate |λ_min|: grow δ until CG runs through (at most 40 doublings).
        damping = 0.0
        for _ in range(40):
            damping = 2.0 * (damping + abs(curv)) or 1e-8
            try:
                s = run(damping, None)
            except NegativeCurvatureError as e:
                curv = e.curvature
                continue
            s.extra["damping"] = damping
            return s
        raise HypergradientError(f"hg.Auto: the Hessian stays indefinite after damping {damping:.3g}; the "
                                 "weights are far from a minimum: train the inner problem further")

    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        st = _carry(state)
        x0 = st.warm(v, method="Auto")
        s = self._cg(op, v, x0, st.lambda_min if x0 is not None else None)
        if x0 is not None:
            s.extra["warm_start"] = 1.0
        return s.p, _remember_curvature(st.replace(p=tree.detach(s.p)), s.extra), _stats(s)


def _remember_curvature(state: SolverState, extra: dict[str, float]) -> SolverState:
    """Keep the last solve's extreme Ritz values of ``H`` (those of ``H + δI`` less ``δ``).

    A warm-started solve already reports the smaller of its own ``θ_min`` and the one it was
    given, so this carries the estimate forward. A non-positive ``θ_min − δ`` (H indefinite, the
    solve was damped) is not kept: it would make the error rule unsatisfiable on later calls.
    """
    if "lambda_min" not in extra:
        return state
    damping = extra.get("damping", 0.0)
    lo = extra["lambda_min"] - damping
    if lo > 0:
        return state.replace(lambda_min=lo, lambda_max=extra.get("lambda_max", extra["lambda_min"]) - damping)
    return state
