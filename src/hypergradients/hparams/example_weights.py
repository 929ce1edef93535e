"""Per-example loss weights (data cleaning) and a loss-reweighting network (Meta-Weight-Net style).

Both families change how the per-example training losses ``ℓ_i(w)`` of a minibatch ``B`` become
``L_T`` (the ``reduce`` hook; at most one reducing family per setup), with a normalisation:

* ``normalise="mean"`` (default): ``L_T = (1/|B|) Σ_{i∈B} ω_i ℓ_i`` — the weights' scale matters
  (a weight is a per-example learning-rate factor; ``ω ≡ 1`` is plain training);
* ``normalise="weights"``: ``L_T = Σ_{i∈B} ω_i ℓ_i / Σ_{i∈B} ω_i`` — only relative weights
  matter (Ren et al. 2018, "Learning to Reweight Examples"); the hypergradient along a common
  scale of all weights of a batch is then zero.

:class:`ExampleWeights` keeps one weight per training example, looked up by ``batch.index``
(the dataset index every batch of ``fit`` and ``BatchStream`` carries): ``ω_i = 2σ(θ_i)`` ∈
(0, 2) (``parametrisation="sigmoid"``: bounded, ``θ = 0`` is ``ω = 1``) or
``ω_i = softplus(θ_i)`` > 0 (``"softplus"``: unbounded above). Its implicit hypergradient is the
influence of each example: with ``normalise="mean"``,
``dL_V/dθ_i = −(ω_i'/|B|) ∇_w ℓ_i(w)ᵀ H⁻¹ ∇_w L_V`` for the examples in the hyper step's batch
(zero for the others): an example whose gradient opposes the validation gradient (a flipped
label, say) gets a positive hypergradient and its weight goes down.

:class:`LossReweighting` maps each example's loss to its weight by a small MLP
``ω(ℓ) = 2σ(a₂ᵀ relu(a₁ ℓ + b₁) + b₂)`` whose weights are the hyperparameters (Shu et al. 2019,
Meta-Weight-Net); ``a₂ = 0, b₂ = 0`` at the start, so training starts plain (``ω ≡ 1``). Where
Meta-Weight-Net feeds the network a *detached* loss, here ``L_T(w, λ) = mean_i ω_λ(ℓ_i(w)) ℓ_i(w)``
is an ordinary function of ``w`` (not detached), so its minimiser is a stationary point of
``L_T`` and the implicit function theorem applies to it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.tree import Tree
from .base import Batch, Description, Family, natural_leaves, unnatural_leaves

Normalise = Literal["mean", "weights"]
Parametrisation = Literal["sigmoid", "softplus"]


def _check_normalise(normalise: str) -> None:
    if normalise not in ("mean", "weights"):
        raise ValueError(
            f"normalise must be 'mean' (Σ ω ℓ / |B|) or 'weights' (Σ ω ℓ / Σ ω), got {normalise!r}"
        )


def _weighted(losses: Tensor, omega: Tensor, normalise: str) -> Tensor:
    if normalise == "mean":
        return (omega * losses).sum() / losses.numel()
    return (omega * losses).sum() / omega.sum()


class ExampleWeights(Family):
    """One loss weight per training example, by ``batch.index`` (see the module docstring).

    Args:
        n: the number of training examples (indices ``0 … n−1``).
        init: the initial weight of every example (``0 < init < 2`` for ``"sigmoid"``).
        parametrisation: ``"sigmoid"`` (``ω = 2σ(θ)``) or ``"softplus"`` (``ω = softplus(θ)``).
        normalise: ``"mean"`` or ``"weights"`` (module docstring).
        name: the key of the ``(n,)`` tensor of logits.
    """

    def __init__(
        self,
        n: int,
        *,
        init: float = 1.0,
        parametrisation: Parametrisation = "sigmoid",
        normalise: Normalise = "mean",
        name: str = "example_weights",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of training examples) must be an integer >= 1, got {n!r}")
        if parametrisation not in ("sigmoid", "softplus"):
            raise ValueError(f"parametrisation must be 'sigmoid' or 'softplus', got {parametrisation!r}")
        _check_normalise(normalise)
        hi = 2.0 if parametrisation == "sigmoid" else math.inf
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < hi:
            raise ValueError(
                f"init (the initial example weight) must be in (0, {hi:g}) for the "
                f"{parametrisation} parametrisation, got {init!r}"
            )
        self.n, self.name, self.init = n, name, float(init)
        self.kind: Parametrisation = parametrisation
        self.normalise: Normalise = normalise
        form = "ω = 2σ(θ) ∈ (0, 2)" if parametrisation == "sigmoid" else "ω = softplus(θ) > 0"
        self.parametrisation = f"example weight {form} (θ stored); normalise={normalise}"
        theta0 = math.log(init / (2 - init)) if parametrisation == "sigmoid" else math.log(math.expm1(init))
        self._t = torch.full(
            (n,), theta0, dtype=dtype or torch.get_default_dtype(), device=device, requires_grad=True
        )

    def __repr__(self) -> str:
        return (
            f"ExampleWeights(n={self.n}, init={self.init:g}, parametrisation={self.kind!r}, "
            f"normalise={self.normalise!r}, name={self.name!r})"
        )

    def weight(self, theta: Tensor) -> Tensor:
        """``ω(θ)``: ``2σ(θ)`` or ``softplus(θ)``."""
        return 2 * torch.sigmoid(theta) if self.kind == "sigmoid" else F.softplus(theta)

    def tensors(self) -> dict[str, Tensor]:
        return {self.name: self._t}

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The example weights ``ω`` (detached), shape ``(n,)``."""
        src = self.tensors() if hparams is None else hparams
        return {self.name: self.weight(src[self.name].detach())}

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The ``θ`` of the example weights ``ω`` given: ``log(ω/(2 − ω))`` for ``ω`` in (0, 2)
        (``"sigmoid"``), ``log(exp(ω) − 1)`` for ``ω > 0`` (``"softplus"``)."""
        if self.kind == "sigmoid":
            return unnatural_leaves(
                self,
                values,
                lambda w: torch.log(w) - torch.log(2 - w),
                valid=lambda w: (w > 0) & (w < 2),
                domain="in (0, 2) (an example weight)",
            )
        # log(expm1(ω)) = ω + log(1 − e^−ω), which neither overflows nor loses a small ω
        return unnatural_leaves(
            self,
            values,
            lambda w: w + torch.log(-torch.expm1(-w)),
            valid=lambda w: w > 0,
            domain="> 0 (an example weight)",
        )

    def describe(self) -> Description:
        return Description(
            self.name, "ExampleWeights", self.count(), self.parametrisation, {"training examples": self.n}
        )

    def reduce(self, losses: Tensor, batch: Batch, hparams: Mapping[str, Tensor]) -> Tensor:
        """``Σ ω_i ℓ_i / |B|`` or ``/ Σ ω_i`` over the batch, ``ω_i`` of example ``batch.index[i]``."""
        theta = hparams[self.name]
        idx = batch.index.to(theta.device)
        if idx.numel() != losses.numel():
            raise ValueError(
                f"ExampleWeights {self.name!r}: the batch has {losses.numel()} losses but "
                f"{idx.numel()} indices; pass batches with their dataset indices (x, y, index)"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(
                f"ExampleWeights {self.name!r}: batch index {bad} is out of range for "
                f"{self.n} examples; build it with n = the size of the training set"
            )
        omega = self.weight(theta[idx]).to(losses.dtype)
        return _weighted(losses, omega, self.normalise)


class LossReweighting(Family):
    """Example weight ``ω(ℓ) = 2σ(a₂ᵀ relu(a₁ ℓ + b₁) + b₂)`` of each example's loss ``ℓ``, a
    one-hidden-layer MLP whose weights are the hyperparameters (module docstring).

    Args:
        hidden: the hidden width (``3·hidden + 1`` hyperparameters).
        normalise: ``"mean"`` or ``"weights"``.
        init_scale: the first layer's weights are ``init_scale·N(0, 1)`` (from ``seed``), its biases
            zero; the output layer starts at zero (``ω ≡ 1``).
        name: key prefix: ``"<name>.a1"``, ``"<name>.b1"``, ``"<name>.a2"``, ``"<name>.b2"``.
    """

    parametrisation = "MLP weights (unconstrained, natural = stored); ω(ℓ) = 2σ(MLP(ℓ)) ∈ (0, 2)"

    def __init__(
        self,
        hidden: int = 16,
        *,
        normalise: Normalise = "mean",
        init_scale: float = 1.0,
        seed: int = 0,
        name: str = "loss_reweighting",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden (the MLP's width) must be an integer >= 1, got {hidden!r}")
        _check_normalise(normalise)
        self.name, self.hidden = name, hidden
        self.normalise: Normalise = normalise
        dt = dtype or torch.get_default_dtype()
        g = torch.Generator().manual_seed(seed)
        a1 = init_scale * torch.randn(hidden, generator=g, dtype=dt)
        self._t = {
            f"{name}.a1": a1.to(device),
            f"{name}.b1": torch.zeros(hidden, dtype=dt, device=device),
            f"{name}.a2": torch.zeros(hidden, dtype=dt, device=device),
            f"{name}.b2": torch.zeros((), dtype=dt, device=device),
        }
        for t in self._t.values():
            t.requires_grad_(True)

    def __repr__(self) -> str:
        return f"LossReweighting(hidden={self.hidden}, normalise={self.normalise!r}, name={self.name!r})"

    def weight(self, losses: Tensor, hparams: Mapping[str, Tensor]) -> Tensor:
        """``ω(ℓ)`` for a tensor of losses."""
        n = self.name
        h = torch.relu(losses[..., None] * hparams[f"{n}.a1"] + hparams[f"{n}.b1"])
        return 2 * torch.sigmoid(h @ hparams[f"{n}.a2"] + hparams[f"{n}.b2"])

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        return natural_leaves(self._t, hparams)

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The network's weights as given (natural = stored)."""
        return unnatural_leaves(self, values, lambda t: t)

    def summary(self) -> dict[str, float]:
        """The weight the network gives to losses 0.1, 1 and 3 (the network's weights mean little)."""
        with torch.no_grad():
            ls = torch.tensor([0.1, 1.0, 3.0], dtype=self._t[f"{self.name}.a1"].dtype)
            w = self.weight(ls, self._t)
        return {
            f"{self.name}.w(0.1)": float(w[0]),
            f"{self.name}.w(1)": float(w[1]),
            f"{self.name}.w(3)": float(w[2]),
        }

    def describe(self) -> Description:
        h = self.hidden
        return Description(
            self.name,
            f"LossReweighting, 1-{h}-1 MLP",
            self.count(),
            self.parametrisation,
            {"a1": h, "b1": h, "a2": h, "b2": 1},
        )

    def reduce(self, losses: Tensor, batch: Batch, hparams: Mapping[str, Tensor]) -> Tensor:
        """``Σ ω(ℓ_i) ℓ_i / |B|`` or ``/ Σ ω(ℓ_i)``."""
        return _weighted(losses, self.weight(losses, hparams).to(losses.dtype), self.normalise)
