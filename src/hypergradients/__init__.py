"""hypergradients: gradient-based hyperparameter optimization at scale for PyTorch.

One call, :func:`hypergradient`, computes ``dL_V/dλ`` by any method: implicit differentiation
at the trained weights (:class:`Exact`, :class:`CG`, :class:`Neumann`, :class:`Identity`,
:class:`Nystrom`, :class:`Auto`) or differentiation through the optimization path (:class:`Unrolled`,
reverse mode, optionally checkpointed; :class:`Forward`, forward mode). :func:`fit` runs the
paper's Algorithm 1 on an ``nn.Module`` with hyperparameter families such as :class:`WeightDecay`;
:class:`HyperOptimizer` is its hyper step for a training loop of your own. :func:`root_hypergradient`
differentiates any optimality condition ``F(w, λ) = 0`` or fixed point ``w = T(w, λ)``. A new
inverse-Hessian solver is one subclass of :class:`ImplicitMethod` (``solve(op, v, state)`` on a
:class:`HessianOperator`).
"""

from . import (
    distributed,  # data-parallel hypergradients on torch.distributed: hg.distributed.data_parallel()
    optim,  # differentiable inner optimizers: hg.optim.gd / sgd / heavy_ball / nesterov / adam / adamw
)
from .errors import (
    HypergradientError,
    NegativeCurvatureError,
    NeumannDivergenceError,
    PathOnlyHyperparameterError,
    ProblemTooLargeError,
)
from .files import OutputPathError, UnreadableFileError
from .hparams import DropConnect, Dropout, ExampleWeights, Family, LossReweighting, WeightDecay
from .hparams.augment import AugmentNet
from .hparams.distill import DistilledData
from .hyper import HyperOptimizer, HyperStep
from .methods import (
    CG,
    Auto,
    Exact,
    Forward,
    Identity,
    Info,
    Method,
    Neumann,
    Nystrom,
    SolverState,
    Unrolled,
    UnusedHyperparameterWarning,
    hypergradient,
)
from .modules import functional_model, make_losses, module_params
from .operators import HessianOperator
from .paths import PathHyperparameters
from .protocol import ImplicitMethod, IndefiniteHessianWarning, PathMethod, Stats
from .roots import GMRES, BiCGStab, NormalCG, RootInfo, root_hypergradient
from .state import StateMismatchError
from .train import NonFiniteError, SkippedHyperStepsWarning, TrainResult, fit

__version__ = "0.1.0"

__all__ = [
    "CG",
    "GMRES",
    "AugmentNet",
    "Auto",
    "BiCGStab",
    "DistilledData",
    "DropConnect",
    "Dropout",
    "Exact",
    "ExampleWeights",
    "Family",
    "Forward",
    "HessianOperator",
    "HyperOptimizer",
    "HyperStep",
    "HypergradientError",
    "Identity",
    "ImplicitMethod",
    "IndefiniteHessianWarning",
    "Info",
    "LossReweighting",
    "Method",
    "NegativeCurvatureError",
    "Neumann",
    "NeumannDivergenceError",
    "NonFiniteError",
    "NormalCG",
    "Nystrom",
    "OutputPathError",
    "PathHyperparameters",
    "PathMethod",
    "PathOnlyHyperparameterError",
    "ProblemTooLargeError",
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
    "distributed",
    "fit",
    "functional_model",
    "hypergradient",
    "make_losses",
    "module_params",
    "optim",
    "root_hypergradient",
]
