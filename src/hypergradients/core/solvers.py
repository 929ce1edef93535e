"""The implicit methods: one class per linear solver, each a ``solve(op, v, state)``.

Each class is a frozen record of its options plus :meth:`solve` (the protocol of
:class:`~hypergradients.ImplicitMethod`); the numerical kernels are in
:mod:`hypergradients.core.kernels`. Every method serves both doors: ``hypergradient`` (``op`` the
Hessian ``H``) and ``root_hypergradient`` (``op = (∂F/∂w)ᵀ``), except that CG, Auto and Nyström need a
symmetric positive (semi-)definite operator and MINRES a symmetric one (``requires``).

| method | solves | needs | state |
|---|---|---|---|
| :class:`Exact` | dense ``(M + δI)p = v`` | ``n ≤ max_size`` | none |
| :class:`CG` | conjugate gradient on ``(M + δI)p = v`` | symmetric positive definite | ``CGState`` |
| :class:`Auto` | CG to an accuracy it picks, damped where ``M`` is indefinite | symmetric | ``CGState`` |
| :class:`Neumann` | ``α Σ_{j<K} (I − αM)^j v`` | spectral radius of ``I − αM`` below 1 | ``NeumannState`` |
| :class:`Identity` | ``p = s·v``, or ``s·v/D`` with an optimizer's diagonal ``D`` | nothing | none |
| :class:`Nystrom` | low-rank ``(M̂ + ρI)⁻¹v`` | symmetric positive semi-definite | ``NystromState`` |
| :class:`MINRES` | minimal residual, Lanczos | symmetric (indefinite allowed) | ``KrylovState`` |
| :class:`GMRES` | minimal residual, Arnoldi, restarted | non-singular | ``KrylovState`` |
| :class:`BiCGStab` | BiCGStab | non-singular | ``KrylovState`` |
| :class:`NormalCG` | CG on the normal equations (CGLS) | the transpose product too | ``KrylovState`` |

(the states are in :mod:`hypergradients.core.state`)

A state carries what makes the next, nearby solve cheaper: the last ``p`` (a warm start for the
Krylov methods), Auto's Ritz extremes of ``H``, Neumann's power-iteration ``λ_max`` (re-estimated
every ``refresh_every`` calls or as soon as the series grows), Nyström's sketch (re-sketched once
its residual has grown).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from . import tree
from .errors import (
    HypergradientError,
    IndefiniteHessianWarning,
    NegativeCurvatureError,
    NeumannDivergenceError,
    warn_user,
)
from .info import Stats
from .kernels import dense, krylov, nystrom, series
from .kernels.solve import Solve, relative_residual
from .method import ImplicitMethod, nonneg_float, positive_int
from .operators import LinearOperator
from .state import CGState, KrylovState, NeumannState, NystromState, SolverState, StateMismatchError
from .tree import Tree

__all__ = ["CG", "GMRES", "MINRES", "Auto", "BiCGStab", "Exact", "Identity", "Neumann", "NormalCG", "Nystrom"]


def _stats(s: Solve) -> Stats:
    return Stats(s.iterations, s.residual, s.converged, s.extra)


@dataclass(frozen=True)
class Exact(ImplicitMethod):
    """``p = (M + δI)⁻¹ v`` by a dense solve; ``M`` built from n products. Refuses above ``max_size`` weights.

    For a Hessian the solve is a Cholesky factorisation, which also tells whether ``H + δI`` is
    positive definite (the weights a minimum) at no extra cost. Where it is not, ``p`` comes from an
    LU solve (the derivative of a stationary point that is not a minimum), ``info.converged`` is
    False, ``info.extra`` has ``positive_definite = 0`` and ``lambda_min`` (its smallest eigenvalue),
    and an :class:`~hypergradients.IndefiniteHessianWarning` names the damping that would make it
    definite. A non-symmetric ``(∂F/∂w)ᵀ`` (``root_hypergradient``) is solved by LU.
    """

    damping: float = 0.0
    max_size: int = 5000

    def __post_init__(self) -> None:
        nonneg_float("Exact.damping", self.damping)
        positive_int("Exact.max_size", self.max_size)

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        s = dense.exact(op.damped(self.damping), v, max_size=self.max_size)
        if s.converged is False:
            lo = s.extra["lambda_min"]
            warn_user(
                f"hg.Exact: H + δI (δ = {self.damping:g}) is not positive definite at these weights "
                f"(smallest eigenvalue {lo:.3g}): they are not a minimum of inner_loss, which the implicit "
                "hypergradient assumes (info.grad_norm is ‖∂L_T/∂w‖ there; info.converged is False). Train "
                f"the inner problem further, or damp: hg.Exact(damping=...) above "
                f"{max(0.0, self.damping - lo):.3g}.",
                IndefiniteHessianWarning,
            )
        return s.p, self.own_state(state), _stats(s)


@dataclass(frozen=True)
class CG(ImplicitMethod):
    """Conjugate gradient on ``(H + δI) p = v``: at most ``iters`` products, stops at ``‖r‖ ≤ tol‖v‖``.

    Needs ``H + δI`` positive definite: a direction with ``dᵀ(H + δI)d ≤ 0`` raises
    :class:`~hypergradients.NegativeCurvatureError` (``.curvature``, the Rayleigh quotient
    found, and ``.iteration``) and returns no hypergradient: a partial CG solution is not an
    approximation of ``H⁻¹v`` once the curvature is not positive. :meth:`safer` is then CG with
    the damping of :meth:`~hypergradients.NegativeCurvatureError.damping_beyond`; :class:`Auto`
    retries so by itself, :class:`MINRES` solves the indefinite system undamped. With a state it
    starts from the previous ``p`` (one product for the initial residual;
    ``info.extra["warm_start"] = 1``). Shares its state with :class:`Auto`.
    """

    iters: int = 50
    tol: float = 1e-10
    damping: float = 0.0

    state_type: ClassVar[type[SolverState]] = CGState
    shares_state_with: ClassVar[tuple[str, ...]] = ("Auto",)
    requires: ClassVar[str | None] = "symmetric positive-definite"

    def __post_init__(self) -> None:
        positive_int("CG.iters", self.iters)
        nonneg_float("CG.tol", self.tol)
        nonneg_float("CG.damping", self.damping)

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        st = self.own_state(state)
        assert isinstance(st, CGState)
        x0 = st.warm_start(v, method="CG")
        s = krylov.cg(op.damped(self.damping), v, iters=self.iters, tol=self.tol, x0=x0)
        if x0 is not None:
            s.extra["warm_start"] = 1.0
        return s.p, st.replace(p=tree.detach(s.p)), _stats(s)

    def safer(self, error: HypergradientError) -> CG | None:
        """CG on ``H + δ'I`` with ``δ'`` beyond the negative curvature ``error`` found; ``None`` for
        other failures."""
        if not isinstance(error, NegativeCurvatureError):
            return None
        return dataclasses.replace(self, damping=error.damping_beyond(self.damping))


@dataclass(frozen=True)
class Neumann(ImplicitMethod):
    """``p = α Σ_{j=0}^{K−1} (I − αM)^j v`` with ``K = iters`` (Lorraine et al. 2020, Algorithm 3).

    Exactly K terms, the factor ``α`` included (``K−1`` products). ``alpha="auto"`` estimates
    ``λ_max(H)`` by ``power_iters`` power iterations and uses ``α = 1/λ_max``, safely inside the
    convergence region ``0 < α < 2/λ_max``; for a fixed point ``w = T(w, λ)``
    (``root_hypergradient(fixed_point=True)``) it is ``α = 1``, the classic series
    ``Σ_j (∂T/∂w)ᵀʲ v``, convergent when ``T`` is a contraction. A diverging series raises
    :class:`~hypergradients.NeumannDivergenceError` with the estimated ``λ_max`` and a safe α;
    :meth:`safer` halves α (never above that safe one).

    With a state (consecutive calls, e.g. the hyper steps of a training run), ``alpha="auto"``
    keeps ``λ_max`` there and reuses it, saving the ``power_iters`` products, until either

    * ``refresh_every`` calls have used it (default 10; 1 estimates at every call, as without a
      state), or
    * the series grows: a checked term ``(I − αH)^j v`` longer than ``v``. For SPD ``H`` that
      happens exactly when ``α = 1/λ_cached ≥ 2/λ_max(H)`` (the Hessian's top has more than
      doubled), so the cached α would diverge; ``λ_max`` is then re-estimated and the series
      rerun (the products of the failed one are spent; ``info.extra["refreshed_on_growth"] = 1``).

    A growing ``λ_max`` that stays below twice the cached one keeps the series convergent, just
    slower on the top directions, until the next refresh. ``info.extra["lambda_max_age"]`` is the
    number of earlier calls that used the same estimate (0: estimated in this call).
    """

    iters: int = 20
    alpha: float | Literal["auto"] = "auto"
    power_iters: int = 20
    max_growth: float = 10.0
    refresh_every: int = 10

    state_type: ClassVar[type[SolverState]] = NeumannState

    def __post_init__(self) -> None:
        positive_int("Neumann.iters", self.iters)
        positive_int("Neumann.power_iters", self.power_iters)
        positive_int("Neumann.refresh_every", self.refresh_every)
        if self.alpha != "auto":
            if (
                isinstance(self.alpha, bool)
                or not isinstance(self.alpha, (int, float))
                or not (self.alpha > 0 and math.isfinite(self.alpha))
            ):
                raise HypergradientError(
                    f"Neumann.alpha must be a finite number > 0 or 'auto', got {self.alpha!r}"
                )
        if not self.max_growth > 1:
            raise HypergradientError(f"Neumann.max_growth must be > 1, got {self.max_growth!r}")

    def _estimate(self, op: LinearOperator, v: Tree) -> float:
        lam_max = series.power_iteration(op, v, iters=self.power_iters)
        if not lam_max > 0:
            if op.symmetric:
                raise HypergradientError(
                    f"Neumann(alpha='auto'): the estimated λ_max({op.name}) is "
                    f"{lam_max:g}; the Hessian is zero or not positive here. "
                    "Pass an explicit alpha or use hg.CG."
                )
            raise HypergradientError(
                "Neumann(alpha='auto'): the dominant eigenvalue of ∂F/∂w is estimated "
                f"as {lam_max:g}; pass an explicit alpha or use hg.GMRES"
            )
        return lam_max

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        st = self.own_state(state)
        assert isinstance(st, NeumannState)
        if self.alpha != "auto" or op.fixed_point:
            alpha = 1.0 if self.alpha == "auto" else float(self.alpha)
            s = series.neumann(
                op, v, iters=self.iters, alpha=alpha, residual=residual, max_growth=self.max_growth
            )
            return s.p, st, _stats(s)
        cached = (
            st.lambda_max
            if (
                state is not None
                and st.lambda_max is not None
                and st.lambda_max > 0
                and st.lambda_max_age + 1 < self.refresh_every
            )
            else None
        )
        extra: dict[str, float] = {}
        if cached is not None:
            try:
                s = series.neumann(
                    op,
                    v,
                    iters=self.iters,
                    alpha=1.0 / cached,
                    residual=residual,
                    max_growth=self.max_growth,
                    stale_growth=1.0,
                )
                s.extra.update({"lambda_max": cached, "lambda_max_age": float(st.lambda_max_age + 1)})
                return s.p, st.replace(lambda_max_age=st.lambda_max_age + 1), _stats(s)
            except series.SeriesGrewError:
                extra["refreshed_on_growth"] = 1.0
        lam_max = self._estimate(op, v)
        s = series.neumann(
            op, v, iters=self.iters, alpha=1.0 / lam_max, residual=residual, max_growth=self.max_growth
        )
        s.extra.update({"lambda_max": lam_max, "lambda_max_age": 0.0, **extra})
        return s.p, st.replace(lambda_max=lam_max, lambda_max_age=0), _stats(s)

    def safer(self, error: HypergradientError) -> Neumann | None:
        """The same series with half the ``α`` (the estimated safe ``1/λ_max`` at most), after a
        divergence; ``None`` once ``α`` is far below the safe one (the operator is indefinite and no
        ``α`` makes the series converge) or for other failures."""
        if not (
            isinstance(error, NeumannDivergenceError)
            and math.isfinite(error.safe_alpha)
            and error.safe_alpha > 0
        ):
            return None
        safe = error.safe_alpha
        alpha = safe if self.alpha == "auto" else float(self.alpha)
        if alpha <= safe / 2**8:
            return None
        return dataclasses.replace(self, alpha=min(safe, alpha / 2))


INNER_OPTIMIZER = "inner_optimizer"
Precondition = Mapping[str, Tensor] | Literal["inner_optimizer"] | None


@dataclass(frozen=True)
class Identity(ImplicitMethod):
    """``p = scale · v``: ``M`` approximated by ``I/scale`` (T1−T2, Luketina et al. 2016). No products.

    ``precondition``: a diagonal ``D`` (a dict of positive tensors keyed and shaped like the weights)
    for ``M ≈ diag(D)/scale``, so ``p = scale · v / D`` elementwise. With the diagonal an optimizer's
    update divides by, ``p`` is that optimizer's own step applied to ``v``: for Adam
    ``D = (sqrt(v̂) + eps)/lr`` (:func:`~hypergradients.adam_diagonal`) and
    ``p = lr·v/(sqrt(v̂) + eps)``, SAMA's "algorithmic adaptation" (Choe et al. 2023). Entries may
    be ``inf`` (a learning rate of 0 gives ``p = 0`` there), not 0 or NaN; they are cast to the
    dtype and device of ``v``. ``precondition="inner_optimizer"`` asks the training loop for that
    diagonal at every hyper step: :class:`~hypergradients.HyperOptimizer` (given
    ``inner_optimizer=``) and :func:`~hypergradients.fit` read the model's ``torch.optim.Adam`` or
    ``AdamW`` state then (:meth:`~hypergradients.Method.with_inner_optimizer`);
    :func:`~hypergradients.hypergradient` refuses it, having no optimizer to read. With a diagonal,
    ``info.extra["preconditioned"]`` is 1. Still no products.
    """

    scale: float = 1.0
    precondition: Precondition = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise HypergradientError(f"Identity.scale must be a finite number, got {self.scale!r}")
        d = self.precondition
        if d is None or (isinstance(d, str) and d == INNER_OPTIMIZER):
            return
        if not isinstance(d, Mapping):
            raise HypergradientError(
                "Identity.precondition must be a dict of positive tensors keyed like the weights (e.g. "
                f"hg.adam_diagonal(optimizer, model)), {INNER_OPTIMIZER!r} or None, got {d!r:.80}"
            )
        for k, t in d.items():
            if not isinstance(k, str) or not isinstance(t, Tensor) or not t.is_floating_point():
                raise HypergradientError(
                    f"Identity.precondition[{k!r}] must be a floating-point tensor "
                    f"keyed by a weight's name, got {type(t).__name__}"
                )
            if not bool((t > 0).all()):  # NaN fails this too
                bad = t[~(t > 0)].reshape(-1)[0]
                raise HypergradientError(
                    f"Identity.precondition[{k!r}] has the entry {float(bad)!r}: the diagonal must be > 0 "
                    "(it divides v); an optimizer's diagonal is (sqrt(v̂) + eps)/lr, positive when eps > 0"
                )

    def __repr__(self) -> str:
        d = self.precondition
        if d is None:
            return f"Identity(scale={self.scale!r})"
        what = repr(d) if isinstance(d, str) else f"<diagonal of {len(d)} tensors>"
        return f"Identity(scale={self.scale!r}, precondition={what})"

    def with_inner_optimizer(self, diagonal: Callable[[], Mapping[str, Tensor]]) -> Identity:
        """With ``precondition="inner_optimizer"``: this method with ``diagonal()`` as its diagonal."""
        if not isinstance(self.precondition, str):
            return self
        return dataclasses.replace(self, precondition=dict(diagonal()))

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        d = self.precondition
        if isinstance(d, str):
            raise HypergradientError(
                f"hg.Identity(precondition={INNER_OPTIMIZER!r}) reads the model's optimizer, which only a "
                "training loop has: use it with hg.HyperOptimizer(..., inner_optimizer=opt) or hg.fit. Here "
                "pass the diagonal itself: hg.Identity(precondition=hg.adam_diagonal(opt, model))"
            )
        diagonal = None if d is None else _diagonal_like(d, v)
        s = series.identity(op, v, scale=self.scale, residual=residual, diagonal=diagonal)
        if diagonal is not None:
            s.extra["preconditioned"] = 1.0
        return s.p, self.own_state(state), _stats(s)


def _diagonal_like(d: Mapping[str, Tensor], v: Tree) -> Tree:
    """``d`` with the keys and shapes of ``v``, on its dtypes and devices (errors name the key)."""
    if d.keys() != v.keys():
        missing, extra = sorted(v.keys() - d.keys()), sorted(d.keys() - v.keys())
        raise HypergradientError(
            f"Identity.precondition has keys {sorted(d)} but the weights have {sorted(v)} (missing "
            f"{missing}, unexpected {extra}): give one diagonal per weight, keyed like params"
        )
    for k, t in d.items():
        if t.shape != v[k].shape:
            raise HypergradientError(
                f"Identity.precondition[{k!r}] has shape {tuple(t.shape)} but the "
                f"weight {k!r} has {tuple(v[k].shape)}"
            )
    return {k: d[k].to(dtype=v[k].dtype, device=v[k].device) for k in v}


@dataclass(frozen=True)
class Nystrom(ImplicitMethod):
    """``p = (Ĥ + ρI)⁻¹ v`` with a rank-``rank`` randomized Nyström ``Ĥ`` (``rank`` products, one batch).

    After Hataya & Yamada (2023), with a Gaussian sketch instead of sampled columns (Frangella,
    Tropp & Udell 2023), which captures the top of the spectrum far better per product. ``rho``
    damps as ``(Ĥ + ρI)⁻¹``; ``rho=None`` instead sets the uncaptured spectrum to the smallest
    captured eigenvalue (see :func:`.kernels.nystrom.nystrom`). Good where H is low rank plus a small
    floor; on well-conditioned problems CG is better.

    ``floor=μ`` is for a Hessian that is low rank plus a *large* flat floor, ``H = A + μI`` (weight
    decay ``μ`` on an over-parameterised model): it sketches ``H − μI`` with the same products and
    inverts ``Â + μI`` exactly, which equals ``H⁻¹`` when ``rank ≥ rank(A)``; the plain sketch
    would spend itself on ``μI``. ``μ`` must be at most ``λ_min(H)``. ``floor="auto"`` estimates
    μ from the sketch itself, no product (the smallest Ritz value of ``ΩᵀHΩ`` less its residual
    norm: the floor exactly when ``rank > rank(A)``), and falls back to the plain method where the
    sketch shows no floor. ``floor=None`` (default) is the plain method. The floor used is
    ``info.extra["floor"]`` (0 for a fallback). How it compares with CG at equal products is
    measured in ``docs/benchmarks.md``; Nyström's edge is one batched product call.

    With a state, the factored sketch is kept and reused by the next calls while it stays
    accurate. The check costs one product: the reused ``p`` gives the residual ``‖Hp − v‖/‖v‖``
    under the *current* H and v, which is compared with the residual the sketch had when fresh
    (measured then, one product, only when a state is carried); within ``reuse`` times that
    (default 1.5) the reused ``p`` is returned (``rank`` products saved,
    ``info.extra["sketch_reused"] = 1``, ``info.iterations = 0``), otherwise the call sketches afresh.
    ``reuse=None`` sketches at every call. Options that change the sketch (``rank``, ``rho``,
    ``seed``, ``floor``) also re-sketch.
    """

    rank: int = 20
    rho: float | None = None
    seed: int = 0
    floor: float | Literal["auto"] | None = None
    reuse: float | None = 1.5

    state_type: ClassVar[type[SolverState]] = NystromState
    requires: ClassVar[str | None] = "symmetric positive semi-definite"

    def __post_init__(self) -> None:
        positive_int("Nystrom.rank", self.rank)
        if self.rho is not None and not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise HypergradientError(f"Nystrom.rho must be > 0 or None (automatic), got {self.rho!r}")
        if (
            self.floor is not None
            and self.floor != "auto"
            and (
                isinstance(self.floor, bool)
                or not isinstance(self.floor, (int, float))
                or not (self.floor > 0 and math.isfinite(self.floor))
            )
        ):
            raise HypergradientError(
                f"Nystrom.floor must be a finite number > 0, 'auto' or None, got {self.floor!r}"
            )
        if self.reuse is not None and (
            isinstance(self.reuse, bool)
            or not isinstance(self.reuse, (int, float))
            or not (self.reuse >= 1 and math.isfinite(self.reuse))
        ):
            raise HypergradientError(
                f"Nystrom.reuse must be a finite number >= 1 or None (never reuse), got {self.reuse!r}"
            )

    def _config(self) -> list[object]:
        return [self.rank, self.rho, self.seed, self.floor]

    def _reusable(self, st: NystromState, v: Tree) -> nystrom.NystromFactor | None:
        sk = st.sketch
        if (
            self.reuse is None
            or sk is None
            or sk.get("config") != self._config()
            or sk.get("residual") is None
        ):
            return None  # nothing to reuse, or a sketch made with other options: sketch afresh
        U, like = sk["U"], tree.flatten(v)
        if not isinstance(U, torch.Tensor) or U.shape != (like.numel(), self.rank) or U.dtype != like.dtype:
            got = (
                f"{tuple(U.shape)}, {U.dtype}, {U.device}"
                if isinstance(U, torch.Tensor)
                else type(U).__name__
            )
            raise StateMismatchError(
                f"hg.Nystrom: the state's sketch U has {got}, but these weights need "
                f"({like.numel()}, {self.rank}), {like.dtype}: it belongs to other weights. "
                "Pass a fresh hg.SolverState() for these weights."
            )
        # A state loaded on another device (CPU checkpoint, GPU weights): moved, not refused.
        return nystrom.NystromFactor(
            U.to(like.device), sk["d"].to(like.device), float(sk["c"]), dict(sk["extra"])
        )

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        st = self.own_state(state)
        assert isinstance(st, NystromState)
        old = self._reusable(st, v) if state is not None else None
        if old is not None:
            p = old.apply(v)
            res = relative_residual(op, p, v)
            if res <= self.reuse * st.sketch["residual"]:  # type: ignore[index]
                return p, st, Stats(0, res, None, {**old.extra, "sketch_reused": 1.0})
        f = nystrom.nystrom_factor(op, v, rank=self.rank, rho=self.rho, seed=self.seed, floor=self.floor)
        p = f.apply(v)
        res_fresh: float | None = None
        if residual or (state is not None and self.reuse is not None):
            # A carried state needs the fresh residual as the yardstick of later reuse.
            res_fresh = relative_residual(op, p, v)
        sketch = {
            "U": f.U,
            "d": f.d,
            "c": f.c,
            "extra": dict(f.extra),
            "config": self._config(),
            "residual": res_fresh,
        }
        return (
            p,
            st.replace(sketch=sketch),
            Stats(self.rank, res_fresh if residual else None, None, dict(f.extra)),
        )


@dataclass(frozen=True)
class Auto(ImplicitMethod):
    """Let the library choose: conjugate gradient until ``p`` is accurate, warm-started.

    CG is the fastest implicit solver per unit of accuracy on SPD Hessians (it is optimal over
    the Krylov space that Neumann also searches), and unlike Neumann needs no step size. It stops
    when both

    * the relative residual ``‖Hp − v‖/‖v‖ ≤ tol`` (default 1e-2), and
    * the estimated relative error ``‖r‖/(θ_min‖p‖) ≤ error_tol`` (default 3e-2), where ``θ_min``
      is the smallest Ritz value of CG's own Lanczos tridiagonal (free: scalars CG computes
      anyway; see :func:`hypergradients.core.kernels.krylov.cg`).

    The second rule is what keeps the default's promise, cosine ≥ 0.999 with the exact
    hypergradient, on ill-conditioned Hessians: since ``p − H⁻¹v = −H⁻¹r``, a residual of ``tol``
    allows a relative error up to ``cond(H)·tol``. ``error_tol=3e-2`` is the loosest setting that
    kept the promise on logistic problems with ``cond(H)`` from 1e1 to 1e4
    (``benchmarks/auto_tolerance.py``; the figures are in ``docs/benchmarks.md``). On
    well-conditioned problems the first rule binds and nothing changes. ``error_tol=None``
    drops the second rule (CG to relative residual ``tol`` only); pass a smaller ``tol`` for
    reference values. With a state it starts from the previous solution, which after a small hyper
    step usually meets both rules in a few products, and keeps the Ritz extremes (``θ_min`` from a
    warm start's short run alone would be too large). If CG meets negative curvature (weights not
    at a minimum), it is rerun on ``H + δI`` with ``δ`` from
    :meth:`~hypergradients.NegativeCurvatureError.damping_beyond`, grown until CG runs through,
    reported as ``info.extra["damping"]``: a Levenberg-style answer instead of an error.
    ``info.extra`` also has ``lambda_min``/``lambda_max`` (the Ritz extremes of ``H + δI``) and
    ``error_estimate``. Shares its state with :class:`CG`.
    """

    tol: float = 1e-2
    max_iters: int = 200
    error_tol: float | None = 3e-2

    state_type: ClassVar[type[SolverState]] = CGState
    shares_state_with: ClassVar[tuple[str, ...]] = ("CG",)
    requires: ClassVar[str | None] = "symmetric positive-definite"

    def __post_init__(self) -> None:
        nonneg_float("Auto.tol", self.tol)
        positive_int("Auto.max_iters", self.max_iters)
        if self.error_tol is not None and (
            isinstance(self.error_tol, bool)
            or not isinstance(self.error_tol, (int, float))
            or not (self.error_tol > 0 and math.isfinite(self.error_tol))
        ):
            raise HypergradientError(
                f"Auto.error_tol must be a finite number > 0 or None, got {self.error_tol!r}"
            )

    def _cg(self, op: LinearOperator, v: Tree, x0: Tree | None, lambda_min: float | None) -> Solve:
        def run(damping: float, start: Tree | None) -> Solve:
            hint = None if lambda_min is None else lambda_min + damping
            return krylov.cg(
                op.damped(damping),
                v,
                iters=self.max_iters,
                tol=self.tol,
                x0=start,
                error_tol=self.error_tol,
                lambda_min=hint,
            )

        try:
            return run(0.0, x0)
        except NegativeCurvatureError as e:
            err = e
        damping = 0.0
        for _ in range(40):
            damping = err.damping_beyond(damping)
            try:
                s = run(damping, None)
            except NegativeCurvatureError as e:
                err = e
                continue
            s.extra["damping"] = damping
            return s
        raise HypergradientError(
            f"hg.Auto: the Hessian stays indefinite after damping {damping:.3g}; the "
            "weights are far from a minimum: train the inner problem further"
        )

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        st = self.own_state(state)
        assert isinstance(st, CGState)
        x0 = st.warm_start(v, method="Auto")
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


class _Krylov(ImplicitMethod):
    """The solvers that keep only a warm start: MINRES, GMRES, BiCGStab, NormalCG."""

    state_type: ClassVar[type[SolverState]] = KrylovState

    @abc.abstractmethod
    def _kernel(self, op: LinearOperator, v: Tree, x0: Tree | None) -> Solve:
        """The kernel's solve of ``op p = v`` from ``x0`` (``None``: from zero)."""

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        st = self.own_state(state)
        assert isinstance(st, KrylovState)
        x0 = st.warm_start(v, method=type(self).__name__)
        s = self._kernel(op, v, x0)
        if x0 is not None:
            s.extra["warm_start"] = 1.0
        return s.p, st.replace(p=tree.detach(s.p)), _stats(s)


@dataclass(frozen=True)
class MINRES(_Krylov):
    """MINRES on a symmetric ``M p = v``, indefinite allowed: at most ``iters`` products (plus one per
    pass for the true residual), stopping at ``‖r‖ ≤ tol·‖v‖``.

    The method for a Hessian that is not positive definite: weights at a saddle, or not yet at a
    minimum. CG breaks down there and damping changes the answer; MINRES (Paige & Saunders 1975)
    minimises the residual over the same Krylov space as CG without needing definiteness, so it
    returns the derivative of the stationary point as it is (what :class:`Exact` computes densely).
    One product per iteration and constant memory (seven trees). A singular ``H`` (a flat
    direction) gives a minimal-residual answer. Needs a symmetric operator: for
    ``root_hypergradient`` a condition declared ``symmetric=True``. See
    :func:`hypergradients.core.kernels.krylov.minres`.
    """

    iters: int = 200
    tol: float = 1e-10

    requires: ClassVar[str | None] = "symmetric"

    def __post_init__(self) -> None:
        positive_int("MINRES.iters", self.iters)
        nonneg_float("MINRES.tol", self.tol)

    def _kernel(self, op: LinearOperator, v: Tree, x0: Tree | None) -> Solve:
        return krylov.minres(op, v, iters=self.iters, tol=self.tol, x0=x0)


@dataclass(frozen=True)
class GMRES(_Krylov):
    """Restarted GMRES on ``M p = v``: at most ``iters`` products (plus one per restart for the true
    residual), restarting every ``restart``, stopping at ``‖r‖ ≤ tol·‖v‖``.

    Any non-singular ``M``, symmetric or not, definite or not; the residual falls monotonically.
    The default of ``root_hypergradient`` (``M = (∂F/∂w)ᵀ``); on a Hessian at a saddle it solves the
    indefinite system as :class:`MINRES` does, at more memory: ``restart + 1`` trees the size of the
    weights. See :func:`hypergradients.core.kernels.krylov.gmres`.
    """

    iters: int = 200
    tol: float = 1e-10
    restart: int = 30

    def __post_init__(self) -> None:
        positive_int("GMRES.iters", self.iters)
        nonneg_float("GMRES.tol", self.tol)
        positive_int("GMRES.restart", self.restart)

    def _kernel(self, op: LinearOperator, v: Tree, x0: Tree | None) -> Solve:
        return krylov.gmres(op, v, iters=self.iters, tol=self.tol, restart=self.restart, x0=x0)


@dataclass(frozen=True)
class BiCGStab(_Krylov):
    """BiCGStab on ``M p = v``: at most ``iters`` iterations of two products each.

    Constant memory (seven trees); the residual is not monotone and the method can break down
    (it then restarts from the true residual). See :func:`hypergradients.core.kernels.krylov.bicgstab`.
    """

    iters: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        positive_int("BiCGStab.iters", self.iters)
        nonneg_float("BiCGStab.tol", self.tol)

    def _kernel(self, op: LinearOperator, v: Tree, x0: Tree | None) -> Solve:
        return krylov.bicgstab(op, v, iters=self.iters, tol=self.tol, x0=x0)


@dataclass(frozen=True)
class NormalCG(_Krylov):
    """CG on the normal equations of ``M p = v`` (CGLS): a product with ``M`` and one with ``Mᵀ`` per
    iteration.

    Minimises the residual monotonically for any ``M``, singular included, but converges at the
    rate of CG on ``cond(M)²``: the fallback where GMRES stagnates. On a Hessian both products are
    Hessian-vector products. On a root condition ``M = (∂F/∂w)ᵀ`` and ``Mᵀx = (∂F/∂w)x`` is a
    forward-mode JVP (``torch.autograd.forward_ad``); where forward mode fails (an operation without
    a forward-mode formula; PyTorch's "ZeroTensors are immutable" bug in ``F.mse_loss``'s mean
    reduction) it is computed in reverse mode instead, as ``(∂F/∂w)x = ∂/∂u ⟨(∂F/∂w)ᵀu, x⟩`` (a VJP
    of a VJP, one backward pass each after a graph built once), which needs a second derivative of
    the condition; ``info.extra["double_vjp"]`` is then 1. See :func:`.kernels.krylov.cgls`.
    """

    iters: int = 200
    tol: float = 1e-10

    def __post_init__(self) -> None:
        positive_int("NormalCG.iters", self.iters)
        nonneg_float("NormalCG.tol", self.tol)

    def _kernel(self, op: LinearOperator, v: Tree, x0: Tree | None) -> Solve:
        return krylov.cgls(op, v, iters=self.iters, tol=self.tol, x0=x0)
