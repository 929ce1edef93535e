"""hg.FirstOrder, the value-function penalty (F2SA / ScaleBiO): its definition computed by hand, its
rates on ridge (forward O(1/σ), central O(1/σ²), both tending to Neumann(iters=steps, alpha=lr) and,
with the steps, to the exact hypergradient), no second derivative (through a @once_differentiable
op), its cost in gradient evaluations, its warm start, and its use by HyperOptimizer and fit.

All float64. The method differences two gradients of L_T at points ~‖p‖/σ apart, so rounding
enters multiplied by σ: eps·σ·‖w‖/‖p‖ ≈ 1e-16·1e3 here, which sets the tolerances below.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.hparams import Batch

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)
Tree = dict[str, Tensor]


def _alpha(prob: P.Problem) -> float:
    return 1.0 / P.lambda_max(prob)


def _g(prob: P.Problem, method: hg.Method, params: Tree | None = None, **kw: object) -> tuple[Tree, hg.Info]:
    return hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        prob.params if params is None else params,  # type: ignore[call-overload,no-any-return]
        prob.hparams,
        method=method,
        return_info=True,
        **kw,
    )


def _grad(fn: Callable[[Tree, Tree], Tensor], w: Tree, lam: Tree, *, of: str) -> Tree:
    """∇_w or ∇_λ of ``fn`` at (w, λ) by torch.func (an implementation independent of the method's)."""
    if of == "w":
        return dict(torch.func.grad(lambda x: fn(x, lam))(w))
    return dict(torch.func.grad(lambda h: fn(w, h))(lam))


def _by_hand(
    prob: P.Problem, sigma: float, steps: int, lr: float, *, central: bool, start: Tree | None = None
) -> tuple[Tree, Tree]:
    """The definition: ``steps`` steps x ← x − lr(∇_wL_T ± ∇_wL_V/σ) from w (or from w ∓ start/σ), then
    forward  g = ∇_λL_V(x₊) − σ(∇_λL_T(w) − ∇_λL_T(x₊)),
    central  g = ½(∇_λL_V(x₊) + ∇_λL_V(x₋)) + (σ/2)(∇_λL_T(x₊) − ∇_λL_T(x₋)); and the implied p."""
    w, lam = prob.params, prob.hparams
    ends = []
    for s in (1.0, -1.0) if central else (1.0,):
        x = dict(w) if start is None else {k: w[k] - s * start[k] / sigma for k in w}
        for _ in range(steps):
            gT, gV = _grad(prob.inner_loss, x, lam, of="w"), _grad(prob.outer_loss, x, lam, of="w")
            x = {k: x[k] - lr * (gT[k] + s * gV[k] / sigma) for k in x}
        ends.append((x, _grad(prob.inner_loss, x, lam, of="l"), _grad(prob.outer_loss, x, lam, of="l")))
    if central:
        (xp, tp, vp), (xm, tm, vm) = ends
        g = {k: 0.5 * (vp[k] + vm[k]) + sigma / 2 * (tp[k] - tm[k]) for k in lam}
        return g, {k: sigma / 2 * (xm[k] - xp[k]) for k in w}
    ((xp, tp, vp),) = ends
    t0 = _grad(prob.inner_loss, w, lam, of="l")
    return {k: vp[k] - sigma * (t0[k] - tp[k]) for k in lam}, {k: sigma * (w[k] - xp[k]) for k in w}


@pytest.mark.parametrize("central", [False, True], ids=["forward", "central"])
def test_matches_its_definition_by_hand(logistic: P.Problem, central: bool) -> None:
    # Logistic: L_T is not quadratic, so every gradient along the path matters. The library tracks
    # the displacement x − w apart from w, the hand version x itself: rounding of ~eps·‖w‖ in x,
    # times σ = 100 in the difference, ~1e-13 relative; 1e-10 is far below any wrong term (≥ 1e-3).
    sigma, steps, lr = 100.0, 7, 0.5 * _alpha(logistic)
    method = hg.FirstOrder(sigma=sigma, steps=steps, lr=lr, central=central)
    g, info = _g(logistic, method)
    want, p = _by_hand(logistic, sigma, steps, lr, central=central)
    assert P.rel_err(g, want) < 1e-10
    assert isinstance(info.state, hg.KrylovState) and info.state.p is not None
    assert P.rel_err(info.state.p, p) < 1e-10
    # The warm start: runs from w ∓ p/σ with the previous p.
    g2, info2 = _g(logistic, method, state=info.state)
    want2, _ = _by_hand(logistic, sigma, steps, lr, central=central, start=p)
    assert P.rel_err(g2, want2) < 1e-10
    assert info2.extra["warm_start"] == 1.0 and "warm_start" not in info.extra
    # the direct term is ∂L_V/∂λ at the run's end (zero here: L_V has no λ) and info.hvps is 0
    assert info.hvps == 0 and info.residual is None and info.iterations == steps
    assert float(tree.norm(info.direct)) == 0.0


def test_one_central_step_is_the_identity(ridge: P.Problem) -> None:
    """steps=1: x± = w ∓ lr·v/σ at w* (∇_wL_T(w*) ~ 1e-16), and ∇_λL_T = ½e^λw² is quadratic in w, so the
    central difference is exact: g = −M(lr·v), hg.Identity(scale=lr), for every σ. Rounding times σ ≤ 1e4:
    1e-11."""
    for sigma in (10.0, 1e2, 1e4):
        g, _ = _g(ridge, hg.FirstOrder(sigma=sigma, steps=1, lr=0.3))
        g_id, _ = _g(ridge, hg.Identity(scale=0.3))
        assert P.rel_err(g, g_id) < 1e-11


def test_rates_in_sigma_and_convergence_to_the_exact_hypergradient(ridge: P.Problem) -> None:
    """At w* of the ridge (closed form), with lr = α = 1/λ_max: FirstOrder(steps=K, lr=α) − Neumann(K, α)
    is O(1/σ) forward and O(1/σ²) central (each tenfold σ divides the error by 10 and by 100), and with
    K = 500 steps (Neumann's truncation below 1e-12 here, cond(H) < 20) the error to the exact
    hypergradient is the σ term alone."""
    a = _alpha(ridge)
    for K in (5, 50):
        neumann, _ = _g(ridge, hg.Neumann(iters=K, alpha=a))
        for central, ratio in ((False, 10.0), (True, 100.0)):
            errs = [
                P.rel_err(_g(ridge, hg.FirstOrder(sigma=s, steps=K, lr=a, central=central))[0], neumann)
                for s in (1e1, 1e2, 1e3)
            ]
            # measured ratios 9.1-10.0 (forward), 100-102 (central): the next order's share
            assert 0.85 * ratio < errs[0] / errs[1] < 1.15 * ratio, errs
            assert 0.85 * ratio < errs[1] / errs[2] < 1.15 * ratio, errs
    exact = ridge.reference
    fwd = [
        P.rel_err(_g(ridge, hg.FirstOrder(sigma=s, steps=500, lr=a, central=False))[0], exact)
        for s in (1e2, 1e3, 1e4)
    ]
    cen = [P.rel_err(_g(ridge, hg.FirstOrder(sigma=s, steps=500, lr=a))[0], exact) for s in (1e2, 1e3, 1e4)]
    assert fwd[0] > fwd[1] > fwd[2] and fwd[2] < 1e-4 < fwd[0]  # measured 8.4e-3, 8.5e-4, 8.5e-5
    assert cen[0] > cen[1] > cen[2] and cen[2] < 1e-7  # measured 1.1e-4, 1.1e-6, 1.1e-8
    # and in the steps, at a fixed σ: the Neumann truncation shrinks to the σ floor
    by_k = [P.rel_err(_g(ridge, hg.FirstOrder(sigma=1e4, steps=K, lr=a))[0], exact) for K in (1, 5, 20, 500)]
    assert by_k[0] > by_k[1] > by_k[2] > 1e-6 > 1e-7 > by_k[3]  # measured 0.43, 5.2e-2, 1.3e-4, 1.1e-8


def test_away_from_a_minimum_only_the_central_form_holds(ridge: P.Problem) -> None:
    """Weights off w* (‖∇_wL_T‖ > 0, as on a fresh minibatch): the forward form's steps drift by −lr·K·g
    and its reference is w, so its error grows with σ (×10 per decade); the central runs drift alike
    and, with steps enough to reach w_{±σ}, give the hypergradient at w*(λ), O(1/σ²) off."""
    a = _alpha(ridge)
    gen = torch.Generator().manual_seed(0)
    w = {"w": ridge.params["w"] + 0.05 * torch.randn(6, generator=gen, dtype=DT)}
    fwd = [
        P.rel_err(_g(ridge, hg.FirstOrder(sigma=s, steps=50, lr=a, central=False), w)[0], ridge.reference)
        for s in (1e1, 1e2, 1e3)
    ]
    cen = [
        P.rel_err(_g(ridge, hg.FirstOrder(sigma=s, steps=50, lr=a), w)[0], ridge.reference)
        for s in (1e1, 1e2, 1e3)
    ]
    assert fwd[0] > 1 and fwd[1] > 9 * fwd[0] and fwd[2] > 9 * fwd[1]  # measured 2.9, 30, 297
    assert cen[2] < 1e-5 and cen[0] > cen[1] > cen[2]  # measured 1e-2, 1e-4, 1e-6


def test_no_second_derivative_through_a_once_differentiable_op() -> None:
    """OnceTanh has no double backward: CG refuses, FirstOrder gives what it gives on the twin with
    torch.tanh (the same first-order gradients: equal to rounding times σ, 1e-10) and, with 1000 steps
    and σ = 1e4, the twin's exact hypergradient (measured 5e-8)."""
    inner_o, outer_o = P.regression(P.OnceTanh.apply)
    inner_t, outer_t = P.regression(torch.tanh)
    w0, lam = P.regression_point()
    ws = P.newton_solve(inner_t, w0, lam)
    with pytest.raises(hg.HypergradientError, match="double backward"):
        hg.hypergradient(outer_o, inner_o, ws, lam, method=hg.CG())
    H, _, _, _ = P.dense_pieces(inner_t, outer_t, ws, lam)
    method = hg.FirstOrder(sigma=1e4, steps=1000, lr=1.0 / float(torch.linalg.eigvalsh(H)[-1]))
    g_once, info = hg.hypergradient(outer_o, inner_o, ws, lam, method=method, return_info=True)
    g_twin = hg.hypergradient(outer_t, inner_t, ws, lam, method=method)
    exact = hg.hypergradient(outer_t, inner_t, ws, lam, method=hg.Exact())
    assert P.rel_err(g_once, g_twin) < 1e-10
    assert P.rel_err(g_once, exact) < 1e-6
    assert info.hvps == 0


@pytest.mark.parametrize("central", [False, True], ids=["forward", "central"])
def test_cost_in_gradient_evaluations_is_reported(ridge: P.Problem, central: bool) -> None:
    """info.extra counts the gradients taken, one per call of the loss (plus, warm-started, one forward
    of L_V at the given weights for info.outer_loss): forward 2K+2 cold and 2K+3 warm, central 4K+2 and
    4K+5."""
    calls = {"inner": 0, "outer": 0}

    def inner(p: Tree, h: Tree) -> Tensor:
        calls["inner"] += 1
        return ridge.inner_loss(p, h)

    def outer(p: Tree, h: Tree) -> Tensor:
        calls["outer"] += 1
        return ridge.outer_loss(p, h)

    K = 6
    method = hg.FirstOrder(sigma=100.0, steps=K, lr=0.1, central=central)
    _, info = hg.hypergradient(outer, inner, ridge.params, ridge.hparams, method=method, return_info=True)
    assert (info.extra["inner_gradients"], info.extra["outer_gradients"]) == (calls["inner"], calls["outer"])
    assert info.extra["gradient_evals"] == (4 * K + 2 if central else 2 * K + 2)
    calls.update(inner=0, outer=0)
    _, info2 = hg.hypergradient(
        outer, inner, ridge.params, ridge.hparams, method=method, return_info=True, state=info.state
    )
    assert info2.extra["inner_gradients"] == calls["inner"]
    assert info2.extra["outer_gradients"] == calls["outer"] - 1  # the forward pass for outer_loss
    assert info2.extra["gradient_evals"] == (4 * K + 5 if central else 2 * K + 3)
    assert info.hvps == info2.hvps == 0
    assert info.outer_loss == pytest.approx(float(ridge.outer_loss(ridge.params, ridge.hparams)), rel=1e-15)
    assert info.grad_norm == pytest.approx(
        float(tree.norm(_grad(ridge.inner_loss, ridge.params, ridge.hparams, of="w"))), rel=1e-12, abs=1e-15
    )


def test_warm_start_state_is_a_value_that_round_trips(ridge: P.Problem) -> None:
    """The state is a KrylovState whose p is σ(w − w_σ) ≈ H⁻¹v: after a converged call, one warm step
    is as good as the converged call (the runs start at w_{±σ}), where one cold step is the identity."""
    a = _alpha(ridge)
    _, info = _g(ridge, hg.FirstOrder(sigma=1e4, steps=500, lr=a))
    st = info.state
    assert isinstance(st, hg.KrylovState) and st.method == "FirstOrder" and st.calls == 1
    p_exact = torch.linalg.solve(ridge.hessian, ridge.v)
    assert P.rel_err({"w": st.p["w"]}, {"w": p_exact}) < 1e-7  # type: ignore[index]
    back = hg.SolverState.from_state_dict(st.state_dict())
    assert isinstance(back, hg.KrylovState) and torch.equal(back.p["w"], st.p["w"])  # type: ignore[index]
    one = hg.FirstOrder(sigma=1e4, steps=1, lr=a)
    warm, info_w = _g(ridge, one, state=back)
    cold, _ = _g(ridge, one)
    assert P.rel_err(warm, ridge.reference) < 1e-7 < P.rel_err(cold, ridge.reference)
    assert info_w.state is not None and info_w.state.calls == 2
    with pytest.raises(hg.StateMismatchError):
        _g(ridge, hg.CG(), state=st)
    with pytest.raises(hg.StateMismatchError):
        _g(ridge, one, state=hg.CGState(method="CG"))


def test_options_are_checked_and_path_hyperparameters_refused(ridge: P.Problem) -> None:
    for bad in (dict(sigma=0.0), dict(sigma=math.inf), dict(lr=-1.0), dict(steps=0), dict(central=1)):
        with pytest.raises(hg.HypergradientError, match=f"FirstOrder.{next(iter(bad))}"):
            hg.FirstOrder(**bad)  # type: ignore[arg-type]
    hp = {**ridge.hparams, "lr": torch.tensor(0.1, dtype=DT)}
    with pytest.raises(hg.PathOnlyHyperparameterError, match="Unrolled"):
        hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=hg.FirstOrder())
    with pytest.raises(hg.HypergradientError, match="lower lr"):  # lr far above 2/λ_max: the steps overflow
        _g(ridge, hg.FirstOrder(lr=1e200, steps=5))


# ------------------------------------------------------------------ HyperOptimizer and fit
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


def _squared_error(out: Tensor, batch: Batch) -> Tensor:
    return (out.squeeze(-1) - batch.y) ** 2


def test_hyper_optimizer_step_reaches_the_closed_form_and_carries_the_state() -> None:
    """Ridge through HyperOptimizer at w*: H = 2XᵀX/n + e^λI (cond ~ 10), so 300 steps at lr = 1/λ_max
    and σ = 1e4 leave ~1e-8 (σ⁻² and truncation); the state is carried and warm-starts the next step."""
    train, val = _data()
    (X, y), (Xv, yv) = train, val
    n, d = X.shape
    lam = math.log(0.3)
    H = 2 / n * X.T @ X + math.exp(lam) * torch.eye(d, dtype=DT)
    w = torch.linalg.solve(H, 2 / n * X.T @ y)
    g_exact = float(2 / len(yv) * Xv.T @ (Xv @ w - yv) @ torch.linalg.solve(H, -math.exp(lam) * w))
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(w[None])
    method = hg.FirstOrder(sigma=1e4, steps=300, lr=1.0 / float(torch.linalg.eigvalsh(H)[-1]))
    hyper = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, init=0.3)],
        method=method,
        loss_fn=_squared_error,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-9),
    )
    res = hyper.step(train, val)
    assert res.applied and res.hypergradient is not None and res.info is not None
    assert float(res.hypergradient["weight_decay"]) == pytest.approx(g_exact, rel=1e-7)
    assert res.metrics()["hvps"] == 0 and res.metrics()["solver_gradient_evals"] == 4 * 300 + 2
    assert isinstance(hyper.solver_state, hg.KrylovState) and hyper.solver_state.method == "FirstOrder"
    res2 = hyper.step(train, val)
    assert res2.info is not None and res2.info.extra["warm_start"] == 1.0
    assert float(res2.hypergradient["weight_decay"]) == pytest.approx(g_exact, rel=1e-6)  # type: ignore[index]


def test_fit_runs_with_first_order_through_a_once_differentiable_model() -> None:
    """fit with a model whose activation has no double backward: the default Neumann refuses, FirstOrder
    trains and tunes (finite metrics, no HVP, the state carried into the checkpoint's solver entry)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(P.OnceTanh.apply(self.a(x)))

    gen = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(64, 4, generator=gen), torch.randn(32, 4, generator=gen)
    y, yv = X[:, :3].argmax(1), Xv[:, :3].argmax(1)
    torch.manual_seed(0)
    model = Net()
    with pytest.raises(hg.HypergradientError, match="double backward"):
        hg.fit(model, [hg.WeightDecay(model)], (X, y), (Xv, yv), rounds=1, inner_steps=2)
    torch.manual_seed(0)
    model = Net()
    fam = hg.WeightDecay(model, init=1e-3)
    res = hg.fit(
        model,
        [fam],
        (X, y),
        (Xv, yv),
        rounds=3,
        inner_steps=5,
        batch_size=32,
        method=hg.FirstOrder(sigma=100.0, steps=3, lr=0.1),
    )
    assert res.hyper_steps == 3 and res.skipped_hyper_steps == 0
    assert all(
        r["hvps"] == 0 and r["solver_gradient_evals"] == (4 * 3 + 2 if i == 0 else 4 * 3 + 5)
        for i, r in enumerate(res.metrics)
    )
    assert all(math.isfinite(r["hypergrad_norm"]) and r["hypergrad_norm"] > 0 for r in res.metrics)
