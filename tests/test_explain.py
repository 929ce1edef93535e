"""`hypergradients explain` and :mod:`hypergradients.experiments.explain`.

The numbers the command reports are re-derived here independently, in float64, from the dense
closed forms: the Hessian against autograd, the exact hypergradient against finite differences
of ``L_V(w*(λ))``, unrolled (cold-start and truncated) hypergradients against the dense
Jacobian recurrence ``J_{k+1} = (I − αH(w_k)) J_k − α M(w_k)``, ``g = J_Kᵀ ∂L_V/∂w(w_K)``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import hypergradients as hg
from hypergradients import tree
from hypergradients.cli import main as cli_main
from hypergradients.experiments import problems as AP
from hypergradients.experiments.explain import ExplainConfig, ExplainResult, explain

DT = torch.float64
CFG = ExplainConfig.quick(cold_steps=(1, 10, 100, 300), truncate=10, lr_steps=20)


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
        Wx, bx = x[:W.numel()].reshape(shape), x[W.numel():].reshape(b.shape)
        z = X @ Wx + bx
        data = (torch.nn.functional.softplus(-(2.0 * y - 1.0) * z).mean() if classes == 2
                else torch.nn.functional.cross_entropy(z, y))
        return data + 0.5 * torch.sum(decay * x ** 2)

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
            hv = torch.autograd.grad(g, list(wr.values()), grad_outputs=[vt[k] for k in wr], retain_graph=True)
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
    from hypergradients.experiments.explain import mistaken_hypergradient

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


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha_scale": 2.5}, r"alpha_scale=2\.5 .*\(0, 2\)"),
    ({"theorem_steps": (1, 0)}, r"theorem_steps .*positive integers, got \(1, 0\)"),
    ({"truncate": 0}, r"truncate must be a positive integer, got 0"),
])
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(hg.HypergradientError, match=match):
        explain(ExplainConfig(**kwargs))


def test_unknown_problem_names_the_choices() -> None:
    with pytest.raises(hg.HypergradientError, match=r"unknown problem 'iris'.*breast-cancer"):
        AP.load_problem("iris")


# ---------------------------------------------------------------------------------- the command
def test_command_writes_json_and_figures(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ex"
    rc = cli_main(["explain", "--steps", "1,5,20", "--cold-steps", "1,5,20", "--truncate", "3",
                   "--lr-steps", "5", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    on_disk = json.loads((out / "explain.json").read_text())
    assert printed == on_disk
    assert on_disk["theorem_max_rel_diff"] <= 1e-12
    assert [k for k, _ in on_disk["cold_start_cosine"]] == [1, 5, 20]
    for name in ("explain_cosine.png", "explain_theorem.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(on_disk["figures"]) == ["explain_cosine.png", "explain_theorem.png"]


def test_command_prints_an_account(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["explain", "--steps", "1,3", "--cold-steps", "1,3", "--truncate", "2", "--lr-steps", "3",
                   "--out", str(tmp_path), "--no-figures", "--quiet"])
    assert rc == 0 and capsys.readouterr().out == f"{tmp_path / 'explain.json'}\n"  # --quiet: the path only
    rc = cli_main(["explain", "--steps", "1,3", "--cold-steps", "1,3", "--truncate", "2", "--lr-steps", "3",
                   "--out", str(tmp_path), "--no-figures"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "theorem_max_rel_diff" in text and "PathOnlyHyperparameterError" in text
    assert "finite difference" in text


def test_command_rejects_bad_values(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["explain", "--alpha-scale", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "alpha_scale=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["explain", "--steps", "1,x"])
    assert e.value.code == 2 and "'1,x' is not a comma-separated list of integers" in capsys.readouterr().err


def test_command_restores_threads_and_reports_unwritable_out(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = cli_main(["explain", "--steps", "1", "--cold-steps", "1", "--truncate", "1", "--lr-steps", "1",
                   "--out", str(blocker / "sub"), "--quiet", "--no-figures", "--threads", "1"])
    # refused before any work (exit 2, a usage error), naming the file that is in the way
    assert rc == 2 and f"{str(blocker)!r} is a file" in capsys.readouterr().err
    rc = cli_main(["explain", "--steps", "1", "--cold-steps", "1", "--truncate", "1", "--lr-steps", "1",
                   "--out", str(tmp_path / "ok"), "--quiet", "--no-figures", "--threads", "1"])
    assert rc == 0 and torch.get_num_threads() == before
