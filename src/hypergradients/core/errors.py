"""Exceptions. Each message names the bad value and the fix."""

from __future__ import annotations


class HypergradientError(ValueError):
    """Bad input to a hypergradient computation (wrong shapes, types, a non-finite loss, ...)."""


class NeumannDivergenceError(HypergradientError):
    """The Neumann series ``Σ (I − αH)^j v`` grew: ``α`` exceeds ``2/λ_max(H)`` or H is indefinite."""

    def __init__(self, message: str, *, lambda_max: float, safe_alpha: float) -> None:
        super().__init__(message)
        self.lambda_max = lambda_max
        self.safe_alpha = safe_alpha


class NegativeCurvatureError(HypergradientError):
    """Conjugate gradient met a direction ``d`` with ``dᵀ H d ≤ 0``: H is not positive definite."""

    def __init__(self, message: str, *, curvature: float, iteration: int) -> None:
        super().__init__(message)
        self.curvature = curvature
        self.iteration = iteration


class ProblemTooLargeError(HypergradientError):
    """A dense method was asked for a Hessian above its size limit."""


class PathOnlyHyperparameterError(HypergradientError):
    """An implicit method was asked for a hyperparameter that only shapes the optimisation path."""
