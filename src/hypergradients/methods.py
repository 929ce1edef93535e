"""The method objects and :func:`hypergradient`, the one call behind every method.

Conventions. Weights ``w``, hyperparameters ``λ``, inner loss
``L_T(w, λ)``, outer loss ``L_V(w, λ)``. The hypergradient, the direction to *descend*, is

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p,     p ≈ H⁻¹ ∂L_V/∂w,   H = ∂²L_T/∂w∂wᵀ at (w, λ).

Implicit methods (implicit function theorem at the given weights, taken as ``w*``) differ only
in how ``p`` is found: :class:`Exact`, :class:`CG`, :class:`Neumann`, :class:`Identity`,
:class:`Nystrom`, and :class:`Auto`, which picks a solver and tolerance for the user. The mixed
partial is never formed: ``p`` enters one vector-Jacobian product. :class:`Unrolled` (reverse
mode, optionally checkpointed) and :class:`Forward` (forward mode) instead differentiate K steps
of gradient descent from the given weights.

Consecutive hypergradients (Algorithm 1) can share a :class:`SolverState`: CG and Auto then start
from the previous solve's ``p``, which after a small step of ``w`` and ``λ`` is already close.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor

from . import linear, tree
from .derivatives import HvpMode, InnerDerivatives, LossFn, grad, scalar_loss, used_keys
from .errors import HypergradientError, NegativeCurvatureError, PathOnlyHyperparameterError
from .state import SolverState, StateMismatchError
from .tree import Tree
from .unroll import checkpoint_interval
from .unroll import forward as forward_path
from .unroll import reverse as reverse_path


class UnusedHyperparameterWarning(UserWarning):
    """A hyperparameter affects neither ``∂L_T/∂w`` nor ``L_V``: its hypergradient is zero."""


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HypergradientError(f"{name} must be a positive integer, got {value!r}")


def _nonneg_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and
                                                                          math.isfinite(value)):
        raise HypergradientError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Exact:
    """``p = (H + δI)⁻¹ v`` by a dense solve; ``H`` built from n HVPs. Refuses above ``max_size`` weights."""

    damping: float = 0.0
    max_size: int = 5000

    def __post_init__(self) -> None:
        _nonneg_float("Exact.damping", self.damping)
        _positive_int("Exact.max_size", self.max_size)


@dataclass(frozen=True)
class CG:
    """Conjugate gradient on ``(H + δI) p = v``: at most ``iters`` HVPs, stops at ``‖r‖ ≤ tol‖v‖``.

    Needs ``H + δI`` positive definite: a direction with ``dᵀ(H + δI)d ≤ 0`` raises
    :class:`~hypergradients.errors.NegativeCurvatureError` (``.curvature``, the Rayleigh quotient
    found, and ``.iteration``) and returns no hypergradient: a partial CG solution is not an
    approximation of ``H⁻¹v`` once the curvature is not positive. :class:`Auto` instead retries
    with damping; the trainer's ``on_solver_error`` decides there.
    """

    iters: int = 50
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self) -> None:
        _positive_int("CG.iters", self.iters)
        _nonneg_float("CG.tol", self.tol)
        _nonneg_float("CG.damping", self.damping)


@dataclass(frozen=True)
class Neumann:
    """``p = α Σ_{j=0}^{K−1} (I − αH)^j v`` with ``K = iters`` (Lorraine et al. 2020, Algorithm 3).

    Exactly K terms, the factor ``α`` included (``K−1`` HVPs). ``alpha="auto"`` estimates
    ``λ_max(H)`` by ``power_iters`` power iterations and uses ``α = 1/λ_max``, safely inside the
    convergence region ``0 < α < 2/λ_max``. A diverging series raises
    :class:`~hypergradients.errors.NeumannDivergenceError` with the estimated ``λ_max`` and a safe α.
    """

    iters: int = 20
    alpha: float | Literal["auto"] = "auto"
    power_iters: int = 20
    max_growth: float = 10.0

    def __post_init__(self) -> None:
        _positive_int("Neumann.iters", self.iters)
        _positive_int("Neumann.power_iters", self.power_iters)
        if self.alpha != "auto":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or \
                    not (self.alpha > 0 and math.isfinite(self.alpha)):
                raise HypergradientError(f"Neumann.alpha must be a finite number > 0 or 'auto', "
                                         f"got {self.alpha!r}")
        if not self.max_growth > 1:
            raise HypergradientError(f"Neumann.max_growth must be > 1, got {self.max_growth!r}")


@dataclass(frozen=True)
class Identity:
    """``p = scale · v``: ``H`` approximated by ``I/scale`` (T1−T2, Luketina et al. 2016). No HVPs."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise HypergradientError(f"Identity.scale must be a finite number, got {self.scale!r}")


@dataclass(frozen=True)
class Nystrom:
    """``p = (Ĥ + ρI)⁻¹ v`` with a rank-``rank`` randomized Nyström ``Ĥ`` (``rank`` HVPs, one batch).

    After Hataya & Yamada (2023), with a Gaussian sketch instead of sampled columns (Frangella,
    Tropp & Udell 2023), which captures the top of the spectrum far better per HVP. ``rho`` damps
    as ``(Ĥ + ρI)⁻¹``; ``rho=None`` instead sets the uncaptured spectrum to the smallest captured
    eigenvalue (see :func:`hypergradients.linear.nystrom`). Good where H is low rank plus a small
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
    """

    rank: int = 20
    rho: float | None = None
    seed: int = 0
    floor: float | Literal["auto"] | None = None

    def __post_init__(self) -> None:
        _positive_int("Nystrom.rank", self.rank)
        if self.rho is not None and not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise HypergradientError(f"Nystrom.rho must be > 0 or None (automatic), got {self.rho!r}")
        if self.floor is not None and self.floor != "auto" and (
                isinstance(self.floor, bool) or not isinstance(self.floor, (int, float))
                or not (self.floor > 0 and math.isfinite(self.floor))):
            raise HypergradientError(f"Nystrom.floor must be a finite number > 0, 'auto' or None, "
                                     f"got {self.floor!r}")


def _validate_path(name: str, steps: object, lr: object, truncate: object) -> None:
    _positive_int(f"{name}.steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float, str)):
        raise HypergradientError(f"{name}.lr must be a number or a key of hparams, got {lr!r}")
    if not isinstance(lr, str) and not (lr > 0 and math.isfinite(lr)):
        raise HypergradientError(f"{name}.lr must be a finite number > 0, got {lr!r}")
    if truncate is not None:
        _positive_int(f"{name}.truncate", truncate)
        assert isinstance(truncate, int) and isinstance(steps, int)
        if truncate > steps:
            raise HypergradientError(f"{name}.truncate={truncate} exceeds steps={steps}")


@dataclass(frozen=True)
class Unrolled:
    """Reverse-mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w`` from the given weights.

    ``truncate=T`` differentiates only the last T steps. ``lr`` is a number, or the name of a
    scalar entry of ``hparams`` whose hypergradient is then returned too.

    ``checkpoint`` trades compute for memory: ``None``/``False`` keeps the graph of every step
    (memory ``O(T)``); ``True`` stores only every ``⌈√T⌉``-th iterate and recomputes one segment
    at a time in the backward sweep (memory ``O(√T)``, one extra forward pass); an int ``s``
    stores every s-th. The result is the same derivative (equal to float64 rounding).
    """

    steps: int = 100
    lr: float | str = 0.1
    truncate: int | None = None
    checkpoint: bool | int | None = None

    def __post_init__(self) -> None:
        _validate_path("Unrolled", self.steps, self.lr, self.truncate)
        if self.checkpoint is not None and not isinstance(self.checkpoint, bool):
            _positive_int("Unrolled.checkpoint", self.checkpoint)


@dataclass(frozen=True)
class Forward:
    """Forward mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w``: the derivative of :class:`Unrolled`.

    Propagates ``∂w_k/∂λ`` along the path with ``torch.func.jvp``, one tangent per scalar
    hyperparameter (``chunk`` of them batched with ``vmap``): memory independent of ``steps``,
    cost ``∝`` the number of hyperparameters. The natural choice for a few hyperparameters, such
    as a learning rate (``lr="<key>"``). The losses must be ``torch.func``-compatible (no
    ``.item()``, no in-place updates of their inputs).
    """

    steps: int = 100
    lr: float | str = 0.1
    truncate: int | None = None
    chunk: int | None = 64

    def __post_init__(self) -> None:
        _validate_path("Forward", self.steps, self.lr, self.truncate)
        if self.chunk is not None:
            _positive_int("Forward.chunk", self.chunk)


@dataclass(frozen=True)
class Auto:
    """Let the library choose: conjugate gradient until ``p`` is accurate, warm-started.

    CG is the fastest implicit solver per unit of accuracy on SPD Hessians (it is optimal over
    the Krylov space that Neumann also searches), and unlike Neumann needs no step size. It stops
    when both

    * the relative residual ``‖Hp − v‖/‖v‖ ≤ tol`` (default 1e-2), and
    * the estimated relative error ``‖r‖/(θ_min‖p‖) ≤ error_tol`` (default 3e-2), where ``θ_min``
      is the smallest Ritz value of CG's own Lanczos tridiagonal (free: scalars CG computes
      anyway; see :func:`hypergradients.linear.cg`).

    The second rule is what keeps the default's promise, cosine ≥ 0.999 with the exact
    hypergradient, on ill-conditioned Hessians: since ``p − H⁻¹v = −H⁻¹r``, a residual of ``tol``
    allows a relative error up to ``cond(H)·tol``, and at ``cond(H) ≈ 1e3`` the residual rule
    alone gives cosines down to 0.9967. ``error_tol=3e-2`` is the loosest of 1e-1, 3e-2, 1e-2
    that kept every cosine ≥ 0.999 on logistic problems with ``cond(H)`` from 1e1 to 1e4 (worst
    0.99995; 1e-1 gave 0.99899): ``docs/benchmarks.md``, ``benchmarks/auto_tolerance.py``. On
    well-conditioned problems the first rule binds and nothing changes. ``error_tol=None``
    drops the second rule (CG to relative residual ``tol`` only); pass a smaller ``tol`` for
    reference values. With a :class:`SolverState` it starts from the previous solution, which
    after a small hyper step usually meets both rules in a few HVPs, and keeps the Ritz extremes
    (``θ_min`` from a warm start's short run alone would be too large). If CG meets negative
    curvature (weights not at a minimum), it is rerun on ``H + δI`` with ``δ`` grown from
    ``2|dᵀHd|/dᵀd`` (the curvature found) until CG runs through, reported as
    ``info.extra["damping"]``: a Levenberg-style answer instead of an error.
    ``info.extra`` also has ``lambda_min``/``lambda_max`` (the Ritz extremes of ``H + δI``) and
    ``error_estimate``.
    """

    tol: float = 1e-2
    max_iters: int = 200
    error_tol: float | None = 3e-2

    def __post_init__(self) -> None:
        _nonneg_float("Auto.tol", self.tol)
        _positive_int("Auto.max_iters", self.max_iters)
        if self.error_tol is not None and (isinstance(self.error_tol, bool) or not isinstance(
                self.error_tol, (int, float)) or not (self.error_tol > 0 and math.isfinite(self.error_tol))):
            raise HypergradientError(f"Auto.error_tol must be a finite number > 0 or None, "
                                     f"got {self.error_tol!r}")


Method = Exact | CG | Neumann | Identity | Nystrom | Auto | Unrolled | Forward
IMPLICIT_METHODS = (Exact, CG, Neumann, Identity, Nystrom, Auto)
PATH_METHODS = (Unrolled, Forward)


@dataclass
class Info:
    """What a hypergradient cost and how good it is.

    ``residual`` is ``‖Hp − v‖/‖v‖`` for the implicit methods when computed (by default whenever
    the Info is returned; at most one extra HVP, see ``hypergradient(residual=)``);
    ``converged`` whether the solver met its tolerance (``None`` for fixed-budget methods);
    ``final_params`` the weights after the unrolled steps (``Unrolled`` only); ``direct`` the
    term ``∂L_V/∂λ``; ``extra`` method facts such as the ``alpha`` and ``lambda_max`` used.
    """

    method: str
    iterations: int
    hvps: int
    residual: float | None
    converged: bool | None
    direct: Tree
    final_params: Tree | None = None
    outer_loss: float = float("nan")
    time_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    state: SolverState | None = None


# Names that, unused by both losses, are almost surely step sizes or momenta.
_PATH_NAMES = ("lr", "learning_rate", "step_size", "stepsize", "momentum", "beta1", "beta2")


def _looks_path_only(key: str) -> bool:
    last = key.lower().replace("-", "_").split(".")[-1]
    return last in _PATH_NAMES or last.endswith("_lr") or last.endswith("_learning_rate")


def _validate_tree(name: str, t: object, *, floating: bool) -> dict[str, Tensor]:
    if not isinstance(t, Mapping):
        raise HypergradientError(f"{name} must be a dict[str, Tensor] (e.g. "
                                 f"dict(model.named_parameters())), got {type(t).__name__}")
    if not t:
        raise HypergradientError(f"{name} is empty")
    for k, v in t.items():
        if not isinstance(k, str):
            raise HypergradientError(f"{name} keys must be strings, got {k!r}")
        if not isinstance(v, Tensor):
            raise HypergradientError(f"{name}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if floating and not v.is_floating_point():
            raise HypergradientError(f"{name}[{k!r}] must be a floating-point tensor to be differentiated, "
                                     f"got dtype {v.dtype}")
    return dict(t)


def _report_unused(hparams: Mapping[str, Tensor], used: set[str], method: Method) -> None:
    unused = [k for k in hparams if k not in used]
    if not unused:
        return
    implicit = isinstance(method, IMPLICIT_METHODS)
    path_like = [k for k in unused if _looks_path_only(k)]
    if implicit and path_like:
        raise PathOnlyHyperparameterError(
            f"hyperparameter(s) {path_like} appear in neither inner_loss nor outer_loss: they look like "
            "step sizes or momenta, which only change the optimisation path. Implicit methods "
            f"({type(method).__name__}) differentiate the optimum, which does not depend on them, so their "
            "hypergradient would be a silent zero. Use hg.Unrolled(steps=..., lr=<key>) to differentiate "
            "through the training path instead.")
    hint = (" If it only changes the optimisation path (a step size, momentum), implicit methods cannot "
            "see it: use hg.Unrolled.") if implicit else ""
    warnings.warn(f"hyperparameter(s) {unused} affect neither ∂L_T/∂w nor L_V: their hypergradient is "
                  f"zero.{hint}", UnusedHyperparameterWarning, stacklevel=3)


def _auto(method: Auto, mv: linear.MatVec, v: Tree, x0: Tree | None,
          lambda_min: float | None) -> linear.Solve:
    def run(damping: float, start: Tree | None) -> linear.Solve:
        hint = None if lambda_min is None else lambda_min + damping
        return linear.cg(mv, v, iters=method.max_iters, tol=method.tol, damping=damping, x0=start,
                         error_tol=method.error_tol, lambda_min=hint)

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


def _solve(method: Method, D: InnerDerivatives, v: Tree, *, residual: bool,
           x0: Tree | None = None, lambda_min: float | None = None) -> linear.Solve:
    mv = D.hvp
    if isinstance(method, Exact):
        return linear.exact(D.hvp_batched, v, damping=method.damping, max_size=method.max_size)
    if isinstance(method, CG):
        return linear.cg(mv, v, iters=method.iters, tol=method.tol, damping=method.damping, x0=x0)
    if isinstance(method, Auto):
        return _auto(method, mv, v, x0, lambda_min)
    if isinstance(method, Neumann):
        extra: dict[str, float] = {}
        alpha = method.alpha
        hvps0 = D.hvp_count
        if alpha == "auto":
            lam_max = linear.estimate_lambda_max(mv, v, iters=method.power_iters)
            if not lam_max > 0:
                raise HypergradientError("Neumann(alpha='auto'): the estimated λ_max(H) is "
                                         f"{lam_max:g}; the Hessian is zero or not positive here. "
                                         "Pass an explicit alpha or use hg.CG.")
            alpha = 1.0 / lam_max
            extra["lambda_max"] = lam_max
        s = linear.neumann(mv, v, iters=method.iters, alpha=float(alpha), residual=residual,
                           max_growth=method.max_growth)
        s.extra.update(extra)
        s.hvps = D.hvp_count - hvps0
        return s
    if isinstance(method, Identity):
        return linear.identity(v, scale=method.scale, matvec=mv if residual else None)
    if isinstance(method, Nystrom):
        return linear.nystrom(D.hvp_batched, v, rank=method.rank, rho=method.rho, seed=method.seed,
                              matvec=mv if residual else None, floor=method.floor)
    raise HypergradientError(f"unknown method {method!r}; use one of {_METHOD_NAMES}")


def _remember_curvature(state: SolverState, extra: Mapping[str, float]) -> SolverState:
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


# Methods whose states have the same content and meaning (p and the Ritz extremes of H).
_SHARED_STATES = {"CG": ("CG", "Auto"), "Auto": ("CG", "Auto")}


def _check_state_owner(state: SolverState, name: str) -> None:
    ok = _SHARED_STATES.get(name, (name,))
    if state.method is not None and state.method not in ok:
        raise StateMismatchError(
            f"state was made by hg.{state.method}, and hg.{name} cannot use it (it holds another "
            f"method's quantities). Keep one state per method: pass hg.SolverState() (or "
            f"method.init(params)) for hg.{name}.")


_METHOD_NAMES = "hg.Auto, hg.Exact, hg.CG, hg.Neumann, hg.Identity, hg.Nystrom, hg.Unrolled, hg.Forward"


def _path_used(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree,
               lr: float | str) -> set[str]:
    """Hyperparameters the path can depend on: those in ``∂L_T/∂w`` or ``L_V`` (by autograd's graph, not
    by value), and the step size when it is one."""
    w = tree.clone_leaves(params, requires_grad=True)
    inner = scalar_loss(inner_loss, w, lam, name="inner_loss")
    gw = grad(inner, w, create_graph=True)
    probe = scalar_loss(outer_loss, w, lam, name="outer_loss") + sum(
        (gk.sum() for gk in gw.values() if gk.requires_grad), torch.zeros((), dtype=inner.dtype))
    used = used_keys(probe, lam)
    if isinstance(lr, str):
        used.add(lr)
    return used


@overload
def hypergradient(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
                  hparams: Mapping[str, Tensor], *, method: Method | None = ...,
                  return_info: Literal[False] = ..., residual: bool | None = ...,
                  hvp_mode: HvpMode = ..., state: SolverState | None = ...) -> Tree: ...


@overload
def hypergradient(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
                  hparams: Mapping[str, Tensor], *, method: Method | None = ...,
                  return_info: Literal[True], residual: bool | None = ...,
                  hvp_mode: HvpMode = ..., state: SolverState | None = ...) -> tuple[Tree, Info]: ...


def hypergradient(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
                  hparams: Mapping[str, Tensor], *, method: Method | None = None,
                  return_info: bool = False, residual: bool | None = None,
                  hvp_mode: HvpMode = "reverse",
                  state: SolverState | None = None) -> Tree | tuple[Tree, Info]:
    """The hypergradient ``dL_V/dλ`` at weights ``params`` and hyperparameters ``hparams``.

    Args:
        outer_loss: ``(params, hparams) -> scalar tensor``, the validation loss ``L_V``.
        inner_loss: ``(params, hparams) -> scalar tensor``, the training loss ``L_T``.
        params: ``dict[str, Tensor]`` of weights; for implicit methods, trained weights ``≈ w*``;
            for :class:`Unrolled`, the starting point (constant w.r.t. ``λ``).
        hparams: ``dict[str, Tensor]`` of floating-point hyperparameters.
        method: :class:`Exact`, :class:`CG` (default ``CG()``), :class:`Neumann`,
            :class:`Identity`, :class:`Nystrom`, :class:`Auto`, :class:`Unrolled` or :class:`Forward`.
        return_info: also return an :class:`Info`.
        residual: whether to report ``‖Hp − v‖/‖v‖`` in ``info.residual`` (implicit methods).
            ``None`` (default): only when ``return_info=True``, since nobody else sees it;
            ``True``: always; ``False``: never. It costs one extra HVP for Neumann, Identity and
            Nyström, none for CG, Auto and Exact (their solvers have it anyway). So with
            ``return_info=False`` ``Identity`` spends 0 HVPs and ``Neumann(iters=K)`` ``K−1``.
        hvp_mode: ``"reverse"`` (double-backward through a gradient graph built once) or
            ``"forward"`` (forward-over-reverse with ``torch.func``).
        state: a :class:`SolverState` shared by consecutive calls: :class:`CG` and :class:`Auto`
            start from its ``p`` and store the new one (``info.extra["warm_start"]`` is 1 when used);
            :class:`Auto` also keeps its curvature estimate there.

    Returns:
        A dict with the keys, shapes, dtypes and devices of ``hparams`` (and the :class:`Info`).
        Inputs are never modified.
    """
    t0 = time.perf_counter()
    method = CG() if method is None else method
    if not isinstance(method, (*IMPLICIT_METHODS, *PATH_METHODS)):
        raise HypergradientError(f"method must be one of {_METHOD_NAMES}; got {method!r}")
    if state is not None and not isinstance(state, SolverState):
        raise HypergradientError(f"state must be a hg.SolverState (or None), got {type(state).__name__}")
    params = _validate_tree("params", params, floating=True)
    hparams = _validate_tree("hparams", hparams, floating=True)
    if not callable(outer_loss) or not callable(inner_loss):
        raise HypergradientError("outer_loss and inner_loss must be callables (params, hparams) -> scalar")
    lam = tree.clone_leaves(hparams, requires_grad=True)
    name = type(method).__name__
    prev = SolverState() if state is None else state
    _check_state_owner(prev, name)
    new_state = prev.replace(method=name, calls=prev.calls + 1)

    if isinstance(method, Unrolled):
        g, used, out, w_final = reverse_path(outer_loss, inner_loss, params, lam, steps=method.steps,
                                             lr=method.lr, truncate=method.truncate,
                                             checkpoint=method.checkpoint)
        _report_unused(hparams, used, method)
        extra = {"truncate": float(method.truncate or method.steps)}
        if method.checkpoint:
            extra["checkpoint"] = float(checkpoint_interval(method.truncate or method.steps,
                                                            method.checkpoint) or 0)
        info = Info(type(method).__name__, method.steps, method.steps, None, None,
                    direct=tree.zeros_like(hparams), final_params=tree.detach(w_final),
                    outer_loss=float(out), extra=extra)
    elif isinstance(method, Forward):
        _report_unused(hparams, _path_used(outer_loss, inner_loss, params, lam, method.lr), method)
        g, out_f, w_final, jvps = forward_path(outer_loss, inner_loss, params, lam, steps=method.steps,
                                               lr=method.lr, truncate=method.truncate, chunk=method.chunk)
        info = Info(type(method).__name__, method.steps, jvps, None, None,
                    direct=tree.zeros_like(hparams), final_params=tree.detach(w_final),
                    outer_loss=out_f, extra={"truncate": float(method.truncate or method.steps),
                                             "jvps": float(jvps)})
    else:
        w = tree.clone_leaves(params, requires_grad=True)
        outer = scalar_loss(outer_loss, w, lam, name="outer_loss")
        both = list(w.values()) + list(lam.values())
        raw_all = torch.autograd.grad(outer, both, allow_unused=True) if outer.requires_grad \
            else (None,) * len(both)
        v = tree.as_tree(raw_all[:len(w)], w)
        direct = tree.as_tree(raw_all[len(w):], lam)
        direct_used = {k for k, gk in zip(lam, raw_all[len(w):], strict=True) if gk is not None}
        D = InnerDerivatives(inner_loss, w, lam, hvp_mode=hvp_mode)
        want_residual = return_info if residual is None else bool(residual)
        warm = isinstance(method, (CG, Auto))
        x0 = prev.warm(v, method=name) if warm else None
        hint = prev.lambda_min if x0 is not None else None
        solve = _solve(method, D, v, residual=want_residual, x0=x0, lambda_min=hint)
        if x0 is not None:
            solve.extra["warm_start"] = 1.0
        if warm:
            new_state = _remember_curvature(new_state.replace(p=tree.detach(solve.p)), solve.extra)
        indirect, inner_used = D.mixed_vjp(solve.p)
        _report_unused(hparams, direct_used | inner_used, method)
        g = tree.sub(direct, indirect)
        info = Info(type(method).__name__, solve.iterations, D.hvp_count, solve.residual, solve.converged,
                    direct=tree.detach(direct), outer_loss=float(outer.detach()), extra=dict(solve.extra))
    result = {k: g[k].detach().to(dtype=hparams[k].dtype, device=hparams[k].device) for k in hparams}
    bad = tree.first_nonfinite(result)
    if bad is not None:
        raise HypergradientError(f"the hypergradient of {bad!r} is not finite ({type(method).__name__}); "
                                 "check the losses at these weights, or the method's settings")
    info.state = new_state
    if state is not None:
        state.assign(new_state)  # the documented compatibility convenience: see SolverState
    info.time_s = time.perf_counter() - t0
    return (result, info) if return_info else result
