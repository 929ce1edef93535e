"""The method protocol: what a method object must do, and the implicit function theorem once.

Every method is a strategy object (after optimistix's ``adjoint=ImplicitAdjoint(linear_solver=...)``
and lineax's solvers) that owns its computation, so :func:`~hypergradients.hypergradient` holds no
list of methods:

* :class:`ImplicitMethod` (Exact, CG, Neumann, Identity, Nystrom, Auto, ...): one solver protocol,

      init(params) -> SolverState
      solve(op, v, state, *, residual=False) -> (p, state, Stats)

  with ``op`` a :class:`~hypergradients.HessianOperator` (``H``; damping is
  ``op.damped(δ)``), ``v = ∂L_V/∂w`` and ``p ≈ H⁻¹v``. The hypergradient is then the implicit
  function theorem, :meth:`ImplicitMethod.compute`, the same ~10 lines for every solver (as
  jaxopt's ``root_vjp``). A new solver is one class with a ``solve``.
* :class:`PathMethod` (Unrolled, Forward): differentiate the training path; ``compute`` calls
  :mod:`hypergradients.paths.unroll`.

``state`` is ``None`` when nobody carries state between calls (``hypergradient(state=None)``):
a solver then skips any work done only for a later call (Nyström's baseline residual). It
never modifies the state it is given; it returns the next one.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from . import distributed, tree
from .derivatives import HvpMode, InnerDerivatives, LossFn, scalar_loss
from .errors import HypergradientError, PathOnlyHyperparameterError
from .operators import HessianOperator
from .state import SolverState, StateMismatchError
from .tree import Tree


class UnusedHyperparameterWarning(UserWarning):
    """A hyperparameter affects neither ``∂L_T/∂w`` nor ``L_V``: its hypergradient is zero."""


class IndefiniteHessianWarning(UserWarning):
    """``H`` (plus any damping) is not positive definite at the given weights: they are not a minimum."""


@dataclass
class Info:
    """What a hypergradient cost and how good it is.

    ``residual`` is ``‖Hp − v‖/‖v‖`` for the implicit methods when computed (by default whenever
    the Info is returned; at most one extra HVP, see ``hypergradient(residual=)``);
    ``converged`` whether the solver met its tolerance (``None`` for fixed-budget methods);
    ``final_params`` the weights after the unrolled steps (``Unrolled`` only); ``direct`` the
    term ``∂L_V/∂λ``; ``extra`` method facts such as the ``alpha`` and ``lambda_max`` used;
    ``state`` the :class:`~hypergradients.SolverState` to pass to the next call.

    ``grad_norm`` is ``‖∂L_T/∂w‖`` at the given weights (every method; data-parallel: of the
    group-mean gradient), free where the gradient is computed anyway. The implicit methods take
    the weights as a minimum ``w*``; a gradient norm that is not small next to the gradient norms
    seen during training says they are not, and their hypergradient is then not the derivative of
    ``L_V(w*(λ))``. Whether ``H`` is positive definite shows where a method finds out: ``CG``
    raises :class:`~hypergradients.NegativeCurvatureError`, ``Auto`` damps (``extra["damping"]``),
    ``Neumann`` raises on divergence, and ``Exact`` (which factorises the dense ``H``) reports
    ``converged=False``, ``extra["positive_definite"] = 0`` and ``extra["lambda_min"]`` (the
    smallest eigenvalue of ``H + δI``), with an :class:`IndefiniteHessianWarning`.
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
    grad_norm: float | None = None


@dataclass
class Stats:
    """What one ``solve`` did: ``iterations``, ``residual`` ``‖Hp − v‖/‖v‖`` (``None`` if not computed),
    ``converged`` (``None`` for fixed budgets) and ``extra`` facts (``alpha``, ``lambda_max``, ...).
    The HVPs are counted by the operator (``op.hvps``)."""

    iterations: int
    residual: float | None
    converged: bool | None
    extra: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- validation
def positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HypergradientError(f"{name} must be a positive integer, got {value!r}")


def nonneg_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and
                                                                          math.isfinite(value)):
        raise HypergradientError(f"{name} must be a finite number >= 0, got {value!r}")


# Names that, unused by both losses, are almost surely step sizes or momenta.
_PATH_NAMES = ("lr", "learning_rate", "step_size", "stepsize", "momentum", "beta1", "beta2")


def _looks_path_only(key: str) -> bool:
    last = key.lower().replace("-", "_").split(".")[-1]
    return last in _PATH_NAMES or last.endswith("_lr") or last.endswith("_learning_rate")


def report_unused(hparams: Mapping[str, Tensor], used: set[str], method: Method) -> None:
    """Warn about hyperparameters no loss uses; refuse path-only ones for implicit methods."""
    unused = [k for k in hparams if k not in used]
    if not unused:
        return
    implicit = isinstance(method, ImplicitMethod)
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
    # stacklevel 4: warn → report_unused → compute → hypergradient → the user's call.
    warnings.warn(f"hyperparameter(s) {unused} affect neither ∂L_T/∂w nor L_V: their hypergradient is "
                  f"zero.{hint}", UnusedHyperparameterWarning, stacklevel=4)


# ---------------------------------------------------------------------------------- the protocol
class Method(abc.ABC):
    """A way to compute the hypergradient: :class:`ImplicitMethod` or :class:`PathMethod`.

    ``shares_state_with`` names the other methods whose :class:`~hypergradients.SolverState` this
    one accepts (same quantities, same meaning); any other method's state is refused.
    """

    shares_state_with: ClassVar[tuple[str, ...]] = ()

    def init(self, params: Mapping[str, Tensor]) -> SolverState:
        """The empty state for this method (optax's ``init``); ``SolverState()`` works as well."""
        del params  # no method pre-allocates: an empty state means "no previous call"
        return SolverState(method=type(self).__name__)

    def check_state(self, state: SolverState) -> None:
        """Refuse another method's state (:class:`~hypergradients.StateMismatchError`)."""
        name = type(self).__name__
        if state.method is not None and state.method != name and state.method not in self.shares_state_with:
            raise StateMismatchError(
                f"state was made by hg.{state.method}, and hg.{name} cannot use it (it holds another "
                f"method's quantities). Keep one state per method: pass hg.SolverState() (or "
                f"method.init(params)) for hg.{name}.")

    @abc.abstractmethod
    def compute(self, outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
                state: SolverState | None, residual: bool, hvp_mode: HvpMode) -> tuple[Tree, Info]:
        """The hypergradient w.r.t. ``lam`` (leaf tensors requiring grad) and its :class:`Info`,
        whose ``state`` is the next state (before :func:`hypergradient` stamps it)."""


class ImplicitMethod(Method):
    """An inverse-HVP solver; the hypergradient follows from the implicit function theorem.

    At ``w ≈ w*(λ)`` (``∂L_T/∂w = 0``), differentiating the optimality condition gives
    ``dw*/dλ = −H⁻¹ ∂²L_T/∂w∂λᵀ``, so

        dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p,      H p = v = ∂L_V/∂w.

    Subclasses implement :meth:`solve` only.
    """

    @abc.abstractmethod
    def solve(self, op: HessianOperator, v: Tree, state: SolverState | None, *,
              residual: bool = False) -> tuple[Tree, SolverState, Stats]:
        """``p ≈ op⁻¹ v``, the next state, and :class:`Stats`.

        ``residual``: also report ``‖op·p − v‖/‖v‖`` (an HVP, where the solver does not have it).
        ``state``: the previous call's state (``None``: not carried); never modified.
        """

    def compute(self, outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
                state: SolverState | None, residual: bool, hvp_mode: HvpMode) -> tuple[Tree, Info]:
        w = tree.clone_leaves(params, requires_grad=True)
        outer = scalar_loss(outer_loss, w, lam, name="outer_loss")
        D = InnerDerivatives(inner_loss, w, lam, hvp_mode=hvp_mode)
        v, direct, direct_used, gw = _partials(outer, w, lam, D.grad)   # ∂L_V/∂w, ∂L_V/∂λ, ∂L_T/∂w
        op = HessianOperator.of(D)                                   # H = ∂²L_T/∂w∂wᵀ
        p, new_state, stats = self.solve(op, v, state, residual=residual)   # p ≈ H⁻¹ v
        indirect, inner_used = D.mixed_vjp(p)                       # (∂²L_T/∂λ∂wᵀ) p
        report_unused(lam, direct_used | inner_used, self)
        g = tree.sub(direct, indirect)
        return g, Info(type(self).__name__, stats.iterations, op.hvps, stats.residual, stats.converged,
                       direct=tree.detach(direct), outer_loss=float(outer.detach()), extra=dict(stats.extra),
                       state=new_state, grad_norm=float(tree.norm(gw)))


def _partials(outer: Tensor, w: Tree, lam: Tree, inner_grad: Tree) -> tuple[Tree, Tree, set[str], Tree]:
    """``∂L_V/∂w``, ``∂L_V/∂λ`` (zeros where unused) in one backward pass, the λ keys used, and
    ``inner_grad`` (``∂L_T/∂w``, detached), each the group mean in data-parallel runs."""
    both = list(w.values()) + list(lam.values())
    raw = torch.autograd.grad(outer, both, allow_unused=True) if outer.requires_grad else (None,) * len(both)
    used = {k for k, gk in zip(lam, raw[len(w):], strict=True) if gk is not None}
    # data-parallel (hg.distributed.data_parallel): the three group means in one all-reduce
    v, direct, gw = distributed.average([tree.as_tree(raw[:len(w)], w), tree.as_tree(raw[len(w):], lam),
                                         tree.detach(inner_grad)])
    return v, direct, used, gw


class PathMethod(Method):
    """Differentiates ``steps`` steps of the inner optimizer from the given weights (:mod:`.unroll`)."""
