"""The product layer (:mod:`hypergradients.core.derivatives`) directly: finite-difference products,
their edge cases, and the errors for operations without double backward."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.core.derivatives import InnerDerivatives

Tree = dict[str, Tensor]


def derivatives(prob: P.Problem, mode: str) -> InnerDerivatives:
    return InnerDerivatives(
        prob.inner_loss,
        tree.clone_leaves(prob.params, requires_grad=True),
        tree.clone_leaves(prob.hparams, requires_grad=True),
        hvp_mode=mode,
    )  # type: ignore[arg-type]


def test_zero_direction_costs_nothing(ridge: P.Problem) -> None:
    D = derivatives(ridge, "finite-difference")
    z = tree.zeros_like(ridge.params)
    assert float(tree.norm(D.hvp(z))) == 0.0
    out, used = D.mixed_vjp(z)
    assert float(tree.norm(out)) == 0.0 and used == {"log_l2"}
    assert D.gradient_evals == 0  # no step can be formed from a zero direction, and none is needed


def test_batched_products_are_the_columns_and_the_dense_hessian(ridge: P.Problem) -> None:
    D = derivatives(ridge, "finite-difference")
    op = hg.HessianOperator.of(D)
    n = tree.numel(ridge.params)
    eye = tree.unflatten_rows(torch.eye(n, dtype=P.DT), ridge.params)
    H = torch.cat([t.reshape(n, -1) for t in op.mv_batched(eye).values()], 1)
    # Ridge is quadratic: central differences have no truncation error, only rounding
    # (eps·‖∇L‖/ε ≈ 1e-16/6e-6 per entry, measured 7e-12 on a random v).
    assert (
        float(torch.linalg.matrix_norm(H - ridge.hessian) / torch.linalg.matrix_norm(ridge.hessian)) <= 1e-9
    )
    assert op.hvps == n and D.gradient_evals == 2 * n


def test_reverse_mode_mixed_product_without_double_backward_names_the_fix() -> None:
    # hg.Identity spends no HVP: the only second-order product is the mixed one.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 1, 5, 3, generator=gen, dtype=P.DT)

    def inner(p: Tree, h: Tree) -> Tensor:
        # λ reaches ∂L_T/∂w through the attention (a temperature), so the mixed product must
        # differentiate the kernel's backward; a λ only in the penalty would not touch it.
        q = X @ p["Wq"] * torch.exp(h["log_temp"])
        a = torch.nn.functional.scaled_dot_product_attention(q, X, X)
        return a.pow(2).mean() + 0.1 * p["Wq"].pow(2).sum()

    def outer(p: Tree, h: Tree) -> Tensor:
        return (X @ p["Wq"]).sin().mean()

    w = {"Wq": torch.randn(3, 3, generator=gen, dtype=P.DT)}
    lam = {"log_temp": torch.tensor(-1.0, dtype=P.DT)}
    with pytest.raises(hg.HypergradientError, match=r"not implemented.*hvp_mode=\"finite-difference\""):
        hg.hypergradient(outer, inner, w, lam, method=hg.Identity())
    g = hg.hypergradient(outer, inner, w, lam, method=hg.Identity(), hvp_mode="finite-difference")
    assert torch.isfinite(g["log_temp"])


def test_a_non_finite_loss_at_a_perturbed_point_is_named() -> None:
    def inner(p: Tree, h: Tree) -> Tensor:  # defined for w > 0 only; w* = e^{−λ} ≈ 1.1e-7 here
        return (torch.exp(h["lam"]) * p["w"] - torch.log(p["w"])).sum()

    def outer(p: Tree, h: Tree) -> Tensor:
        return p["w"].sum()

    lam = {"lam": torch.tensor([16.0], dtype=P.DT)}
    w = {"w": torch.exp(-lam["lam"])}
    # ε‖v‖ = ∛eps·(1 + ‖w‖) ≈ 6e-6 ≫ w*: w − εv < 0, where log is NaN.
    with pytest.raises(
        hg.HypergradientError,
        match=r"returned a non-finite value \(nan\) at a finite-difference "
        r"point w ± εd",
    ):
        hg.hypergradient(outer, inner, w, lam, method=hg.Exact(), hvp_mode="finite-difference")
