"""The measurement code behind ``hypergradients bench`` (small problems; timings are not asserted).

What is checked: the baselines compute what they claim (the plain CG/Neumann loop gives the same
hypergradient as ``hg.CG``/``hg.Neumann`` with the same iteration count, to rounding, 1e-10
relative in float64), the logistic problem's exact hypergradient is right (against ``hg.Exact``),
each case reports time, memory and accuracy, and the command prints its table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hypergradients as hg
from hypergradients.app import cli
from hypergradients.app.experiments import bench
from hypergradients.core import tree
from hypergradients.training.files import UnreadableFileError


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench")
    lp, mp = d / "logistic.pt", d / "mlp.pt"
    torch.save(bench.make_logistic(d=30, n_train=120, n_val=60), lp)
    torch.save(bench.make_mlp((6, 8, 8, 3), batch=16, dtype=torch.float64), mp)
    return {"logistic": lp, "mlp": mp}


def test_logistic_problem_is_at_optimum_and_exact_is_exact(small: dict[str, Path]) -> None:
    data = torch.load(small["logistic"], weights_only=True)
    inner, outer = bench.logistic_losses(data)
    p, h = {"w": data["w_star"]}, {"log_lam": data["log_lam"]}
    w = tree.clone_leaves(p, requires_grad=True)
    gnorm = float(torch.autograd.grad(inner(w, h), w["w"])[0].norm())
    assert gnorm < 1e-10  # Newton's stopping rule
    ref = hg.hypergradient(outer, inner, p, h, method=hg.Exact())
    assert float((ref["log_lam"] - data["exact"]).norm() / data["exact"].norm()) < 1e-10


# The MLP is at its random initialisation (H indefinite): CG rightly refuses there, Neumann with a
# small alpha is what the benchmark times.
@pytest.mark.parametrize(
    ("problem", "method"), [("logistic", "cg"), ("logistic", "neumann"), ("mlp", "neumann")]
)
def test_plain_loop_matches_ours(small: dict[str, Path], method: str, problem: str) -> None:
    data = torch.load(small[problem], weights_only=True)
    if problem == "logistic":
        inner, outer = bench.logistic_losses(data)
        p, h, alpha = {"w": data["w_star"]}, {"log_lam": data["log_lam"]}, float(data["alpha"])
    else:
        inner, outer = bench.mlp_losses(data)
        p, h, alpha = data["params"], data["hparams"], 1e-2
    plain = bench.plain_implicit(inner, outer, p, h, method=method, iters=7, alpha=alpha)
    m = hg.CG(iters=7, tol=0.0) if method == "cg" else hg.Neumann(iters=7, alpha=alpha)
    ours = hg.hypergradient(outer, inner, p, h, method=m, residual=False)
    assert tree.norm(ours) > 0
    assert float(tree.norm(tree.sub(plain, ours)) / tree.norm(ours)) < 1e-10


def test_plain_unrolled_matches_ours(small: dict[str, Path]) -> None:
    data = torch.load(small["logistic"], weights_only=True)
    inner, outer = bench.logistic_losses(data)
    w0, h = {"w": torch.zeros_like(data["w_star"])}, {"log_lam": data["log_lam"]}
    plain = bench.plain_unrolled(inner, outer, w0, h, steps=9, alpha=float(data["alpha"]))
    ours = hg.hypergradient(outer, inner, w0, h, method=hg.Unrolled(steps=9, lr=float(data["alpha"])))
    assert float(tree.norm(tree.sub(plain, ours)) / tree.norm(ours)) < 1e-12


@pytest.mark.parametrize(
    ("problem", "case"),
    [
        ("logistic", "cg"),
        ("logistic", "auto"),
        ("logistic", "plain-neumann"),
        ("mlp", "train-step"),
        ("unrolled", "unrolled-checkpoint"),
    ],
)
def test_run_case_reports_time_memory_accuracy(small: dict[str, Path], problem: str, case: str) -> None:
    data = small["mlp" if problem == "mlp" else "logistic"]
    r = bench.run_case(
        {
            "problem": problem,
            "case": case,
            "data": str(data),
            "repeats": 2,
            "threads": 1,
            "iters": 10,
            "steps": 6,
        }
    )
    assert r.status == "ok" and r.median_s is not None and r.median_s > 0 and len(r.times_s) == 2
    if problem == "logistic":
        assert r.cosine is not None and r.rel_err is not None
        # 10 CG steps / Auto on 30 weights: near exact; Neumann-10 converges like (1 − 1/cond)^10
        # and is measured at cosine 0.946 here.
        assert r.cosine > (0.9 if case == "plain-neumann" else 0.999)


class _System:
    """Pickles as ``os.system(command)``: what a crafted problem file would run on load."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.system, (self.command,))


def test_problem_files_load_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "logistic.pt"
    torch.save({"X_train": torch.zeros(2, 2), "payload": _System(f"touch {marker}")}, evil)
    with pytest.raises(UnreadableFileError, match=r"bench problem file .*logistic\.pt.*refused for safety"):
        bench.run_case({"problem": "logistic", "case": "cg", "data": str(evil), "repeats": 1, "threads": 1})
    assert not marker.exists()
    r = bench.run_isolated(
        {"problem": "logistic", "case": "cg", "data": str(evil), "repeats": 1, "threads": 1}
    )
    assert r.status == "error" and "refused for safety" in r.note and not marker.exists()


def test_run_isolated_in_a_subprocess(small: dict[str, Path]) -> None:
    r = bench.run_isolated(
        {
            "problem": "logistic",
            "case": "cg",
            "data": str(small["logistic"]),
            "repeats": 1,
            "threads": 1,
            "iters": 5,
        }
    )
    assert r.status == "ok", r.note
    assert r.hvps == 5 and r.cosine is not None
    bad = bench.run_isolated({"problem": "logistic", "case": "nope", "data": str(small["logistic"])})
    assert bad.status == "error" and "unknown case 'nope'" in bad.note


def test_ratios_pair_ours_with_the_plain_loop() -> None:
    R = bench.Result
    rs = [
        R("logistic", "cg", 0.9, peak_mem_bytes=100),
        R("logistic", "plain-cg", 1.0, peak_mem_bytes=200),
        R("mlp", "neumann", 3.0, peak_mem_bytes=30),
        R("mlp", "plain-neumann", 2.0, peak_mem_bytes=20),
        R("mlp", "train-step", 0.1, peak_mem_bytes=10),
        R("unrolled", "unrolled-checkpoint", 2.0, peak_mem_bytes=5, params={"steps": 100}),
        R("unrolled", "plain-unrolled", 1.0, peak_mem_bytes=50, params={"steps": 100}),
    ]
    got = bench.ratios(rs)
    assert got["time logistic/cg"] == pytest.approx(0.9)
    assert got["mem logistic/cg"] == pytest.approx(0.5)
    assert got["time mlp/neumann"] == pytest.approx(1.5)
    assert got["mem mlp/neumann vs one training step"] == pytest.approx(3.0)
    assert got["mem unrolled/unrolled-checkpoint@100"] == pytest.approx(0.1)
    assert "time logistic/neumann" not in got  # no pair, no ratio


def test_command_prints_table_and_json(
    small: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The suite itself runs in-process here (subprocess start-up is covered above).
    seen: list[bench.Suite] = []

    def fake_suite(suite: bench.Suite, **_: object) -> list[bench.Result]:
        seen.append(suite)
        return [
            bench.run_case(
                {
                    "problem": "logistic",
                    "case": c,
                    "data": str(small["logistic"]),
                    "repeats": 1,
                    "threads": 1,
                    "iters": suite.iters,
                }
            )
            for c in ("plain-cg", "cg")
        ]

    monkeypatch.setattr(bench, "run_suite", fake_suite)
    assert cli.main(["bench", "--smoke", "--iters", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "plain-cg" in out and "time logistic/cg" in out
    assert seen[0].iters == 4 and seen[0].d == 50  # --smoke sizes, --iters honoured
    assert cli.main(["bench", "--smoke", "--quiet", "--json", "--out", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["case"] for r in data["results"]} == {"plain-cg", "cg"} and "time logistic/cg" in data["ratios"]
    # the old name of --smoke still works (hidden, with a note on stderr)
    assert cli.main(["bench", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert seen[-1].d == 50 and captured.out == f"{tmp_path / 'bench.json'}\n"
    assert "--quick is deprecated; use --smoke" in captured.err


def test_command_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--iters", "0"]) == 2
    assert (
        "hypergradients bench: error: config key 'iters': got 0; expected an integer >= 1"
        in capsys.readouterr().err
    )
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
