"""A learned data-augmentation network as a hyperparameter family (Lorraine et al. 2020, §5.3).

The hyperparameters ``λ`` are the weights of a small U-Net ``u_λ`` that maps an image batch and a
noise channel to an augmented batch of the same shape, by one of two *identity residuals*:

    x̃ = a_λ(x, ε) = x + u_λ(concat(x, ε))          residual="linear" (the default)
    x̃ = a_λ(x, ε) = x + tanh(u_λ(concat(x, ε)))    residual="tanh" (the authors' code)

with ``ε ~ N(0, 1)`` either drawn per pixel (``noise_shape="pixel"``, the default: shape
``(B, 1, H, W)``) or one number per image broadcast over its pixels (``noise_shape="image"``, the
authors' code: ``(B, 1, 1, 1)`` expanded). With ``u_λ = 0`` either is the identity. The classifier
trains on ``x̃`` (or on the original and the augmented batch together, ``with_original=True``):

    L_T(w, λ) = mean_i ℓ(f_w(a_λ(x_i, ε_i)), y_i)   [+ mean_i ℓ(f_w(x_i), y_i), halved together]

and the validation loss ``L_V(w)`` sees clean data only, so ``λ`` enters the hypergradient only
through the mixed partial ``∂²L_T/∂λ∂wᵀ``, which the core computes by one VJP through the U-Net.

The noise ``ε`` must be the same in every evaluation of ``L_T`` inside one hypergradient (the
Hessian-vector products are derivatives of *one* function): the family is ``stochastic`` and draws
``ε`` from the sampler of :mod:`hypergradients.hparams.base` (one fixed
:class:`~hypergradients.hparams.Noise` per hypergradient, a fresh one per inner step), so the
hypergradient is that of ``L_T(·, ·; ε)`` for the fixed ``ε``.

Architecture (the layers of the U-Net in the paper's code, ``models/unet.py``, after J. van Vugt's
``pytorch-unet``, with ``padding=True, batch_norm=False, up_mode="upconv"``): ``depth`` levels;
level ``i`` has ``2^(wf+i)`` filters, two 3×3 convolutions with padding 1 and ReLU, a 2×2 max-pool
between levels; the way up is a 2×2 stride-2 transposed convolution, the skip connection
concatenated, two 3×3 convolutions; a final 1×1 convolution back to ``C`` channels. The paper's
network (``depth=2``, ``wf=3`` — "3" is the exponent: 8 and 16 filters — on 3-channel CIFAR-10
images plus the noise channel) has 6,659 weights; :func:`unet_count` reproduces that number
exactly (``unet_count(3) == 6659``). Image sides must be divisible by ``2^(depth−1)``.

Two configurations of the same layers:

* the default, ``AugmentNet(C)``: linear residual, per-pixel noise, the last 1×1 convolution
  zero (``identity_init=True``), so training starts exactly at ``x̃ = x``;
* the authors' network, :meth:`AugmentNet.paper` (``AugmentNet(C, residual="tanh",
  noise_shape="image", identity_init=False)``): ``x + tanh(u)``, one noise number per image and
  PyTorch's default initialisation of every layer, the last included, so it starts away from
  the identity (the last layer's bias alone, up to ``2^(−wf/2)`` in size, shifts every pixel of a
  channel alike; the tanh bounds every pixel's change by 1).

At the identity start only the last 1×1 convolution has a nonzero hypergradient: every other
weight reaches ``x̃`` through it, and it is zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.tree import Tree
from .base import Batch, Description, Family, Noise, Sampler, natural_leaves, unnatural_leaves


def _shapes(channels: int, depth: int, wf: int, noise: bool) -> dict[str, tuple[int, ...]]:
    """Every weight of the U-Net, in a fixed order: name -> shape."""
    if depth < 1 or wf < 0 or channels < 1:
        raise ValueError(
            f"U-Net needs depth >= 1, wf >= 0 and channels >= 1; got depth={depth}, wf={wf}, "
            f"channels={channels}"
        )
    out: dict[str, tuple[int, ...]] = {}
    prev = channels + (1 if noise else 0)
    for i in range(depth):
        f = 2 ** (wf + i)
        out[f"down{i}.conv1.weight"], out[f"down{i}.conv1.bias"] = (f, prev, 3, 3), (f,)
        out[f"down{i}.conv2.weight"], out[f"down{i}.conv2.bias"] = (f, f, 3, 3), (f,)
        prev = f
    for i in reversed(range(depth - 1)):
        f = 2 ** (wf + i)
        # ConvTranspose2d's weight is (in, out, kH, kW).
        out[f"up{i}.upconv.weight"], out[f"up{i}.upconv.bias"] = (prev, f, 2, 2), (f,)
        out[f"up{i}.conv1.weight"], out[f"up{i}.conv1.bias"] = (f, 2 * f, 3, 3), (f,)
        out[f"up{i}.conv2.weight"], out[f"up{i}.conv2.bias"] = (f, f, 3, 3), (f,)
        prev = f
    out["last.weight"], out["last.bias"] = (channels, prev, 1, 1), (channels,)
    return out


def unet_count(channels: int, *, depth: int = 2, wf: int = 3, noise: bool = True) -> int:
    """The number of weights of the U-Net on ``channels``-channel images (6,659 for the paper's 3)."""
    return sum(math.prod(s) for s in _shapes(channels, depth, wf, noise).values())


Residual = Literal["linear", "tanh"]
NoiseShape = Literal["pixel", "image"]


def unet(
    weights: Mapping[str, Tensor],
    x: Tensor,
    noise: Tensor | None,
    *,
    depth: int,
    residual: Residual = "linear",
) -> Tensor:
    """``x + u(concat(x, noise))`` (``residual="linear"``) or ``x + tanh(u(concat(x, noise)))``
    (``"tanh"``): the U-Net with identity residual, called functionally.

    ``weights`` are keyed as :func:`_shapes` names them (without the family's prefix); ``x`` is
    ``(B, C, H, W)``, ``noise`` ``(B, 1, H, W)`` or ``None`` for a network built without it.
    """
    h = x if noise is None else torch.cat([x, noise], dim=1)
    skips: list[Tensor] = []
    for i in range(depth):
        h = F.relu(F.conv2d(h, weights[f"down{i}.conv1.weight"], weights[f"down{i}.conv1.bias"], padding=1))
        h = F.relu(F.conv2d(h, weights[f"down{i}.conv2.weight"], weights[f"down{i}.conv2.bias"], padding=1))
        if i < depth - 1:
            skips.append(h)
            h = F.max_pool2d(h, 2)
    for i in reversed(range(depth - 1)):
        h = F.conv_transpose2d(h, weights[f"up{i}.upconv.weight"], weights[f"up{i}.upconv.bias"], stride=2)
        h = torch.cat([h, skips[i]], dim=1)
        h = F.relu(F.conv2d(h, weights[f"up{i}.conv1.weight"], weights[f"up{i}.conv1.bias"], padding=1))
        h = F.relu(F.conv2d(h, weights[f"up{i}.conv2.weight"], weights[f"up{i}.conv2.bias"], padding=1))
    u = F.conv2d(h, weights["last.weight"], weights["last.bias"])
    return x + (torch.tanh(u) if residual == "tanh" else u)


class AugmentNet(Family):
    """A learned augmentation network ``x̃ = x + u_λ(x, ε)`` (or ``x + tanh(u_λ(x, ε))``) whose weights
    are the hyperparameters.

    The defaults are this library's variant: linear residual, per-pixel noise, started exactly at
    the identity. The authors' network is :meth:`paper` (module docstring: how the two differ).

    Args:
        channels: image channels ``C`` (inputs are ``(B, C, H, W)``; flat inputs are refused).
        depth, wf: the U-Net's levels and the exponent of its first level's filter count
            (``2^wf``); the paper's network is ``depth=2, wf=3``.
        noise: feed the noise channel ``ε`` (default) or not.
        noise_shape: ``"pixel"`` (default): ``ε`` drawn per pixel; ``"image"``: one ``N(0, 1)``
            number per image, the same at every pixel (the authors' code).
        residual: ``"linear"`` (default): ``x + u``; ``"tanh"``: ``x + tanh(u)``, each pixel moved
            by less than 1 (the authors' code).
        with_original: train on the original and the augmented batch together (the batch doubles,
            each half weighted equally by the mean) instead of the augmented batch alone.
        identity_init: start from the identity augmentation (the last 1×1 convolution zero), so
            that training begins as without the family; else PyTorch's default initialisation of
            every layer, the last included (``kaiming_uniform(a=√5)``: ``U(−1/√fan_in, 1/√fan_in)``
            for weights and biases, the fan-in as PyTorch computes it).
        seed: seeds the initial weights (the noise comes from the hyper step's fixed noise).
        dtype, device: of the weights.
        name: key prefix (keys ``"<name>.down0.conv1.weight"``, ...).
    """

    def __init__(
        self,
        channels: int,
        *,
        depth: int = 2,
        wf: int = 3,
        noise: bool = True,
        noise_shape: NoiseShape = "pixel",
        residual: Residual = "linear",
        with_original: bool = False,
        identity_init: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "augment",
    ) -> None:
        if noise_shape not in ("pixel", "image"):
            raise ValueError(f"AugmentNet noise_shape must be 'pixel' or 'image', got {noise_shape!r}")
        if residual not in ("linear", "tanh"):
            raise ValueError(f"AugmentNet residual must be 'linear' or 'tanh', got {residual!r}")
        shapes = _shapes(channels, depth, wf, noise)
        g = torch.Generator().manual_seed(seed)
        self._t: dict[str, Tensor] = {}
        for k, s in shapes.items():
            # PyTorch's default for Conv2d and ConvTranspose2d: kaiming_uniform(a=√5), i.e.
            # U(−1/√fan_in, 1/√fan_in), the bias with its weight's fan-in; PyTorch takes the fan-in
            # from the weight's dim 1 times the kernel for both, which for the transposed
            # convolution's (in, out, kH, kW) weight is its *output* channels.
            ws = s if k.endswith(".weight") else shapes[k[: -len(".bias")] + ".weight"]
            fan_in = ws[1] * ws[2] * ws[3]
            bound = 1.0 / math.sqrt(fan_in)
            t = (torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1) * bound
            if identity_init and k.startswith("last."):
                t = torch.zeros(s, dtype=torch.float64)
            self._t[f"{name}.{k}"] = t.to(dtype=dtype, device=device).requires_grad_(True)
        self.name = name
        self.channels = channels
        self.depth = depth
        self.wf = wf
        self.use_noise = noise
        self.noise_shape: NoiseShape = noise_shape
        self.residual: Residual = residual
        self.identity_init = identity_init
        self.with_original = with_original
        self.seed = seed

    @classmethod
    def paper(
        cls,
        channels: int,
        *,
        with_original: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "augment",
    ) -> AugmentNet:
        """The authors' network (``models/unet.py`` as ``train_augment_net2.py`` builds it):
        ``depth=2, wf=3``, the noise channel with one number per image, ``x + tanh(u)``, PyTorch's
        default initialisation of every layer (6,659 weights on RGB images, 6,497 on grey ones)."""
        return cls(
            channels,
            depth=2,
            wf=3,
            noise=True,
            noise_shape="image",
            residual="tanh",
            identity_init=False,
            with_original=with_original,
            seed=seed,
            dtype=dtype,
            device=device,
            name=name,
        )

    stochastic = True
    parametrisation = "the U-Net's weights themselves (unconstrained)"

    def __repr__(self) -> str:
        return (
            f"AugmentNet(name={self.name!r}, channels={self.channels}, depth={self.depth}, "
            f"wf={self.wf}, noise={self.use_noise}, noise_shape={self.noise_shape!r}, "
            f"residual={self.residual!r}, identity_init={self.identity_init}, "
            f"with_original={self.with_original}, {self.count()} hyperparameters)"
        )

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The network's weights themselves (unconstrained: nothing to map), detached."""
        return natural_leaves(self._t, hparams)

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The network's weights as given (natural = stored)."""
        return unnatural_leaves(self, values, lambda t: t)

    def summary(self) -> dict[str, float]:
        last = self._t[f"{self.name}.last.weight"].detach().double()
        return {f"{self.name}.last_norm": float(last.norm())}

    def net_weights(self, hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The U-Net's weights from ``hparams``, without the key prefix."""
        n = len(self.name) + 1
        return {k[n:]: hparams[k] for k in self._t}

    def draw(self, x: Tensor, sampler: Sampler | None = None) -> Tensor | None:
        """The noise channel for images ``x``: ``(B, 1, H, W)`` standard normal draws per pixel, or one
        per image expanded over its pixels (``noise_shape``), from ``sampler`` (``None``: a fresh
        draw from torch's generator); ``None`` without the noise channel."""
        if not self.use_noise or x.ndim != 4:
            return None
        sampler = sampler if sampler is not None else Noise.draw().sampler()
        b, _, h, w = x.shape
        if self.noise_shape == "image":
            return sampler.normal((b, 1, 1, 1), dtype=x.dtype, device=x.device).expand(b, 1, h, w)
        return sampler.normal((b, 1, h, w), dtype=x.dtype, device=x.device)

    def augment(self, x: Tensor, hparams: Mapping[str, Tensor], noise: Tensor | None) -> Tensor:
        """``x + u_λ(x, ε)`` (or ``x + tanh(u_λ(x, ε))``) for images ``x`` of shape ``(B, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"AugmentNet {self.name!r} augments images of shape (B, {self.channels}, H, "
                f"W); got {tuple(x.shape)}: reshape flat inputs to images (and flatten in "
                "the model)"
            )
        side = 2 ** (self.depth - 1)
        if x.shape[2] % side or x.shape[3] % side:
            raise ValueError(
                f"AugmentNet {self.name!r} with depth={self.depth} needs image sides "
                f"divisible by {side}; got {tuple(x.shape[2:])}: pad the images or lower depth"
            )
        return unet(
            self.net_weights(hparams),
            x,
            noise if self.use_noise else None,
            depth=self.depth,
            residual=self.residual,
        )

    def batch(self, batch: Batch, hparams: Mapping[str, Tensor], *, noise: Sampler | None = None) -> Batch:
        """The augmented batch ``a_λ(x, ε)`` (after the original one if ``with_original``), ``ε`` drawn
        from ``noise`` (the evaluation's sampler; ``None``: a fresh draw from torch's generator)."""
        x = batch.x
        sampler = noise if noise is not None else Noise.draw().sampler()
        xa = self.augment(x, hparams, self.draw(x, sampler))
        if not self.with_original:
            return Batch(xa, batch.y, batch.index)
        return Batch(torch.cat([x, xa]), torch.cat([batch.y, batch.y]), torch.cat([batch.index, batch.index]))

    def describe(self) -> Description:
        """The count by U-Net stage (down levels, up levels, the last 1×1 convolution)."""
        groups: dict[str, int] = {}
        for k, t in self._t.items():
            stage = k[len(self.name) + 1 :].split(".")[0]
            groups[stage] = groups.get(stage, 0) + t.numel()
        return Description(self.name, type(self).__name__, self.count(), self.parametrisation, groups)
