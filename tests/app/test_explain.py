"""`hypergradients explain` and :mod:`hypergradients.app.experiments.explain`.

The numbers the command reports are re-derived here independently, in float64, from the dense
closed forms: the Hessian against autograd, the exact hypergradient against finite differences
of ``L_V(w*(λ))``, unrolled (cold-start and truncated) hypergradients against the dense
Jacobian recurrence ``J_{k+1} = (I − αH(w_k)) J_k − α M(w_k)``, ``g = J_Kᵀ ∂L_V/∂w(w_K)``.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import hypergradients as hg
from hypergradients.app.cli import main as cli_main
from hypergradients.app.experiments import problems as AP
from hypergradients.app.experiments.explain import ExplainConfig, ExplainResult, explain
from hypergradients.core import tree

DT = torch.float64
CFG = ExplainConfig.smoke(cold_steps=(1, 10, 100, 300), truncate=10, lr_steps=20)
# the parts beyond plain gradient descent on settings small enough for a command-line test
SMALL = [
    "--momentum-steps",
    "1,3",
    "--adam-steps",
    "1,3",
    "--noise-orders",
    "2",
    "--noise-batch-sizes",
    "50",
    "--noise-steps",
    "2",
]


@pytest.fixture(scope="module")
def result() -> ExplainResult:
    return explain(CFG)


@pytest.fixture(scope="module")
def prob() -> AP.BilevelProblem:
    return AP.load_problem(CFG.problem, seed=CFG.seed, decay=CFG.decay)


def _flat_grad(loss: AP.Loss, w: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
    wr = tree.clone_leaves(w, requires_grad=True)
    return tree.flatten(tree.as_tree(torch.autograd.grad(loss(wr, h), list(wr.values())), wr))


def _mixed(prob: AP.BilevelProblem, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """``M = ∂²L_T/∂w∂λᵀ`` densely: ``e^λ_j W_j`` on the weight rows, zero on the bias rows."""
    lam = prob.hparams["log_weight_decay"].reshape(-1)
    n_w = lam.numel()
    M = torch.zeros(prob.n_weights, n_w, dtype=DT)
    M[torch.arange(n_w), torch.arange(n_w)] = torch.exp(lam) * w["weight"].reshape(-1)
    return M


def _dense_unrolled(prob: AP.BilevelProblem, alpha: float, Ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Unrolled hypergradients from ``w₀ = 0`` by the forward Jacobian recurrence, for each K in Ks."""
    w = prob.zeros()
    J = torch.zeros(prob.n_weights, prob.n_hparams, dtype=DT)
    out = {}
    for k in range(1, max(Ks) + 1):
        J = J - alpha * (prob.hessian_fn(w, prob.hparams) @ J + _mixed(prob, w))
        w = tree.unflatten(tree.flatten(w) - alpha * _flat_grad(prob.inner_loss, w, prob.hparams), w)
        if k in Ks:
            out[k] = J.T @ _flat_grad(prob.outer_loss, w, prob.hparams)
    return out


def _dense_truncated(prob: AP.BilevelProblem, alpha: float, K: int, T: int) -> torch.Tensor:
    """K steps from ``w₀ = 0``, only the last T carrying the Jacobian (the start held constant)."""
    w = prob.zeros()
    for _ in range(K - T):
        w = tree.unflatten(tree.flatten(w) - alpha * _flat_grad(prob.inner_loss, w, prob.hparams), w)
    J = torch.zeros(prob.n_weights, prob.n_hparams, dtype=DT)
    for _ in range(T):
        J = J - alpha * (prob.hessian_fn(w, prob.hparams) @ J + _mixed(prob, w))
        w = tree.unflatten(tree.flatten(w) - alpha * _flat_grad(prob.inner_loss, w, prob.hparams), w)
    return J.T @ _flat_grad(prob.outer_loss, w, prob.hparams)


# ---------------------------------------------------------------------------------- the problem
@pytest.mark.parametrize("classes", [2, 3])
def test_closed_form_logistic_hessian_matches_autograd(classes: int) -> None:
    # Both sides are exact float64 expressions of the same matrix: 1e-12 is rounding with margin.
    gen = torch.Generator().manual_seed(classes)
    n, d = 9, 4
    X = torch.randn(n, d, generator=gen, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=gen)
    shape = (d,) if classes == 2 else (d, classes)
    nb = 1 if classes == 2 else classes
    decay = torch.rand(d * nb + nb, generator=gen, dtype=DT)
    W = torch.randn(shape, generator=gen, dtype=DT)
    b = torch.randn(() if classes == 2 else (classes,), generator=gen, dtype=DT)

    def loss(x: torch.Tensor) -> torch.Tensor:
        Wx, bx = x[: W.numel()].reshape(shape), x[W.numel() :].reshape(b.shape)
        z = X @ Wx + bx
        data = (
            torch.nn.functional.softplus(-(2.0 * y - 1.0) * z).mean()
            if classes == 2
            else torch.nn.functional.cross_entropy(z, y)
        )
        return data + 0.5 * torch.sum(decay * x**2)

    ref = torch.autograd.functional.hessian(loss, torch.cat([W.reshape(-1), b.reshape(-1)]))
    H = AP.logistic_hessian(X, W, b, decay)
    assert float((H - ref).abs().max()) <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize("name", ["breast-cancer", "diabetes"])
def test_problem_hessian_matches_autograd_hvps(name: str) -> None:
    # The bundled problems wire the closed form correctly: HVPs at w* and at a random point.
    p = AP.load_problem(name, n_train=60)
    gen = torch.Generator().manual_seed(0)
    for w in (p.params, tree.unflatten(torch.randn(p.n_weights, generator=gen, dtype=DT), p.params)):
        H = p.hessian_fn(w, p.hparams)
        wr = tree.clone_leaves(w, requires_grad=True)
        g = torch.autograd.grad(p.inner_loss(wr, p.hparams), list(wr.values()), create_graph=True)
        for _ in range(3):
            v = torch.randn(p.n_weights, generator=gen, dtype=DT)
            vt = tree.unflatten(v, w)
            hv = torch.autograd.grad(
                g, list(wr.values()), grad_outputs=[vt[k] for k in wr], retain_graph=True
            )
            ref = torch.cat([t.reshape(-1) for t in hv])
            assert float((H @ v - ref).norm() / ref.norm()) <= 1e-12
    assert p.grad_norm <= 1e-12
    assert p.lambda_min > 0  # strictly convex: the IFT applies


def test_exact_hypergradient_against_finite_differences(prob: AP.BilevelProblem) -> None:
    # Central differences of λ_j ↦ L_V(w*(λ)), w* re-solved by Newton to ‖∇‖ ~ 1e-16.
    # eps = 1e-4: truncation O(eps²) ~ 1e-8 relative; rounding ~1e-16/1e-4 = 1e-12; w* error
    # ~1e-16/λ_min(1.7e-3) /eps ~ 1e-9. So 1e-6 relative is a failure, not noise.
    eps = 1e-4
    lam = prob.hparams["log_weight_decay"]
    for j in (0, 7, 21):
        vals = []
        for s in (1.0, -1.0):
            h = {"log_weight_decay": lam.clone()}
            h["log_weight_decay"][j] += s * eps
            w, _, _ = AP.newton_minimize(prob.inner_loss, prob.hessian_fn, prob.params, h)
            vals.append(float(prob.outer_loss(w, h)))
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert float(prob.exact["log_weight_decay"][j]) == pytest.approx(fd, rel=1e-6)
    # And the library's dense solve agrees with the closed form (1e-10: one 31×31 solve each).
    g = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=hg.Exact())
    assert AP.rel_dist(g, prob.exact) <= 1e-10


# ---------------------------------------------------------------------------------- the theorem
def test_theorem_holds_to_float64(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    # Unrolled-from-w* and Neumann sum the same K products in different orders: the difference
    # is rounding, a few eps times K·cond at worst (measured ~1e-15 for K ≤ 100); 1e-12 is far
    # below anything a wrong term, a missing α or an off-by-one in K would give (≥ 1e-3 here).
    assert result.theorem_max_rel_diff <= 1e-12
    assert [r["K"] for r in result.theorem] == list(CFG.theorem_steps)
    alpha = result.alpha
    assert alpha == pytest.approx(1.0 / prob.lambda_max, rel=1e-12)
    H, v = prob.hessian, _flat_grad(prob.outer_loss, prob.params, prob.hparams)
    M = _mixed(prob, prob.params)
    exact = tree.flatten(prob.exact)
    for row in result.theorem:
        K = row["K"]
        # Dense K-term Neumann sum, independently of hg.Neumann.
        p, term = torch.zeros_like(v), v.clone()
        for _ in range(K):
            p, term = p + term, term - alpha * (H @ term)
        g = -(M.T @ (alpha * p))
        assert row["cosine"] == pytest.approx(AP.cosine({"g": g}, {"g": exact}), abs=1e-12)
        assert row["rel_dist"] == pytest.approx(float((g - exact).norm() / exact.norm()), rel=1e-9)
        assert row["weight_drift"] <= 1e-13  # from w* the iterates do not move
        assert row["neumann_hvps"] == K - 1
    cos = [r["cosine"] for r in result.theorem]
    assert cos == sorted(cos) and cos[-1] > 0.99  # tends to the IFT hypergradient


def test_cold_start_matches_the_dense_recurrence(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    exact = tree.flatten(prob.exact)
    rows = {r["K"]: r for r in result.cold_start}
    assert sorted(rows) == sorted(CFG.cold_steps)
    # W_0 = 0 makes the mixed partial e^λ W_0 vanish, and ∂w_0/∂λ = 0: one step sees nothing.
    assert rows[1]["cosine"] == 0.0 and rows[1]["rel_dist"] == 1.0
    dense = _dense_unrolled(prob, result.alpha, (10, 100))
    for K, g in dense.items():
        # Reverse and forward mode through the same K steps: rounding only (1e-10 allows K=100).
        assert rows[K]["cosine"] == pytest.approx(AP.cosine({"g": g}, {"g": exact}), abs=1e-10)
        assert rows[K]["rel_dist"] == pytest.approx(float((g - exact).norm() / exact.norm()), rel=1e-9)
    # The path converges, and with it the hypergradient (measured 0.9995 at K = 300).
    assert rows[300]["cosine"] > 0.99 > rows[10]["cosine"]
    assert rows[300]["weight_rel_err"] < rows[100]["weight_rel_err"] < rows[10]["weight_rel_err"]


def test_truncated_tends_to_neumann_T(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    T = CFG.truncate
    exact = tree.flatten(prob.exact)
    rows = {r["K"]: r for r in result.truncated}
    assert min(rows) >= T and rows[T]["cosine"] == result.cold_start[1]["cosine"]  # K = T: full
    g = _dense_truncated(prob, result.alpha, 100, T)
    assert rows[100]["cosine"] == pytest.approx(AP.cosine({"g": g}, {"g": exact}), abs=1e-10)
    # Approaches the T-term Neumann cosine (not 1): the gap shrinks as w_{K−T} → w*.
    gaps = [abs(rows[K]["cosine"] - result.neumann_T_cosine) for K in sorted(rows)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3
    assert result.neumann_T_cosine == pytest.approx(result.theorem[1]["cosine"], abs=1e-12)  # K = 10 row


def test_mistaken_derivation(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    from hypergradients.app.experiments.explain import mistaken_hypergradient

    alpha = result.alpha
    exact = tree.flatten(prob.exact)
    v_star = _flat_grad(prob.outer_loss, prob.params, prob.hparams)
    # From w*: every M_k = M, so the mistake is −αK Mᵀv = K × the one-term Neumann hypergradient.
    for K in (1, 7):
        g = tree.flatten(mistaken_hypergradient(prob, prob.params, alpha, K))
        ref = -alpha * K * (_mixed(prob, prob.params).T @ v_star)
        assert float((g - ref).norm() / ref.norm()) <= 1e-12
    # From w₀ = 0: −α Σ_k M(w_k)ᵀ v(w_K) along the real path, rebuilt densely.
    K = 100
    w, Msum = prob.zeros(), torch.zeros(prob.n_weights, prob.n_hparams, dtype=DT)
    for _ in range(K):
        Msum = Msum + _mixed(prob, w)
        w = tree.unflatten(tree.flatten(w) - alpha * _flat_grad(prob.inner_loss, w, prob.hparams), w)
    g = -alpha * Msum.T @ _flat_grad(prob.outer_loss, w, prob.hparams)
    row = next(r for r in result.mistaken if r["K"] == K)
    assert row["cosine"] == pytest.approx(AP.cosine({"g": g}, {"g": exact}), abs=1e-10)
    # It never converges: the direction heads for the one-term Neumann one, the length grows.
    dists = [r["rel_dist"] for r in result.mistaken]
    assert dists == sorted(dists) and dists[-1] > 10
    assert result.mistaken[-1]["cosine"] < result.theorem[0]["cosine"] + 1e-9


def test_learning_rate_section(result: ExplainResult) -> None:
    lr = result.learning_rate
    assert sorted(lr["refused_by"]) == ["CG", "Exact", "Identity", "Neumann", "Nystrom"]
    assert all("['lr']" in m and "hg.Unrolled" in m for m in lr["refused_by"].values())
    # Central differences with eps = 1e-5·α (see learning_rate_section): ~1e-10 expected.
    assert lr["fd_rel_err"] <= 1e-6
    assert lr["unrolled_cold_start"] != 0.0
    # From w* the path does not move: the step size has no effect (rounding level only).
    assert abs(lr["unrolled_from_optimum"]) <= 1e-12 * abs(lr["unrolled_cold_start"]) + 1e-16


def test_json_summary_has_the_issue_keys(result: ExplainResult) -> None:
    d = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert d["theorem_max_rel_diff"] == result.theorem_max_rel_diff
    assert d["cold_start_cosine"] == [[r["K"], r["cosine"]] for r in result.cold_start]
    assert d["truncated_cosine"] == [[r["K"], r["cosine"]] for r in result.truncated]
    assert all(math.isfinite(t) for t in d["timings_s"].values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha_scale": 2.5}, r"alpha_scale=2\.5 .*\(0, 2\)"),
        ({"theorem_steps": (1, 0)}, r"theorem_steps .*positive integers, got \(1, 0\)"),
        ({"truncate": 0}, r"truncate must be a positive integer, got 0"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(hg.HypergradientError, match=match):
        explain(ExplainConfig(**kwargs))


def test_unknown_problem_names_the_choices() -> None:
    with pytest.raises(hg.HypergradientError, match=r"unknown problem 'iris'.*breast-cancer"):
        AP.load_problem("iris")


# ---------------------------------------------------------------------------------- the command
def test_command_writes_json_and_figures(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ex"
    rc = cli_main(
        [
            "explain",
            "--steps",
            "1,5,20",
            "--cold-steps",
            "1,5,20",
            "--truncate",
            "3",
            "--lr-steps",
            "5",
            *SMALL,
            "--out",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((out / "explain.json").read_text())
    assert printed == on_disk
    assert on_disk["theorem_max_rel_diff"] <= 1e-12
    assert [k for k, _ in on_disk["cold_start_cosine"]] == [1, 5, 20]
    names = ["explain_cosine.png", "explain_noise.png", "explain_optimizers.png", "explain_theorem.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(on_disk["figures"]) == names


def test_command_prints_an_account(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(
        [
            "explain",
            "--steps",
            "1,3",
            "--cold-steps",
            "1,3",
            "--truncate",
            "2",
            "--lr-steps",
            "3",
            *SMALL,
            "--out",
            str(tmp_path),
            "--no-figures",
            "--quiet",
        ]
    )
    assert rc == 0 and capsys.readouterr().out == f"{tmp_path / 'explain.json'}\n"  # --quiet: the path only
    rc = cli_main(
        [
            "explain",
            "--steps",
            "1,3",
            "--cold-steps",
            "1,3",
            "--truncate",
            "2",
            "--lr-steps",
            "3",
            *SMALL,
            "--out",
            str(tmp_path),
            "--no-figures",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "theorem_max_rel_diff" in text and "PathOnlyHyperparameterError" in text
    assert "finite difference" in text
    assert "6. Heavy-ball momentum" in text and "7. Adam from w*" in text and "8. Minibatch SGD" in text


def test_command_rejects_bad_values(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["explain", "--alpha-scale", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "alpha_scale=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["explain", "--steps", "1,x"])
    assert e.value.code == 2 and "'1,x' is not a comma-separated list of integers" in capsys.readouterr().err


def test_command_restores_threads_and_reports_unwritable_out(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.get_num_threads()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli_main(
        [
            "explain",
            "--steps",
            "1",
            "--cold-steps",
            "1",
            "--truncate",
            "1",
            "--lr-steps",
            "1",
            "--out",
            str(blocker / "sub"),
            "--quiet",
            "--no-figures",
            "--threads",
            "1",
        ]
    )
    # refused before any work (exit 2, a usage error), naming the file that is in the way
    assert rc == 2 and f"{str(blocker)!r} is a file" in capsys.readouterr().err
    rc = cli_main(
        [
            "explain",
            "--steps",
            "1",
            "--cold-steps",
            "1",
            "--truncate",
            "1",
            "--lr-steps",
            "1",
            *SMALL,
            "--out",
            str(tmp_path / "ok"),
            "--quiet",
            "--no-figures",
            "--threads",
            "1",
        ]
    )
    assert rc == 0 and torch.get_num_threads() == before


# ------------------------------------------------------ beyond plain gradient descent (parts 6-8)
def _dense_heavy_ball_P(H: torch.Tensor, K: int, alpha: float, beta: float) -> torch.Tensor:
    """``P_K(H)`` by its matrix recurrence ``P_{k+1} = (1+β)P_k − βP_{k−1} − αHP_k + αI``, ``P_0 = P_{−1} = 0``:
    independent of the eigendecomposition and of the closed form through the roots."""
    eye = torch.eye(H.shape[0], dtype=DT)
    prev, cur = torch.zeros_like(H), torch.zeros_like(H)
    for _ in range(K):
        prev, cur = cur, (1 + beta) * cur - beta * prev - alpha * H @ cur + alpha * eye
    return cur


@pytest.mark.parametrize("pair", ["beta=0.9", "optimal", "overdamped"])
def test_heavy_ball_polynomial_equals_unrolled_momentum(prob: AP.BilevelProblem, pair: str) -> None:
    from hypergradients import optim
    from hypergradients.app.experiments.explain import (
        heavy_ball_polynomial,
        library_unrolled,
        unroll_optimizer,
    )

    H = prob.hessian
    L, mu = prob.lambda_max, prob.lambda_min
    kappa = L / mu
    alpha, beta = {
        "beta=0.9": (1 / L, 0.9),
        "optimal": (
            4 / (math.sqrt(L) + math.sqrt(mu)) ** 2,
            ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2,
        ),
        "overdamped": (0.5 / L, 0.05),
    }[pair]  # real roots for part of the spectrum
    ev, Q = torch.linalg.eigh(H)
    v = _flat_grad(prob.outer_loss, prob.params, prob.hparams)
    M = _mixed(prob, prob.params)
    opt = optim.heavy_ball(lr=alpha, momentum=beta)
    gs, w_end = unroll_optimizer(prob, opt, opt.init(prob.params), prob.params, 50, record=(1, 5, 50))
    for K in (1, 5, 50):
        closed = -(M.T @ (Q @ (heavy_ball_polynomial(ev, K, alpha, beta) * (Q.T @ v))))
        dense = -(M.T @ (_dense_heavy_ball_P(H, K, alpha, beta) @ v))
        unrolled = tree.flatten(gs[K])
        public = tree.flatten(library_unrolled(prob, opt, K)[0])  # hg.Unrolled(optimizer=...)
        # Four evaluations of one polynomial (roots; matrix recurrence; autograd through K
        # torch.optim-style steps, by our loop and by hg.Unrolled): rounding only, measured ≤ 3e-13
        # for K ≤ 50 (the optimal pair's α* = 12.6 amplifies it most). A wrong sign of β, a missing
        # α or an off-by-one in K is ≥ 1e-2.
        for g in (unrolled, public, dense):
            assert float((g - closed).norm() / closed.norm()) <= 1e-10
    assert AP.rel_dist(w_end, prob.params) <= 1e-13  # from w* with zero velocity nothing moves


def test_nesterov_polynomial_equals_unrolled_nesterov(prob: AP.BilevelProblem) -> None:
    from hypergradients import optim
    from hypergradients.app.experiments.explain import library_unrolled, nesterov_polynomial

    H, L = prob.hessian, prob.lambda_max
    alpha, beta = 1 / L, 0.8
    ev, Q = torch.linalg.eigh(H)
    v = _flat_grad(prob.outer_loss, prob.params, prob.hparams)
    M = _mixed(prob, prob.params)
    # independent: the tangent of torch's nesterov step, b ← βb + (HJ + M), J ← J − α((HJ + M) + βb)
    J, B = torch.zeros_like(M), torch.zeros_like(M)
    dense = {}
    for k in range(1, 51):
        G = H @ J + M
        B = beta * B + G
        J = J - alpha * (G + beta * B)
        dense[k] = J.T @ v  # g_K = J_Kᵀ v (no direct term)
    opt = optim.nesterov(lr=alpha, momentum=beta)
    for K in (1, 2, 5, 50):
        closed = -(M.T @ (Q @ (nesterov_polynomial(ev, K, alpha, beta) * (Q.T @ v))))
        public = tree.flatten(library_unrolled(prob, opt, K)[0])
        # rounding only (measured ~1e-14); P_1 = α(1+β) vs heavy-ball's α would be off by 80 %
        for g in (public, dense[K]):
            assert float((g - closed).norm() / closed.norm()) <= 1e-10


def test_heavy_ball_with_beta_zero_is_neumann(prob: AP.BilevelProblem) -> None:
    from hypergradients.app.experiments.explain import heavy_ball_polynomial

    alpha = 1 / prob.lambda_max
    ev, Q = torch.linalg.eigh(prob.hessian)
    v = _flat_grad(prob.outer_loss, prob.params, prob.hparams)
    for K in (1, 7, 40):
        g = hg.hypergradient(
            prob.outer_loss,
            prob.inner_loss,
            prob.params,
            prob.hparams,
            method=hg.Neumann(iters=K, alpha=alpha),
            residual=False,
        )
        p = Q @ (heavy_ball_polynomial(ev, K, alpha, 0.0) * (Q.T @ v))
        ref = -(_mixed(prob, prob.params).T @ p)
        assert float((tree.flatten(g) - ref).norm() / ref.norm()) <= 1e-12  # rounding (measured ~1e-15)


def test_momentum_section(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    from hypergradients.app.experiments.explain import heavy_ball_polynomial

    m = result.momentum
    assert [r["K"] for r in m["rows"]] == list(CFG.momentum_steps)
    assert m["max_rel_diff"] <= 1e-10
    # β = 0.9 with α = 1/λ_max: every root pair is complex, |r| = √β exactly.
    assert m["rate_heavy_ball"] == pytest.approx(math.sqrt(0.9), rel=1e-12)
    assert m["rate_neumann"] == pytest.approx(1 - 1 / m["kappa"], rel=1e-12)
    # the optimal pair: double roots at both ends of the spectrum, |r| = √β* (the root's error
    # there is √eps ≈ 1e-8 of a square root of a rounding-level discriminant).
    assert m["rate_optimal"] == pytest.approx(m["rate_optimal_theory"], abs=1e-6)
    # Nesterov with α = 1/L, β = (√κ−1)/(√κ+1): a double root 1 − 1/√κ at λ_min, smaller moduli above
    assert m["rate_nesterov"] == pytest.approx(m["rate_nesterov_theory"], abs=1e-6)
    assert m["rate_optimal"] < m["rate_nesterov"] < m["rate_heavy_ball"] < m["rate_neumann"]
    # faster than Neumann at the same number of HVPs (measured at K = 50: 2.7e-3 and 0.10 vs 0.31)
    row = next(r for r in m["rows"] if r["K"] == 50)
    assert row["optimal_rel_dist"] < row["rel_dist"] < row["neumann_rel_dist"]
    assert row["nesterov_rel_dist"] < row["neumann_rel_dist"] and row["nesterov_rel_diff"] <= 1e-10
    # ... and to the IFT hypergradient as K → ∞: the closed form at K = 300, 1000 (cheap, no unrolling).
    ev, Q = torch.linalg.eigh(prob.hessian)
    v = _flat_grad(prob.outer_loss, prob.params, prob.hparams)
    exact_p = torch.linalg.solve(prob.hessian, v)
    for K, bound in ((300, 1e-9), (1000, 1e-12)):
        p = Q @ (heavy_ball_polynomial(ev, K, m["alpha_opt"], m["beta_opt"]) * (Q.T @ v))
        # bound: K ρ^K with ρ = 0.8516 is 3e-19 at K = 300, far below; what is left is rounding.
        assert float((p - exact_p).norm() / exact_p.norm()) <= bound
    rate = m["rate_optimal_theory"]
    c = m["curves"]
    for K, e in zip(c["K"], c["heavy_ball_optimal"], strict=True):
        # the error polynomial has double roots at the spectrum's ends: |e_K| ≤ (1 + K(1 − ρ)/ρ)... ≤ (K + 1) ρ^K
        assert e <= (K + 1) * rate**K * 1.01 + 1e-12


def test_adam_from_the_optimum_with_a_trained_v(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    from hypergradients import optim
    from hypergradients.app.experiments.explain import adam_reference, adam_warm_state

    w = result.adam["warm_state"]
    # the library's unrolled Adam equals the hand-derived tangent recurrence (rounding: measured ≤ 1e-14)
    assert w["max_rel_diff"] <= 1e-10
    assert w["weight_drift"] <= 1e-13  # m = 0 and a zero gradient: w* stays put
    assert w["step_eta_max"] < w["stable_below"]
    dists = [r["rel_dist"] for r in w["rows"]]
    assert dists == sorted(dists, reverse=True) and dists[-1] < 0.05  # K = 100: 1.2e-2 measured
    # and the limit is the IFT hypergradient: the recurrence (dense, cheap) out to K = 1000
    opt = optim.adam(lr=CFG.adam_lr)
    state, _ = adam_warm_state(prob, opt, CFG.adam_warm_steps)
    ref = adam_reference(prob, state, (1000,), lr=CFG.adam_lr, b1=0.9, b2=0.999, eps=1e-8)
    exact = tree.flatten(prob.exact)
    # predicted rate 0.974 per step at the start (D grows slowly as v decays): 0.974^1000 ~ 4e-12
    assert float((ref[1000] - exact).norm() / exact.norm()) <= 1e-8


def test_adam_from_the_optimum_with_v_zero_diverges(result: ExplainResult) -> None:
    z = result.adam["zero_state"]
    lr, eps = result.adam["lr"], result.adam["eps"]
    assert z["step_over_eps"] == pytest.approx(lr / eps) and not z["stable"]
    assert z["lr_max_stable"] == pytest.approx(
        2 * 1.9 * eps / (0.1 * result.problem["lambda_max"]), rel=1e-12
    )
    norms = [r["reference_norm_ratio"] for r in z["rows"]]
    # each step multiplies the derivative by ~ the predicted growth (2.7e5; early bias corrections differ)
    for a, b in itertools.pairwise(norms):
        assert b / a > 1e4
    assert z["rate"] > 1e4
    for r in z["rows"]:  # the public call refuses exactly the non-finite values, naming them
        assert r["library_finite"] == (r["hypergradient_error"] is None)
        assert r["hypergradient_error"] is None or "is not finite" in r["hypergradient_error"]
    drift = [r["weight_drift"] for r in z["rows"]]
    assert drift[0] < 1e-8 and drift[-1] > 1e-3  # rounding-level gradients amplified: w leaves w*


def test_noise_section(result: ExplainResult, prob: AP.BilevelProblem) -> None:
    nz = result.noise
    rows = {(r["batch_size"], r["K"]): r for r in nz["rows"]}
    assert sorted(rows) == [(b, K) for b in CFG.noise_batch_sizes for K in CFG.noise_steps]
    for (_, K), r in rows.items():
        assert len(r["cosines"]) == len(r["rel_dists"]) == CFG.noise_orders
        assert r["cosine_min"] <= r["cosine_mean"] <= r["cosine_max"] <= 1 + 1e-12
        assert r["cosine_std"] > 0 and r["spread"] > 0  # different orders, different hypergradients
        assert (
            r["neumann_cosine"]
            == pytest.approx(next(t["cosine"] for t in result.theorem if t["K"] == 10), abs=1e-12)
            if K == 10
            else True
        )
    small, big = min(CFG.noise_batch_sizes), max(CFG.noise_batch_sizes)
    for K in CFG.noise_steps:
        # the spread shrinks with the batch size (measured 16 vs 0.14 at K = 10)
        assert rows[(big, K)]["spread"] < rows[(small, K)]["spread"]
        assert rows[(big, K)]["cosine_std"] < rows[(small, K)]["cosine_std"]
        assert rows[(big, K)]["weight_drift_at_max_K"] < rows[(small, K)]["weight_drift_at_max_K"]


def test_full_batch_orders_are_the_theorem(prob: AP.BilevelProblem) -> None:
    from hypergradients.app.experiments.explain import noise_section

    # One batch of all training rows: every order is the full-batch path from w*, i.e. Neumann(K);
    # the permuted sums differ by rounding only (measured ~1e-16 relative).
    cfg = ExplainConfig.smoke(noise_orders=3, noise_batch_sizes=(prob.n_train,), noise_steps=(1, 6))
    rows = noise_section(prob, 1 / prob.lambda_max, cfg)["rows"]
    for r in rows:
        assert r["spread"] <= 1e-12 and r["mean_vs_neumann"] <= 1e-10 and r["weight_drift_at_max_K"] <= 1e-13
    with pytest.raises(hg.HypergradientError, match=r"noise batch sizes \[301\] exceed the 300 training"):
        noise_section(prob, 1.0, ExplainConfig.smoke(noise_batch_sizes=(301,)))


def test_batch_order_is_epochs_of_permutations() -> None:
    from hypergradients.app.experiments.explain import batch_order

    bs = batch_order(10, 3, 7, torch.Generator().manual_seed(0))
    assert [len(b) for b in bs] == [3] * 7
    # three batches per epoch (one row dropped each epoch), no row twice within an epoch
    for e in range(2):
        rows = torch.cat(bs[3 * e : 3 * e + 3])
        assert len(set(rows.tolist())) == 9
    again = batch_order(10, 3, 7, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(bs, again, strict=True))


def test_unroll_optimizer_on_minibatches_is_unrolled_with_batches(prob: AP.BilevelProblem) -> None:
    from hypergradients import optim
    from hypergradients.app.experiments.explain import batch_order, library_unrolled, unroll_optimizer

    # Our loop through (init, update) and hg.Unrolled(optimizer=, batches=) on the same 7 batches of
    # 20 rows from w*: the same operations, so rounding only (measured ~1e-16).
    batches = batch_order(prob.n_train, 20, 7, torch.Generator().manual_seed(3))
    for opt in (optim.sgd(1 / prob.lambda_max), optim.adam(0.01)):
        gs, w_ours = unroll_optimizer(prob, opt, opt.init(prob.params), prob.params, 7, batches=batches)
        g, w_lib = library_unrolled(prob, opt, 7, batches=batches)
        assert AP.rel_dist(gs[7], g) <= 1e-12 and AP.rel_dist(w_ours, w_lib) <= 1e-14
        assert AP.rel_dist(w_lib, prob.params) > 1e-4  # minibatch gradients at w* are not zero


def test_unroll_optimizer_full_batch_sgd_is_unrolled(prob: AP.BilevelProblem) -> None:
    from hypergradients import optim
    from hypergradients.app.experiments.explain import unroll_optimizer

    # The same K steps as hg.Unrolled from w₀ = 0 (the path moves): same derivative to rounding.
    alpha = 1 / prob.lambda_max
    opt = optim.sgd(alpha)
    gs, _ = unroll_optimizer(prob, opt, opt.init(prob.zeros()), prob.zeros(), 20, record=(20,))
    g = hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.zeros(), prob.hparams, method=hg.Unrolled(steps=20, lr=alpha)
    )
    assert AP.rel_dist(gs[20], g) <= 1e-12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum_beta": 1.0}, r"momentum_beta=1\.0 must be in \[0, 1\)"),
        ({"adam_b2": 1.5}, r"adam_b2=1\.5 must be in \[0, 1\)"),
        ({"noise_orders": 1}, r"noise_orders must be an integer >= 2 .*got 1"),
        ({"noise_batch_sizes": ()}, r"noise_batch_sizes .*positive integers, got \(\)"),
        ({"adam_eps": 0.0}, r"adam_eps=0\.0 must be a finite number > 0"),
    ],
)
def test_beyond_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(hg.HypergradientError, match=match):
        ExplainConfig(**kwargs).validate()


def test_progress_units_add_up_to_the_cost() -> None:
    # The progress display ends at exactly 100 % only if every part reports what cost() counts.
    cfg = ExplainConfig.smoke(
        theorem_steps=(1, 2),
        cold_steps=(1, 3),
        truncate=2,
        lr_steps=2,
        momentum_steps=(1, 4),
        adam_warm_steps=8,
        adam_steps=(1, 3),
        adam_zero_steps=(1, 2),
        noise_orders=2,
        noise_batch_sizes=(50,),
        noise_steps=(2, 3),
    )
    units: list[int] = []
    explain(cfg, progress=units.append)
    assert sum(units) == cfg.cost()
