"""hg.Identity(precondition=D): p = scale·v/D, and D read from the model's torch.optim.Adam/AdamW
(hg.adam_diagonal: D = (sqrt(v̂) + eps)/lr, so p = lr·v/(sqrt(v̂) + eps), SAMA's algorithmic adaptation),
through hypergradient, HyperOptimizer(inner_optimizer=) and fit. All float64; the formulas are
evaluated in the library's order of operations, so equality is exact (torch.equal)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.core.derivatives import InnerDerivatives
from hypergradients.core.operators import HessianOperator
from hypergradients.training.precondition import optimizer_diagonal

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)
Tree = dict[str, Tensor]


def _diagonal(like: Tree, seed: int = 0) -> Tree:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.1 + torch.rand(t.shape, generator=gen, dtype=DT) for k, t in like.items()}


def _pieces(prob: P.Problem) -> tuple[Tree, Tree, InnerDerivatives]:
    """``v = ∂L_V/∂w``, ``∂L_V/∂λ`` and the derivatives of L_T at (w*, λ), as the core computes them."""
    w = tree.clone_leaves(prob.params, requires_grad=True)
    lam = tree.clone_leaves(prob.hparams, requires_grad=True)
    out = prob.outer_loss(w, lam)
    raw = torch.autograd.grad(out, list(w.values()) + list(lam.values()), allow_unused=True)
    return (
        tree.as_tree(raw[: len(w)], w),
        tree.as_tree(raw[len(w) :], lam),
        InnerDerivatives(prob.inner_loss, w, lam),
    )


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_p_is_scale_v_over_the_diagonal_exactly(problem: P.Problem, scale: float) -> None:
    D = _diagonal(problem.params)
    v, direct, der = _pieces(problem)
    method = hg.Identity(scale=scale, precondition=D)
    p, _, stats = method.solve(HessianOperator.of(der), v, None)
    assert all(torch.equal(p[k], scale * (v[k] / D[k])) for k in v)
    assert stats.extra["preconditioned"] == 1.0
    g, info = hg.hypergradient(
        problem.outer_loss,
        problem.inner_loss,
        problem.params,
        problem.hparams,
        method=method,
        return_info=True,
    )
    indirect, _ = der.mixed_vjp(p)
    assert all(torch.equal(g[k], direct[k] - indirect[k]) for k in g)
    # and against the dense formula direct − M·(s·v/D) (another order of summation: 1e-12)
    dense = problem.direct - problem.mixed.T @ (scale * problem.v / tree.flatten(D))
    assert P.rel_err(g, tree.unflatten(dense, problem.hparams)) < 1e-12
    assert (
        info.hvps == 1 and info.iterations == 0 and info.extra["preconditioned"] == 1.0
    )  # the residual's HVP
    _, info0 = hg.hypergradient(
        problem.outer_loss,
        problem.inner_loss,
        problem.params,
        problem.hparams,
        method=method,
        return_info=True,
        residual=False,
    )
    assert info0.hvps == 0
    # a diagonal of ones is the plain identity
    ones = {k: torch.ones_like(t) for k, t in problem.params.items()}
    g1 = hg.hypergradient(
        problem.outer_loss,
        problem.inner_loss,
        problem.params,
        problem.hparams,
        method=hg.Identity(scale=scale, precondition=ones),
    )
    g0 = hg.hypergradient(
        problem.outer_loss,
        problem.inner_loss,
        problem.params,
        problem.hparams,
        method=hg.Identity(scale=scale),
    )
    assert all(torch.equal(g1[k], g0[k]) for k in g0)


def test_bad_diagonals_are_refused_with_the_key(ridge: P.Problem) -> None:
    D = _diagonal(ridge.params)
    for bad, match in [
        ({"w": torch.zeros(6, dtype=DT)}, r"precondition\['w'\] has the entry 0.0"),
        ({"w": torch.full((6,), math.nan, dtype=DT)}, "nan"),
        ({"w": torch.ones(6, dtype=torch.int64)}, "floating-point"),
        ("adam", "inner_optimizer"),
        (3.0, "dict of positive tensors"),
    ]:
        with pytest.raises(hg.HypergradientError, match=match):
            hg.Identity(precondition=bad)  # type: ignore[arg-type]
    for bad, match in [({"x": D["w"]}, r"missing \['w'\]"), ({"w": torch.ones(5, dtype=DT)}, "shape")]:
        with pytest.raises(hg.HypergradientError, match=match):
            hg.hypergradient(
                ridge.outer_loss,
                ridge.inner_loss,
                ridge.params,
                ridge.hparams,
                method=hg.Identity(precondition=bad),
            )
    with pytest.raises(hg.HypergradientError, match="inner_optimizer=opt"):
        hg.hypergradient(
            ridge.outer_loss,
            ridge.inner_loss,
            ridge.params,
            ridge.hparams,
            method=hg.Identity(precondition="inner_optimizer"),
        )
    # inf is a learning rate of 0: p = 0 there, g the direct term (0 for ridge); float32 is cast
    g = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        ridge.params,
        ridge.hparams,
        method=hg.Identity(precondition={"w": torch.full((6,), math.inf)}),
    )
    assert torch.equal(g["log_l2"], torch.zeros(6, dtype=DT))
    assert "precondition=<diagonal of 1 tensors>" in repr(hg.Identity(precondition=D))
    assert hg.Identity(precondition=D) == hg.Identity()  # the diagonal is data, not an option


# ------------------------------------------------------------------ the optimizer's diagonal
def _trained(
    opt_cls: type[torch.optim.Optimizer], steps: int, **kw: object
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "lr": 0.03}]
    opt = opt_cls(groups, **kw)  # type: ignore[arg-type]
    X = torch.randn(16, 3, dtype=DT)
    for _ in range(steps):
        opt.zero_grad()
        (model(X).squeeze(-1) - X.sum(1)).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.Adam, {}),
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.Adam, {"amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6}),
    ],
    ids=["adam", "adamw", "amsgrad"],
)
def test_adam_diagonal_is_the_denominator_of_adams_step(
    opt_cls: type[torch.optim.Optimizer], kw: dict
) -> None:
    model, opt = _trained(opt_cls, 5, **kw)
    D = hg.adam_diagonal(opt, model)
    assert list(D) == [k for k, _ in model.named_parameters()]
    for (k, p), lr in zip(model.named_parameters(), (0.01, 0.01, 0.03, 0.03), strict=True):
        st, g = opt.state[p], opt.param_groups[0 if lr == 0.01 else 1]
        sq = st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]
        t = float(st["step"])
        assert torch.equal(D[k], (sq.sqrt() / (1 - g["betas"][1] ** t) ** 0.5 + g["eps"]) / lr)
    # The next step is Δw = −m̂/D (AdamW also decays the weights first: Δw + lr·wd·w): D is the diagonal
    # the update divides by. addcdiv's rounding and the decay's: 1e-12 relative.
    X = torch.randn(16, 3, dtype=DT)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.zero_grad()
    (model(X).squeeze(-1) - X.sum(1)).pow(2).mean().backward()
    opt.step()
    D = hg.adam_diagonal(opt, model)  # after the step: the moments this step used
    for (k, p), lr in zip(model.named_parameters(), (0.01, 0.01, 0.03, 0.03), strict=True):
        st, b1 = opt.state[p], opt.param_groups[0]["betas"][0]
        m_hat = st["exp_avg"] / (1 - b1 ** float(st["step"]))
        decay = lr * kw.get("weight_decay", 0.0) * before[k] if opt_cls is torch.optim.AdamW else 0.0  # type: ignore[operator]
        step = p.detach() - before[k] + decay
        assert torch.allclose(step * D[k], -m_hat, rtol=1e-12, atol=1e-15)


def test_before_the_first_step_the_diagonal_is_one_over_lr() -> None:
    """No state yet (before Adam's first step): D = 1/lr, p = lr·v, the plain identity times lr."""
    model, opt = _trained(torch.optim.Adam, 0)
    D, missing = optimizer_diagonal(opt, model)
    assert missing == [k for k, _ in model.named_parameters()]
    assert torch.equal(D["0.weight"], torch.full((4, 3), 1 / 0.01, dtype=DT))
    assert torch.equal(D["2.bias"], torch.full((1,), 1 / 0.03, dtype=DT))
    opt.param_groups[1]["lr"] = 0.0  # a schedule at zero: D = inf, p = 0
    assert torch.isinf(hg.adam_diagonal(opt, model)["2.weight"]).all()


def test_the_optimizer_and_its_weights_are_checked() -> None:
    model, opt = _trained(torch.optim.Adam, 1)
    with pytest.raises(TypeError, match=r"torch\.optim\.Adam or AdamW"):
        hg.adam_diagonal(torch.optim.SGD(model.parameters(), lr=0.1), model)
    extra = nn.Linear(2, 2).to(DT)
    with pytest.raises(ValueError, match=r"'extra\.weight' is not trained by the inner optimizer"):
        hg.adam_diagonal(opt, {"extra.weight": extra.weight})

    class Wrapped:  # Accelerate's AcceleratedOptimizer keeps the optimizer as .optimizer
        optimizer = opt

    D = hg.adam_diagonal(Wrapped(), model)
    assert all(torch.equal(D[k], d) for k, d in hg.adam_diagonal(opt, model).items())


# ------------------------------------------------------------------ HyperOptimizer and fit
def _classification(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(40, 5, generator=gen, dtype=DT), torch.randn(30, 5, generator=gen, dtype=DT)
    return (X, X[:, :3].argmax(1)), (Xv, Xv[:, :3].argmax(1))


def test_hyper_optimizer_reads_the_inner_optimizer_at_every_step() -> None:
    train, val = _classification()
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    fam = hg.WeightDecay(model, init=1e-2)
    method = hg.Identity(scale=0.5, precondition="inner_optimizer")
    hyper = hg.HyperOptimizer(model, [fam], method=method, inner_optimizer=opt)
    no_opt = hg.HyperOptimizer(model, [fam], method=method)
    with pytest.raises(ValueError, match=r"HyperOptimizer\(\.\.\., inner_optimizer=opt\)"):
        no_opt.hypergradient(train, val)
    # before Adam's first step: D = 1/lr everywhere, p = 0.5·lr·v (the plain identity times lr)
    g0, info0 = hyper.hypergradient(train, val)
    plain = hyper.hypergradient(train, val, method=hg.Identity(scale=0.5 * 0.05))[0]
    assert info0.extra["precondition_fallbacks"] == 2 and info0.extra["preconditioned"] == 1.0
    assert float(g0["weight_decay"]) == pytest.approx(float(plain["weight_decay"]), rel=1e-14)
    for _ in range(3):
        opt.zero_grad()
        hyper.train_loss(train).backward()
        opt.step()
        D = hg.adam_diagonal(opt, model)
        by_hand = hyper.hypergradient(train, val, method=hg.Identity(scale=0.5, precondition=D))[0]
        res = hyper.step(train, val)
        assert res.hypergradient is not None and res.info is not None
        assert torch.equal(res.hypergradient["weight_decay"], by_hand["weight_decay"])
        assert res.metrics()["solver_precondition_fallbacks"] == 0
    assert hyper.inner_optimizer is opt and hyper.steps == 3


def test_fit_preconditions_with_its_own_adam() -> None:
    """fit passes its inner optimizer (default Adam): at every hyper step the method's diagonal is that
    optimizer's, as hg.adam_diagonal reads it then."""
    train, val = _classification()
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DT)
    seen: list[tuple[Tree, hg.HyperOptimizer]] = []

    def before(hyper: hg.HyperOptimizer) -> None:
        assert isinstance(hyper.inner_optimizer, torch.optim.Adam)
        seen.append((hg.adam_diagonal(hyper.inner_optimizer, model), hyper))

    checked: list[bool] = []

    def after(hyper: hg.HyperOptimizer, res: hg.HyperStep) -> None:
        assert res.info is not None and res.info.extra["preconditioned"] == 1.0
        assert res.info.extra["precondition_fallbacks"] == 0
        checked.append(True)

    res = hg.fit(
        model,
        [hg.WeightDecay(model, init=1e-2)],
        train,
        val,
        rounds=3,
        inner_steps=4,
        batch_size=40,
        method=hg.Identity(precondition="inner_optimizer"),
        before_hyper_step=[before],
        after_hyper_step=[after],
    )
    assert res.hyper_steps == 3 and len(checked) == 3
    # The diagonals differ from step to step (Adam's moments move) and are D = (sqrt(v̂) + eps)/lr.
    assert not torch.equal(seen[0][0]["weight"], seen[-1][0]["weight"])
    opt = seen[-1][1].inner_optimizer
    st = opt.state[model.weight]
    eps, b2 = opt.param_groups[0]["eps"], opt.param_groups[0]["betas"][1]
    assert torch.equal(
        seen[-1][0]["weight"], (st["exp_avg_sq"].sqrt() / (1 - b2 ** float(st["step"])) ** 0.5 + eps) / 1e-3
    )
