"""Differentiation through the optimization path, and the Neumann–SGD theorem.

Theorem (Lorraine et al. 2020, Thm. 2, in our conventions): from w* (∇L_T = 0), K unrolled GD
steps of size α give exactly the K-term Neumann hypergradient α Σ_{j<K}(I − αH)^j. Both are the
same sums of the same products in float64, so they agree to rounding: 1e-10 relative allows
K=50 products' accumulated error (~50·cond·eps ≈ 1e-12) with margin.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import hypergradients as hg
import problems as P
from hypergradients.core import tree


@pytest.mark.parametrize("K", [1, 5, 50])
@pytest.mark.parametrize("name", ["ridge", "logistic", "mlp"])
def test_unrolled_from_optimum_equals_neumann(name: str, K: int, request: pytest.FixtureRequest) -> None:
    prob: P.Problem = request.getfixturevalue(name)
    alpha = 1.0 / P.lambda_max(prob)
    gu, info = hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        prob.params,
        prob.hparams,
        method=hg.Unrolled(steps=K, lr=alpha),
        return_info=True,
    )
    gn = hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=hg.Neumann(iters=K, alpha=alpha)
    )
    assert P.rel_err(gu, gn) <= 1e-10
    assert P.rel_err(gu, P.neumann_reference(prob, K, alpha)) <= 1e-10
    # From w*, the weights do not move.
    assert P.rel_err(info.final_params, prob.params) <= 1e-12


def test_unrolled_cold_start_converges_to_ift(ridge: P.Problem) -> None:
    # From w0 = 0, the path matters: the hypergradient converges to the IFT one only as w_K → w*.
    # The ridge Hessian has cond ≈ 3.1 and α = 1/λ_max, so the error decays like (1 − 1/3.1)^K.
    alpha = 1.0 / P.lambda_max(ridge)
    cold = tree.zeros_like(ridge.params)
    errs = []
    for K in (2, 10, 40, 120):
        g = hg.hypergradient(
            ridge.outer_loss, ridge.inner_loss, cold, ridge.hparams, method=hg.Unrolled(steps=K, lr=alpha)
        )
        errs.append(P.rel_err(g, ridge.reference))
    assert all(a > b for a, b in itertools.pairwise(errs))
    assert errs[0] > 0.1 and errs[-1] < 1e-10


def test_unrolled_cold_start_nonquadratic(logistic: P.Problem) -> None:
    alpha = 1.0 / P.lambda_max(logistic)
    cold = tree.zeros_like(logistic.params)
    e_short = P.rel_err(
        hg.hypergradient(
            logistic.outer_loss,
            logistic.inner_loss,
            cold,
            logistic.hparams,
            method=hg.Unrolled(steps=5, lr=alpha),
        ),
        logistic.reference,
    )
    e_long = P.rel_err(
        hg.hypergradient(
            logistic.outer_loss,
            logistic.inner_loss,
            cold,
            logistic.hparams,
            method=hg.Unrolled(steps=1500, lr=alpha),
        ),
        logistic.reference,
    )
    assert e_short > 0.02 and e_long < 1e-8  # measured: 0.048 and far below 1e-8


@pytest.mark.parametrize("T", [1, 7, 30])
def test_truncated_after_convergence_equals_neumann(ridge: P.Problem, T: int) -> None:
    # 150 free steps bring w0 = 0 to w* within (1 − 1/3.1)^150 ≈ 1e-25: then the last T steps
    # are exactly Neumann(T).
    alpha = 1.0 / P.lambda_max(ridge)
    cold = tree.zeros_like(ridge.params)
    gt = hg.hypergradient(
        ridge.outer_loss,
        ridge.inner_loss,
        cold,
        ridge.hparams,
        method=hg.Unrolled(steps=150 + T, lr=alpha, truncate=T),
    )
    assert P.rel_err(gt, P.neumann_reference(ridge, T, alpha)) <= 1e-10


def test_truncate_equal_to_steps_is_full_unrolling(logistic: P.Problem) -> None:
    cold = tree.zeros_like(logistic.params)
    a = hg.hypergradient(
        logistic.outer_loss, logistic.inner_loss, cold, logistic.hparams, method=hg.Unrolled(steps=12, lr=0.3)
    )
    b = hg.hypergradient(
        logistic.outer_loss,
        logistic.inner_loss,
        cold,
        logistic.hparams,
        method=hg.Unrolled(steps=12, lr=0.3, truncate=12),
    )
    assert P.rel_err(a, b) == 0.0


def test_learning_rate_hyperparameter_against_finite_differences(logistic: P.Problem) -> None:
    # The step size named as a hyperparameter gets a real hypergradient, checked by central
    # differences of the K-step map (eps 1e-6: truncation ~1e-12, rounding ~1e-10 relative).
    K = 25
    cold = tree.zeros_like(logistic.params)
    hp = {**logistic.hparams, "lr": torch.tensor(0.5, dtype=torch.float64)}
    g, info = hg.hypergradient(
        logistic.outer_loss,
        logistic.inner_loss,
        cold,
        hp,
        method=hg.Unrolled(steps=K, lr="lr"),
        return_info=True,
    )

    def final_val(lr: float, lam: dict) -> float:
        w = {k: v.clone().requires_grad_(True) for k, v in cold.items()}
        for _ in range(K):
            gr = torch.autograd.grad(logistic.inner_loss(w, lam), list(w.values()))
            w = {
                k: (v - lr * gk).detach().requires_grad_(True)
                for (k, v), gk in zip(w.items(), gr, strict=True)
            }
        return float(logistic.outer_loss(w, lam).detach())

    eps = 1e-6
    fd = (final_val(0.5 + eps, logistic.hparams) - final_val(0.5 - eps, logistic.hparams)) / (2 * eps)
    assert float(g["lr"]) == pytest.approx(fd, rel=1e-6)
    assert float(g["lr"]) != 0.0
    # The same call's λ hypergradient against finite differences in one coordinate.
    lam = logistic.hparams["log_l2"]
    e = torch.zeros_like(lam)
    e[1, 2] = eps
    fd_l = (final_val(0.5, {"log_l2": lam + e}) - final_val(0.5, {"log_l2": lam - e})) / (2 * eps)
    assert float(g["log_l2"][1, 2]) == pytest.approx(fd_l, rel=1e-5)
    assert info.final_params is not None


def test_implicit_methods_refuse_a_learning_rate(logistic: P.Problem) -> None:
    hp = {**logistic.hparams, "lr": torch.tensor(0.5, dtype=torch.float64)}
    for method in (hg.CG(), hg.Neumann(iters=3, alpha=0.1), hg.Exact(), hg.Identity(), hg.Nystrom(rank=2)):
        with pytest.raises(hg.PathOnlyHyperparameterError, match=r"\['lr'\].*hg\.Unrolled"):
            hg.hypergradient(logistic.outer_loss, logistic.inner_loss, logistic.params, hp, method=method)


def test_unrolled_nonfinite_loss_names_the_step(ridge: P.Problem) -> None:
    # A step size far above 2/λ_max blows the iterates up; the error says at which step.
    with pytest.raises(hg.HypergradientError, match=r"unrolled step \d+: inner_loss.*non-finite"):
        hg.hypergradient(
            ridge.outer_loss,
            ridge.inner_loss,
            ridge.params,
            ridge.hparams,
            method=hg.Unrolled(steps=2000, lr=50.0),
        )


# ---------------------------------------------------------------- operations without a second derivative
PATH_METHODS = {
    "gd": hg.Unrolled(steps=4, lr=0.05),
    "adam": hg.Unrolled(steps=4, optimizer=hg.optim.adam(lr=0.01)),
    "checkpointed": hg.Unrolled(steps=4, lr=0.05, checkpoint=2),
    "truncated": hg.Unrolled(steps=4, lr=0.05, truncate=2),
    "forward": hg.Forward(steps=4, lr=0.05),
}


@pytest.mark.parametrize("fn", [P.OnceTanh, P.OnceTanhJvp], ids=["Function", "func-style Function"])
@pytest.mark.parametrize("name", list(PATH_METHODS))
def test_path_methods_refuse_an_op_without_second_derivative(
    name: str, fn: type[torch.autograd.Function]
) -> None:
    """A @once_differentiable backward is skipped by the backward pass through the steps: the
    answer would silently lose that op's curvature (without the check: 1.8e-2 relative off the tanh
    twin with lr=0.05 and 0.26 with Adam, K = 4; hg.Forward ran a torch.func-style Function to a wrong
    answer too and raised torch's error on the other), so every route refuses, naming the op and the
    alternatives."""
    (inner, outer), (inner_twin, outer_twin) = P.regression(fn.apply), P.regression(torch.tanh)
    w, lam = P.regression_point()
    method = PATH_METHODS[name]
    hg.hypergradient(outer_twin, inner_twin, w, lam, method=method)  # the twin runs through
    with pytest.raises(
        hg.HypergradientError,
        match=fn.__name__ + r" \(its backward is @once_differentiable\).*"
        r"second derivative.*finite-difference",
    ):
        hg.hypergradient(outer, inner, w, lam, method=method)


@pytest.mark.parametrize(
    "method",
    [
        hg.Unrolled(steps=2, lr=0.05),
        hg.Unrolled(steps=2, lr=0.05, checkpoint=1),
        hg.Forward(steps=2, lr=0.05),
    ],
    ids=["unrolled", "checkpointed", "forward"],
)
def test_path_methods_name_a_kernel_without_double_backward(method: hg.Method) -> None:
    """The fused CPU attention kernel's double backward (and forward-mode derivative) raise inside
    torch: the library's error names the cause and the twin that works (the MATH backend)."""
    inner, outer = P.attention(True)
    gen = torch.Generator().manual_seed(7)
    w = {k: 0.5 * torch.randn(3, 3, generator=gen, dtype=P.DT) for k in ("Wq", "Wk", "Wv")}
    w["wo"] = 0.5 * torch.randn(3, generator=gen, dtype=P.DT)
    with pytest.raises(hg.HypergradientError, match=r"scaled_dot_product.*(hg\.Unrolled|SDPBackend\.MATH)"):
        hg.hypergradient(outer, inner, w, {"log_l2": torch.tensor(-3.0, dtype=P.DT)}, method=method)
