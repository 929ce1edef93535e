"""The Hessian as a linear operator on trees: what every inverse-HVP solver is given.

``A = H + σI`` with ``H = ∂²L_T/∂w∂wᵀ`` at fixed ``(w, λ)``, applied through Hessian-vector
products only. Damping and shifts are transforms of the operator, not solver options:
``op.damped(δ)`` is ``H + δI`` (Levenberg damping, ``δ ≥ 0``), ``op.shifted(μ)`` is ``H + μI``
for any real ``μ`` (``op.shifted(-μ)`` is the ``H − μI`` that floor-aware Nyström sketches). A
transformed operator shares the products, and the count, of the one it came from. The shift
is applied as ``torch.add(Hx, x, alpha=σ)``, bit for bit what the solvers did before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from . import tree
from .derivatives import InnerDerivatives
from .errors import HypergradientError
from .tree import Tree

MatVec = Callable[[Tree], Tree]


class _Counter:
    """Hessian-vector products spent, shared by an operator and its transforms."""

    def __init__(self) -> None:
        self.n = 0


class HessianOperator:
    """``x ↦ (H + σI) x`` on trees (``dict[str, Tensor]``), symmetric.

    Args:
        matvec: ``x ↦ Hx`` for one tree.
        batched_matvec: ``X ↦ HX`` for a tree whose leaves have a leading batch dimension
            (one ``vmap``-ed backward pass); ``None``: a loop over ``matvec``.
        shift: ``σ``, added as ``σx`` (0 by default).

    ``hvps`` counts the products of ``H`` spent so far (a batch of m counts m), across this
    operator and every operator :meth:`shifted`/:meth:`damped` derives from it. Calling the
    operator, ``op(x)``, is ``op.mv(x)``: it is a ``matvec`` wherever one is expected.
    """

    def __init__(self, matvec: MatVec, batched_matvec: MatVec | None = None, *, shift: float = 0.0,
                 _counter: _Counter | None = None) -> None:
        if not math.isfinite(shift):
            raise HypergradientError(f"HessianOperator shift must be finite, got {shift!r}")
        self._matvec = matvec
        self._batched = batched_matvec
        self.shift = float(shift)
        self._counter = _Counter() if _counter is None else _counter

    @classmethod
    def of(cls, derivatives: InnerDerivatives) -> HessianOperator:
        """The Hessian of ``L_T`` at the point of ``derivatives`` (its products and batched products)."""
        return cls(derivatives.hvp, derivatives.hvp_batched)

    @property
    def hvps(self) -> int:
        return self._counter.n

    def mv(self, x: Mapping[str, Tensor]) -> Tree:
        """``(H + σI) x``: one Hessian-vector product."""
        self._counter.n += 1
        hx = self._matvec(dict(x))
        return hx if self.shift == 0.0 else tree.axpy(self.shift, x, hx)

    __call__ = mv

    def mv_batched(self, xs: Mapping[str, Tensor]) -> Tree:
        """``(H + σI) x_i`` for every ``x_i`` of a batch (leaves with a leading dimension m): m products."""
        m = next(iter(xs.values())).shape[0]
        if self._batched is None:
            cols = [self._matvec({k: t[i] for k, t in xs.items()}) for i in range(m)]
            hx: Tree = {k: torch.stack([c[k] for c in cols]) for k in xs}
        else:
            hx = self._batched(dict(xs))
        self._counter.n += m
        return hx if self.shift == 0.0 else tree.axpy(self.shift, xs, hx)

    def shifted(self, mu: float) -> HessianOperator:
        """``H + (σ + μ)I``: the same products, shifted by ``μ`` (any sign)."""
        return HessianOperator(self._matvec, self._batched, shift=self.shift + float(mu),
                               _counter=self._counter)

    def damped(self, delta: float) -> HessianOperator:
        """``H + (σ + δ)I`` with ``δ ≥ 0``: Levenberg damping, which makes ``H + δI`` positive
        definite once ``δ > −λ_min(H)``."""
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (
                delta >= 0 and math.isfinite(delta)):
            raise HypergradientError(f"damping must be a finite number >= 0, got {delta!r}")
        return self if delta == 0 else self.shifted(delta)
