"""``nn.Module`` support: functional calls, buffers (batch norm) and per-weight decay on a module."""

from __future__ import annotations

import torch
from torch import nn

import hypergradients as hg
import problems as P

DT = torch.float64


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    return x, (x.sum(1) > 0).long()


def test_module_losses_match_hand_written_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    train, val = _data(30, 1), _data(20, 2)
    params = hg.module_params(model)
    hp = {f"log_wd.{k}": torch.full_like(v, -3.0) for k, v in params.items()}

    def penalty(w: dict, h: dict) -> torch.Tensor:
        return sum(0.5 * torch.sum(torch.exp(h[f"log_wd.{k}"]) * w[k] ** 2) for k in w)  # type: ignore[return-value]

    inner, outer = hg.make_losses(model, nn.functional.cross_entropy, train, val, penalty=penalty)

    def f(w: dict, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ w["0.weight"].T + w["0.bias"])
        return h @ w["2.weight"].T + w["2.bias"]

    def inner_ref(w: dict, h: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(f(w, train[0]), train[1]) + penalty(w, h)

    def outer_ref(w: dict, h: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(f(w, val[0]), val[1])

    # Train to an optimum first so that CG's answer is the IFT hypergradient.
    ws = P.newton_solve(inner_ref, params, hp, tol=1e-12)
    a = hg.hypergradient(outer, inner, ws, hp, method=hg.CG(iters=200, tol=1e-12))
    b = hg.hypergradient(outer_ref, inner_ref, ws, hp, method=hg.Exact())
    assert P.rel_err(a, b) < 1e-8
    # The module's own weights are untouched.
    assert all(torch.equal(v, params[k]) for k, v in hg.module_params(model).items())


def test_batchnorm_buffers_are_used_but_never_modified() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).to(DT)
    model.train()
    before = {k: b.clone() for k, b in model.named_buffers()}
    train, val = _data(32, 3), _data(16, 4)
    params = hg.module_params(model)
    hp = {"log_wd": torch.tensor(-2.0, dtype=DT)}

    def penalty(w: dict, h: dict) -> torch.Tensor:
        return 0.5 * torch.exp(h["log_wd"]) * sum(torch.sum(v ** 2) for v in w.values())  # type: ignore[return-value]

    inner, outer = hg.make_losses(model, nn.functional.cross_entropy, train, val, penalty=penalty)
    g, info = hg.hypergradient(outer, inner, params, hp, method=hg.Neumann(iters=5, alpha=0.05),
                               return_info=True)
    assert torch.isfinite(g["log_wd"]) and float(g["log_wd"]) != 0.0
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    # Batch statistics, not running ones, enter the training loss: the same loss in eval mode
    # gives a different hypergradient.
    model.eval()
    inner_e, outer_e = hg.make_losses(model, nn.functional.cross_entropy, train, val, penalty=penalty)
    ge = hg.hypergradient(outer_e, inner_e, params, hp, method=hg.Neumann(iters=5, alpha=0.05))
    assert not torch.allclose(ge["log_wd"], g["log_wd"])
    assert info.hvps == 5


def test_functional_model_uses_given_weights() -> None:
    model = nn.Linear(3, 1).to(DT)
    apply = hg.functional_model(model)
    w = {"weight": torch.ones(1, 3, dtype=DT), "bias": torch.zeros(1, dtype=DT)}
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)
    assert float(apply(w, x)) == 6.0
