"""HVPs per hyper step with and without a carried ``hg.SolverState``, on a slowly changing problem.

Algorithm 1 in miniature: multiclass logistic regression with one L2 per weight
(``tests/library/problems.py::logistic`` with n = 300 rows, d = 30 features, c = 5 classes: 155 weights,
150 hyperparameters), float64, ``w`` at ``w*`` to start. 20 hyper steps; between two of them a
hyper step ``λ ← λ − 0.5·g`` and 10 steps of gradient descent on ``L_T`` (step 1/λ_max), so
``w`` and ``H`` drift slowly as in training. At every step each method is called twice on the
same ``(w, λ)``: without a state (what every call did before states were honoured) and with the
state carried from its previous call. Reported: HVPs per call (``info.hvps``, residual off as
in the trainer), the relative difference of the two hypergradients, and each one's relative
error against the exact (dense) hypergradient at that point, the worst over the 20 steps.

    .venv/bin/python benchmarks/solver_state.py   # ~10 s; writes benchmarks/results/solver_state.json
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

STEPS = 20
METHODS = {
    "Neumann(iters=20, alpha='auto')": hg.Neumann(iters=20),
    "Nystrom(rank=20)": hg.Nystrom(rank=20),
    "Auto()": hg.Auto(),
    "CG(iters=20, tol=1e-6)": hg.CG(iters=20, tol=1e-6),
}


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    prob = P.logistic(n=300, d=30, c=5, n_val=200, seed=3)
    w, lam = dict(prob.params), dict(prob.hparams)
    lr = 1.0 / P.lambda_max(prob)
    states: dict[str, hg.SolverState] = {name: m.init(w) for name, m in METHODS.items()}
    rows: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in ("cold", "carried", "rel_diff", "err_cold", "err_carried")} for name in METHODS
    }
    for _ in range(STEPS):
        g = hg.hypergradient(prob.outer_loss, prob.inner_loss, w, lam, method=hg.Exact())
        for name, m in METHODS.items():
            g0, i0 = hg.hypergradient(
                prob.outer_loss, prob.inner_loss, w, lam, method=m, return_info=True, residual=False
            )
            g1, i1 = hg.hypergradient(
                prob.outer_loss,
                prob.inner_loss,
                w,
                lam,
                method=m,
                return_info=True,
                residual=False,
                state=states[name],
            )
            assert i1.state is not None
            states[name] = i1.state
            rows[name]["cold"].append(i0.hvps)
            rows[name]["carried"].append(i1.hvps)
            rows[name]["rel_diff"].append(P.rel_err(g1, g0))
            rows[name]["err_cold"].append(P.rel_err(g0, g))
            rows[name]["err_carried"].append(P.rel_err(g1, g))
        # The hyper step (from the Exact hypergradient, the same for every method) and 10 inner steps.
        lam = {k: v - 0.5 * g[k] for k, v in lam.items()}
        for _ in range(10):
            wl = tree.clone_leaves(w, requires_grad=True)
            gw = torch.autograd.grad(prob.inner_loss(wl, lam), list(wl.values()))
            w = {k: (wl[k] - lr * gk).detach() for k, gk in zip(wl, gw, strict=True)}
    out = {
        "problem": "logistic n=300 d=30 c=5 (155 weights), 20 hyper steps, 10 GD steps between",
        "seconds": time.perf_counter() - t0,
        "methods": {},
    }
    print(
        f"{'method':34s} {'HVPs/call cold':>15s} {'carried':>8s} {'saved':>6s} {'max rel diff':>13s} "
        f"{'max err cold':>13s} {'carried':>9s}"
    )
    for name, r in rows.items():
        cold, car = statistics.mean(r["cold"]), statistics.mean(r["carried"])
        out["methods"][name] = {
            "hvps_cold": r["cold"],
            "hvps_carried": r["carried"],  # type: ignore[index]
            "mean_cold": cold,
            "mean_carried": car,
            "max_rel_diff": max(r["rel_diff"]),
            "max_err_cold": max(r["err_cold"]),
            "max_err_carried": max(r["err_carried"]),
            "rel_diff": r["rel_diff"],
        }
        print(
            f"{name:34s} {cold:15.1f} {car:8.1f} {1 - car / cold:6.0%} {max(r['rel_diff']):13.2e} "
            f"{max(r['err_cold']):13.2e} {max(r['err_carried']):9.2e}"
        )
    print(f"({out['seconds']:.1f} s)")
    (ROOT / "benchmarks" / "results" / "solver_state.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
