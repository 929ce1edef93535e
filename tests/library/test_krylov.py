"""GMRES, BiCGStab and CGLS on trees against dense solves of non-symmetric systems, MINRES against
dense solves of symmetric indefinite ones (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import hypergradients as hg
from hypergradients.core import tree
from hypergradients.core.kernels import krylov
from hypergradients.core.kernels.solve import Solve

DT = torch.float64
Tree = dict[str, Tensor]
LIKE = {"a": torch.zeros(3, 4, dtype=DT), "b": torch.zeros(8, dtype=DT)}  # a two-leaf tree, n = 20


def dense(A: Tensor) -> Callable[[Tree], Tree]:
    return lambda x: tree.unflatten(A @ tree.flatten(x), x)


def operator(A: Tensor, *, symmetric: bool = False) -> hg.LinearOperator:
    """``A`` as an operator, with its transpose product (for CGLS)."""
    return hg.LinearOperator(dense(A), rmatvec=None if symmetric else dense(A.T), symmetric=symmetric)


def system(seed: int, *, shift: float = 2.0, dtype: torch.dtype = DT) -> tuple[Tensor, Tree]:
    """A non-symmetric, non-normal ``A = shift·I + G/√n + upper-triangular skew`` and a random b."""
    gen = torch.Generator().manual_seed(seed)
    n = tree.numel(LIKE)
    A = shift * torch.eye(n, dtype=DT) + torch.randn(n, n, generator=gen, dtype=DT) / n**0.5
    A = A + torch.triu(torch.randn(n, n, generator=gen, dtype=DT), 1) * 0.5
    b = tree.unflatten(torch.randn(n, generator=gen, dtype=DT), LIKE)
    return A.to(dtype), {k: t.to(dtype) for k, t in b.items()}


def rel(x: Tree, A: Tensor, b: Tree) -> float:
    ref = torch.linalg.solve(A, tree.flatten(b))
    return float(torch.linalg.vector_norm(tree.flatten(x) - ref) / torch.linalg.vector_norm(ref))


SOLVERS: dict[str, Callable[..., Solve]] = {
    "gmres": lambda op, b, **kw: krylov.gmres(op, b, **kw),
    "gmres_restart5": lambda op, b, **kw: krylov.gmres(op, b, restart=5, **kw),
    "bicgstab": lambda op, b, **kw: krylov.bicgstab(op, b, **kw),
    "cgls": lambda op, b, **kw: krylov.cgls(op, b, **kw),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solvers_match_the_dense_solve(name: str, seed: int) -> None:
    A, b = system(seed)
    assert not torch.allclose(A, A.T)
    res = SOLVERS[name](operator(A), b, iters=500, tol=1e-12)
    assert res.converged and res.residual is not None and res.residual <= 1e-12
    # cond(A) is 9 to 16 here: a residual of 1e-12 allows an error of ~2e-11; 1e-10 leaves margin.
    assert rel(res.p, A, b) <= 1e-10
    # The reported residual is the true one of the returned x.
    r = tree.flatten(b) - A @ tree.flatten(res.p)
    assert res.residual == pytest.approx(float(r.norm() / tree.flatten(b).norm()), rel=1e-6, abs=1e-16)


def test_unrestarted_gmres_is_exact_in_n_iterations() -> None:
    A, b = system(3, shift=0.5)  # harder: eigenvalues near the origin
    n = tree.numel(b)
    res = krylov.gmres(operator(A), b, iters=n, restart=n, tol=1e-11)
    assert res.converged and res.iterations <= n
    # Restarted every 3 iterations it converges more slowly or stagnates, never more accurately.
    short = krylov.gmres(operator(A), b, iters=n, restart=3, tol=1e-11)
    assert short.residual is not None and res.residual is not None and short.residual >= res.residual


def test_products_are_counted_by_the_operator_and_the_budget_respected() -> None:
    A, b = system(4)
    # GMRES(restart=3), 4 iterations: 4 products and the true residual after each of its 2 cycles;
    # BiCGStab: 2 per iteration and the final true residual.
    for fn, products in (
        (lambda op: krylov.gmres(op, b, iters=4, restart=3), 4 + 2),
        (lambda op: krylov.bicgstab(op, b, iters=4), 2 * 4 + 1),
    ):
        op = operator(A)
        res = fn(op)
        assert op.products == products and op.transposed == 0
        assert res.iterations == 4 and not res.converged and res.residual is not None and res.residual > 1e-6
    op = operator(A)
    res = krylov.cgls(op, b, iters=4)
    # One product with A and one with Aᵀ per iteration, Aᵀ of the start residual, and the true
    # residual at the end.
    assert res.iterations == 4 and op.transposed == 1 + 4 and op.products == 4 + (1 + 4) + 1


@pytest.mark.parametrize("name", list(SOLVERS))
def test_zero_rhs_and_warm_start(name: str) -> None:
    A, b = system(5)
    op = operator(A)
    zero = SOLVERS[name](op, tree.zeros_like(b), iters=10)
    assert zero.converged and op.products == 0 and float(tree.norm(zero.p)) == 0.0
    x = tree.unflatten(torch.linalg.solve(A, tree.flatten(b)), b)
    op = operator(A)
    warm = SOLVERS[name](op, b, iters=10, x0=x, tol=1e-10)
    assert warm.converged and warm.iterations == 0 and op.products == 1  # the initial residual only


def test_bicgstab_reports_a_breakdown_that_gmres_survives() -> None:
    # A swaps two coordinates; with b = e₁ the first BiCG step has ⟨r̂, A p⟩ = ⟨e₁, e₂⟩ = 0.
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    b = {"x": torch.tensor([1.0, 0.0], dtype=DT)}
    bad = krylov.bicgstab(operator(A), b, iters=50, tol=1e-12)
    assert not bad.converged and bad.iterations == 0
    good = krylov.gmres(operator(A), b, iters=50, tol=1e-12)
    assert good.converged and torch.allclose(good.p["x"], torch.tensor([0.0, 1.0], dtype=DT))


def test_float32_trees() -> None:
    A, b = system(6, dtype=torch.float32)
    for name in ("gmres", "bicgstab"):
        res = SOLVERS[name](operator(A), b, iters=200, tol=1e-5)
        # float32 rounding (1.2e-7) times cond(A) ≈ 10 is far below the 1e-5 asked for.
        assert res.converged and res.p["a"].dtype == torch.float32
        assert (
            rel({k: t.double() for k, t in res.p.items()}, A.double(), {k: t.double() for k, t in b.items()})
            <= 1e-4
        )


def test_bad_arguments_are_named() -> None:
    A, b = system(0)
    with pytest.raises(ValueError, match="restart must be a positive integer, got 0"):
        krylov.gmres(operator(A), b, restart=0)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0, got -1"):
        krylov.bicgstab(operator(A), b, tol=-1.0)
    with pytest.raises(ValueError, match="x0 must have the keys and shapes of v"):
        krylov.cgls(operator(A), b, x0={"a": LIKE["a"]})
    with pytest.raises(hg.HypergradientError, match="MINRES needs a symmetric operator"):
        krylov.minres(operator(A), b)


# ---------------------------------------------------------------- MINRES: symmetric, indefinite
def symmetric_indefinite(seed: int, *, negative: int = 5) -> tuple[Tensor, Tree]:
    """``A = Q diag(λ) Qᵀ`` with ``negative`` eigenvalues in [−3, −0.5], the rest in [0.5, 3]: cond ≤ 6."""
    gen = torch.Generator().manual_seed(seed)
    n = tree.numel(LIKE)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    mag = 0.5 + 2.5 * torch.rand(n, generator=gen, dtype=DT)
    sign = torch.ones(n, dtype=DT)
    sign[:negative] = -1.0
    A = Q @ torch.diag(sign * mag) @ Q.T
    b = tree.unflatten(torch.randn(n, generator=gen, dtype=DT), LIKE)
    return 0.5 * (A + A.T), b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minres_matches_the_dense_solve_of_an_indefinite_system(seed: int) -> None:
    A, b = symmetric_indefinite(seed)
    op = operator(A, symmetric=True)
    res = krylov.minres(op, b, iters=200, tol=1e-12)
    assert res.converged and res.residual is not None and res.residual <= 1e-12
    # cond(A) ≤ 6: a residual of 1e-12 allows an error of ~6e-12; 1e-10 leaves margin.
    assert rel(res.p, A, b) <= 1e-10
    r = tree.flatten(b) - A @ tree.flatten(res.p)
    assert res.residual == pytest.approx(float(r.norm() / tree.flatten(b).norm()), rel=1e-6, abs=1e-16)
    # n = 20: Lanczos in exact arithmetic ends by n iterations; one pass plus its true residual.
    assert res.iterations <= 20 + 5 and op.products == res.iterations + 1
    # CG on the same system meets the negative curvature and refuses.
    with pytest.raises(hg.NegativeCurvatureError):
        krylov.cg(operator(A, symmetric=True), b, iters=200, tol=1e-12)


def test_minres_warm_start_zero_rhs_and_budget() -> None:
    A, b = symmetric_indefinite(3)
    x = tree.unflatten(torch.linalg.solve(A, tree.flatten(b)), b)
    op = operator(A, symmetric=True)
    warm = krylov.minres(op, b, x0=x, tol=1e-10)
    assert warm.converged and warm.iterations == 0 and op.products == 1
    op = operator(A, symmetric=True)
    zero = krylov.minres(op, tree.zeros_like(b))
    assert zero.converged and op.products == 0 and float(tree.norm(zero.p)) == 0.0
    short = krylov.minres(operator(A, symmetric=True), b, iters=3, tol=1e-12)
    assert short.iterations == 3 and not short.converged
