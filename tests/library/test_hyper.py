"""The hyper step for any training loop (hg.HyperOptimizer): closed-form hypergradients on ridge
regression with a non-classification loss, the update it applies, projection and hooks, typed
errors, the solver policy, and a state_dict that restores the next step bit for bit."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import hypergradients as hg
from hypergradients.hparams import Batch, Family
from hypergradients.training.fit import evaluate
from hypergradients.training.hyper import NonFiniteError, as_batch

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _data(
    seed: int = 0, n: int = 20, nv: int = 15, d: int = 6
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=DT)
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(nv, d, generator=g, dtype=DT)
    return (X, X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT)), (
        Xv,
        Xv @ w + 0.5 * torch.randn(nv, generator=g, dtype=DT),
    )


def squared_error(out: Tensor, batch: Batch) -> Tensor:
    """A regression loss through the hyper step's contract: per-example (B,)."""
    return (out.squeeze(-1) - batch.y) ** 2


def _ridge(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], lam: float) -> tuple[Tensor, float]:
    """w*(λ) of mean((Xw − y)²) + ½ e^λ ‖w‖² and the exact dL_V/dλ, L_V = mean((X_v w − y_v)²).

    H = 2/n XᵀX + e^λ I, w* = H⁻¹ (2/n) Xᵀy, dw*/dλ = −H⁻¹ e^λ w*, dL_V/dλ = ∇L_V(w*)ᵀ dw*/dλ.
    """
    (X, y), (Xv, yv) = train, val
    n, d = X.shape
    H = 2 / n * X.T @ X + math.exp(lam) * torch.eye(d, dtype=DT)
    w = torch.linalg.solve(H, 2 / n * X.T @ y)
    grad_v = 2 / len(yv) * Xv.T @ (Xv @ w - yv)
    return w, float(grad_v @ torch.linalg.solve(H, -math.exp(lam) * w))


def _model_at(w: Tensor) -> nn.Linear:
    model = nn.Linear(len(w), 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model


def test_step_gives_the_closed_form_hypergradient_and_applies_it() -> None:
    train, val = _data()
    lam0 = math.log(0.3)
    w_star, g_exact = _ridge(train, val, lam0)
    model = _model_at(w_star)
    fam = hg.WeightDecay(model, init=0.3)
    hyper = hg.HyperOptimizer(
        model,
        [fam],
        method=hg.Exact(),
        loss_fn=squared_error,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
    )
    w_before = model.weight.detach().clone()
    res = hyper.step(train, val)
    assert res.applied and res.hypergradient is not None and res.info is not None
    # float64 dense solves on a 6×6 SPD system with cond(H) ~ 10: agreement to ~1e-15 relative;
    # 1e-10 leaves room for BLAS differences and still catches any missing term (O(1e-1)).
    assert float(res.hypergradient["weight_decay"]) == pytest.approx(g_exact, rel=1e-10, abs=1e-12)
    assert float(fam.tensors()["weight_decay"].detach()) == pytest.approx(lam0 - 0.5 * g_exact, rel=1e-12)
    assert torch.equal(model.weight, w_before)  # the step never touches the weights
    assert res.metrics()["hyper_val_loss"] == pytest.approx(float(((val[0] @ w_star - val[1]) ** 2).mean()))
    assert hyper.steps == 1 and hyper.skipped == 0


def test_finite_differences_agree_with_the_step_at_the_trained_weights() -> None:
    """Central differences of L_V(w*(λ)) in λ (ε = 1e-5: truncation O(ε²) ~ 1e-10, rounding
    ~1e-16/ε ~ 1e-11, so 1e-7 relative is a safe bound), against CG at tight tolerance."""
    train, val = _data(1)
    lam0, eps = math.log(0.1), 1e-5

    def lv(lam: float) -> float:
        w, _ = _ridge(train, val, lam)
        return float(((val[0] @ w - val[1]) ** 2).mean())

    fd = (lv(lam0 + eps) - lv(lam0 - eps)) / (2 * eps)
    model = _model_at(_ridge(train, val, lam0)[0])
    hyper = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=0.1)], method=hg.CG(iters=50, tol=1e-14), loss_fn=squared_error
    )
    g, _ = hyper.hypergradient(train, val)
    assert float(g["weight_decay"]) == pytest.approx(fd, rel=1e-7)


def test_own_loop_with_any_model_optimizer_tunes_and_leaves_that_optimizer_alone() -> None:
    train, val = _data(2, n=12, d=10)
    for make in (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.05),
    ):
        torch.manual_seed(0)
        model = nn.Linear(10, 1, bias=False).to(DT)
        fam = hg.WeightDecay(model, init=1e-3)
        opt = make(list(model.parameters()))
        hyper = hg.HyperOptimizer(
            model,
            [fam],
            method=hg.CG(iters=20),
            loss_fn=squared_error,
            optimizer=lambda ps: torch.optim.Adam(ps, lr=0.2),
        )
        for i in range(200):
            opt.zero_grad()
            hyper.train_loss(train).backward()
            opt.step()
            if i % 20 == 19:
                before = {
                    k: v.clone() if isinstance(v, Tensor) else v
                    for k, v in opt.state_dict()["state"][0].items()
                }
                hyper.step(train, val)
                after = opt.state_dict()["state"][0]
                assert all(
                    torch.equal(before[k], after[k]) if isinstance(v, Tensor) else before[k] == after[k]
                    for k, v in after.items()
                )
        # 12 noisy examples, 10 features: the validation loss asks for a larger decay. Observed from
        # 1e-3 after 10 hyper steps: 6.7e-3 (SGD with momentum), 3.0e-3 (Adam); deterministic in float64.
        assert float(hyper.natural()["weight_decay"]) > 2e-3
        assert hyper.steps == 10


def test_train_loss_is_the_data_loss_plus_the_penalty_with_lambda_fixed() -> None:
    train, _ = _data()
    model = nn.Linear(6, 1, bias=False).to(DT)
    fam = hg.WeightDecay(model, init=0.2)
    hyper = hg.HyperOptimizer(model, [fam], loss_fn=squared_error)
    loss = hyper.train_loss(train)
    w = model.weight[0]
    expected = ((train[0] @ w - train[1]) ** 2).mean() + 0.5 * 0.2 * (w**2).sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-13)
    assert float(hyper.penalty().detach()) == pytest.approx(
        float(0.5 * 0.2 * (w.detach() ** 2).sum()), rel=1e-13
    )
    loss.backward()
    assert fam.tensors()["weight_decay"].grad is None  # λ is fixed in the inner loss


def test_project_clamps_or_replaces_and_hooks_run_around_the_step() -> None:
    train, val = _data()
    model = _model_at(_ridge(train, val, math.log(0.3))[0])
    fam = hg.WeightDecay(model, init=0.3)
    calls: list[str] = []
    w_star = _ridge(train, val, math.log(0.05))[0]

    def reinit(h: hg.HyperOptimizer) -> None:  # before: the weights the hypergradient sees
        calls.append("before")
        with torch.no_grad():
            h.model.weight.copy_(w_star[None])

    def after(h: hg.HyperOptimizer, res: hg.HyperStep) -> None:
        calls.append(f"after {res.applied}")

    bound = math.log(0.3) - 1e-3
    hyper = hg.HyperOptimizer(
        model,
        [fam],
        method=hg.Exact(),
        loss_fn=squared_error,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=100.0),
        project=lambda hp: {"weight_decay": hp["weight_decay"].clamp(max=bound)},
        before_step=[reinit],
        after_step=[after],
    )
    # Set the decay to that of w_star so the before hook puts the weights at w*(λ): closed form applies.
    fam.load_tensors({"weight_decay": torch.tensor(math.log(0.05), dtype=DT)})
    res = hyper.step(train, val)
    assert calls == ["before", "after True"]
    assert float(res.hypergradient["weight_decay"]) == pytest.approx(
        _ridge(train, val, math.log(0.05))[1], rel=1e-10
    )
    lam = float(fam.tensors()["weight_decay"].detach())
    assert lam <= bound  # lr 100 moves it by |100 g| > 1: the clamp holds it

    # In place works too.
    def in_place(hp: dict[str, Tensor]) -> None:
        hp["weight_decay"].clamp_(min=-1.0, max=-1.0)

    hyper.project = in_place
    hyper.step(train, val)
    assert float(fam.tensors()["weight_decay"].detach()) == -1.0
    hyper.project = lambda hp: hp["weight_decay"].clamp_(max=0.0)  # returns a tensor: refused
    with pytest.raises(
        TypeError, match=r"project must return None .* or a dict of new values by key, got Tensor"
    ):
        hyper.step(train, val)
    hyper.project = lambda hp: {"nope": hp["weight_decay"]}
    with pytest.raises(KeyError, match="'nope', which is no hyperparameter"):
        hyper.step(train, val)


def test_nonfinite_losses_and_hyperparameters_raise_typed_errors() -> None:
    train, (xv, yv) = _data()
    model = _model_at(_ridge(train, (xv, yv), 0.0)[0])
    hyper = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=1.0)], method=hg.CG(iters=5), loss_fn=squared_error
    )
    bad_val = (xv.clone(), yv)
    bad_val[0][2, 1] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"hyper step 1: on the hyper step's batch, the loss 'val_loss'"
    ) as ei:
        hyper.step(train, bad_val)
    assert (ei.value.name, ei.value.round) == ("val_loss", 1)
    bad_train = (train[0], train[1].clone())
    bad_train[1][0] = float("inf")
    with pytest.raises(NonFiniteError) as ei:
        hyper.step(bad_train, (xv, yv))
    assert ei.value.name == "inner_loss" and ei.value.what == "on the hyper step's batch, the loss"
    exploding = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, init=1.0)],
        method=hg.CG(iters=5),
        loss_fn=squared_error,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=float("inf")),
    )
    with pytest.raises(NonFiniteError, match="the hyperparameter 'weight_decay' is not finite") as ei:
        exploding.step(train, (xv, yv))
    assert ei.value.name == "weight_decay"


def test_solver_failure_is_damped_skipped_or_raised() -> None:
    train, val = _data()
    model = _model_at(_ridge(train, val, 0.0)[0])

    def make(policy: str) -> hg.HyperOptimizer:
        # α = 10 ≫ 2/λ_max(H) (λ_max ~ 5 here): the Neumann series diverges.
        return hg.HyperOptimizer(
            model,
            [hg.WeightDecay(model, init=1.0)],
            loss_fn=squared_error,
            method=hg.Neumann(iters=30, alpha=10.0),
            on_solver_error=policy,
        )  # type: ignore[arg-type]

    skip = make("skip")
    res = skip.step(train, val)
    assert not res.applied and res.skip_reason == "Neumann series diverged"
    assert isinstance(res.error, hg.NeumannDivergenceError)
    assert (
        float(skip.hparams["weight_decay"].detach()) == 0.0
        and skip.skipped == 1
        and res.metrics() == {"skip_reason": "Neumann series diverged"}
    )
    damp = make("damp")
    res = damp.step(train, val)
    assert res.applied and res.retry["solver_retry"] == "alpha" and res.retry["solver_alpha"] < 2 / 5
    assert damp.retried == 1 and "solver_alpha" in res.metrics()
    with pytest.raises(hg.NeumannDivergenceError):
        make("raise").step(train, val)
    with pytest.raises(ValueError, match="on_solver_error must be 'damp', 'skip' or 'raise', got 'x'"):
        make("x")


def test_state_dict_round_trips_with_weights_only_and_restores_the_next_step() -> None:
    train, val = _data(3)
    torch.manual_seed(0)

    def build() -> tuple[nn.Module, hg.HyperOptimizer]:
        model = _model_at(_ridge(train, val, math.log(0.2))[0])
        return model, hg.HyperOptimizer(
            model,
            [hg.WeightDecay(model, init=0.2)],
            method=hg.CG(iters=3),
            loss_fn=squared_error,
            optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        )

    _, a = build()
    a.step(train, val)
    a.step(train, val)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _, b = build()
    b.load_state_dict(saved)
    assert b.steps == 2 and b.optimizer.state_dict()["state"][0]["step"] == 2
    ra, rb = a.step(train, val), b.step(train, val)
    # CG with 3 iterations from the saved p: the warm start changes the answer, so equality
    # (bit for bit) shows that the solver state came back too.
    assert rb.info is not None and rb.info.extra.get("warm_start") == 1.0
    assert torch.equal(a.hparams["weight_decay"], b.hparams["weight_decay"])
    assert torch.equal(ra.hypergradient["weight_decay"], rb.hypergradient["weight_decay"])
    _, fresh = build()
    rc = fresh.step(train, val)
    assert rc.info is not None and "warm_start" not in rc.info.extra
    with pytest.raises(ValueError, match="not a HyperOptimizer state"):
        b.load_state_dict({"version": 99})


class _ExampleWeights(Family):
    """A family with a reduce hook (per-example weights), to check the scalar-loss rule."""

    name = "ex"

    def __init__(self, n: int) -> None:
        self.t = torch.zeros(n, dtype=DT, requires_grad=True)

    def tensors(self) -> dict[str, Tensor]:
        return {"ex": self.t}

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {"ex": self.t.detach().sigmoid()}

    def reduce(self, losses: Tensor, batch: Batch, hparams: Mapping[str, Tensor]) -> Tensor:
        return (hparams["ex"][batch.index].sigmoid() * losses).mean()


def test_scalar_losses_work_unless_a_family_weights_examples() -> None:
    train, val = _data()
    model = _model_at(_ridge(train, val, 0.0)[0])
    per_ex = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=1.0)], method=hg.Exact(), loss_fn=squared_error
    )
    scalar = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, init=1.0)],
        method=hg.Exact(),
        loss_fn=lambda out, b: squared_error(out, b).mean(),
    )
    g1, _ = per_ex.hypergradient(train, val)
    g2, _ = scalar.hypergradient(train, val)
    assert float(g1["weight_decay"]) == pytest.approx(float(g2["weight_decay"]), rel=1e-12)
    weighted = hg.HyperOptimizer(
        model,
        [_ExampleWeights(len(train[1]))],
        method=hg.Exact(),
        loss_fn=lambda out, b: squared_error(out, b).sum(),
    )
    with pytest.raises(ValueError, match=r"loss_fn returned a scalar, but the families \['ex'\] weight"):
        weighted.hypergradient(train, val)


def test_bad_arguments_are_refused_with_the_fix() -> None:
    model = nn.Linear(3, 1).to(DT)
    fam = hg.WeightDecay(model)
    with pytest.raises(ValueError, match="at least one hyperparameter"):
        hg.HyperOptimizer(model, [])
    with pytest.raises(ValueError, match="built over exactly the families' tensors"):
        hg.HyperOptimizer(model, [fam], optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    ok = hg.HyperOptimizer(model, [fam], optimizer=torch.optim.SGD(list(fam.tensors().values()), lr=1.0))
    assert ok.optimizer.param_groups[0]["lr"] == 1.0
    with pytest.raises(
        TypeError, match=r"a batch must be \(x, y\), \(x, y, index\) .* got tuple of length 1"
    ):
        as_batch((torch.zeros(2),))
    b = as_batch((torch.zeros(4, 3), torch.zeros(4)))
    assert torch.equal(b.index, torch.arange(4))


def test_nonfinite_hypergradient_with_finite_losses_names_its_key() -> None:
    """Decay 1e10 and Identity(scale=1e308): p = 1e308·v, and d·wᵀp overflows float64, while both
    losses stay finite. The key comes with the library's typed error, from the one computation (the
    losses are evaluated once each, not again to look for the key), and the hyperparameter is left
    alone."""
    train, val = _data()
    model = nn.Linear(6, 1, bias=False).to(DT)
    calls = [0]

    def counted(out: Tensor, batch: Batch) -> Tensor:
        calls[0] += 1
        return squared_error(out, batch)

    hyper = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=1e10)], method=hg.Identity(scale=1e308), loss_fn=counted
    )
    before = hyper.hparams["weight_decay"].detach().clone()
    with pytest.raises(
        NonFiniteError, match=r"hyper step 1: the hypergradient of 'weight_decay' is not finite"
    ) as ei:
        hyper.step(train, val)
    assert (ei.value.name, ei.value.what) == ("weight_decay", "the hypergradient of")
    assert isinstance(ei.value.__cause__, hg.NonFiniteHypergradientError)
    assert ei.value.__cause__.key == "weight_decay" and ei.value.__cause__.method == "Identity"
    assert calls[0] == 2  # L_V once, L_T once: one hypergradient
    assert torch.equal(hyper.hparams["weight_decay"].detach(), before)


def test_each_method_offers_its_own_safer_variant() -> None:
    # CG: damping beyond the curvature found, 2(δ + |c|); Neumann: half the α, never above the safe
    # 1/λ_max, and none once α is far below it; methods with no safer variant: None.
    curv = hg.NegativeCurvatureError("", curvature=-0.3, iteration=2)
    div = hg.NeumannDivergenceError("", lambda_max=5.0, safe_alpha=0.2)
    assert hg.CG(iters=7, damping=0.1).safer(curv) == hg.CG(iters=7, damping=2 * (0.1 + 0.3))
    assert hg.CG().safer(div) is None and hg.Exact().safer(curv) is None and hg.GMRES().safer(div) is None
    assert hg.Neumann(iters=9, alpha=10.0).safer(div) == hg.Neumann(iters=9, alpha=0.2)
    assert hg.Neumann(iters=9, alpha=0.3).safer(div) == hg.Neumann(iters=9, alpha=0.15)
    assert hg.Neumann(iters=9).safer(div) == hg.Neumann(iters=9, alpha=0.1)
    assert hg.Neumann(alpha=0.2 / 300).safer(div) is None and hg.Neumann().safer(curv) is None
    assert hg.Unrolled(steps=2).safer(curv) is None


@dataclass(frozen=True)
class _Fragile(hg.ImplicitMethod):
    """A method of one's own that fails above a scale and offers a smaller one."""

    scale: float = 1.0

    def solve(
        self, op: hg.LinearOperator, v: dict, state: hg.SolverState | None, *, residual: bool = False
    ) -> tuple[dict, hg.SolverState, hg.Stats]:
        if self.scale > 0.5:
            raise hg.NegativeCurvatureError("too large a scale", curvature=-1.0, iteration=1)
        return {k: self.scale * t for k, t in v.items()}, self.own_state(state), hg.Stats(0, None, None)

    def safer(self, error: hg.HypergradientError) -> _Fragile | None:
        return _Fragile(scale=self.scale / 4) if isinstance(error, hg.NegativeCurvatureError) else None


def test_the_hyper_step_retries_with_any_methods_own_safer_variant() -> None:
    train, val = _data()
    model = _model_at(_ridge(train, val, 0.0)[0])
    ref, _ = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=1.0)], loss_fn=squared_error, method=hg.Identity(scale=0.5)
    ).hypergradient(train, val)
    hyper = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=1.0)], loss_fn=squared_error, method=_Fragile(scale=2.0)
    )
    res = hyper.step(train, val)
    # Scale 2 fails; its safer variant, scale 0.5, is p = 0.5·v (Identity's); the retry names what changed.
    assert res.applied and res.retry == {"solver_retry": "scale", "solver_scale": 0.5} and hyper.retried == 1
    assert res.hypergradient is not None and torch.equal(
        res.hypergradient["weight_decay"], ref["weight_decay"]
    )


def test_every_submodule_keeps_its_own_mode_after_train_loss_step_and_hypergradient() -> None:
    # Fine-tuning often keeps a batch norm in eval mode inside a model that trains: the temporary
    # switches of L_T (training mode) and L_V (evaluation mode) must give every submodule its own
    # flag back, not the root's.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[1].eval()
    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model)], method=hg.CG(iters=2))
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g))
    flags = [m.training for m in model.modules()]
    assert flags == [True, True, False, True, True]
    hyper.train_loss(b)
    assert [m.training for m in model.modules()] == flags
    hyper.step(b, b)
    assert [m.training for m in model.modules()] == flags
    hyper.hypergradient(b, b, method=hg.CG(iters=2, damping=1.0))
    assert [m.training for m in model.modules()] == flags
    evaluate(model, {"val": b})
    assert [m.training for m in model.modules()] == flags


def test_frozen_layers_are_constants_and_weight_decay_leaves_them_out() -> None:
    # Fine-tuning: a frozen layer is no weight of the bilevel problem. WeightDecay(model) covers only
    # the trainable parameters; the hyper step works and its hypergradient is the one with the frozen
    # layer folded into the data (a model without it, fed that layer's outputs).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[0].requires_grad_(False)
    fam = hg.WeightDecay(model, granularity="layer", init=0.1)
    g = torch.Generator().manual_seed(1)
    bt = (torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 2, (10,), generator=g))
    bv = (torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 2, (10,), generator=g))
    hyper = hg.HyperOptimizer(
        model, [fam], method=hg.Exact(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0)
    )
    res = hyper.step(bt, bv)
    assert res.applied and res.hypergradient is not None and fam.covered == ["2.weight"]
    head = nn.Sequential(nn.Linear(4, 2)).to(DT)
    head.load_state_dict({f"0.{k}": v for k, v in model[2].state_dict().items()})
    with torch.no_grad():
        feats = [(model[1](model[0](b[0])), b[1]) for b in (bt, bv)]
    ref = hg.HyperOptimizer(head, [hg.WeightDecay(head, granularity="layer", init=0.1)], method=hg.Exact())
    g_ref, _ = ref.hypergradient(*feats)
    # the same computation on the same numbers, up to the order of float64 operations
    torch.testing.assert_close(
        res.hypergradient["weight_decay.2.weight"], g_ref["weight_decay.0.weight"], rtol=1e-12, atol=1e-15
    )
    # frozen after the family was built: refused by name, with the fix
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(True)
    with pytest.raises(
        ValueError,
        match=r"decays '2.weight', which is not among the weights given .* Build the "
        r"family after freezing",
    ):
        hyper.step(bt, bv)
    with pytest.raises(
        ValueError, match=r"covers no parameter .* \(frozen, left out: \['0.bias', '0.weight', '2.weight'\]\)"
    ):
        hg.WeightDecay(model)


def test_a_one_off_hypergradient_with_another_method_solves_from_scratch_and_keeps_the_carried_state() -> (
    None
):
    train, val = _data(4)
    lam = math.log(0.3)
    w, exact = _ridge(train, val, lam)
    model = _model_at(w)
    hyper = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, init=0.3)],
        loss_fn=squared_error,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
    )  # default Neumann, warm
    hyper.step(train, val)
    carried = hyper.state_dict()["solver"]
    assert carried["method"] == "Neumann"
    g, info = hyper.hypergradient(train, val, method=hg.CG(iters=50, tol=1e-12))
    # w is w* (closed form), CG converges on this 6-dimensional SPD system: the exact value, to
    # the closed form's rounding
    assert float(g["weight_decay"]) == pytest.approx(exact, rel=1e-9)
    assert info.state is not None and info.state.method == "CG" and "warm_start" not in info.extra
    after = hyper.state_dict()["solver"]  # the Neumann state is untouched ...
    assert after["method"] == "Neumann" and after["calls"] == carried["calls"]
    assert after["lambda_max"] == carried["lambda_max"]
    hyper.step(train, val)  # ... and the next step uses it
    assert hyper.state_dict()["solver"]["calls"] == carried["calls"] + 1
    # a method of the own class reads and updates the carried state
    cg = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, init=0.3)],
        method=hg.CG(iters=3),
        loss_fn=squared_error,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
    )
    cg.step(train, val)
    _, info = cg.hypergradient(train, val, method=hg.CG(iters=50, tol=1e-12))
    assert info.extra.get("warm_start") == 1.0 and cg.state_dict()["solver"]["calls"] == 2


def _same(a: object, b: object) -> bool:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_load_state_dict_of_a_foreign_state_raises_and_changes_nothing() -> None:
    # All or nothing: each foreign state below used to raise only after some parts were assigned.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g))

    def build() -> hg.HyperOptimizer:
        fams = [
            hg.WeightDecay(model, granularity="weight", init=0.1),
            hg.Dropout(model, ["0"], init=0.8, temperature=0.3),
        ]
        return hg.HyperOptimizer(model, fams, method=hg.CG(iters=3, damping=0.1))

    src, dst = build(), build()
    src.step(b, b)
    dst.step(b, b)
    dst.step(b, b)
    good = src.state_dict()
    before = dst.state_dict()
    foreign = {
        # the second hyperparameter's shape is another model's (the first one fits)
        "shape": {
            **good,
            "hparams": {**good["hparams"], "weight_decay.2.weight": torch.zeros(3, 4, dtype=DT)},
        },
        # every hyperparameter fits, the optimizer has another number of groups
        "optimizer": {**good, "optimizer": {"state": {}, "param_groups": []}},
        # a solver state that is not one
        "solver": {**good, "solver": {"version": 1, "method": "CG"}},
        "noise": {**good, "noise": torch.zeros(3, dtype=torch.uint8)},
        "counts": {**good, "steps": "many"},
    }
    for what, st in foreign.items():
        with pytest.raises((ValueError, KeyError, hg.HypergradientError)):
            dst.load_state_dict(st)
        assert _same(dst.state_dict(), before), what
    dst.load_state_dict(good)  # and the real one loads whole
    assert _same(dst.state_dict(), good)


class _KeywordModel(nn.Module):
    """Called with keyword inputs, as a Hugging Face model is: ``model(features=..., labels=...)``."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.lin = _model_at(w)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        pred = self.lin(features).squeeze(-1)
        return {"pred": pred, "loss": ((pred - labels) ** 2).mean() if labels is not None else pred.sum()}


def test_dict_batches_call_the_model_with_keywords_and_carry_the_index() -> None:
    train, val = _data()
    lam0 = math.log(0.3)
    w_star, g_exact = _ridge(train, val, lam0)
    model = _KeywordModel(w_star)

    def per_example(out: Mapping[str, Tensor], batch: Batch) -> Tensor:
        return (out["pred"] - batch.y) ** 2

    def as_dict(b: tuple[Tensor, Tensor], **extra: Tensor) -> dict[str, Tensor]:
        return {"features": b[0], "labels": b[1], **extra}

    hyper = hg.HyperOptimizer(
        model, [hg.WeightDecay(model, init=0.3)], method=hg.Exact(), loss_fn=per_example
    )
    # "index" is the examples' positions, never a model input (this forward would refuse it)
    g, _ = hyper.hypergradient(as_dict(train, index=torch.arange(20)), as_dict(val))
    # the closed form of the tuple-batch test, to the same 1e-10
    assert float(g["weight_decay"]) == pytest.approx(g_exact, rel=1e-10, abs=1e-12)
    b = as_batch(as_dict(train, index=torch.arange(20, 40)))
    assert sorted(b.x) == ["features", "labels"] and torch.equal(b.index, torch.arange(20, 40))  # type: ignore[call-overload]
    assert torch.equal(as_batch(as_dict(train)).index, torch.arange(20))

    # per-example weights read the dict's "index": only the named examples' weights get a hypergradient
    weights = hg.ExampleWeights(40, dtype=DT)
    hyper = hg.HyperOptimizer(model, [weights], method=hg.Exact(), loss_fn=per_example)
    g, _ = hyper.hypergradient(as_dict(train, index=torch.arange(20, 40)), as_dict(val))
    assert bool((g["example_weights"][:20] == 0).all()) and bool((g["example_weights"][20:] != 0).all())

    def model_loss(out: Mapping[str, Tensor], batch: Batch) -> Tensor:
        return out["loss"]  # the model's own scalar loss, from the "labels" it was given

    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model, init=0.3)], method=hg.Exact(), loss_fn=model_loss)
    g, _ = hyper.hypergradient(as_dict(train), as_dict(val))
    assert float(g["weight_decay"]) == pytest.approx(g_exact, rel=1e-10, abs=1e-12)


class _Same(torch.autograd.Function):
    """The identity with a first-order-only backward (as fused attention kernels have)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g


def test_hvp_mode_reaches_the_hypergradient() -> None:
    train, val = _data()
    lam0 = math.log(0.3)
    w_star, g_exact = _ridge(train, val, lam0)
    model = _model_at(w_star)

    def once_differentiable_error(out: Tensor, batch: Batch) -> Tensor:
        return (_Same.apply(out.squeeze(-1)) - batch.y) ** 2  # type: ignore[no-any-return]

    def hyper(**kw: Any) -> hg.HyperOptimizer:
        return hg.HyperOptimizer(
            model,
            [hg.WeightDecay(model, init=0.3)],
            method=hg.Exact(),
            loss_fn=once_differentiable_error,
            **kw,
        )

    with pytest.raises(
        hg.HypergradientError,
        match=r'hvp_mode="finite-difference" to hg\.hypergradient or hg\.HyperOptimizer',
    ):
        hyper().hypergradient(train, val)
    g, _ = hyper(hvp_mode="finite-difference").hypergradient(train, val)
    # a quadratic L_T: central differences are exact up to rounding (eps/ε ~ 1e-11 relative)
    assert float(g["weight_decay"]) == pytest.approx(g_exact, rel=1e-8)
    with pytest.raises(
        ValueError, match="hvp_mode must be one of 'reverse', 'forward', 'finite-difference', got 'fd'"
    ):
        hg.HyperOptimizer(model, [hg.WeightDecay(model)], hvp_mode="fd")  # type: ignore[arg-type]
