"""A tuned arm of an experiment's run, as :mod:`~hypergradients.app.tuned` (the ``export`` and
``retrain`` commands) and the experiments' own "freeze and retrain" check read it: how to build its
fresh model and families, how it was trained, and where its checkpoint is. The experiments that
tune build their arms (their ``tuned_arms``); this module imports none of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..hparams import Family
from ..training.fit import CHECKPOINT, read_checkpoint
from ..training.retrain import On, RetrainResult, retrain
from .config import ConfigError
from .datasets import Dataset

__all__ = ["Arm", "Data", "splits"]

Data = tuple[Tensor, Tensor]


def splits(ds: Dataset) -> tuple[Data, Data, Data]:
    """The train, validation and test sets of ``ds``."""
    return (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)


@dataclass
class Arm:
    """One tuned arm of a run: ``model()`` the fresh model with the run's initial weights,
    ``families(model)`` its families at their initial values, ``optimizer`` the inner optimizer's
    factory, ``inner_steps``/``warmup_steps`` per round and before the first, ``batch_size`` and
    ``seed`` of the training batches, ``folder`` where its checkpoint is."""

    name: str
    folder: Path
    model: Callable[[], nn.Module]
    families: Callable[[nn.Module], list[Family]]
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]
    inner_steps: int
    warmup_steps: int
    batch_size: int
    seed: int

    def steps(self, rounds: int) -> int:
        """The inner steps that ``rounds`` rounds of the run took."""
        return rounds * self.inner_steps + (self.warmup_steps if rounds else 0)

    def tuned(self) -> tuple[nn.Module, list[Family], int]:
        """The model and families as the arm's checkpoint left them, and the checkpoint's round."""
        st = read_checkpoint(
            self.folder / CHECKPOINT, fix="run the experiment again (or --resume it) to write the checkpoint"
        )
        model = self.model()
        model.load_state_dict(st["model"])
        fams = self.families(model)
        if st.get("hyper") is None:
            raise ConfigError(
                f"the checkpoint {str(self.folder / CHECKPOINT)!r} holds no hyperparameters: the "
                f"arm {self.name!r} tuned none"
            )
        for fam in fams:
            fam.load_tensors(st["hyper"]["hparams"])
        return model, fams, int(st["round"])

    def retrain(
        self,
        families: list[Family],
        rounds: int,
        train: Data,
        val: Data | None = None,
        *,
        on: On = "train",
        values: Any = None,
        eval_sets: dict[str, Data] | None = None,
    ) -> RetrainResult:
        """:func:`~hypergradients.retrain`: a fresh :meth:`model` trained for the inner steps of
        ``rounds`` rounds of this arm, with its optimizer, batch size and batch order, and the
        ``families``' values (or ``values``) fixed, on ``train`` or on ``train`` and ``val``."""
        return retrain(
            self.model,
            families,
            train,
            val,
            values=values,
            on=on,
            steps=self.steps(rounds),
            optimizer=self.optimizer,
            batch_size=self.batch_size,
            seed=self.seed,
            eval_sets=eval_sets,
        )
