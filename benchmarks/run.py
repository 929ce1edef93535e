"""`make bench`: every peer and our library on the same problem in one run, with ratios to us.

    bash benchmarks/envs.sh            # once: one venv per peer (benchmarks/.envs/<peer>)
    .venv/bin/python benchmarks/run.py # the table; results in benchmarks/results/

Steps (all in one run, so the ratios compare numbers measured minutes apart on the same load):

1. the per-feature-L2 logistic problem (d=1000, 3000 training rows, float64) from
   ``benchmarks/peers/make_problem.py``;
2. ``K*``: the fewest textbook-CG iterations whose hypergradient has cosine ≥ 0.999 with the exact
   one (from a dense solve) — the best a peer can do cold, knowing K* in hindsight;
3. every peer adapter of ``benchmarks/peers/`` and our runner (``hypergradients_runner.py``) on
   CG-20, Neumann-20, unrolled-100 and CG-K*, through ``run_peers.run_case`` (the same subprocess,
   environment and scoring), case-major so that the load of a shared machine drifts equally for all;
   ``run_peers``'s table (time, memory, accuracy, the 1-min load average before each case);
4. our ``hg.Auto()`` cold and 20 warm-started hyper steps of Algorithm 1 (``hyperloop``);
5. the ratio table: peer median / our median for the same method and iterations (> 1: we are
   faster), and time to cosine 0.999, cold and over 20 hyper steps.

Peers that are not installed or fail are listed with the reason by run_peers.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))

import run_peers  # noqa: E402

RESULTS = HERE / "results"
OURS = "hypergradients"


def kstar(problem: Path, cap: int = 200) -> int:
    """Fewest CG iterations reaching cosine 0.999 with the exact hypergradient (numpy, dense H)."""
    import make_problem as mp
    import numpy as np

    with np.load(problem) as z:
        Xt, w, log_lam = z["X_train"], z["w_star"], z["log_lam"]
        exact = z["exact_hypergradient"]
        Xv, yv = z["X_val"], z["y_val"]
    lam = np.exp(log_lam)
    H = mp.inner_hessian(w, Xt, lam)
    v = Xv.T @ (mp._sigmoid(Xv @ w) - yv) / Xv.shape[0]
    for k in range(1, cap + 1):
        g = -(lam * w) * mp.cg_solve(H, v, k)
        if float(g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact))) >= 0.999:
            return k
    return cap


def run_ours(problem: Path, method: str, iters: int, repeats: int, threads: int) -> dict[str, Any]:
    out = RESULTS / f"{OURS}_{method}_{iters}.json"
    cmd = [
        str(ROOT / ".venv" / "bin" / "python"),
        str(HERE / "hypergradients_runner.py"),
        "--problem",
        str(problem),
        "--method",
        method,
        "--iters",
        str(iters),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
        "--out",
        str(out),
    ]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"})
    res: dict[str, Any] = json.loads(out.read_text())
    return res


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def ratio_table(
    rows: list[dict[str, Any]], auto: dict[str, Any], loop: dict[str, Any], k: int
) -> tuple[str, dict[str, Any]]:
    """Markdown table: each peer's median over ours for the same case, plus time to accuracy."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_s")]
    ours = {(r["method"], r["iters"]): r for r in ok if r["peer"] == OURS}
    peers = sorted({r["peer"] for r in ok if r["peer"] != OURS})
    cases = sorted({(r["method"], r["iters"]) for r in ok}, key=lambda c: (c[0], c[1]))
    lines = [
        "| case | ours (ms) | " + " | ".join(f"{p} (ms, ×ours)" for p in peers) + " |",
        "|---|---:|" + "---:|" * len(peers),
    ]
    summary: dict[str, Any] = {"ratios": {}}
    for c in cases:
        o = ours.get(c)
        if not o:
            continue
        cells = []
        for p in peers:
            r = next((x for x in ok if x["peer"] == p and (x["method"], x["iters"]) == c), None)
            if r is None:
                cells.append("–")
                continue
            ratio = r["median_s"] / o["median_s"]
            summary["ratios"][f"{p}/{c[0]}{c[1]}"] = ratio
            flag = " WRONG" if r.get("wrong") else ""
            cells.append(f"{r['median_s'] * 1e3:.1f} ({ratio:.2f}×){flag}")
        lines.append(f"| {c[0]}-{c[1]} | {o['median_s'] * 1e3:.1f} | " + " | ".join(cells) + " |")
    # Time to cosine 0.999: the best correct peer at CG-K* (cold), ours hg.Auto().
    best = [
        r
        for r in ok
        if r["peer"] != OURS
        and r["method"] == "cg"
        and r["iters"] == k
        and not r.get("wrong")
        and (r.get("cos_exact") or 0) >= 0.999
    ]
    if best:
        b = min(best, key=lambda r: r["median_s"])
        cold = auto["median_s"] / b["median_s"]
        hyper = _median(loop["hyper_times_s"][1:])  # the first entry is the warm-up
        peer20 = b["median_s"] * len(loop["kstar"])  # one cold CG-K* per hyper step
        lines += [
            "",
            f"Time to cosine ≥ 0.999 (K* = {k} CG iterations, in hindsight, for the peers):",
            "",
            "| | ours | best peer | ours / best peer |",
            "|---|---:|---:|---:|",
            f"| one cold hypergradient | {auto['median_s'] * 1e3:.1f} ms "
            f"(hg.Auto, {auto.get('hvps')} HVPs) "
            f"| {b['median_s'] * 1e3:.1f} ms ({b['peer']} CG-{k}) | {cold:.2f} |",
            f"| 20 hyper steps of Algorithm 1 | {hyper * 1e3:.1f} ms (hg.Auto + SolverState, "
            f"{sum(loop['hvps_per_step'])} HVPs, min cos {loop['min_cos']:.5f}) "
            f"| {peer20 * 1e3:.1f} ms (20 × {b['peer']} CG-{k}) | {hyper / peer20:.2f} |",
        ]
        summary.update(
            cold_ratio=cold, loop_ratio=hyper / peer20, best_peer=b["peer"], kstar_per_step=loop["kstar"]
        )
    return "\n".join(lines), summary


def run_all(problem: Path, args: argparse.Namespace, k: int) -> list[dict[str, Any]]:
    """Every (case, runner) through ``run_peers.run_case``, case-major: for each case all runners run
    back to back (ours right after the plain loop), so that a change in the machine's load between
    cases does not bias one library against another."""
    runners = run_peers.default_runners()
    ours = run_peers.Runner(OURS, ROOT / ".venv" / "bin" / "python", HERE / "hypergradients_runner.py")
    runners.insert(1, ours)
    if args.only:
        wanted = {OURS, "plain-autograd", *args.only.split(",")}
        runners = [r for r in runners if r.name in wanted]
    cases = [(m.strip(), int(n)) for m, _, n in (c.partition(":") for c in f"{args.cases},cg:{k}".split(","))]
    ns = argparse.Namespace(problem=str(problem), repeats=args.repeats, threads=args.threads, timeout=1800.0)
    keys = ["exact_hypergradient"] + [f"{m}{n}_hypergradient" for m in ("cg", "neumann") for _, n in cases]
    refs = run_peers.read_npz_vectors(problem, keys)
    rows: list[dict[str, Any]] = []
    for method, iters in cases:
        for runner in runners:
            print(f"running {runner.name} {method} {iters} ...", file=sys.stderr, flush=True)
            row = run_peers.run_case(runner, method, iters, ns, RESULTS)
            h = row.get("hypergradient")
            if row.get("status") == "ok" and h:
                row["cos_exact"], row["relerr_exact"] = run_peers.score(h, refs["exact_hypergradient"])
                ref_key = f"{'cg' if method == 'cg' else 'neumann'}{iters}_hypergradient"
                if ref_key in refs:
                    row["alg_ref"] = ref_key
                    _, row["relerr_alg"] = run_peers.score(h, refs[ref_key])
                    row["wrong"] = row["relerr_alg"] > run_peers.WRONG_TOL
            rows.append(row)
    run_peers.print_table(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma list of peers (ours and plain-autograd always run)")
    ap.add_argument("--make-args", default="", help="extra make_problem.py flags (e.g. '--d 200')")
    ap.add_argument("--cases", default="cg:20,neumann:20,unrolled:100")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    problem = RESULTS / "problem.npz"
    if not problem.exists():
        subprocess.run(
            [
                sys.executable,
                str(HERE / "peers" / "make_problem.py"),
                "--out",
                str(problem),
                *args.make_args.split(),
            ],
            check=True,
        )
    k = kstar(problem)
    print(f"K* = {k} CG iterations reach cosine 0.999", file=sys.stderr)
    summary_path = RESULTS / "peers.json"
    rows = run_all(problem, args, k)
    slim = [{k_: v for k_, v in r.items() if k_ != "hypergradient"} for r in rows]
    summary_path.write_text(
        json.dumps(
            {"problem": str(problem), "repeats": args.repeats, "threads": args.threads, "rows": slim},
            indent=1,
        )
    )
    auto = run_ours(problem, "auto", 1, args.repeats, args.threads)
    loop = run_ours(problem, "hyperloop", 20, max(1, min(args.repeats, 3)), args.threads)
    table, summary = ratio_table(rows, auto, loop, k)
    print("\nRatios (peer median time / ours; > 1 means we are faster), measured in this run:\n")
    print(table)
    summary.update(
        kstar=k,
        auto={k_: v for k_, v in auto.items() if k_ != "hypergradient"},
        hyperloop={k_: v for k_, v in loop.items() if k_ != "hypergradient"},
    )
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (RESULTS / "ratios.md").write_text(table + "\n")
    print(f"\nwritten: {RESULTS / 'summary.json'}, {RESULTS / 'ratios.md'}", file=sys.stderr)
    return 0 if not math.isnan(summary.get("cold_ratio", 0.0)) else 1


if __name__ == "__main__":
    sys.exit(main())
