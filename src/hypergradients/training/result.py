"""What :func:`~hypergradients.fit` returns (its own module, so that callbacks can name it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor


@dataclass
class TrainResult:
    """What :func:`fit` returns: one metrics record per round, the final one, and run facts.

    ``hyper_steps`` counts the hyper steps that changed the hyperparameters, ``skipped_hyper_steps``
    those that did not (``skip_reasons``: how many for each reason), ``retried_hyper_steps`` those
    that took effect only after a damped retry (``on_solver_error="damp"``).
    """

    metrics: list[dict[str, Any]]
    final: dict[str, Any]
    rounds: int
    hyperparameters: int
    skipped_hyper_steps: int
    wall_s: float
    resumed_from: int | None = None
    checkpoint: Path | None = None
    natural: dict[str, Tensor] = field(default_factory=dict)
    hyper_steps: int = 0
    retried_hyper_steps: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
