r"""The implicit function theorem, once, for every condition and every solver.

Let ``w*(λ)`` satisfy ``F(w*(λ), λ) = 0``, with ``∂F/∂w`` square and non-singular at ``(w*, λ)``.
Differentiating the identity gives ``(∂F/∂w)·dw*/dλ + ∂F/∂λ = 0``, so for the outer loss ``L_V``

    dL_V/dλ = ∂L_V/∂λ + (dw*/dλ)ᵀ ∂L_V/∂w = ∂L_V/∂λ − (∂F/∂λ)ᵀ p,      (∂F/∂w)ᵀ p = v = ∂L_V/∂w,

one transpose solve and one vector-Jacobian product; the mixed partial is never formed. The
result does not change when ``F`` is scaled or negated (``∂F/∂w`` and ``∂F/∂λ`` change together),
and it is the gradient to *descend*. For a minimum, ``F = ∂L_T/∂w``: ``∂F/∂w = H`` and
``(∂F/∂λ)ᵀp = (∂²L_T/∂λ∂wᵀ) p``, the library's ``∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) H⁻¹∂L_V/∂w``.

:func:`implicit` is that formula: the condition (:mod:`.conditions`) gives the operator and the
mixed product, the method (:class:`~hypergradients.ImplicitMethod`) solves. Both doors,
:func:`~hypergradients.hypergradient` and :func:`~hypergradients.root_hypergradient`, call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from . import distributed, tree
from .conditions import Condition, Stationarity
from .errors import PathOnlyHyperparameterError, UnusedHyperparameterWarning, warn_user
from .info import Info, Stats
from .operators import LinearOperator
from .state import SolverState
from .tree import Tree


class Solver(Protocol):
    """What :func:`implicit` needs of a method (:class:`~hypergradients.ImplicitMethod` is one): check
    that it can solve with the condition's operator, give its state for a skipped solve, and solve."""

    def check_condition(self, cond: Condition) -> None: ...

    def own_state(self, state: SolverState | None) -> SolverState: ...

    def solve(
        self, op: LinearOperator, v: Tree, state: SolverState | None, *, residual: bool = False
    ) -> tuple[Tree, SolverState, Stats]: ...


def partials(outer: Tensor, w: Tree, lam: Tree, value: Tree) -> tuple[Tree, Tree, set[str], Tree]:
    """``∂L_V/∂w``, ``∂L_V/∂λ`` (zeros where unused) in one backward pass of ``outer``, the λ keys
    ``L_V`` uses, and the condition's ``value``; in a data-parallel group the three group means in one
    all-reduce."""
    both = list(w.values()) + list(lam.values())
    raw = torch.autograd.grad(outer, both, allow_unused=True) if outer.requires_grad else (None,) * len(both)
    used = {k for k, gk in zip(lam, raw[len(w) :], strict=True) if gk is not None}
    v, direct, F = distributed.average(
        [tree.as_tree(raw[: len(w)], w), tree.as_tree(raw[len(w) :], lam), tree.detach(value)]
    )
    return v, direct, used, F


# Names that, unused by both losses, are almost surely step sizes or momenta.
_PATH_NAMES = ("lr", "learning_rate", "step_size", "stepsize", "momentum", "beta1", "beta2")


def _looks_path_only(key: str) -> bool:
    last = key.lower().replace("-", "_").split(".")[-1]
    return last in _PATH_NAMES or last.endswith("_lr") or last.endswith("_learning_rate")


def report_unused(
    hparams: Mapping[str, Tensor],
    used: set[str],
    *,
    method: str,
    implicit_minimum: bool,
    condition: str = "∂L_T/∂w",
) -> None:
    """Warn about hyperparameters neither ``condition`` nor ``L_V`` uses.

    ``implicit_minimum``: the method differentiates a minimum of the training loss implicitly, so a
    hyperparameter that only shapes the path to it cannot be seen: one that looks like a step size
    or momentum is refused (its zero would be silent), the others get a hint.
    """
    unused = [k for k in hparams if k not in used]
    if not unused:
        return
    path_like = [k for k in unused if _looks_path_only(k)] if implicit_minimum else []
    if path_like:
        raise PathOnlyHyperparameterError(
            f"hyperparameter(s) {path_like} appear in neither inner_loss nor outer_loss: they look like "
            "step sizes or momenta, which only change the optimisation path. Implicit methods "
            f"({method}) differentiate the optimum, which does not depend on them, so their "
            "hypergradient would be a silent zero. Use hg.Unrolled(steps=..., lr=<key>) to differentiate "
            "through the training path instead."
        )
    hint = (
        (
            " If it only changes the optimisation path (a step size, momentum), implicit methods cannot "
            "see it: use hg.Unrolled."
        )
        if implicit_minimum
        else ""
    )
    warn_user(
        f"hyperparameter(s) {unused} affect neither {condition} nor L_V: their hypergradient is zero.{hint}",
        UnusedHyperparameterWarning,
    )


def implicit(
    outer: Tensor,
    cond: Condition,
    w: Tree,
    lam: Tree,
    method: Solver,
    state: SolverState | None,
    *,
    residual: bool,
    info_type: type[Info] = Info,
) -> tuple[Tree, Info]:
    """``dL_V/dλ`` at ``(w, λ)``, a solution of ``cond``, and its :class:`Info` (``info.state``: the next
    state).

    ``outer`` is ``L_V(w, λ)`` with its graph to the leaves ``w`` and ``lam``; ``cond`` the condition
    at the same point; ``method`` solves ``(∂F/∂w)ᵀ p = ∂L_V/∂w`` from ``state`` (``None``: not carried).
    ``residual``: report ``‖(∂F/∂w)ᵀp − v‖/‖v‖`` (one more product where the solver lacks it).
    """
    method.check_condition(cond)
    v, direct, used, F = partials(outer, w, lam, cond.value())
    op = cond.operator()
    if float(tree.norm(v)) == 0.0:  # L_V does not depend on w: p = 0 whatever the operator
        p, next_state, stats = tree.zeros_like(v), method.own_state(state), Stats(0, 0.0, True)
    else:
        p, next_state, stats = method.solve(op, v, state, residual=residual)
    indirect, used_by_condition = cond.mixed_vjp(p)
    name = type(method).__name__
    report_unused(
        lam,
        used | used_by_condition,
        method=name,
        implicit_minimum=isinstance(cond, Stationarity),
        condition=cond.name,
    )
    info = info_type(
        name,
        stats.iterations,
        op.products,
        stats.residual if residual else None,
        stats.converged,
        direct=tree.detach(direct),
        outer_loss=float(outer.detach()),
        extra={**stats.extra, **cond.facts()},
        state=next_state,
        condition_norm=float(tree.norm(F)),
        transposed=op.transposed,
    )
    return tree.sub(direct, indirect), info
