"""`hypergradients compare`: inverse-Hessian approximations against the exact hypergradient, per HVP."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
The inverse-approximation comparison of Lorraine et al. (2020, Fig. 4): on linear models with one
weight decay per weight, the cosine similarity and relative L2 distance of each method's
hypergradient to the exact one (dense solve), against the number of Hessian-vector products spent.

  Identity   p = v                                  0 HVPs
  Neumann    alpha sum_{j<=h} (I - alpha H)^j v     h HVPs   (= unrolling h+1 steps from w*)
  CG         conjugate gradient, h iterations       <= h HVPs
  Nystrom    rank-h randomized Nystrom inverse      h HVPs   (h <= number of weights)
  Unrolled   h steps of gradient descent from 0     ~h HVPs  (one backward per step)

Problems: diabetes (sklearn, ridge regression), breast-cancer (binary logistic), digits (softmax
regression). Writes config.toml, compare.json, compare.md (the table), compare.png and report.md
into --out. The same as `hypergradients run compare` (settings: `hypergradients list compare`):
--budgets 0,1,2 is --set budgets=[0,1,2].
"""

FLAGS = {
    "--problems": ("problems", "P"),
    "--budgets": ("budgets", "H"),
    "--methods": ("methods", "M"),
    "--figures": ("figures", ""),
    "--seed": ("seed", "S"),
    "--threads": ("threads", "N"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._flags import add_run_flags, add_settings

    add_run_flags(
        parser, name="compare", result="compare.json", smoke="small settings (seconds; what the tests run)"
    )
    add_settings(parser, "compare", FLAGS)


def main(args: argparse.Namespace) -> int:
    from ._flags import given, run_alias

    return run_alias("compare", args, given(args, FLAGS))
