"""Weight decay (L2) as a hyperparameter family, global, per layer or per weight.

The penalty added to the training loss is

    Ω(w, λ) = ½ Σ_i d_i w_i²,        d_i = exp(λ_i) > 0,

the convention of ``torch.optim.SGD(weight_decay=d)`` (its gradient is ``d_i w_i``). The family
stores ``λ = log d`` (unconstrained, so any gradient step keeps ``d`` positive, and equal *relative*
changes of ``d`` are equal steps in ``λ``) and reports ``d``. Granularity:

* ``"global"`` — one ``λ`` for all covered weights (key ``"<name>"``, shape ``()``);
* ``"layer"``  — one ``λ`` per parameter tensor (key ``"<name>.<param>"``, shape ``()``);
* ``"weight"`` — one ``λ`` per scalar weight (key ``"<name>.<param>"``, the parameter's shape):
  as many hyperparameters as weights, the paper's §5.1 setting (Lorraine et al. 2020).

The hypergradient of each needs only ``∂²Ω/∂w∂λ``, which the core computes by one VJP: for the
per-weight family that mixed partial is diagonal, ``∂²Ω/∂w_i∂λ_i = d_i w_i``.

Frozen parameters (an ``nn.Parameter`` with ``requires_grad=False`` when the family is built, as
in fine-tuning) are never covered: they are constants of ``L_T``, not weights the hypergradient
differentiates, and a decay on them would change neither the training nor the hypergradient.
A parameter frozen *after* the family was built is refused by name when the hypergradient's
``L_T`` (which sees only the trainable weights) needs it: build the family after freezing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.tree import Tree
from .base import Description, Family, natural_leaves, unnatural_leaves

Granularity = Literal["global", "layer", "weight"]
GRANULARITIES: tuple[str, ...] = ("global", "layer", "weight")


def weights_only(name: str, p: Tensor) -> bool:
    """Default selection: matrices and kernels (``ndim ≥ 2``), not biases or normalisation scales."""
    return p.ndim >= 2


class WeightDecay(Family):
    """Weight decay ``½ Σ_i exp(λ_i) w_i²`` with ``λ`` global, per layer or per weight.

    Args:
        params: the weights (a module, or ``dict(module.named_parameters())``): only names,
            shapes, dtypes and devices are read.
        granularity: ``"global"``, ``"layer"`` or ``"weight"``.
        init: the initial decay ``d > 0`` (natural value; stored as ``log d``).
        include: ``include(name, tensor) -> bool`` picks the covered parameters (default:
            :func:`weights_only`; pass ``lambda n, p: True`` to cover biases too). Frozen
            parameters (``nn.Parameter`` with ``requires_grad=False``) are left out whatever it says.
        name: key prefix of this family's hyperparameters.
    """

    parametrisation = "decay d = exp(λ) > 0 (λ stored, d reported)"

    def __init__(
        self,
        params: nn.Module | Mapping[str, Tensor],
        *,
        granularity: Granularity = "global",
        init: float = 1e-4,
        include: Callable[[str, Tensor], bool] | None = None,
        name: str = "weight_decay",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
        if (
            isinstance(init, bool)
            or not isinstance(init, (int, float))
            or not (init > 0 and math.isfinite(init))
        ):
            raise ValueError(f"init (the initial decay) must be a finite number > 0, got {init!r}")
        named = dict(params.named_parameters()) if isinstance(params, nn.Module) else dict(params)
        pick = include or weights_only
        # A frozen parameter is a constant of L_T (module_params' detached copies are plain tensors,
        # not Parameters, and stay covered).
        frozen = {k for k, p in named.items() if isinstance(p, nn.Parameter) and not p.requires_grad}
        self.covered = [k for k, p in named.items() if k not in frozen and pick(k, p)]
        if not self.covered:
            why = f" (frozen, left out: {sorted(frozen)})" if frozen else ""
            raise ValueError(
                f"WeightDecay {name!r} covers no parameter of {sorted(named)}{why}: check "
                "`include`, or unfreeze the weights to decay"
            )
        self.name = name
        self.granularity = granularity
        self.init = float(init)
        ref = named[self.covered[0]]
        log_d = math.log(init)
        self._t: dict[str, Tensor] = {}
        if granularity == "global":
            self._t[name] = torch.full((), log_d, dtype=ref.dtype, device=ref.device, requires_grad=True)
        else:
            for k in self.covered:
                p = named[k]
                shape = () if granularity == "layer" else tuple(p.shape)
                self._t[f"{name}.{k}"] = torch.full(
                    shape, log_d, dtype=p.dtype, device=p.device, requires_grad=True
                )

    def __repr__(self) -> str:
        return (
            f"WeightDecay(name={self.name!r}, granularity={self.granularity!r}, init={self.init:g}, "
            f"covers={len(self.covered)} tensors, {self.count()} hyperparameters)"
        )

    def describe(self) -> Description:
        """The count per covered parameter tensor (granularity ``weight``/``layer``) or in one group."""
        groups = (
            {"all covered weights": 1}
            if self.granularity == "global"
            else {k: self._t[self.key_for(k)].numel() for k in self.covered}
        )
        return Description(
            self.name, f"WeightDecay, {self.granularity}", self.count(), self.parametrisation, groups
        )

    def key_for(self, param: str) -> str:
        """The hyperparameter key that governs parameter ``param``."""
        return self.name if self.granularity == "global" else f"{self.name}.{param}"

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The decays ``d = exp(λ)`` (detached), keyed like :meth:`tensors`."""
        return natural_leaves(self._t, hparams, torch.exp)

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The log-decays ``λ = log d`` of the decays ``d > 0`` given, keyed like :meth:`tensors`."""
        return unnatural_leaves(self, values, torch.log, valid=lambda d: d > 0, domain="> 0 (a decay)")

    def penalty(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Tensor:
        """``½ Σ_i exp(λ_i) w_i²`` over the covered parameters."""
        missing = [k for k in self.covered if k not in params]
        if missing:
            raise ValueError(
                f"WeightDecay {self.name!r} decays {missing[0]!r}, which is not among the weights given "
                f"({len(params)} of them): a parameter frozen (requires_grad=False) after the family was "
                "built is not differentiated. Build the family after freezing (frozen parameters are left "
                f"out), or leave {missing[0]!r} out with include=..."
            )
        if self.granularity == "global":
            sq = params[self.covered[0]].pow(2).sum()
            for k in self.covered[1:]:
                sq = sq + params[k].pow(2).sum()
            return 0.5 * hparams[self.name].exp() * sq
        total: Tensor | None = None
        for k in self.covered:
            term = (hparams[f"{self.name}.{k}"].exp() * params[k].pow(2)).sum()
            total = term if total is None else total + term
        assert total is not None  # covered is non-empty (checked in __init__)
        return 0.5 * total
