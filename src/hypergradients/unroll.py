"""Hypergradients through the optimization path: differentiate K steps of gradient descent.

From the given weights ``w_0`` (held constant w.r.t. ``λ``), K steps

    w_{k+1} = w_k − α ∂L_T/∂w (w_k, λ)

are taken and ``L_V(w_K, λ)`` is differentiated w.r.t. ``λ`` in reverse mode. The Jacobian
obeys ``∂w_{k+1}/∂λ = (I − αH_k) ∂w_k/∂λ − α ∂²L_T/∂w∂λ(w_k)`` with ``∂w_0/∂λ = 0``. Started at
an optimum ``w*`` every ``w_k = w*`` and ``H_k = H``, so

    ∂w_K/∂λ = −α Σ_{j<K} (I − αH)^j ∂²L_T/∂w∂λ,

which makes ``dL_V/dλ`` equal to the K-term Neumann hypergradient (Lorraine et al. 2020, Thm. 2).

``truncate=T`` differentiates only the last T steps (Shaban et al. 2019): the first K−T run
without a graph and their end point is treated as constant. ``lr`` may name a key of
``hparams``: then the step size itself gets a hypergradient (implicit methods cannot give one,
as the optimum does not depend on the step size).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import tree
from .derivatives import LossFn, grad, scalar_loss
from .errors import HypergradientError
from .tree import Tree


def step_size(lr: float | str, hparams: Mapping[str, Tensor]) -> Tensor | float:
    """The step size ``α``: a number, or the hyperparameter ``hparams[lr]`` (a scalar tensor)."""
    if isinstance(lr, str):
        if lr not in hparams:
            raise HypergradientError(
                f"Unrolled(lr={lr!r}) names a hyperparameter that is not in hparams "
                f"(keys: {sorted(hparams)}); pass a number or one of those keys")
        a = hparams[lr]
        if a.numel() != 1:
            raise HypergradientError(f"the step-size hyperparameter {lr!r} must be a scalar, "
                                     f"got shape {tuple(a.shape)}")
        return a.reshape(())
    return float(lr)


def _sgd_step(inner_loss: LossFn, w: Tree, lam: Tree, alpha: Tensor | float, *, create_graph: bool,
              step: int) -> Tree:
    if not create_graph:
        w = tree.clone_leaves(w, requires_grad=True)
    try:
        loss = scalar_loss(inner_loss, w, lam, name="inner_loss")
    except HypergradientError as e:
        raise HypergradientError(f"unrolled step {step}: {e}") from e
    g = grad(loss, w, create_graph=create_graph)
    if create_graph:
        return {k: w[k] - alpha * g[k] for k in w}
    with torch.no_grad():
        return {k: (w[k] - alpha * g[k]).detach() for k in w}


def unroll(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
           steps: int, lr: float | str, truncate: int | None = None) -> tuple[Tensor, Tree]:
    """Run the K steps and return ``(L_V(w_K, λ), w_K)`` with the graph to ``λ`` kept.

    ``lam`` must be leaves that require grad; ``params`` are copied, never modified.
    """
    alpha = step_size(lr, lam)
    n_diff = steps if truncate is None else truncate
    lam_const = tree.detach(lam)
    alpha_const = alpha.detach() if isinstance(alpha, Tensor) else alpha
    w: Tree = tree.clone_leaves(params, requires_grad=False)
    for k in range(steps - n_diff):
        w = _sgd_step(inner_loss, w, lam_const, alpha_const, create_graph=False, step=k)
    # The start of the differentiated segment is a constant w.r.t. λ, as in the definition.
    w = tree.clone_leaves(w, requires_grad=True)
    for k in range(steps - n_diff, steps):
        w = _sgd_step(inner_loss, w, lam, alpha, create_graph=True, step=k)
    try:
        out = scalar_loss(outer_loss, w, lam, name="outer_loss")
    except HypergradientError as e:
        raise HypergradientError(f"after {steps} unrolled steps: {e}") from e
    return out, w
