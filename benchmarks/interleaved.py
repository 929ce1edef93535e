"""Ours against the plain autograd loop, interleaved in ONE process: the ≤ 1.05× overhead target.

    .venv/bin/python benchmarks/interleaved.py [--problem benchmarks/results/problem.npz] [--repeats 9]

The subprocess table of ``run.py`` compares libraries fairly but carries the run-to-run noise of a
shared machine (±15–25 % between two runs of one case). Here both sides run in the same process on
the same tensors, alternating call by call after one warm-up each, so a load change hits both
equally; the ratio of the medians is the overhead of the library over the bare loop:

* plain: ``hypergradients.app.experiments.bench.plain_implicit`` / ``plain_unrolled`` (the loop of
  ``benchmarks/peers/plain_peer.py``: the ``∂L_T/∂w`` graph built once, textbook CG/Neumann);
* ours: ``hg.hypergradient`` with ``hg.CG(iters=20, tol=0)``, ``hg.Neumann(iters=20, alpha)``,
  ``hg.Unrolled(steps=100, lr=alpha)``, ``residual=False`` (the plain loop computes none either).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import hypergradients as hg
from hypergradients.app.experiments import bench

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default=str(HERE / "results" / "problem.npz"))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    z = np.load(args.problem)
    t = {k: torch.from_numpy(z[k]) for k in ("X_train", "y_train", "X_val", "y_val", "w_star", "log_lam")}
    alpha = float(z["alpha"])

    inner, outer = bench.logistic_losses(t)  # the same losses as `hypergradients bench`

    P, H = {"w": t["w_star"]}, {"log_lam": t["log_lam"]}

    def ours(m: hg.Method) -> Callable[[], object]:
        return lambda: hg.hypergradient(outer, inner, P, H, method=m, residual=False)

    pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "CG-20": (
            lambda: bench.plain_implicit(inner, outer, P, H, method="cg", iters=20, alpha=alpha),
            ours(hg.CG(iters=20, tol=0.0)),
        ),
        "Neumann-20": (
            lambda: bench.plain_implicit(inner, outer, P, H, method="neumann", iters=20, alpha=alpha),
            ours(hg.Neumann(iters=20, alpha=alpha)),
        ),
        "unrolled-100": (
            lambda: bench.plain_unrolled(inner, outer, P, H, steps=100, alpha=alpha),
            ours(hg.Unrolled(steps=100, lr=alpha)),
        ),
    }
    print(f"{'case':14s} {'plain ms':>9s} {'ours ms':>9s} {'ours/plain':>10s}")
    for name, (plain, mine) in pairs.items():
        plain()
        mine()
        tp, to = [], []
        for _ in range(args.repeats):
            for f, ts in ((plain, tp), (mine, to)):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        mp, mo = statistics.median(tp), statistics.median(to)
        print(f"{name:14s} {mp * 1e3:9.1f} {mo * 1e3:9.1f} {mo / mp:10.3f}", flush=True)


if __name__ == "__main__":
    main()
