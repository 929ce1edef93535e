"""Hyperparameter families: objects that own hyperparameter tensors and say how they enter training.

See :mod:`hypergradients.hparams.base` for the interface (unconstrained tensors, natural values,
the hooks ``batch``, ``weights``, ``hooks``, ``forward``, ``reduce``, ``penalty``, how they
compose, how noise is fixed within one hypergradient, and how a family counts and describes its
hyperparameters); :class:`WeightDecay` (global, per layer or per weight), :class:`Dropout`
(per-unit concrete dropout), :class:`DropConnect` (per-weight), :class:`ExampleWeights` (one
loss weight per training example) and :class:`LossReweighting` (a loss → weight network).
"""

from .base import Batch, Description, Family, Forward, Hook, Noise, Sampler, check_composable, describe
from .dropout import DropConnect, Dropout, Site
from .example_weights import ExampleWeights, LossReweighting
from .weight_decay import GRANULARITIES, WeightDecay, weights_only

__all__ = [
    "GRANULARITIES", "Batch", "Description", "DropConnect", "Dropout", "ExampleWeights", "Family", "Forward",
    "Hook", "LossReweighting", "Noise", "Sampler", "Site", "WeightDecay", "check_composable", "describe",
    "weights_only",
]
