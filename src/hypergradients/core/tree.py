"""Algebra on ``dict[str, Tensor]`` trees: the shape of ``module.named_parameters()``.

Every solver in :mod:`hypergradients.core.kernels` works on trees directly, so no per-iteration
flatten/unflatten copy is made; :func:`flatten` and :func:`unflatten` exist for the dense
methods (``Exact``) and for tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``Σ_k ⟨a_k, b_k⟩`` as a 0-dim tensor.

    ``torch.vdot`` on flat views reads each leaf once and allocates no product temporary (the
    solvers call this on every iteration); the per-leaf scalars are summed without a ``stack``.
    """
    total: Tensor | None = None
    for k in a:
        x, y = a[k], b[k]
        if x.is_complex() or y.is_complex() or x.dtype != y.dtype:
            t = torch.sum(x * y)
        else:
            t = torch.vdot(x.reshape(-1), y.reshape(-1))
        total = t if total is None else total + t
    if total is None:
        raise ValueError("dot of two empty trees")
    return total


def norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of all leaves."""
    return torch.sqrt(dot(a, a))


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    return {k: a[k] + b[k] for k in a}


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    return {k: a[k] - b[k] for k in a}


def scale(a: Mapping[str, Tensor], s: float | Tensor) -> Tree:
    return {k: s * a[k] for k in a}


def axpy(alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Tree:
    """``alpha * x + y``."""
    if isinstance(alpha, Tensor):
        return {k: y[k] + alpha * x[k] for k in x}
    return {k: torch.add(y[k], x[k], alpha=alpha) for k in x}


def zeros_like(a: Mapping[str, Tensor]) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def clone_leaves(a: Mapping[str, Tensor], *, requires_grad: bool) -> Tree:
    """Fresh leaf copies (never aliases of the caller's tensors), optionally requiring grad."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in a.items()}


def numel(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in a.values())


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the leaves (in key order) into one vector."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten`: split ``vec`` into the shapes of ``like``."""
    out: Tree = {}
    i = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i : i + n].reshape(v.shape)
        i += n
    if i != vec.numel():
        raise ValueError(f"vector of length {vec.numel()} does not match a tree of {i} elements")
    return out


def unflatten_rows(rows: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Split an ``m×n`` matrix into a tree whose leaves have a leading batch dimension ``m``.

    Row ``i`` becomes the ``i``-th element of every leaf: the layout of batched HVPs (``vmap``).
    """
    out: Tree = {}
    i = 0
    m = rows.shape[0]
    for k, v in like.items():
        out[k] = rows[:, i : i + v.numel()].reshape((m, *v.shape))
        i += v.numel()
    if i != rows.shape[1]:
        raise ValueError(f"rows of length {rows.shape[1]} do not match a tree of {i} elements")
    return out


def all_finite(a: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def first_nonfinite(a: Mapping[str, Tensor]) -> str | None:
    """Name of the first leaf holding a NaN or an infinity, else ``None``."""
    for k, v in a.items():
        if not bool(torch.isfinite(v).all()):
            return k
    return None


def as_tree(values: Iterable[Tensor | None], like: Mapping[str, Tensor]) -> Tree:
    """Zip autograd's tuple output back onto ``like``'s keys; ``None`` (unused) becomes zeros."""
    pairs = zip(like.items(), values, strict=True)
    return {k: (torch.zeros_like(ref) if g is None else g) for (k, ref), g in pairs}
