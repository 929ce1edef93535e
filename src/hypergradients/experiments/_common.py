"""Pieces the paper's experiment modules share (overfit-validation, distill, data-cleaning, augment,
lstm-dropout, families): training one arm in its checkpoint folder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..files import UnreadableFileError
from ..hparams import Family
from ..train import SkippedHyperStepsWarning, TrainResult, fit


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
    """:func:`~hypergradients.train.fit` checkpointing in ``checkpoint_dir``; skipped hyper steps are
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
