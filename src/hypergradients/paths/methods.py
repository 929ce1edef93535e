"""The path methods: differentiate ``steps`` steps of an inner optimizer from the given weights.

:class:`Unrolled` (reverse mode, optionally truncated or checkpointed) and :class:`Forward`
(forward mode) own their computation, which is :mod:`hypergradients.paths.unroll`'s. They keep nothing
between calls: a state passes through them with only its call count advanced.

The inner optimizer is plain gradient descent with ``lr`` (the default), or any differentiable
optimizer of :mod:`hypergradients.optim` given as ``optimizer=`` (its hyperparameters then live
in the optimizer: ``hg.optim.adam(lr="lr")``). With ``batches=`` step ``k`` sees the k-th batch:
the inner loss is then called as ``inner_loss(params, hparams, batch)``; the outer loss stays
``outer_loss(params, hparams)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core import tree
from ..core.derivatives import HvpMode, LossFn, grad, scalar_loss, used_keys
from ..core.errors import HypergradientError
from ..core.method import Info, PathMethod, positive_int, report_unused
from ..core.state import SolverState
from ..core.tree import Tree
from .optim import Optimizer, check_schedules
from .unroll import checkpoint_interval, refuse_once_differentiable, take_batches
from .unroll import forward as forward_path
from .unroll import reverse as reverse_path


def _validate_path(name: str, steps: object, lr: object, truncate: object, optimizer: object) -> None:
    positive_int(f"{name}.steps", steps)
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise HypergradientError(
                f"{name}.optimizer must be an optimizer of hg.optim (e.g. "
                f"hg.optim.adam(lr=1e-3)), got {optimizer!r}"
            )
        if lr is not None:
            raise HypergradientError(
                f"{name}: give the learning rate to the optimizer "
                f"(hg.optim.{optimizer.name}(lr={lr!r}, ...)), not lr={lr!r} beside it"
            )
    elif isinstance(lr, bool) or not isinstance(lr, (int, float, str)):
        raise HypergradientError(f"{name}.lr must be a number or a key of hparams, got {lr!r}")
    elif not isinstance(lr, str) and not (lr > 0 and math.isfinite(lr)):
        raise HypergradientError(f"{name}.lr must be a finite number > 0, got {lr!r}")
    if truncate is not None:
        positive_int(f"{name}.truncate", truncate)
        assert isinstance(truncate, int) and isinstance(steps, int)
        if truncate > steps:
            raise HypergradientError(f"{name}.truncate={truncate} exceeds steps={steps}")


@dataclass(frozen=True)
class Unrolled(PathMethod):
    """Reverse-mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w`` from the given weights.

    ``truncate=T`` differentiates only the last T steps. ``lr`` is a number (0.1 when neither
    ``lr`` nor ``optimizer`` is given), or the name of an entry of ``hparams`` with one element
    (shape ``()`` or ``(1,)``: a scalar, the rule of :mod:`hypergradients.optim` too) whose
    hypergradient is then returned too. A per-step learning-rate schedule (a ``(K,)`` tensor) is
    ``optimizer=hg.optim.gd(lr="key")``, the same plain gradient descent.

    ``optimizer``: any differentiable optimizer of :mod:`hypergradients.optim` instead of plain
    gradient descent (``hg.optim.adam(lr="lr", b1="b1")``, ``hg.optim.nesterov(lr="lr_schedule",
    momentum=0.9)``): the path is ``(w, s) ← O.update(∂L_T/∂w, s, w, λ)`` from ``s = O.init(w)``,
    and every optimizer hyperparameter named by a key of ``hparams`` gets its hypergradient.
    ``lr`` must then be left out (the optimizer has it).

    ``batches``: a sequence, iterator or other iterable of batches, one per step: step ``k``
    computes ``inner_loss(params, hparams, b_k)`` (3 arguments). Each call takes ``steps`` batches
    from it: a sequence's first ones every time, an iterator's next ones (successive calls see
    successive batches), a fresh ``iter()`` of another iterable (a DataLoader: a new epoch).

    ``checkpoint`` trades compute for memory: ``None``/``False`` keeps the graph of every step
    (memory ``O(T)``); ``True`` stores only every ``⌈√T⌉``-th iterate and recomputes one segment
    at a time in the backward sweep (memory ``O(√T)``, one extra forward pass); an int ``s``
    stores every s-th. The result is the same derivative (equal to float64 rounding).

    Every operation of ``inner_loss`` needs a second derivative (each step's gradient is
    differentiated): a ``@once_differentiable`` backward or a kernel without a double backward
    raises :class:`~hypergradients.HypergradientError` rather than dropping its part of the
    derivative. ``info.grad_norm`` is ``‖∂L_T/∂w‖`` at the given weights (the first step's).
    """

    steps: int = 100
    lr: float | str | None = None
    truncate: int | None = None
    checkpoint: bool | int | None = None
    optimizer: Optimizer | None = None
    batches: Iterable[object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _default_lr(self)
        _validate_path("Unrolled", self.steps, self.lr, self.truncate, self.optimizer)
        if self.checkpoint is not None and not isinstance(self.checkpoint, bool):
            positive_int("Unrolled.checkpoint", self.checkpoint)

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
        batches = _batches(self, "Unrolled")
        _check_schedules(self, lam, "Unrolled")
        stats: dict[str, float] = {}
        g, used, out, w_final = reverse_path(
            outer_loss,
            inner_loss,
            params,
            lam,
            steps=self.steps,
            lr=self.lr,
            truncate=self.truncate,
            checkpoint=self.checkpoint,
            optimizer=self.optimizer,
            batches=batches,
            stats=stats,
        )
        report_unused(lam, used, self)
        extra = {"truncate": float(self.truncate or self.steps)}
        if self.checkpoint:
            every = checkpoint_interval(self.truncate or self.steps, self.checkpoint)
            extra["checkpoint"] = float(every or 0)
        return g, Info(
            type(self).__name__,
            self.steps,
            self.steps,
            None,
            None,
            direct=tree.zeros_like(lam),
            final_params=tree.detach(w_final),
            outer_loss=float(out),
            extra=extra,
            state=SolverState() if state is None else state,
            grad_norm=stats.get("grad_norm"),
        )


def _default_lr(method: Unrolled | Forward) -> None:
    """Plain gradient descent's step size defaults to 0.1; with an optimizer, the optimizer has it."""
    if method.lr is None and method.optimizer is None:
        object.__setattr__(method, "lr", 0.1)


def _check_schedules(method: Unrolled | Forward, lam: Mapping[str, Tensor], who: str) -> None:
    if method.optimizer is not None:
        check_schedules(method.optimizer, lam, method.steps, who=f"{who}(steps={method.steps})")


def _batches(method: Unrolled | Forward, who: str) -> Sequence[object] | None:
    return None if method.batches is None else take_batches(method.batches, method.steps, who=who)


def _path_used(
    outer_loss: LossFn,
    inner_loss: LossFn,
    params: Mapping[str, Tensor],
    lam: Tree,
    lr: float | str | None,
    optimizer: Optimizer | None = None,
    batches: Sequence[object] | None = None,
) -> set[str]:
    """Hyperparameters the path can depend on: those in ``∂L_T/∂w`` (on the first batch) or ``L_V``
    (by autograd's graph, not by value), the step size when it is one, and the optimizer's.

    The graph of ``∂L_T/∂w`` built here is also checked for once-differentiable nodes: forward
    mode needs the same second derivative that reverse mode would silently lose there."""
    w = tree.clone_leaves(params, requires_grad=True)
    first = inner_loss if batches is None else (lambda p, h: inner_loss(p, h, batches[0]))  # type: ignore[call-arg]
    inner = scalar_loss(first, w, lam, name="inner_loss")
    gw = grad(inner, w, create_graph=True)
    refuse_once_differentiable(inner, [t for t in gw.values() if t.requires_grad], w, step=0)
    probe = scalar_loss(outer_loss, w, lam, name="outer_loss") + sum(
        (gk.sum() for gk in gw.values() if gk.requires_grad), torch.zeros((), dtype=inner.dtype)
    )
    used = used_keys(probe, lam)
    if isinstance(lr, str):
        used.add(lr)
    if optimizer is not None:
        used.update(optimizer.hparam_keys)
    return used


@dataclass(frozen=True)
class Forward(PathMethod):
    """Forward mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w``: the derivative of :class:`Unrolled`.

    Propagates ``∂w_k/∂λ`` along the path with ``torch.func.jvp``, one tangent per scalar
    hyperparameter (``chunk`` of them batched with ``vmap``): memory independent of ``steps``,
    cost ``∝`` the number of hyperparameters. The natural choice for a few hyperparameters, such
    as a learning rate (``lr="<key>"``). The losses must be ``torch.func``-compatible (no
    ``.item()``, no in-place updates of their inputs) and every operation of ``inner_loss`` needs a
    forward-mode derivative of its backward: where one is missing (fused kernels, custom
    ``autograd.Function`` classes, PyTorch's "ZeroTensors are immutable" bug in ``F.mse_loss``'s mean
    reduction) it raises :class:`~hypergradients.HypergradientError` naming the cause, and
    :class:`Unrolled` computes the same derivative in reverse mode. ``optimizer`` and ``batches`` as
    in :class:`Unrolled`: the tangent of the optimizer state is carried along with the weights'.
    ``info.grad_norm`` as in :class:`Unrolled`.
    """

    steps: int = 100
    lr: float | str | None = None
    truncate: int | None = None
    chunk: int | None = 64
    optimizer: Optimizer | None = None
    batches: Iterable[object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _default_lr(self)
        _validate_path("Forward", self.steps, self.lr, self.truncate, self.optimizer)
        if self.chunk is not None:
            positive_int("Forward.chunk", self.chunk)

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
        batches = _batches(self, "Forward")
        _check_schedules(self, lam, "Forward")
        used = _path_used(outer_loss, inner_loss, params, lam, self.lr, self.optimizer, batches)
        report_unused(lam, used, self)
        stats: dict[str, float] = {}
        g, out_f, w_final, jvps = forward_path(
            outer_loss,
            inner_loss,
            params,
            lam,
            steps=self.steps,
            lr=self.lr,
            truncate=self.truncate,
            chunk=self.chunk,
            optimizer=self.optimizer,
            batches=batches,
            stats=stats,
        )
        return g, Info(
            type(self).__name__,
            self.steps,
            jvps,
            None,
            None,
            direct=tree.zeros_like(lam),
            final_params=tree.detach(w_final),
            outer_loss=out_f,
            extra={"truncate": float(self.truncate or self.steps), "jvps": float(jvps)},
            state=SolverState() if state is None else state,
            grad_norm=stats.get("grad_norm"),
        )
