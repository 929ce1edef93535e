"""``hg.custom_argmin`` and ``hg.custom_root``: the solution ``w*(λ)`` as a node of autograd.

References in float64: the explicit doors ``hg.hypergradient`` / ``hg.root_hypergradient`` with the
same method (the same products on the same cotangent: equal to rounding), central finite
differences of ``λ ↦ L(w*(λ), λ)`` with the inner problem re-solved for every perturbed ``λ``,
closed forms (iMAML on linear regression), and autograd through a solver that converges to
rounding (a DEQ layer unrolled for 200 steps of a contraction by 1/2).
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
from torch import Tensor, nn

import hypergradients as hg
import problems as P
from hypergradients.core import tree

DT = torch.float64
Tree = dict[str, Tensor]
ROOT = pathlib.Path(__file__).resolve().parents[2]


def leaves(h: Tree) -> Tree:
    """Fresh leaves that require grad: the λ a user differentiates."""
    return {k: t.detach().clone().requires_grad_(True) for k, t in h.items()}


def grads(h: Tree) -> Tree:
    return {k: torch.zeros_like(t) if t.grad is None else t.grad for k, t in h.items()}


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


# ---------------------------------------------------------------- a minimiser: hg.hypergradient to rounding
ARGMIN_METHODS: dict[str, Any] = {
    "cg": hg.CG(iters=200, tol=1e-13),
    "exact": hg.Exact(),
    "neumann": hg.Neumann(iters=15),
    "minres": hg.MINRES(tol=1e-13),
}


@pytest.mark.parametrize("name", list(ARGMIN_METHODS))
def test_argmin_node_equals_hypergradient(problem: P.Problem, name: str) -> None:
    method = ARGMIN_METHODS[name]
    node = hg.custom_argmin(problem.inner_loss, method=method)(lambda init, h: init)
    lam = leaves(problem.hparams)
    w = node.attach(problem.params, lam)
    assert all(t.grad_fn is not None for t in w.values())
    problem.outer_loss(w, lam).backward()  # the direct term by autograd, the indirect one by the node
    ref = hg.hypergradient(
        problem.outer_loss, problem.inner_loss, problem.params, problem.hparams, method=method
    )
    # The same solve on the same v = ∂L_V/∂w and the same mixed product; only the sum direct + (−indirect)
    # happens in autograd's accumulation instead of one subtraction: one rounding (measured: equal).
    assert P.rel_err(grads(lam), ref) <= 1e-12, (problem.name, name, P.rel_err(grads(lam), ref))
    if name == "cg":  # and the hypergradient itself: the problem's reference (dense IFT or re-solved FD)
        tol = 1e-8 if problem.name == "mlp" else 1e-10
        assert P.rel_err(grads(lam), problem.reference) <= tol


def test_argmin_node_runs_the_solver_and_matches_finite_differences_of_the_re_solved_problem(
    ridge: P.Problem,
) -> None:
    calls = []

    @hg.custom_argmin(ridge.inner_loss, method=hg.CG(tol=1e-13), residual=True)
    def train(init: Tree, h: Tree) -> Tree:  # Newton to ‖∇‖ ≤ 1e-13 (tests/problems.py)
        calls.append(all(not t.requires_grad for t in h.values()))  # the solver sees detached λ
        return P.newton_solve(ridge.inner_loss, init, h)

    lam = leaves(ridge.hparams)
    w0 = {"w": torch.zeros(6, dtype=DT, requires_grad=True)}
    w = train(w0, lam)
    ridge.outer_loss(w, lam).backward()
    # Central differences of λ ↦ L_V(w*(λ)), w* re-solved each time: truncation O(ε²) ~ 1e-10 at ε = 1e-5,
    # rounding ~1e-16/ε ~ 1e-11; so the reference is good to ~1e-9 relative.
    fd = central_differences(
        lambda h: ridge.outer_loss(P.newton_solve(ridge.inner_loss, ridge.params, h), h), ridge.hparams, 1e-5
    )
    assert P.rel_err(grads(lam), fd) <= 1e-8, P.rel_err(grads(lam), fd)
    assert calls == [True]
    assert w0["w"].grad is None  # w* does not depend on where the solver started
    info = train.last_info
    assert isinstance(info, hg.Info) and info.method == "CG" and info.converged
    assert info.residual is not None and info.residual <= 1e-13 and info.grad_norm is not None
    assert info.grad_norm <= 1e-12 and info.hvps >= info.iterations


def test_argmin_node_with_forward_and_finite_difference_products(logistic: P.Problem) -> None:
    ref = hg.hypergradient(
        logistic.outer_loss,
        logistic.inner_loss,
        logistic.params,
        logistic.hparams,
        method=hg.CG(iters=200, tol=1e-13),
    )
    for mode, tol in (("forward", 1e-12), ("finite-difference", 1e-6)):
        # forward-over-reverse products equal double backward to rounding; central differences of the
        # gradient are good to O(eps^{2/3}) ~ 1e-10 per product, amplified by cond(H) (docs/finite-difference-hvp.md).
        node = hg.custom_argmin(logistic.inner_loss, method=hg.CG(iters=200, tol=1e-13), hvp_mode=mode)
        lam = leaves(logistic.hparams)
        logistic.outer_loss(node(lambda init, h: init)(logistic.params, lam), lam).backward()
        assert P.rel_err(grads(lam), ref) <= tol, (mode, P.rel_err(grads(lam), ref))


# ---------------------------------------------------------------- a fixed point / root: hg.root_hypergradient
class Layer:
    """``z = tanh(s·W z + U x + b)`` for 3 inputs: a contraction (‖s·W‖₂ = 0.4·s < 1, |tanh'| ≤ 1)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(5)
        W = torch.randn(6, 6, generator=gen, dtype=DT)
        self.W = 0.4 * W / torch.linalg.matrix_norm(W, 2)
        self.x = torch.randn(3, 4, generator=gen, dtype=DT)
        self.y = 0.5 * torch.randn(3, 6, generator=gen, dtype=DT)
        self.hparams = {
            "U": torch.randn(6, 4, generator=gen, dtype=DT) / 2,
            "b": torch.randn(6, generator=gen, dtype=DT) / 2,
            "s": torch.tensor(1.2, dtype=DT),
        }

    def T(self, p: Tree, h: Tree) -> Tree:
        return {"z": torch.tanh(h["s"] * p["z"] @ self.W.T + self.x @ h["U"].T + h["b"])}

    def iterate(self, init: Tree, h: Tree) -> Tree:
        z = init
        for _ in range(200):  # rate ≤ 0.48 per step: the fixed point to rounding
            z = self.T(z, h)
        return z

    def outer(self, p: Tree, h: Tree) -> Tensor:  # a direct term in b
        return 0.5 * torch.sum((p["z"] - self.y) ** 2) + 0.05 * torch.sum(h["b"] ** 2)


@pytest.fixture(scope="module")
def layer() -> tuple[Layer, Tree]:
    m = Layer()
    # Central differences of the re-solved fixed point: truncation ~1e-10, rounding ~1e-11 at ε = 1e-5.
    fd = central_differences(
        lambda h: m.outer(m.iterate({"z": torch.zeros(3, 6, dtype=DT)}, h), h), m.hparams, 1e-5
    )
    return m, fd


ROOT_METHODS: dict[str, Any] = {
    "gmres": hg.GMRES(tol=1e-13),
    "bicgstab": hg.BiCGStab(tol=1e-13),
    "normal_cg": hg.NormalCG(tol=1e-13, iters=500),
    "exact": hg.Exact(),
    "neumann": hg.Neumann(iters=60, alpha=1.0),
}


@pytest.mark.parametrize("name", list(ROOT_METHODS))
def test_fixed_point_node_equals_root_hypergradient_and_finite_differences(
    layer: tuple[Layer, Tree], name: str
) -> None:
    m, fd = layer
    method = ROOT_METHODS[name]
    solve = hg.custom_root(m.T, fixed_point=True, method=method)(m.iterate)
    lam = leaves(m.hparams)
    z = solve({"z": torch.zeros(3, 6, dtype=DT)}, lam)
    m.outer(z, lam).backward()
    ref = hg.root_hypergradient(m.outer, m.T, z, m.hparams, fixed_point=True, method=method)
    assert P.rel_err(grads(lam), ref) <= 1e-12, (name, P.rel_err(grads(lam), ref))  # same products: rounding
    assert P.rel_err(grads(lam), fd) <= 1e-7, (name, P.rel_err(grads(lam), fd))  # the reference's ~1e-9
    info = solve.last_info
    assert isinstance(info, hg.RootInfo) and info.method == type(method).__name__
    assert info.condition_norm is not None and info.condition_norm <= 1e-13
    assert (info.jvps > 0) == (name == "normal_cg")


def test_a_root_on_plain_tensors_in_either_sign(layer: tuple[Layer, Tree]) -> None:
    """``params`` and ``hparams`` as single tensors; ``F = T(z) − z`` and ``z − T(z)`` give the same gradient."""
    m, fd = layer
    U0, rest = m.hparams["U"], {k: t for k, t in m.hparams.items() if k != "U"}

    def T(z: Tensor, U: Tensor) -> Tensor:
        return m.T({"z": z}, {**rest, "U": U})["z"]

    def iterate(z: Tensor, U: Tensor) -> Tensor:
        for _ in range(200):
            z = T(z, U)
        return z

    for F in (lambda z, U: T(z, U) - z, lambda z, U: z - T(z, U)):
        U = U0.clone().requires_grad_(True)
        z = hg.custom_root(F)(iterate)(torch.zeros(3, 6, dtype=DT), U)
        assert isinstance(z, Tensor) and z.grad_fn is not None
        m.outer({"z": z}, m.hparams).backward()
        assert U.grad is not None and P.rel_err({"U": U.grad}, {"U": fd["U"]}) <= 1e-7


# ---------------------------------------------------------------- a DEQ layer inside a network
class DEQ(nn.Module):
    """``z* = tanh(W z*/(2‖W‖_F) + cell(x))``, a contraction by 1/2 for any ``W``; its cell an ``nn.Module``
    called through ``torch.func.functional_call`` with the weights the condition is given."""

    def __init__(self, d: int, n: int, *, implicit: bool) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(n, n, dtype=DT) / n**0.5)
        self.cell = nn.Sequential(nn.Linear(d, n), nn.Tanh(), nn.Linear(n, n)).double()
        self.n, self.implicit = n, implicit
        self.solve = hg.custom_root(self.T, fixed_point=True, method=hg.GMRES(tol=1e-12))(self.iterate)

    def T(self, z: Tensor, h: Tree) -> Tensor:
        cell = {k.removeprefix("cell."): t for k, t in h.items() if k.startswith("cell.")}
        W = h["W"] / (2 * torch.linalg.matrix_norm(h["W"]))
        return torch.tanh(z @ W.T + torch.func.functional_call(self.cell, cell, (h["x"],)))

    def iterate(self, z: Tensor, h: Tree) -> Tensor:
        for _ in range(200):  # rate ≤ 1/2: 2^-200, the fixed point to rounding
            z = self.T(z, h)
        return z

    def forward(self, x: Tensor) -> Tensor:
        h = {"x": x, **dict(self.named_parameters())}
        z0 = x.new_zeros(len(x), self.n)
        return self.solve(z0, h) if self.implicit else self.iterate(z0, h)  # unrolled: autograd through all


def test_a_deq_layer_inside_a_network_trained_by_backward() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 3, dtype=DT)
    y = torch.sin(x.sum(1, keepdim=True))
    nets = {}
    for implicit in (True, False):
        torch.manual_seed(1)
        nets[implicit] = nn.Sequential(
            nn.Linear(3, 5), DEQ(5, 8, implicit=implicit), nn.Linear(8, 1)
        ).double()
    for net in nets.values():
        ((net(x) - y) ** 2).mean().backward()
    # Autograd through 200 steps of a contraction by ≤ 1/2 is the exact derivative to rounding; the
    # node's GMRES to 1e-12 on I − Jᵀ (cond ≤ 3): ≤ 1e-11 relative (measured 7e-13), on every weight of
    # the network: before the layer (through its input x), inside it, after it.
    for (k, p), q in zip(nets[True].named_parameters(), nets[False].parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        err = float(torch.linalg.norm(p.grad - q.grad) / torch.linalg.norm(q.grad))
        assert err <= 1e-9, (k, err)
    # And it trains: Adam on the implicit network (observed 0.57 -> 0.12 in 60 steps; half is a wide margin).
    net = nets[True]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses[::10]
    assert net[1].solve.last_info.converged


# ---------------------------------------------------------------- iMAML: a meta-gradient through w*(θ)
def imaml_tasks(
    n_tasks: int = 4, d: int = 5, seed: int = 0
) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(d, generator=gen, dtype=DT)
    out = []
    for _ in range(n_tasks):
        w = center + 0.3 * torch.randn(d, generator=gen, dtype=DT)
        X, Xv = torch.randn(10, d, generator=gen, dtype=DT), torch.randn(20, d, generator=gen, dtype=DT)
        out.append(((X, X @ w + 0.1 * torch.randn(10, generator=gen, dtype=DT)), (Xv, Xv @ w)))
    return out


LAM_REG = 2.0


def imaml_inner(w: Tensor, theta: Tensor, data: tuple[Tensor, Tensor]) -> Tensor:
    X, y = data
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * LAM_REG * ((w - theta) ** 2).sum()


def imaml_closed_form(theta: Tensor, data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``w*(θ) = A⁻¹(Xᵀy/n + λθ)`` with ``A = XᵀX/n + λI``, and ``dw*/dθ = λA⁻¹`` (symmetric)."""
    X, y = data
    A = X.T @ X / len(X) + LAM_REG * torch.eye(X.shape[1], dtype=DT)
    return torch.linalg.solve(A, X.T @ y / len(X) + LAM_REG * theta), LAM_REG * torch.linalg.inv(A)


def test_imaml_meta_gradient_is_the_closed_form_and_a_loop_equals_one_stacked_problem() -> None:
    tasks = imaml_tasks()
    theta0 = torch.linspace(-1.0, 1.0, 5, dtype=DT)

    @hg.custom_argmin(imaml_inner, method=hg.CG(tol=1e-13))
    def adapt(init: Tensor, theta: Tensor, data: tuple[Tensor, Tensor]) -> Tensor:
        return imaml_closed_form(theta, data)[0]  # any solver: here the closed form

    theta = theta0.clone().requires_grad_(True)
    meta = sum(0.5 * ((Xv @ adapt(theta, theta, tr) - yv) ** 2).mean() for tr, (Xv, yv) in tasks)
    meta.backward()  # a loop over tasks: each w*(θ) its own node
    ref = torch.zeros(5, dtype=DT)
    for tr, (Xv, yv) in tasks:
        w, J = imaml_closed_form(theta0, tr)
        ref += J @ (Xv.T @ (Xv @ w - yv) / len(Xv))  # (dw*/dθ)ᵀ ∂L_val/∂w
    assert theta.grad is not None
    # CG to 1e-13 on A (cond ≤ 3 here): the closed form to ~1e-12.
    assert float(torch.linalg.norm(theta.grad - ref) / torch.linalg.norm(ref)) <= 1e-11

    # The tasks stacked as one problem: weights (tasks, d), one inner loss, one node. Its Hessian is
    # block diagonal, so one CG solve gives every task's term at once: the loop's gradient.
    Xs = torch.stack([tr[0] for tr, _ in tasks])
    ys = torch.stack([tr[1] for tr, _ in tasks])

    def stacked_inner(w: Tensor, theta: Tensor) -> Tensor:
        return sum(imaml_inner(w[t], theta, (Xs[t], ys[t])) for t in range(len(tasks)))  # type: ignore[return-value]

    @hg.custom_argmin(stacked_inner, method=hg.CG(tol=1e-13))
    def adapt_all(init: Tensor, theta: Tensor) -> Tensor:
        return torch.stack([imaml_closed_form(theta, tr)[0] for tr, _ in tasks])

    theta2 = theta0.clone().requires_grad_(True)
    W = adapt_all(theta0.expand(len(tasks), -1), theta2)
    sum(0.5 * ((Xv @ W[t] - yv) ** 2).mean() for t, (_, (Xv, yv)) in enumerate(tasks)).backward()
    assert theta2.grad is not None
    assert float(torch.linalg.norm(theta2.grad - theta.grad) / torch.linalg.norm(ref)) <= 1e-11


# ---------------------------------------------------------------- what torch.func does and does not compose with
def _ridge_node(ridge: P.Problem) -> hg.ImplicitSolver:
    return hg.custom_argmin(ridge.inner_loss, method=hg.CG(tol=1e-13))(
        lambda init, h: P.newton_solve(ridge.inner_loss, init, h)
    )


def test_torch_func_transforms_over_the_node_are_refused_and_a_loop_works(ridge: P.Problem) -> None:
    train = _ridge_node(ridge)
    lams = torch.stack([ridge.hparams["log_l2"], ridge.hparams["log_l2"] - 0.5])

    def val(lam: Tensor) -> Tensor:
        return ridge.outer_loss(train(ridge.params, {"log_l2": lam}), {"log_l2": lam})

    for transform, arg in (
        (torch.func.vmap(val), lams),
        (torch.func.grad(val), lams[0]),
        (torch.func.vmap(torch.func.grad(val)), lams),
    ):
        with pytest.raises(
            hg.HypergradientError, match=r"does not run under torch\.func transforms.*loop over them"
        ):
            transform(arg)
    # The same per-λ gradients by a loop of .backward(): each against the explicit door.
    for lam0 in lams:
        lam = lam0.clone().requires_grad_(True)
        val(lam).backward()
        ref = hg.hypergradient(
            ridge.outer_loss,
            ridge.inner_loss,
            P.newton_solve(ridge.inner_loss, ridge.params, {"log_l2": lam0}),
            {"log_l2": lam0},
            method=hg.CG(tol=1e-13),
        )
        assert lam.grad is not None and P.rel_err({"log_l2": lam.grad}, ref) <= 1e-12


def test_torch_func_inside_the_solver_and_the_condition_composes(ridge: P.Problem) -> None:
    """The solver may use torch.func (grad, functional_call) itself: the README's pattern."""

    def inner(w: Tensor, lam: Tensor) -> Tensor:
        return ridge.inner_loss({"w": w}, {"log_l2": lam})

    @hg.custom_argmin(inner, method=hg.CG(tol=1e-13))
    def gd(w: Tensor, lam: Tensor) -> Tensor:
        for _ in range(
            80
        ):  # H's spectrum is in [0.88, 2.72]: step 0.5 contracts by ≤ 0.56, 80 steps to rounding
            w = w - 0.5 * torch.func.grad(inner)(w, lam)
        return w

    lam = ridge.hparams["log_l2"].clone().requires_grad_(True)
    ridge.outer_loss({"w": gd(torch.zeros(6, dtype=DT), lam)}, {}).backward()
    assert lam.grad is not None and P.rel_err({"log_l2": lam.grad}, ridge.reference) <= 1e-9


# ---------------------------------------------------------------- second order: first-order under create_graph, then refused
def test_create_graph_gives_the_first_derivative_and_refuses_the_second(ridge: P.Problem) -> None:
    train = _ridge_node(ridge)
    lam = leaves(ridge.hparams)
    w = train(ridge.params, lam)
    (g,) = torch.autograd.grad(
        ridge.outer_loss(w, lam) + 0.5 * (lam["log_l2"] ** 2).sum(), [lam["log_l2"]], create_graph=True
    )
    ref = ridge.reference["log_l2"] + ridge.hparams["log_l2"]
    assert g.requires_grad and float(torch.linalg.norm(g.detach() - ref) / torch.linalg.norm(ref)) <= 1e-10
    with pytest.raises(
        hg.HypergradientError, match=r"second derivative through hg\.custom_argmin's node.*hg\.CG"
    ):
        torch.autograd.grad(g.sum(), [lam["log_l2"]])
    with pytest.raises(hg.HypergradientError, match=r"second derivative"):
        g.sum().backward()


# ---------------------------------------------------------------- arguments, no-grad, errors
def test_no_node_without_a_hyperparameter_that_requires_grad(ridge: P.Problem) -> None:
    train = _ridge_node(ridge)
    w = train(ridge.params, ridge.hparams)  # nothing requires grad: plain tensors, no graph
    assert not w["w"].requires_grad and w["w"].grad_fn is None
    with torch.no_grad():
        w = train(ridge.params, leaves(ridge.hparams))
    assert not w["w"].requires_grad


def test_only_the_hyperparameters_that_require_grad_are_differentiated(layer: tuple[Layer, Tree]) -> None:
    m, fd = layer
    solve = hg.custom_root(m.T, fixed_point=True)(m.iterate)
    lam = {**m.hparams, "b": m.hparams["b"].clone().requires_grad_(True)}
    before = {k: t.clone() for k, t in m.hparams.items()}
    m.outer(solve({"z": torch.zeros(3, 6, dtype=DT)}, lam), lam).backward()
    assert lam["b"].grad is not None and P.rel_err({"b": lam["b"].grad}, {"b": fd["b"]}) <= 1e-7
    assert all(torch.equal(before[k], m.hparams[k]) for k in before)  # inputs never modified


def test_a_loss_that_ignores_w_star_gets_the_direct_term_only(layer: tuple[Layer, Tree]) -> None:
    m, _ = layer
    solve = hg.custom_root(m.T, fixed_point=True)(m.iterate)
    lam = leaves(m.hparams)
    z = solve({"z": torch.zeros(3, 6, dtype=DT)}, lam)
    (0.0 * z["z"].sum() + (lam["b"] ** 2).sum()).backward()  # v = 0: no solve, u = 0
    assert torch.equal(grads(lam)["b"], 2 * m.hparams["b"]) and not bool(grads(lam)["U"].any())
    assert solve.last_info is not None and solve.last_info.iterations == 0 and solve.last_info.hvps == 0


def test_extra_arguments_go_to_solver_and_condition_and_must_not_require_grad() -> None:
    tasks = imaml_tasks(n_tasks=1)
    (tr, (Xv, yv)), theta = tasks[0], torch.zeros(5, dtype=DT, requires_grad=True)
    seen = []

    def inner(w: Tensor, th: Tensor, data: tuple[Tensor, Tensor], *, scale: float) -> Tensor:
        seen.append(scale)
        return scale * imaml_inner(w, th, data)

    adapt = hg.custom_argmin(inner)(lambda init, th, data, *, scale: imaml_closed_form(th, data)[0])
    w = adapt(theta, theta, tr, scale=3.0)
    assert torch.equal(w, imaml_closed_form(theta.detach(), tr)[0])
    (0.5 * ((Xv @ w - yv) ** 2).mean()).backward()
    assert seen and set(seen) == {3.0}  # the condition got the keyword too
    _, J = imaml_closed_form(theta.detach(), tr)
    ref = J @ (Xv.T @ (Xv @ w.detach() - yv) / len(Xv))
    assert (
        theta.grad is not None and float(torch.linalg.norm(theta.grad - ref) / torch.linalg.norm(ref)) <= 1e-9
    )
    bad = (tr[0].clone().requires_grad_(True), tr[1])
    with pytest.raises(hg.HypergradientError, match=r"args\[0\]\[0\] require grad.*put them in hparams"):
        adapt(theta, theta, bad, scale=1.0)
    with pytest.raises(hg.HypergradientError, match=r"kwargs\['scale'\] require grad"):
        adapt(theta, theta, tr, scale=torch.tensor(1.0, requires_grad=True))


def test_bad_settings_and_results_are_named(layer: tuple[Layer, Tree]) -> None:
    m, _ = layer
    with pytest.raises(
        hg.HypergradientError, match=r"hg\.CG needs a symmetric positive-definite Jacobian.*hg\.GMRES"
    ):
        hg.custom_root(m.T, fixed_point=True, method=hg.CG())
    hg.custom_root(m.T, symmetric=True, method=hg.CG())  # declared symmetric: admitted
    with pytest.raises(
        hg.HypergradientError, match=r"implicit method.*hg\.Unrolled, hg\.Forward\) needs no node"
    ):
        hg.custom_argmin(lambda w, h: w.sum(), method=hg.Unrolled(steps=3, lr=0.1))
    with pytest.raises(hg.HypergradientError, match=r"needs symmetric=True"):
        hg.custom_root(m.T, hvp_mode="finite-difference")
    with pytest.raises(hg.HypergradientError, match=r"hvp_mode must be one of"):
        hg.custom_argmin(lambda w, h: w.sum(), hvp_mode="backward")  # type: ignore[arg-type]
    lam = leaves(m.hparams)
    with pytest.raises(
        hg.HypergradientError,
        match=r"the solver's result must be a dict\[str, Tensor\] or a torch\.Tensor, got list",
    ):
        hg.custom_root(m.T, fixed_point=True)(lambda init, h: [init["z"]])(
            {"z": torch.zeros(3, 6, dtype=DT)}, lam
        )
    with pytest.raises(
        hg.HypergradientError,
        match=r"hparams\['n'\] must be a floating-point torch\.Tensor, got dtype torch\.int64",
    ):
        hg.custom_root(m.T, fixed_point=True)(m.iterate)(
            {"z": torch.zeros(3, 6, dtype=DT)}, {**lam, "n": torch.tensor(3)}
        )
    with pytest.raises(hg.HypergradientError, match=r"decorates a solver function"):
        hg.custom_root(m.T)(3)  # type: ignore[arg-type]


def test_unused_and_path_only_hyperparameters(ridge: P.Problem) -> None:
    train = hg.custom_argmin(ridge.inner_loss)(lambda init, h: P.newton_solve(ridge.inner_loss, init, h))
    lam = {**leaves(ridge.hparams), "lr": torch.tensor(0.1, dtype=DT, requires_grad=True)}
    w = train(ridge.params, lam)
    with pytest.raises(
        hg.PathOnlyHyperparameterError, match=r"\['lr'\] require grad.*call the solver undecorated"
    ):
        ridge.outer_loss(w, lam).backward()
    lam = {**leaves(ridge.hparams), "unused": torch.tensor(0.1, dtype=DT, requires_grad=True)}
    with pytest.warns(hg.UnusedHyperparameterWarning, match=r"\['unused'\] require grad.*gradient through"):
        ridge.outer_loss(train(ridge.params, lam), lam).backward()
    assert lam["unused"].grad is not None and float(lam["unused"].grad) == 0.0
    assert P.rel_err({"log_l2": lam["log_l2"].grad}, ridge.reference) <= 1e-10  # type: ignore[dict-item]


def test_a_non_finite_gradient_names_its_key(ridge: P.Problem) -> None:
    """A term ``√a·‖w‖²`` at ``a = 0``: the loss and ∂L_T/∂w are finite, the mixed product ``⟨w, u⟩/√a`` is not."""

    def inner(p: Tree, h: Tree) -> Tensor:
        return (
            ridge.inner_loss(p, {"log_l2": ridge.hparams["log_l2"]})
            + torch.sqrt(h["a"]) * (p["w"] ** 2).sum()
        )

    train = hg.custom_argmin(inner, method=hg.Identity())(lambda init, h: init)
    w = train.attach(ridge.params, {"a": torch.tensor(0.0, dtype=DT, requires_grad=True)})
    with pytest.raises(
        hg.NonFiniteHypergradientError, match=r"gradient of 'a' through hg\.custom_argmin's node"
    ) as e:
        ridge.outer_loss(w, {}).backward()
    assert e.value.key == "a" and e.value.method == "Identity"


# ---------------------------------------------------------------- the docs and the README run as printed
def _blocks(path: pathlib.Path, section: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run(block: str, name: str) -> tuple[str, dict[str, Any]]:
    out, ns = io.StringIO(), {}  # type: ignore[var-annotated]
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(block, name, "exec"), ns)
    return out.getvalue(), ns


def test_the_imaml_example_of_the_docs_runs_as_printed(one_thread: None) -> None:
    doc = ROOT / "docs" / "inside-autograd.md"
    printed, ns = _run(_blocks(doc)[0], "inside-autograd.md")
    m = re.fullmatch(r"meta-loss (\S+) -> (\S+), \|theta - center\| (\S+) \(from (\S+)\)\n", printed)
    assert m is not None, printed
    first, last, dist, start = map(float, m.groups())
    assert f"`{printed.strip()}`" in doc.read_text(encoding="utf-8")  # the page quotes what it prints
    assert last < first / 10 and dist < start / 4
    # The meta-gradient the example follows is the closed form's, at the θ it reached.
    theta = ns["theta"].detach().clone().requires_grad_(True)
    ns["meta_loss"](theta).backward()
    ref = torch.zeros_like(theta)
    for (X, y), (Xv, yv) in ns["tasks"]:
        A = X.T @ X / len(X) + ns["lam_reg"] * torch.eye(len(theta), dtype=DT)
        w = torch.linalg.solve(A, X.T @ y / len(X) + ns["lam_reg"] * theta.detach())
        ref += ns["lam_reg"] * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv) / len(Xv)) / len(ns["tasks"])
    # 40 gradient steps from θ at rate ≤ 0.48 reach w* to rounding (measured 7e-16); CG to 1e-12 on
    # cond(A) ≤ 3: ≤ 3e-12 (measured 1.4e-15, the figure the page quotes).
    assert float(torch.linalg.norm(theta.grad - ref) / torch.linalg.norm(ref)) <= 1e-10


def test_the_deq_example_of_the_docs_runs_as_printed(one_thread: None) -> None:
    doc = ROOT / "docs" / "inside-autograd.md"
    printed, _ = _run(_blocks(doc)[1], "inside-autograd.md")
    rows = re.findall(r"step (\d+): loss (\S+), backward GMRES iterations (\d+)\n", printed)
    assert [int(r[0]) for r in rows] == [0, 100, 200], printed
    assert float(rows[-1][1]) < float(rows[0][1]) / 5
    assert all(int(r[2]) < 30 for r in rows)  # a contraction by 1/2: GMRES needs few products
    assert printed.strip().splitlines()[-1] in doc.read_text(encoding="utf-8")


def test_the_readme_example_runs_as_printed(ridge: P.Problem) -> None:
    readme = ROOT / "README.md"
    (block,) = _blocks(readme, "## Inside autograd")
    assert len([line for line in block.splitlines() if line.strip()]) <= 16
    printed, ns = _run(block, "README.md")
    m = re.fullmatch(r"dL_V/dlog_wd = (\S+)\n", printed)
    assert m is not None, printed
    X, Xv, yv = ns["X"], ns["Xv"], ns["yv"]
    w0 = {"w": ns["w"].detach()}
    ref = hg.hypergradient(
        lambda p, h: ((Xv @ p["w"] - yv) ** 2).mean(),
        lambda p, h: ns["inner_loss"](p["w"], h["l"]),
        w0,
        {"l": ns["log_wd"].detach()},
        method=hg.CG(),
    )
    # What the README says: hg.hypergradient with the same method, to rounding (the same products).
    grad = ns["log_wd"].grad
    assert abs(float(grad) - float(ref["l"])) <= 1e-12 * abs(float(ref["l"]))
    assert m.group(1) == f"{float(grad):.6g}" and X.shape == (50, 5)
    assert f"`{printed.strip()}`" in readme.read_text(encoding="utf-8")  # the README quotes what it prints
