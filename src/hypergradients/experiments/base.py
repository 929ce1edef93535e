"""What an experiment is: a name, a configuration schema, a ``--smoke`` override, a ``run`` and an
optional ``check`` of what the configuration asks of the world (data files, sizes) before any work."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, Schema


@dataclass
class RunContext:
    """Everything a run needs besides its configuration.

    ``out`` is the run folder (created by the caller); ``progress`` whether to draw progress bars
    on stderr; ``resume`` whether to continue from the checkpoints in ``out``; ``tensorboard``
    whether to also log metrics there (checked importable by the caller); ``data`` what the
    experiment's ``check`` returned (e.g. the loaded dataset, so that it is not loaded twice), or
    ``None`` when no check ran.
    """

    config: Config
    out: Path
    device: torch.device
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False
    data: Any = None


@dataclass
class ExperimentResult:
    """A finished run: its summary table, the notes that interpret it, and where the report is."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    report: Path
    out: Path
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass(frozen=True)
class Experiment:
    """A registered experiment (see :data:`hypergradients.experiments.REGISTRY`).

    ``check(config)``, if given, is called by ``hypergradients run`` before the run folder is made:
    it raises :class:`~hypergradients.config.ConfigError` (naming the key) for values the schema
    cannot judge alone, such as a data size larger than the dataset, and returns what ``run`` may
    reuse as :attr:`RunContext.data`.
    """

    name: str
    summary: str
    schema: Schema
    smoke: Mapping[str, Any]
    run: Callable[[RunContext], ExperimentResult]
    check: Callable[[Config], Any] | None = None
