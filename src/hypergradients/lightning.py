"""PyTorch Lightning: the hyper step of Algorithm 1 as a callback (the ``lightning`` extra).

``from hypergradients.lightning import HyperCallback``; the implementation and its documentation
are in :mod:`hypergradients.training.lightning`.
"""

from .training.lightning import HyperCallback

__all__ = ["HyperCallback"]
