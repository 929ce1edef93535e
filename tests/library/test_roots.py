"""``root_hypergradient``: any optimality condition ``F(w, λ) = 0`` or fixed point ``w = T(w, λ)``.

References in float64: the library's ``hypergradient`` when ``F = ∂L_T/∂w``, closed forms (a
linear fixed point, the lasso on its active set) and central finite differences of
``λ ↦ L_V(w*(λ), λ)`` with ``w*`` re-solved to machine precision for every perturbed ``λ``.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import hypergradients as hg
import problems as P
from hypergradients.core import tree

DT = torch.float64
Tree = dict[str, Tensor]
ALL_METHODS: dict[str, Any] = {
    "gmres": hg.GMRES(tol=1e-13),
    "gmres_restart3": hg.GMRES(tol=1e-13, restart=3, iters=500),
    "bicgstab": hg.BiCGStab(tol=1e-13),
    "normal_cg": hg.NormalCG(tol=1e-13, iters=500),
    "exact": hg.Exact(),
}


def central_differences(value: Callable[[Tree], Tensor], hparams: Tree, eps: float) -> Tree:
    flat = tree.flatten(hparams)
    out = torch.zeros_like(flat)
    for i in range(flat.numel()):
        vals = []
        for sgn in (1.0, -1.0):
            lp = flat.clone()
            lp[i] += sgn * eps
            vals.append(value(tree.unflatten(lp, hparams)))
        out[i] = (vals[0] - vals[1]) / (2 * eps)
    return tree.unflatten(out, hparams)


# ---------------------------------------------------------------- F = ∂L_T/∂w is hg.hypergradient
def gradient_condition(inner: Callable[[Tree, Tree], Tensor]) -> Callable[[Tree, Tree], Tree]:
    def F(p: Tree, h: Tree) -> Tree:
        g = torch.autograd.grad(inner(p, h), list(p.values()), create_graph=True)
        return dict(zip(p, g, strict=True))

    return F


def test_gradient_condition_reduces_to_hypergradient(problem: P.Problem) -> None:
    F = gradient_condition(problem.inner_loss)
    args = (problem.params, problem.hparams)
    for root_m, lib_m, tol in [
        # Same dense solve of the same (symmetric) matrix, built by VJPs of ∂L_T/∂w instead of HVPs:
        # equal up to rounding amplified by cond(H) (≤ 1e3 on these problems): 1e-12 (measured ≤ 4e-16).
        (hg.Exact(), hg.Exact(), 1e-12),
        # The same K-term series with the same α and arithmetic: rounding only (measured: equal bit
        # for bit), also with alpha="auto" (1/λ_max by the same seeded power iteration).
        (hg.Neumann(iters=15, alpha=0.1), hg.Neumann(iters=15, alpha=0.1), 1e-12),
        (hg.Neumann(iters=15), hg.Neumann(iters=15), 1e-12),
        # Two different Krylov solvers, both to relative residual 1e-13: their error ≤ cond(H)·1e-13
        # (measured ≤ 8.4e-16).
        (hg.GMRES(tol=1e-13), hg.CG(tol=1e-13, iters=200), 1e-9),
    ]:
        got = hg.root_hypergradient(problem.outer_loss, F, *args, method=root_m)
        ref = hg.hypergradient(problem.outer_loss, problem.inner_loss, *args, method=lib_m)
        assert P.rel_err(got, ref) <= tol, (problem.name, root_m, P.rel_err(got, ref))
    assert P.rel_err(hg.root_hypergradient(problem.outer_loss, F, *args), problem.reference) <= 1e-8


# ---------------------------------------------------------------- a deep-equilibrium layer
class DEQ:
    """``z = tanh(s·W z + U x + b)`` for 3 inputs x: a contraction since ‖s·W‖₂ = 0.4·s < 1 and
    |tanh'| ≤ 1. Hyperparameters U, b and the scale s; ``L_V = ½‖z − y‖² + 0.05‖b‖²`` (a direct term)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(11)
        W = torch.randn(6, 6, generator=gen, dtype=DT)
        self.W = 0.4 * W / torch.linalg.matrix_norm(W, 2)
        self.x = torch.randn(3, 4, generator=gen, dtype=DT)
        self.y = 0.5 * torch.randn(3, 6, generator=gen, dtype=DT)
        self.hparams = {
            "U": torch.randn(6, 4, generator=gen, dtype=DT) / 2,
            "b": torch.randn(6, generator=gen, dtype=DT) / 2,
            "s": torch.tensor(1.2, dtype=DT),
        }

    def T(self, p: Tree, h: Tree, act: Callable[[Tensor], Tensor] = torch.tanh) -> Tree:
        return {"z": act(h["s"] * p["z"] @ self.W.T + self.x @ h["U"].T + h["b"])}

    def solve(self, h: Tree) -> Tree:
        z = {"z": torch.zeros(3, 6, dtype=DT)}
        for _ in range(200):  # rate ≤ 0.48 per step: 200 steps reach the fixed point to rounding
            z = self.T(z, h)
        return z

    def outer(self, p: Tree, h: Tree) -> Tensor:
        return 0.5 * torch.sum((p["z"] - self.y) ** 2) + 0.05 * torch.sum(h["b"] ** 2)


@pytest.fixture(scope="module")
def deq() -> tuple[DEQ, Tree, Tree]:
    m = DEQ()
    # Central differences: truncation O(ε²) ~ 1e-10 and rounding O(1e-16/ε) ~ 1e-11 at ε = 1e-5, the
    # fixed point exact to rounding; so the reference is good to ~1e-9 relative.
    fd = central_differences(lambda h: m.outer(m.solve(h), h), m.hparams, 1e-5)
    return m, m.solve(m.hparams), fd


@pytest.mark.parametrize("name", [*ALL_METHODS, "neumann"])
def test_deq_fixed_point_matches_finite_differences(deq: tuple[DEQ, Tree, Tree], name: str) -> None:
    m, z, fd = deq
    method = hg.Neumann(iters=60, alpha=1.0) if name == "neumann" else ALL_METHODS[name]
    g, info = hg.root_hypergradient(
        m.outer, m.T, z, m.hparams, fixed_point=True, method=method, return_info=True
    )
    assert P.rel_err(g, fd) <= 1e-7, (name, P.rel_err(g, fd))  # the reference's ~1e-9, with margin
    assert info.condition_norm <= 1e-13 and info.residual is not None and info.residual <= 1e-12
    assert info.vjps >= info.iterations and (info.jvps > 0) == (name == "normal_cg")


def test_deq_as_a_root_in_either_sign_and_without_double_backward(deq: tuple[DEQ, Tree, Tree]) -> None:
    m, z, fd = deq

    def F(p: Tree, h: Tree) -> Tree:  # T(z) − z: the convention of the problem statement
        return {"z": m.T(p, h)["z"] - p["z"]}

    def G(p: Tree, h: Tree) -> Tree:  # −F: the hypergradient does not depend on the sign
        return {"z": p["z"] - m.T(p, h)["z"]}

    for cond in (F, G):
        assert P.rel_err(hg.root_hypergradient(m.outer, cond, z, m.hparams), fd) <= 1e-7

    # The map through an op whose backward is first-order only (tests/library/problems.py): GMRES needs
    # one VJP of T per product, never a second derivative.
    def T_once(p: Tree, h: Tree) -> Tree:
        return m.T(p, h, act=P.OnceTanh.apply)

    assert P.rel_err(hg.root_hypergradient(m.outer, T_once, z, m.hparams, fixed_point=True), fd) <= 1e-7


# ---------------------------------------------------------------- the lasso by proximal gradient
class Lasso:
    """``min_w ½‖Xw − y‖²/m + Σ_j λ_j |w_j|`` by ISTA: ``w = S(w − η∇f(w), ηλ)``, ``S`` soft thresholding.

    On the active set S (w_j ≠ 0) the optimality condition is ``Q_SS w_S = c_S − λ_S ∘ sign(w_S)``
    (``Q = XᵀX/m``, ``c = Xᵀy/m``), so ``∂w_S/∂λ_j = −Q_SS⁻¹ e_j sign(w_j)`` for j ∈ S and ``w`` does
    not move with an inactive λ_j: ``dL_V/dλ_j = −sign(w_j)(Q_SS⁻¹ ∇_S L_V)_j`` on S, 0 off it.
    """

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(12)
        self.X = torch.randn(60, 8, generator=gen, dtype=DT)
        w_true = torch.tensor([2.0, -1.5, 1.0, 0.0, 0.0, 0.8, 0.0, 0.0], dtype=DT)
        self.y = self.X @ w_true + 0.3 * torch.randn(60, generator=gen, dtype=DT)
        self.Xv = torch.randn(40, 8, generator=gen, dtype=DT)
        self.yv = self.Xv @ w_true + 0.3 * torch.randn(40, generator=gen, dtype=DT)
        self.Q = self.X.T @ self.X / 60
        self.eta = 1.0 / float(torch.linalg.eigvalsh(self.Q)[-1])
        self.hparams = {"lam": torch.full((8,), 0.15, dtype=DT)}

    def T(self, p: Tree, h: Tree) -> Tree:
        w = p["w"]
        z = w - self.eta * (self.X.T @ (self.X @ w - self.y) / 60)
        return {"w": torch.sign(z) * torch.relu(z.abs() - self.eta * h["lam"])}

    def solve(self, h: Tree) -> Tree:
        w = {"w": torch.zeros(8, dtype=DT)}
        for _ in range(1000):  # ISTA's rate 1 − μ/L ≈ 0.8 on this Q: converged to rounding
            w = self.T(w, h)
        return w

    def outer(self, p: Tree, h: Tree) -> Tensor:
        return 0.5 * torch.sum((self.Xv @ p["w"] - self.yv) ** 2) / 40


def test_lasso_matches_the_active_set_closed_form_and_finite_differences() -> None:
    m = Lasso()
    w = m.solve(m.hparams)["w"]
    S = w != 0
    z = w - m.eta * (m.X.T @ (m.X @ w - m.y) / 60)
    # A robust active set: active weights far from 0 and inactive ones far inside the threshold,
    # so that ±ε in λ (ε·‖∂w/∂λ‖ ~ 1e-4) cannot change it.
    assert 2 <= int(S.sum()) <= 6
    assert float(w[S].abs().min()) > 1e-2 and float((m.eta * 0.15 - z[~S].abs()).min()) > 1e-3
    vS = (m.Xv.T @ (m.Xv @ w - m.yv) / 40)[S]
    closed = torch.zeros(8, dtype=DT)
    closed[S] = -torch.sign(w[S]) * torch.linalg.solve(m.Q[S][:, S], vS)
    # λ ↦ L_V(w*(λ)) is quadratic while the active set holds: central differences are exact up to
    # rounding, ~1e-16/ε = 1e-12 at ε = 1e-4, and ISTA's solution is exact to rounding.
    fd = central_differences(lambda h: m.outer(m.solve(h), h), m.hparams, 1e-4)
    assert P.rel_err(fd, {"lam": closed}) <= 1e-8
    for name, method in [*ALL_METHODS.items(), ("neumann", hg.Neumann(iters=300, alpha=1.0))]:
        g = hg.root_hypergradient(m.outer, m.T, {"w": w}, m.hparams, fixed_point=True, method=method)
        # The Jacobian D(I − ηQ) (D the active mask) is non-symmetric; every solver to 1e-13.
        assert P.rel_err(g, {"lam": closed}) <= 1e-10, (name, P.rel_err(g, {"lam": closed}))
        assert torch.all(g["lam"][~S] == 0)  # exactly: an inactive λ_j does not enter T near w*


# ---------------------------------------------------------------- a linear fixed point, contraction or not
def linear_fixed_point(norm: float) -> tuple[Callable[..., Tree], Callable[..., Tensor], Tree, Tree, Tree]:
    """``w = W w + Bλ`` (non-symmetric W): ``w* = (I − W)⁻¹Bλ``; ``L_V = ½‖w − t‖²`` gives
    ``dL_V/dλ = Bᵀ(I − W)⁻ᵀ(w* − t)``."""
    gen = torch.Generator().manual_seed(13)
    W = torch.randn(10, 10, generator=gen, dtype=DT)
    W = norm * W / torch.linalg.eigvals(W).abs().max()  # spectral radius = norm
    B = torch.randn(10, 3, generator=gen, dtype=DT)
    t = torch.randn(10, generator=gen, dtype=DT)
    lam = {"lam": torch.randn(3, generator=gen, dtype=DT)}
    A = torch.eye(10, dtype=DT) - W
    ws = torch.linalg.solve(A, B @ lam["lam"])
    ref = {"lam": B.T @ torch.linalg.solve(A.T, ws - t)}
    return (
        (lambda p, h: {"w": W @ p["w"] + B @ h["lam"]}),
        (lambda p, h: 0.5 * torch.sum((p["w"] - t) ** 2)),
        {"w": ws},
        lam,
        ref,
    )


def test_neumann_detects_a_map_that_is_not_a_contraction_where_gmres_works() -> None:
    T, outer, w, lam, ref = linear_fixed_point(norm=1.5)
    with pytest.raises(hg.NeumannDivergenceError, match="not a contraction") as e:
        hg.root_hypergradient(outer, T, w, lam, fixed_point=True, method=hg.Neumann(iters=50))
    assert e.value.lambda_max > 0
    for name, method in ALL_METHODS.items():
        g, info = hg.root_hypergradient(outer, T, w, lam, fixed_point=True, method=method, return_info=True)
        if name == "gmres_restart3":
            # I − W is indefinite and non-normal here: GMRES restarted every 3 steps stagnates
            # (measured residual 0.99 after 500 VJPs), and says so rather than pretending.
            assert not info.converged and info.residual is not None and info.residual > 0.5
            continue
        assert P.rel_err(g, ref) <= 1e-10, name  # a 10×10 system, cond(I − W) ≈ 30, residual 1e-13
    T, outer, w, lam, ref = linear_fixed_point(norm=0.5)
    g, info = hg.root_hypergradient(
        outer, T, w, lam, fixed_point=True, method=hg.Neumann(iters=80), return_info=True
    )
    # α = 1 for a fixed point (auto); the tail of the series is ρ^80 = 0.5^80 ≈ 1e-24 (times the
    # non-normality of W): rounding only.
    assert info.extra["alpha"] == 1.0 and P.rel_err(g, ref) <= 1e-12


# ---------------------------------------------------------------- errors and warnings
def test_bad_inputs_are_named(ridge: P.Problem) -> None:
    F = gradient_condition(ridge.inner_loss)
    args = (ridge.outer_loss, F, ridge.params, ridge.hparams)
    with pytest.raises(hg.HypergradientError, match=r"symmetric positive-definite.*hg\.GMRES"):
        hg.root_hypergradient(*args, method=hg.CG())  # type: ignore[arg-type]
    with pytest.raises(hg.HypergradientError, match=r"must return a dict with the keys of params \['w'\]"):
        hg.root_hypergradient(ridge.outer_loss, lambda p, h: {"v": p["w"]}, ridge.params, ridge.hparams)
    with pytest.raises(
        hg.HypergradientError, match=r"\['w'\] must have the shape of params\['w'\], \(6,\); got \(\)"
    ):
        hg.root_hypergradient(ridge.outer_loss, lambda p, h: {"w": p["w"].sum()}, ridge.params, ridge.hparams)
    with pytest.raises(hg.HypergradientError, match=r"GMRES\.restart must be a positive integer, got 0"):
        hg.GMRES(restart=0)
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"\['unused'\]"):
        g = hg.root_hypergradient(
            ridge.outer_loss, F, ridge.params, {**ridge.hparams, "unused": torch.ones(2, dtype=DT)}
        )
    assert torch.all(g["unused"] == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.root_hypergradient(*args)


def test_inputs_are_not_modified_and_dtypes_kept(ridge: P.Problem) -> None:
    before = {k: t.clone() for k, t in ridge.params.items()}
    g, info = hg.root_hypergradient(
        ridge.outer_loss, gradient_condition(ridge.inner_loss), ridge.params, ridge.hparams, return_info=True
    )
    assert all(torch.equal(before[k], ridge.params[k]) for k in before)
    assert g["log_l2"].dtype == DT and not g["log_l2"].requires_grad
    assert (
        info.method == "GMRES" and info.converged and info.vjps == info.iterations + 1
    )  # + the final residual


# ---------------------------------------------------------------- docs/implicit-layers.md runs as printed
def test_implicit_layers_doc_example_runs() -> None:
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "implicit-layers.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docs/implicit-layers.md has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "implicit-layers.md", "exec"), {})
    m = re.fullmatch(r"GMRES relative error vs finite differences: (\S+)\n", out.getvalue())
    assert m is not None, out.getvalue()
    assert float(m.group(1)) < 1e-6


# ---------------------------------------------------------------- operations without a second derivative
def _gradient_condition(inner: P.Loss) -> Callable[[Tree, Tree], Tree]:
    """``F = ∂L_T/∂w`` built with ``create_graph=True``, the way users write a stationarity condition."""

    def F(p: Tree, h: Tree) -> Tree:
        return dict(
            zip(p, torch.autograd.grad(inner(p, h), list(p.values()), create_graph=True), strict=True)
        )

    return F


@pytest.mark.parametrize("name", [*ALL_METHODS, "neumann"])
def test_a_gradient_condition_through_a_once_differentiable_op_is_refused(name: str) -> None:
    """Every product with ∂F/∂w skips the op's once-differentiable backward: without the check the
    answer was 0.77 relative off the tanh twin's, silently. Each method refuses, naming the op and
    hvp_mode="finite-difference"."""
    (inner, outer), (inner_twin, outer_twin) = P.regression(P.OnceTanh.apply), P.regression(torch.tanh)
    w0, lam = P.regression_point()
    w = P.newton_solve(inner_twin, w0, lam)
    method = hg.Neumann(iters=60) if name == "neumann" else ALL_METHODS[name]
    ref = hg.hypergradient(outer_twin, inner_twin, w, lam, method=hg.Exact())
    assert (
        P.rel_err(
            hg.root_hypergradient(
                outer_twin, _gradient_condition(inner_twin), w, lam, method=hg.GMRES(tol=1e-13)
            ),
            ref,
        )
        <= 1e-8
    )  # the twin is fine
    with pytest.raises(hg.HypergradientError, match=r"OnceTanh.*once_differentiable.*finite-difference"):
        hg.root_hypergradient(outer, _gradient_condition(inner), w, lam, method=method)


def test_normal_cg_routes_around_forward_mode_failures_by_a_vjp_of_a_vjp() -> None:
    """F.mse_loss (mean) hits PyTorch's forward-mode "ZeroTensors are immutable" bug: NormalCG's
    products (∂F/∂w)x then come from a VJP of a VJP, and agree with GMRES (both to tol 1e-13 in
    float64, cond(∂F/∂w) ≲ 1e3: 1e-8 leaves margin for NormalCG's squared conditioning)."""
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(30, 4, generator=gen, dtype=DT), torch.randn(30, generator=gen, dtype=DT)
    Xv, yv = torch.randn(20, 4, generator=gen, dtype=DT), torch.randn(20, generator=gen, dtype=DT)

    def inner(p: Tree, h: Tree) -> Tensor:
        return torch.nn.functional.mse_loss(torch.tanh(X @ p["w"]), y) + torch.sum(
            torch.exp(h["l"]) * p["w"] ** 2
        )

    def outer(p: Tree, h: Tree) -> Tensor:
        return torch.nn.functional.mse_loss(torch.tanh(Xv @ p["w"]), yv)

    lam = {"l": torch.full((4,), -2.0, dtype=DT)}
    w = P.newton_solve(inner, {"w": torch.zeros(4, dtype=DT)}, lam)
    F = _gradient_condition(inner)
    ref = hg.root_hypergradient(outer, F, w, lam, method=hg.GMRES(tol=1e-13))
    g, info = hg.root_hypergradient(
        outer, F, w, lam, method=hg.NormalCG(tol=1e-13, iters=500), return_info=True
    )
    assert info.extra["double_vjp"] == 1.0 and info.jvps > 0
    assert P.rel_err(g, ref) <= 1e-8, P.rel_err(g, ref)


def test_normal_cg_names_both_failures_when_neither_product_works(deq: tuple[DEQ, Tree, Tree]) -> None:
    """A map through OnceTanh has no forward-mode formula (no jvp) and its VJP has no derivative:
    NormalCG cannot form (∂F/∂w)x at all and says so, pointing to GMRES (which needs VJPs only)."""
    m, z, _ = deq

    def T_once(p: Tree, h: Tree) -> Tree:
        return m.T(p, h, act=P.OnceTanh.apply)

    with pytest.raises(hg.HypergradientError, match=r"forward-mode.*jvp.*VJP of a VJP.*OnceTanh.*hg\.GMRES"):
        hg.root_hypergradient(m.outer, T_once, z, m.hparams, fixed_point=True, method=hg.NormalCG())


# ---------------------------------------------------------------- what stationarity has, for roots too
def test_every_implicit_method_serves_the_root_door_and_symmetric_ones_need_the_declaration(
    ridge: P.Problem,
) -> None:
    """F = ∂L_T/∂w is symmetric: declared so, MINRES, CG, Auto and Nyström are admitted and agree with
    hypergradient's (each the same solver on the same matrix, built by VJPs of F instead of HVPs:
    rounding only, cond(H) ≤ 1e3; 1e-10). Undeclared, they are refused with the fix; Identity needs
    nothing."""
    F = gradient_condition(ridge.inner_loss)
    args = (ridge.outer_loss, F, ridge.params, ridge.hparams)
    for method in (hg.MINRES(tol=1e-13), hg.CG(tol=1e-13), hg.Auto(tol=1e-13), hg.Nystrom(rank=6, rho=1e-3)):
        ref = hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, method=method)
        assert P.rel_err(hg.root_hypergradient(*args, symmetric=True, method=method), ref) <= 1e-10, method
        with pytest.raises(
            hg.HypergradientError,
            match=rf"hg\.{type(method).__name__} needs a symmetric.*"
            r"hg\.GMRES.*symmetric=True",
        ):
            hg.root_hypergradient(*args, method=method)
    g, info = hg.root_hypergradient(*args, method=hg.Identity(scale=0.5), return_info=True)
    ref = hg.hypergradient(
        ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, method=hg.Identity(scale=0.5)
    )
    assert P.rel_err(g, ref) <= 1e-12 and info.vjps == 1  # the residual only
    with pytest.raises(hg.HypergradientError, match=r"method must be an implicit method.*got Unrolled"):
        hg.root_hypergradient(*args, method=hg.Unrolled(steps=2))  # type: ignore[arg-type]


def test_root_warm_start_carries_the_solution(deq: tuple[DEQ, Tree, Tree]) -> None:
    """state= as for hypergradient: GMRES's next solve starts from the last u (one VJP for the initial
    residual at the same point), Neumann keeps its λ_max; the state passed is not changed."""
    m, z, _ = deq
    g1, i1 = hg.root_hypergradient(
        m.outer,
        m.T,
        z,
        m.hparams,
        fixed_point=True,
        method=hg.GMRES(tol=1e-12),
        return_info=True,
        state=hg.SolverState(),
    )
    assert isinstance(i1.state, hg.KrylovState) and i1.state.p is not None and i1.state.calls == 1
    g2, i2 = hg.root_hypergradient(
        m.outer,
        m.T,
        z,
        m.hparams,
        fixed_point=True,
        method=hg.GMRES(tol=1e-12),
        return_info=True,
        state=i1.state,
    )
    assert i2.extra["warm_start"] == 1.0 and i2.vjps == 1 and i1.vjps > 10
    assert P.rel_err(g2, g1) <= 1e-11 and i1.state.calls == 1 and i2.state is not None and i2.state.calls == 2
    # A root (not a fixed point) with alpha="auto": λ_max estimated once, then reused.
    F = gradient_condition(P.ridge().inner_loss)
    r = P.ridge()
    _, j1 = hg.root_hypergradient(
        r.outer_loss,
        F,
        r.params,
        r.hparams,
        method=hg.Neumann(iters=10),
        return_info=True,
        state=hg.SolverState(),
        residual=False,
    )
    _, j2 = hg.root_hypergradient(
        r.outer_loss,
        F,
        r.params,
        r.hparams,
        method=hg.Neumann(iters=10),
        return_info=True,
        state=j1.state,
        residual=False,
    )
    assert j1.vjps == 20 + 9 and j2.vjps == 9 and j2.extra["lambda_max_age"] == 1


def test_a_symmetric_condition_without_a_second_derivative_by_finite_differences() -> None:
    """F = ∂L_T/∂w through OnceTanh (no second derivative: reverse mode refuses, see above) with
    symmetric=True and hvp_mode="finite-difference": products by central differences of F, the mixed
    product column by column (2 evaluations of F per scalar hyperparameter). Against the tanh twin's
    exact hypergradient: each difference is off by O(eps^{2/3}) ≈ 4e-11 relative, amplified by
    cond(H) ≈ 84 in the solve (measured ≤ 8.2e-10; hypergradient's own finite-difference mode: 4.8e-10);
    1e-7 leaves margin. The iterative solvers stop at tol 1e-9: products that are differences of F
    are linear only to that noise, so a tighter residual is not reachable."""
    (inner, outer), (inner_twin, outer_twin) = P.regression(P.OnceTanh.apply), P.regression(torch.tanh)
    w0, lam = P.regression_point()
    w = P.newton_solve(inner_twin, w0, lam)
    ref = hg.hypergradient(outer_twin, inner_twin, w, lam, method=hg.Exact())
    F = _gradient_condition(inner)
    for method in (hg.GMRES(tol=1e-9), hg.CG(iters=100, tol=1e-9), hg.MINRES(tol=1e-9), hg.Exact()):
        g, info = hg.root_hypergradient(
            outer, F, w, lam, symmetric=True, hvp_mode="finite-difference", method=method, return_info=True
        )
        assert P.rel_err(g, ref) <= 1e-7, (method, P.rel_err(g, ref))
        n_lam = 2
        assert info.extra["condition_evals"] == 1 + 2 * info.vjps + 2 * n_lam, method
    # Without the declaration: refused, saying why and what to do.
    with pytest.raises(
        hg.HypergradientError,
        match=r"finite-difference.*needs symmetric=True.*\(∂F/∂w\)x.*"
        r"transpose.*hvp_mode='reverse'",
    ):
        hg.root_hypergradient(outer, F, w, lam, hvp_mode="finite-difference")
    with pytest.raises(
        hg.HypergradientError, match=r"hvp_mode for a root condition must be 'reverse'.*'forward'"
    ):
        hg.root_hypergradient(outer, F, w, lam, symmetric=True, hvp_mode="forward")  # type: ignore[arg-type]


def test_a_nonfinite_root_hypergradient_is_a_typed_error_with_its_key() -> None:
    T, outer, w, lam, _ = linear_fixed_point(norm=0.5)
    with pytest.raises(hg.NonFiniteHypergradientError, match=r"hypergradient of 'lam' is not finite") as e:
        hg.root_hypergradient(outer, T, w, lam, fixed_point=True, method=hg.Identity(scale=1e308))
    assert e.value.key == "lam" and e.value.method == "Identity"
