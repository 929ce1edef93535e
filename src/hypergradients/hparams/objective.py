"""The rule that composes the families into ``L_T`` and ``L_V``, and the loss contract they share.

**The loss contract.** A loss is ``loss_fn(outputs, batch)`` with ``outputs = model(batch.x)`` and
``batch`` a :class:`~hypergradients.hparams.Batch` (``x``, ``y``, ``index``); it returns per-example
losses of shape ``(B,)`` (reduced by the one family that overrides ``reduce``, else averaged) or one
scalar (used as it is: then no family may reduce). :func:`cross_entropy` is the default, of
:class:`~hypergradients.HyperOptimizer` and of :func:`~hypergradients.fit`. ``fit``'s
``loss_fn(predictions, y)`` is the contract's special case that reads only the targets: ``fit``
composes it as ``loss_fn(outputs, batch.y)`` (:func:`on_targets`).

**The composition** is :class:`Objective`'s; the families' hooks are described in
:mod:`hypergradients.hparams.base`. Batches may be given as ``(x, y)``, ``(x, y, index)`` or a
``Batch`` (:func:`as_batch`); the hyperparameters of a list of families are
:func:`collect_hparams`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.modules import functional_model, in_mode
from .base import Batch, Family, Hook, ModelForward, Noise, check_composable

BatchLoss = Callable[[Any, Batch], Tensor]
"""The loss contract: ``loss_fn(outputs, batch) -> (B,)`` per-example losses, or a scalar."""
TargetLoss = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(predictions, y) -> (B,)``: a loss that reads only the targets (``fit``'s ``loss_fn``)."""
BatchLike = Batch | tuple[Any, ...] | list[Any] | Mapping[str, Any]

__all__ = [
    "BatchLike",
    "BatchLoss",
    "Objective",
    "TargetLoss",
    "as_batch",
    "collect_hparams",
    "cross_entropy",
    "on_targets",
]


def cross_entropy(outputs: Tensor, batch: Batch | Tensor) -> Tensor:
    """Per-example cross-entropy ``−log softmax(outputs)[y]``, the default loss.

    ``batch`` is a :class:`Batch` (the contract) or the targets ``y`` themselves (``fit``'s form), so
    the one function serves both.
    """
    y = batch.y if isinstance(batch, Batch) else batch
    return F.cross_entropy(outputs, y, reduction="none")


def on_targets(loss_fn: TargetLoss) -> BatchLoss:
    """The contract's form of a loss that reads only the targets: ``loss_fn(outputs, batch.y)``."""
    if loss_fn is cross_entropy:
        return cross_entropy

    def batch_loss(outputs: Tensor, batch: Batch) -> Tensor:
        return loss_fn(outputs, batch.y)

    return batch_loss


def as_batch(batch: BatchLike) -> Batch:
    """A :class:`Batch` from ``(x, y)``, ``(x, y, index)``, a ``Batch`` or a dict of keyword inputs
    with ``"labels"`` (a Hugging Face batch: ``x`` is the dict without ``"index"``, the model is
    called as ``model(**x)``, ``y`` is ``x["labels"]``; ``index``: ``batch["index"]``, else
    ``arange(B)``)."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "index"}
        if "labels" not in inputs:
            raise ValueError(
                f"a dict batch must hold the targets under 'labels' (the key a Hugging Face "
                f"model's loss reads); it has {sorted(batch)}"
            )
        y = inputs["labels"]
        index = batch.get("index")
        if index is None:
            index = torch.arange(len(y) if isinstance(y, Tensor) and y.ndim > 0 else 1)
        # x is the dict of keyword inputs (Objective calls model(**x)), not a tensor.
        return Batch(cast(Tensor, inputs), y, index)
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        if len(batch) == 3:
            return Batch(x, y, batch[2])
        n = len(y) if isinstance(y, Tensor) and y.ndim > 0 else 1
        return Batch(x, y, torch.arange(n))
    size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(
        f"a batch must be (x, y), (x, y, index) or a hypergradients.hparams.Batch (or a dict of "
        f"keyword inputs with 'labels'), got "
        f"{type(batch).__name__}{size}"
    )


def collect_hparams(families: Sequence[Family]) -> dict[str, Tensor]:
    """The families' unconstrained tensors under their keys; a key used twice is refused."""
    hp: dict[str, Tensor] = {}
    for fam in families:
        for k, t in fam.tensors().items():
            if k in hp:
                raise ValueError(
                    f"hyperparameter key {k!r} is used by two families: give them distinct names"
                )
            hp[k] = t
    return hp


class Objective:
    """``L_T`` and ``L_V`` of a model on one batch each, through the families' hooks.

    ``train(w, λ, batch, forward=..., noise=...)`` is, in order (the composition rule of
    :mod:`hypergradients.hparams.base`): the families' ``batch`` hooks chained in family order;
    their ``model_weights`` hooks chained in family order; their submodule ``hooks`` registered on
    the model for this one forward call (in family order); their ``forward`` wrappers nested (family 1
    innermost); ``loss_fn`` for per-example losses (or a scalar); the one reducing family's
    ``reduce`` or the mean; plus the sum of the penalties at the untouched ``w``; training mode.
    ``noise`` (a :class:`~hypergradients.hparams.Noise`) fixes the random numbers of stochastic
    families: every call with the same ``noise`` draws the same numbers; ``None`` draws a fresh
    one from ``generator`` (a CPU ``torch.Generator``; ``None``: torch's global one), only if a
    family is stochastic: otherwise no generator is touched. ``val(w, batch)``: the plain mean
    loss in evaluation mode on copies of the buffers, with no hook. ``live`` is the forward with
    the module's own buffers (inner steps update batch norm's statistics, as ordinary training
    does); ``copy_buffers`` the one with copies (the hypergradient's many forwards leave them alone).
    Every temporary mode switch restores each submodule's own flag (a batch norm the user froze in
    evaluation mode stays so).

    Raises ``ValueError`` when more than one family reduces.
    """

    def __init__(
        self,
        model: nn.Module,
        families: Sequence[Family],
        loss_fn: BatchLoss = cross_entropy,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        check_composable(families)
        self.generator = generator
        self.model = model
        self.families = list(families)
        self.loss_fn = loss_fn
        apply = functional_model(model)
        self.stochastic = any(f.stochastic for f in self.families)

        # A dict batch's x holds the model's keyword inputs (a Hugging Face batch): model(**x).
        def live(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
            args: tuple[Any, ...] = () if isinstance(x, Mapping) else (x,)
            kwargs: dict[str, Any] = dict(x) if isinstance(x, Mapping) else {}
            out: Tensor = torch.func.functional_call(model, dict(params), args, kwargs)
            return out

        def copy_buffers(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
            return apply(params, **x) if isinstance(x, Mapping) else apply(params, x)

        self.live: ModelForward = live
        self.copy_buffers: ModelForward = copy_buffers

    def draw_noise(self) -> Noise | None:
        """A fresh :class:`Noise` if a family is stochastic, else ``None`` (nothing drawn)."""
        return Noise.draw(self.generator) if self.stochastic else None

    def _reduce(
        self,
        losses: Tensor,
        batch: Batch,
        hparams: Mapping[str, Tensor],
        kw: Callable[[Family, str], dict[str, Any]],
    ) -> Tensor:
        reducing = [f for f in self.families if f.reduces]
        if losses.ndim == 0:
            if reducing:
                raise ValueError(
                    f"loss_fn returned a scalar, but the families {[f.name for f in reducing]} "
                    "weight the examples: return per-example losses of shape (B,) "
                    "(e.g. reduction='none')"
                )
            return losses
        loss = reducing[0].reduce(losses, batch, hparams, **kw(reducing[0], "reduce")) if reducing else None
        return losses.mean() if loss is None else loss

    def train(
        self,
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor],
        batch: Batch,
        *,
        forward: ModelForward,
        noise: Noise | None = None,
    ) -> Tensor:
        if noise is None:
            noise = self.draw_noise()
        sampler = (noise or Noise(0)).sampler()

        def kw(fam: Family, hook: str) -> dict[str, Any]:
            # batch/forward/reduce/penalty get the sampler only where a stochastic family overrides
            # them (its override takes ``noise=``); a deterministic family keeps the plain signature.
            own = getattr(type(fam), hook) is not getattr(Family, hook)
            return {"noise": sampler} if fam.stochastic and own else {}

        model_params: Mapping[str, Tensor] = params
        hooks: list[Hook] = []
        for fam in self.families:
            batch = fam.batch(batch, hparams, **kw(fam, "batch"))
            model_params = fam.model_weights(model_params, hparams, sampler)
            hooks.extend(fam.hooks(hparams, sampler))
            forward = fam.forward(forward, hparams, **kw(fam, "forward"))
        with in_mode(self.model, True), _hooked(self.model, hooks):
            losses = self.loss_fn(forward(model_params, batch.x), batch)
        loss = self._reduce(losses, batch, hparams, kw)
        for fam in self.families:
            pen = fam.penalty(params, hparams, **kw(fam, "penalty"))
            if pen is not None:
                loss = loss + pen
        return loss

    def val(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        with in_mode(self.model, False):
            out = self.loss_fn(self.copy_buffers(params, batch.x), batch)
        return out if out.ndim == 0 else out.mean()


@contextmanager
def _hooked(model: nn.Module, hooks: Sequence[Hook]) -> Iterator[None]:
    """The families' submodule hooks, registered for the body only (removed even if it raises)."""
    handles = []
    try:
        for h in hooks:
            try:
                sub = model.get_submodule(h.module)
            except AttributeError as e:
                names = [n for n, _ in model.named_modules() if n]
                raise ValueError(
                    f"a family hooks the submodule {h.module!r}, which the model lacks; its "
                    f"submodules are {names[:20]}"
                ) from e
            if h.kind == "pre":
                handles.append(sub.register_forward_pre_hook(h.fn))
            else:
                handles.append(sub.register_forward_hook(h.fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
