"""Numbers behind ``hypergradients explain`` and ``hypergradients compare`` (values, no printing).

* :func:`explain` — the Neumann–SGD theorem, cold-start and truncated unrolling, and a
  learning-rate hyperparameter, on a bundled per-weight-L2 logistic regression.
* :func:`compare` — inverse-Hessian approximations (Identity, Neumann, CG, Nyström, unrolling)
  against the exact hypergradient, per Hessian-vector product spent.
* :mod:`.problems` — the bundled bilevel problems, solved to float64 precision.
"""

from .compare import CompareConfig, CompareResult, ProblemCurves, compare
from .explain import ExplainConfig, ExplainResult, explain
from .problems import PROBLEMS, BilevelProblem, cosine, load_problem, rel_dist

__all__ = [
    "PROBLEMS",
    "BilevelProblem",
    "CompareConfig",
    "CompareResult",
    "ExplainConfig",
    "ExplainResult",
    "ProblemCurves",
    "compare",
    "cosine",
    "explain",
    "load_problem",
    "rel_dist",
]
