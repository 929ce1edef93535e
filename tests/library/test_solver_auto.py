"""``hg.Auto``'s default stopping rule on ill-conditioned problems, and CG's Ritz-value estimates.

A relative residual ``‖Hp − v‖/‖v‖ ≤ tol`` bounds the relative error of ``p`` only by ``κ·tol``:
at ``κ ≈ 1e3`` the residual rule alone stops early enough to give cosines below 0.999. Auto's
default also asks that the error estimate ``‖r‖/(θ_min‖p‖)`` (``θ_min`` the smallest Ritz value of
CG's Lanczos tridiagonal) be at most ``error_tol``. References are float64 dense solves.
"""

from __future__ import annotations

import pytest
import torch

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.core.kernels import krylov
from hypergradients.core.kernels.solve import Solve
from hypergradients.core.operators import HessianOperator


def hg_of(prob: P.Problem, method: hg.Method, **kw: object) -> tuple[dict, hg.Info]:
    return hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=method, return_info=True, **kw
    )  # type: ignore[call-overload,no-any-return]


def cosine(a: dict, b: dict) -> float:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return float(fa @ fb / (fa.norm() * fb.norm()))


@pytest.fixture(scope="module", params=[1, 3, 4])
def cond1e3(request: pytest.FixtureRequest) -> P.Problem:
    return P.conditioned_logistic(1e3, seed=request.param)


def test_default_auto_keeps_cosine_0999_at_condition_1e3(cond1e3: P.Problem) -> None:
    ev = torch.linalg.eigvalsh(cond1e3.hessian)
    assert 990 <= float(ev[-1] / ev[0]) <= 1010
    g, info = hg_of(cond1e3, hg.Auto())
    # The promise; the residual rule alone gives 0.99667 on seed 4 (measured).
    assert cosine(g, cond1e3.reference) >= 0.999
    assert info.converged and info.residual is not None and info.residual <= 1e-2
    assert info.extra["error_estimate"] <= 3e-2


def test_error_tol_none_is_the_residual_rule_alone(cond1e3: P.Problem) -> None:
    # The former behaviour stays one argument away: CG to relative residual tol, nothing else.
    _, ia = hg_of(cond1e3, hg.Auto(error_tol=None))
    _, ic = hg_of(cond1e3, hg.CG(iters=200, tol=1e-2))
    assert ia.hvps == ic.hvps and ia.residual == ic.residual


def test_ritz_values_bracket_inside_the_spectrum(cond1e3: P.Problem) -> None:
    # Ritz values of a symmetric matrix lie in [λ_min, λ_max] (Cauchy interlacing); CG's
    # tridiagonal is built from recurrence scalars, so the bound holds to rounding: 1e-8 relative.
    ev = torch.linalg.eigvalsh(cond1e3.hessian)
    _, info = hg_of(cond1e3, hg.Auto(tol=1e-12))
    lo, hi = info.extra["lambda_min"], info.extra["lambda_max"]
    assert float(ev[0]) * (1 - 1e-8) <= lo <= hi <= float(ev[-1]) * (1 + 1e-8)
    # Run to convergence, the extremes are found: λ_max to 1e-6, λ_min to 1 %.
    assert hi == pytest.approx(float(ev[-1]), rel=1e-6)
    assert lo == pytest.approx(float(ev[0]), rel=1e-2)


def test_cg_error_rule_on_a_diagonal_matrix() -> None:
    # H = diag(1, …, 1e3), v = H·1 so that p* = 1: the residual is dominated by the large
    # eigenvalues, the error by the small ones. The residual rule alone stops at 1e-2 with p off
    # by 33 % (measured); the error rule goes on until it is off by 0.25 %.
    d = torch.logspace(0, 3, 50, dtype=torch.float64)
    v = {"x": d.clone()}

    def mv(x: dict) -> dict:
        return {"x": d * x["x"]}

    def err(s: Solve) -> float:
        return float((s.p["x"] - 1.0).norm() / d.numel() ** 0.5)

    op_plain, op_ruled = HessianOperator(mv), HessianOperator(mv)
    plain = krylov.cg(op_plain, v, iters=500, tol=1e-2)
    ruled = krylov.cg(op_ruled, v, iters=500, tol=1e-2, error_tol=1e-2)
    assert plain.converged and ruled.converged and op_ruled.hvps > op_plain.hvps
    assert err(ruled) <= 1e-2 < 0.1 < err(plain)
    # θ_min ≥ λ_min = 1, and once found to 15 %, the estimate bounds the error within that factor.
    assert 1.0 <= ruled.extra["lambda_min"] <= 1.15
    assert ruled.extra["error_estimate"] * 1.15 >= err(ruled)
    assert "error_estimate" not in plain.extra


def test_warm_started_auto_reuses_the_curvature_estimate(cond1e3: P.Problem) -> None:
    # Consecutive hyper steps: the state keeps p and the Ritz extremes; warm calls meet both rules
    # in fewer HVPs than a cold call, and still keep the cosine promise.
    _, i0 = hg_of(cond1e3, hg.Auto(), state=hg.SolverState())
    state = i0.state
    assert isinstance(state, hg.CGState) and state.lambda_min == pytest.approx(i0.extra["lambda_min"])
    lam = cond1e3.hparams["log_l2"]
    for step in range(1, 4):
        hp = {"log_l2": lam + 0.02 * step}
        # w* moves with λ: re-solve it so that the dense reference is the IFT one.
        ws = P.newton_solve(cond1e3.inner_loss, cond1e3.params, hp)
        ref = P._finish("step", cond1e3.inner_loss, cond1e3.outer_loss, ws, hp, quadratic=False).reference
        cold, ic = hg.hypergradient(
            cond1e3.outer_loss, cond1e3.inner_loss, ws, hp, method=hg.Auto(), return_info=True
        )
        warm, iw = hg.hypergradient(
            cond1e3.outer_loss, cond1e3.inner_loss, ws, hp, method=hg.Auto(), return_info=True, state=state
        )
        state = iw.state
        assert iw.extra["warm_start"] == 1.0 and iw.hvps < ic.hvps
        assert cosine(warm, ref) >= 0.999 and cosine(cold, ref) >= 0.999


def test_a_damped_solve_leaves_no_unusable_curvature_estimate() -> None:
    # A saddle (eigenvalues 2, 1, −0.5): Auto damps; θ_min − δ ≤ 0 must not be stored, or every
    # later warm call would fail the error rule and run to max_iters.
    A = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    prob = P.spd_quadratic(
        A,
        torch.eye(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64),
    )
    _, info = hg_of(prob, hg.Auto(), state=hg.CGState(lambda_min=0.5, lambda_max=2.0))
    state = info.state
    assert info.extra["damping"] > 0.5 and info.converged
    assert isinstance(state, hg.CGState) and (state.lambda_min is None or state.lambda_min > 0)
    _, info2 = hg_of(prob, hg.Auto(), state=state)
    assert info2.hvps < 200
    # A non-positive hint is ignored by CG itself too.
    op = HessianOperator(lambda x: {"x": 2.0 * x["x"]})
    s = krylov.cg(
        op, {"x": torch.ones(3, dtype=torch.float64)}, iters=10, tol=1e-2, error_tol=1e-2, lambda_min=-1.0
    )
    assert s.converged and op.hvps == 1
