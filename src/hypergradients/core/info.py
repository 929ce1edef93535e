"""What a solve and a hypergradient report: :class:`Stats` (one ``solve``), :class:`Info` (one call).

Three levels, one result type each: a kernel returns a :class:`~.kernels.solve.Solve` (``p`` and
what it found), a method's ``solve`` returns ``(p, state, Stats)``, and both doors,
:func:`~hypergradients.hypergradient` and :func:`~hypergradients.root_hypergradient`, return an
:class:`Info` (:class:`RootInfo` is the same record, with the products also named as VJPs and JVPs
of the condition). The products are counted in one place, by the operator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .state import SolverState
from .tree import Tree


@dataclass
class Stats:
    """What one ``solve`` did: ``iterations``, ``residual`` ``‖Mp − v‖/‖v‖`` (``None`` if not computed),
    ``converged`` (``None`` for fixed budgets) and ``extra`` facts (``alpha``, ``lambda_max``, ...).
    The products are counted by the operator (``op.products``)."""

    iterations: int
    residual: float | None
    converged: bool | None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Info:
    """What a hypergradient cost and how good it is.

    ``hvps`` counts the products with the condition's Jacobian: Hessian-vector products for
    :func:`~hypergradients.hypergradient`'s implicit methods, vector-Jacobian (and, for ``NormalCG``
    on a non-symmetric condition, Jacobian-vector) products of ``F`` for
    :func:`~hypergradients.root_hypergradient`; of them, ``transposed`` were products with the
    transpose ``(∂F/∂w)x`` (JVPs). ``residual`` is ``‖(∂F/∂w)ᵀp − v‖/‖v‖`` (``‖Hp − v‖/‖v‖`` for a
    minimum) for the implicit methods when asked for (by default whenever the Info is returned; at
    most one extra product, see ``hypergradient(residual=)``); ``converged`` whether the solver met
    its tolerance (``None`` for fixed-budget methods); ``final_params`` the weights after the
    unrolled steps (``Unrolled`` only); ``direct`` the term ``∂L_V/∂λ``; ``extra`` method facts such
    as the ``alpha`` and ``lambda_max`` used; ``state`` the state to pass to the next call (the
    method's own type, see :mod:`hypergradients.core.state`).

    ``condition_norm`` is ``‖F(w, λ)‖`` at the given weights (implicit methods; data-parallel: of
    the group mean), and ``grad_norm`` the same for ``F = ∂L_T/∂w``, ``‖∂L_T/∂w‖`` (every method of
    :func:`~hypergradients.hypergradient`), free where it is computed anyway. The implicit methods
    take the weights as a solution of the condition; a norm that is not small (next to the gradient
    norms seen during training, for a minimum) says they are not, and the hypergradient is then not
    the derivative of ``L_V(w*(λ))``. Whether ``H`` is positive definite shows where a method finds
    out: ``CG`` raises :class:`~hypergradients.NegativeCurvatureError`, ``Auto`` damps
    (``extra["damping"]``), ``Neumann`` raises on divergence, and ``Exact`` (which factorises the
    dense ``H``) reports ``converged=False``, ``extra["positive_definite"] = 0`` and
    ``extra["lambda_min"]`` (the smallest eigenvalue of ``H + δI``), with an
    :class:`~hypergradients.IndefiniteHessianWarning`; ``MINRES`` and ``GMRES`` solve the indefinite
    system as it is.
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
    condition_norm: float | None = None
    transposed: int = 0


@dataclass
class RootInfo(Info):
    """The :class:`Info` of :func:`~hypergradients.root_hypergradient`, with its products named for the
    condition: ``vjps`` the products ``(∂F/∂w)ᵀx`` (the transpose solve's, residual checks and the
    dense build included), ``jvps`` the products ``(∂F/∂w)x`` (``NormalCG`` only). ``condition_norm``
    is ``‖F(w, λ)‖`` (for a fixed point ``‖w − T(w, λ)‖``): the derivative is that of the root, so it
    should be small.
    """

    @property
    def vjps(self) -> int:
        return self.hvps - self.transposed

    @property
    def jvps(self) -> int:
        return self.transposed
