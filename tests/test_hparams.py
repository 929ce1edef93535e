"""Weight-decay families: the penalty, the parametrisation, and each granularity's hypergradient
against central finite differences of ``L_V(w*(λ))`` with the inner problem re-solved by Newton."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hypergradients as hg
from hypergradients import tree
from hypergradients.hparams import Batch, Family, WeightDecay, weights_only

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
    fam = WeightDecay(model, granularity=granularity, init=0.05,  # type: ignore[arg-type]
                      include=(lambda n, p: True) if include_biases else None)
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


@pytest.mark.parametrize("granularity,include_biases,n_h",
                         [("global", False, 1), ("layer", True, 2), ("weight", False, 4), ("weight", True, 5)])
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
    assert float(fd.abs().max()) > 1e-4   # the reference is not trivially zero


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
    torch.testing.assert_close(grads["global"]["weight_decay"], sum(t.sum() for t in per_w.values()),
                               rtol=1e-10, atol=1e-14)
    for k, t in per_w.items():
        torch.testing.assert_close(grads["layer"][k], t.sum(), rtol=1e-10, atol=1e-14)


def test_penalty_parametrisation_and_keys() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    params = dict(model.named_parameters())
    fam = WeightDecay(model, granularity="weight", init=0.1)
    assert fam.covered == ["0.weight", "2.weight"]   # biases excluded by default
    assert set(fam.tensors()) == {"weight_decay.0.weight", "weight_decay.2.weight"}
    assert fam.tensors()["weight_decay.0.weight"].shape == (4, 3)
    assert all(t.requires_grad and t.is_leaf for t in fam.tensors().values())
    for v in fam.natural().values():
        torch.testing.assert_close(v, torch.full_like(v, 0.1))   # stored as log, reported natural
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
