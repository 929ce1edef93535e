"""``hg.Auto()``'s stopping rule against the condition number of H: cosine with the exact hypergradient.

Problems: ``tests/library/problems.py::conditioned_logistic`` (binary logistic regression, one L2 per
weight, d weights and d hyperparameters, feature scales from 1 to 1e-2, the L2 strength tuned
until cond(H) at ``w*`` is within 1 % of κ), float64, ``w*`` by Newton to ‖∇‖ ≤ 1e-13, the exact
hypergradient by a dense solve. For each κ, 8 seeds; cold calls (no warm start).

* old default: ``Auto(error_tol=None)``, CG to relative residual 1e-2 only;
* ``Auto(error_tol=ε)``, which also stops only once the error estimate ``‖r‖/(θ_min‖p‖)`` (θ_min
  the smallest Ritz value of CG's Lanczos tridiagonal) is ≤ ε, for ε = 1e-1, 3e-2 (the new
  default, ``Auto()``) and 1e-2.

Two sizes: d = 60 weights (150 training rows) and d = 200 (500 rows).

    .venv/bin/python benchmarks/auto_tolerance.py   # ~10 s; writes benchmarks/results/auto_tolerance.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import hypergradients as hg
from hypergradients.core import tree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "library"))
import problems as P  # noqa: E402  (the shared problems with known answers live with the tests)

KAPPAS = (1e1, 1e2, 1e3, 1e4)
SEEDS = range(8)
SIZES = ((60, 150, 100), (200, 500, 300))  # (d, training rows, validation rows)
RULES = {
    "residual only (old default)": hg.Auto(error_tol=None),
    "error_tol=1e-1": hg.Auto(error_tol=1e-1),
    "error_tol=3e-2 (new default)": hg.Auto(),
    "error_tol=1e-2": hg.Auto(error_tol=1e-2),
}


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return float(fa @ fb / (fa.norm() * fb.norm()))


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    for d, n, n_val in SIZES:
        for kappa in KAPPAS:
            res: dict[str, list[tuple[float, int, bool]]] = {r: [] for r in RULES}
            conds = []
            for seed in SEEDS:
                prob = P.conditioned_logistic(kappa, seed=seed, d=d, n=n, n_val=n_val)
                ev = torch.linalg.eigvalsh(prob.hessian)
                conds.append(float(ev[-1] / ev[0]))
                for name, method in RULES.items():
                    g, info = hg.hypergradient(
                        prob.outer_loss,
                        prob.inner_loss,
                        prob.params,
                        prob.hparams,
                        method=method,
                        return_info=True,
                    )
                    res[name].append((cosine(g, prob.reference), info.hvps, bool(info.converged)))
            row: dict[str, object] = {"d": d, "kappa": kappa, "cond_measured": [min(conds), max(conds)]}
            for name, r in res.items():
                row[name] = {
                    "min_cos": min(c for c, _, _ in r),
                    "median_cos": statistics.median(c for c, _, _ in r),
                    "mean_hvps": statistics.mean(h for _, h, _ in r),
                    "not_converged": sum(not ok for _, _, ok in r),
                }
            rows.append(row)
    print(
        f"{len(SEEDS)} seeds per (d, κ), cold calls, float64. Each cell: smallest cosine with the exact "
        "hypergradient / mean HVPs\n(* = some calls stopped at max_iters=200 before both rules held)\n"
    )
    print("| d | κ = cond(H) | " + " | ".join(RULES) + " |")
    print("|---:|---:|" + "---:|" * len(RULES))
    for row in rows:
        cells = []
        for name in RULES:
            c = row[name]
            assert isinstance(c, dict)
            star = "*" if c["not_converged"] else ""
            cells.append(f"{c['min_cos']:.5f} / {c['mean_hvps']:.1f}{star}")
        print(f"| {row['d']} | {row['kappa']:.0e} | " + " | ".join(cells) + " |")
    out = ROOT / "benchmarks" / "results" / "auto_tolerance.json"
    out.write_text(
        json.dumps(
            {"sizes": SIZES, "seeds": len(SEEDS), "rows": rows, "wall_s": time.perf_counter() - t0}, indent=1
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"\n({time.perf_counter() - t0:.0f} s; written {out.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
