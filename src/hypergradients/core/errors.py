"""Exceptions and warnings. Each message names the bad value and the fix."""

from __future__ import annotations

import math
import sys
import warnings


class HypergradientError(ValueError):
    """Bad input to a hypergradient computation (wrong shapes, types, a non-finite loss, ...)."""


class NeumannDivergenceError(HypergradientError):
    """The Neumann series ``Σ (I − αM)^j v`` grew: ``α`` exceeds ``2/λ_max(M)`` or ``M`` is indefinite."""

    def __init__(self, message: str, *, lambda_max: float, safe_alpha: float) -> None:
        super().__init__(message)
        self.lambda_max = lambda_max
        self.safe_alpha = safe_alpha


class NegativeCurvatureError(HypergradientError):
    """A solver met a direction ``d`` with ``dᵀ A d ≤ 0``: the operator ``A`` is not positive definite.

    ``curvature`` is the Rayleigh quotient ``dᵀAd/dᵀd`` found (NaN where the solver cannot name
    one), ``iteration`` where.
    """

    def __init__(self, message: str, *, curvature: float, iteration: int) -> None:
        super().__init__(message)
        self.curvature = curvature
        self.iteration = iteration

    def damping_beyond(self, damping: float) -> float:
        """The damping to retry with, given the ``damping`` of the operator that failed.

        The direction found has ``dᵀ(H + δI)d/dᵀd = c ≤ 0``, so ``H`` has curvature ``c − δ`` there
        and ``H + δ'I`` is positive along it only for ``δ' > δ + |c|``. A Rayleigh quotient
        under-estimates ``|λ_min|``, hence the factor 2 (a Levenberg-style step); ``1e-8`` when both
        are zero. Repeated on each new failure, δ at least doubles. One rule for ``hg.Auto``'s own
        retries and ``hg.CG.safer``.
        """
        curv = abs(self.curvature) if math.isfinite(self.curvature) else 0.0
        return 2.0 * (damping + curv) or 1e-8


class ProblemTooLargeError(HypergradientError):
    """A dense method was asked for a matrix above its size limit."""


class PathOnlyHyperparameterError(HypergradientError):
    """An implicit method was asked for a hyperparameter that only shapes the optimisation path."""


class NonFiniteHypergradientError(HypergradientError):
    """The hypergradient of ``key`` came out NaN or infinite (``method``: the method's name)."""

    def __init__(self, message: str, *, key: str, method: str) -> None:
        super().__init__(message)
        self.key = key
        self.method = method


class UnusedHyperparameterWarning(UserWarning):
    """A hyperparameter affects neither the condition (``∂L_T/∂w``) nor ``L_V``: its hypergradient is zero."""


class IndefiniteHessianWarning(UserWarning):
    """``H`` (plus any damping) is not positive definite at the given weights: they are not a minimum."""


_PACKAGE = __name__.split(".")[0]


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package.

    The library reaches its warnings through calls of varying depth (``hypergradient`` or
    ``root_hypergradient``, a ``HyperOptimizer`` step, a solver's own ``solve``); a fixed
    ``stacklevel`` would point into the library on some of them.
    """
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(_PACKAGE + "."):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
