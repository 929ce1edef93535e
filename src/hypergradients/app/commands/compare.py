"""`hypergradients compare`: inverse-Hessian approximations against the exact hypergradient, per HVP."""

from __future__ import annotations

import argparse
from typing import Any

METHODS = ("Identity", "Neumann", "CG", "Nystrom", "Unrolled")
PROBLEMS = ("diabetes", "breast-cancer", "digits")

DESCRIPTION = """\
The inverse-approximation comparison of Lorraine et al. (2020, Fig. 4): on linear models with one
weight decay per weight, the cosine similarity and relative L2 distance of each method's
hypergradient to the exact one (dense solve), against the number of Hessian-vector products spent.

  Identity   p = v                                  0 HVPs
  Neumann    alpha sum_{j<=h} (I - alpha H)^j v     h HVPs   (= unrolling h+1 steps from w*)
  CG         conjugate gradient, h iterations       <= h HVPs
  Nystrom    rank-h randomized Nystrom inverse      h HVPs   (h <= number of weights)
  Unrolled   h steps of gradient descent from 0     ~h HVPs  (one backward per step)

Problems: diabetes (sklearn, ridge regression), digits (softmax regression) by default;
breast-cancer (binary logistic) also available. Writes config.toml, compare.json, compare.md
(the table), compare.png and report.md into --out. The same as `hypergradients run compare`
(settings: `hypergradients list compare`): --budgets 0,1,2 is --set budgets=[0,1,2].
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._flags import add_common, int_list, str_list

    add_common(parser, name="compare", result="compare.json")
    parser.add_argument("--problems", type=str_list(PROBLEMS), metavar="P,P",
                        help="comma-separated, from diabetes, breast-cancer, digits "
                             "(default diabetes,digits; --smoke diabetes,breast-cancer)")
    parser.add_argument("--budgets", type=int_list, metavar="H,H,...",
                        help="HVP budgets (default 0,1,2,3,5,7,10,15,20,30,40,50,60,70,80,90,100; "
                             "--smoke 0,1,2,5,10,20)")
    parser.add_argument("--methods", type=str_list(METHODS), metavar="M,M",
                        help=f"comma-separated subset of {','.join(METHODS)} (default all)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as settings of the ``compare`` experiment (``None``: not given)."""
    return {"seed": args.seed, "threads": args.threads, "figures": False if args.no_figures else None,
            **{k: None if getattr(args, k) is None else list(getattr(args, k))
               for k in ("problems", "budgets", "methods")}}


def main(args: argparse.Namespace) -> int:
    from ._flags import run_alias

    return run_alias("compare", args, settings(args))
