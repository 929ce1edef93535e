"""``nn.Module`` support: turn a module and a loss into the two callables of :func:`hypergradient`.

The module is called functionally (``torch.func.functional_call``) with a weights dict, so the
hypergradient machinery never touches the module's own parameters. Buffers (batch-norm running
statistics) are passed as copies on every call: a forward pass in training mode may update
them, and that update must not leak into the caller's module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import HypergradientError
from .tree import Tree

XY = tuple[Tensor, Tensor]  # (inputs, targets)
Penalty = Callable[[Tree, Tree], Tensor]


def module_params(module: nn.Module, *, trainable_only: bool = True) -> Tree:
    """Detached copies of ``module.named_parameters()`` (only those with ``requires_grad`` by default)."""
    return {
        k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad or not trainable_only
    }


def functional_model(module: nn.Module) -> Callable[..., Tensor]:
    """``apply(params, *args, **kwargs)``: the module's forward with the weights in ``params``.

    Parameters missing from ``params`` (e.g. frozen ones) are taken from the module; buffers are
    copied per call so a training-mode forward cannot modify the module's statistics.
    """
    frozen = {k: p.detach() for k, p in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def apply(params: Mapping[str, Tensor], *args: object, **kwargs: object) -> Tensor:
        state: dict[str, Tensor] = {**frozen, **params}
        state.update({k: b.clone() for k, b in buffers.items()})
        out: Tensor = torch.func.functional_call(module, state, args, kwargs)
        return out

    return apply


Mode = Literal["train", "eval", "current"]


@contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Run with every submodule in training (``True``) or evaluation mode; restore each submodule's
    own flag afterwards (also when the body raises).

    Flags are saved per submodule, not just the root's: a user may keep, say, a frozen batch norm
    in eval mode inside a model that trains, and ``module.train(was)`` would overwrite that. Every
    temporary mode switch of the library goes through here.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was


@contextmanager
def _in_mode(module: nn.Module, mode: Mode) -> Iterator[None]:
    """:func:`in_mode` by name; ``"current"`` leaves every flag as it is."""
    if mode == "current":
        yield
        return
    with in_mode(module, mode == "train"):
        yield


def make_losses(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train: XY,
    val: XY,
    *,
    penalty: Penalty | None = None,
    modes: tuple[Mode, Mode] | Literal["current"] = ("train", "eval"),
) -> tuple[Callable[[Tree, Tree], Tensor], Callable[[Tree, Tree], Tensor]]:
    """``(inner_loss, outer_loss)`` for a module and a batch each of training and validation data.

    ``inner_loss(w, λ) = loss_fn(module_w(x_train), y_train) + penalty(w, λ)`` and
    ``outer_loss(w, λ) = loss_fn(module_w(x_val), y_val)``. ``penalty`` is where
    hyperparameters enter (weight decay, for instance); without it, ``λ`` must enter through
    ``loss_fn`` or the hypergradient is zero.

    ``modes = (inner, outer)`` sets the module's mode during each loss's forward pass, as the
    trainer (:func:`hypergradients.fit`) does: by default ``L_T`` in training mode (dropout
    active, batch norm on batch statistics: the loss the weights were trained on, whose
    stationarity the implicit function theorem uses) and ``L_V`` in evaluation mode (the model
    as it is validated), whatever mode the module is in when the losses are called. Every
    submodule's own mode is restored after each call. ``"current"`` (for either, or for both as
    ``modes="current"``) uses the module's mode at call time. Dropout in training mode draws a
    new mask per call of ``inner_loss``: one hypergradient builds the ``∂L_T/∂w`` graph once, so
    its HVPs share one mask (but ``hvp_mode="forward"`` and :class:`~hypergradients.Unrolled`
    call it again, each with a new mask).
    """
    pair: tuple[Mode, Mode] = ("current", "current") if modes == "current" else modes
    if not (
        isinstance(pair, tuple) and len(pair) == 2 and all(m in ("train", "eval", "current") for m in pair)
    ):
        raise HypergradientError(
            f"make_losses modes must be 'train', 'eval' or 'current' (each, or "
            f"modes='current'), got {modes!r}"
        )
    inner_mode, outer_mode = pair
    apply = functional_model(module)
    x_tr, y_tr = train
    x_va, y_va = val

    def inner_loss(params: Tree, hparams: Tree) -> Tensor:
        with _in_mode(module, inner_mode):
            loss = loss_fn(apply(params, x_tr), y_tr)
        return loss + penalty(params, hparams) if penalty is not None else loss

    def outer_loss(params: Tree, hparams: Tree) -> Tensor:
        with _in_mode(module, outer_mode):
            return loss_fn(apply(params, x_va), y_va)

    return inner_loss, outer_loss
