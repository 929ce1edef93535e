"""Property-based tests (hypothesis) on random SPD quadratics.

``L_T = ½wᵀAw − wᵀBλ``, ``L_V = ½‖w − t‖²``: ``w* = A⁻¹Bλ``, ``dL_V/dλ = BᵀA⁻¹(w* − t)``.
A is drawn with eigenvalues in [0.1, 10] (cond ≤ 100), so float64 dense solves are accurate to
~1e-13 and 1e-8 is a safe bound for Exact/CG; Neumann against explicit powers and Unrolled
against Neumann are the same arithmetic reordered: 1e-10.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hypergradients as hg
import problems as P

DT = torch.float64


@st.composite
def quadratics(draw: st.DrawFn) -> P.Problem:
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    evals = 0.1 + 9.9 * torch.rand(n, generator=gen, dtype=DT)
    A = Q @ torch.diag(evals) @ Q.T
    A = 0.5 * (A + A.T)
    B = torch.randn(n, m, generator=gen, dtype=DT)
    t = torch.randn(n, generator=gen, dtype=DT)
    lam = torch.randn(m, generator=gen, dtype=DT)
    return P.spd_quadratic(A, B, t, lam)


def _hg(prob: P.Problem, method: hg.Method) -> dict:
    return hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=method)


def _close(a: dict, b: dict, tol: float) -> bool:
    fa, fb = a["lam"], b["lam"]
    return float((fa - fb).norm()) <= tol * max(float(fb.norm()), 1e-12)


@settings(max_examples=25, deadline=None)
@given(quadratics())
def test_exact_and_cg_solve_random_quadratics(prob: P.Problem) -> None:
    n = prob.hessian.shape[0]
    assert _close(_hg(prob, hg.Exact()), prob.reference, 1e-8)
    # CG terminates in at most n steps in exact arithmetic; 3n covers rounding.
    assert _close(_hg(prob, hg.CG(iters=3 * n, tol=1e-14)), prob.reference, 1e-8)


@settings(max_examples=25, deadline=None)
@given(quadratics(), st.integers(1, 30), st.floats(0.05, 1.9))
def test_neumann_and_unrolled_agree_with_matrix_powers(prob: P.Problem, K: int, frac: float) -> None:
    alpha = frac / P.lambda_max(prob)  # inside the convergence region 0 < α < 2/λ_max
    ref = P.neumann_reference(prob, K, alpha)
    assert _close(_hg(prob, hg.Neumann(iters=K, alpha=alpha)), ref, 1e-10)
    assert _close(_hg(prob, hg.Unrolled(steps=K, lr=alpha)), ref, 1e-10)


@settings(max_examples=15, deadline=None)
@given(quadratics())
def test_full_rank_nystrom_solves_random_quadratics(prob: P.Problem) -> None:
    n = prob.hessian.shape[0]
    # ρ = 1e-9 costs ≤ ρ/λ_min = 1e-8 relative in p; rounding amplified by eps/ρ·cond ≤ 2e-5 at
    # worst. Those bound the error of p, so of Mᵀp relative to ‖M‖‖p‖: where the hypergradient
    # itself is much smaller than that (cancellation in Mᵀp; hypothesis found m = 1 with
    # ‖g‖ ≈ 2e-3·‖M‖‖p‖), it is the scale the tolerance applies to.
    g = _hg(prob, hg.Nystrom(rank=n, rho=1e-9))
    p = torch.linalg.solve(prob.hessian, prob.v)
    scale = max(
        float(prob.reference["lam"].norm()), float(torch.linalg.matrix_norm(prob.mixed, 2) * p.norm())
    )
    assert float((g["lam"] - prob.reference["lam"]).norm()) <= 1e-4 * scale
