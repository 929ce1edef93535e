"""The settings of the hyper step and of :func:`~hypergradients.fit`, in small groups, and their defaults.

Every default of the training layer is decided here, once:

=========================================  ======================================  =========================
setting                                    default                                 where it is used
=========================================  ======================================  =========================
the hyper step's method                    ``Neumann(iters=20, alpha="auto")``     ``HyperOptimizer``, ``fit``
carry the solver state (``warm_start``)    ``True``                                ``HyperOptimizer``, ``fit``
the solver's residual (``residual``)       ``False``: not computed                 ``HyperOptimizer``, ``fit``
the hyperparameters' optimizer             Adam, lr ``1e-2``                       ``HyperOptimizer``, ``fit``
a solver failure (``on_solver_error``)     ``"damp"``: retry, skip if that fails   ``HyperOptimizer``, ``fit``
the loss                                   ``hparams.cross_entropy``               ``HyperOptimizer``, ``fit``
the weights' optimizer                     Adam, lr ``1e-3``                       ``fit``
the path hyperparameters' optimizer        Adam, lr ``1e-3``                       ``fit(path_hparams=)``
=========================================  ======================================  =========================

Why. The hyper step runs at every round at weights that are only near a minimum, where the
Hessian of a non-convex model can be indefinite: a Neumann series with ``α = 1/λ_max`` costs the
same at every step (19 HVPs, plus 20 power iterations whenever ``λ_max`` is re-estimated), needs
no tolerance, and when it diverges the damped retry only lowers ``α``; conjugate gradient meets
negative curvature there and must be damped. It is the estimator of the paper's Algorithm 3.
:func:`hypergradients.hypergradient` itself, a single computation at given weights, defaults to
``CG()`` instead (decided in :mod:`hypergradients.core.hypergradient`): there the answer should be
accurate to a tolerance. ``warm_start=True`` carries ``λ_max`` (and CG's last solution, Nyström's
sketch) from one hyper step to the next, so the power iterations run once in ``refresh_every``
hyper steps instead of at each: with the default method a run of ``fit`` spends fewer HVPs for the
same hyperparameters (measured in docs/benchmarks.md, ``benchmarks/fit_warm_start.py``).
``residual=False``: the solver's residual ``‖Hp − v‖/‖v‖`` is a diagnostic the step never uses, and
for Neumann, Identity and Nyström it costs one more HVP per hyper step (Identity's step would spend
one instead of none); ``HyperSettings(residual=True)`` reports it.

The groups are plain frozen dataclasses; each of ``fit``'s flat keywords is one field of one group
(``batch_size=64`` is ``batches=Batches(size=64)``): see :func:`~hypergradients.fit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..core.derivatives import HVP_MODES, HvpMode
from ..core.method import Method
from ..core.solvers import Neumann
from ..paths.tuner import OptimizerFactory

SolverPolicy = Literal["damp", "skip", "raise"]
Projection = Callable[[dict[str, Tensor]], Mapping[str, Tensor] | None]
"""``project(hparams)`` after every applied hyper step: change the tensors in place and return ``None``,
or return a dict of new values by key."""

__all__ = [
    "AdamFactory",
    "Batches",
    "Checkpoints",
    "Evaluation",
    "HyperSettings",
    "OptimizerFactory",
    "Projection",
    "SolverPolicy",
    "default_method",
]


@dataclass(frozen=True)
class AdamFactory:
    """``AdamFactory(lr)(tensors)`` is ``torch.optim.Adam(tensors, lr=lr)``: an optimizer factory with a
    readable repr (the defaults' form)."""

    lr: float

    def __call__(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr)


def default_method() -> Method:
    """The hyper step's method when none is given: ``Neumann(iters=20, alpha="auto")`` (module docstring)."""
    return Neumann(iters=20, alpha="auto")


HYPER_OPTIMIZER = AdamFactory(1e-2)
INNER_OPTIMIZER = AdamFactory(1e-3)
PATH_HYPER_OPTIMIZER = AdamFactory(1e-3)


def _int_at_least(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


@dataclass(frozen=True)
class HyperSettings:
    """How the hyper step is taken (:class:`~hypergradients.HyperOptimizer`, and ``fit``'s ``hyper=``).

    Args:
        method: the hypergradient method.
        optimizer: ``factory(list_of_hyperparameter_tensors) -> torch.optim.Optimizer``, or (for a
            ``HyperOptimizer``) an optimizer built over exactly the families' tensors.
        project: ``project(hparams)`` after every applied step, under ``torch.no_grad()``, with the
            families' unconstrained tensors by key (:data:`Projection`).
        on_solver_error: ``"damp"`` (retry CG on ``H + δI``, Neumann with a safe ``α``; skip if
            that fails too), ``"skip"`` or ``"raise"``.
        warm_start: carry a :class:`~hypergradients.SolverState` from step to step (CG/Auto start
            from the last ``p``, Neumann keeps its ``λ_max``, Nyström its sketch).
        residual: also compute the solver's relative residual ``‖Hp − v‖/‖v‖`` at every step
            (``HyperStep.info.residual``, the ``residual`` metric). Off by default: it is one more
            HVP for Neumann, Identity and Nyström (none for CG, Auto and Exact, whose solvers have
            it anyway), and the step does not use it; off, the metric is ``None`` for every method.
        hvp_mode: how the Hessian-vector products are computed, as
            :func:`~hypergradients.hypergradient`'s argument: ``"reverse"`` (double backward),
            ``"forward"`` or ``"finite-difference"`` (first-order gradients only, for models with
            operations that have no double backward, such as fused attention kernels).
    """

    method: Method = field(default_factory=default_method)
    optimizer: OptimizerFactory | torch.optim.Optimizer = HYPER_OPTIMIZER
    project: Projection | None = None
    on_solver_error: SolverPolicy = "damp"
    warm_start: bool = True
    residual: bool = False
    hvp_mode: HvpMode = "reverse"

    def __post_init__(self) -> None:
        if self.on_solver_error not in ("damp", "skip", "raise"):
            raise ValueError(
                f"on_solver_error must be 'damp', 'skip' or 'raise', got {self.on_solver_error!r}"
            )
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual must be True or False, got {self.residual!r}")
        if self.hvp_mode not in HVP_MODES:
            raise ValueError(
                f"hvp_mode must be one of {', '.join(map(repr, HVP_MODES))}, got {self.hvp_mode!r}"
            )


@dataclass(frozen=True)
class Batches:
    """The minibatches of ``fit``: ``size`` for the inner steps (and the hyper step's ``L_T``, unless
    ``hyper_size``), ``val_size`` for the hyper step's ``L_V`` (``None``: the whole validation set),
    ``seed`` for the order of the three streams (train, hyper-train, validation; the path tuner's
    validation stream is a fourth)."""

    size: int = 128
    val_size: int | None = None
    hyper_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _int_at_least("batch_size (Batches.size)", self.size, 1)


@dataclass(frozen=True)
class Evaluation:
    """Named ``(x, y)`` sets evaluated (loss and accuracy, evaluation mode) every ``every`` rounds and
    after the last."""

    sets: Mapping[str, tuple[Tensor, Tensor]] | None = None
    every: int = 1

    def __post_init__(self) -> None:
        _int_at_least("eval_every (Evaluation.every)", self.every, 1)


@dataclass(frozen=True)
class Checkpoints:
    """Where ``fit`` writes ``checkpoint.pt`` and ``metrics.jsonl`` (``dir``; ``None``: nowhere), every
    ``every`` rounds and after the last, and whether it continues from the checkpoint there (``resume``)."""

    dir: str | os.PathLike[str] | None = None
    every: int = 10
    resume: bool = False

    def __post_init__(self) -> None:
        _int_at_least("checkpoint_every (Checkpoints.every)", self.every, 1)
