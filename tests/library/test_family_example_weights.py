"""Per-example loss weights and the loss-reweighting network: the reduction and its normalisations,
hypergradients against central finite differences (Newton-solved inner problems, float64), fit and
an own loop with resume bit for bit, and data cleaning on digits with 20% of the labels flipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import hypergradients as hg
from family_checks import fit_resume_is_bit_for_bit, hypergradient_vs_fd, own_loop_resume_is_bit_for_bit
from hypergradients.hparams import Batch, ExampleWeights, LossReweighting, WeightDecay
from hypergradients.hparams.objective import Objective, cross_entropy

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _data(n: int, seed: int, d: int = 4, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    W = torch.randn(d, c, generator=g, dtype=DT)
    y = torch.distributions.Categorical(logits=2 * X @ W).sample()
    return X, y


def test_reduce_weights_the_batch_by_index_with_each_normalisation_and_parametrisation() -> None:
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    b = Batch(torch.zeros(3, 1), torch.zeros(3), torch.tensor([4, 0, 2]))
    theta = torch.tensor([0.0, 0.1, 0.2, 0.3, -1.0], dtype=DT)
    for kind, f in (("sigmoid", lambda t: 2 * torch.sigmoid(t)), ("softplus", nn.functional.softplus)):
        om = f(theta[[4, 0, 2]])
        mean = ExampleWeights(5, parametrisation=kind, dtype=DT)  # type: ignore[arg-type]
        norm = ExampleWeights(5, parametrisation=kind, normalise="weights", dtype=DT)  # type: ignore[arg-type]
        torch.testing.assert_close(
            mean.reduce(losses, b, {"example_weights": theta}), (om * losses).sum() / 3
        )
        torch.testing.assert_close(
            norm.reduce(losses, b, {"example_weights": theta}), (om * losses).sum() / om.sum()
        )
        # init is the natural weight: 1 by default under both parametrisations
        torch.testing.assert_close(mean.natural()["example_weights"], torch.ones(5, dtype=DT))
    assert float(ExampleWeights(2, init=0.25).natural()["example_weights"][0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"batch index 7 is out of range for 5 examples"):
        ExampleWeights(5).reduce(
            losses.float(), Batch(b.x, b.y, torch.tensor([7, 0, 1])), {"example_weights": torch.zeros(5)}
        )
    with pytest.raises(
        ValueError, match=r"init \(the initial example weight\) must be in \(0, 2\) for the sigmoid"
    ):
        ExampleWeights(5, init=2.0)
    with pytest.raises(ValueError, match="normalise must be 'mean'"):
        ExampleWeights(5, normalise="sum")  # type: ignore[arg-type]
    net = LossReweighting(4, dtype=DT)
    assert net.count() == 3 * 4 + 1 and net.summary()["loss_reweighting.w(1)"] == 1.0  # starts plain
    # the network's weight of each loss, by hand
    hp = {
        k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
        for k, t in net.tensors().items()
    }
    a1, b1, a2, b2 = (hp[f"loss_reweighting.{k}"] for k in ("a1", "b1", "a2", "b2"))
    om = torch.stack([2 * torch.sigmoid(torch.relu(v * a1 + b1) @ a2 + b2) for v in losses])
    torch.testing.assert_close(net.reduce(losses, b, hp), (om * losses).mean())


def test_two_reducing_families_are_refused() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(
        ValueError, match=r"the families \['example_weights', 'loss_reweighting'\] all weight"
    ):
        Objective(model, [ExampleWeights(10), LossReweighting()], cross_entropy)


@pytest.mark.parametrize(
    ("normalise", "kind"), [("mean", "sigmoid"), ("weights", "sigmoid"), ("mean", "softplus")]
)
def test_example_weights_hypergradient_matches_finite_differences(normalise: str, kind: str) -> None:
    # Softmax regression + a fixed small L2: strictly convex for every positive weighting, Newton
    # solves w*(θ) to rounding level, so the implicit hypergradient is exact up to the FD error.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    n = 30
    ew = ExampleWeights(n, normalise=normalise, parametrisation=kind, dtype=DT)  # type: ignore[arg-type]
    with torch.no_grad():  # not all weights equal (the "weights" normalisation is scale-invariant)
        ew.tensors()["example_weights"].copy_(torch.linspace(-1, 1, n, dtype=DT))
    wd = WeightDecay(model, init=1e-2, include=lambda n, p: True)  # biases too: softmax has a flat direction
    X, y = _data(n, 1)
    Xv, yv = _data(25, 2)
    bt, bv = Batch(X, y, torch.arange(n)), Batch(Xv, yv, torch.arange(25))
    coords = [("example_weights", (i,)) for i in (0, 7, 19, 29)]
    pairs = hypergradient_vs_fd(model, [ew, wd], bt, bv, coords)
    # ε = 1e-4: the truncation ε²f'''/6 and the rounding of L_V (~1e-16/2ε ≈ 5e-13 absolute) are far
    # below the entries (> 1e-6); measured: ≤ 1e-9 relative for most, 9e-8 and 7e-7 (2e-12 absolute:
    # the rounding floor) for the two smallest entries.
    for (key, idx), (g, fd) in zip(coords, pairs, strict=True):
        assert abs(g) > 1e-6, (key, idx, g)
        assert g == pytest.approx(fd, rel=1e-6, abs=5e-12), (key, idx)


def test_loss_reweighting_hypergradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    net = LossReweighting(3, init_scale=0.5, dtype=DT)
    with torch.no_grad():
        # away from the plain start, so every weight of the net matters; every hidden unit active
        # (a1·ℓ + b1 > 0 for every loss here, all below 7), so no kink of relu lies within ±ε
        t = net.tensors()
        t["loss_reweighting.a1"].copy_(torch.tensor([0.5, -0.2, 0.3], dtype=DT))
        t["loss_reweighting.b1"].copy_(torch.tensor([0.2, 1.5, 0.1], dtype=DT))
        t["loss_reweighting.a2"].copy_(torch.tensor([0.5, -0.3, 0.2], dtype=DT))
    wd = WeightDecay(model, init=1e-1, include=lambda n, p: True)
    X, y = _data(30, 3)
    Xv, yv = _data(25, 4)
    coords = [
        ("loss_reweighting.a1", (0,)),
        ("loss_reweighting.b1", (1,)),
        ("loss_reweighting.a2", (2,)),
        ("loss_reweighting.b2", ()),
    ]
    pairs = hypergradient_vs_fd(
        model, [net, wd], Batch(X, y, torch.arange(30)), Batch(Xv, yv, torch.arange(25)), coords
    )
    for (key, idx), (g, fd) in zip(coords, pairs, strict=True):  # as above; measured ≤ 6e-10 relative
        assert abs(g) > 1e-5, (key, idx, g)
        assert g == pytest.approx(fd, rel=1e-6, abs=1e-12), (key, idx)


def test_example_weights_through_fit_resume_bit_for_bit(tmp_path: Path) -> None:
    train, val = _data(48, 5), _data(30, 6)

    def make() -> tuple[nn.Module, list]:
        model = nn.Linear(4, 3).to(DT)
        return model, [ExampleWeights(48, dtype=DT), WeightDecay(model, init=1e-3)]

    res = fit_resume_is_bit_for_bit(
        make,
        train,
        val,
        tmp_path,
        inner_steps=5,
        batch_size=16,
        hyper_batch_size=24,
        inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.3),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        method=hg.CG(iters=10, damping=1e-3),
    )
    assert res.final["example_weights.min"] < 1 < res.final["example_weights.max"]


def test_loss_reweighting_through_own_loop_resume_bit_for_bit() -> None:
    data = [Batch(*_data(16, 10 + i), torch.arange(16)) for i in range(6)]

    def make() -> tuple[nn.Module, list]:
        model = nn.Linear(4, 3).to(DT)
        return model, [LossReweighting(4, dtype=DT), WeightDecay(model, init=1e-3)]

    own_loop_resume_is_bit_for_bit(
        make,
        lambda i: (data[i % 6], data[(i + 1) % 6], data[(i + 2) % 6]),
        method=hg.CG(iters=10, damping=1e-3),
        lr=0.3,
    )
