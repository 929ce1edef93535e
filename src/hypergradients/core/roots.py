r""":func:`root_hypergradient`: hypergradients through any optimality condition, a root ``F(w, λ) = 0``
or a fixed point ``w = T(w, λ)``.

The same theorem as :func:`~hypergradients.hypergradient` (:mod:`.implicit`), with the condition
given as a function instead of a training loss (:class:`~.conditions.Root`):

    dL_V/dλ = ∂L_V/∂λ − (∂F/∂λ)ᵀ u,      (∂F/∂w)ᵀ u = ∂L_V/∂w,

all at the given weights, which must be the root. Each product ``(∂F/∂w)ᵀx`` is one VJP of ``F``
through a graph built once: ``F`` itself is only differentiated once (no double backward of ``F``).

* **Minimisation** (``F = ∂L_T/∂w``): ``∂F/∂w = H`` is the symmetric Hessian and the formula is the
  library's ``∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) H⁻¹∂L_V/∂w``.
* **Fixed point** ``w = T(w, λ)`` (``fixed_point=True``): the condition used is ``F = w − T(w, λ)``
  (the same hypergradient as ``T − w``), so ``∂F/∂w = I − J`` with ``J = ∂T/∂w`` and

      dL_V/dλ = ∂L_V/∂λ + (∂T/∂λ)ᵀ (I − Jᵀ)⁻¹ ∂L_V/∂w.

  ``I − J`` has eigenvalues with positive real part when ``T`` is a contraction (``‖J‖ < 1``), and
  then the Neumann series ``(I − Jᵀ)⁻¹ v = Σ_j (Jᵀ)^j v`` converges (``hg.Neumann``'s
  ``alpha="auto"`` is 1 here).

Any implicit method solves ``(∂F/∂w)ᵀ u = v`` (:class:`~hypergradients.GMRES` by default; a solver
of your own as well). ``∂F/∂w`` is in general not symmetric, so CG, Auto, Nyström and MINRES are
refused unless the condition is declared ``symmetric=True``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal, overload

from torch import Tensor

from . import tree
from .conditions import ConditionFn, Root, RootMode
from .derivatives import LossFn, scalar_loss
from .errors import HypergradientError
from .hypergradient import check_state, finish, validate_tree
from .implicit import implicit
from .info import RootInfo
from .method import ImplicitMethod
from .solvers import GMRES
from .state import SolverState
from .tree import Tree

__all__ = ["RootInfo", "root_hypergradient"]

_METHOD_NAMES = (
    "an implicit method: hg.GMRES (default), hg.BiCGStab, hg.NormalCG, hg.Exact, hg.Neumann, "
    "hg.Identity, or, for a condition declared symmetric=True, hg.MINRES, hg.CG, hg.Auto, "
    "hg.Nystrom; or a solver of your own (hg.ImplicitMethod)"
)


@overload
def root_hypergradient(
    outer_loss: LossFn,
    condition: ConditionFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    fixed_point: bool = ...,
    symmetric: bool = ...,
    method: ImplicitMethod | None = ...,
    return_info: Literal[False] = ...,
    residual: bool | None = ...,
    hvp_mode: RootMode = ...,
    state: SolverState | None = ...,
) -> Tree: ...


@overload
def root_hypergradient(
    outer_loss: LossFn,
    condition: ConditionFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    fixed_point: bool = ...,
    symmetric: bool = ...,
    method: ImplicitMethod | None = ...,
    return_info: Literal[True],
    residual: bool | None = ...,
    hvp_mode: RootMode = ...,
    state: SolverState | None = ...,
) -> tuple[Tree, RootInfo]: ...


def root_hypergradient(
    outer_loss: LossFn,
    condition: ConditionFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    fixed_point: bool = False,
    symmetric: bool = False,
    method: ImplicitMethod | None = None,
    return_info: bool = False,
    residual: bool | None = None,
    hvp_mode: RootMode = "reverse",
    state: SolverState | None = None,
) -> Tree | tuple[Tree, RootInfo]:
    """``dL_V/dλ`` at a root ``F(w, λ) = 0`` (or a fixed point ``w = T(w, λ)``) of any optimality condition.

    ``dL_V/dλ = ∂L_V/∂λ − (∂F/∂λ)ᵀ u`` with ``(∂F/∂w)ᵀ u = ∂L_V/∂w``, all at the given weights,
    which must be the root (the module docstring derives it). With ``F = ∂L_T/∂w`` this is
    :func:`hypergradients.hypergradient`; ``F`` may also be a deep-equilibrium layer's
    ``f(z, x) − z``, a proximal-gradient step's fixed point, or any non-symmetric condition.

    Args:
        outer_loss: ``(params, hparams) -> scalar tensor``, ``L_V``.
        condition: ``(params, hparams) -> dict`` with the keys and shapes of ``params``: ``F(w, λ)``,
            or with ``fixed_point=True`` the map ``T(w, λ)``. Differentiated once per product (one
            VJP), so its operations need a first derivative only.
        params: ``dict[str, Tensor]``, the root ``w*`` (for a fixed point, ``w* = T(w*, λ)``).
        hparams: ``dict[str, Tensor]`` of floating-point hyperparameters.
        fixed_point: ``condition`` is ``T`` and the condition is ``w − T(w, λ) = 0``.
        symmetric: ``∂F/∂w`` is symmetric (``F`` is the gradient of some loss): admits hg.MINRES,
            hg.CG, hg.Auto and hg.Nystrom, and ``hvp_mode="finite-difference"``.
        method: the solver of ``(∂F/∂w)ᵀ u = ∂L_V/∂w``: :class:`GMRES` (default ``GMRES()``),
            :class:`BiCGStab`, :class:`NormalCG`, ``hg.Exact``, ``hg.Neumann``, ``hg.Identity``, a
            solver of your own; with ``symmetric=True`` also the symmetric ones.
        return_info: also return a :class:`RootInfo`.
        residual: report ``‖(∂F/∂w)ᵀu − v‖/‖v‖``: ``None`` (default) only with ``return_info``. Free
            for the Krylov methods and Exact; one VJP for Neumann.
        hvp_mode: ``"reverse"`` (default: VJPs of ``F``) or ``"finite-difference"`` (central
            differences of ``F``, no derivative of it at all; needs ``symmetric=True``, since they
            give ``(∂F/∂w)x`` and not the transpose, and costs ``2·n_λ`` evaluations of ``F`` for the
            mixed product; see :class:`~hypergradients.core.conditions.Root`).
        state: the previous call's ``info.state`` (warm starts, as for ``hypergradient``), or
            ``SolverState()`` for the first call; ``None``: nothing is carried.

    Inside :func:`hypergradients.distributed.data_parallel` every product of ``F`` is the group mean
    (each rank passes the condition on its own shard), as for ``hypergradient``.

    Returns:
        A dict with the keys, shapes, dtypes and devices of ``hparams`` (and the :class:`RootInfo`).
        Inputs are never modified. A non-finite result raises
        :class:`~hypergradients.NonFiniteHypergradientError`.
    """
    t0 = time.perf_counter()
    method = GMRES() if method is None else method
    if not isinstance(method, ImplicitMethod):
        raise HypergradientError(f"method must be {_METHOD_NAMES}; got {method!r}")
    state = check_state(method, state)
    params = validate_tree("params", params)
    hparams = validate_tree("hparams", hparams)
    if not callable(outer_loss) or not callable(condition):
        raise HypergradientError("outer_loss and condition must be callables of (params, hparams)")
    w = tree.clone_leaves(params, requires_grad=True)
    lam = tree.clone_leaves(hparams, requires_grad=True)
    outer = scalar_loss(outer_loss, w, lam, name="outer_loss")
    cond = Root(condition, w, lam, fixed_point=fixed_point, symmetric=symmetric, hvp_mode=hvp_mode)
    g, info = implicit(
        outer,
        cond,
        w,
        lam,
        method,
        state,
        residual=return_info if residual is None else bool(residual),
        info_type=RootInfo,
    )
    result, info = finish(
        g,
        info,
        hparams,
        method,
        state,
        t0,
        hint="the Jacobian ∂F/∂w may be singular here, or the solver diverged",
    )
    return (result, info) if return_info else result  # type: ignore[return-value]
