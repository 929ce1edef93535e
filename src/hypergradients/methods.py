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

Every method is a strategy object that owns its computation (:mod:`.protocol`): the implicit
ones are solvers ``solve(op, v, state) -> (p, state, stats)`` on the Hessian operator
(:mod:`.solvers`, :mod:`.operators`), the path ones call :mod:`.unroll` (:mod:`.paths`). This
module only checks the inputs and the state, and calls ``method.compute``.

Consecutive hypergradients (Algorithm 1) carry a :class:`SolverState` (``state=``, returned as
``info.state``): CG and Auto start from the previous solve's ``p``, which after a small step of
``w`` and ``λ`` is already close; Neumann reuses its ``λ_max``; Nyström its sketch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal, overload

from torch import Tensor

from . import tree
from .derivatives import HvpMode, LossFn
from .errors import HypergradientError
from .paths import Forward, Unrolled
from .protocol import (
    ImplicitMethod,
    IndefiniteHessianWarning,
    Info,
    Method,
    PathMethod,
    Stats,
    UnusedHyperparameterWarning,
)
from .solvers import CG, Auto, Exact, Identity, Neumann, Nystrom
from .state import SolverState, StateMismatchError
from .tree import Tree

__all__ = ["CG", "Auto", "Exact", "Forward", "HvpMode", "Identity", "ImplicitMethod",
           "IndefiniteHessianWarning", "Info", "LossFn",
           "Method", "Neumann", "Nystrom", "PathMethod", "SolverState", "StateMismatchError", "Stats",
           "Unrolled", "UnusedHyperparameterWarning", "hypergradient"]

_METHOD_NAMES = "hg.Auto, hg.Exact, hg.CG, hg.Neumann, hg.Identity, hg.Nystrom, hg.Unrolled, hg.Forward"


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
        hvp_mode: ``"reverse"`` (double-backward through a gradient graph built once),
            ``"forward"`` (forward-over-reverse with ``torch.func``), or ``"finite-difference"``
            (first-order gradients only, for operations without double backward; see
            :mod:`hypergradients.derivatives`).
        state: the previous call's :class:`SolverState` (``info.state``), or ``SolverState()`` /
            ``method.init(params)`` for the first call. :class:`CG` and :class:`Auto` start from
            its ``p`` (``info.extra["warm_start"]`` is 1 when used), Auto also keeps its curvature
            estimate, :class:`Neumann` its ``λ_max``, :class:`Nystrom` its sketch. The next state
            is ``info.state``; the object passed is also updated in place to equal it, so code
            that passes one object to every call keeps working. Another method's state, or one
            of other weights, raises :class:`~hypergradients.StateMismatchError`.

    Returns:
        A dict with the keys, shapes, dtypes and devices of ``hparams`` (and the :class:`Info`).
        Inputs are never modified.
    """
    t0 = time.perf_counter()
    method = CG() if method is None else method
    if not isinstance(method, Method):
        raise HypergradientError(f"method must be one of {_METHOD_NAMES}; got {method!r}")
    if state is not None and not isinstance(state, SolverState):
        raise HypergradientError(f"state must be a hg.SolverState (or None), got {type(state).__name__}")
    params = _validate_tree("params", params, floating=True)
    hparams = _validate_tree("hparams", hparams, floating=True)
    if not callable(outer_loss) or not callable(inner_loss):
        raise HypergradientError("outer_loss and inner_loss must be callables (params, hparams) -> scalar")
    if state is not None:
        method.check_state(state)
    lam = tree.clone_leaves(hparams, requires_grad=True)
    g, info = method.compute(outer_loss, inner_loss, params, lam, state=state,
                             residual=return_info if residual is None else bool(residual), hvp_mode=hvp_mode)
    result = {k: g[k].detach().to(dtype=hparams[k].dtype, device=hparams[k].device) for k in hparams}
    bad = tree.first_nonfinite(result)
    if bad is not None:
        raise HypergradientError(f"the hypergradient of {bad!r} is not finite ({type(method).__name__}); "
                                 "check the losses at these weights, or the method's settings")
    calls = 0 if state is None else state.calls
    info.state = (info.state or SolverState()).replace(method=type(method).__name__, calls=calls + 1)
    if state is not None:
        state.assign(info.state)  # the documented compatibility convenience: see SolverState
    info.time_s = time.perf_counter() - t0
    return (result, info) if return_info else result
