"""Hugging Face transformers: the hyper step of Algorithm 1 inside a ``Trainer`` (the ``hf`` extra).

``from hypergradients.hf import HyperCallback, HyperTrainer, causal_lm_loss``; the implementation
and its documentation are in :mod:`hypergradients.training.hf`.
"""

from .training.hf import (
    STATE_FILE,
    HyperCallback,
    HyperTrainer,
    causal_lm_loss,
    model_loss,
    sequence_classification_loss,
)

__all__ = [
    "STATE_FILE",
    "HyperCallback",
    "HyperTrainer",
    "causal_lm_loss",
    "model_loss",
    "sequence_classification_loss",
]
