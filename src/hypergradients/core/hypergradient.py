""":func:`hypergradient`, the one call behind every method, and what both doors share.

Conventions. Weights ``w``, hyperparameters ``λ``, inner loss ``L_T(w, λ)``, outer loss
``L_V(w, λ)``. The hypergradient, the direction to *descend*, is

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p,     p ≈ H⁻¹ ∂L_V/∂w,   H = ∂²L_T/∂w∂wᵀ at (w, λ).

Implicit methods (the implicit function theorem at the given weights, taken as ``w*``; see
:mod:`.implicit`) differ only in how ``p`` is found (:mod:`.solvers`); path methods (:class:`Unrolled`,
:class:`Forward`) instead differentiate K steps of training from the given weights. Every method is
a strategy object that owns its computation (:mod:`.method`): this module checks the inputs and the
state, calls ``method.compute``, and finishes the result. :func:`~.roots.root_hypergradient` is the
other door onto the same theorem.

Consecutive hypergradients (Algorithm 1) carry a state (``state=``, returned as ``info.state``):
CG, Auto and the other Krylov methods start from the previous solve's ``p``, which after a small
step of ``w`` and ``λ`` is already close; Neumann reuses its ``λ_max``; Nyström its sketch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Literal, overload

from torch import Tensor

from . import tree
from .derivatives import HvpMode, LossFn
from .errors import HypergradientError, NonFiniteHypergradientError
from .info import Info
from .method import Method
from .solvers import CG
from .state import SolverState
from .tree import Tree

__all__ = ["hypergradient"]

_METHOD_NAMES = (
    "hg.Auto, hg.Exact, hg.CG, hg.Neumann, hg.Identity, hg.Nystrom, hg.MINRES, hg.GMRES, "
    "hg.BiCGStab, hg.NormalCG, hg.Unrolled, hg.Forward, hg.FirstOrder"
)


def validate_tree(name: str, t: object) -> dict[str, Tensor]:
    """``t`` as a dict of floating-point tensors under string keys; the error names the bad entry."""
    if not isinstance(t, Mapping):
        raise HypergradientError(
            f"{name} must be a dict[str, Tensor] (e.g. "
            f"dict(model.named_parameters())), got {type(t).__name__}"
        )
    if not t:
        raise HypergradientError(f"{name} is empty")
    for k, v in t.items():
        if not isinstance(k, str):
            raise HypergradientError(f"{name} keys must be strings, got {k!r}")
        if not isinstance(v, Tensor):
            raise HypergradientError(f"{name}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise HypergradientError(
                f"{name}[{k!r}] must be a floating-point tensor to be differentiated, got dtype {v.dtype}"
            )
    return dict(t)


def check_state(method: Method, state: object) -> SolverState | None:
    """``state`` if ``method`` can continue from it (``None``: not carried); errors name the fix."""
    if state is None:
        return None
    if not isinstance(state, SolverState):
        raise HypergradientError(f"state must be a hg.SolverState (or None), got {type(state).__name__}")
    method.check_state(state)
    return state


def finish(
    g: Tree,
    info: Info,
    hparams: Mapping[str, Tensor],
    method: Method,
    state: SolverState | None,
    t0: float,
    *,
    hint: str,
) -> tuple[Tree, Info]:
    """The result with the keys, dtypes and devices of ``hparams``; a non-finite entry raises
    :class:`~hypergradients.NonFiniteHypergradientError` naming its key (``hint``: what to check);
    ``info.state`` stamped with the method's name and the number of calls."""
    name = type(method).__name__
    result = {k: g[k].detach().to(dtype=hparams[k].dtype, device=hparams[k].device) for k in hparams}
    bad = tree.first_nonfinite(result)
    if bad is not None:
        raise NonFiniteHypergradientError(
            f"the hypergradient of {bad!r} is not finite ({name}); {hint}", key=bad, method=name
        )
    calls = 0 if state is None else state.calls
    info.state = (info.state or SolverState()).replace(method=name, calls=calls + 1)
    info.time_s = time.perf_counter() - t0
    return result, info


@overload
def hypergradient(
    outer_loss: LossFn,
    inner_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    method: Method | None = ...,
    return_info: Literal[False] = ...,
    residual: bool | None = ...,
    hvp_mode: HvpMode = ...,
    state: SolverState | None = ...,
) -> Tree: ...


@overload
def hypergradient(
    outer_loss: LossFn,
    inner_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    method: Method | None = ...,
    return_info: Literal[True],
    residual: bool | None = ...,
    hvp_mode: HvpMode = ...,
    state: SolverState | None = ...,
) -> tuple[Tree, Info]: ...


def hypergradient(
    outer_loss: LossFn,
    inner_loss: LossFn,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    method: Method | None = None,
    return_info: bool = False,
    residual: bool | None = None,
    hvp_mode: HvpMode = "reverse",
    state: SolverState | None = None,
) -> Tree | tuple[Tree, Info]:
    """The hypergradient ``dL_V/dλ`` at weights ``params`` and hyperparameters ``hparams``.

    Args:
        outer_loss: ``(params, hparams) -> scalar tensor``, the validation loss ``L_V``.
        inner_loss: ``(params, hparams) -> scalar tensor``, the training loss ``L_T``.
        params: ``dict[str, Tensor]`` of weights; for implicit methods, trained weights ``≈ w*``;
            for :class:`Unrolled`, the starting point (constant w.r.t. ``λ``).
        hparams: ``dict[str, Tensor]`` of floating-point hyperparameters.
        method: :class:`Exact`, :class:`CG` (default ``CG()``), :class:`Neumann`,
            :class:`Identity`, :class:`Nystrom`, :class:`Auto`, :class:`MINRES`, :class:`GMRES`,
            :class:`BiCGStab`, :class:`NormalCG` (implicit; MINRES and GMRES also solve an indefinite
            Hessian, weights at a saddle, without damping), a solver of your own
            (:class:`ImplicitMethod`), :class:`Unrolled`, :class:`Forward`, or :class:`FirstOrder`
            (first-order gradients only: no HVP, no double backward; ``hvp_mode`` and ``residual``
            do not apply to it).
        return_info: also return an :class:`Info`.
        residual: whether to report ``‖Hp − v‖/‖v‖`` in ``info.residual`` (implicit methods).
            ``None`` (default): only when ``return_info=True``, since nobody else sees it;
            ``True``: always; ``False``: never. It costs one extra HVP for Neumann, Identity and
            Nyström, none for CG, Auto and Exact (their solvers have it anyway) and one per pass
            or restart for MINRES, GMRES, BiCGStab and NormalCG (which check the true residual
            to stop). So with ``return_info=False`` ``Identity`` spends 0 HVPs and
            ``Neumann(iters=K)`` ``K−1``.
        hvp_mode: ``"reverse"`` (double-backward through a gradient graph built once),
            ``"forward"`` (forward-over-reverse with ``torch.func``), or ``"finite-difference"``
            (first-order gradients only, for operations without double backward; see
            :mod:`hypergradients.core.derivatives`).
        state: the previous call's state (``info.state``), or ``SolverState()`` /
            ``method.init(params)`` for the first call; ``None``: nothing is carried. The Krylov
            methods (CG, Auto, MINRES, GMRES, BiCGStab, NormalCG) start from its ``p``
            (``info.extra["warm_start"]`` is 1 when used), Auto also keeps its curvature
            estimate, :class:`Neumann` its ``λ_max``, :class:`Nystrom` its sketch. The next state
            is ``info.state``, a new value of the method's own type (``hg.CGState``, ...); the
            state passed is never changed, so pass ``info.state`` on to the next call. Another
            method's state, or one of other weights, raises :class:`~hypergradients.StateMismatchError`.

    Returns:
        A dict with the keys, shapes, dtypes and devices of ``hparams`` (and the :class:`Info`).
        Inputs are never modified. A non-finite result raises
        :class:`~hypergradients.NonFiniteHypergradientError` (``.key``: the first bad key).
    """
    t0 = time.perf_counter()
    method = CG() if method is None else method
    if not isinstance(method, Method):
        raise HypergradientError(f"method must be one of {_METHOD_NAMES}; got {method!r}")
    state = check_state(method, state)
    params = validate_tree("params", params)
    hparams = validate_tree("hparams", hparams)
    if not callable(outer_loss) or not callable(inner_loss):
        raise HypergradientError("outer_loss and inner_loss must be callables (params, hparams) -> scalar")
    lam = tree.clone_leaves(hparams, requires_grad=True)
    g, info = method.compute(
        outer_loss,
        inner_loss,
        params,
        lam,
        state=state,
        residual=return_info if residual is None else bool(residual),
        hvp_mode=hvp_mode,
    )
    result, info = finish(
        g,
        info,
        hparams,
        method,
        state,
        t0,
        hint="check the losses at these weights, or the method's settings",
    )
    return (result, info) if return_info else result
