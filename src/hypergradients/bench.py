"""Moved: the benchmark code is part of the application layer, :mod:`hypergradients.experiments.bench`.

Only a re-export remains here, for scripts that still write ``from hypergradients import bench``;
import ``hypergradients.experiments.bench`` instead. Nothing in the core imports this module.
"""

from .experiments.bench import (
    Result,
    Suite,
    as_json,
    logistic_losses,
    make_logistic,
    make_mlp,
    measure,
    mlp_losses,
    plain_implicit,
    plain_unrolled,
    ratios,
    run_case,
    run_isolated,
    run_suite,
    train_step,
)

__all__ = ["Result", "Suite", "as_json", "logistic_losses", "make_logistic", "make_mlp", "measure",
           "mlp_losses", "plain_implicit", "plain_unrolled", "ratios", "run_case", "run_isolated",
           "run_suite", "train_step"]
