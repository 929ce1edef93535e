"""The callbacks of :func:`~hypergradients.fit`: one class, in the style of PyTorch Lightning's.

A callback subclasses :class:`Callback` and overrides the hooks it needs; each is a no-op by
default. In one call of ``fit``, in this order::

    on_fit_start(history)             once; the records of the rounds already done (empty unless resumed)
    every round r = 1, 2, ...:
        (the round's inner steps)
        on_before_hyper_step(hyper)   the HyperOptimizer, before its step (not without hyperparameters)
        on_hyper_step(hyper, result)  after it, with its HyperStep (not when the step raised)
        on_round_end(record)          the round's metrics record (a dict; the one fit returns)
        on_checkpoint(path, r)        after a checkpoint was written
    on_fit_end(result)                once, with the TrainResult (not when fit raised)

State: a callback that must continue where it was after a resume (a counter, an early-stopping
patience, a running average) returns it from :meth:`Callback.state_dict` as tensors and plain
values; ``fit`` saves it in every checkpoint under :attr:`Callback.state_key` and passes it back
to :meth:`Callback.load_state_dict` on resume (a checkpoint without it leaves the callback as it
was built). Two callbacks with state must have distinct keys.

``fit``'s other ways of being called back are callbacks of this class too: a plain function
``f(record)`` in ``callbacks=`` is an ``on_round_end``, ``before_hyper_step=[f(hyper)]`` and
``after_hyper_step=[f(hyper, result)]`` are ``on_before_hyper_step`` and ``on_hyper_step``, the
metrics file is a :class:`MetricsWriter` and TensorBoard a :class:`TensorBoardCallback`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import json_dumps, write_atomic
from .result import TrainResult

if TYPE_CHECKING:
    from .hyper import HyperOptimizer, HyperStep

__all__ = ["Callback", "MetricsWriter", "TensorBoardCallback", "as_callback"]


class Callback:
    """Base class of ``fit``'s callbacks: override the hooks used (module docstring for the order)."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in ``fit``'s checkpoints (default: the class's qualified name)."""
        return type(self).__qualname__

    def on_fit_start(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Before the first round of this call; ``history``: the records of the rounds a resume skips."""

    def on_before_hyper_step(self, hyper: HyperOptimizer) -> None:
        """Before each hyper step (e.g. re-initialise or retrain the weights the hypergradient sees)."""

    def on_hyper_step(self, hyper: HyperOptimizer, result: HyperStep) -> None:
        """After each hyper step that returned (applied or skipped)."""

    def on_round_end(self, record: dict[str, Any]) -> None:
        """After each round, with its metrics record."""

    def on_checkpoint(self, path: Path, round: int) -> None:
        """After ``fit`` wrote the checkpoint of round ``round`` to ``path``."""

    def on_fit_end(self, result: TrainResult) -> None:
        """After the last round, with what ``fit`` returns."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this callback, as tensors and plain values (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (called on resume, before :meth:`on_fit_start`)."""


def has_state(cb: Callback) -> bool:
    """Whether ``cb`` overrides :meth:`Callback.state_dict` (then ``fit`` saves its state)."""
    return type(cb).state_dict is not Callback.state_dict


class _OnRoundEnd(Callback):
    """A plain function ``f(record)`` of ``callbacks=``."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_round_end(self, record: dict[str, Any]) -> None:
        self.fn(record)


class _AroundHyperStep(Callback):
    """``fit``'s ``before_hyper_step`` and ``after_hyper_step`` functions."""

    def __init__(
        self,
        before: Sequence[Callable[[HyperOptimizer], None]],
        after: Sequence[Callable[[HyperOptimizer, HyperStep], None]],
    ) -> None:
        self.before, self.after = list(before), list(after)

    def on_before_hyper_step(self, hyper: HyperOptimizer) -> None:
        for f in self.before:
            f(hyper)

    def on_hyper_step(self, hyper: HyperOptimizer, result: HyperStep) -> None:
        for f in self.after:
            f(hyper, result)


def as_callback(cb: Callback | Callable[[dict[str, Any]], None]) -> Callback:
    """``cb`` itself, or a plain function ``f(record)`` as an ``on_round_end`` callback."""
    if isinstance(cb, Callback):
        return cb
    if not callable(cb):
        raise TypeError(
            f"a callback must be a hypergradients.Callback or a function f(record), got {type(cb).__name__}"
        )
    return _OnRoundEnd(cb)


class MetricsWriter(Callback):
    """``metrics.jsonl``: one JSON line per round (NaN written as ``null``).

    At the start the file is rewritten with the rounds already done (none for a fresh run, the
    checkpoint's rounds for a resumed one, so the rows after that checkpoint are not doubled);
    each round then appends its line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_fit_start(self, history: Sequence[Mapping[str, Any]]) -> None:
        write_atomic(self.path, "".join(json_dumps(r) + "\n" for r in history))

    def on_round_end(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json_dumps(record) + "\n")


class TensorBoardCallback(Callback):
    """Writes each round's numeric metrics to TensorBoard (``pip install 'hypergradients[tensorboard]'``).

    Calling it with a record (``cb(record)``) is :meth:`on_round_end`; :meth:`close` closes the writer.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, prefix: str = "") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional extra
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'hypergradients[tensorboard]' (or drop --tensorboard)"
            ) from e
        self.writer = SummaryWriter(str(logdir))
        self.prefix = prefix

    def on_round_end(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
                self.writer.add_scalar(f"{self.prefix}{k}", v, step)
        self.writer.flush()

    def __call__(self, record: dict[str, Any]) -> None:
        self.on_round_end(record)

    def close(self) -> None:
        self.writer.close()
