"""Resumable minibatch streams (torch only).

:class:`BatchStream` is an infinite, per-epoch reshuffled minibatch iterator whose ``state_dict()``
captures enough (epoch, position, generator state, current permutation) to resume bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStream"]


class BatchStream(Iterator[tuple[Tensor, Tensor]]):
    """Infinite iterator of ``(x, y)`` minibatches, reshuffled every epoch, resumable exactly.

    Each epoch visits every example once, in a fresh ``torch.randperm`` drawn from the stream's own
    CPU ``torch.Generator`` seeded with ``seed`` (global RNG state is never touched).  With
    ``drop_last=False`` the last batch of an epoch may be smaller; with ``drop_last=True`` the
    ``n % batch_size`` left-over examples of each epoch are skipped (they differ between epochs).
    When ``batch_size >= n`` every batch is the full ``(x, y)`` (the tensors themselves, unshuffled).

    ``epoch`` and ``position`` always describe the *next* batch: it starts at index ``position`` of
    epoch ``epoch``'s permutation.  ``state_dict()`` / ``load_state_dict()`` capture epoch, position,
    generator state and current permutation, so that a restored stream yields exactly the batches
    the original would have.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same leading (example) dimension, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("BatchStream needs at least one example")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.n = int(x.shape[0])
        self.full_batch = batch_size >= self.n
        self._limit = self.n if (self.full_batch or not drop_last) else (self.n // batch_size) * batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None
        self._new_permutation()

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        return 1 if self.full_batch else -(-self._limit // self.batch_size)

    def _new_permutation(self) -> None:
        if self.shuffle and not self.full_batch:
            self._perm = torch.randperm(self.n, generator=self._generator)
        else:
            self._perm = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.full_batch:
            self.epoch += 1
            return self.x, self.y
        start, stop = self.position, min(self.position + self.batch_size, self._limit)
        if self._perm is None:
            xb, yb = self.x[start:stop], self.y[start:stop]
        else:
            idx = self._perm[start:stop].to(self.x.device)
            xb, yb = self.x[idx], self.y[idx.to(self.y.device)]
        self.position = stop
        if self.position >= self._limit:
            self.epoch += 1
            self.position = 0
            self._new_permutation()
        return xb, yb

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: epoch, position, generator state, current permutation."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self._generator.get_state().clone(),
            "permutation": None if self._perm is None else self._perm.clone(),
            "n": self.n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the stream must be over data of the same size and settings."""
        for k in ("n", "batch_size", "shuffle", "drop_last"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(
                    f"state was saved with {k}={state[k]!r} but this stream has {k}={getattr(self, k)!r}"
                )
        position = int(state["position"])
        if not 0 <= position < max(self._limit, 1):
            raise ValueError(f"position {position} out of range for an epoch of {self._limit} examples")
        perm = state["permutation"]
        if perm is not None:
            perm = torch.as_tensor(perm, dtype=torch.int64).clone()
            if perm.shape != (self.n,):
                raise ValueError(f"permutation has shape {tuple(perm.shape)}, expected ({self.n},)")
        elif self.shuffle and not self.full_batch:
            raise ValueError("state has no permutation but this stream shuffles")
        self._generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).clone())
        self.epoch = int(state["epoch"])
        self.position = position
        self._perm = perm

    def __repr__(self) -> str:
        return (
            f"BatchStream(n={self.n}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, epoch={self.epoch}, "
            f"position={self.position})"
        )
