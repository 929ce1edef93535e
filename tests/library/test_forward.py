"""``hg.Forward``: forward-mode differentiation through the optimization path.

Forward and reverse mode compute the same chain rule, ``dL_V/dλ = ∂L_V/∂λ + ∂L_V/∂w_K ∂w_K/∂λ``,
one as Jacobian-vector products pushed forward and the other as vector-Jacobian products pulled
back; in float64 they agree to rounding (~K·eps·cond ≈ 1e-14 here); the tests allow 1e-12.
From w* the theorem (test_unroll.py) makes both the K-term Neumann hypergradient.
"""

from __future__ import annotations

import pytest
import torch

import hypergradients as hg
import problems as P
from hypergradients.core import tree

TOL = 1e-12


def perturbed_start(prob: P.Problem, scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in prob.params.items()}


@pytest.mark.parametrize("K", [1, 8])
@pytest.mark.parametrize("name", ["ridge", "logistic", "mlp"])
def test_forward_equals_reverse(name: str, K: int, request: pytest.FixtureRequest) -> None:
    prob: P.Problem = request.getfixturevalue(name)
    w0 = perturbed_start(prob)
    alpha = 0.5 / P.lambda_max(prob)
    rev, ir = hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        w0,
        prob.hparams,
        method=hg.Unrolled(steps=K, lr=alpha),
        return_info=True,
    )
    fwd, info = hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        w0,
        prob.hparams,
        method=hg.Forward(steps=K, lr=alpha),
        return_info=True,
    )
    assert tree.norm(rev) > 0
    assert P.rel_err(fwd, rev) <= TOL
    assert info.method == "Forward" and info.iterations == K
    assert info.hvps == K * tree.numel(prob.hparams)  # one JVP per step per hyperparameter scalar
    assert info.outer_loss == pytest.approx(ir.outer_loss, rel=1e-14)
    assert P.rel_err(info.final_params, ir.final_params) <= 1e-14
    assert all(fwd[k].shape == prob.hparams[k].shape and fwd[k].dtype == torch.float64 for k in fwd)


@pytest.mark.parametrize("name", ["ridge", "mlp"])
def test_forward_from_optimum_is_neumann(name: str, request: pytest.FixtureRequest) -> None:
    # Theorem 2: from w*, K forward-differentiated GD steps give α Σ_{j<K}(I − αH)^j exactly.
    prob: P.Problem = request.getfixturevalue(name)
    alpha = 1.0 / P.lambda_max(prob)
    g = hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=hg.Forward(steps=20, lr=alpha)
    )
    assert P.rel_err(g, P.neumann_reference(prob, 20, alpha)) <= 1e-10


def test_forward_long_path_reaches_ift(ridge: P.Problem) -> None:
    # From w0 = 0 the path converges to w* and the forward hypergradient to the closed form:
    # cond(H) ≈ 3.1, α = 1/λ_max, so after 80 steps the error is ~(1 − 1/3.1)^80 ≈ 3e-14.
    alpha = 1.0 / P.lambda_max(ridge)
    g = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        tree.zeros_like(ridge.params),
        ridge.hparams,
        method=hg.Forward(steps=80, lr=alpha),
    )
    assert P.rel_err(g, ridge.reference) <= 1e-10


def test_forward_learning_rate_and_truncation(logistic: P.Problem) -> None:
    w0 = perturbed_start(logistic)
    hp = {**logistic.hparams, "lr": torch.tensor(0.4, dtype=torch.float64)}
    for T in (None, 3):
        rev = hg.hypergradient(
            logistic.outer_loss, logistic.inner_loss, w0, hp, method=hg.Unrolled(steps=6, lr="lr", truncate=T)
        )
        fwd = hg.hypergradient(
            logistic.outer_loss, logistic.inner_loss, w0, hp, method=hg.Forward(steps=6, lr="lr", truncate=T)
        )
        assert float(fwd["lr"]) != 0.0
        assert P.rel_err(fwd, rev) <= TOL


def test_forward_learning_rate_against_finite_differences(ridge: P.Problem) -> None:
    # Only the step size as hyperparameter: central differences of the K-step map with eps=1e-6
    # (truncation O(eps²) ≈ 1e-12, rounding ~eps_mach/eps ≈ 1e-10 relative).
    w0 = perturbed_start(ridge)
    K = 10

    def final_val(lr: float) -> float:
        w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
        for _ in range(K):
            gr = torch.autograd.grad(ridge.inner_loss(w, ridge.hparams), list(w.values()))
            w = {
                k: (v - lr * gk).detach().requires_grad_(True)
                for (k, v), gk in zip(w.items(), gr, strict=True)
            }
        return float(ridge.outer_loss(w, ridge.hparams).detach())

    # log_l2 stays a hyperparameter too (it is used): both get a derivative, checked is lr.
    hp = {**ridge.hparams, "lr": torch.tensor(0.3, dtype=torch.float64)}
    g = hg.hypergradient(ridge.outer_loss, ridge.inner_loss, w0, hp, method=hg.Forward(steps=K, lr="lr"))
    eps = 1e-6
    fd = (final_val(0.3 + eps) - final_val(0.3 - eps)) / (2 * eps)
    assert float(g["lr"]) == pytest.approx(fd, rel=1e-7)


def test_forward_chunking_does_not_change_the_result(logistic: P.Problem) -> None:
    w0 = perturbed_start(logistic)
    a = hg.hypergradient(
        logistic.outer_loss,
        logistic.inner_loss,
        w0,
        logistic.hparams,
        method=hg.Forward(steps=4, lr=0.3, chunk=None),
    )
    b = hg.hypergradient(
        logistic.outer_loss,
        logistic.inner_loss,
        w0,
        logistic.hparams,
        method=hg.Forward(steps=4, lr=0.3, chunk=4),
    )
    assert P.rel_err(a, b) <= TOL


def test_forward_does_not_mutate_inputs(ridge: P.Problem) -> None:
    w0 = perturbed_start(ridge)
    before_w = {k: v.clone() for k, v in w0.items()}
    before_h = {k: v.clone() for k, v in ridge.hparams.items()}
    hg.hypergradient(
        ridge.outer_loss, ridge.inner_loss, w0, ridge.hparams, method=hg.Forward(steps=3, lr=0.1)
    )
    assert all(torch.equal(w0[k], before_w[k]) for k in w0)
    assert all(torch.equal(ridge.hparams[k], before_h[k]) for k in before_h)


def test_forward_unused_hyperparameter_warns(ridge: P.Problem) -> None:
    hp = {**ridge.hparams, "ghost": torch.tensor(1.0, dtype=torch.float64)}
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"\['ghost'\]"):
        g = hg.hypergradient(
            ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=hg.Forward(steps=2, lr=0.1)
        )
    assert float(g["ghost"]) == 0.0


def test_forward_validation(ridge: P.Problem) -> None:
    with pytest.raises(hg.HypergradientError, match=r"Forward\.steps must be a positive integer, got 0"):
        hg.Forward(steps=0)
    with pytest.raises(hg.HypergradientError, match=r"Forward\.truncate=9 exceeds steps=3"):
        hg.Forward(steps=3, truncate=9)
    with pytest.raises(hg.HypergradientError, match=r"Forward\.lr must be a finite number > 0, got -1"):
        hg.Forward(steps=3, lr=-1.0)
    with pytest.raises(hg.HypergradientError, match=r"Forward\.chunk must be a positive integer"):
        hg.Forward(steps=3, chunk=0)
    with pytest.raises(hg.HypergradientError, match=r"names a hyperparameter that is not in hparams"):
        hg.hypergradient(
            ridge.outer_loss,
            ridge.inner_loss,
            ridge.params,
            ridge.hparams,
            method=hg.Forward(steps=2, lr="eta"),
        )


def test_forward_with_optimizer_state_keeps_no_state_per_step(
    ridge: P.Problem, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory independent of K: of the optimizer states met on the primal path, forward mode keeps
    # only the step counts (each tensor replaced by one shared empty marker), not K copies of
    # Adam's moments. Every state template it builds must hold nothing but empty tensors.
    from hypergradients.paths import unroll

    built: list[object] = []
    real = unroll.with_tensors

    def spy(template: object, tensors: list[torch.Tensor]) -> object:
        out = real(template, tensors)
        built.append(out)
        return out

    monkeypatch.setattr(unroll, "with_tensors", spy)
    K = 6
    g = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        perturbed_start(ridge),
        ridge.hparams,
        method=hg.Forward(steps=K, optimizer=hg.optim.adam(lr=0.01)),
    )
    templates = [t for t in built if all(x.numel() == 0 for x in unroll.tensors_of(t))]
    assert len(templates) == K and all(unroll.tensors_of(t) for t in templates)
    steps = sorted(t.steps for t in templates if isinstance(t, hg.optim.AdamState))
    assert steps == list(range(K))
    ref = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        perturbed_start(ridge),
        ridge.hparams,
        method=hg.Unrolled(steps=K, optimizer=hg.optim.adam(lr=0.01)),
    )
    assert P.rel_err(g, ref) <= TOL


# ---------------------------------------------------------------- forward-mode AD failures are named
def _mse_problem(written_out: bool) -> tuple[P.Loss, P.Loss, P.Tree, P.Tree]:
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(20, 3, generator=gen, dtype=P.DT), torch.randn(20, generator=gen, dtype=P.DT)
    Xv, yv = torch.randn(10, 3, generator=gen, dtype=P.DT), torch.randn(10, generator=gen, dtype=P.DT)

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b) ** 2).mean() if written_out else torch.nn.functional.mse_loss(a, b)

    def inner(p: P.Tree, h: P.Tree) -> torch.Tensor:
        return mse(torch.tanh(X @ p["w"]), y) + torch.exp(h["l"]) * torch.sum(p["w"] ** 2)

    def outer(p: P.Tree, h: P.Tree) -> torch.Tensor:
        return mse(torch.tanh(Xv @ p["w"]), yv)

    return (
        inner,
        outer,
        {"w": torch.randn(3, generator=gen, dtype=P.DT)},
        {"l": torch.tensor(-1.0, dtype=P.DT)},
    )


@pytest.mark.parametrize("route", ["Forward", "hvp_mode=forward"])
def test_mse_loss_forward_mode_bug_is_named_with_its_workaround(route: str) -> None:
    """F.mse_loss with reduction="mean" makes torch's forward-over-reverse raise "ZeroTensors are
    immutable" (a PyTorch bug): the error says so and gives the written-out loss, which works and,
    in the same arithmetic, gives reverse mode's answer (1e-12 as in the rest of this file)."""
    kw: dict = (
        {"method": hg.Forward(steps=3, lr=0.1)}
        if route == "Forward"
        else {"method": hg.CG(tol=1e-14), "hvp_mode": "forward"}
    )
    inner, outer, w, lam = _mse_problem(written_out=False)
    with pytest.raises(
        hg.HypergradientError,
        match=r"ZeroTensors are immutable.*known PyTorch bug.*F\.mse_loss"
        r".*\(\(a - b\) \*\* 2\)\.mean\(\)",
    ):
        hg.hypergradient(outer, inner, w, lam, **kw)
    inner2, outer2, _, _ = _mse_problem(written_out=True)
    got = hg.hypergradient(outer2, inner2, w, lam, **kw)
    reverse = {"method": hg.Unrolled(steps=3, lr=0.1)} if route == "Forward" else {"method": hg.CG(tol=1e-14)}
    assert P.rel_err(got, hg.hypergradient(outer, inner, w, lam, **reverse)) <= TOL
