"""Path methods with any differentiable optimizer and one minibatch per step.

``hg.Unrolled(steps=K, optimizer=O, batches=seq)`` differentiates K steps of ``O`` where step k's
inner loss is ``inner_loss(w, λ, b_k)``. Checked, in float64 on a small MLP with an L2 term
(log-decay, a loss hyperparameter) and the optimizer's own hyperparameters:

* against central finite differences of the same unrolled validation loss (ε = 1e-5 relative:
  truncation error O(ε²) ≈ 1e-10, rounding O(1e-16/ε) ≈ 1e-11, so 1e-6 relative is safe);
* checkpointed and forward mode against plain reverse mode: the same products in another order,
  ≤ 1e-10 relative (a K=12 path accumulates ~K·cond·1e-16 ≪ 1e-10);
* truncation against its definition: the first K−T steps without a graph, the last T by hand.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import hypergradients as hg
from hypergradients import optim

DT = torch.float64
Tree = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
K = 12


def _data(seed: int = 0) -> tuple[Tree, list[Batch], Batch]:
    g = torch.Generator().manual_seed(seed)
    w0 = {
        "w1": torch.randn(4, 5, generator=g, dtype=DT) * 0.5,
        "b1": torch.randn(5, generator=g, dtype=DT) * 0.1,
        "w2": torch.randn(5, 3, generator=g, dtype=DT) * 0.5,
        "b2": torch.randn(3, generator=g, dtype=DT) * 0.1,
    }
    batches = [
        (torch.randn(6, 4, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)) for _ in range(K)
    ]
    val = (torch.randn(9, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g))
    return w0, batches, val


def _ce(w: Tree, b: Batch) -> Tensor:
    return torch.nn.functional.cross_entropy(torch.tanh(b[0] @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"], b[1])


def inner_loss(w: Tree, h: Tree, b: Batch) -> Tensor:
    return _ce(w, b) + 0.5 * torch.exp(h["logwd"]) * (w["w1"].pow(2).sum() + w["w2"].pow(2).sum())


W0, BATCHES, VAL = _data()


def outer_loss(w: Tree, h: Tree) -> Tensor:
    return _ce(w, VAL)


CASES: list[tuple[str, optim.Optimizer, dict[str, float | list[float]]]] = [
    ("sgd-schedule", optim.sgd("lr"), {"lr": [0.5 - 0.03 * k for k in range(K)]}),
    ("heavy-ball", optim.heavy_ball("lr", "mom"), {"lr": 0.3, "mom": 0.8}),
    ("nesterov", optim.nesterov("lr", "mom", weight_decay="wd"), {"lr": 0.3, "mom": 0.8, "wd": 0.01}),
    ("adam", optim.adam("lr", "b1", "b2", "eps"), {"lr": 0.03, "b1": 0.85, "b2": 0.99, "eps": 1e-2}),
    ("adamw", optim.adamw("lr", weight_decay="wd"), {"lr": 0.03, "wd": 0.2}),
]
IDS = [c[0] for c in CASES]


def _hp(values: dict[str, float | list[float]]) -> Tree:
    h = {k: torch.tensor(v, dtype=DT) for k, v in values.items()}
    h["logwd"] = torch.tensor(-3.0, dtype=DT)
    return h


def _val_after(opt: optim.Optimizer, h: Tree, steps: int = K) -> float:
    w, s = dict(W0), opt.init(W0)
    for b in BATCHES[:steps]:
        wl = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        g = torch.autograd.grad(inner_loss(wl, h, b), list(wl.values()))
        w, s = opt.update(dict(zip(wl, g, strict=True)), s, w, h)
    return float(outer_loss(w, h))


def _rel(a: Tree, b: Tree) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    return num / den


@pytest.mark.parametrize(("name", "opt", "values"), CASES, ids=IDS)
def test_unrolled_minibatch_against_finite_differences(
    name: str, opt: optim.Optimizer, values: dict[str, float | list[float]]
) -> None:
    h = _hp(values)
    g = hg.hypergradient(
        outer_loss, inner_loss, W0, h, method=hg.Unrolled(steps=K, optimizer=opt, batches=BATCHES)
    )
    for key in h:
        flat = h[key].reshape(-1)
        # A schedule: check the first, a middle and the last entry (each is one step's rate).
        idx = [0, flat.numel() // 2, flat.numel() - 1] if flat.numel() > 1 else [0]
        for i in idx:
            e = 1e-5 * max(abs(float(flat[i])), 1e-2)
            hp = {k: v.clone() for k, v in h.items()}
            hm = {k: v.clone() for k, v in h.items()}
            hp[key].reshape(-1)[i] += e
            hm[key].reshape(-1)[i] -= e
            fd = (_val_after(opt, hp) - _val_after(opt, hm)) / (2 * e)
            ad = float(g[key].reshape(-1)[i])
            assert abs(ad - fd) <= 1e-6 * max(abs(fd), 1e-4), (name, key, i, ad, fd)
            assert abs(fd) > 1e-6, (name, key, i)  # not a comparison of two zeros


@pytest.mark.parametrize(("name", "opt", "values"), CASES, ids=IDS)
def test_checkpointed_and_forward_equal_reverse(
    name: str, opt: optim.Optimizer, values: dict[str, float | list[float]]
) -> None:
    h = _hp(values)
    ref, info = hg.hypergradient(
        outer_loss,
        inner_loss,
        W0,
        h,
        return_info=True,
        method=hg.Unrolled(steps=K, optimizer=opt, batches=BATCHES),
    )
    for method in (
        hg.Unrolled(steps=K, optimizer=opt, batches=BATCHES, checkpoint=True),
        hg.Unrolled(steps=K, optimizer=opt, batches=BATCHES, checkpoint=5),
        hg.Forward(steps=K, optimizer=opt, batches=BATCHES),
        hg.Forward(steps=K, optimizer=opt, batches=BATCHES, chunk=2),
    ):
        g, inf2 = hg.hypergradient(outer_loss, inner_loss, W0, h, method=method, return_info=True)
        assert _rel(g, ref) <= 1e-10, (name, method)
        assert _rel(inf2.final_params, info.final_params) <= 1e-12


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize(("name", "opt", "values"), CASES[1:4], ids=IDS[1:4])
def test_truncation_is_the_last_T_steps(
    name: str, opt: optim.Optimizer, values: dict[str, float | list[float]], T: int
) -> None:
    h = _hp(values)
    # The definition: K−T steps with no graph (weights AND optimizer state constant), then T steps
    # differentiated by hand with the optimizer's own update.
    w, s = dict(W0), opt.init(W0)
    for b in BATCHES[: K - T]:
        wl = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        g = torch.autograd.grad(inner_loss(wl, h, b), list(wl.values()))
        with torch.no_grad():
            w, s = opt.update(dict(zip(wl, g, strict=True)), s, wl, h)
    hl = {k: v.clone().requires_grad_(True) for k, v in h.items()}
    w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    for b in BATCHES[K - T :]:
        g = torch.autograd.grad(inner_loss(w, hl, b), list(w.values()), create_graph=True)
        w, s = opt.update(dict(zip(w, g, strict=True)), s, w, hl)
    ref = dict(
        zip(hl, torch.autograd.grad(outer_loss(w, hl), list(hl.values()), allow_unused=True), strict=True)
    )
    ref = {k: torch.zeros_like(hl[k]) if v is None else v for k, v in ref.items()}
    for method in (
        hg.Unrolled(steps=K, truncate=T, optimizer=opt, batches=BATCHES),
        hg.Unrolled(steps=K, truncate=T, optimizer=opt, batches=BATCHES, checkpoint=2),
        hg.Forward(steps=K, truncate=T, optimizer=opt, batches=BATCHES),
    ):
        got = hg.hypergradient(outer_loss, inner_loss, W0, h, method=method)
        assert _rel(got, ref) <= 1e-10, (name, T, method)
    full = hg.hypergradient(
        outer_loss, inner_loss, W0, h, method=hg.Unrolled(steps=K, optimizer=opt, batches=BATCHES)
    )
    assert _rel(full, ref) > 1e-3  # truncation changes the answer here


def test_schedule_truncated_entries_are_zero() -> None:
    # With truncate=T a schedule's first K−T entries drive constant steps: zero hypergradient.
    h = _hp(CASES[0][2])
    g = hg.hypergradient(
        outer_loss,
        inner_loss,
        W0,
        h,
        method=hg.Unrolled(steps=K, truncate=4, optimizer=optim.sgd("lr"), batches=BATCHES),
    )
    assert torch.count_nonzero(g["lr"][: K - 4]) == 0
    assert torch.count_nonzero(g["lr"][K - 4 :]) == 4


def test_plain_gd_unchanged_and_equal_to_optim_sgd() -> None:
    # The 2-argument loss and lr=α keep working; optim.sgd(α) is the same path bit for bit
    # (the same torch.add(alpha=−α) per step), and batches that repeat one batch equal no batches.
    b0 = BATCHES[0]

    def inner2(w: Tree, h: Tree) -> Tensor:
        return inner_loss(w, h, b0)

    h = {"logwd": torch.tensor(-3.0, dtype=DT)}
    a = hg.hypergradient(outer_loss, inner2, W0, h, method=hg.Unrolled(steps=K, lr=0.3))
    b = hg.hypergradient(outer_loss, inner2, W0, h, method=hg.Unrolled(steps=K, optimizer=optim.sgd(0.3)))
    c = hg.hypergradient(
        outer_loss, inner_loss, W0, h, method=hg.Unrolled(steps=K, optimizer=optim.sgd(0.3), batches=[b0] * K)
    )
    assert torch.equal(a["logwd"], b["logwd"]) and torch.equal(a["logwd"], c["logwd"])
    assert hg.Unrolled().lr == 0.1 and hg.Forward().lr == 0.1


def test_iterator_batches_advance_between_calls() -> None:
    h = _hp({"lr": 0.3, "mom": 0.8})
    opt = optim.heavy_ball("lr", "mom")

    def stream() -> Iterator[Batch]:
        yield from BATCHES

    it = stream()
    m = hg.Unrolled(steps=K // 2, optimizer=opt, batches=it)
    g1 = hg.hypergradient(outer_loss, inner_loss, W0, h, method=m)
    g2 = hg.hypergradient(outer_loss, inner_loss, W0, h, method=m)
    r1 = hg.hypergradient(
        outer_loss,
        inner_loss,
        W0,
        h,
        method=hg.Unrolled(steps=K // 2, optimizer=opt, batches=BATCHES[: K // 2]),
    )
    r2 = hg.hypergradient(
        outer_loss,
        inner_loss,
        W0,
        h,
        method=hg.Unrolled(steps=K // 2, optimizer=opt, batches=BATCHES[K // 2 :]),
    )
    assert _rel(g1, r1) == 0 and _rel(g2, r2) == 0 and _rel(g1, g2) > 1e-3
    with pytest.raises(hg.HypergradientError, match=r"steps=6 needs 6 batches, the batches gave only 0"):
        hg.hypergradient(outer_loss, inner_loss, W0, h, method=m)


def test_errors_name_the_fix() -> None:
    with pytest.raises(hg.HypergradientError, match=r"give the learning rate to the optimizer"):
        hg.Unrolled(steps=3, lr=0.1, optimizer=optim.adam())
    with pytest.raises(hg.HypergradientError, match=r"optimizer must be an optimizer of hg.optim"):
        hg.Forward(steps=3, optimizer=torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(hg.HypergradientError, match=r"'lr'.*not in hparams"):
        hg.hypergradient(
            outer_loss,
            inner_loss,
            W0,
            {"logwd": torch.tensor(-3.0, dtype=DT)},
            method=hg.Unrolled(steps=2, optimizer=optim.adam("lr"), batches=BATCHES),
        )
