"""The method protocol: what a method object must do.

Every method is a strategy object (after optimistix's ``adjoint=ImplicitAdjoint(linear_solver=...)``
and lineax's solvers) that owns its computation, so neither door holds a list of methods:

* :class:`ImplicitMethod` (Exact, CG, Neumann, Identity, Nystrom, Auto, GMRES, BiCGStab, NormalCG,
  MINRES, or one of your own): a linear solver,

      init(params) -> state
      solve(op, v, state, *, residual=False) -> (p, state, Stats)

  with ``op`` a :class:`~hypergradients.LinearOperator` (``(∂F/∂w)ᵀ`` of the optimality condition;
  for a minimum the Hessian ``H``; damping is ``op.damped(δ)``), ``v = ∂L_V/∂w`` and
  ``p ≈ op⁻¹ v``. The hypergradient is then the implicit function theorem,
  :func:`~hypergradients.core.implicit.implicit`, the same few lines for every solver and every
  condition (as jaxopt's ``root_vjp``): a new solver is one class with a ``solve``, usable by
  :func:`~hypergradients.hypergradient` and :func:`~hypergradients.root_hypergradient` alike.
* :class:`PathMethod` (Unrolled, Forward): differentiate the training path; ``compute`` calls
  :mod:`hypergradients.paths.unroll`.

``state`` is ``None`` when nobody carries state between calls (``hypergradient(state=None)``):
a solver then skips any work done only for a later call (Nyström's baseline residual). It never
modifies the state it is given (states are frozen); it returns the next one, of its own type
(``state_type``). A failed solve may offer a safer variant of the method (:meth:`Method.safer`),
which a training loop retries with.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import ClassVar

from torch import Tensor

from . import tree
from .conditions import Condition, Stationarity
from .derivatives import HvpMode, LossFn, scalar_loss
from .errors import HypergradientError, IndefiniteHessianWarning, UnusedHyperparameterWarning
from .implicit import implicit
from .implicit import report_unused as _report_unused
from .info import Info, Stats
from .operators import LinearOperator
from .state import SolverState, StateMismatchError, register
from .tree import Tree

__all__ = [
    "ImplicitMethod",
    "IndefiniteHessianWarning",
    "Info",
    "Method",
    "PathMethod",
    "Stats",
    "UnusedHyperparameterWarning",
    "nonneg_float",
    "positive_int",
    "report_unused",
]


# ---------------------------------------------------------------------------------- validation
def positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HypergradientError(f"{name} must be a positive integer, got {value!r}")


def nonneg_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value >= 0 and math.isfinite(value))
    ):
        raise HypergradientError(f"{name} must be a finite number >= 0, got {value!r}")


def report_unused(hparams: Mapping[str, Tensor], used: set[str], method: Method) -> None:
    """Warn about hyperparameters no loss uses; refuse path-only ones for implicit methods."""
    _report_unused(
        hparams, used, method=type(method).__name__, implicit_minimum=isinstance(method, ImplicitMethod)
    )


# ---------------------------------------------------------------------------------- the protocol
class Method(abc.ABC):
    """A way to compute the hypergradient: :class:`ImplicitMethod` or :class:`PathMethod`.

    ``state_type`` is the type of state the method keeps (:mod:`hypergradients.core.state`);
    ``shares_state_with`` names the other methods whose state this one accepts (same quantities,
    same meaning); any other method's state is refused.
    """

    state_type: ClassVar[type[SolverState]] = SolverState
    shares_state_with: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        register(cls.__name__, cls.state_type)  # from_state_dict rebuilds this method's own type

    def init(self, params: Mapping[str, Tensor]) -> SolverState:
        """The empty state for this method (optax's ``init``); ``SolverState()`` works as well."""
        del params  # no method pre-allocates: an empty state means "no previous call"
        return self.state_type(method=type(self).__name__)

    def own_state(self, state: SolverState | None) -> SolverState:
        """The state to continue from, of this method's type: ``state`` itself, or the empty one for
        ``None`` and for ``SolverState()`` ("no previous call")."""
        if isinstance(state, self.state_type):
            return state
        return self.state_type(
            method=None if state is None else state.method, calls=0 if state is None else state.calls
        )

    def check_state(self, state: SolverState) -> None:
        """Refuse another method's state, or one of another type (``StateMismatchError``)."""
        name = type(self).__name__
        if state.method is not None and state.method != name and state.method not in self.shares_state_with:
            raise StateMismatchError(
                f"state was made by hg.{state.method}, and hg.{name} cannot use it (it holds another "
                f"method's quantities). Keep one state per method: pass hg.SolverState() (or "
                f"method.init(params)) for hg.{name}."
            )
        if type(state) is not SolverState and not isinstance(state, self.state_type):
            raise StateMismatchError(
                f"state is a hg.{type(state).__name__}, and hg.{name} keeps a hg.{self.state_type.__name__}: "
                f"pass hg.SolverState() (or method.init(params)) for hg.{name}."
            )

    def safer(self, error: HypergradientError) -> Method | None:
        """A variant of this method that may succeed where this one failed with ``error``, or ``None``.

        ``CG`` damps on negative curvature, ``Neumann`` lowers ``α`` on divergence; a training loop
        (``HyperOptimizer(on_solver_error="damp")``) retries with the variant, and asks it again if
        that fails too.
        """
        del error
        return None

    def with_inner_optimizer(self, diagonal: Callable[[], Mapping[str, Tensor]]) -> Method:
        """This method with what it reads from the model's own optimizer filled in, or itself.

        ``diagonal()`` is the diagonal that optimizer's update divides by, keyed like the weights
        (:func:`~hypergradients.adam_diagonal`). A training loop that has the optimizer
        (:class:`~hypergradients.HyperOptimizer` given ``inner_optimizer=``, :func:`~hypergradients.fit`)
        calls this before every hyper step; only a method that asked for it calls ``diagonal``
        (``hg.Identity(precondition="inner_optimizer")``), so the loop needs no isinstance over methods.
        """
        del diagonal
        return self

    @abc.abstractmethod
    def compute(
        self,
        outer_loss: LossFn,
        inner_loss: LossFn,
        params: Mapping[str, Tensor],
        lam: Tree,
        *,
        state: SolverState | None,
        residual: bool,
        hvp_mode: HvpMode,
    ) -> tuple[Tree, Info]:
        """The hypergradient w.r.t. ``lam`` (leaf tensors requiring grad) and its :class:`Info`,
        whose ``state`` is the next state (before :func:`hypergradient` stamps it)."""


class ImplicitMethod(Method):
    """A linear solver of ``(∂F/∂w)ᵀ p = ∂L_V/∂w``; the hypergradient follows from the implicit
    function theorem (:mod:`hypergradients.core.implicit`).

    For a minimum of the training loss (``F = ∂L_T/∂w``, :func:`~hypergradients.hypergradient`)
    the operator is the Hessian ``H``:

        dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p,      H p = v = ∂L_V/∂w;

    for any other condition (:func:`~hypergradients.root_hypergradient`) it is ``(∂F/∂w)ᵀ``.
    Subclasses implement :meth:`solve` only. ``requires`` (e.g. ``"symmetric positive-definite"``)
    makes the method refuse a condition whose Jacobian is not symmetric; ``None`` (default): any.
    """

    requires: ClassVar[str | None] = None

    @abc.abstractmethod
    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]:
        """``p ≈ op⁻¹ v``, the next state, and :class:`Stats`.

        ``residual``: also report ``‖op·p − v‖/‖v‖`` (a product, where the solver does not have it).
        ``state``: the previous call's state (``None``: not carried; ``SolverState()``: carried, no
        previous call); never modified.
        """

    def check_condition(self, cond: Condition) -> None:
        """Refuse a condition whose Jacobian lacks what the method needs (``requires``)."""
        if self.requires is not None and not cond.symmetric:
            name = type(self).__name__
            raise HypergradientError(
                f"hg.{name} needs a {self.requires} Jacobian; the condition's need not be symmetric: use "
                "hg.GMRES (any non-singular Jacobian) or hg.BiCGStab; pass symmetric=True if ∂F/∂w is "
                "symmetric (F the gradient of a loss); or use hg.hypergradient for F = ∂L_T/∂w."
            )

    def compute(
        self,
        outer_loss: LossFn,
        inner_loss: LossFn,
        params: Mapping[str, Tensor],
        lam: Tree,
        *,
        state: SolverState | None,
        residual: bool,
        hvp_mode: HvpMode,
    ) -> tuple[Tree, Info]:
        w = tree.clone_leaves(params, requires_grad=True)
        outer = scalar_loss(outer_loss, w, lam, name="outer_loss")
        cond = Stationarity(inner_loss, w, lam, hvp_mode=hvp_mode)  # F = ∂L_T/∂w: the minimum
        g, info = implicit(outer, cond, w, lam, self, state, residual=residual)
        info.grad_norm = info.condition_norm
        return g, info


class PathMethod(Method):
    """Differentiates ``steps`` steps of the inner optimizer from the given weights (:mod:`.unroll`)."""
