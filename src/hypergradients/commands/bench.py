"""`hypergradients bench`: time our hypergradient methods on this machine (no peer libraries needed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

DESCRIPTION = """\
Measure what a hypergradient costs on this machine (or GPU): median time over several runs after
a warm-up, peak extra memory and accuracy, for

  logistic  per-feature-L2 logistic regression (d weights, d hyperparameters, float64):
            CG-K and Neumann-K against a plain autograd loop, and hg.Auto
  mlp       a 784-1024-1024-10 MLP with one weight decay per weight (1.86M hyperparameters):
            Neumann-K against the plain loop, and one training step's memory
  unrolled  reverse mode through K steps: plain loop, hg.Unrolled, hg.Unrolled(checkpoint=True)

Each case runs in its own subprocess so its peak memory is its own. Ratios (ours / plain) come
from the same run. The default takes about a minute on 2 idle CPU cores (three on a busy
machine); --smoke runs tiny problems, about half a minute, nearly all of it the start-up of one
interpreter per case. Writes bench.json (settings, results, ratios) into --out.

examples:
  hypergradients bench --smoke
  hypergradients bench --steps 10,100,1000
  hypergradients bench --device cuda --json > bench.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..analysis._cli import add_out, add_quiet_json, add_smoke, int_list

    add_smoke(parser, help="tiny problems: a smoke test of the set-up (about half a minute, mostly "
                           "interpreter start-up)")
    add_out(parser, default_out="runs/bench", what="bench.json")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per case (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case (default 5; --smoke 2)")
    parser.add_argument("--iters", type=int, default=None,
                        help="CG iterations / Neumann terms (default 20; --smoke 5)")
    # nargs="+" keeps the older space-separated form (--steps 10 100) working
    parser.add_argument("--steps", type=int_list, nargs="+", default=None, metavar="K",
                        help="unrolled steps K, comma-separated like explain --steps (10,100,1000; spaces "
                             "work too) (default 100; --smoke 10)")
    add_quiet_json(parser, result="bench.json")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(x) < 1024:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.2f} GiB"


def _table(results: list[Any]) -> str:
    head = (f"{'problem':9s} {'case':20s} {'K':>5s} {'median ms':>10s} {'peak mem':>10s} {'cosine':>9s} "
            f"{'HVPs':>5s}")
    lines = [head, "-" * len(head)]
    for r in results:
        # Auto chooses its own iterations; a training step has none.
        k = "-" if r.case in ("auto", "train-step") else r.params.get("steps", r.params.get("iters", ""))
        if r.status != "ok":
            lines.append(f"{r.problem:9s} {r.case:20s} {k!s:>5s} {r.status}: {r.note}")
            continue
        cos = "-" if r.cosine is None else f"{r.cosine:.6f}"
        hv = "-" if r.hvps is None else str(r.hvps)
        lines.append(f"{r.problem:9s} {r.case:20s} {k!s:>5s} {r.median_s * 1e3:10.2f} "
                     f"{_fmt_bytes(r.peak_mem_bytes):>10s} {cos:>9s} {hv:>5s}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from hypergradients import bench

    from ..analysis._cli import check_out
    from ..files import json_dumps, write_atomic
    from ..progress import Progress

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"hypergradients bench: --device {args.device} asked for, but torch sees no CUDA device; "
                  "use --device cpu", file=sys.stderr)
            return 2
    steps = tuple(k for group in args.steps for k in group) if args.steps else ()
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1) or \
            (args.iters is not None and args.iters < 1) or (steps and min(steps) < 1):
        print("hypergradients bench: --threads, --repeats, --iters and --steps must be >= 1", file=sys.stderr)
        return 2
    out = check_out("bench", args.out)
    if out is None:
        return 2
    kw: dict[str, Any] = {"threads": args.threads, "device": args.device}
    if args.repeats is not None:
        kw["repeats"] = args.repeats
    if args.iters is not None:
        kw["iters"] = args.iters
    if steps:
        kw["unrolled_steps"] = steps
    suite = bench.Suite.quick(**kw) if args.smoke else bench.Suite(**kw)

    def progress(cases: Sequence[Any]) -> Iterator[Any]:
        with Progress(len(cases), desc="bench", unit="case", enabled=not args.quiet) as bar:
            for case in cases:
                yield case
                bar.update()

    results = bench.run_suite(suite, progress=progress)
    ratios = bench.ratios(results)
    report = {"suite": bench.asdict(suite), "results": bench.as_json(results), "ratios": ratios}
    main_file = out / "bench.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(main_file, json_dumps(report, indent=1) + "\n")
    except OSError as e:   # checked before the work, but a disk can still fill up or a folder vanish
        print(f"hypergradients bench: error: cannot write into --out {str(out)!r}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json_dumps(report, indent=1))
    elif args.quiet:
        print(main_file)
    else:
        print(_table(results))
        if ratios:
            print("\nratios from this run (ours / plain autograd loop; < 1 is better):")
            for k, v in ratios.items():
                print(f"  {k:45s} {v:6.3f}")
        print(f"\nWrote {main_file}")
    return 0 if all(r.status == "ok" for r in results) else 1
