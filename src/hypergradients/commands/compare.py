"""`hypergradients compare`: inverse-Hessian approximations against the exact hypergradient, per HVP."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..analysis.compare import CompareConfig

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
breast-cancer (binary logistic) also available. Writes compare.json, compare.md (the table)
and compare.png into --out.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..analysis._cli import add_common, int_list, str_list

    add_common(parser, default_out="runs/compare", result="compare.json")
    parser.add_argument("--problems", type=str_list(PROBLEMS), metavar="P,P",
                        help="comma-separated, from diabetes, breast-cancer, digits "
                             "(default diabetes,digits; --smoke diabetes,breast-cancer)")
    parser.add_argument("--budgets", type=int_list, metavar="H,H,...",
                        help="HVP budgets (default 0,1,2,3,5,7,10,15,20,30,40,50,60,70,80,90,100; "
                             "--smoke 0,1,2,5,10,20)")
    parser.add_argument("--methods", type=str_list(METHODS), metavar="M,M",
                        help=f"comma-separated subset of {','.join(METHODS)} (default all)")


def _config(args: argparse.Namespace) -> CompareConfig:
    from ..analysis.compare import CompareConfig  # imported here: `--help` stays fast

    over: dict[str, Any] = {"seed": args.seed}
    for key in ("problems", "budgets", "methods"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    return CompareConfig.quick(**over) if args.smoke else CompareConfig(**over)


def main(args: argparse.Namespace) -> int:
    from ..analysis._cli import check_out, threads
    from ..analysis.compare import compare
    from ..analysis.figures import compare_figure
    from ..errors import HypergradientError
    from ..files import json_dumps, write_atomic
    from ..progress import Progress

    try:
        cfg = _config(args)
        cfg.validate()
    except (HypergradientError, ValueError) as e:
        print(f"hypergradients compare: error: {e}", file=sys.stderr)
        return 2
    out = check_out("compare", args.out)
    if out is None:
        return 2
    try:
        with threads(args.threads), Progress(cfg.cost(), desc="compare", enabled=not args.quiet) as bar:
            result = compare(cfg, progress=bar.update)
    except (HypergradientError, ValueError) as e:
        print(f"hypergradients compare: error: {e}", file=sys.stderr)
        return 2
    summary = result.to_json()
    table = result.table()
    main_file = out / "compare.json"
    try:
        figure = None if args.no_figures else compare_figure(result, out)
        summary["figures"] = [] if figure is None else [figure.name]
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(main_file, json_dumps(summary, indent=2) + "\n")
        write_atomic(out / "compare.md", table + "\n")
    except OSError as e:   # checked before the work, but a disk can still fill up or a folder vanish
        print(f"hypergradients compare: error: cannot write into --out {str(out)!r}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json_dumps(summary, indent=2))
    elif args.quiet:
        print(main_file)
    else:
        print("Cosine similarity / relative L2 distance to the exact hypergradient, per HVP budget.\n"
              "Neumann with h HVPs is unrolling h+1 steps from w* (the theorem: `hypergradients explain`);\n"
              "Unrolled starts from w0 = 0. Nystrom stops at rank = number of weights (exact there).\n")
        print(table)
        written = [main_file, out / "compare.md"] + ([] if figure is None else [figure])
        print("Wrote " + ", ".join(str(p) for p in written))
    return 0
