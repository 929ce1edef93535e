"""Every error path of the core call, asserted on its message (the message is the user's fix)."""

from __future__ import annotations

import warnings

import pytest
import torch

import hypergradients as hg
import problems as P

DT = torch.float64


def call(prob: P.Problem, method: hg.Method, **kw: object) -> dict:
    return hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        prob.params,
        prob.hparams,  # type: ignore[call-overload,no-any-return]
        method=method,
        **kw,
    )


def test_neumann_divergence_names_lambda_max_and_a_safe_alpha(logistic: P.Problem) -> None:
    lam_max = P.lambda_max(logistic)
    with pytest.raises(
        hg.NeumannDivergenceError, match=r"diverged at term \d+.*λ_max\(H\) ≈ .*alpha='auto'"
    ) as e:
        call(logistic, hg.Neumann(iters=60, alpha=3.0 / lam_max))
    # The reported estimate is a power-iteration one: within 10% of the true λ_max here.
    assert e.value.lambda_max == pytest.approx(lam_max, rel=0.1)
    assert e.value.safe_alpha == pytest.approx(1.0 / e.value.lambda_max)
    assert "≥ 2" in str(e.value)


def test_neumann_divergence_on_negative_curvature() -> None:
    # An indefinite quadratic: (I − αH) has an eigenvalue 1 + α·0.5 > 1 for any α > 0.
    A = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=DT))
    B = torch.eye(3, dtype=DT)

    def inner(p: dict, h: dict) -> torch.Tensor:
        return 0.5 * p["w"] @ (A @ p["w"]) - p["w"] @ (B @ h["lam"])

    def outer(p: dict, h: dict) -> torch.Tensor:
        return 0.5 * torch.sum((p["w"] - 1.0) ** 2)

    params = {"w": torch.zeros(3, dtype=DT)}
    hp = {"lam": torch.ones(3, dtype=DT)}
    with pytest.raises(hg.NeumannDivergenceError, match="negative curvature"):
        hg.hypergradient(outer, inner, params, hp, method=hg.Neumann(iters=200, alpha=0.4))
    with pytest.raises(
        hg.NegativeCurvatureError, match=r"non-positive curvature dᵀHd/dᵀd = -0\.\d+ at iteration \d.*damping"
    ) as e:
        hg.hypergradient(outer, inner, params, hp, method=hg.CG(iters=10))
    # A Rayleigh quotient of H: between λ_min = -0.5 and 0.
    assert -0.5 <= e.value.curvature < 0
    with pytest.raises(hg.NegativeCurvatureError, match="not positive definite"):
        hg.hypergradient(outer, inner, params, hp, method=hg.Nystrom(rank=3))
    # Damping that outweighs the negative curvature makes CG well posed again.
    g = hg.hypergradient(outer, inner, params, hp, method=hg.CG(iters=10, damping=1.0))
    assert torch.isfinite(g["lam"]).all()


def test_exact_refuses_above_its_size_limit(logistic: P.Problem) -> None:
    with pytest.raises(hg.ProblemTooLargeError, match=r"18×18 Hessian.*max_size=10.*hg\.CG"):
        call(logistic, hg.Exact(max_size=10))


def test_exact_on_a_singular_hessian_says_so() -> None:
    def inner(p: dict, h: dict) -> torch.Tensor:  # 'v' does not enter L_T: H is singular
        return torch.exp(h["l"]) * torch.sum(p["w"] ** 2)

    def outer(p: dict, h: dict) -> torch.Tensor:
        return torch.sum(p["w"]) + torch.sum(p["v"])

    params = {"w": torch.ones(2, dtype=DT), "v": torch.ones(2, dtype=DT)}
    with pytest.raises(hg.HypergradientError, match=r"singular.*damping"):
        hg.hypergradient(outer, inner, params, {"l": torch.tensor(0.0, dtype=DT)}, method=hg.Exact())


def test_unused_hyperparameter_gets_zero_and_a_warning(ridge: P.Problem) -> None:
    hp = {**ridge.hparams, "unused": torch.ones(3, dtype=DT)}
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"\['unused'\].*zero.*hg\.Unrolled"):
        g = hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=hg.CG())
    assert torch.equal(g["unused"], torch.zeros(3, dtype=DT))
    assert P.rel_err({"log_l2": g["log_l2"]}, ridge.reference) < 1e-8
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"\['unused'\]"):
        g = hg.hypergradient(
            ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=hg.Unrolled(steps=3, lr=0.1)
        )
    assert torch.equal(g["unused"], torch.zeros(3, dtype=DT))


def test_unrolled_accepts_a_learning_rate_without_warning(ridge: P.Problem) -> None:
    hp = {**ridge.hparams, "lr": torch.tensor(0.1, dtype=DT)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = hg.hypergradient(
            ridge.outer_loss, ridge.inner_loss, ridge.params, hp, method=hg.Unrolled(steps=4, lr="lr")
        )
    assert float(g["lr"]) != 0.0


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: hg.CG(iters=0), r"CG\.iters must be a positive integer, got 0"),
        (lambda: hg.CG(tol=-1.0), r"CG\.tol must be a finite number >= 0"),
        (lambda: hg.Neumann(iters=-3), r"Neumann\.iters must be a positive integer, got -3"),
        (lambda: hg.Neumann(alpha=0.0), r"Neumann\.alpha must be a finite number > 0 or 'auto', got 0\.0"),
        (lambda: hg.Neumann(alpha="fast"), r"Neumann\.alpha .* got 'fast'"),  # type: ignore[arg-type]
        (lambda: hg.Exact(max_size=0), r"Exact\.max_size must be a positive integer"),
        (lambda: hg.Identity(scale=float("nan")), r"Identity\.scale must be a finite number"),
        (lambda: hg.Nystrom(rank=0), r"Nystrom\.rank must be a positive integer"),
        (lambda: hg.Nystrom(rho=-1.0), r"Nystrom\.rho must be > 0 or None"),
        (lambda: hg.Unrolled(steps=0), r"Unrolled\.steps must be a positive integer"),
        (lambda: hg.Unrolled(lr=-0.1), r"Unrolled\.lr must be a finite number > 0"),
        (lambda: hg.Unrolled(steps=5, truncate=6), r"truncate=6 exceeds steps=5"),
    ],
)
def test_bad_method_settings_are_refused(make: object, pattern: str) -> None:
    with pytest.raises(hg.HypergradientError, match=pattern):
        make()  # type: ignore[operator]


def test_bad_inputs_are_refused(ridge: P.Problem) -> None:
    o, i, w, h = ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams
    with pytest.raises(hg.HypergradientError, match=r"params must be a dict\[str, Tensor\]"):
        hg.hypergradient(o, i, [w["w"]], h)  # type: ignore[arg-type]
    with pytest.raises(hg.HypergradientError, match=r"hparams is empty"):
        hg.hypergradient(o, i, w, {})
    with pytest.raises(hg.HypergradientError, match=r"hparams\['n'\] must be a floating-point tensor"):
        hg.hypergradient(o, i, w, {"n": torch.tensor(3)})
    with pytest.raises(hg.HypergradientError, match=r"params\['w'\] must be a torch\.Tensor, got list"):
        hg.hypergradient(o, i, {"w": [1.0]}, h)  # type: ignore[dict-item]
    with pytest.raises(hg.HypergradientError, match="method must be one of"):
        hg.hypergradient(o, i, w, h, method="cg")  # type: ignore[call-overload]
    with pytest.raises(
        hg.HypergradientError, match=r"Unrolled\(lr='eta'\) names a hyperparameter that is not"
    ):
        hg.hypergradient(o, i, w, h, method=hg.Unrolled(steps=2, lr="eta"))


def test_bad_losses_are_refused(ridge: P.Problem) -> None:
    w, h = ridge.params, ridge.hparams
    vec_loss = lambda p, q: p["w"] ** 2  # noqa: E731
    with pytest.raises(
        hg.HypergradientError, match=r"inner_loss\(params, hparams\) must return a scalar.*\(6,\)"
    ):
        hg.hypergradient(ridge.outer_loss, vec_loss, w, h)
    with pytest.raises(
        hg.HypergradientError, match=r"outer_loss\(params, hparams\) must return a torch\.Tensor"
    ):
        hg.hypergradient(lambda p, q: 1.0, ridge.inner_loss, w, h)  # type: ignore[arg-type,return-value]
    nan_loss = lambda p, q: ridge.inner_loss(p, q) * float("nan")  # noqa: E731
    with pytest.raises(
        hg.HypergradientError, match=r"inner_loss\(params, hparams\) returned a non-finite value"
    ):
        hg.hypergradient(ridge.outer_loss, nan_loss, w, h)
