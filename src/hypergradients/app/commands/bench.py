"""`hypergradients bench`: what our hypergradient methods cost, against a plain autograd loop (no peer
libraries needed)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Measure what a hypergradient costs where it runs (CPU or GPU): median time over several runs
after a warm-up, peak extra memory and accuracy, for

  logistic  per-feature-L2 logistic regression (d weights, d hyperparameters, float64):
            CG-K and Neumann-K against a plain autograd loop, and hg.Auto
  mlp       an MLP (mlp.sizes) with one weight decay per weight: Neumann-K against the plain
            loop, and one training step's memory
  unrolled  reverse mode through K steps: plain loop, hg.Unrolled, hg.Unrolled(checkpoint=True)

Each case runs in its own subprocess so its peak memory is its own. Ratios (ours / plain) come
from the same run; --smoke runs tiny problems, most of their time the start-up of one interpreter
per case. Writes config.toml, bench.json (settings, results, ratios) and report.md into --out.
The same as `hypergradients run bench` (settings: `hypergradients list bench`): --iters 10 is
--set iters=10, --steps 10,100 is --set unrolled.steps=[10,100].

examples:
  hypergradients bench --smoke
  hypergradients bench --steps 10,100,1000
  hypergradients bench --device cuda --json > bench.json
"""

FLAGS = {
    "--device": ("device", "DEVICE"),
    "--threads": ("threads", "N"),
    "--repeats": ("repeats", "N"),
    "--iters": ("iters", "K"),
    "--steps": ("unrolled.steps", "K"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._flags import add_run_flags, add_settings

    add_run_flags(
        parser,
        name="bench",
        result="bench.json",
        smoke="tiny problems: a test of the set-up (mostly interpreter start-up)",
    )
    add_settings(parser, "bench", FLAGS)


def main(args: argparse.Namespace) -> int:
    from ._flags import given, run_alias

    return run_alias("bench", args, given(args, FLAGS))
