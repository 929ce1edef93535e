"""Experiments, registered by name: ``hypergradients run <name>``, ``hypergradients list``.

Each module defines an :class:`~.base.Experiment` (name, configuration schema, ``--smoke``
overrides, ``run(ctx) -> ExperimentResult``) and is listed in :data:`REGISTRY` below.
"""

from __future__ import annotations

from .base import Experiment, ExperimentResult, RunContext
from .weight_decay import EXPERIMENT as _weight_decay

REGISTRY: dict[str, Experiment] = {e.name: e for e in (_weight_decay,)}


def get(name: str) -> Experiment:
    """The experiment called ``name`` (``KeyError`` listing the registered ones)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; registered: {', '.join(REGISTRY)} "
                       "(see `hypergradients list`)") from None


__all__ = ["REGISTRY", "Experiment", "ExperimentResult", "RunContext", "get"]
