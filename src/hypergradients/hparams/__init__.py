"""Hyperparameter families: objects that own hyperparameter tensors and say how they enter training.

See :mod:`hypergradients.hparams.base` for the interface (unconstrained tensors, natural values,
the hooks ``batch``, ``weights``, ``hooks``, ``forward``, ``reduce``, ``penalty``, how they
compose, how noise is fixed within one hypergradient, and how a family counts and describes its
hyperparameters), and :mod:`hypergradients.hparams.objective` for the rule that composes them into
``L_T`` and ``L_V`` (:class:`Objective`) and the loss contract; :class:`WeightDecay` (global, per
layer or per weight), :class:`Dropout` (per-unit concrete dropout), :class:`DropConnect`
(per-weight), :class:`ExampleWeights` (one loss weight per training example) and
:class:`LossReweighting` (a loss → weight network).
"""

import warnings as _warnings
from typing import Any as _Any

from .base import (
    Batch,
    Description,
    Family,
    Hook,
    ModelForward,
    NaturalValue,
    Noise,
    Sampler,
    check_composable,
    describe,
    unconstrained,
)
from .dropout import DropConnect, Dropout, Site
from .example_weights import ExampleWeights, LossReweighting
from .objective import BatchLoss, Objective, as_batch, collect_hparams, cross_entropy, on_targets
from .weight_decay import GRANULARITIES, WeightDecay, weights_only

__all__ = [
    "GRANULARITIES",
    "Batch",
    "BatchLoss",
    "Description",
    "DropConnect",
    "Dropout",
    "ExampleWeights",
    "Family",
    "Hook",
    "LossReweighting",
    "ModelForward",
    "NaturalValue",
    "Noise",
    "Objective",
    "Sampler",
    "Site",
    "WeightDecay",
    "as_batch",
    "check_composable",
    "collect_hparams",
    "cross_entropy",
    "describe",
    "on_targets",
    "unconstrained",
    "weights_only",
]


def __getattr__(name: str) -> _Any:
    # ``hg.Forward`` is the forward-mode path method, so the model-forward type is ``ModelForward``;
    # families annotated with ``hparams.Forward`` keep importing, with a warning that names it.
    if name == "Forward":
        _warnings.warn(
            "hypergradients.hparams.Forward is now hypergradients.hparams.ModelForward (the type "
            "of forward(params, x)); hg.Forward is the forward-mode path method",
            DeprecationWarning,
            stacklevel=2,
        )
        return ModelForward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
