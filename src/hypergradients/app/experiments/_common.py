"""Pieces the paper's experiment modules share (overfit-validation, distill, data-cleaning, augment,
lstm-dropout, families): the MLP and the hypergradient method, training one arm in its checkpoint
folder, and writing the result file and the report at the end of a run; and :func:`versus`, the one
place where a report's words for "arm A against arm B" are chosen from the numbers."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...core.method import Method
from ...core.solvers import CG, Neumann
from ...hparams import Family
from ...training.files import UnreadableFileError, json_dumps, write_atomic
from ...training.fit import SkippedHyperStepsWarning, TrainResult, check_checkpoint, fit
from ...training.hyper import _mode
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
    that ``restart`` (``"arm"``, ``"run"``). Each hyper step solves from scratch unless ``warm_start``
    is given: the experiments' documented figures were measured so."""
    kwargs.setdefault("warm_start", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=SkippedHyperStepsWarning)  # counted in the table
        try:
            return fit(model, fams, train, val, checkpoint_dir=checkpoint_dir, **kwargs)
        except UnreadableFileError as e:
            raise _unreadable(e, checkpoint_dir, restart) from None


def _unreadable(e: UnreadableFileError, checkpoint_dir: Path | None, restart: str) -> UnreadableFileError:
    return UnreadableFileError(
        f"cannot read the checkpoint {str(e.path)!r}: {e.why}. To continue: "
        f"delete the folder {str(checkpoint_dir)!r} to restart that {restart}, or restore it.",
        path=e.path,
        why=e.why,
    )


def check_checkpoints(ctx: RunContext, dirs: Iterable[Path], *, restart: str = "arm") -> None:
    """On ``--resume``, before the run writes anything: the checkpoint in each of ``dirs`` (the arms'
    folders, as given to :func:`fit_checkpointed`) reads back, else the same
    :class:`~hypergradients.training.files.UnreadableFileError` that :func:`fit_checkpointed` would raise, so
    that a refused resume leaves every file of the run as it was (an arm trained or a metrics file
    rewritten before a later arm's checkpoint turns out unreadable would not be)."""
    if not ctx.resume:
        return
    for d in dirs:
        try:
            check_checkpoint(d)
        except UnreadableFileError as e:
            raise _unreadable(e, d, restart) from None


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


def per_example(model: nn.Module, x: Tensor, y: Tensor, fn: Callable[[Tensor, Tensor], Tensor], *,
                batch_size: int = 4096) -> Tensor:
    """``fn(model(x), y)`` per example (``(N,)``, on the CPU, float64), the model in evaluation mode and
    no graph: the paired data behind a standard error of the difference between two arms evaluated
    on the same examples (:func:`paired_se`)."""
    parts = []
    with _mode(model, False), torch.no_grad():
        for s in range(0, len(y), batch_size):
            parts.append(fn(model(x[s:s + batch_size]), y[s:s + batch_size]).detach().double().cpu())
    return torch.cat(parts)


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example 0/1 correctness of a classifier (the mean is the accuracy)."""
    return (logits.argmax(1) == y).double()


def paired_se(a: Tensor, b: Tensor) -> float:
    """Standard error of ``mean(a) − mean(b)`` for per-example values on the same examples (NaN for
    fewer than two examples: no estimate)."""
    d = (a - b).double()
    return float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")


Kind = Literal["beats", "worse", "within noise", "negligible", "unmeasured"]

# A difference under this fraction of the compared values is not called a win or a loss even when it
# exceeds two standard errors: the paired standard error measures the test examples' noise between two
# fixed models only, so two arms that barely moved from the same start differ "significantly" by a
# few parts in a million, a difference no one would act on.
NEGLIGIBLE = 1e-3


@dataclass(frozen=True)
class Verdict:
    """How arm A compares with arm B on one number (:func:`versus`): ``kind`` for the caller's logic,
    ``text`` the words for the report."""

    kind: Kind
    text: str
    difference: float
    se: float | None


def versus(a: str, b: str, value_a: float, value_b: float, se: float | None, *, metric: str,
           higher_is_better: bool, se_what: str, no_se: str, digits: str = ".4g") -> Verdict:
    """Arm ``a`` against arm ``b`` on ``metric``, in words that follow the numbers.

    ``d = value_a − value_b`` with standard error ``se`` (``se_what`` says which: paired over the
    test examples, over seeds...). ``a`` *beats* or *is worse than* ``b`` only when ``|d| > 2·se``
    and ``|d|`` is at least :data:`NEGLIGIBLE` of the values; within two standard errors it is
    *within noise* (difference d ± se); beyond them but below that size the two *do not differ
    materially*. Without a standard error (``None`` or NaN: one seed, no per-example data) no side is
    called better or noise: the difference is given with ``no_se``, e.g. ``"one seed: no noise
    estimate"``. Equal values with a zero standard error (the same on every pair) are a tie.
    """
    d = value_a - value_b
    vals = f"{value_a:{digits}} vs {value_b:{digits}}"
    if se is None or not math.isfinite(se):
        return Verdict("unmeasured", f"{a} vs {b} on {metric}: {vals} (difference {d:+.3g}; {no_se})", d,
                       None)
    if d == 0 and se == 0:
        return Verdict("within noise", f"{a} ties with {b} on {metric}: {vals} (no difference on any pair, "
                       f"{se_what})", d, se)
    diff = f"difference {d:+.3g} ± {se:.2g}, {se_what}"
    if abs(d) <= 2 * se:
        return Verdict("within noise", f"{a} is within noise of {b} on {metric}: {vals} ({diff})", d, se)
    if abs(d) < NEGLIGIBLE * max(abs(value_a), abs(value_b)):
        return Verdict("negligible", f"{a} does not differ materially from {b} on {metric}: {vals} ({diff}: "
                       f"beyond two standard errors, but under {NEGLIGIBLE:.1%} of the values)", d, se)
    if (d > 0) == higher_is_better:
        return Verdict("beats", f"{a} beats {b} on {metric}: {vals} ({diff})", d, se)
    return Verdict("worse", f"{a} is worse than {b} on {metric}: {vals} ({diff})", d, se)
