"""The result of every kernel (:class:`Solve`) and the relative residual they report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import tree
from ..operators import LinearOperator
from ..tree import Tree


@dataclass
class Solve:
    """``p ≈ M⁻¹v`` and what the solve found.

    ``iterations`` of the method; ``residual`` ``‖Mp − v‖/‖v‖`` (``None`` where it was not
    computed); ``converged`` whether the method met its own tolerance (``None`` for fixed budgets
    with no tolerance); ``extra`` method-specific facts (``alpha``, ``lambda_max``, ``damping``).
    The products spent are counted by the operator.
    """

    p: Tree
    iterations: int
    residual: float | None
    converged: bool | None
    extra: dict[str, float] = field(default_factory=dict)


def ratio(num: Tensor | float, den: float) -> float:
    """``num/den``, or ``num`` when ``den`` is 0 (a relative quantity of a zero reference)."""
    n = float(num)
    return n / den if den > 0 else n


def relative_residual(op: LinearOperator, p: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> float:
    """``‖op·p − v‖/‖v‖`` (one product); ``‖op·p‖`` when ``v = 0``."""
    return ratio(tree.norm(tree.sub(op(p), v)), float(torch.linalg.vector_norm(tree.flatten(v))))
