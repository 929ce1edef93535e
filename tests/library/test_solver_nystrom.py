"""Floor-aware Nyström: ``H = A + μI`` with ``A`` of rank r is solved exactly from ``rank ≥ r`` HVPs.

The problem is the exact quadratic of :func:`problems.low_rank_plus_floor` (n = 40, r = 5, floor
μ = 2, top eigenvalue 1e3 + 2, cond(H) ≈ 500). The float64 reference is a dense solve: its relative
error is ~eps·cond ≈ 1e-13, and the sketch adds ~√n·eps·‖H‖/μ ≈ 1e-12 (the stabilising shift ν
of the Nyström construction, relative to the floor), so 1e-10 is float64 agreement with margin.
"""

from __future__ import annotations

import pytest
import torch

import hypergradients as hg
import problems as P

R, FLOOR = 5, 2.0


@pytest.fixture(scope="module")
def lowrank() -> P.Problem:
    return P.low_rank_plus_floor(n=40, r=R, floor=FLOOR)


def hg_of(prob: P.Problem, method: hg.Method) -> tuple[dict, hg.Info]:
    return hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        prob.params,
        prob.hparams,  # type: ignore[no-any-return]
        method=method,
        return_info=True,
    )


def test_the_problem_is_rank_r_plus_the_floor(lowrank: P.Problem) -> None:
    ev = torch.linalg.eigvalsh(lowrank.hessian)
    assert torch.allclose(ev[:-R], torch.full_like(ev[:-R], FLOOR), rtol=1e-12, atol=0)
    assert float(ev[-R]) > FLOOR + 0.5


@pytest.mark.parametrize("rank", [R, R + 3])
def test_known_floor_is_exact_from_rank_r(lowrank: P.Problem, rank: int) -> None:
    g, info = hg_of(lowrank, hg.Nystrom(rank=rank, floor=FLOOR))
    assert P.rel_err(g, lowrank.reference) <= 1e-10
    assert info.hvps == rank + 1 and info.extra["floor"] == FLOOR
    assert info.residual is not None and info.residual <= 1e-10


@pytest.mark.parametrize("rank", [R + 1, R + 6])
def test_auto_floor_is_exact_from_rank_r_plus_one(lowrank: P.Problem, rank: int) -> None:
    # λ_min(ΩᵀHΩ) is the floor as soon as the sketch has a direction A does not see.
    g, info = hg_of(lowrank, hg.Nystrom(rank=rank, floor="auto"))
    assert info.extra["floor"] == pytest.approx(FLOOR, rel=1e-12)
    assert P.rel_err(g, lowrank.reference) <= 1e-10


@pytest.mark.parametrize("rank", [R, R + 1, R + 6])
def test_plain_nystrom_is_not_exact_there(lowrank: P.Problem, rank: int) -> None:
    # The same sketch of H itself, with either closure of the uncaptured spectrum: far from float64.
    for method in (hg.Nystrom(rank=rank), hg.Nystrom(rank=rank, rho=FLOOR)):
        g, _ = hg_of(lowrank, method)
        assert P.rel_err(g, lowrank.reference) > 1e-4, method


def test_floor_with_rho_is_the_damped_inverse(lowrank: P.Problem) -> None:
    # floor and rho together: (H + ρI)⁻¹ v exactly (H is rank r plus the floor).
    rho = 0.3
    g, _ = hg_of(lowrank, hg.Nystrom(rank=R + 2, floor=FLOOR, rho=rho))
    n = lowrank.hessian.shape[0]
    p = torch.linalg.solve(lowrank.hessian + rho * torch.eye(n, dtype=torch.float64), lowrank.v)
    expected = lowrank.direct - lowrank.mixed.T @ p
    assert P.rel_err(g, {"lam": expected}) <= 1e-10


def test_floor_above_lambda_min_is_refused(lowrank: P.Problem) -> None:
    # H − 3I has eigenvalue −1 on A's null space: a sketch with k > r sees it.
    with pytest.raises(hg.NegativeCurvatureError, match=r"floor exceeds the smallest curvature"):
        hg_of(lowrank, hg.Nystrom(rank=R + 3, floor=3.0))


def test_floor_auto_without_a_floor_is_the_plain_method() -> None:
    # Eigenvalues spread evenly over [1, 10]: the smallest Ritz value's residual exceeds half of
    # it, so 'auto' finds no floor and returns the plain answer, bit for bit.
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    H = (Q * torch.linspace(1.0, 10.0, 40, dtype=torch.float64)) @ Q.T
    prob = P.spd_quadratic(
        0.5 * (H + H.T),
        torch.randn(40, 3, generator=gen, dtype=torch.float64),
        torch.randn(40, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    )
    for rank in (4, 12):
        g, info = hg_of(prob, hg.Nystrom(rank=rank, floor="auto"))
        g0, _ = hg_of(prob, hg.Nystrom(rank=rank))
        assert info.extra["floor"] == 0.0
        assert torch.equal(g["lam"], g0["lam"])


@pytest.mark.parametrize(
    ("floor", "pattern"),
    [
        (0.0, r"Nystrom\.floor must be a finite number > 0, 'auto' or None, got 0\.0"),
        (-1.0, r"got -1\.0"),
        (float("inf"), r"got inf"),
        ("min", r"got 'min'"),
        (True, r"got True"),
    ],
)
def test_floor_validation(floor: object, pattern: str) -> None:
    with pytest.raises(hg.HypergradientError, match=pattern):
        hg.Nystrom(floor=floor)  # type: ignore[arg-type]
