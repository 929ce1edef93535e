"""``nn.Module`` support: functional calls, buffers (batch norm) and per-weight decay on a module."""

from __future__ import annotations

import copy

import pytest
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
        return 0.5 * torch.exp(h["log_wd"]) * sum(torch.sum(v**2) for v in w.values())  # type: ignore[return-value]

    inner, outer = hg.make_losses(model, nn.functional.cross_entropy, train, val, penalty=penalty)
    g, info = hg.hypergradient(
        outer, inner, params, hp, method=hg.Neumann(iters=5, alpha=0.05), return_info=True
    )
    assert torch.isfinite(g["log_wd"]) and float(g["log_wd"]) != 0.0
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    # Batch statistics, not running ones, enter the training loss: the same loss in eval mode
    # gives a different hypergradient.
    inner_e, outer_e = hg.make_losses(
        model, nn.functional.cross_entropy, train, val, penalty=penalty, modes=("eval", "eval")
    )
    ge = hg.hypergradient(outer_e, inner_e, params, hp, method=hg.Neumann(iters=5, alpha=0.05))
    assert not torch.allclose(ge["log_wd"], g["log_wd"])
    assert info.hvps == 5


def test_functional_model_uses_given_weights() -> None:
    model = nn.Linear(3, 1).to(DT)
    apply = hg.functional_model(model)
    w = {"weight": torch.ones(1, 3, dtype=DT), "bias": torch.zeros(1, dtype=DT)}
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)
    assert float(apply(w, x)) == 6.0


def _dropout_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)).to(
        DT
    )


def _loss_in_mode(model: nn.Module, training: bool, params: dict, batch: tuple) -> torch.Tensor:
    """The reference: a deep copy of the module with ``params`` loaded, run in the given mode."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(params[k])
    ref.train(training)
    return nn.functional.cross_entropy(ref(batch[0]), batch[1])


@pytest.mark.parametrize("module_mode", [True, False], ids=["module-train", "module-eval"])
def test_make_losses_trains_on_train_mode_and_validates_in_eval_mode(module_mode: bool) -> None:
    # As the trainer does: L_T in training mode (dropout on, batch statistics), L_V in
    # evaluation mode (no dropout, running statistics), whatever mode the module is in, which is
    # restored afterwards. Dropout masks: the same seed before the loss and its reference.
    model = _dropout_bn_model()
    with torch.no_grad():  # running statistics that differ from any batch's
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    model.train(module_mode)
    train, val = _data(32, 5), _data(16, 6)
    params = hg.module_params(model)
    inner, outer = hg.make_losses(model, nn.functional.cross_entropy, train, val)
    torch.manual_seed(7)
    lt = inner(params, {})
    assert model.training is module_mode and all(m.training is module_mode for m in model.modules())
    torch.manual_seed(7)
    assert torch.equal(lt, _loss_in_mode(model, True, params, train))
    lv = outer(params, {})
    assert model.training is module_mode
    assert torch.equal(lv, _loss_in_mode(model, False, params, val))
    # Not the other mode's value (the test would be vacuous if the modes agreed).
    torch.manual_seed(7)
    assert not torch.allclose(lt, _loss_in_mode(model, False, params, train))
    assert not torch.allclose(lv, _loss_in_mode(model, True, params, val))


def test_make_losses_current_mode_and_per_submodule_flags() -> None:
    model = _dropout_bn_model()
    model.eval()
    train, val = _data(32, 5), _data(16, 6)
    params = hg.module_params(model)
    inner, outer = hg.make_losses(model, nn.functional.cross_entropy, train, val, modes="current")
    assert torch.equal(inner(params, {}), _loss_in_mode(model, False, params, train))
    assert torch.equal(outer(params, {}), _loss_in_mode(model, False, params, val))
    inner2, _ = hg.make_losses(model, nn.functional.cross_entropy, train, val, modes=("current", "train"))
    assert torch.equal(inner2(params, {}), _loss_in_mode(model, False, params, train))
    # A submodule kept in eval mode inside a training model keeps its own flag after a call.
    model.train()
    model[1].eval()
    inner3, outer3 = hg.make_losses(model, nn.functional.cross_entropy, train, val)
    inner3(params, {})
    outer3(params, {})
    assert model.training and model[3].training and not model[1].training
    with pytest.raises(
        hg.HypergradientError, match=r"modes must be 'train', 'eval' or 'current'.*got 'test'"
    ):
        hg.make_losses(model, nn.functional.cross_entropy, train, val, modes="test")  # type: ignore[arg-type]
