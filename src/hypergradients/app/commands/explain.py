"""`hypergradients explain`: how the optimization path fits into the implicit derivation, with numbers."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
How does the optimization path w_0 ... w_K of gradient descent fit into the implicit-function-
theorem (IFT) derivation? This command answers with numbers, on per-weight L2 logistic regression
on a bundled dataset (w* solved by Newton to float64 precision, α = alpha_scale/λ_max(H)):

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

FLAGS = {
    "--problem": ("problem", "NAME"),
    "--steps": ("theorem.steps", "K"),
    "--cold-steps": ("cold.steps", "K"),
    "--truncate": ("cold.truncate", "T"),
    "--lr-steps": ("lr.steps", "K"),
    "--alpha-scale": ("alpha_scale", "S"),
    "--momentum-beta": ("momentum.beta", "B"),
    "--momentum-steps": ("momentum.steps", "K"),
    "--adam-lr": ("adam.lr", "LR"),
    "--adam-steps": ("adam.steps", "K"),
    "--noise-orders": ("noise.orders", "N"),
    "--noise-batch-sizes": ("noise.batch_sizes", "B"),
    "--noise-steps": ("noise.steps", "K"),
    "--figures": ("figures", ""),
    "--seed": ("seed", "S"),
    "--threads": ("threads", "N"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._flags import add_run_flags, add_settings

    add_run_flags(
        parser, name="explain", result="explain.json", smoke="small settings (seconds; what the tests run)"
    )
    add_settings(parser, "explain", FLAGS)


def main(args: argparse.Namespace) -> int:
    from ._flags import given, run_alias

    return run_alias("explain", args, given(args, FLAGS))
