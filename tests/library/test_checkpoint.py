"""``Unrolled(checkpoint=...)``: the same reverse-mode hypergradient with O(√K) stored states.

Checkpointed and plain reverse mode evaluate the same products in a different grouping (each
segment's vector-Jacobian product is pulled back separately), so in float64 they agree to
rounding: ~K·eps·(a few) ≈ 1e-14 relative for K ≤ 64 on these well-conditioned problems; the
tests allow 1e-12.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.paths.unroll import checkpoint_interval

TOL = 1e-12


def perturbed_start(prob: P.Problem, scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """w* plus noise: away from the optimum the path (and every H_k) differs step to step."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in prob.params.items()}


@pytest.mark.parametrize("checkpoint", [True, 1, 5, 100])
@pytest.mark.parametrize("K", [1, 12])
@pytest.mark.parametrize("name", ["ridge", "logistic", "mlp"])
def test_checkpointed_equals_plain_reverse(
    name: str, K: int, checkpoint: bool | int, request: pytest.FixtureRequest
) -> None:
    prob: P.Problem = request.getfixturevalue(name)
    w0 = perturbed_start(prob)
    alpha = 0.5 / P.lambda_max(prob)
    plain, ip = hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        w0,
        prob.hparams,
        method=hg.Unrolled(steps=K, lr=alpha),
        return_info=True,
    )
    ck, ic = hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        w0,
        prob.hparams,
        method=hg.Unrolled(steps=K, lr=alpha, checkpoint=checkpoint),
        return_info=True,
    )
    assert tree.norm(plain) > 0
    assert P.rel_err(ck, plain) <= TOL
    assert ic.outer_loss == pytest.approx(ip.outer_loss, rel=1e-14)
    assert P.rel_err(ic.final_params, ip.final_params) <= 1e-14
    assert ic.extra["checkpoint"] == checkpoint_interval(K, checkpoint)


@pytest.mark.parametrize("T", [1, 12])
def test_checkpointed_truncated_and_learning_rate(logistic: P.Problem, T: int) -> None:
    # Truncation, a learning-rate hyperparameter and segments that do not divide T evenly.
    w0 = perturbed_start(logistic)
    hp = {**logistic.hparams, "lr": torch.tensor(0.4, dtype=torch.float64)}
    plain = hg.hypergradient(
        logistic.outer_loss, logistic.inner_loss, w0, hp, method=hg.Unrolled(steps=15, lr="lr", truncate=T)
    )
    for ck in (True, 2, 5):
        got = hg.hypergradient(
            logistic.outer_loss,
            logistic.inner_loss,
            w0,
            hp,
            method=hg.Unrolled(steps=15, lr="lr", truncate=T, checkpoint=ck),
        )
        assert P.rel_err(got, plain) <= TOL
        assert float(got["lr"]) != 0.0


def test_checkpointed_from_optimum_is_neumann(ridge: P.Problem) -> None:
    # The Neumann–SGD theorem holds for the checkpointed path too (see test_unroll.py for the tolerance).
    alpha = 1.0 / P.lambda_max(ridge)
    g = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        ridge.params,
        ridge.hparams,
        method=hg.Unrolled(steps=40, lr=alpha, checkpoint=True),
    )
    assert P.rel_err(g, P.neumann_reference(ridge, 40, alpha)) <= 1e-10


class _SavedCounter:
    """Counts tensors autograd saves for backward that are alive at once (peak), via saved-tensor hooks.

    Every step's graph saves a fixed number of tensors, so the peak count is proportional to the
    number of steps whose graph is alive: K for plain reverse mode, one segment for checkpointing.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def _dec(self) -> None:
        self.live -= 1

    def pack(self, t: torch.Tensor) -> object:
        box = _Box(t)
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(box, self._dec)
        return box

    @staticmethod
    def unpack(box: object) -> torch.Tensor:
        assert isinstance(box, _Box)
        return box.t


class _Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _peak_saved(prob: P.Problem, method: hg.Unrolled) -> int:
    c = _SavedCounter()
    with torch.autograd.graph.saved_tensors_hooks(c.pack, c.unpack):
        hg.hypergradient(prob.outer_loss, prob.inner_loss, perturbed_start(prob), prob.hparams, method=method)
    return c.peak


def test_checkpointing_keeps_sqrt_k_graphs_alive(logistic: P.Problem) -> None:
    alpha = 0.5 / P.lambda_max(logistic)
    plain = {K: _peak_saved(logistic, hg.Unrolled(steps=K, lr=alpha)) for K in (16, 64)}
    ck = {K: _peak_saved(logistic, hg.Unrolled(steps=K, lr=alpha, checkpoint=True)) for K in (16, 64)}
    # Plain: linear in K (4× the steps, ≈4× the saved tensors). Checkpointed: one segment of
    # ⌈√K⌉ steps (4 → 8), so ≈2×, and at K=64 far below plain (8 vs 64 steps' graphs).
    assert plain[64] / plain[16] == pytest.approx(4.0, rel=0.1)
    assert ck[64] / ck[16] == pytest.approx(2.0, rel=0.15)
    assert ck[64] * 5 < plain[64]


def test_checkpoint_validation() -> None:
    with pytest.raises(
        hg.HypergradientError, match=r"Unrolled\.checkpoint must be a positive integer, got 0"
    ):
        hg.Unrolled(steps=5, checkpoint=0)
    with pytest.raises(hg.HypergradientError, match=r"Unrolled\.checkpoint must be a positive integer"):
        hg.Unrolled(steps=5, checkpoint=2.5)  # type: ignore[arg-type]
    assert hg.Unrolled(steps=5, checkpoint=False).checkpoint is False
    assert checkpoint_interval(100, True) == 10 and checkpoint_interval(101, True) == 11
    assert checkpoint_interval(1, True) == 1 and checkpoint_interval(9, None) is None
