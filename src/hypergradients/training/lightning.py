"""PyTorch Lightning: the hyper step of Algorithm 1 as a callback (the ``lightning`` extra).

:class:`HyperCallback` calls :meth:`HyperOptimizer.step <hypergradients.HyperOptimizer.step>`
every ``every_n_steps`` optimizer steps of a ``lightning.Trainer``, on the training batch just
used (or on a batch of ``train_batches``) for ``L_T`` and the next validation batch for ``L_V``::

    net = Net()
    hyper = hg.HyperOptimizer(net, [hg.WeightDecay(net)])
    class Lit(lightning.LightningModule):
        ...
        def training_step(self, batch, i):
            return hyper.train_loss(batch)          # L_T: the loss plus the families' terms
    trainer = lightning.Trainer(callbacks=[HyperCallback(hyper, val_loader, every_n_steps=10)])

Lightning's own checkpoints carry the callback's :meth:`~HyperCallback.state_dict` (the
hyperparameters, their optimizer's state, the solver state, the noise generator of stochastic
families such as dropout, and the step counts: tensors and plain values only), and
``trainer.fit(..., ckpt_path=...)`` restores them; with the noise generator restored, a resumed
run with dropout draws the masks an uninterrupted one would (Lightning does not save torch's
global RNG, which the noise does not come from). The validation iterator's
position is not saved: after a resume it starts again from the first batch. The hyperparameters
live where the families created them: build the families on the device the model trains on. A
``HyperOptimizer`` built without ``inner_optimizer=`` is given the Trainer's optimizer (when it has
one), to read only, for ``hg.Identity(precondition="inner_optimizer")``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
except ImportError as e:  # an optional extra
    raise ImportError(
        "hypergradients.lightning needs PyTorch Lightning: pip install 'hypergradients[lightning]'"
    ) from e

from .hyper import HyperOptimizer, HyperStep

__all__ = ["HyperCallback"]


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches again and again (a DataLoader reshuffles on every pass)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("the validation batches are empty: pass a non-empty DataLoader or list")


class HyperCallback(pl.Callback):
    """A hyper step every ``every_n_steps`` optimizer steps of a Lightning ``Trainer``.

    Args:
        hyper: the :class:`~hypergradients.HyperOptimizer` (its model is the network the
            ``LightningModule`` trains, or the module itself).
        val_batches: an iterable of validation batches (a DataLoader), cycled; each defines ``L_V``.
        every_n_steps: optimizer steps between hyper steps (``trainer.global_step`` multiples).
        train_batches: batches for ``L_T`` (cycled); default the training batch just used.
        log: log the step's numbers (``hyper/hypergrad_norm``, ``hyper/hyper_val_loss``, the
            natural hyperparameter values, ...) through ``LightningModule.log_dict``.

    ``last`` is the last :class:`~hypergradients.HyperStep`.
    """

    def __init__(
        self,
        hyper: HyperOptimizer,
        val_batches: Iterable[Any],
        *,
        every_n_steps: int = 10,
        train_batches: Iterable[Any] | None = None,
        log: bool = True,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.hyper = hyper
        self.every_n_steps = every_n_steps
        self.log = log
        self._val = _cycle(val_batches)
        self._train = _cycle(train_batches) if train_batches is not None else None
        self.last: HyperStep | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = list(self.hyper.model.parameters())
        if weights:
            device = weights[0].device
            wrong = [k for k, t in self.hyper.hparams.items() if t.device != device]
            if wrong:
                where = self.hyper.hparams[wrong[0]].device
                raise ValueError(
                    f"the hyperparameters {wrong} are on {where} but the model trains on "
                    f"{device}: build the model on that device before the families "
                    "(hg.WeightDecay(model) creates its tensors beside the weights)"
                )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0:
            return
        if self.hyper.inner_optimizer is None and len(trainer.optimizers) == 1:
            # read (never stepped) by hg.Identity(precondition="inner_optimizer")
            self.hyper.inner_optimizer = trainer.optimizers[0]
        bt = next(self._train) if self._train is not None else batch
        bv = next(self._val)
        device = pl_module.device
        self.last = self.hyper.step(move_data_to_device(bt, device), move_data_to_device(bv, device))
        if self.log:
            numbers = {
                f"hyper/{k}": float(v)
                for k, v in self.last.metrics().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            for name, value in self.hyper.natural().items():
                if value.numel() == 1:
                    numbers[f"hyper/{name}"] = float(value)
            numbers["hyper/skipped"] = float(self.hyper.skipped)
            pl_module.log_dict(numbers, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The :class:`~hypergradients.HyperOptimizer`'s state (saved in Lightning's checkpoints)."""
        return self.hyper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore it (Lightning calls this on ``trainer.fit(..., ckpt_path=...)``): all or nothing, as
        :meth:`HyperOptimizer.load_state_dict <hypergradients.hyper.HyperOptimizer.load_state_dict>`."""
        with torch.no_grad():
            self.hyper.load_state_dict(state_dict)
