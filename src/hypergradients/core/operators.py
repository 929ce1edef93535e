"""Linear operators on trees: the matrix every solver is given.

The implicit function theorem needs one linear solve with the transpose Jacobian of the optimality
condition ``F(w, λ) = 0``: ``M p = v`` with ``M = (∂F/∂w)ᵀ``. A :class:`LinearOperator` is ``M``,
applied through products only: ``op(x) = Mx`` (:meth:`~LinearOperator.mv`), a batch of products
at once (:meth:`~LinearOperator.mv_batched`), and the transpose product ``Mᵀx = (∂F/∂w)x``
(:meth:`~LinearOperator.rmv`, for solvers on the normal equations).

* For a minimum, ``F = ∂L_T/∂w`` and ``M = H = ∂²L_T/∂w∂wᵀ``, symmetric: :class:`HessianOperator`,
  whose products are Hessian-vector products.
* For a root or fixed point of another condition (:func:`~hypergradients.root_hypergradient`),
  ``M`` is in general not symmetric; its products are vector-Jacobian products of ``F``.

``symmetric`` says which: the solvers that need a symmetric operator (CG, Auto, Nyström, MINRES)
refuse one that is not. Damping and shifts are transforms, not solver options: ``op.damped(δ)``
is ``M + δI`` (Levenberg damping, ``δ ≥ 0``), ``op.shifted(μ)`` is ``M + μI`` for any real ``μ``
(``op.shifted(-μ)`` is the ``H − μI`` that floor-aware Nyström sketches). A transformed operator
shares the products, and their count, with the one it came from. The shift is added as
``torch.add(Mx, x, alpha=σ)``: one rounding, and a dense matrix built from products with the unit
vectors gets exactly ``σ`` on its diagonal.

The operator is the one place where products are counted: ``op.products`` (a batch of m counts m),
of which ``op.transposed`` were products with the transpose.
"""

from __future__ import annotations

import copy
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
    """Products spent, shared by an operator and its transforms."""

    def __init__(self) -> None:
        self.products = 0
        self.transposed = 0


class LinearOperator:
    """``x ↦ (M + σI) x`` on trees (``dict[str, Tensor]``).

    Args:
        matvec: ``x ↦ Mx`` for one tree.
        rmatvec: ``x ↦ Mᵀx``; ``None``: none is available (solvers that need it refuse the
            operator), or, for a symmetric operator, ``matvec`` itself.
        batched: ``X ↦ MX`` for a tree whose leaves have a leading batch dimension (one
            vectorised pass); ``None``: a loop over ``matvec``.
        symmetric: whether ``M = Mᵀ``.
        name: what ``M`` is called in messages (``"H"``, ``"(∂F/∂w)ᵀ"``).
        fixed_point: ``M = I − Jᵀ`` for a fixed point ``w = T(w, λ)`` with ``J = ∂T/∂w``, so that the
            Neumann series with ``α = 1`` is the classic ``Σ_j (Jᵀ)^j``.
        shift: ``σ``, added as ``σx`` (0 by default).

    Calling the operator, ``op(x)``, is ``op.mv(x)``: it is a ``matvec`` wherever one is expected.
    """

    def __init__(
        self,
        matvec: MatVec,
        *,
        rmatvec: MatVec | None = None,
        batched: MatVec | None = None,
        symmetric: bool = False,
        name: str = "M",
        fixed_point: bool = False,
        shift: float = 0.0,
        _counter: _Counter | None = None,
    ) -> None:
        if not math.isfinite(shift):
            raise HypergradientError(f"the operator's shift must be finite, got {shift!r}")
        self._matvec = matvec
        self._rmatvec = rmatvec
        self._batched = batched
        self.symmetric = bool(symmetric)
        self.name = name
        self.fixed_point = bool(fixed_point)
        self.shift = float(shift)
        self._counter = _Counter() if _counter is None else _counter

    @property
    def products(self) -> int:
        """Products with ``M`` or ``Mᵀ`` spent so far, by this operator and every transform of it."""
        return self._counter.products

    @property
    def hvps(self) -> int:
        """:attr:`products` (for a Hessian, the Hessian-vector products)."""
        return self._counter.products

    @property
    def transposed(self) -> int:
        """Of :attr:`products`, those with ``Mᵀ`` (:meth:`rmv` of a non-symmetric operator)."""
        return self._counter.transposed

    def _shift(self, x: Mapping[str, Tensor], mx: Tree) -> Tree:
        return mx if self.shift == 0.0 else tree.axpy(self.shift, x, mx)

    def mv(self, x: Mapping[str, Tensor]) -> Tree:
        """``(M + σI) x``: one product."""
        self._counter.products += 1
        return self._shift(x, self._matvec(dict(x)))

    __call__ = mv

    def mv_batched(self, xs: Mapping[str, Tensor]) -> Tree:
        """``(M + σI) x_i`` for every ``x_i`` of a batch (leaves with a leading dimension m): m products."""
        m = next(iter(xs.values())).shape[0]
        if self._batched is None:
            cols = [self._matvec({k: t[i] for k, t in xs.items()}) for i in range(m)]
            mx: Tree = {k: torch.stack([c[k] for c in cols]) for k in xs}
        else:
            mx = self._batched(dict(xs))
        self._counter.products += m
        return self._shift(xs, mx)

    def rmv(self, x: Mapping[str, Tensor]) -> Tree:
        """``(M + σI)ᵀ x = Mᵀx + σx``: one product (with ``M`` itself when symmetric)."""
        if self.symmetric:
            return self.mv(x)
        if self._rmatvec is None:
            raise HypergradientError(
                f"this operator {self.name} has no transpose product: use a solver "
                "that needs M x only (hg.GMRES, hg.BiCGStab)"
            )
        self._counter.products += 1
        self._counter.transposed += 1
        return self._shift(x, self._rmatvec(dict(x)))

    def shifted(self, mu: float) -> LinearOperator:
        """``M + (σ + μ)I``: the same products, shifted by ``μ`` (any sign)."""
        out = copy.copy(self)  # shares the products and their counter
        shift = self.shift + float(mu)
        if not math.isfinite(shift):
            raise HypergradientError(f"the operator's shift must be finite, got {shift!r}")
        out.shift = shift
        return out

    def damped(self, delta: float) -> LinearOperator:
        """``M + (σ + δ)I`` with ``δ ≥ 0``: Levenberg damping, which makes a symmetric ``M + δI``
        positive definite once ``δ > −λ_min(M)``."""
        if (
            isinstance(delta, bool)
            or not isinstance(delta, (int, float))
            or not (delta >= 0 and math.isfinite(delta))
        ):
            raise HypergradientError(f"damping must be a finite number >= 0, got {delta!r}")
        return self if delta == 0 else self.shifted(delta)


class HessianOperator(LinearOperator):
    """``x ↦ (H + σI) x`` on trees, with ``H = ∂²L_T/∂w∂wᵀ``: the symmetric operator of a minimum.

    Args:
        matvec: ``x ↦ Hx`` for one tree.
        batched_matvec: ``X ↦ HX`` for a tree whose leaves have a leading batch dimension
            (one ``vmap``-ed backward pass); ``None``: a loop over ``matvec``.
        shift: ``σ``, added as ``σx`` (0 by default).

    ``hvps`` (``products``) counts the Hessian-vector products spent so far.
    """

    def __init__(
        self,
        matvec: MatVec,
        batched_matvec: MatVec | None = None,
        *,
        shift: float = 0.0,
        _counter: _Counter | None = None,
    ) -> None:
        super().__init__(
            matvec, batched=batched_matvec, symmetric=True, name="H", shift=shift, _counter=_counter
        )

    @classmethod
    def of(cls, derivatives: InnerDerivatives) -> HessianOperator:
        """The Hessian of ``L_T`` at the point of ``derivatives`` (its products and batched products)."""
        return cls(derivatives.hvp, derivatives.hvp_batched)
