"""Peak memory of one hypergradient against the number of steps K: plain reverse mode through the
path, checkpointed reverse mode (``hg.Unrolled(checkpoint=True)``, ⌈√K⌉ stored iterates) and
implicit differentiation (``hg.Neumann(iters=K)`` at w*, whose memory does not depend on K).

    .venv/bin/python benchmarks/memory_vs_k.py                 # writes docs/memory_vs_k.png + .json
    .venv/bin/python benchmarks/memory_vs_k.py --ks 10 30 100 --d 100

Every point runs in its own subprocess (``hypergradients.app.experiments.bench.run_isolated``): the
peak is that call's extra resident memory (VmHWM after a reset, see
``hypergradients/experiments/bench.py``), one warm-up and ``--repeats`` timed calls. Problem: the
per-feature-L2 logistic regression of the benchmark at a smaller size (default d=200, 3000
training rows: per-step buffers of 24 KB, which the allocator maps and unmaps individually, so
resident memory tracks them) so that K=1000 runs in reasonable time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from hypergradients.app.experiments import bench

ROOT = Path(__file__).resolve().parent.parent
SERIES = {
    "reverse mode (hg.Unrolled)": ("unrolled", "unrolled"),
    "checkpointed reverse mode (hg.Unrolled(checkpoint=True))": ("unrolled", "unrolled-checkpoint"),
    "implicit (hg.Neumann(iters=K) at w*)": ("logistic", "neumann"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    ap.add_argument("--d", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory_vs_k"), help="path stem for .png and .json")
    args = ap.parse_args(argv)
    points: dict[str, list[tuple[int, int | None, float | None]]] = {name: [] for name in SERIES}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "logistic.pt"
        torch.save(bench.make_logistic(args.d, args.n_train, args.n_train // 3), data)
        for K in args.ks:
            for name, (problem, case) in SERIES.items():
                spec = {
                    "problem": problem,
                    "case": case,
                    "data": str(data),
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "steps": K,
                    "iters": K,
                }
                r = bench.run_isolated(spec)
                if r.status != "ok":
                    print(f"K={K} {case}: {r.status}: {r.note}", file=sys.stderr)
                points[name].append((K, r.peak_mem_bytes, r.median_s))
                mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:8.2f} MiB"
                t = "-" if r.median_s is None else f"{r.median_s * 1e3:9.1f} ms"
                print(f"K={K:5d} {case:22s} {mem:>14s} {t:>12s}", flush=True)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"d": args.d, "n_train": args.n_train, "points": points}, indent=1)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, pts), marker in zip(points.items(), "osd", strict=True):
        # The kernel counts resident memory in 4 KiB pages: 0 means "below one page", drawn at one page.
        xs = [k for k, m, _ in pts if m is not None]
        ys = [max(m, 4096) / 2**20 for _, m, _ in pts if m is not None]
        ax.plot(xs, ys, marker=marker, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps K (unrolled) / series terms K (implicit)")
    ax.set_ylabel("peak extra memory of one hypergradient (MiB)")
    ax.set_title(f"Memory against K (logistic, d={args.d}, float64, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"written: {stem.with_suffix('.png')}, {stem.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
