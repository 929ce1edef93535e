"""The application layer: everything runnable, registered by name (``hypergradients run <name>``,
``hypergradients list``).

Each module defines an :class:`~.base.Experiment` (name, configuration schema, ``--smoke``
overrides, ``run(ctx) -> ExperimentResult``) and is listed in :data:`REGISTRY`:

* ``weight-decay`` (:mod:`.weight_decay`) — the paper's per-weight weight-decay experiment;
* ``explain`` (:mod:`.explain`) — the Neumann–SGD theorem and the optimization path, with numbers;
* ``compare`` (:mod:`.compare`) — inverse-Hessian approximations per Hessian-vector product;
* ``bench`` (:mod:`.bench`) — time, memory and accuracy of our methods against a plain loop.
* ``families`` (:mod:`.families`) — one hyperparameter family tuned by IFT against the same model
  without it.
* ``overfit-validation``, ``distill``, ``data-cleaning`` (:mod:`.overfit_validation`,
  :mod:`.distill_mnist`, :mod:`.data_cleaning`) — the paper's experiments: one decay per weight
  fitting 50 validation images, dataset distillation, per-example weights on corrupted labels.
* ``lstm-dropout`` (:mod:`.lstm_dropout`) — an LSTM language model's dropout and DropConnect tuned
  by IFT against fixed dropout (and, optionally, Optuna; :mod:`.optuna_arm`).
* ``augment`` (:mod:`.augment_mnist`) — a learned augmentation network against none and a hand-made
  one (shifts and rotations), a small CNN on MNIST, several seeds.
* ``lm-reweight`` (:mod:`.lm_reweight`) — learned data weights (one per training sequence, or a
  loss-reweighting network) for a byte-level transformer language model on partly corrupted text,
  by IFT with finite-difference products, against plain training, a clean-only oracle and cheaper
  hyper steps.

No experiment imports another: what they share is in :mod:`.base` (what an experiment is),
:mod:`.shared` (the start and the end of a run, one arm of training, the models, data loading and the
statistics of the reports), :mod:`.problems` (the bilevel problems with known answers that explain,
compare and the benchmarks use), :mod:`.optuna_arm` (the black-box tuner) and :mod:`.figures`
(explain's and compare's figures). The registry is built on first use, so that a subprocess that
needs one module (the benchmark's case runner) does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Experiment, ExperimentResult, RunContext

# name -> module defining EXPERIMENT, in the order `hypergradients list` shows them
MODULES: dict[str, str] = {
    "weight-decay": "weight_decay",
    "explain": "explain",
    "compare": "compare",
    "bench": "bench",
    "families": "families",
    "overfit-validation": "overfit_validation",
    "distill": "distill_mnist",
    "data-cleaning": "data_cleaning",
    "lstm-dropout": "lstm_dropout",
    "augment": "augment_mnist",
    "lm-reweight": "lm_reweight",
}
_registry: dict[str, Experiment] = {}


def registry() -> dict[str, Experiment]:
    """Every registered experiment by name (imported on the first call)."""
    if not _registry:
        for name, module in MODULES.items():
            exp: Experiment = importlib.import_module(f"{__name__}.{module}").EXPERIMENT
            assert exp.name == name, (exp.name, name)
            _registry[name] = exp
    return _registry


def __getattr__(name: str) -> Any:  # REGISTRY, built on first access
    if name == "REGISTRY":
        return registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> Experiment:
    """The experiment called ``name`` (``KeyError`` listing the registered ones)."""
    try:
        return registry()[name]
    except KeyError:
        raise KeyError(
            f"unknown experiment {name!r}; registered: {', '.join(MODULES)} (see `hypergradients list`)"
        ) from None


__all__ = ["MODULES", "REGISTRY", "Experiment", "ExperimentResult", "RunContext", "get", "registry"]
