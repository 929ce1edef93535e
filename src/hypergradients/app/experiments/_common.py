"""Pieces the paper's experiment modules share (overfit-validation, distill, data-cleaning, augment,
lstm-dropout, families): the MLP and the hypergradient method, training one arm in its checkpoint
folder, and writing the result file and the report at the end of a run."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ...core.method import Method
from ...core.solvers import CG, Neumann
from ...hparams import Family
from ...training.files import UnreadableFileError, json_dumps, write_atomic
from ...training.fit import SkippedHyperStepsWarning, TrainResult, fit
from ..config import Config
from .base import ExperimentResult, RunContext, write_report


def linear_or_mlp(inputs: int, hidden: Sequence[int], outputs: int) -> nn.Sequential:
    """``Flatten`` then ``inputs → hidden… → outputs`` with ReLUs (no hidden layer: logistic regression)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(inputs, h), nn.ReLU()]
        inputs = h
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


def method(cfg: Config) -> Method:
    """CG with a small damping (a tiny training set leaves H near-singular) or Neumann, ``hyper.iters``."""
    if cfg["hyper.method"] == "cg":
        return CG(iters=cfg["hyper.iters"], tol=1e-6, damping=1e-3)
    return Neumann(iters=cfg["hyper.iters"], alpha="auto")


def fit_checkpointed(
    model: nn.Module,
    fams: list[Family],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    checkpoint_dir: Path | None,
    restart: str = "arm",
    **kwargs: Any,
) -> TrainResult:
    """:func:`~hypergradients.fit` checkpointing in ``checkpoint_dir``; skipped hyper steps are
    counted (in the table), not warned; an unreadable checkpoint names the folder to delete to restart
    that ``restart`` (``"arm"``, ``"run"``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=SkippedHyperStepsWarning)  # counted in the table
        try:
            return fit(model, fams, train, val, checkpoint_dir=checkpoint_dir, **kwargs)
        except UnreadableFileError as e:
            raise UnreadableFileError(
                f"cannot read the checkpoint {str(e.path)!r}: {e.why}. To continue: "
                f"delete the folder {str(checkpoint_dir)!r} to restart that {restart}, or restore it.",
                path=e.path,
                why=e.why,
            ) from None


def hyper_steps(res: TrainResult) -> str:
    """The table's ``hyper_steps`` cell: the hyper steps taken out of those planned (``taken/planned``)."""
    return f"{res.hyper_steps}/{res.hyper_steps + res.skipped_hyper_steps}"


def what_it_shows(notes: list[str]) -> list[str]:
    """The report's ``## What it shows`` section: one bullet per note, then a blank line."""
    return ["## What it shows", "", *[f"- {n}" for n in notes], ""]


def finish(
    ctx: RunContext,
    t0: float,
    *,
    title: str,
    columns: list[str],
    rows: list[dict[str, Any]],
    notes: list[str],
    result: dict[str, Any],
    result_name: str,
    body: list[str],
    figures: Sequence[Path] = (),
    also: Sequence[Path] = (),
) -> ExperimentResult:
    """The end of a run: ``result`` written to ``out/result_name`` (JSON), then ``report.md`` (``# title``
    and ``body``); the :class:`ExperimentResult` lists ``figures``, the result file and ``also`` as its
    files, and the wall time since ``t0``."""
    result_file = ctx.out / result_name
    write_atomic(result_file, json_dumps(result))
    path = write_report(ctx.out, title, body)
    return ExperimentResult(
        title=title,
        columns=columns,
        rows=rows,
        report=path,
        out=ctx.out,
        notes=notes,
        wall_s=time.perf_counter() - t0,
        result=result,
        result_file=result_file,
        files=[*figures, result_file, *also],
    )
