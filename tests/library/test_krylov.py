"""GMRES, BiCGStab and CGLS on trees against dense solves of non-symmetric systems (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from hypergradients.core import tree
from hypergradients.core.kernels import krylov

DT = torch.float64
Tree = dict[str, Tensor]
LIKE = {"a": torch.zeros(3, 4, dtype=DT), "b": torch.zeros(8, dtype=DT)}  # a two-leaf tree, n = 20


def operator(A: Tensor, count: list[int] | None = None) -> Callable[[Tree], Tree]:
    def mv(x: Tree) -> Tree:
        if count is not None:
            count[0] += 1
        return tree.unflatten(A @ tree.flatten(x), x)
    return mv


def system(seed: int, *, shift: float = 2.0, dtype: torch.dtype = DT) -> tuple[Tensor, Tree]:
    """A non-symmetric, non-normal ``A = shift·I + G/√n + upper-triangular skew`` and a random b."""
    gen = torch.Generator().manual_seed(seed)
    n = tree.numel(LIKE)
    A = shift * torch.eye(n, dtype=DT) + torch.randn(n, n, generator=gen, dtype=DT) / n ** 0.5
    A = A + torch.triu(torch.randn(n, n, generator=gen, dtype=DT), 1) * 0.5
    b = tree.unflatten(torch.randn(n, generator=gen, dtype=DT), LIKE)
    return A.to(dtype), {k: t.to(dtype) for k, t in b.items()}


def rel(x: Tree, A: Tensor, b: Tree) -> float:
    ref = torch.linalg.solve(A, tree.flatten(b))
    return float(torch.linalg.vector_norm(tree.flatten(x) - ref) / torch.linalg.vector_norm(ref))


SOLVERS: dict[str, Callable[..., krylov.KrylovResult]] = {
    "gmres": lambda A, b, **kw: krylov.gmres(operator(A), b, **kw),
    "gmres_restart5": lambda A, b, **kw: krylov.gmres(operator(A), b, restart=5, **kw),
    "bicgstab": lambda A, b, **kw: krylov.bicgstab(operator(A), b, **kw),
    "cgls": lambda A, b, **kw: krylov.cgls(operator(A), operator(A.T), b, **kw),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solvers_match_the_dense_solve(name: str, seed: int) -> None:
    A, b = system(seed)
    assert not torch.allclose(A, A.T)
    res = SOLVERS[name](A, b, iters=500, tol=1e-12)
    assert res.converged and res.residual <= 1e-12
    # cond(A) is 9 to 16 here: a residual of 1e-12 allows an error of ~2e-11; 1e-10 leaves margin.
    assert rel(res.x, A, b) <= 1e-10
    # The reported residual is the true one of the returned x.
    r = tree.flatten(b) - A @ tree.flatten(res.x)
    assert res.residual == pytest.approx(float(r.norm() / tree.flatten(b).norm()), rel=1e-6, abs=1e-16)


def test_unrestarted_gmres_is_exact_in_n_iterations() -> None:
    A, b = system(3, shift=0.5)  # harder: eigenvalues near the origin
    n = tree.numel(b)
    res = krylov.gmres(operator(A), b, iters=n, restart=n, tol=1e-11)
    assert res.converged and res.iterations <= n
    # Restarted every 3 iterations it converges more slowly or stagnates, never more accurately.
    short = krylov.gmres(operator(A), b, iters=n, restart=3, tol=1e-11)
    assert short.residual >= res.residual


def test_matvecs_are_counted_and_the_budget_respected() -> None:
    A, b = system(4)
    for fn in (lambda mv: krylov.gmres(mv, b, iters=4, restart=3),
               lambda mv: krylov.bicgstab(mv, b, iters=4)):
        count = [0]
        res = fn(operator(A, count))
        assert res.matvecs == count[0]
        assert res.iterations == 4 and not res.converged and res.residual > 1e-6
    count, rcount = [0], [0]
    res = krylov.cgls(operator(A, count), operator(A.T, rcount), b, iters=4)
    assert res.matvecs == count[0] + rcount[0] and res.iterations == 4


@pytest.mark.parametrize("name", list(SOLVERS))
def test_zero_rhs_and_warm_start(name: str) -> None:
    A, b = system(5)
    zero = SOLVERS[name](A, tree.zeros_like(b), iters=10)
    assert zero.converged and zero.matvecs == 0 and float(tree.norm(zero.x)) == 0.0
    x = tree.unflatten(torch.linalg.solve(A, tree.flatten(b)), b)
    warm = SOLVERS[name](A, b, iters=10, x0=x, tol=1e-10)
    assert warm.converged and warm.iterations == 0 and warm.matvecs == 1  # the initial residual only


def test_bicgstab_reports_a_breakdown_that_gmres_survives() -> None:
    # A swaps two coordinates; with b = e₁ the first BiCG step has ⟨r̂, A p⟩ = ⟨e₁, e₂⟩ = 0.
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    b = {"x": torch.tensor([1.0, 0.0], dtype=DT)}
    bad = krylov.bicgstab(operator(A), b, iters=50, tol=1e-12)
    assert not bad.converged and bad.iterations == 0
    good = krylov.gmres(operator(A), b, iters=50, tol=1e-12)
    assert good.converged and torch.allclose(good.x["x"], torch.tensor([0.0, 1.0], dtype=DT))


def test_float32_trees() -> None:
    A, b = system(6, dtype=torch.float32)
    for name in ("gmres", "bicgstab"):
        res = SOLVERS[name](A, b, iters=200, tol=1e-5)
        # float32 rounding (1.2e-7) times cond(A) ≈ 10 is far below the 1e-5 asked for.
        assert res.converged and res.x["a"].dtype == torch.float32
        assert rel({k: t.double() for k, t in res.x.items()}, A.double(), {k: t.double() for k, t in b.items()}) <= 1e-4


def test_bad_arguments_are_named() -> None:
    A, b = system(0)
    with pytest.raises(ValueError, match="restart must be a positive integer, got 0"):
        krylov.gmres(operator(A), b, restart=0)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0, got -1"):
        krylov.bicgstab(operator(A), b, tol=-1.0)
    with pytest.raises(ValueError, match="x0 must have the keys and shapes of b"):
        krylov.cgls(operator(A), operator(A.T), b, x0={"a": LIKE["a"]})
