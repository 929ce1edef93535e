"""A one-seed sweep of hyper learning rate × hyper-step frequency × approximation (measured).

    .venv/bin/python benchmarks/recipe_sweep.py weight-decay        # or overfit-validation, distill,
                                                                    # data-cleaning; --quick: 2 × 2 × 2
    .venv/bin/python benchmarks/recipe_sweep.py data-cleaning --set noise.p=0.7   # extra settings

Each cell is one ``hypergradients run EXPERIMENT --set seeds=1 ...`` (one seed, one thread), with the
hyper-step frequency changed at an equal number of inner steps (``train.inner_steps`` × ``train.rounds``
kept), so that a setting is judged on the same training budget. The table gives, per cell, the
experiment's headline numbers from its result file (the tuned arm's test metric beside the arm it
should beat, its validation metric, the hypergradient's signal-to-noise and the fraction of hyper
steps that changed anything) and the run's CPU time, so that a verdict is not an artefact of one
hyper-step setting. Writes ``benchmarks/results/recipe_sweep_<experiment>.json``; every cell's run
folder is kept under ``--out`` (default a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# approximation name -> settings (the paper's "K Neumann terms" is hyper.iters = K + 1 summands)
METHODS = {
    "identity": ["hyper.method=identity"],
    "neumann-1": ["hyper.method=neumann", "hyper.iters=2"],
    "neumann-9": ["hyper.method=neumann", "hyper.iters=10"],
    "cg-10": ["hyper.method=cg", "hyper.iters=10"],
}


def _trace(arm: dict[str, Any] | None) -> tuple[float, float]:
    t = (arm or {}).get("trace") or {}
    return t.get("snr_median", float("nan")), t.get("moved_fraction", float("nan"))


def _weight_decay(r: dict[str, Any]) -> dict[str, Any]:
    rows = {x["method"].split(" (")[0]: x for x in r["rows"]}
    w, g = rows.get("per-weight decay", {}), rows.get("global decay", {})
    tr = r["per_seed"][0]["traces"].get("weight") or {}
    return {
        "weight test loss": w.get("test_loss"),
        "global test loss": g.get("test_loss"),
        "weight val loss": w.get("val_loss"),
        "weight decay (median)": w.get("decay"),
        "snr": tr.get("snr_median"),
        "moved": tr.get("moved_fraction"),
    }


def _overfit(r: dict[str, Any]) -> dict[str, Any]:
    s = r["per_seed"][0]["arms"]
    t, u = s.get("linear tuned", {}), s.get("linear untuned", {})
    snr, moved = _trace(t)
    return {
        "tuned val acc": t.get("final", {}).get("val_acc"),
        "tuned test acc": t.get("final", {}).get("test_acc"),
        "untuned test acc": u.get("final", {}).get("test_acc"),
        "first 100%": t.get("first_100"),
        "snr": snr,
        "moved": moved,
    }


def _distill(r: dict[str, Any]) -> dict[str, Any]:
    rows = {x["arm"]: x for x in r["rows"]}
    s = r["per_seed"][0]
    return {
        "distilled test acc": rows.get("distilled", {}).get("test_acc"),
        "real-1 test acc": rows.get("real-1", {}).get("test_acc"),
        "snr": (s.get("trace") or {}).get("snr_median"),
        "moved": (s.get("trace") or {}).get("moved_fraction"),
    }


def _cleaning(r: dict[str, Any]) -> dict[str, Any]:
    rows = {x["arm"]: x for x in r["rows"]}
    s = r["per_seed"][0]
    return {
        "weighted test error": rows.get("weighted", {}).get("test_error"),
        "plain test error": rows.get("plain", {}).get("test_error"),
        "auc": rows.get("weighted", {}).get("auc"),
        "snr": (s.get("trace") or {}).get("snr_median"),
        "moved": (s.get("trace") or {}).get("moved_fraction"),
    }


# experiment -> (result file, fixed settings, hyper lrs, (inner steps per hyper step, rounds) pairs of
# equal total steps, approximations, what to read)
EXPERIMENTS: dict[
    str,
    tuple[
        str,
        list[str],
        list[float],
        list[tuple[int, int]],
        list[str],
        Callable[[dict[str, Any]], dict[str, Any]],
    ],
] = {
    "weight-decay": (
        "weight_decay.json",
        ['arms=["global","weight"]', "retrain=false"],
        [0.003, 0.03],
        [(1, 2000), (10, 200)],
        ["identity", "neumann-1", "neumann-9"],
        _weight_decay,
    ),
    "overfit-validation": (
        "overfit_validation.json",
        ['models=["linear"]', "retrain=false"],
        [0.001, 0.01, 0.1],
        [(1, 5000), (5, 1000), (25, 200)],
        ["identity", "neumann-1", "cg-10"],
        _overfit,
    ),
    "distill": (
        "distill.json",
        ["eval.draws=2"],
        [0.001, 0.01, 0.1],
        [(1, 10000), (5, 2000), (25, 400)],
        ["identity", "neumann-1", "cg-10"],
        _distill,
    ),
    "data-cleaning": (
        "data_cleaning.json",
        ['arms=["weighted","plain"]'],
        [0.001, 0.01, 0.1],
        [(1, 3000), (10, 300)],
        ["identity", "neumann-1", "cg-10"],
        _cleaning,
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=tuple(EXPERIMENTS))
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra settings for every cell",
    )
    ap.add_argument("--quick", action="store_true", help="the first two values of each axis only")
    ap.add_argument("--out", help="keep every cell's run folder here")
    args = ap.parse_args()
    result_file, fixed, lrs, freqs, methods, read = EXPERIMENTS[args.experiment]
    if args.quick:
        lrs, freqs, methods = lrs[:2], freqs[:2], methods[:2]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="recipe_sweep_"))
    exe = [sys.executable, "-m", "hypergradients", "run", args.experiment]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cells = []
    try:
        for lr, (every, rounds), m in itertools.product(lrs, freqs, methods):
            sets = [
                "seeds=1",
                "threads=1",
                *fixed,
                f"hyper.lr={lr}",
                f"train.inner_steps={every}",
                f"train.rounds={rounds}",
                *METHODS[m],
                *args.sets,
            ]
            name = f"lr{lr}_every{every}_{m}"
            cmd = [*exe, "--out", str(out / name), "--quiet", *[a for s in sets for a in ("--set", s)]]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            wall = time.perf_counter() - t0
            cell: dict[str, Any] = {"hyper lr": lr, "every": every, "method": m, "wall s": round(wall, 1)}
            if proc.returncode != 0:
                cell["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            else:
                r = json.loads((out / name / result_file).read_text())
                cell.update(read(r))
                cell["cpu s"] = round(r.get("cpu_s", float("nan")), 1)
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    res = ROOT / "benchmarks" / "results" / f"recipe_sweep_{args.experiment}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(
        json.dumps({"experiment": args.experiment, "sets": args.sets, "cells": cells}, indent=1) + "\n"
    )
    keys = list(dict.fromkeys(k for c in cells for k in c))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for c in cells:
        print(
            "| "
            + " | ".join(f"{c[k]:.4g}" if isinstance(c.get(k), float) else str(c.get(k, "")) for k in keys)
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
