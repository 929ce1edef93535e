"""The interface every hyperparameter family implements.

A *family* owns a group of hyperparameter tensors and says how they enter training. The trainer
(:mod:`hypergradients.train`) only talks to this interface, so a new family (dropout, an
augmentation network, distilled data, per-example weights) plugs in without changing it.

Conventions:

* :meth:`Family.tensors` are the *unconstrained* leaves the hyper-optimizer updates (a positive
  quantity is stored as its log, say); :meth:`Family.natural` maps them to the values a user reads.
* A family enters the training loss ``L_T`` through any of four hooks, each a no-op by default:

  ==========================  ===================================================================
  :meth:`~Family.penalty`      a term added to ``L_T`` (weight decay)
  :meth:`~Family.batch`        rewrites a *training* batch (augmentation, appended distilled data)
  :meth:`~Family.forward`      wraps the model's forward on training batches (dropout)
  :meth:`~Family.reduce`       turns per-example training losses into one number (example weights)
  ==========================  ===================================================================

  The validation loss ``L_V`` never goes through these hooks: it measures the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Tree = dict[str, Tensor]
# forward(params, x) -> logits: the model called functionally with the weights ``params``.
Forward = Callable[[Mapping[str, Tensor], Tensor], Tensor]


@dataclass
class Batch:
    """A training or validation minibatch: inputs, targets and the examples' dataset indices."""

    x: Tensor
    y: Tensor
    index: Tensor


class Family:
    """Base class of hyperparameter families: override :meth:`tensors`, :meth:`natural` and the hooks used.

    Hyperparameter keys are global across families, so each family prefixes its keys with its
    ``name`` (``"weight_decay"``, ``"weight_decay.fc1.weight"``, ...).
    """

    name: str = "family"

    def tensors(self) -> dict[str, Tensor]:
        """The unconstrained leaves (``requires_grad=True``) that the hyper-optimizer owns."""
        raise NotImplementedError

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The user-facing (constrained) values, from ``hparams`` or the family's own tensors."""
        raise NotImplementedError

    def penalty(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Tensor | None:
        """A term added to the training loss, or ``None``."""
        return None

    def batch(self, batch: Batch, hparams: Mapping[str, Tensor]) -> Batch:
        """The training batch the model sees (default: unchanged)."""
        return batch

    def forward(self, forward: Forward, hparams: Mapping[str, Tensor]) -> Forward:
        """The forward used on training batches (default: unchanged)."""
        return forward

    def reduce(self, losses: Tensor, batch: Batch, hparams: Mapping[str, Tensor]) -> Tensor | None:
        """One training loss from per-example ``losses``, or ``None`` for the plain mean."""
        return None

    def count(self) -> int:
        """The number of scalar hyperparameters."""
        return sum(t.numel() for t in self.tensors().values())

    def summary(self) -> dict[str, float]:
        """A few numbers that describe the natural values (logged with the metrics every hyper step)."""
        vals = [v.detach().reshape(-1).double() for v in self.natural().values()]
        flat = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
        if flat.numel() == 0:
            return {}
        if flat.numel() == 1:
            return {f"{self.name}": float(flat[0])}
        return {f"{self.name}.mean": float(flat.mean()), f"{self.name}.min": float(flat.min()),
                f"{self.name}.max": float(flat.max())}

    def load_tensors(self, values: Mapping[str, Tensor]) -> None:
        """Copy saved unconstrained values into :meth:`tensors` in place (used on resume)."""
        own = self.tensors()
        missing = sorted(set(own) - set(values))
        if missing:
            raise KeyError(f"{type(self).__name__} {self.name!r}: saved state lacks {missing}")
        with torch.no_grad():
            for k, t in own.items():
                if values[k].shape != t.shape:
                    raise ValueError(f"{k}: saved shape {tuple(values[k].shape)} != {tuple(t.shape)}")
                t.copy_(values[k])
