"""The diagonal that the model's own optimizer divides its step by: a free curvature estimate.

``torch.optim.Adam`` and ``AdamW`` step every weight by ``Δw = −lr·m̂/(sqrt(v̂) + eps)``, with the
bias-corrected moments ``m̂ = m/(1 − β₁ᵗ)`` and ``v̂ = v/(1 − β₂ᵗ)`` (``exp_avg``, ``exp_avg_sq`` and
``step`` in its state; ``max_exp_avg_sq`` instead of ``exp_avg_sq`` with ``amsgrad``). Written as
``Δw = −D⁻¹m̂`` with the diagonal

    D = (sqrt(v̂) + eps)/lr,

``hg.Identity(precondition=D)`` takes ``H ≈ diag(D)``, so ``p = v/D = lr·v/(sqrt(v̂) + eps)``: one
step of the optimizer's own update applied to ``v = ∂L_V/∂w`` (SAMA's "algorithmic adaptation",
Choe et al. 2023). It costs no product and reads only the optimizer's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["adam_diagonal", "optimizer_diagonal"]


_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def _unwrap(optimizer: object) -> object:
    """The Adam inside a wrapper (Accelerate's ``AcceleratedOptimizer``, itself an ``Optimizer``)."""
    for _ in range(8):
        if isinstance(optimizer, _ADAMS) or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


def _number(x: object) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


def optimizer_diagonal(
    optimizer: object, params: nn.Module | Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """:func:`adam_diagonal`, and the names of the weights that had no state yet (``D = 1/lr``)."""
    opt = _unwrap(optimizer)
    if not isinstance(opt, _ADAMS):
        raise TypeError(
            f"the inner optimizer is a {type(optimizer).__name__}; the preconditioner is read from "
            "torch.optim.Adam or AdamW (their exp_avg_sq): train with one of them, or pass "
            "hg.Identity(precondition=<your diagonal>) or hg.Identity(scale=...)"
        )
    named = (
        {k: p for k, p in params.named_parameters() if p.requires_grad}
        if isinstance(params, nn.Module)
        else dict(params)
    )
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out: dict[str, Tensor] = {}
    fallback: list[str] = []
    with torch.no_grad():
        for k, p in named.items():
            group = group_of.get(id(p))
            if group is None:
                raise ValueError(
                    f"the weight {k!r} is not trained by the inner optimizer (it is in none of "
                    "its param_groups): build the optimizer over the weights being "
                    "differentiated (those that require grad)"
                )
            lr, eps = _number(group["lr"]), _number(group["eps"])
            beta2 = _number(group["betas"][1])
            st = opt.state.get(p, {})
            sq = st.get("max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq")
            step = _number(st["step"]) if "step" in st else 0.0
            if sq is None or step <= 0:  # before the optimizer's first step: the plain identity times lr
                out[k] = torch.full_like(p, 1.0 / lr if lr > 0 else math.inf)
                fallback.append(k)
                continue
            # torch's own denominator, in its order of operations (single-tensor Adam)
            denom = sq.sqrt() / (1 - beta2**step) ** 0.5 + eps
            out[k] = denom / lr if lr > 0 else torch.full_like(denom, math.inf)
    return out, fallback


def adam_diagonal(optimizer: object, params: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``D = (sqrt(v̂) + eps)/lr`` of a ``torch.optim.Adam`` or ``AdamW``, now, keyed like the weights.

    For ``hg.Identity(precondition=D)``: ``p = v/D = lr·v/(sqrt(v̂) + eps)``, the optimizer's own step
    applied to ``v`` (see the module docstring).

    Args:
        optimizer: the ``torch.optim.Adam``/``AdamW`` that trains the weights (or a wrapper with an
            ``.optimizer`` attribute, such as Accelerate's, as in a ``transformers.Trainer``).
        params: the model (its ``named_parameters()`` that require grad: the weights of
            :class:`~hypergradients.HyperOptimizer` and :func:`~hypergradients.make_losses`), or a dict
            from a name to the very tensor the optimizer holds.

    Each weight's own group gives ``lr`` (the current value: a learning-rate scheduler's),
    ``eps`` and ``β₂``; ``amsgrad`` uses ``max_exp_avg_sq``. A weight without state (before the
    optimizer's first step, or one that has had no gradient yet) gets ``D = 1/lr``: ``p = lr·v``, the
    plain identity times the learning rate. A learning
    rate of 0 gives ``D = inf`` (``p = 0``). A weight that the optimizer does not hold is refused
    (``ValueError``), as is another kind of optimizer (``TypeError``).
    """
    return optimizer_diagonal(optimizer, params)[0]
