"""The dense matrix of an operator, from products with the unit vectors, and a direct solve."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import tree
from ..errors import HypergradientError, ProblemTooLargeError
from ..operators import LinearOperator
from .solve import Solve, ratio


def check_dense_size(op: LinearOperator, n: int, max_size: int, what: str) -> None:
    if n > max_size:
        kind = "Hessian" if op.symmetric else "Jacobian of the condition"
        instead = "hg.CG, hg.Neumann or hg.Nystrom" if op.symmetric else "hg.GMRES or hg.BiCGStab"
        raise ProblemTooLargeError(
            f"{what} would materialise a {n}×{n} {kind} ({n * n * 8 / 2**30:.2f} GiB in float64), above "
            f"its max_size={max_size} weights. Use {instead} (matrix-free), or raise max_size if you have "
            "the memory."
        )


def dense_matrix(op: LinearOperator, like: Mapping[str, Tensor], *, chunk: int = 256) -> Tensor:
    """The n×n matrix of ``op`` (``n`` products, batched ``chunk`` at a time), in ``like``'s key order.

    Row ``i`` of the batch is ``M e_i``, the ``i``-th column of ``M``: the stacked rows are ``Mᵀ``,
    transposed back here (a view; for a symmetric ``M`` the same matrix up to rounding).
    """
    flat = tree.flatten(like)
    n = flat.numel()
    cols = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        eye = torch.zeros(m, n, dtype=flat.dtype, device=flat.device)
        eye[torch.arange(m), torch.arange(start, start + m)] = 1.0
        mx = op.mv_batched(tree.unflatten_rows(eye, like))
        cols.append(torch.cat([mx[k].reshape(m, -1) for k in like], dim=1))
    return torch.cat(cols, dim=0).T


def exact(op: LinearOperator, v: Mapping[str, Tensor], *, max_size: int = 5000) -> Solve:
    """Dense solve ``A p = v``, ``A = op`` (``M + δI`` for ``op.damped(δ)``; n products to build it).

    Refuses above ``max_size`` weights. ``extra["damping"]`` is the operator's shift.

    A symmetric ``A`` (a Hessian) is solved by a Cholesky factorisation, which succeeds exactly when
    ``A`` is (numerically) positive definite: then ``extra["positive_definite"] = 1``. Otherwise
    ``A`` is solved by LU, ``extra["positive_definite"] = 0`` and ``extra["lambda_min"]`` is ``A``'s
    smallest eigenvalue (one symmetric eigendecomposition, spent only in that case). ``converged``
    is False when ``A`` is indefinite, ``λ_min < −√eps·max|λ|`` (the weights are not a minimum); a
    smallest eigenvalue within that rounding margin of zero is a flat direction of a minimum (a
    symmetry of the model), which keeps ``converged=True``. A non-symmetric ``A`` is solved by LU.
    """
    n = tree.numel(v)
    check_dense_size(op, n, max_size, "hg.Exact")
    A = dense_matrix(op, v)  # the shift is on the diagonal already, exactly (σ·0 off it)
    b = tree.flatten(v)
    extra = {"damping": op.shift}
    if not op.symmetric:
        try:
            x = torch.linalg.solve(A, b)
        except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
            raise HypergradientError(
                f"hg.Exact: ∂F/∂w is singular at these weights ({e}): the condition does not determine the "
                "weights locally. Add damping (hg.Exact(damping=...)) or check the condition"
            ) from e
        res = ratio(torch.linalg.vector_norm(A @ x - b), float(torch.linalg.vector_norm(b)))
        if not math.isfinite(res):
            raise HypergradientError(
                "hg.Exact: the dense solve produced non-finite values; ∂F/∂w is "
                "singular or ill-conditioned here: add damping (hg.Exact(damping=...))."
            )
        return Solve(tree.unflatten(x, v), 1, res, True, extra)
    H = (0.5 * (A.T + A)).contiguous()  # autograd's H is symmetric up to rounding; row-major for the BLAS
    L, info = torch.linalg.cholesky_ex(H)
    pd = int(info) == 0
    try:
        x = torch.cholesky_solve(b[:, None], L)[:, 0] if pd else torch.linalg.solve(H, b)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        raise HypergradientError(
            f"hg.Exact: the Hessian is singular at these weights ({e}). A weight the inner loss does not "
            "depend on, or an unregularised flat direction, makes H singular: add damping "
            "(hg.Exact(damping=...)) or regularise the inner loss."
        ) from e
    res = ratio(torch.linalg.vector_norm(H @ x - b), float(torch.linalg.vector_norm(b)))
    if not math.isfinite(res):
        raise HypergradientError(
            "hg.Exact: the dense solve produced non-finite values; H is singular or "
            "ill-conditioned here: add damping (hg.Exact(damping=...))."
        )
    extra["positive_definite"] = float(pd)
    indefinite = False
    if not pd:
        ev = torch.linalg.eigvalsh(H)
        extra["lambda_min"] = float(ev[0])
        # An eigenvalue is known to about √eps of the largest one here: H is assembled from n
        # products, each rounded relative to the terms it sums, which may cancel.
        indefinite = float(ev[0]) < -math.sqrt(torch.finfo(H.dtype).eps) * float(ev.abs().max())
    return Solve(tree.unflatten(x, v), 1, res, not indefinite, extra)
