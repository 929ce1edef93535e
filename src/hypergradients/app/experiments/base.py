"""What an experiment is: a name, a configuration schema, a ``--smoke`` override, a ``run`` and an
optional ``check`` of what the configuration asks of the world (data files, sizes) before any work.

Every runnable thing of the application layer (the paper's experiments, ``explain``, ``compare``,
``bench``) is one, so all share one configuration system, one tiny configuration and one run folder:
``config.toml`` (resolved), the result file (JSON), figures (PNG) and ``report.md``. Every run starts
with :func:`.shared.begin` and ends with :func:`.shared.finish`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
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
    """A finished run: its summary table, the notes that interpret it, and where the report is.

    ``result_file`` is the run's main result (JSON) and ``result`` its content, where the experiment
    writes one (``explain.json``, ``compare.json``, ``bench.json``); ``text`` is a readable account
    printed instead of the table when the table alone would not say enough; ``files`` are the files
    written besides ``config.toml``; ``exit_code`` is nonzero when the run finished but part of it
    failed (a benchmark case that crashed or timed out).
    """

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    report: Path
    out: Path
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    result: dict[str, Any] | None = None
    result_file: Path | None = None
    text: str | None = None
    files: list[Path] = field(default_factory=list)
    exit_code: int = 0


@dataclass(frozen=True)
class Experiment:
    """A registered experiment (see :data:`hypergradients.app.experiments.REGISTRY`).

    ``check(config)``, if given, is called by ``hypergradients run`` before the run folder is made:
    it raises :class:`~hypergradients.app.config.ConfigError` (naming the key) for values the schema
    cannot judge alone, such as a data size larger than the dataset, and returns what ``run`` may
    reuse as :attr:`RunContext.data`.

    ``dry_run(config, data)``, if given, builds the experiment's models and hyperparameter families for
    ``config`` (``data``: what ``check`` returned) and returns their description (each family's count
    and parametrisation, :func:`~hypergradients.hparams.describe`) without training or writing anything
    (``hypergradients run --dry-run``).

    ``tensorboard=True`` marks one that logs per-round metrics, which ``--tensorboard`` can mirror
    (the others refuse the option). ``resumable=False`` marks an experiment that keeps no
    checkpoints (it recomputes in seconds or minutes): ``--resume`` is refused with that reason, and
    running again into the same ``--out`` replaces its files instead of being refused.
    """

    name: str
    summary: str
    schema: Schema
    smoke: Mapping[str, Any]
    run: Callable[[RunContext], ExperimentResult]
    check: Callable[[Config], Any] | None = None
    dry_run: Callable[[Config, Any], str] | None = None
    resumable: bool = True
    tensorboard: bool = False


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous count (callers in-process, tests)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_preset(cfg: Config, full: Mapping[str, Any], schema: Schema) -> Config:
    """``cfg`` with ``config=full`` applied: each key of ``full`` that still has its ``schema`` default
    takes the full value (a key the user set keeps the user's value)."""
    if cfg["config"] != "full":
        return cfg
    return {**cfg, **{k: v for k, v in full.items() if cfg[k] == schema[k].default}}


def with_threads(fn: Callable[[RunContext], ExperimentResult]) -> Callable[[RunContext], ExperimentResult]:
    """``fn`` run with ``threads`` torch threads, the caller's count restored after."""

    def run(ctx: RunContext) -> ExperimentResult:
        with threads(ctx.config["threads"]):
            return fn(ctx)

    return run


def check_settings(cfg: Config, make: Callable[[Config], Any]) -> Any:
    """``make(cfg)`` (a settings object with ``validate()``) checked before any work: the bundled
    problems' decay interval (``decay.low <= decay.high``), then ``validate()``, whose
    :class:`~hypergradients.HypergradientError` becomes a :class:`~hypergradients.app.config.ConfigError`."""
    from ...core.errors import HypergradientError
    from ..config import ConfigError

    if cfg["decay.low"] > cfg["decay.high"]:
        raise ConfigError(
            f"config keys 'decay.low' ({cfg['decay.low']:g}) and 'decay.high' "
            f"({cfg['decay.high']:g}): low must not exceed high; swap them"
        )
    settings = make(cfg)
    try:
        settings.validate()
    except HypergradientError as e:
        raise ConfigError(str(e)) from None
    return settings


def write_report(out: Path, title: str, body: list[str]) -> Path:
    """``out/report.md``: a ``# title`` line, then ``body`` (markdown lines), written atomically."""
    from ...training.files import write_atomic

    text = "\n".join([f"# {title}", "", *body]).rstrip("\n")
    return write_atomic(out / "report.md", text + "\n")
