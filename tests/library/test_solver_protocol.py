"""The one solver protocol ``solve(op, v, state) -> (p, state, stats)`` and the Hessian operator.

Every implicit method runs on every shared problem through ``method.solve`` on the operator of
the inner Hessian; ``direct − Mᵀp`` with the dense mixed partial ``M`` must equal what
``hg.hypergradient`` returns. The two differ only in ``Mᵀp`` (a dense product against autograd's
vector-Jacobian product, each ~1e-16 relative, summed over ≤ 45 terms): 1e-12 is float64
agreement with margin. The operator's transforms are checked against dense algebra exactly
(``torch.add(Hx, x, alpha=δ)`` is the one rounding), and a solver defined here, outside the
library, works in ``hg.hypergradient`` unchanged: no list of methods to extend.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.core.derivatives import InnerDerivatives
from hypergradients.core.method import ImplicitMethod, Stats
from hypergradients.core.operators import HessianOperator

DT = torch.float64


def solvers(n: int) -> list[ImplicitMethod]:
    return [
        hg.Exact(),
        hg.Exact(damping=0.1),
        hg.CG(iters=200, tol=1e-13),
        hg.CG(iters=3, tol=0.0),
        hg.CG(damping=0.3),
        hg.Neumann(iters=7, alpha=0.01),
        hg.Neumann(iters=30),
        hg.Identity(scale=0.3),
        hg.Nystrom(rank=min(4, n)),
        hg.Nystrom(rank=min(6, n), floor="auto"),
        hg.Nystrom(rank=3, rho=0.05),
        hg.Auto(),
        hg.Auto(tol=1e-12),
    ]


def test_every_solver_through_the_protocol_gives_the_hypergradient(problem: P.Problem) -> None:
    n = problem.hessian.shape[0]
    for method in solvers(n):
        w = tree.clone_leaves(problem.params, requires_grad=True)
        lam = tree.clone_leaves(problem.hparams, requires_grad=True)
        v = tree.unflatten(problem.v, w)
        op = HessianOperator.of(InnerDerivatives(problem.inner_loss, w, lam))
        p, state, stats = method.solve(op, v, None, residual=True)
        assert isinstance(stats, Stats) and isinstance(state, hg.SolverState)
        assert set(p) == set(problem.params)
        g_protocol = problem.direct - problem.mixed.T @ tree.flatten(p)
        g, info = hg.hypergradient(
            problem.outer_loss,
            problem.inner_loss,
            problem.params,
            problem.hparams,
            method=method,
            return_info=True,
        )
        assert P.rel_err(g, tree.unflatten(g_protocol, problem.hparams)) <= 1e-12, method
        assert info.hvps == op.hvps and info.iterations == stats.iterations, method
        assert info.residual == stats.residual and info.extra == stats.extra, method


def dense_op(H: torch.Tensor, *, batched: bool = True) -> HessianOperator:
    return HessianOperator(lambda x: {"w": H @ x["w"]}, (lambda xs: {"w": xs["w"] @ H}) if batched else None)


def test_operator_transforms_are_shifts_of_the_same_products() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=gen, dtype=DT)
    H = A @ A.T
    x = {"w": torch.randn(5, generator=gen, dtype=DT)}
    op = dense_op(H)
    assert torch.equal(op(x)["w"], H @ x["w"])
    damped = op.damped(0.7)
    assert torch.equal(damped(x)["w"], torch.add(H @ x["w"], x["w"], alpha=0.7))
    assert damped.shift == 0.7 and op.shifted(-0.2).damped(0.7).shift == pytest.approx(0.5, abs=1e-15)
    assert op.damped(0.0) is op
    X = {"w": torch.randn(3, 5, generator=gen, dtype=DT)}
    # The batched product, with or without a vmapped backward, and its shift.
    for o in (op.shifted(-0.4), dense_op(H, batched=False).shifted(-0.4)):
        assert torch.allclose(o.mv_batched(X)["w"], X["w"] @ H - 0.4 * X["w"], rtol=1e-14, atol=1e-14)
    # Every product is counted once, on the operator and all its transforms together.
    assert op.hvps == 1 + 1 + 3 and damped.hvps == op.hvps
    with pytest.raises(hg.HypergradientError, match=r"damping must be a finite number >= 0, got -1"):
        op.damped(-1.0)


def test_damping_as_an_operator_transform_is_the_damped_solve(logistic: P.Problem) -> None:
    # CG(damping=δ) and Exact(damping=δ) solve (H + δI)p = v: against the dense damped solve
    # (cond ≤ 1e3 here, CG to 1e-13: both ~1e-12 relative; 1e-9 leaves margin).
    d = 0.3
    n = logistic.hessian.shape[0]
    p = torch.linalg.solve(logistic.hessian + d * torch.eye(n, dtype=DT), logistic.v)
    expected = tree.unflatten(logistic.direct - logistic.mixed.T @ p, logistic.hparams)
    for method in (hg.CG(iters=200, tol=1e-13, damping=d), hg.Exact(damping=d)):
        g, info = hg.hypergradient(
            logistic.outer_loss,
            logistic.inner_loss,
            logistic.params,
            logistic.hparams,
            method=method,
            return_info=True,
        )
        assert P.rel_err(g, expected) <= 1e-9 and info.extra["damping"] == d


@dataclass(frozen=True)
class DenseEig(ImplicitMethod):
    """A solver written outside the library: ``p = (H + δI)⁻¹ v`` by a dense eigendecomposition."""

    damping: float = 0.0

    def solve(
        self, op: HessianOperator, v: dict, state: hg.SolverState | None, *, residual: bool = False
    ) -> tuple[dict, hg.SolverState, Stats]:
        from hypergradients.core.kernels.dense import dense_matrix
        from hypergradients.core.kernels.solve import relative_residual

        A = op.damped(self.damping)
        H = dense_matrix(A, v)
        evals, Q = torch.linalg.eigh(0.5 * (H + H.T))
        p = tree.unflatten(Q @ ((Q.T @ tree.flatten(v)) / evals), v)
        res = relative_residual(A, p, v) if residual else None
        return p, state or hg.SolverState(), Stats(1, res, True, {"lambda_min": float(evals[0])})


def test_a_new_solver_is_one_class(ridge: P.Problem) -> None:
    g, info = hg.hypergradient(
        ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, method=DenseEig(), return_info=True
    )
    # cond(H) ≤ 1e3: the eigendecomposition solve agrees with the closed form to ~1e-13.
    assert P.rel_err(g, ridge.reference) <= 1e-10
    n = ridge.hessian.shape[0]
    assert info.method == "DenseEig" and info.hvps == n + 1 and info.residual is not None
    assert info.state is not None and info.state.method == "DenseEig"
    # Its state is its own: another method's is refused, by name.
    with pytest.raises(hg.StateMismatchError, match=r"made by hg\.DenseEig, and hg\.CG cannot use it"):
        hg.hypergradient(
            ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, method=hg.CG(), state=info.state
        )


def test_a_method_that_is_not_one_is_refused(ridge: P.Problem) -> None:
    with pytest.raises(hg.HypergradientError, match=r"method must be one of hg\.Auto.*got 'cg'"):
        hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, method="cg")  # type: ignore[arg-type]


@dataclass(frozen=True)
class DenseLU(ImplicitMethod):
    """A solver written outside the library for both doors: ``p = M⁻¹v`` by a dense LU solve of the
    operator's matrix, whatever the operator (a Hessian, or a condition's non-symmetric ``(∂F/∂w)ᵀ``)."""

    def solve(
        self, op: hg.LinearOperator, v: dict, state: hg.SolverState | None, *, residual: bool = False
    ) -> tuple[dict, hg.SolverState, Stats]:
        from hypergradients.core.kernels.dense import dense_matrix
        from hypergradients.core.kernels.solve import relative_residual

        p = tree.unflatten(torch.linalg.solve(dense_matrix(op, v), tree.flatten(v)), v)
        return p, self.own_state(state), Stats(1, relative_residual(op, p, v) if residual else None, True)


def test_a_new_solver_is_one_class_for_both_doors(ridge: P.Problem) -> None:
    # hypergradient: the Hessian of the ridge problem, against its closed form (cond ≤ 1e3: ~1e-13).
    g, info = hg.hypergradient(
        ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, method=DenseLU(), return_info=True
    )
    assert P.rel_err(g, ridge.reference) <= 1e-10 and info.method == "DenseLU" and info.hvps == 6 + 1
    # root_hypergradient: a non-symmetric fixed point, w = W w + Bλ (spectral radius 0.5), against its
    # closed form Bᵀ(I − W)⁻ᵀ(w* − t) (a 10×10 solve with cond ≈ 3: ~1e-15).
    gen = torch.Generator().manual_seed(13)
    W = torch.randn(10, 10, generator=gen, dtype=DT)
    W = 0.5 * W / torch.linalg.eigvals(W).abs().max()
    B, t = torch.randn(10, 3, generator=gen, dtype=DT), torch.randn(10, generator=gen, dtype=DT)
    lam = {"lam": torch.randn(3, generator=gen, dtype=DT)}
    A = torch.eye(10, dtype=DT) - W
    ws = torch.linalg.solve(A, B @ lam["lam"])
    ref = {"lam": B.T @ torch.linalg.solve(A.T, ws - t)}
    g, rinfo = hg.root_hypergradient(
        lambda p, h: 0.5 * torch.sum((p["w"] - t) ** 2),
        lambda p, h: {"w": W @ p["w"] + B @ h["lam"]},
        {"w": ws},
        lam,
        fixed_point=True,
        method=DenseLU(),
        return_info=True,
    )
    assert P.rel_err(g, ref) <= 1e-12 and isinstance(rinfo, hg.RootInfo) and isinstance(rinfo, hg.Info)
    assert rinfo.method == "DenseLU" and rinfo.vjps == 10 + 1 and rinfo.jvps == 0
    assert rinfo.residual is not None and rinfo.residual <= 1e-14
