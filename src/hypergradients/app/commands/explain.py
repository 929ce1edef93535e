"""`hypergradients explain`: how the optimization path fits into the implicit derivation, with numbers."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
How does the optimization path w_0 ... w_K of gradient descent fit into the implicit-function-
theorem (IFT) derivation? This command answers with numbers, on per-weight L2 logistic regression
on a bundled dataset (w* solved by Newton to float64 precision, α = 1/λ_max(H)):

  1. K unrolled steps started AT w* give exactly the K-term Neumann hypergradient (the paper's
     Theorem 2): their largest relative difference is float64 rounding (theorem_max_rel_diff).
  2. From a cold start (w_0 = 0) the path matters: unrolling reaches the IFT hypergradient only
     once w_K has converged (cold_start_cosine).
  3. Truncated unrolling (last T steps) tends to the T-term Neumann value, not to the IFT one.
  4. The common mistaken derivation (summing path gradients), with numbers.
  5. A learning-rate hyperparameter: refused by the implicit methods (w* does not depend on it),
     a real hypergradient from unrolling, checked by finite differences.
  6. Heavy-ball and Nesterov momentum from w*: K unrolled steps equal a closed-form polynomial in H
     (through the characteristic roots), which tends to H^-1 faster than Neumann:
     ((sqrt(k)-1)/(sqrt(k)+1))^K for heavy-ball's optimal pair, (1 - 1/sqrt(k))^K for Nesterov,
     against (1 - 1/k)^K, k the condition number.
  7. Adam from w*: heavy-ball on the preconditioned system; with v = 0 it explodes (step lr/eps),
     with the v of a real run it tends to the IFT hypergradient.
  8. Minibatch SGD from w*: mean and spread over random batch orders, per batch size.

Writes config.toml, explain.json, explain_cosine.png / explain_theorem.png /
explain_optimizers.png / explain_noise.png and report.md into
--out. The same as `hypergradients run explain` (settings: `hypergradients list explain`); each
flag below sets one setting, e.g. --steps 1,10,100 is --set theorem.steps=[1,10,100].
The derivation, step by step: docs/optimization-path.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._flags import add_common, int_list

    add_common(parser, name="explain", result="explain.json")
    parser.add_argument("--problem", choices=("breast-cancer", "digits"),
                        help="bundled dataset (default breast-cancer: 30 features, binary)")
    parser.add_argument("--steps", type=int_list, metavar="K,K,...",
                        help="theorem.steps: K for the theorem check (default 1,3,10,30,100,300,1000; "
                             "--smoke 1,10,100)")
    parser.add_argument("--cold-steps", type=int_list, metavar="K,K,...",
                        help="cold.steps: K for cold-start and truncated unrolling (default "
                             "1,3,10,30,100,300,1000; --smoke 1,10,100,300)")
    parser.add_argument("--truncate", type=int, metavar="T", help="cold.truncate: steps differentiated by "
                        "truncated unrolling (default 10)")
    parser.add_argument("--lr-steps", type=int, metavar="K", help="lr.steps: unrolled steps for the "
                        "learning-rate hypergradient (default 100; --smoke 20)")
    parser.add_argument("--alpha-scale", type=float, metavar="S",
                        help="alpha_scale: step size α = S/λ_max(H), S in (0, 2) (default 1)")
    parser.add_argument("--momentum-beta", type=float, metavar="B",
                        help="momentum.beta: heavy-ball momentum in [0, 1) (default 0.9)")
    parser.add_argument("--momentum-steps", type=int_list, metavar="K,K,...",
                        help="momentum.steps: K for heavy-ball from w* (default 1,5,10,50,100,300,1000; "
                             "--smoke 1,5,50)")
    parser.add_argument("--adam-lr", type=float, metavar="LR",
                        help="adam.lr: Adam's learning rate (default 0.1)")
    parser.add_argument("--adam-steps", type=int_list, metavar="K,K,...",
                        help="adam.steps: K for Adam from w* with a trained v (default 1,10,100,300,1000; "
                             "--smoke 1,10,100)")
    parser.add_argument("--noise-orders", type=int, metavar="N",
                        help="noise.orders: random minibatch orders per batch size (default 20; --smoke 5)")
    parser.add_argument("--noise-batch-sizes", type=int_list, metavar="B,B,...",
                        help="noise.batch_sizes: minibatch sizes (default 10,30,100; --smoke 10,100)")
    parser.add_argument("--noise-steps", type=int_list, metavar="K,K,...",
                        help="noise.steps: K for minibatch SGD from w* (default 10,30,100; --smoke 10,30)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as settings of the ``explain`` experiment (``None``: not given)."""
    return {"problem": args.problem, "seed": args.seed, "threads": args.threads,
            "alpha_scale": args.alpha_scale,
            "figures": False if args.no_figures else None,
            "theorem.steps": None if args.steps is None else list(args.steps),
            "cold.steps": None if args.cold_steps is None else list(args.cold_steps),
            "cold.truncate": args.truncate, "lr.steps": args.lr_steps,
            "momentum.beta": args.momentum_beta,
            "momentum.steps": None if args.momentum_steps is None else list(args.momentum_steps),
            "adam.lr": args.adam_lr, "adam.steps": None if args.adam_steps is None else list(args.adam_steps),
            "noise.orders": args.noise_orders,
            "noise.batch_sizes": None if args.noise_batch_sizes is None else list(args.noise_batch_sizes),
            "noise.steps": None if args.noise_steps is None else list(args.noise_steps)}


def main(args: argparse.Namespace) -> int:
    from ._flags import run_alias

    return run_alias("explain", args, settings(args))
