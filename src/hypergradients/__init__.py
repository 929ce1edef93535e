"""hypergradients: gradient-based hyperparameter optimization at scale for PyTorch.

One call, :func:`hypergradient`, computes ``dL_V/dλ`` by any method: implicit differentiation
at the trained weights (:class:`Exact`, :class:`CG`, :class:`Neumann`, :class:`Identity`,
:class:`Nystrom`) or differentiation through the optimization path (:class:`Unrolled`).
"""

from .errors import (
    HypergradientError,
    NegativeCurvatureError,
    NeumannDivergenceError,
    PathOnlyHyperparameterError,
    ProblemTooLargeError,
)
from .methods import (
    CG,
    Exact,
    Identity,
    Info,
    Method,
    Neumann,
    Nystrom,
    Unrolled,
    UnusedHyperparameterWarning,
    hypergradient,
)
from .modules import functional_model, make_losses, module_params

__version__ = "0.1.0"

__all__ = [
    "CG",
    "Exact",
    "HypergradientError",
    "Identity",
    "Info",
    "Method",
    "NegativeCurvatureError",
    "Neumann",
    "NeumannDivergenceError",
    "Nystrom",
    "PathOnlyHyperparameterError",
    "ProblemTooLargeError",
    "Unrolled",
    "UnusedHyperparameterWarning",
    "__version__",
    "functional_model",
    "hypergradient",
    "make_losses",
    "module_params",
]
