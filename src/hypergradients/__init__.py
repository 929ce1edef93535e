"""hypergradients: gradient-based hyperparameter optimization at scale for PyTorch.

One call, :func:`hypergradient`, computes ``dL_V/dλ`` by any method: implicit differentiation at
the trained weights (:class:`Exact`, :class:`CG`, :class:`Neumann`, :class:`Identity`,
:class:`Nystrom`, :class:`Auto`, and :class:`MINRES`, :class:`GMRES`, :class:`BiCGStab`,
:class:`NormalCG`, which also solve an indefinite Hessian; :class:`Identity` also preconditioned by
an optimizer's diagonal, :func:`adam_diagonal`), differentiation through the optimization path
(:class:`Unrolled`, reverse mode, optionally checkpointed; :class:`Forward`, forward mode), or
first-order gradients only (:class:`FirstOrder`, no second derivative). :func:`fit` runs the
paper's Algorithm 1 on an ``nn.Module`` with hyperparameter families such as :class:`WeightDecay`
(its settings grouped as :class:`HyperSettings`, :class:`Batches`, :class:`Evaluation` and
:class:`Checkpoints`, its callbacks subclasses of :class:`Callback`); :class:`HyperOptimizer` is its
hyper step for a training loop of your own (:meth:`HyperOptimizer.natural` and
:meth:`HyperOptimizer.set_natural` read and set its values in natural units). The tuned values go
to a plain file by :func:`export_hparams` and come back by :func:`load_hparams` or
:func:`set_natural`; :func:`retrain` trains a fresh model with them fixed. :func:`root_hypergradient`
differentiates any optimality condition ``F(w, λ) = 0`` or fixed point ``w = T(w, λ)``, by the same
implicit methods; :func:`custom_argmin` and :func:`custom_root` make a solver's result ``w*(λ)`` a
node of autograd (``.backward()`` through it applies the theorem). A new solver is one subclass of
:class:`ImplicitMethod` (``solve(op, v, state)`` on a :class:`LinearOperator`), usable by all of them.
"""

import sys as _sys

from .core import distributed  # data-parallel hypergradients: hg.distributed.data_parallel()
from .core.autograd import ImplicitSolver, custom_argmin, custom_root
from .core.errors import (
    HypergradientError,
    IndefiniteHessianWarning,
    NegativeCurvatureError,
    NeumannDivergenceError,
    NonFiniteHypergradientError,
    PathOnlyHyperparameterError,
    ProblemTooLargeError,
    UnusedHyperparameterWarning,
)
from .core.first_order import FirstOrder
from .core.hypergradient import hypergradient
from .core.info import Info, RootInfo, Stats
from .core.method import ImplicitMethod, Method, PathMethod
from .core.modules import functional_model, make_losses, module_params
from .core.operators import HessianOperator, LinearOperator
from .core.roots import root_hypergradient
from .core.solvers import CG, GMRES, MINRES, Auto, BiCGStab, Exact, Identity, Neumann, NormalCG, Nystrom
from .core.state import CGState, KrylovState, NeumannState, NystromState, SolverState, StateMismatchError
from .hparams import DropConnect, Dropout, ExampleWeights, Family, LossReweighting, WeightDecay
from .hparams.augment import AugmentNet
from .hparams.distill import DistilledData
from .paths import (
    optim,  # differentiable inner optimizers: hg.optim.sgd / heavy_ball / nesterov / adam / adamw
)
from .paths.methods import Forward, Unrolled
from .paths.tuner import PathHyperparameters
from .training.callbacks import Callback
from .training.export import ExportedHparams, export_hparams, load_hparams, set_natural
from .training.files import OutputPathError, UnreadableFileError
from .training.fit import NonFiniteError, SkippedHyperStepsWarning, TrainResult, fit
from .training.hyper import HyperOptimizer, HyperStep
from .training.precondition import adam_diagonal
from .training.retrain import RetrainResult, retrain
from .training.settings import Batches, Checkpoints, Evaluation, HyperSettings

__version__ = "0.1.0"

# `hg.distributed` and `hg.optim` are public modules: `import hypergradients.optim` and
# `from hypergradients.distributed import data_parallel` name them where users read them.
_sys.modules[f"{__name__}.distributed"] = distributed
_sys.modules[f"{__name__}.optim"] = optim

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "AugmentNet",
    "Auto",
    "Batches",
    "BiCGStab",
    "CGState",
    "Callback",
    "Checkpoints",
    "DistilledData",
    "DropConnect",
    "Dropout",
    "Evaluation",
    "Exact",
    "ExampleWeights",
    "ExportedHparams",
    "Family",
    "FirstOrder",
    "Forward",
    "HessianOperator",
    "HyperOptimizer",
    "HyperSettings",
    "HyperStep",
    "HypergradientError",
    "Identity",
    "ImplicitMethod",
    "ImplicitSolver",
    "IndefiniteHessianWarning",
    "Info",
    "KrylovState",
    "LinearOperator",
    "LossReweighting",
    "Method",
    "NegativeCurvatureError",
    "Neumann",
    "NeumannDivergenceError",
    "NeumannState",
    "NonFiniteError",
    "NonFiniteHypergradientError",
    "NormalCG",
    "Nystrom",
    "NystromState",
    "OutputPathError",
    "PathHyperparameters",
    "PathMethod",
    "PathOnlyHyperparameterError",
    "ProblemTooLargeError",
    "RetrainResult",
    "RootInfo",
    "SkippedHyperStepsWarning",
    "SolverState",
    "StateMismatchError",
    "Stats",
    "TrainResult",
    "UnreadableFileError",
    "Unrolled",
    "UnusedHyperparameterWarning",
    "WeightDecay",
    "__version__",
    "adam_diagonal",
    "custom_argmin",
    "custom_root",
    "distributed",
    "export_hparams",
    "fit",
    "functional_model",
    "hypergradient",
    "load_hparams",
    "make_losses",
    "module_params",
    "optim",
    "retrain",
    "root_hypergradient",
    "set_natural",
]
