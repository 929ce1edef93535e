"""The power iteration behind ``alpha="auto"`` against known spectra (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from hypergradients.core import tree
from hypergradients.core.kernels.series import power_iteration

DT = torch.float64


def _diag(d: Tensor):  # type: ignore[no-untyped-def]
    return lambda x: {"w": d * x["w"]}


def test_an_indefinite_pair_of_equal_magnitude_gives_that_magnitude() -> None:
    # diag(5, -5): the Rayleigh quotient of any unit v is 5(v1² − v2²), anywhere in (−5, 5) and the same
    # at every step (the iterates only swap signs), so a quotient-based estimate stays wrong forever.
    # ‖Mv‖ = 5 exactly for every unit v: one product suffices. 1e-12: a few roundings of O(1) numbers.
    d = torch.tensor([5.0, -5.0], dtype=DT)
    for iters in (1, 2, 20):
        assert power_iteration(_diag(d), {"w": torch.zeros(2, dtype=DT)}, iters=iters) == pytest.approx(
            5.0, rel=1e-12
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_estimate_is_a_lower_bound_that_grows_and_converges(seed: int) -> None:
    # Indefinite spectrum with a gap: λ from −3 to +10 (and one −9.5 of nearly the same magnitude).
    g = torch.Generator().manual_seed(seed)
    d = torch.cat([torch.linspace(-3.0, 4.0, 40, dtype=DT), torch.tensor([-9.5, 10.0], dtype=DT)])
    d = d[torch.randperm(d.numel(), generator=g)]
    like = {"w": torch.zeros_like(d)}
    est = [power_iteration(_diag(d), like, iters=k, seed=seed) for k in (1, 2, 4, 8, 200)]
    rayleigh_1 = abs(_rayleigh(d, seed))
    assert est[0] >= rayleigh_1 - 1e-12  # never below the quotient's magnitude
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(est))  # ‖Mv_k‖ never decreases
    assert all(e <= 10.0 + 1e-12 for e in est)  # never above max |λ|
    # After 200 products the −9.5 component has shrunk by (9.5/10)^200 ≈ 3.5e-5 relative to the +10
    # one, so the estimate is within about that of 10.
    assert est[-1] == pytest.approx(10.0, rel=1e-4)


def _rayleigh(d: Tensor, seed: int) -> float:
    """The quotient at the same random start the power iteration draws."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(d.shape, generator=gen, dtype=DT)
    v = v / v.norm()
    return float(tree.dot({"w": v}, {"w": d * v}))
