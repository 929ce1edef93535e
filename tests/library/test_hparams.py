"""Weight-decay families: the penalty, the parametrisation, and each granularity's hypergradient
against central finite differences of ``L_V(w*(λ))`` with the inner problem re-solved by Newton."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients.core import tree
from hypergradients.hparams import Batch, Family, WeightDecay, weights_only
from hypergradients.hparams.objective import Objective, cross_entropy

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randint(0, 2, (30,), generator=g).to(DT)
    Xv = torch.randn(20, 4, generator=g, dtype=DT)
    yv = torch.randint(0, 2, (20,), generator=g).to(DT)
    return X, y, Xv, yv


def _setup(granularity: str, include_biases: bool) -> tuple:
    torch.manual_seed(0)
    # Binary logistic regression: strictly convex in (weight, bias) on non-separable data even
    # when the bias is not decayed (a softmax bias would have a flat direction).
    model = nn.Linear(4, 1).to(DT)
    fam = WeightDecay(
        model,
        granularity=granularity,
        init=0.05,  # type: ignore[arg-type]
        include=(lambda n, p: True) if include_biases else None,
    )
    X, y, Xv, yv = _data()
    apply = hg.functional_model(model)
    bce = nn.functional.binary_cross_entropy_with_logits

    def inner(w: dict, h: dict) -> torch.Tensor:
        return bce(apply(w, X)[:, 0], y) + fam.penalty(w, h)

    def outer(w: dict, h: dict) -> torch.Tensor:
        return bce(apply(w, Xv)[:, 0], yv)

    return model, fam, inner, outer


def _newton(inner, w0: dict, h: dict, iters: int = 30) -> dict:
    """Newton on the strictly convex (logistic + L2) inner problem: to ‖∇‖ ~ 1e-15."""
    x = tree.flatten(w0).clone()
    for _ in range(iters):
        f = lambda v: inner(tree.unflatten(v, w0), h)  # noqa: E731
        gr = torch.func.grad(f)(x)
        if float(gr.norm()) < 1e-14:
            break
        x = x - torch.linalg.solve(torch.func.hessian(f)(x), gr)
    return tree.unflatten(x, w0)


@pytest.mark.parametrize(
    "granularity,include_biases,n_h",
    [("global", False, 1), ("layer", True, 2), ("weight", False, 4), ("weight", True, 5)],
)
def test_hypergradient_matches_finite_differences(granularity: str, include_biases: bool, n_h: int) -> None:
    model, fam, inner, outer = _setup(granularity, include_biases)
    lam = tree.detach(fam.tensors())
    assert sum(t.numel() for t in lam.values()) == n_h == fam.count()
    w0 = hg.module_params(model)
    w_star = _newton(inner, w0, lam)
    g = hg.hypergradient(outer, inner, w_star, lam, method=hg.Exact())
    # Central differences in λ (log-decay): truncation error O(ε²·f''') ~ 1e-12 and Newton's
    # solve error ~1e-15/ε ~ 1e-10, so agreement to ~1e-7 relative is a sharp test.
    eps = 1e-5
    flat = tree.flatten(lam)
    fd = torch.empty_like(flat)
    for i in range(flat.numel()):
        vals = []
        for s in (+1, -1):
            lp = flat.clone()
            lp[i] += s * eps
            hp = tree.unflatten(lp, lam)
            vals.append(outer(_newton(inner, w_star, hp), hp))
        fd[i] = (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close(tree.flatten(g), fd, rtol=1e-6, atol=1e-9)
    assert float(fd.abs().max()) > 1e-4  # the reference is not trivially zero


def test_granularities_agree_when_decays_are_equal() -> None:
    """At equal decays, d/dλ_global = Σ_i d/dλ_i, and each layer's = the sum over its weights."""
    grads = {}
    for gran in ("global", "layer", "weight"):
        model, fam, inner, outer = _setup(gran, True)
        lam = tree.detach(fam.tensors())
        w = _newton(inner, hg.module_params(model), lam)
        grads[gran] = hg.hypergradient(outer, inner, w, lam, method=hg.Exact())
    per_w = grads["weight"]
    # Same weights (same seed, same decays), so the only difference is summation: float64 round-off.
    torch.testing.assert_close(
        grads["global"]["weight_decay"], sum(t.sum() for t in per_w.values()), rtol=1e-10, atol=1e-14
    )
    for k, t in per_w.items():
        torch.testing.assert_close(grads["layer"][k], t.sum(), rtol=1e-10, atol=1e-14)


def test_penalty_parametrisation_and_keys() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    params = dict(model.named_parameters())
    fam = WeightDecay(model, granularity="weight", init=0.1)
    assert fam.covered == ["0.weight", "2.weight"]  # biases excluded by default
    assert set(fam.tensors()) == {"weight_decay.0.weight", "weight_decay.2.weight"}
    assert fam.tensors()["weight_decay.0.weight"].shape == (4, 3)
    assert all(t.requires_grad and t.is_leaf for t in fam.tensors().values())
    for v in fam.natural().values():
        torch.testing.assert_close(v, torch.full_like(v, 0.1))  # stored as log, reported natural
    h = {k: torch.randn_like(t) for k, t in fam.tensors().items()}
    expect = 0.5 * sum((h[f"weight_decay.{k}"].exp() * params[k] ** 2).sum() for k in fam.covered)
    torch.testing.assert_close(fam.penalty(params, h), expect)
    glob = WeightDecay(params, granularity="global", init=2.0, name="l2")
    expect_g = 0.5 * 2.0 * sum((params[k] ** 2).sum() for k in glob.covered)
    torch.testing.assert_close(glob.penalty(params, glob.tensors()), expect_g)
    assert glob.summary() == {"l2": pytest.approx(2.0)}
    assert set(fam.summary()) == {"weight_decay.mean", "weight_decay.min", "weight_decay.max"}
    assert weights_only("b", torch.zeros(3)) is False


def test_penalty_gradient_is_torch_weight_decay() -> None:
    """∂Ω/∂w = d·w: the convention of torch.optim.SGD(weight_decay=d)."""
    w = {"a": torch.randn(3, 2, dtype=DT, requires_grad=True)}
    fam = WeightDecay(w, granularity="global", init=0.3)
    (gw,) = torch.autograd.grad(fam.penalty(w, fam.tensors()), [w["a"]])
    torch.testing.assert_close(gw, 0.3 * w["a"].detach())


def test_load_tensors_and_bad_arguments() -> None:
    model = nn.Linear(3, 2)
    fam = WeightDecay(model, granularity="layer", init=1e-3)
    fam.load_tensors({"weight_decay.weight": torch.tensor(math.log(0.5))})
    assert float(fam.natural()["weight_decay.weight"]) == pytest.approx(0.5)
    with pytest.raises(KeyError, match=r"saved state lacks \['weight_decay.weight'\]"):
        fam.load_tensors({})
    with pytest.raises(ValueError, match="granularity must be one of global, layer, weight; got 'unit'"):
        WeightDecay(model, granularity="unit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init \(the initial decay\) must be a finite number > 0, got -1"):
        WeightDecay(model, init=-1)
    with pytest.raises(ValueError, match="covers no parameter"):
        WeightDecay(model, include=lambda n, p: False)


def test_base_family_hooks_are_identity() -> None:
    fam = Family()
    b = Batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2))
    assert fam.batch(b, {}) is b
    assert fam.penalty({}, {}) is None and fam.reduce(torch.zeros(2), b, {}) is None
    f = lambda p, x: x  # noqa: E731
    assert fam.forward(f, {}) is f
    with pytest.raises(NotImplementedError):
        fam.tensors()


# ---------------------------------------------------------------------- the interface: hooks, noise, composition
class _GaussNoise(hg.hparams.Family):
    """A toy stochastic family: hidden units times ``1 + exp(λ)·ε``, ``ε ~ N(0, 1)`` drawn from the sampler."""

    stochastic = True
    parametrisation = "scale = exp(λ)"

    def __init__(self, module: str, name: str = "gauss") -> None:
        self.module, self.name = module, name
        self.lam = torch.full((), -1.0, dtype=DT, requires_grad=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.name: self.lam}

    def natural(self, hparams: dict | None = None) -> dict[str, torch.Tensor]:
        return {self.name: (hparams or self.tensors())[self.name].detach().exp()}

    def hooks(self, hparams: dict, noise: hg.hparams.Sampler) -> list[hg.hparams.Hook]:
        def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            eps = noise.normal(out.shape, dtype=out.dtype, device=out.device)
            return out * (1 + hparams[self.name].exp() * eps)

        return [hg.hparams.Hook(self.module, post, "post")]


class _Tag(hg.hparams.Family):
    """Records the order in which its batch/forward hooks run (composition tests)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def natural(self, hparams: dict | None = None) -> dict[str, torch.Tensor]:
        return {}

    def batch(self, batch: Batch, hparams: dict) -> Batch:
        self.log.append(f"batch {self.name}")
        return Batch(batch.x + 1, batch.y, batch.index)

    def forward(self, forward: hg.hparams.ModelForward, hparams: dict) -> hg.hparams.ModelForward:
        def f(p: dict, x: torch.Tensor) -> torch.Tensor:
            self.log.append(f"enter {self.name}")
            out = forward(p, x)
            self.log.append(f"leave {self.name}")
            return out

        return f


class _Reducer(hg.hparams.Family):
    def __init__(self, name: str) -> None:
        self.name = name

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def natural(self, hparams: dict | None = None) -> dict[str, torch.Tensor]:
        return {}

    def reduce(self, losses: torch.Tensor, batch: Batch, hparams: dict) -> torch.Tensor:
        return losses.sum()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _objective(model: nn.Module, families: list) -> Objective:
    return Objective(model, families, cross_entropy)


def _cls_batch(n: int = 12, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g), torch.arange(n)
    )


def test_submodule_hooks_reach_hidden_units_only_during_the_training_forward() -> None:
    model = _mlp()
    fam = _GaussNoise("0")
    obj = _objective(model, [fam])
    w, lam, b = tree.detach(dict(model.named_parameters())), tree.detach(fam.tensors()), _cls_batch()
    noisy = obj.train(w, lam, b, forward=obj.copy_buffers, noise=hg.hparams.Noise(3))
    plain = _objective(model, []).train(w, {}, b, forward=obj.copy_buffers)
    assert not torch.equal(noisy, plain)  # the hook changed the hidden layer
    assert not model._forward_hooks and not model[0]._forward_hooks  # and is gone afterwards
    assert torch.equal(obj.val(w, b), _objective(model, []).val(w, b))  # L_V: no hook
    # with scale exp(λ) → 0 the hook is the identity: it acts on hidden unit values, nothing else
    lam0 = {"gauss": torch.tensor(-80.0, dtype=DT)}
    assert torch.allclose(
        obj.train(w, lam0, b, forward=obj.copy_buffers, noise=hg.hparams.Noise(3)), plain, rtol=0, atol=1e-15
    )


def test_hooks_are_removed_when_the_forward_raises_and_a_bad_module_name_is_named() -> None:
    model = _mlp()
    obj = _objective(model, [_GaussNoise("0")])
    w = tree.detach(dict(model.named_parameters()))
    bad = Batch(torch.zeros(2, 5, dtype=DT), torch.zeros(2, dtype=torch.long), torch.arange(2))
    with pytest.raises(RuntimeError):
        obj.train(w, {"gauss": torch.tensor(0.0, dtype=DT)}, bad, forward=obj.copy_buffers)
    assert not model[0]._forward_hooks
    obj2 = _objective(model, [_GaussNoise("fc9")])
    with pytest.raises(
        ValueError,
        match=r"hooks the submodule 'fc9', which the model lacks; its submodules "
        r"are \['0', '1', '2'\]",
    ):
        obj2.train(w, {"gauss": torch.tensor(0.0, dtype=DT)}, _cls_batch(), forward=obj.copy_buffers)


def test_one_noise_gives_the_same_draws_at_every_evaluation_and_none_draws_a_fresh_one() -> None:
    model = _mlp()
    fam = _GaussNoise("0")
    obj = _objective(model, [fam])
    w, lam, b = tree.detach(dict(model.named_parameters())), tree.detach(fam.tensors()), _cls_batch()
    n = hg.hparams.Noise(7)
    a = obj.train(w, lam, b, forward=obj.copy_buffers, noise=n)
    assert torch.equal(a, obj.train(w, lam, b, forward=obj.copy_buffers, noise=n))
    assert not torch.equal(a, obj.train(w, lam, b, forward=obj.copy_buffers, noise=hg.hparams.Noise(8)))
    torch.manual_seed(5)
    seed = hg.hparams.Noise.draw().seed
    torch.manual_seed(5)
    assert torch.equal(
        obj.train(w, lam, b, forward=obj.copy_buffers),
        obj.train(w, lam, b, forward=obj.copy_buffers, noise=hg.hparams.Noise(seed)),
    )
    # a deterministic setup draws nothing from the global generator
    det = _objective(model, [WeightDecay(model)])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    det.train(w, {"weight_decay": torch.tensor(0.0, dtype=DT)}, b, forward=det.copy_buffers)
    assert det.draw_noise() is None and torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mode", ["forward", "finite-difference"])
def test_fixed_noise_makes_forward_and_reverse_mode_hypergradients_agree(mode: str) -> None:
    # Forward-mode and finite-difference HVPs re-run L_T for every product; reverse mode builds one
    # graph. They agree only if every evaluation sees the same noise: to rounding (float64) for
    # forward mode; finite-difference HVPs carry their O(h²) error (docs/finite-difference-hvp.md).
    model = _mlp()
    fam = _GaussNoise("0")
    obj = _objective(model, [fam])
    w, lam = tree.detach(dict(model.named_parameters())), tree.detach(fam.tensors())
    bt, bv = _cls_batch(), _cls_batch(seed=2)
    noise = hg.hparams.Noise(11)

    def inner(p: dict, h: dict) -> torch.Tensor:
        return obj.train(p, h, bt, forward=obj.copy_buffers, noise=noise)

    def outer(p: dict, h: dict) -> torch.Tensor:
        return obj.val(p, bv)

    m = hg.Neumann(iters=5, alpha=0.1)
    g_rev = hg.hypergradient(outer, inner, w, lam, method=m, hvp_mode="reverse")
    g_other = hg.hypergradient(outer, inner, w, lam, method=m, hvp_mode=mode)  # type: ignore[arg-type]
    assert float(g_rev["gauss"].abs()) > 1e-6
    tol = 1e-10 if mode == "forward" else 1e-6
    torch.testing.assert_close(g_other, g_rev, rtol=tol, atol=1e-14)
    # with a fresh noise sample per evaluation the same computation is visibly different
    draws = iter(range(1000))

    def inner_fresh(p: dict, h: dict) -> torch.Tensor:
        return obj.train(p, h, bt, forward=obj.copy_buffers, noise=hg.hparams.Noise(next(draws)))

    try:
        g_bad = hg.hypergradient(outer, inner_fresh, w, lam, method=m, hvp_mode=mode)  # type: ignore[arg-type]
    except hg.HypergradientError:  # finite differences of gradients of two different functions:
        return  # the "Hessian" is garbage and the Neumann series diverges
    assert not torch.allclose(g_bad["gauss"], g_rev["gauss"], rtol=1e-3, atol=0)


def test_path_methods_see_one_noise_sample_along_the_path() -> None:
    # Unrolled (reverse) and Forward (forward mode, which re-runs every step for every tangent)
    # differentiate the same path only if each of its steps sees the same noise at every evaluation.
    model = _mlp()
    fam = _GaussNoise("0")
    obj = _objective(model, [fam])
    w, lam = tree.detach(dict(model.named_parameters())), tree.detach(fam.tensors())
    bt, bv = _cls_batch(), _cls_batch(seed=2)
    noise = hg.hparams.Noise(12)

    def inner(p: dict, h: dict) -> torch.Tensor:
        return obj.train(p, h, bt, forward=obj.copy_buffers, noise=noise)

    def outer(p: dict, h: dict) -> torch.Tensor:
        return obj.val(p, bv)

    g_rev = hg.hypergradient(outer, inner, w, lam, method=hg.Unrolled(steps=5, lr=0.1))
    g_fwd = hg.hypergradient(outer, inner, w, lam, method=hg.Forward(steps=5, lr=0.1))
    assert float(g_rev["gauss"].abs()) > 1e-6
    torch.testing.assert_close(g_fwd, g_rev, rtol=1e-10, atol=1e-14)


def test_hyper_step_uses_one_noise_sample_from_the_hyper_optimizers_own_generator() -> None:
    model = _mlp()
    fam = _GaussNoise("0")
    torch.manual_seed(9)
    hyper = hg.HyperOptimizer(
        model, [fam], method=hg.Neumann(iters=3, alpha=0.1), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0)
    )
    assert hyper.noise_generator is not None
    # seeded once from the global generator when built: torch.manual_seed before building fixes it
    torch.manual_seed(9)
    assert torch.equal(
        hyper.noise_generator.get_state(),
        torch.Generator().manual_seed(hg.hparams.Noise.draw().seed).get_state(),
    )
    bt, bv = _cls_batch(), _cls_batch(seed=2)
    twin = torch.Generator()
    twin.set_state(hyper.noise_generator.get_state())
    seed = hg.hparams.Noise.draw(twin).seed
    g_ref, _ = hyper.hypergradient(bt, bv, noise=hg.hparams.Noise(seed))
    before = torch.get_rng_state()
    res = hyper.step(bt, bv)
    assert res.hypergradient is not None
    assert torch.equal(res.hypergradient["gauss"], g_ref["gauss"])
    # one draw per step, none from torch's global generator
    assert torch.equal(hyper.noise_generator.get_state(), twin.get_state())
    assert torch.equal(torch.get_rng_state(), before)
    # a setup without stochastic families has no noise generator and draws nothing when built
    torch.manual_seed(9)
    before = torch.get_rng_state()
    det = hg.HyperOptimizer(model, [WeightDecay(model)])
    assert det.noise_generator is None and det.state_dict()["noise"] is None
    assert torch.equal(torch.get_rng_state(), before)


def test_composition_batch_hooks_chain_forwards_nest_and_two_reducers_are_refused() -> None:
    model = _mlp()
    log: list[str] = []
    obj = _objective(model, [_Tag("a", log), _Tag("b", log)])
    w = tree.detach(dict(model.named_parameters()))
    b = _cls_batch()
    loss = obj.train(w, {}, b, forward=obj.copy_buffers)
    assert log == ["batch a", "batch b", "enter b", "enter a", "leave a", "leave b"]
    shifted = Batch(b.x + 2, b.y, b.index)  # each batch hook added 1: they chained
    torch.testing.assert_close(
        loss, _objective(model, []).train(w, {}, shifted, forward=obj.copy_buffers), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match=r"the families \['r1', 'r2'\] all weight the examples"):
        _objective(model, [_Reducer("r1"), WeightDecay(model), _Reducer("r2")])
    one = _objective(model, [_Reducer("r1"), WeightDecay(model)])
    lam = {"weight_decay": torch.tensor(-2.0, dtype=DT)}
    pen = WeightDecay(model).penalty(w, lam)
    ce = nn.functional.cross_entropy(model(b.x), b.y, reduction="sum")
    torch.testing.assert_close(one.train(w, lam, b, forward=one.copy_buffers), ce + pen)  # penalties add


def test_describe_counts_and_states_the_parametrisation() -> None:
    model = _mlp()
    wd = WeightDecay(model, granularity="weight")
    d = wd.describe()
    assert d.count == 4 * 6 + 6 * 3 == wd.count()
    assert d.groups == {"0.weight": 24, "2.weight": 18} and "exp(λ)" in d.parametrisation
    text = hg.hparams.describe([wd, WeightDecay(model, name="wd2")])
    assert text.splitlines()[-1] == "total: 43 hyperparameters in 2 families"
    assert "weight_decay (WeightDecay, weight): 42 hyperparameters; decay d = exp(λ)" in text


def test_which_families_follow_the_models_dtype() -> None:
    # A float64 model under torch's default dtype: the families built from the model's parameters
    # take their dtypes; the others take their own dtype= (defaults as documented in docs/families.md).
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    default = torch.get_default_dtype()
    assert default != DT  # otherwise this test could not tell the two apart

    def dtypes(fam: Family) -> set[torch.dtype]:
        return {t.dtype for t in fam.tensors().values()}

    for g in ("global", "layer", "weight"):
        assert dtypes(WeightDecay(model, granularity=g)) == {DT}
    assert dtypes(hg.Dropout(model, ["0", "2:input"])) == {DT}
    assert dtypes(hg.Dropout(model, ["0"], dtype=torch.float32)) == {torch.float32}
    assert dtypes(hg.DropConnect(model, ["2.weight"])) == {DT}
    assert dtypes(hg.ExampleWeights(5)) == {default}
    assert dtypes(hg.ExampleWeights(5, dtype=DT)) == {DT}
    assert dtypes(hg.LossReweighting(hidden=3)) == {default}
    assert dtypes(hg.AugmentNet(1, wf=1)) == {torch.float32}
    assert dtypes(hg.DistilledData((3,), 2)) == {torch.float32}
    assert dtypes(hg.DistilledData((3,), 2, init=torch.zeros(2, 3, dtype=DT))) == {DT}


def test_hyperparameters_are_read_and_set_in_place_through_hyper_hparams() -> None:
    # hyper.hparams holds the families' own unconstrained tensors (those the hyper optimizer
    # updates): setting one in place sets the hyperparameter everywhere it is read.
    model = _mlp()
    fam = WeightDecay(model, granularity="layer", init=1e-3)
    hyper = hg.HyperOptimizer(
        model, [fam], method=hg.CG(iters=3, damping=0.1), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5)
    )
    key = "weight_decay.2.weight"
    assert hyper.hparams[key] is fam.tensors()[key]
    assert any(hyper.hparams[key] is p for p in hyper.optimizer.param_groups[0]["params"])
    with torch.no_grad():
        hyper.hparams[key].fill_(math.log(0.25))  # stored: log d
    assert float(hyper.natural()[key]) == pytest.approx(0.25, rel=1e-12)
    w = dict(model.named_parameters())
    # the penalty the training loss adds uses it: ½ (0.25 ‖W₂‖² + 1e-3 ‖W₀‖²)
    expect = 0.5 * (0.25 * w["2.weight"].pow(2).sum() + 1e-3 * w["0.weight"].pow(2).sum())
    torch.testing.assert_close(hyper.penalty(), expect.detach(), rtol=1e-12, atol=0)
    # and the next hyper step moves it from there: λ ← λ − 0.5 g
    b = _cls_batch()
    res = hyper.step(b, _cls_batch(seed=2))
    assert res.hypergradient is not None
    torch.testing.assert_close(
        hyper.hparams[key].detach(), math.log(0.25) - 0.5 * res.hypergradient[key], rtol=1e-12, atol=1e-15
    )
