"""``hvp_mode="finite-difference"``: HVPs and mixed products from first-order gradients only.

Run as a script (``python tests/library/test_fd_hvp.py``) it prints the table of
``docs/finite-difference-hvp.md``: the finite-difference hypergradient's error against the same
method with exact (double-backward) HVPs, for every implicit method on ``tests/library/problems.py``, in
float32 and float64.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import hypergradients as hg
import problems as P
from hypergradients.core import tree
from hypergradients.core.derivatives import InnerDerivatives, fd_step

Tree = dict[str, Tensor]
FD = "finite-difference"


# ---------------------------------------------------------------- the problems in another dtype
def _recast(fn: Any, dtype: torch.dtype) -> Any:
    """A copy of closure ``fn`` whose captured floating tensors (data, targets) are cast to ``dtype``.

    The problems of ``tests/library/problems.py`` are built in float64; this gives the same losses in
    float32 without a second copy of their code. Nested closures are recast too.
    """
    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    cells = []
    for c in fn.__closure__:
        x = c.cell_contents
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.to(dtype)
        elif isinstance(x, types.FunctionType):
            x = _recast(x, dtype)
        cells.append(types.CellType(x))
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))


def in_dtype(
    prob: P.Problem, dtype: torch.dtype
) -> tuple[Callable[..., Tensor], Callable[..., Tensor], Tree, Tree]:
    cast = {k: t.to(dtype) for k, t in prob.params.items()}, {k: t.to(dtype) for k, t in prob.hparams.items()}
    return _recast(prob.outer_loss, dtype), _recast(prob.inner_loss, dtype), *cast


METHODS: dict[str, hg.Method] = {
    "Exact": hg.Exact(),
    "CG": hg.CG(iters=30),
    "Neumann": hg.Neumann(iters=20),
    "Identity": hg.Identity(),
    "Nystrom": hg.Nystrom(rank=5),
    "Auto": hg.Auto(),
}


def fd_vs_exact(prob: P.Problem, method: hg.Method, dtype: torch.dtype) -> tuple[float, float]:
    """(relative error of the finite-difference hypergradient vs the double-backward one, same method
    and dtype; relative error of the double-backward one vs the float64 IFT reference)."""
    outer, inner, w, lam = in_dtype(prob, dtype)
    exact = hg.hypergradient(outer, inner, w, lam, method=method)
    fd = hg.hypergradient(outer, inner, w, lam, method=method, hvp_mode=FD)
    ref = {k: t.to(dtype) for k, t in prob.reference.items()}
    return P.rel_err(fd, exact), P.rel_err(exact, ref)


def hvp_error(prob: P.Problem, dtype: torch.dtype, *, scale: float = 1.0, seed: int = 0) -> float:
    """‖H_fd v − H v‖/‖H v‖ for a random v, H the dense float64 Hessian; ``scale`` multiplies ε."""
    _, inner, w, lam = in_dtype(prob, dtype)
    gen = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype) for k, t in w.items()}
    D = InnerDerivatives(
        inner,
        tree.clone_leaves(w, requires_grad=True),
        tree.clone_leaves(lam, requires_grad=True),
        hvp_mode=FD,
    )
    eps = scale * fd_step(w, v)
    plus = D._fd_grad(tree.axpy(eps, v, w), of="w")
    minus = D._fd_grad(tree.axpy(-eps, v, w), of="w")
    hv = tree.flatten({k: (plus[k] - minus[k]) / (2 * eps) for k in plus}).double()
    ref = prob.hessian @ tree.flatten(v).double()
    return float(torch.linalg.vector_norm(hv - ref) / torch.linalg.vector_norm(ref))


# ---------------------------------------------------------------- accuracy on tests/library/problems.py
# Central differences with ε = ∛eps·(1 + ‖w‖)/‖v‖ have relative error O(eps^{2/3}): 2.4e-5 in float32,
# 3.7e-11 in float64 (the constants ‖∇³L‖ and ‖∇L‖ of these problems are O(1)). The solvers then
# amplify an HVP error by up to cond(H)·(their own sensitivity); measured worst cases are 1.4e-4
# (float32, Auto on the MLP) and 1.9e-10 (float64, same): the bounds below leave ~5x of margin.
BOUND = {torch.float32: 1e-3, torch.float64: 1e-9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_implicit_method_matches_double_backward(
    problem: P.Problem, name: str, dtype: torch.dtype, one_thread: None
) -> None:
    err, _ = fd_vs_exact(problem, METHODS[name], dtype)
    assert err <= BOUND[dtype], (problem.name, name, dtype, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_hvp_and_mixed_product_match_the_dense_matrices(problem: P.Problem, dtype: torch.dtype) -> None:
    # The HVP alone: measured ≤ 3.9e-5 (float32) and ≤ 6.1e-11 (float64) relative error.
    hvp_bound = {torch.float32: 2e-4, torch.float64: 3e-10}[dtype]
    assert hvp_error(problem, dtype) <= hvp_bound
    _, inner, w, lam = in_dtype(problem, dtype)
    D = InnerDerivatives(
        inner,
        tree.clone_leaves(w, requires_grad=True),
        tree.clone_leaves(lam, requires_grad=True),
        hvp_mode=FD,
    )
    p = tree.unflatten(problem.v.to(dtype), w)
    got, used = D.mixed_vjp(p)
    ref = problem.mixed.T @ problem.v
    err = float(torch.linalg.vector_norm(tree.flatten(got).double() - ref) / torch.linalg.vector_norm(ref))
    assert err <= hvp_bound, err
    assert used == set(lam)
    assert D.gradient_evals == 2  # two first-order gradients per product, no double backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_the_step_is_the_best_of_a_decade_sweep(
    name: str, dtype: torch.dtype, request: pytest.FixtureRequest
) -> None:
    """ε balances truncation O(ε²) against rounding O(eps/ε): ten times smaller or larger is worse.

    (On the quadratic ridge problem there is no truncation error and larger is always better, so
    it is not in this test.) Measured at ε/10, ε, 10ε: logistic float32 6.1e-5, 6.4e-6, 5.1e-4;
    MLP float64 8.2e-11, 6.1e-11, 5.7e-9. A forward-difference step √eps would be 2e-3 ε in
    float64: its error is ~1e-8.
    """
    prob = request.getfixturevalue(name)
    errs = {s: hvp_error(prob, dtype, scale=s) for s in (0.1, 1.0, 10.0)}
    assert errs[1.0] <= min(errs[0.1], errs[10.0]), errs


def test_fd_step_formula() -> None:
    w = {"a": torch.full((4,), 1.5, dtype=torch.float32), "b": torch.zeros(3, dtype=torch.float64)}
    v = {"a": torch.full((4,), 0.5, dtype=torch.float32), "b": torch.zeros(3, dtype=torch.float64)}
    # The least precise dtype (float32) sets eps; ‖w‖ = 3, ‖v‖ = 1.
    assert fd_step(w, v) == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3) * 4.0, rel=1e-12)
    assert fd_step(w, tree.zeros_like(v)) == 0.0


# ---------------------------------------------------------------- operations without double backward
@pytest.mark.parametrize("case", ["once_differentiable", "scaled_dot_product_attention"])
def test_no_double_backward_refused_by_default_and_finite_differences_match_the_twin(case: str) -> None:
    gen = torch.Generator().manual_seed(7)
    if case == "once_differentiable":
        (inner, outer), (inner_twin, outer_twin) = P.regression(P.OnceTanh.apply), P.regression(torch.tanh)
        start = {
            "W1": 0.5 * torch.randn(3, 4, generator=gen, dtype=P.DT),
            "b1": torch.zeros(4, dtype=P.DT),
            "w2": 0.5 * torch.randn(4, generator=gen, dtype=P.DT),
        }
        lam = {"log_l2": torch.tensor([-3.0, -2.5], dtype=P.DT)}
    else:
        (inner, outer), (inner_twin, outer_twin) = P.attention(True), P.attention(False)
        start = {k: 0.5 * torch.randn(3, 3, generator=gen, dtype=P.DT) for k in ("Wq", "Wk", "Wv")}
        start["wo"] = 0.5 * torch.randn(3, generator=gen, dtype=P.DT)
        lam = {"log_l2": torch.tensor(-3.0, dtype=P.DT)}
    w = P.newton_solve(inner_twin, start, lam)  # w*, so that the IFT reference is the true hypergradient
    with pytest.raises(hg.HypergradientError, match='hvp_mode="finite-difference"'):
        hg.hypergradient(outer, inner, w, lam, method=hg.Exact())
    ref = hg.hypergradient(outer_twin, inner_twin, w, lam, method=hg.Exact())
    for method in (hg.Exact(), hg.CG(iters=100, tol=1e-12)):
        got = hg.hypergradient(outer, inner, w, lam, method=method, hvp_mode=FD)
        # float64, cond(H) ≲ 1e3 here: the HVP error ~1e-11 becomes ≲ 1e-8 in the solve.
        assert P.rel_err(got, ref) <= 1e-8, (method, P.rel_err(got, ref))


@pytest.mark.parametrize("fn", [P.OnceTanh, P.OnceTanhJvp], ids=["Function", "func-style Function"])
def test_forward_hvp_mode_refuses_a_once_differentiable_backward(fn: type[torch.autograd.Function]) -> None:
    """hvp_mode="forward" differentiates the graph-free backward of a torch.func-style Function
    to a wrong Hessian (1.4 relative off the tanh twin's Exact hypergradient, silently, without the
    check) and fails inside torch.func on the other: both are refused with the fix named."""
    (inner, outer), (inner_twin, _) = P.regression(fn.apply), P.regression(torch.tanh)
    w0, lam = P.regression_point()
    w = P.newton_solve(inner_twin, w0, lam)
    with pytest.raises(
        hg.HypergradientError, match=fn.__name__ + r".*once_differentiable.*finite-difference"
    ):
        hg.hypergradient(outer, inner, w, lam, method=hg.Exact(), hvp_mode="forward")


def test_dropout_sees_one_mask_and_the_rng_advances_as_in_reverse_mode() -> None:
    gen = torch.Generator().manual_seed(8)
    X, y = torch.randn(40, 6, generator=gen, dtype=P.DT), torch.randn(40, generator=gen, dtype=P.DT)
    Xv, yv = torch.randn(20, 6, generator=gen, dtype=P.DT), torch.randn(20, generator=gen, dtype=P.DT)

    def inner(p: Tree, h: Tree) -> Tensor:
        pred = torch.tanh(F.dropout(X, 0.5, training=True) @ p["w"])
        return torch.mean((pred - y) ** 2) + 0.5 * torch.sum(torch.exp(h["log_l2"]) * p["w"] ** 2)

    def outer(p: Tree, h: Tree) -> Tensor:
        return torch.mean((torch.tanh(Xv @ p["w"]) - yv) ** 2)

    w = {"w": 0.3 * torch.randn(6, generator=gen, dtype=P.DT)}
    lam = {"log_l2": torch.full((6,), -1.0, dtype=P.DT)}
    out = {}
    for mode in ("reverse", FD):
        torch.manual_seed(0)
        with pytest.warns(hg.IndefiniteHessianWarning):  # random weights: H is indefinite here
            g = hg.hypergradient(outer, inner, w, lam, method=hg.Exact(), hvp_mode=mode)
        out[mode] = (g, torch.rand(3))
    # Same mask in all 2n + 2 gradient evaluations: measured 4.7e-9, above the 1e-9 of BOUND since
    # these weights are not a minimum (‖∇L_T‖ = O(1) enters the rounding error eps·‖∇L_T‖/ε); a new
    # mask per evaluation is off by O(1) (measured 1.0).
    assert P.rel_err(out[FD][0], out["reverse"][0]) <= 3e-8, P.rel_err(out[FD][0], out["reverse"][0])
    assert torch.equal(out[FD][1], out["reverse"][1])  # the caller's RNG stream is left as one call leaves it


def test_unknown_hvp_mode_lists_the_modes(ridge: P.Problem) -> None:
    with pytest.raises(hg.HypergradientError, match=r"'finite-difference'.*got 'central'"):
        hg.hypergradient(ridge.outer_loss, ridge.inner_loss, ridge.params, ridge.hparams, hvp_mode="central")  # type: ignore[arg-type]


def seconds_per_hvp(mode: str, *, reps: int = 10) -> float:
    """Wall time of one HVP of a 784-256-10 MLP's cross-entropy on 1024 examples (float32,
    one thread), after the shared set-up (the gradient graph of the reverse mode)."""
    import time

    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(1024, 784, generator=gen), torch.randint(0, 10, (1024,), generator=gen)
    w = {
        "W1": torch.randn(784, 256, generator=gen) / 28,
        "b1": torch.zeros(256),
        "W2": torch.randn(256, 10, generator=gen) / 16,
        "b2": torch.zeros(10),
    }
    lam = {"log_l2": torch.tensor(-4.0)}

    def inner(p: Tree, h: Tree) -> Tensor:
        logits = torch.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
        return F.cross_entropy(logits, y) + 0.5 * torch.exp(h["log_l2"]) * sum(
            torch.sum(t**2) for t in p.values()
        )

    D = InnerDerivatives(
        inner,
        tree.clone_leaves(w, requires_grad=True),
        tree.clone_leaves(lam, requires_grad=True),
        hvp_mode=mode,
    )  # type: ignore[arg-type]
    v = {k: torch.randn(t.shape, generator=gen) for k, t in w.items()}
    D.hvp(v)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        D.hvp(v)
    return (time.perf_counter() - t0) / reps


if __name__ == "__main__":
    torch.set_num_threads(1)
    probs = {name: make() for name, make in P.ALL.items()}
    print("| problem | dtype | HVP error | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for name, prob in probs.items():
        for dt in (torch.float32, torch.float64):
            cells = [f"{fd_vs_exact(prob, m, dt)[0]:.1e}" for m in METHODS.values()]
            print(f"| {name} | {str(dt)[6:]} | {hvp_error(prob, dt):.1e} | " + " | ".join(cells) + " |")
    print("\nseconds per HVP (784-256-10 MLP, 1024 examples, float32, one thread):")
    for mode in ("reverse", "forward", FD):
        print(f"{mode}: {seconds_per_hvp(mode) * 1e3:.1f} ms")


def test_a_once_differentiable_op_fed_a_constant_gradient_is_refused_not_dropped() -> None:
    """``OnceTanh(r).mean()``: the gradient flowing into the @once_differentiable backward is a
    constant (it needs no graph), so autograd leaves no Error node, and the second derivative through
    it used to vanish silently (a wrong hypergradient). Every route that needs that second derivative
    refuses; the finite-difference route gives the twin's answer with torch.tanh."""
    torch.manual_seed(0)
    X = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randn(30, dtype=torch.float64)

    def losses(act: Any) -> tuple[Any, Any]:
        def inner(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
            r = X @ p["w"] - y
            return act(r * r).mean() + 0.5 * torch.exp(h["l"]) * (p["w"] ** 2).sum()

        def outer(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
            return ((X[:10] @ p["w"] - y[:10]) ** 2).mean()

        return inner, outer

    w = {"w": 0.1 * torch.randn(4, dtype=torch.float64)}
    lam = {"l": torch.tensor(-1.0, dtype=torch.float64)}
    inner_once, outer = losses(P.OnceTanh.apply)
    inner_tanh, _ = losses(torch.tanh)
    for method in (hg.Exact(), hg.CG(iters=10)):
        with pytest.raises(hg.HypergradientError, match="OnceTanh"):
            hg.hypergradient(outer, inner_once, w, lam, method=method)
    with pytest.raises(hg.HypergradientError, match="OnceTanh"):
        hg.hypergradient(outer, inner_once, w, lam, method=hg.Unrolled(steps=3, lr=0.1))
    ref = hg.hypergradient(outer, inner_tanh, w, lam, method=hg.Exact())
    fd = hg.hypergradient(outer, inner_once, w, lam, method=hg.Exact(), hvp_mode="finite-difference")
    # Central differences in float64: relative error O(eps^(2/3)) ≈ 4e-11 per product (fd_step's
    # docstring); 1e-7 leaves room for the conditioning of this 4x4 Hessian.
    assert torch.allclose(fd["l"], ref["l"], rtol=1e-7, atol=1e-12)
