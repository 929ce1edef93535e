"""The method objects and :func:`hypergradient`, the one call behind every method.

Conventions (``../shared/DESIGN.md`` §1). Weights ``w``, hyperparameters ``λ``, inner loss
``L_T(w, λ)``, outer loss ``L_V(w, λ)``. The hypergradient, the direction to *descend*, is

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p,     p ≈ H⁻¹ ∂L_V/∂w,   H = ∂²L_T/∂w∂wᵀ at (w, λ).

Implicit methods (implicit function theorem at the given weights, taken as ``w*``) differ only
in how ``p`` is found: :class:`Exact`, :class:`CG`, :class:`Neumann`, :class:`Identity`,
:class:`Nystrom`. The mixed partial is never formed: ``p`` enters one vector-Jacobian product.
:class:`Unrolled` instead differentiates K steps of gradient descent from the given weights.
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
from .derivatives import HvpMode, InnerDerivatives, LossFn, scalar_loss
from .errors import HypergradientError, PathOnlyHyperparameterError
from .tree import Tree
from .unroll import unroll


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

    Needs ``H + δI`` positive definite; negative curvature raises
    :class:`~hypergradients.errors.NegativeCurvatureError` naming the curvature found.
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
    eigenvalue (see :func:`hypergradients.linear.nystrom`). Best where H is low rank plus a flat
    floor (over-parameterised models with L2); on well-conditioned problems CG is better.
    """

    rank: int = 20
    rho: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("Nystrom.rank", self.rank)
        if self.rho is not None and not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise HypergradientError(f"Nystrom.rho must be > 0 or None (automatic), got {self.rho!r}")


@dataclass(frozen=True)
class Unrolled:
    """Reverse-mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w`` from the given weights.

    ``truncate=T`` differentiates only the last T steps. ``lr`` is a number, or the name of a
    scalar entry of ``hparams`` whose hypergradient is then returned too.
    """

    steps: int = 100
    lr: float | str = 0.1
    truncate: int | None = None

    def __post_init__(self) -> None:
        _positive_int("Unrolled.steps", self.steps)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float, str)):
            raise HypergradientError(f"Unrolled.lr must be a number or a key of hparams, got {self.lr!r}")
        if not isinstance(self.lr, str) and not (self.lr > 0 and math.isfinite(self.lr)):
            raise HypergradientError(f"Unrolled.lr must be a finite number > 0, got {self.lr!r}")
        if self.truncate is not None:
            _positive_int("Unrolled.truncate", self.truncate)
            if self.truncate > self.steps:
                raise HypergradientError(f"Unrolled.truncate={self.truncate} exceeds steps={self.steps}")


Method = Exact | CG | Neumann | Identity | Nystrom | Unrolled
IMPLICIT_METHODS = (Exact, CG, Neumann, Identity, Nystrom)


@dataclass
class Info:
    """What a hypergradient cost and how good it is.

    ``residual`` is ``‖Hp − v‖/‖v‖`` for the implicit methods when computed (at most one extra
    HVP); ``converged`` whether the solver met its tolerance (``None`` for fixed-budget methods);
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


def _solve(method: Method, D: InnerDerivatives, v: Tree, *, residual: bool) -> linear.Solve:
    mv = D.hvp
    if isinstance(method, Exact):
        return linear.exact(D.hvp_batched, v, damping=method.damping, max_size=method.max_size)
    if isinstance(method, CG):
        return linear.cg(mv, v, iters=method.iters, tol=method.tol, damping=method.damping)
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
                              matvec=mv if residual else None)
    raise HypergradientError(f"unknown method {method!r}; use one of hg.Exact, hg.CG, hg.Neumann, "
                             "hg.Identity, hg.Nystrom, hg.Unrolled")


@overload
def hypergradient(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
                  hparams: Mapping[str, Tensor], *, method: Method | None = ...,
                  return_info: Literal[False] = ..., residual: bool = ...,
                  hvp_mode: HvpMode = ...) -> Tree: ...


@overload
def hypergradient(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
                  hparams: Mapping[str, Tensor], *, method: Method | None = ...,
                  return_info: Literal[True], residual: bool = ...,
                  hvp_mode: HvpMode = ...) -> tuple[Tree, Info]: ...


def hypergradient(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
                  hparams: Mapping[str, Tensor], *, method: Method | None = None,
                  return_info: bool = False, residual: bool = True,
                  hvp_mode: HvpMode = "reverse") -> Tree | tuple[Tree, Info]:
    """The hypergradient ``dL_V/dλ`` at weights ``params`` and hyperparameters ``hparams``.

    Args:
        outer_loss: ``(params, hparams) -> scalar tensor``, the validation loss ``L_V``.
        inner_loss: ``(params, hparams) -> scalar tensor``, the training loss ``L_T``.
        params: ``dict[str, Tensor]`` of weights; for implicit methods, trained weights ``≈ w*``;
            for :class:`Unrolled`, the starting point (constant w.r.t. ``λ``).
        hparams: ``dict[str, Tensor]`` of floating-point hyperparameters.
        method: :class:`Exact`, :class:`CG` (default ``CG()``), :class:`Neumann`,
            :class:`Identity`, :class:`Nystrom` or :class:`Unrolled`.
        return_info: also return an :class:`Info`.
        residual: spend (at most) one extra HVP to report ``‖Hp − v‖/‖v‖`` (implicit methods;
            CG reports it for free).
        hvp_mode: ``"reverse"`` (double-backward through a gradient graph built once) or
            ``"forward"`` (forward-over-reverse with ``torch.func``).

    Returns:
        A dict with the keys, shapes, dtypes and devices of ``hparams`` (and the :class:`Info`).
        Inputs are never modified.
    """
    t0 = time.perf_counter()
    method = CG() if method is None else method
    if not isinstance(method, (*IMPLICIT_METHODS, Unrolled)):
        raise HypergradientError(f"method must be one of hg.Exact, hg.CG, hg.Neumann, hg.Identity, "
                                 f"hg.Nystrom, hg.Unrolled; got {method!r}")
    params = _validate_tree("params", params, floating=True)
    hparams = _validate_tree("hparams", hparams, floating=True)
    if not callable(outer_loss) or not callable(inner_loss):
        raise HypergradientError("outer_loss and inner_loss must be callables (params, hparams) -> scalar")
    lam = tree.clone_leaves(hparams, requires_grad=True)

    if isinstance(method, Unrolled):
        out, w_final = unroll(outer_loss, inner_loss, params, lam, steps=method.steps, lr=method.lr,
                              truncate=method.truncate)
        raw = torch.autograd.grad(out, list(lam.values()), allow_unused=True)
        used = {k for k, gk in zip(lam, raw, strict=True) if gk is not None}
        _report_unused(hparams, used, method)
        g = tree.as_tree(raw, lam)
        info = Info(type(method).__name__, method.steps, method.steps, None, None,
                    direct=tree.zeros_like(hparams), final_params=tree.detach(w_final),
                    outer_loss=float(out.detach()), extra={"truncate": float(method.truncate or method.steps)})
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
        solve = _solve(method, D, v, residual=residual)
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
    info.time_s = time.perf_counter() - t0
    return (result, info) if return_info else result
