"""Hyperparameter families: objects that own hyperparameter tensors and say how they enter training.

See :mod:`hypergradients.hparams.base` for the interface (unconstrained tensors, natural values,
the hooks ``batch``, ``weights``, ``hooks``, ``forward``, ``reduce``, ``penalty``, how they
compose, how noise is fixed within one hypergradient, and how a family counts and describes its
hyperparameters) and :class:`WeightDecay` for weight decay, global, per layer or per weight.
"""

from .base import Batch, Description, Family, Forward, Hook, Noise, Sampler, check_composable, describe
from .weight_decay import GRANULARITIES, WeightDecay, weights_only

__all__ = ["GRANULARITIES", "Batch", "Description", "Family", "Forward", "Hook", "Noise", "Sampler",
           "WeightDecay", "check_composable", "describe", "weights_only"]
