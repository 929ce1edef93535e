"""Differentiable inner optimizers (hypergradients.optim).

1. Trajectories equal torch.optim's (SGD with momentum/nesterov/weight decay, Adam, AdamW) step by
   step on a small MLP with a different batch per step, float64. Our updates are the same formulas
   with a different operation order in places (Adam's lerp vs β·m + (1−β)·g), so they agree to
   rounding, not bit for bit: 1e-12 relative on the weights after 8 steps is ~1e4 float64 ulps,
   far above the few-ulp differences per step and far below any real discrepancy (a wrong
   bias correction or decay order changes the weights by ~1e-3).
2. Every optimizer hyperparameter (lr, momentum, betas, eps, weight decay, a per-step lr schedule)
   gets the hypergradient of the unrolled validation loss, checked against central finite
   differences in float64: the loss is smooth in each hyperparameter, so with step ε the central
   difference error is O(ε²·L''') ≈ 1e-10 for ε = 1e-5, and rounding adds O(eps_64/ε) ≈ 1e-11;
   1e-6 relative tolerance leaves margin for both.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import hypergradients as hg
import problems as P
from hypergradients import optim
from hypergradients.core import tree

DT = torch.float64
Tree = dict[str, Tensor]


def _mlp_problem(
    seed: int = 0, steps: int = 8
) -> tuple[Tree, list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w0 = {
        "w1": torch.randn(4, 6, generator=g, dtype=DT) * 0.5,
        "b1": torch.randn(6, generator=g, dtype=DT) * 0.1,
        "w2": torch.randn(6, 3, generator=g, dtype=DT) * 0.5,
        "b2": torch.randn(3, generator=g, dtype=DT) * 0.1,
    }
    batches = [
        (torch.randn(5, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g))
        for _ in range(steps)
    ]
    val = (torch.randn(7, 4, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g))
    return w0, batches, val


def _net(w: Tree, x: Tensor) -> Tensor:
    return torch.tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]


def _loss(w: Tree, batch: tuple[Tensor, Tensor]) -> Tensor:
    return torch.nn.functional.cross_entropy(_net(w, batch[0]), batch[1])


TORCH_CASES: list[tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer], optim.Optimizer]] = [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.3), optim.sgd(0.3)),
    ("sgd-wd", lambda ps: torch.optim.SGD(ps, lr=0.3, weight_decay=0.05), optim.sgd(0.3, weight_decay=0.05)),
    ("heavy-ball", lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9), optim.heavy_ball(0.2, 0.9)),
    (
        "heavy-ball-wd",
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.8, weight_decay=0.01),
        optim.heavy_ball(0.2, 0.8, weight_decay=0.01),
    ),
    (
        "nesterov",
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01),
        optim.nesterov(0.2, 0.9, weight_decay=0.01),
    ),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.05), optim.adam(0.05)),
    (
        "adam-wd",
        lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        optim.adam(0.05, 0.8, 0.99, 1e-6, weight_decay=0.1),
    ),
    (
        "adamw",
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        optim.adamw(0.05, weight_decay=0.1),
    ),
]


@pytest.mark.parametrize(("name", "make_torch", "ours"), TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_trajectory_equals_torch_optim(
    name: str, make_torch: Callable[[list[Tensor]], torch.optim.Optimizer], ours: optim.Optimizer
) -> None:
    w0, batches, _ = _mlp_problem()
    tw = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    topt = make_torch(list(tw.values()))
    w: Tree = {k: v.clone() for k, v in w0.items()}
    state = ours.init(w)
    for k, b in enumerate(batches):
        topt.zero_grad()
        _loss(tw, b).backward()
        topt.step()
        wl = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        g = torch.autograd.grad(_loss(wl, b), list(wl.values()))
        w, state = ours.update(dict(zip(wl, g, strict=True)), state, w, {})
        for n in w:
            err = (w[n] - tw[n].detach()).abs().max() / tw[n].detach().abs().max()
            assert err <= 1e-12, (name, k, n, float(err))
        assert state.steps == k + 1
    # The weights moved: the comparison is not of two unchanged copies.
    assert max(float((w[n] - w0[n]).abs().max()) for n in w) > 1e-3


def test_plain_sgd_is_bit_for_bit() -> None:
    # No momentum: the same single torch.add(alpha=-lr) as torch.optim.SGD, so bitwise equal.
    w0, batches, _ = _mlp_problem()
    tw = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    topt = torch.optim.SGD(list(tw.values()), lr=0.3, momentum=0.9)
    ours = optim.heavy_ball(0.3, 0.9)
    w, state = dict(w0), ours.init(w0)
    for b in batches:
        topt.zero_grad()
        _loss(tw, b).backward()
        topt.step()
        wl = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        g = torch.autograd.grad(_loss(wl, b), list(wl.values()))
        w, state = ours.update(dict(zip(wl, g, strict=True)), state, w, {})
    for n in w:
        assert torch.equal(w[n], tw[n].detach())


def _unrolled_val(
    opt: optim.Optimizer,
    hp: Tree,
    w0: Tree,
    batches: list[tuple[Tensor, Tensor]],
    val: tuple[Tensor, Tensor],
    *,
    create_graph: bool,
) -> Tensor:
    w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    state = opt.init(w)
    for b in batches:
        g = torch.autograd.grad(_loss(w, b), list(w.values()), create_graph=create_graph, allow_unused=True)
        g = tuple(torch.zeros_like(v) if gk is None else gk for v, gk in zip(w.values(), g, strict=True))
        w, state = opt.update(dict(zip(w, g, strict=True)), state, w, hp)
        if not create_graph:
            w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    return _loss(w, val)


FD_CASES: list[tuple[str, optim.Optimizer, dict[str, float | list[float]]]] = [
    ("sgd-lr-wd", optim.sgd("lr", weight_decay="wd"), {"lr": 0.3, "wd": 0.05}),
    (
        "heavy-ball-lr-momentum",
        optim.heavy_ball("lr", "mom", weight_decay="wd"),
        {"lr": 0.2, "mom": 0.8, "wd": 0.02},
    ),
    ("nesterov-momentum", optim.nesterov("lr", "mom"), {"lr": 0.2, "mom": 0.7}),
    ("sgd-lr-schedule", optim.sgd("lr_schedule"), {"lr_schedule": [0.4, 0.3, 0.3, 0.2, 0.2, 0.1]}),
    (
        "adam-all",
        optim.adam("lr", "b1", "b2", "eps", weight_decay="wd"),
        {"lr": 0.05, "b1": 0.85, "b2": 0.99, "eps": 1e-2, "wd": 0.1},
    ),
    (
        "adamw-all",
        optim.adamw("lr", "b1", "b2", "eps", weight_decay="wd"),
        {"lr": 0.05, "b1": 0.85, "b2": 0.99, "eps": 1e-2, "wd": 0.1},
    ),
    ("adam-lr-schedule", optim.adam("lr_schedule"), {"lr_schedule": [0.05, 0.04, 0.03, 0.03, 0.02, 0.01]}),
]


@pytest.mark.parametrize(("name", "opt", "values"), FD_CASES, ids=[c[0] for c in FD_CASES])
def test_every_hyperparameter_against_finite_differences(
    name: str, opt: optim.Optimizer, values: dict[str, float | list[float]]
) -> None:
    w0, batches, val = _mlp_problem(steps=6)
    hp = {k: torch.tensor(v, dtype=DT, requires_grad=True) for k, v in values.items()}
    assert set(opt.hparam_keys) == set(hp)
    out = _unrolled_val(opt, hp, w0, batches, val, create_graph=True)
    grads = torch.autograd.grad(out, list(hp.values()))
    # eps is 1e-2 in the Adam cases so that its hypergradient is not negligible; ε = 1e-5 relative
    # to each value keeps every perturbed value inside its valid range (β < 1, lr > 0).
    for (k, h), gk in zip(hp.items(), grads, strict=True):
        flat = h.detach().reshape(-1)
        for i in range(flat.numel()):
            e = 1e-5 * max(abs(float(flat[i])), 1e-3)
            plus = {n: v.detach().clone() for n, v in hp.items()}
            minus = {n: v.detach().clone() for n, v in hp.items()}
            plus[k].reshape(-1)[i] += e
            minus[k].reshape(-1)[i] -= e
            fd = float(
                _unrolled_val(opt, plus, w0, batches, val, create_graph=False).detach()
                - _unrolled_val(opt, minus, w0, batches, val, create_graph=False).detach()
            ) / (2 * e)
            ad = float(gk.reshape(-1)[i])
            assert abs(ad - fd) <= 1e-6 * max(abs(fd), 1e-4), (name, k, i, ad, fd)
        assert float(gk.abs().max()) > 0, (name, k)  # each hyperparameter matters on this problem


def test_schedule_entry_per_step_and_errors() -> None:
    w = {"x": torch.ones(2, dtype=DT)}
    g = {"x": torch.ones(2, dtype=DT)}
    opt = optim.sgd("s")
    hp = {"s": torch.tensor([0.5, 0.25], dtype=DT)}
    st = opt.init(w)
    w1, st = opt.update(g, st, w, hp)
    w2, st = opt.update(g, st, w1, hp)
    assert torch.equal(w1["x"], torch.full((2,), 0.5, dtype=DT))
    assert torch.equal(w2["x"], torch.full((2,), 0.25, dtype=DT))
    with pytest.raises(
        hg.HypergradientError, match=r"schedule 's' has 2 entries, one per step, and has run out at step 2"
    ):
        opt.update(g, st, w2, hp)
    with pytest.raises(hg.HypergradientError, match=r"'nope'.*not in hparams"):
        optim.adam("nope").update(g, optim.adam("nope").init(w), w, hp)
    with pytest.raises(hg.HypergradientError, match=r"shape \(\) or|scalar or a per-step"):
        optim.sgd("m").update(g, optim.sgd("m").init(w), w, {"m": torch.ones(2, 2, dtype=DT)})
    with pytest.raises(hg.HypergradientError, match=r"nesterov=True\) needs a momentum"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(hg.HypergradientError, match="lr must be a number or a key"):
        optim.sgd(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [optim.adam, optim.adamw], ids=["adam", "adamw"])
def test_adam_zero_input_feature_keeps_hypergradient_finite(make: Callable[..., optim.Optimizer]) -> None:
    # An input feature that is 0 in every example (MNIST's border pixels): the first-layer weights
    # reading it get the gradient 0·δ, exactly 0 but a function of the other weights, so v = 0
    # with a graph. Plain v.sqrt() makes d/dlr NaN (its derivative 0.5/√0 times 0, then 0·NaN
    # through the product with the input); the hypergradient must be finite and, as those
    # weights never move and never matter, equal to that of the same data without the feature.
    w0, batches, val = _mlp_problem(steps=4)

    def zero_first(b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = b[0].clone()
        x[:, 0] = 0.0
        return x, b[1]

    batches = [zero_first(b) for b in batches]
    val = zero_first(val)
    small = {k: (v[1:] if k == "w1" else v) for k, v in w0.items()}

    def drop(b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return b[0][:, 1:], b[1]

    opt = make("lr")
    hp = {"lr": torch.tensor(0.05, dtype=DT, requires_grad=True)}
    a = torch.autograd.grad(_unrolled_val(opt, hp, w0, batches, val, create_graph=True), hp["lr"])[0]
    b = torch.autograd.grad(
        _unrolled_val(opt, hp, small, [drop(x) for x in batches], drop(val), create_graph=True), hp["lr"]
    )[0]
    assert bool(torch.isfinite(a)) and abs(float(a) - float(b)) <= 1e-12 * abs(float(b))
    fwd = hg.hypergradient(
        lambda w, h: _loss(w, val),
        lambda w, h, bt: _loss(w, bt),
        w0,
        {"lr": torch.tensor(0.05, dtype=DT)},
        method=hg.Forward(steps=4, optimizer=opt, batches=batches),
    )
    assert abs(float(fwd["lr"]) - float(b)) <= 1e-10 * abs(float(b))


# ---------------------------------------------------------------- one shape rule for Unrolled(lr=) and hg.optim
def test_a_one_element_hyperparameter_is_a_scalar_for_unrolled_and_optim(ridge: P.Problem) -> None:
    """``(1,)`` and ``()`` are both a scalar, for ``Unrolled(lr="lr")`` and for ``hg.optim``: the same
    K = 6 gradient-descent steps, so the same hypergradient (float64; the products are the same, the
    λ-gradient's summation order differs: 1e-12)."""
    outs = []
    for shape in [(), (1,)]:
        hp = {**ridge.hparams, "lr": torch.full(shape, 0.3, dtype=DT)}
        for method in (
            hg.Unrolled(steps=6, lr="lr"),
            hg.Unrolled(steps=6, optimizer=optim.sgd(lr="lr")),
            hg.Unrolled(steps=6, optimizer=optim.gd(lr="lr")),
        ):
            g = hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=method)
            assert g["lr"].shape == shape
            outs.append(tree.flatten(g))
    for o in outs[1:]:
        assert float(torch.linalg.vector_norm(o - outs[0]) / torch.linalg.vector_norm(outs[0])) <= 1e-12


def test_a_short_schedule_is_refused_naming_the_steps_needed(ridge: P.Problem) -> None:
    hp = {**ridge.hparams, "s": torch.full((3,), 0.3, dtype=DT)}
    for method in (
        hg.Unrolled(steps=5, optimizer=optim.sgd(lr="s")),
        hg.Forward(steps=5, optimizer=optim.adam(lr="s")),
        hg.Unrolled(steps=5, truncate=2, optimizer=optim.gd(lr="s")),
    ):
        with pytest.raises(
            hg.HypergradientError, match=r"hparams\['s'\].*3 entries.*K = 5 steps.*shape \(5,\)"
        ):
            hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=method)
    # Unrolled(lr=) takes a scalar only; a schedule is hg.optim.gd's, with the same steps.
    with pytest.raises(hg.HypergradientError, match=r"one element.*optimizer=hg\.optim\.gd\(lr='s'\)"):
        hg.hypergradient(
            ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=hg.Unrolled(steps=3, lr="s")
        )
    g = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        ridge.params,
        hp,
        method=hg.Unrolled(steps=3, optimizer=optim.gd(lr="s")),
    )
    assert g["s"].shape == (3,) and bool((g["s"] != 0).all())
