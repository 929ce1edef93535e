"""Per-unit concrete dropout and per-weight DropConnect: where the masks act (hidden units of MLPs,
CNN channels, LSTM input/hidden/output/embedding units, LSTM recurrent weights), the relaxation,
the hypergradient with the noise fixed against central finite differences, fit and an own loop
with resume bit for bit, the hyperparameter count of the paper's LSTM language model, and the
spread of the hypergradient over noise samples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import hypergradients as hg
from family_checks import fit_resume_is_bit_for_bit, hypergradient_vs_fd, own_loop_resume_is_bit_for_bit
from hypergradients.core import tree
from hypergradients.hparams import Batch, DropConnect, Dropout, Noise, Site, WeightDecay, describe
from hypergradients.hparams.dropout import relaxed_mask
from hypergradients.training.hyper import Objective

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _batch(n: int, d: int, c: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, c, (n,), generator=g), torch.arange(n)
    )


def _ratio(model: nn.Module, fam: Dropout, x: torch.Tensor) -> torch.Tensor:
    """The model's training output with the family's hooks over its plain output: the mask itself
    when the hooked site is the model's output."""
    seen: list[torch.Tensor] = []

    def record(out: torch.Tensor, batch: Batch) -> torch.Tensor:
        seen.append(out.detach())
        return torch.zeros(out.shape[0], dtype=out.dtype)

    obj = Objective(model, [fam], record)
    obj.train(
        tree.detach(dict(model.named_parameters())),
        tree.detach(fam.tensors()),
        Batch(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x))),
        forward=obj.copy_buffers,
        noise=Noise(5),
    )
    with torch.no_grad():
        plain = model(x)
    return seen[0] / plain


def test_relaxed_mask_tends_to_a_bernoulli_draw_of_the_keep_probability() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=g, dtype=DT).clamp(1e-6, 1 - 1e-6)
    q = 0.7
    theta = torch.tensor(math.log(q / (1 - q)), dtype=DT)
    hard = relaxed_mask(theta, u, 1e-4) * q  # z itself
    # τ → 0: z is 0 or 1, with P(z = 1) = q. z ∈ (0.01, 0.99) needs |logit| < 4.6τ: probability
    # ≈ q(1−q)·9.2τ ≈ 2e-4. 200k draws: the std of the mean is sqrt(q(1−q)/n) ≈ 1e-3, 5e-3 is 5σ.
    assert float(((hard > 0.01) & (hard < 0.99)).double().mean()) < 1e-3
    assert abs(float((hard > 0.5).double().mean()) - q) < 5e-3


def test_the_mask_is_the_documented_function_of_the_noise_seed() -> None:
    # docs/families.md: u = clamp(torch.rand(mask shape, generator seeded with the noise's seed, dtype
    # of the masked tensor), ε, 1 − ε), ε = 1e-6, and the unit is scaled by σ((θ + log u − log(1−u))/τ)/σ(θ).
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 1000)).to(DT)
    fam = Dropout(lin, ["0"], init=0.7, temperature=0.4)
    r = _ratio(lin, fam, torch.randn(1000, 3, dtype=DT))  # the hook's mask, noise = Noise(5)
    raw = torch.rand((1000, 1000), generator=torch.Generator().manual_seed(5), dtype=DT)
    assert int((raw < 1e-6).sum()) == 1  # this seed draws one u below ε: the clamp shows
    theta = fam.tensors()["dropout.0.output"].detach()

    def mask(u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((theta + torch.log(u) - torch.log(1 - u)) / 0.4) / torch.sigmoid(theta)

    # r = (x·m)/x: a few roundings in float64, relative
    torch.testing.assert_close(r, mask(raw.clamp(1e-6, 1 - 1e-6)), rtol=1e-13, atol=0)
    assert not torch.allclose(r, mask(raw), rtol=1e-3, atol=0)  # unclamped: that entry differs


def test_mlp_hidden_units_conv_channels_and_lstm_units_get_masks_of_the_right_shape() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    fam = Dropout(mlp, ["0"], init=0.5, temperature=0.5)
    assert fam.count() == 5 and list(fam.tensors()) == ["dropout.0.output"]
    # per example and unit: hook the hidden layer of a 1-layer model to read the mask directly
    lin = nn.Sequential(nn.Linear(3, 5)).to(DT)
    r = _ratio(lin, Dropout(lin, ["0"], init=0.5, temperature=0.5), torch.randn(4, 3, dtype=DT))
    assert r.shape == (4, 5) and len(set(r.reshape(-1).tolist())) == 20
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).to(DT)
    cf = Dropout(conv, ["0"], init=0.5, temperature=0.5)
    assert cf.count() == 3
    r = _ratio(conv, cf, torch.randn(4, 2, 5, 5, dtype=DT))
    # channel dropout: one mask value per (example, channel), the same at every pixel
    torch.testing.assert_close(r, r[:, :, :1, :1].expand_as(r), rtol=1e-12, atol=0)
    assert len(set(r[:, :, 0, 0].reshape(-1).tolist())) == 12
    for batch_first in (True, False):
        lstm = nn.LSTM(3, 4, batch_first=batch_first).to(DT)
        model = _LSTMHead(lstm)
        lf = Dropout(model, ["rnn:output"], init=0.5, temperature=0.5)
        assert lf.count() == 4
        x = torch.randn(2, 6, 3, dtype=DT) if batch_first else torch.randn(6, 2, 3, dtype=DT)
        r = _ratio(model, lf, x)
        t_axis = 1 if batch_first else 0
        # variational: the same mask at every time step, different per example and unit
        torch.testing.assert_close(r, r.narrow(t_axis, 0, 1).expand_as(r), rtol=1e-12, atol=0)
        assert len(set(r.narrow(t_axis, 0, 1).reshape(-1).tolist())) == 8
    with pytest.raises(ValueError, match=r"cannot infer the units of a Tanh"):
        Dropout(mlp, ["1"])
    with pytest.raises(ValueError, match=r"no submodule 'fc'"):
        Dropout(mlp, ["fc"])
    with pytest.raises(
        ValueError, match=r"init \(the initial keep probability\) must be a number in \(0, 1\)"
    ):
        Dropout(mlp, ["0"], init=1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Dropout(mlp, ["0"], temperature=0)
    with pytest.raises(
        ValueError,
        match=r"no parameter 'rnn.weight_hh_l1'; its recurrent weights are "
        r"\['rnn.weight_hh_l0'\]",
    ):
        DropConnect(_LSTMHead(nn.LSTM(3, 4)), ["rnn.weight_hh_l1"])


class _EmbedBeside(nn.Module):
    """An embedding beside an LSTM of a given layout (whose ``batch_first`` the family reads); the
    forward returns the embedding's output, so :func:`_ratio` reads the mask itself."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 3, batch_first=batch_first)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


@pytest.mark.parametrize("batch_first", [True, False])
def test_embedding_and_linear_masks_are_per_example_in_both_sequence_layouts(batch_first: bool) -> None:
    # One mask per example and unit, shared by the time steps (variational): time first (T, B) is
    # nn.LSTM's default layout, and the family follows the model's recurrent layers.
    torch.manual_seed(0)
    model = _EmbedBeside(batch_first).to(DT)
    ids = torch.randint(0, 10, (3, 7) if batch_first else (7, 3))  # B = 3 examples, T = 7 steps
    t_axis = 1 if batch_first else 0
    for fam in (
        Dropout(model, ["embed"], init=0.5, temperature=0.5),
        Dropout(model, ["embed"], init=0.5, temperature=0.5, batch_first=batch_first),
    ):
        r = _ratio(model, fam, ids)
        torch.testing.assert_close(r, r.narrow(t_axis, 0, 1).expand_as(r), rtol=1e-12, atol=0)
        assert len(set(r.narrow(t_axis, 0, 1).reshape(-1).tolist())) == 12  # 3 examples × 4 units
    # a Linear applied per time step (a decoder): the same rule; a 2-D (B, F) keeps one mask per row
    lin = nn.Sequential(nn.Linear(4, 5)).to(DT)
    fam = Dropout(lin, ["0"], init=0.5, temperature=0.5, batch_first=batch_first)
    x = torch.randn((3, 7, 4) if batch_first else (7, 3, 4), dtype=DT)
    r = _ratio(lin, fam, x)
    torch.testing.assert_close(r, r.narrow(t_axis, 0, 1).expand_as(r), rtol=1e-12, atol=0)
    assert len(set(r.narrow(t_axis, 0, 1).reshape(-1).tolist())) == 15
    r2 = _ratio(lin, fam, torch.randn(3, 4, dtype=DT))
    assert len(set(r2.reshape(-1).tolist())) == 15


def test_a_model_whose_recurrent_layers_disagree_on_the_layout_must_say_it() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.a, self.b = nn.LSTM(4, 4, batch_first=True), nn.LSTM(4, 4)

    model = Two()
    with pytest.raises(
        ValueError,
        match=r"disagree on batch_first \(\{'a': True, 'b': False\}\).*pass "
        r"batch_first=True",
    ):
        Dropout(model, ["embed"])
    assert Dropout(model, ["a:output", "b:input"]).count() == 8  # recurrent sites know their own layout
    assert Dropout(model, ["embed"], batch_first=False).sites["dropout.embed.output"].batch_axis == -2
    with pytest.raises(ValueError, match="batch_first must be True, False or None"):
        Dropout(model, ["embed"], batch_first=1)  # type: ignore[arg-type]


class _LSTMHead(nn.Module):
    """An LSTM (possibly frozen) and a linear head on its last time step."""

    def __init__(self, rnn: nn.LSTM, classes: int | None = None) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        if self.head is None:
            return out
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


def test_dropout_hypergradient_matches_finite_differences_on_hidden_and_input_units() -> None:
    # A frozen hidden layer and a trained softmax head (+ a fixed small L2): L_T is strictly convex
    # in the head for every fixed mask, so Newton solves w*(θ) to ‖∇‖ ≤ 1e-12 and the IFT is exact.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    model[0].requires_grad_(False)
    drop = Dropout(model, ["0:input", "0:output"], init=0.7, temperature=0.5)
    wd = WeightDecay(model, init=1e-2, include=lambda n, p: n.startswith("2."))
    bt, bv = _batch(40, 4, 3, 1), _batch(30, 4, 3, 2)
    coords = [
        ("dropout.0.input", (0,)),
        ("dropout.0.input", (3,)),
        ("dropout.0.output", (1,)),
        ("dropout.0.output", (5,)),
    ]
    pairs = hypergradient_vs_fd(model, [drop, wd], bt, bv, coords)
    # Central differences with ε = 1e-4: the truncation error ε²·f'''/6 measured 4e-7 relative at
    # ε = 1e-3, so ~4e-9 here; Newton leaves ‖∇‖ ~ 1e-16 (rounding). Measured: ≤ 5e-9 relative.
    for (key, idx), (g, fd) in zip(coords, pairs, strict=True):
        assert abs(g) > 1e-3, (key, idx, g)  # a non-trivial check
        assert g == pytest.approx(fd, rel=5e-8, abs=0), (key, idx)


def test_dropconnect_on_lstm_recurrent_weights_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = _LSTMHead(nn.LSTM(3, 4, batch_first=True), classes=2).to(DT)
    model.rnn.requires_grad_(False)  # trained: the head (convex); dropped: weight_hh_l0
    dc = DropConnect(model, ["rnn.weight_hh_l0"], init=0.8, temperature=0.5)
    assert dc.count() == 16 * 4
    wd = WeightDecay(model, init=1e-2, include=lambda n, p: n.startswith("head."))
    g = torch.Generator().manual_seed(3)

    def seq(n: int) -> Batch:
        return Batch(
            torch.randn(n, 5, 3, generator=g, dtype=DT),
            torch.randint(0, 2, (n,), generator=g),
            torch.arange(n),
        )

    bt, bv = seq(30), seq(20)
    coords = [
        ("dropconnect.rnn.weight_hh_l0", (0, 0)),
        ("dropconnect.rnn.weight_hh_l0", (7, 2)),
        ("dropconnect.rnn.weight_hh_l0", (13, 3)),
    ]
    pairs = hypergradient_vs_fd(model, [dc, wd], bt, bv, coords)
    # As in the dropout test, plus rounding: L_V ≈ 0.7 carries ~1e-16 absolute error, divided by
    # 2ε = 2e-4 that is ~5e-13 in the difference quotient; these entries are 1.5e-7 to 4.4e-6.
    for (key, idx), (gi, fd) in zip(coords, pairs, strict=True):
        assert abs(gi) > 1e-7, (key, idx, gi)  # ≥ 5e4 × that rounding level
        assert gi == pytest.approx(fd, rel=5e-8, abs=2e-12), (key, idx)


def test_lstm_language_model_count_paper_setting() -> None:
    # The paper's 2-layer, 650-unit LSTM LM (vocab 10,000, embedding 650), built on the meta device
    # (no memory). Layers as two nn.LSTM so that the hidden units between them can be hooked.
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10_000, 650)
            self.lstm1 = nn.LSTM(650, 650)
            self.lstm2 = nn.LSTM(650, 650)
            self.decoder = nn.Linear(650, 10_000)

    with torch.device("meta"):
        lm = LM()
        units = Dropout(lm, ["embed:output", "lstm1:input", "lstm1:output", "lstm2:output"])
        both = DropConnect(lm, ["lstm1.weight_hh_l0", "lstm2.weight_hh_l0"])
        one = DropConnect(lm, ["lstm1.weight_hh_l0"], name="dc1")
    assert units.count() == 4 * 650
    assert both.count() == 2 * (4 * 650) * 650 == 3_380_000
    assert units.count() + both.count() == 3_382_600
    # The published figure 1,691,951 = 4·650·650 + 3·650 + 1: one recurrent matrix per weight, three
    # per-unit groups and one scalar; our per-unit groups plus DropConnect on one layer:
    assert one.count() + 3 * 650 + 1 == 1_691_951
    text = describe([units, both])
    print("\n" + text)
    assert text.splitlines()[-1] == "total: 3,382,600 hyperparameters in 2 families"


def _mlp_problem() -> tuple:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=DT)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    Xv = torch.randn(40, 5, generator=g, dtype=DT)
    yv = (Xv[:, 0] + 0.5 * Xv[:, 1] > 0).long()
    return (X, y), (Xv, yv)


def _make_mlp() -> tuple[nn.Module, list]:
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    return model, [
        Dropout(model, ["0:output", "2:input"], init=0.8, temperature=0.3),
        WeightDecay(model, init=1e-3),
    ]


def test_dropout_through_fit_resumes_bit_for_bit(tmp_path: Path) -> None:
    train, val = _mlp_problem()
    res = fit_resume_is_bit_for_bit(
        _make_mlp,
        train,
        val,
        tmp_path,
        inner_steps=5,
        batch_size=16,
        inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
        method=hg.CG(iters=5),
        on_solver_error="damp",
    )
    assert res.final["dropout.mean"] != pytest.approx(0.8, abs=1e-6)  # the keep probabilities moved


def test_dropconnect_lstm_through_own_loop_resumes_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(4)
    data = [
        Batch(
            torch.randn(8, 4, 3, generator=g, dtype=DT),
            torch.randint(0, 2, (8,), generator=g),
            torch.arange(8),
        )
        for _ in range(18)
    ]

    def make() -> tuple[nn.Module, list]:
        model = _LSTMHead(nn.LSTM(3, 4, batch_first=True), classes=2).to(DT)
        return model, [
            DropConnect(model, ["rnn.weight_hh_l0"], temperature=0.3),
            Dropout(model, ["rnn:input", "rnn:output"], temperature=0.3),
        ]

    own_loop_resume_is_bit_for_bit(
        make,
        lambda i: (data[3 * i % 18], data[(3 * i + 1) % 18], data[(3 * i + 2) % 18]),
        method=hg.CG(iters=5, damping=1e-2),
    )


def test_dropout_own_loop_resumes_bit_for_bit_from_the_hyper_state_alone() -> None:
    # hyper.state_dict() carries the noise generator: an own loop that saves no RNG state resumes
    # with the masks of the uninterrupted run (its data here is indexed, so nothing else is random)
    data = [_batch(16, 5, 2, 100 + i) for i in range(6)]
    own_loop_resume_is_bit_for_bit(
        _make_mlp,
        lambda i: (data[i % 6], data[(i + 1) % 6], data[(i + 2) % 6]),
        method=hg.CG(iters=5, damping=1e-2),
        save_rng=False,
    )


def test_hypergradient_spread_over_noise_samples() -> None:
    """The spread of the dropout hypergradient over 20 noise samples at one trained MLP, for three
    temperatures (the table in docs/families.md comes from this test:
    pytest tests/library/test_family_dropout.py -k spread -s)."""
    train, val = _mlp_problem()
    bt = Batch(train[0], train[1], torch.arange(64))
    bv = Batch(val[0], val[1], torch.arange(40))
    print("\n  τ   ‖std‖/‖mean‖   mean pairwise cosine   cosine to the mean of the other 19: median, min")
    for tau in (0.1, 0.3, 1.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
        fams = [
            Dropout(model, ["0:output", "2:input"], init=0.8, temperature=tau),
            WeightDecay(model, init=1e-3),
        ]
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        # damping 0.1: at weights trained with other noise samples, one sample's Hessian is indefinite
        # (with damping 0.01 CG meets negative curvature, about −1e-3, on these samples)
        hyper = hg.HyperOptimizer(model, fams, method=hg.CG(iters=20, damping=0.1))
        for _ in range(300):  # near a minimum of L_T (each step with its own noise, as training does)
            opt.zero_grad()
            hyper.train_loss(bt).backward()
            opt.step()
        gs = []
        for s in range(20):
            g, _ = hyper.hypergradient(bt, bv, noise=Noise(s))
            gs.append(torch.cat([g[k].reshape(-1) for k in g if k.startswith("dropout")]))
        G = torch.stack(gs)
        mean = G.mean(0)
        rel_std = float(G.std(0).norm() / mean.norm())
        U = G / G.norm(dim=1, keepdim=True)
        C = U @ U.T
        pair = float((C.sum() - C.diagonal().sum()) / (20 * 19))
        loo = torch.stack(
            [torch.nn.functional.cosine_similarity(G[i], (G.sum(0) - G[i]) / 19, dim=0) for i in range(20)]
        )
        print(
            f"  {tau:<4g} {rel_std:>13.2f}   {pair:>20.3f}   {float(loo.median()):>25.3f}, {float(loo.min()):.3f}"
        )
        assert torch.isfinite(G).all() and float(mean.norm()) > 0
        assert rel_std > 0.05  # the noise matters: this is why it must be fixed within one hypergradient


def test_a_small_lstm_language_model_with_every_site_tunes_all_its_keep_probabilities() -> None:
    # The LM layout of the count test, tiny: embedding, input, hidden (between the layers) and
    # output units, and DropConnect on both recurrent matrices, in one hyper step.
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 5)
            self.lstm1 = nn.LSTM(5, 6)
            self.lstm2 = nn.LSTM(6, 6)
            self.decoder = nn.Linear(6, 12)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (T, B) -> (T·B, vocab)
            h, _ = self.lstm1(self.embed(tokens))
            h, _ = self.lstm2(h)
            return self.decoder(h).reshape(-1, 12)

    torch.manual_seed(0)
    lm = LM().to(DT)
    fams = [
        Dropout(lm, ["embed:output", "lstm1:input", "lstm1:output", "lstm2:output"], temperature=0.3),
        DropConnect(lm, ["lstm1.weight_hh_l0", "lstm2.weight_hh_l0"], temperature=0.3),
    ]
    assert [f.count() for f in fams] == [5 + 5 + 6 + 6, 2 * 24 * 6]

    def next_token_loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(out, batch.y.reshape(-1), reduction="none")

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 12, (7, 4), generator=g)
    bt = Batch(tokens[:-1], tokens[1:], torch.arange(4))
    hyper = hg.HyperOptimizer(lm, fams, method=hg.CG(iters=5, damping=1.0), loss_fn=next_token_loss)
    res = hyper.step(bt, bt)
    assert res.applied and res.hypergradient is not None
    for k, v in res.hypergradient.items():  # every site is reached: every key gets a gradient
        assert torch.isfinite(v).all() and float(v.abs().max()) > 0, k
    with pytest.raises(ValueError, match=r"an nn.Embedding's input is token ids; drop its 'output' units"):
        Dropout(lm, ["embed:input"])
    explicit = Dropout(lm, [Site("decoder", "output", 12)])  # a Site given by hand
    assert explicit.count() == 12
