"""Data-parallel hypergradients on ``torch.distributed`` (DDP-style: weights and hyperparameters
replicated, the data sharded).

With ``N`` ranks each holding a shard of the data, the inner and outer losses of the whole problem
are the averages of the per-rank losses, ``L_T = (1/N) Σ_r L_T^r`` and ``L_V = (1/N) Σ_r L_V^r``
(equal-size shards and mean-reduced losses make this the loss on the union of the data). Every
derivative the hypergradient needs is linear in the loss, so it is the average of the per-rank
derivatives:

* ``∂L_V/∂w = (1/N) Σ_r ∂L_V^r/∂w`` and ``∂L_V/∂λ`` likewise (one all-reduce for both);
* ``H v = (1/N) Σ_r H_r v`` (one all-reduce per Hessian-vector product, a batch of products in one);
* ``(∂²L_T/∂λ∂wᵀ) p = (1/N) Σ_r (∂²L_T^r/∂λ∂wᵀ) p`` (one all-reduce).

Inside ``with data_parallel(group):`` :class:`~hypergradients.core.derivatives.InnerDerivatives` and
the implicit methods average these products over the group, each call flattening its tree into
one buffer per dtype. Every vector an iterative solver meets (``v``, ``H p``) is then the same on
every rank, bit for bit (an all-reduce hands every rank the same result), so its dot products,
norms and stopping decisions are the same and no rank stops early; random starts (power
iteration, the Nyström sketch) come from seeded generators and are the same as well.

Path methods (:class:`~hypergradients.Unrolled`): each step's gradient is averaged by a
differentiable all-reduce, so every rank walks the single-process trajectory
``w_{k+1} = Φ(w_k, ḡ_k)``. In reverse mode the backward of that all-reduce averages the adjoint
that reaches it; the rank-local adjoints then differ, but their mean is the single-process adjoint
(every map between two all-reduces is linear in the adjoint), so the final ``dL_V/dλ`` is averaged
once more. Forward mode (:class:`~hypergradients.Forward`) pushes its tangents through
``torch.func`` transforms, where a collective cannot run: it is refused inside
``data_parallel`` (use ``Unrolled``).

:func:`counting` counts the collectives (all-reduces, broadcasts) and their payload bytes.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import HypergradientError
from .tree import Tree

__all__ = [
    "CommCount",
    "DataParallel",
    "average",
    "average_differentiable",
    "barrier",
    "broadcast",
    "counting",
    "current",
    "data_parallel",
    "init_process_group",
    "is_main",
    "rank",
    "world_size",
]


@dataclass(frozen=True)
class DataParallel:
    """The process group the derivatives are averaged over, and its size."""

    group: Any
    size: int


_CURRENT: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar(
    "hg_data_parallel", default=None
)


@dataclass
class CommCount:
    """Collectives issued while :func:`counting` was active: all-reduces and broadcasts, and the
    payload bytes each rank sent into them (the buffer sizes, not the wire traffic of the
    algorithm, which for a ring all-reduce is about ``2(N−1)/N`` times the buffer)."""

    all_reduces: int = 0
    all_reduce_bytes: int = 0
    broadcasts: int = 0
    broadcast_bytes: int = 0
    sizes: list[int] = field(default_factory=list)


_COUNTERS: list[CommCount] = []


@contextlib.contextmanager
def counting() -> Iterator[CommCount]:
    """``with counting() as c:`` counts this process's collectives in ``c`` (nestable)."""
    c = CommCount()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _count(kind: str, nbytes: int) -> None:
    for c in _COUNTERS:
        if kind == "all_reduce":
            c.all_reduces += 1
            c.all_reduce_bytes += nbytes
            c.sizes.append(nbytes)
        else:
            c.broadcasts += 1
            c.broadcast_bytes += nbytes


def current() -> DataParallel | None:
    """The active :func:`data_parallel` setting, or ``None`` (single process)."""
    return _CURRENT.get()


@contextlib.contextmanager
def data_parallel(group: Any = None) -> Iterator[DataParallel]:
    """Average every derivative of the hypergradient over ``group`` (default: the world).

    ``torch.distributed`` must be initialised (:func:`init_process_group`, or torchrun and
    ``torch.distributed.init_process_group``). Each rank passes its own shard's losses to
    :func:`hypergradients.hypergradient` (or its own batches to :class:`~hypergradients.HyperOptimizer`);
    the weights and hyperparameters must be the same on every rank (:func:`broadcast` them once).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise HypergradientError(
            "hg.distributed.data_parallel needs an initialised torch.distributed process group: call "
            "hg.distributed.init_process_group() (or torch.distributed.init_process_group) first, under "
            "torchrun --nproc-per-node N"
        )
    dp = DataParallel(group, dist.get_world_size(group))
    token = _CURRENT.set(dp)
    try:
        yield dp
    finally:
        _CURRENT.reset(token)


def init_process_group(backend: str | None = None, *, timeout_s: float = 300.0) -> None:
    """``torch.distributed.init_process_group`` from torchrun's environment, with a timeout.

    ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"`` (default). ``timeout_s``: how long
    a collective waits for the other ranks before it raises, so a rank that died ends the run with
    an error on the others instead of a hang (NCCL needs ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, the
    default in recent torch, to honour it).
    """
    if not timeout_s > 0:
        raise HypergradientError(f"timeout_s must be positive, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files."""
    return rank() == 0


def _all_reduce_mean(tensors: Sequence[Tensor], dp: DataParallel) -> list[Tensor]:
    """The mean over the group of each tensor, one all-reduce per dtype (flattened into one buffer).

    Sum then divide: gloo has no ``AVG``; the division by ``N`` is exact for ``N`` a power of two.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for idx in by_dtype.values():
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        _count("all_reduce", buf.numel() * buf.element_size())
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=dp.group)
        except RuntimeError as e:  # gloo/NCCL report a lost peer or a timeout as RuntimeError
            raise HypergradientError(
                f"rank {dist.get_rank()}: a data-parallel all-reduce of {buf.numel()} values failed, so "
                "another rank died or stopped answering (its log says why; a silent rank is detected "
                "after init_process_group's timeout_s). The run cannot go on with a rank missing: "
                f"restart it (resume=True continues from the last checkpoint). The error: {e}"
            ) from e
        buf = buf / dp.size
        for i, piece in zip(idx, torch.split(buf, [p.numel() for p in parts]), strict=True):
            out[i] = piece.view(tensors[i].shape)
    return [t for t in out if t is not None]


def average(trees: Sequence[Mapping[str, Tensor]]) -> list[Tree]:
    """The group mean of each tree, all of them in one all-reduce (no-op outside :func:`data_parallel`)."""
    dp = current()
    if dp is None or not trees:
        return [dict(t) for t in trees]
    flat = [t for tr in trees for t in tr.values()]
    red = iter(_all_reduce_mean(flat, dp)) if flat else iter(())
    return [{k: next(red) for k in tr} for tr in trees]


class _Average(torch.autograd.Function):
    """``y_i = (1/N) Σ_r x_i^r``; its backward is the same mean of the incoming gradients, so it is
    differentiable as often as needed."""

    @staticmethod
    def forward(ctx: Any, dp: DataParallel, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.dp = dp
        return tuple(_all_reduce_mean(xs, dp))

    @staticmethod
    def backward(ctx: Any, *gs: Tensor) -> tuple[Any, ...]:
        return (None, *_Average.apply(ctx.dp, *gs))


def average_differentiable(t: Mapping[str, Tensor]) -> Tree:
    """The group mean of a tree as an autograd node (one all-reduce forward, one per backward)."""
    dp = current()
    if dp is None or not t:
        return dict(t)
    out = _Average.apply(dp, *t.values())
    return dict(zip(t, out, strict=True))


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group`` (no-op without ``torch.distributed``): e.g. until rank 0 has
    written a checkpoint that the others will read."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def broadcast(t: Mapping[str, Tensor], *, src: int = 0, group: Any = None) -> None:
    """Copy rank ``src``'s values of the tensors in ``t`` into every rank's tensors, in place.

    For the hyperparameters and weights at the start of a run (no-op without ``torch.distributed``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for v in t.values():
            _count("broadcast", v.numel() * v.element_size())
            buf = v.detach().contiguous().clone()
            dist.broadcast(buf, src=src, group=group)
            v.copy_(buf)
