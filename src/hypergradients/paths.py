"""The path methods: differentiate ``steps`` steps of gradient descent from the given weights.

:class:`Unrolled` (reverse mode, optionally truncated or checkpointed) and :class:`Forward`
(forward mode) own their computation, which is :mod:`hypergradients.unroll`'s. They keep nothing
between calls: a state passes through them with only its call count advanced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import tree
from .derivatives import HvpMode, LossFn, grad, scalar_loss, used_keys
from .errors import HypergradientError
from .protocol import Info, PathMethod, positive_int, report_unused
from .state import SolverState
from .tree import Tree
from .unroll import checkpoint_interval
from .unroll import forward as forward_path
from .unroll import reverse as reverse_path


def _validate_path(name: str, steps: object, lr: object, truncate: object) -> None:
    positive_int(f"{name}.steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float, str)):
        raise HypergradientError(f"{name}.lr must be a number or a key of hparams, got {lr!r}")
    if not isinstance(lr, str) and not (lr > 0 and math.isfinite(lr)):
        raise HypergradientError(f"{name}.lr must be a finite number > 0, got {lr!r}")
    if truncate is not None:
        positive_int(f"{name}.truncate", truncate)
        assert isinstance(truncate, int) and isinstance(steps, int)
        if truncate > steps:
            raise HypergradientError(f"{name}.truncate={truncate} exceeds steps={steps}")


@dataclass(frozen=True)
class Unrolled(PathMethod):
    """Reverse-mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w`` from the given weights.

    ``truncate=T`` differentiates only the last T steps. ``lr`` is a number, or the name of a
    scalar entry of ``hparams`` whose hypergradient is then returned too.

    ``checkpoint`` trades compute for memory: ``None``/``False`` keeps the graph of every step
    (memory ``O(T)``); ``True`` stores only every ``⌈√T⌉``-th iterate and recomputes one segment
    at a time in the backward sweep (memory ``O(√T)``, one extra forward pass); an int ``s``
    stores every s-th. The result is the same derivative (equal to float64 rounding).
    """

    steps: int = 100
    lr: float | str = 0.1
    truncate: int | None = None
    checkpoint: bool | int | None = None

    def __post_init__(self) -> None:
        _validate_path("Unrolled", self.steps, self.lr, self.truncate)
        if self.checkpoint is not None and not isinstance(self.checkpoint, bool):
            positive_int("Unrolled.checkpoint", self.checkpoint)

    def compute(self, outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
                state: SolverState | None, residual: bool, hvp_mode: HvpMode) -> tuple[Tree, Info]:
        g, used, out, w_final = reverse_path(outer_loss, inner_loss, params, lam, steps=self.steps,
                                             lr=self.lr, truncate=self.truncate, checkpoint=self.checkpoint)
        report_unused(lam, used, self)
        extra = {"truncate": float(self.truncate or self.steps)}
        if self.checkpoint:
            every = checkpoint_interval(self.truncate or self.steps, self.checkpoint)
            extra["checkpoint"] = float(every or 0)
        return g, Info(type(self).__name__, self.steps, self.steps, None, None, direct=tree.zeros_like(lam),
                       final_params=tree.detach(w_final), outer_loss=float(out), extra=extra,
                       state=SolverState() if state is None else state)


def _path_used(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree,
               lr: float | str) -> set[str]:
    """Hyperparameters the path can depend on: those in ``∂L_T/∂w`` or ``L_V`` (by autograd's graph, not
    by value), and the step size when it is one."""
    w = tree.clone_leaves(params, requires_grad=True)
    inner = scalar_loss(inner_loss, w, lam, name="inner_loss")
    gw = grad(inner, w, create_graph=True)
    probe = scalar_loss(outer_loss, w, lam, name="outer_loss") + sum(
        (gk.sum() for gk in gw.values() if gk.requires_grad), torch.zeros((), dtype=inner.dtype))
    used = used_keys(probe, lam)
    if isinstance(lr, str):
        used.add(lr)
    return used


@dataclass(frozen=True)
class Forward(PathMethod):
    """Forward mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w``: the derivative of :class:`Unrolled`.

    Propagates ``∂w_k/∂λ`` along the path with ``torch.func.jvp``, one tangent per scalar
    hyperparameter (``chunk`` of them batched with ``vmap``): memory independent of ``steps``,
    cost ``∝`` the number of hyperparameters. The natural choice for a few hyperparameters, such
    as a learning rate (``lr="<key>"``). The losses must be ``torch.func``-compatible (no
    ``.item()``, no in-place updates of their inputs).
    """

    steps: int = 100
    lr: float | str = 0.1
    truncate: int | None = None
    chunk: int | None = 64

    def __post_init__(self) -> None:
        _validate_path("Forward", self.steps, self.lr, self.truncate)
        if self.chunk is not None:
            positive_int("Forward.chunk", self.chunk)

    def compute(self, outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
                state: SolverState | None, residual: bool, hvp_mode: HvpMode) -> tuple[Tree, Info]:
        report_unused(lam, _path_used(outer_loss, inner_loss, params, lam, self.lr), self)
        g, out_f, w_final, jvps = forward_path(outer_loss, inner_loss, params, lam, steps=self.steps,
                                               lr=self.lr, truncate=self.truncate, chunk=self.chunk)
        return g, Info(type(self).__name__, self.steps, jvps, None, None, direct=tree.zeros_like(lam),
                       final_params=tree.detach(w_final), outer_loss=out_f,
                       extra={"truncate": float(self.truncate or self.steps), "jvps": float(jvps)},
                       state=SolverState() if state is None else state)
