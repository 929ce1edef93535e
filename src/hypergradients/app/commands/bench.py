"""`hypergradients bench`: time our hypergradient methods on this machine (no peer libraries needed)."""

from __future__ import annotations

import argparse
import sys
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
interpreter per case. Writes config.toml, bench.json (settings, results, ratios) and report.md
into --out. The same as `hypergradients run bench` (settings: `hypergradients list bench`):
--iters 10 is --set iters=10, --steps 10,100 is --set unrolled.steps=[10,100].

examples:
  hypergradients bench --smoke
  hypergradients bench --steps 10,100,1000
  hypergradients bench --device cuda --json > bench.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._flags import add_out, add_quiet_json, add_smoke, int_list

    add_smoke(parser, help="tiny problems: a smoke test of the set-up (about half a minute, mostly "
                           "interpreter start-up)")
    add_out(parser, name="bench", what="bench.json")
    parser.add_argument("--device", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="CPU threads per case (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case (default 5; --smoke 2)")
    parser.add_argument("--iters", type=int, default=None,
                        help="CG iterations / Neumann terms (default 20; --smoke 5)")
    # nargs="+" keeps the older space-separated form (--steps 10 100) working
    parser.add_argument("--steps", type=int_list, nargs="+", default=None, metavar="K",
                        help="unrolled steps K, comma-separated like explain --steps (10,100,1000; spaces "
                             "work too) (default 100; --smoke 10)")
    add_quiet_json(parser, result="bench.json")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as settings of the ``bench`` experiment (``None``: not given)."""
    steps = [k for group in args.steps for k in group] if args.steps else None
    return {"device": args.device, "threads": args.threads, "repeats": args.repeats, "iters": args.iters,
            "unrolled.steps": steps}


def main(args: argparse.Namespace) -> int:
    from ._flags import run_alias

    given = settings(args)
    if any(isinstance(v, int) and v < 1 for v in given.values()) or min(given["unrolled.steps"] or [1]) < 1:
        print("hypergradients bench: --threads, --repeats, --iters and --steps must be >= 1", file=sys.stderr)
        return 2
    return run_alias("bench", args, given)
