"""``nn.Module`` support: turn a module and a loss into the two callables of :func:`hypergradient`.

The module is called functionally (``torch.func.functional_call``) with a weights dict, so the
hypergradient machinery never touches the module's own parameters. Buffers (batch-norm running
statistics) are passed as copies on every call: a forward pass in training mode may update
them, and that update must not leak into the caller's module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .tree import Tree

Batch = tuple[Tensor, Tensor]
Penalty = Callable[[Tree, Tree], Tensor]


def module_params(module: nn.Module, *, trainable_only: bool = True) -> Tree:
    """Detached copies of ``module.named_parameters()`` (only those with ``requires_grad`` by default)."""
    return {k: p.detach().clone() for k, p in module.named_parameters()
            if p.requires_grad or not trainable_only}


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


def make_losses(module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], train: Batch, val: Batch,
                *, penalty: Penalty | None = None) -> tuple[Callable[[Tree, Tree], Tensor],
                                                            Callable[[Tree, Tree], Tensor]]:
    """``(inner_loss, outer_loss)`` for a module and a batch each of training and validation data.

    ``inner_loss(w, λ) = loss_fn(module_w(x_train), y_train) + penalty(w, λ)`` and
    ``outer_loss(w, λ) = loss_fn(module_w(x_val), y_val)``. ``penalty`` is where
    hyperparameters enter (weight decay, for instance); without it, ``λ`` must enter through
    ``loss_fn`` or the hypergradient is zero.
    """
    apply = functional_model(module)
    x_tr, y_tr = train
    x_va, y_va = val

    def inner_loss(params: Tree, hparams: Tree) -> Tensor:
        loss = loss_fn(apply(params, x_tr), y_tr)
        return loss + penalty(params, hparams) if penalty is not None else loss

    def outer_loss(params: Tree, hparams: Tree) -> Tensor:
        return loss_fn(apply(params, x_va), y_va)

    return inner_loss, outer_loss
