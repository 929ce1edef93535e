"""`hypergradients compare` and :mod:`hypergradients.app.experiments.compare`.

Every point is re-derived from dense float64 closed forms of the same approximation (the exact
hypergradient, the Neumann partial sum, Identity), and the HVP counts are checked against the
method's definition; CG and full-rank Nyström must reach the exact answer on the 11-weight ridge.
"""

from __future__ import annotations

import json

import pytest
import torch

import hypergradients as hg
from hypergradients.app.cli import main as cli_main
from hypergradients.app.experiments import compare as compare_mod
from hypergradients.app.experiments import problems as AP
from hypergradients.app.experiments.compare import CompareConfig, CompareResult, compare, compare_problem
from hypergradients.core import tree

DT = torch.float64
CFG = CompareConfig.smoke(budgets=(0, 1, 2, 5, 11, 20))


@pytest.fixture(scope="module")
def result() -> CompareResult:
    return compare(CFG)


@pytest.fixture(scope="module")
def diabetes() -> AP.BilevelProblem:
    return AP.load_problem("diabetes")


def _curves(result: CompareResult, name: str) -> dict[str, list[dict[str, float]]]:
    return next(p for p in result.problems if p.name == name).curves


def _pieces(prob: AP.BilevelProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``(H, M, v)``: ``M = ∂²L_T/∂w∂λᵀ`` (``e^λ_j W*_j`` on the weight rows), ``v = ∂L_V/∂w``."""
    w = tree.clone_leaves(prob.params, requires_grad=True)
    v = tree.flatten(tree.as_tree(torch.autograd.grad(prob.outer_loss(w, prob.hparams), list(w.values())), w))
    lam = prob.hparams["log_weight_decay"].reshape(-1)
    M = torch.zeros(prob.n_weights, lam.numel(), dtype=DT)
    M[torch.arange(lam.numel()), torch.arange(lam.numel())] = torch.exp(lam) * prob.params["weight"].reshape(
        -1
    )
    return prob.hessian, M, v


def test_ridge_reference_is_the_closed_form(diabetes: AP.BilevelProblem) -> None:
    # Ridge: w* = A⁻¹X̃ᵀy/n is linear in y and H = A is constant, so the IFT is exact; check the
    # reference against central finite differences of L_V(w*(λ)) with a re-solved w* (eps = 1e-4:
    # L_V is smooth in λ, truncation ~1e-8 relative, rounding ~1e-12).
    eps = 1e-4
    lam = diabetes.hparams["log_weight_decay"]
    for j in range(0, lam.numel(), 3):
        vals = []
        for s in (1.0, -1.0):
            h = {"log_weight_decay": lam.clone()}
            h["log_weight_decay"][j] += s * eps
            w, _, _ = AP.newton_minimize(diabetes.inner_loss, diabetes.hessian_fn, diabetes.params, h)
            vals.append(float(diabetes.outer_loss(w, h)))
        assert float(diabetes.exact["log_weight_decay"][j]) == pytest.approx(
            (vals[0] - vals[1]) / (2 * eps), rel=1e-6
        )


def test_neumann_and_identity_points_match_dense_formulas(
    result: CompareResult, diabetes: AP.BilevelProblem
) -> None:
    H, M, v = _pieces(diabetes)
    exact = tree.flatten(diabetes.exact)
    pc = next(p for p in result.problems if p.name == "diabetes")
    alpha = pc.alpha
    assert alpha == pytest.approx(1.0 / diabetes.lambda_max, rel=1e-12)

    def check(point: dict[str, float], p: torch.Tensor) -> None:
        g = -(M.T @ p)
        # Same quantities, different summation order: 1e-10 is rounding for ≤ 21 products.
        assert point["cosine"] == pytest.approx(float(g @ exact / (g.norm() * exact.norm())), abs=1e-10)
        assert point["rel_dist"] == pytest.approx(float((g - exact).norm() / exact.norm()), rel=1e-9)

    check(pc.curves["Identity"][0], v)  # Identity(scale=1): p = v
    for point in pc.curves["Neumann"]:
        h = int(point["budget"])
        p, term = torch.zeros_like(v), v.clone()
        for _ in range(h + 1):  # h HVPs buy h + 1 terms
            p, term = p + term, term - alpha * (H @ term)
        check(point, alpha * p)


def test_first_order_and_adam_identity_points_match_their_formulas(
    result: CompareResult, diabetes: AP.BilevelProblem
) -> None:
    """FirstOrder(steps=K, lr=α, σ=1e4) at w* is the K-term Neumann series up to O(1/σ²) ≈ 1e-8 (cond(H) ≈
    220 amplifies that to ~1e-6 at most), placed at the budget h = 2K or 2K+1 with 4K+2 gradients and no
    HVP; AdamIdentity is −M(v/D) with D = adam_diagonal of the seeded Adam run (dense, 1e-10)."""
    H, M, v = _pieces(diabetes)
    exact = tree.flatten(diabetes.exact)
    pc = next(p for p in result.problems if p.name == "diabetes")
    alpha = pc.alpha

    def check(point: dict[str, float], p: torch.Tensor, tol: float) -> None:
        g = -(M.T @ p)
        assert point["cosine"] == pytest.approx(float(g @ exact / (g.norm() * exact.norm())), abs=tol)
        assert point["rel_dist"] == pytest.approx(float((g - exact).norm() / exact.norm()), rel=tol)

    assert [p["budget"] for p in pc.curves["FirstOrder"]] == [h for h in CFG.budgets if h >= 2]
    for point in pc.curves["FirstOrder"]:
        K = int(point["budget"]) // 2
        assert point["hvps"] == 0 and point["grad_evals"] == 4 * K + 2
        p, term = torch.zeros_like(v), v.clone()
        for _ in range(K):
            p, term = p + term, term - alpha * (H @ term)
        check(point, alpha * p, 1e-6)
    D = compare_mod.adam_preconditioner(diabetes, CFG)
    (point,) = pc.curves["AdamIdentity"]
    assert point["hvps"] == 0 and point["budget"] == 0
    check(point, v / tree.flatten(D), 1e-10)


def test_hvp_counts_are_honest(result: CompareResult) -> None:
    for pc in result.problems:
        c = pc.curves
        n = pc.summary["n_weights"]
        assert [p["hvps"] for p in c["Identity"]] == [0]
        assert all(p["hvps"] == p["budget"] for p in c["Neumann"])
        assert all(p["hvps"] == p["budget"] for p in c["Unrolled"])
        assert all(p["hvps"] == p["budget"] for p in c["Nystrom"])
        assert all(1 <= p["budget"] <= n for p in c["Nystrom"])  # rank never above the size
        assert all(p["hvps"] <= p["budget"] for p in c["CG"])
        assert [p["budget"] for p in c["Neumann"]] == list(CFG.budgets)
        assert [p["budget"] for p in c["CG"]] == [h for h in CFG.budgets if h >= 1]


def test_cg_and_full_rank_nystrom_are_exact_on_ridge(result: CompareResult) -> None:
    c = _curves(result, "diabetes")
    # 11 weights: CG in exact arithmetic terminates in ≤ 11 steps, Nyström of rank 11 is H itself.
    # 1e-8 allows cond(H) ≈ 220 times the rounding of the 11-step recurrences.
    for method in ("CG", "Nystrom"):
        p11 = next(p for p in c[method] if p["budget"] == 11)
        assert p11["rel_dist"] <= 1e-8 and p11["cosine"] >= 1 - 1e-12
    cg20 = next(p for p in c["CG"] if p["budget"] == 20)
    # Stopped at its tolerance (a step or two past n, rounding): the rest of the budget is not spent.
    assert cg20["hvps"] <= 13 and cg20["rel_dist"] <= 1e-8


def test_unrolled_cold_start_sees_nothing_after_one_step(result: CompareResult) -> None:
    # w_0 = 0 makes the mixed partial e^λ W_0 vanish, so the one-step hypergradient is zero.
    for pc in result.problems:
        first = pc.curves["Unrolled"][0]
        assert first["budget"] == 1 and first["cosine"] == 0.0 and first["rel_dist"] == 1.0


def test_table_and_json(result: CompareResult) -> None:
    table = result.table()
    for name in ("diabetes", "breast-cancer"):
        assert f"**{name}**" in table
    for method in ("Identity", "AdamIdentity", "Neumann", "CG", "Nystrom", "Unrolled", "FirstOrder"):
        assert f"| {method} |" in table
    assert "| 20 HVPs |" in table
    d = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert [p["name"] for p in d["problems"]] == ["diabetes", "breast-cancer"]


def test_method_subset_and_config_errors(diabetes: AP.BilevelProblem) -> None:
    pc = compare_problem(diabetes, CompareConfig(budgets=(0, 3), methods=("CG",)))
    assert list(pc.curves) == ["CG"] and [p["budget"] for p in pc.curves["CG"]] == [3]
    with pytest.raises(hg.HypergradientError, match=r"unknown method\(s\) \['LBFGS'\]"):
        compare(CompareConfig(methods=("LBFGS",)))
    with pytest.raises(hg.HypergradientError, match=r"budgets .* got \(-1,\)"):
        compare(CompareConfig(budgets=(-1,)))
    with pytest.raises(hg.HypergradientError, match=r"alpha_scale=2\.0 must be in \(0, 2\)"):
        compare(CompareConfig(alpha_scale=2.0))


def test_command_writes_table_json_and_png(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    rc = cli_main(
        ["compare", "--problems", "diabetes", "--budgets", "0,1,3,11", "--out", str(out), "--quiet"]
    )
    assert rc == 0 and capsys.readouterr().out == f"{out / 'compare.json'}\n"  # --quiet: the path only
    d = json.loads((out / "compare.json").read_text())
    curves = d["problems"][0]["curves"]
    assert sorted(curves) == [
        "AdamIdentity",
        "CG",
        "FirstOrder",
        "Identity",
        "Neumann",
        "Nystrom",
        "Unrolled",
    ]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| CG |" in (out / "compare.md").read_text()
    rc = cli_main(
        [
            "compare",
            "--problems",
            "diabetes",
            "--budgets",
            "0,2",
            "--methods",
            "Neumann,CG",
            "--out",
            str(out),
            "--no-figures",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "| Neumann |" in text and "| Unrolled |" not in text


def test_command_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", "--methods", "Neumann,LBFGS"])
    assert e.value.code == 2 and "unknown ['LBFGS']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", "--problems", "iris"])
    assert (
        e.value.code == 2
        and "unknown ['iris']; choose from breast-cancer, digits, diabetes" in capsys.readouterr().err
    )
