"""Hyperparameter families: objects that own hyperparameter tensors and say how they enter training.

See :class:`~hypergradients.hparams.base.Family` for the interface (unconstrained tensors,
natural values, and the four hooks ``penalty``, ``batch``, ``forward``, ``reduce``) and
:class:`WeightDecay` for weight decay, global, per layer or per weight.
"""

from .base import Batch, Family, Forward
from .weight_decay import GRANULARITIES, WeightDecay, weights_only

__all__ = ["GRANULARITIES", "Batch", "Family", "Forward", "WeightDecay", "weights_only"]
