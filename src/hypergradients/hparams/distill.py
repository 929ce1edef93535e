"""Distilled data as a hyperparameter family (dataset distillation, Wang et al. 2018; Lorraine et
al. 2020, §5.2): a few learnable examples per class are the whole training set.

The hyperparameters are ``k`` examples per class, ``X̃ ∈ R^{kC × shape}`` (key ``"<name>.x"``),
optionally learnable soft labels ``Ỹ = softmax(Z)`` row by row (key ``"<name>.labels"``, the logits
``Z ∈ R^{kC × C}``: unconstrained, and every row stays a distribution), and optionally a learnable
inner step size ``α`` (key ``"<name>.lr"``). The inner problem sees only the distilled examples:

    L_T(w, λ) = 1/(kC) Σ_j ℓ(f_w(x̃_j), ỹ_j)        (+ the penalties of other families),

where ``ℓ`` is the cross-entropy with the hard label ``ỹ_j = j // k`` or with the soft target
``−Σ_c Ỹ_jc log softmax(f_w(x̃_j))_c``. The validation loss ``L_V(w)`` is the plain loss on real
data, so the hypergradient reaches ``X̃`` and ``Z`` only through ``∂²L_T/∂λ∂wᵀ``.

**The inner step size.** ``α`` changes the optimization *path*, not the minimiser ``w*(λ)``, so the
implicit methods cannot see it (they refuse it with :class:`~hypergradients.PathOnlyHyperparameterError`).
Differentiate through the path instead: ``hg.Unrolled(steps=K, lr="<name>.lr")`` (or
``hg.Forward``) runs ``w ← w − α ∂L_T/∂w`` with ``α`` read from that key and returns ``dL_V/dα``
with the other hypergradients. Because the path methods read the key as the step size itself, it
is stored as the natural value ``α > 0`` (not its log, unlike the other positive hyperparameters):
keep it positive with :meth:`DistilledData.project` after each hyper step.

Note: with hard labels and no penalty a linear model separates ``kC`` points, so ``w*`` runs off
to infinity; give the inner problem a minimiser (compose with :class:`~hypergradients.WeightDecay`)
before using an implicit method.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.tree import Tree
from .base import Batch, Family, unnatural_leaves


class DistilledData(Family):
    """``k`` learnable examples per class (optionally soft labels and the inner step size).

    Args:
        shape: the shape of one example (``(C, H, W)`` for images, ``(d,)`` for vectors).
        classes: the number of classes ``C``.
        per_class: ``k``, examples per class (class of example ``j``: ``j // k``).
        init: ``(kC, *shape)`` starting examples (e.g. ``k`` real examples of each class, in class
            order); default ``N(0, init_std²)`` noise from ``seed``.
        soft_labels: learn the labels too (logits initialised to ``label_init · onehot``).
        label_init: the initial logit of the true class (0 elsewhere): softmax gives the true
            class ``e^a/(e^a + C − 1)``.
        lr: a learnable inner step size ``α`` (the initial value) for path methods, or ``None``.
        dtype, device: of the tensors (default: ``init``'s, else float32 on the CPU).
        name: key prefix.
    """

    def __init__(
        self,
        shape: Sequence[int],
        classes: int,
        *,
        per_class: int = 1,
        init: Tensor | None = None,
        init_std: float = 1.0,
        seed: int = 0,
        soft_labels: bool = False,
        label_init: float = 3.0,
        lr: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str = "distill",
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an int >= 2, got {classes!r}")
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class (examples per class) must be an int >= 1, got {per_class!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(
                f"lr (the initial inner step size) must be a finite number > 0 or None, got {lr!r}"
            )
        n = classes * per_class
        if init is not None:
            if tuple(init.shape) != (n, *shape):
                raise ValueError(
                    f"init has shape {tuple(init.shape)}; expected (classes·per_class, *shape) "
                    f"= {(n, *shape)}, examples in class order (k of class 0, then k of "
                    "class 1, ...)"
                )
            dtype = dtype or init.dtype
            device = device or init.device
            x0 = init.detach().to(dtype=dtype, device=device).clone()
        else:
            dtype = dtype or torch.float32
            g = torch.Generator().manual_seed(seed)
            x0 = (init_std * torch.randn((n, *shape), generator=g, dtype=torch.float64)).to(
                dtype=dtype, device=device
            )
        self.name = name
        self.shape = shape
        self.classes = classes
        self.per_class = per_class
        self.soft_labels = soft_labels
        self.targets = torch.arange(classes, device=x0.device).repeat_interleave(per_class)
        self._t: dict[str, Tensor] = {f"{name}.x": x0.requires_grad_(True)}
        if soft_labels:
            z = float(label_init) * F.one_hot(self.targets, classes).to(dtype)
            self._t[f"{name}.labels"] = z.requires_grad_(True)
        if lr is not None:
            self._t[f"{name}.lr"] = torch.tensor(float(lr), dtype=dtype, device=x0.device, requires_grad=True)

    #: how the stored values map to the natural ones (read by ``Family.describe``).
    parametrisation = (
        "the examples themselves; labels as logits Z, natural softmax(Z); the step size as "
        "itself (read by hg.Unrolled(lr=key))"
    )

    def __repr__(self) -> str:
        return (
            f"DistilledData(name={self.name!r}, shape={self.shape}, classes={self.classes}, "
            f"per_class={self.per_class}, soft_labels={self.soft_labels}, "
            f"{self.count()} hyperparameters)"
        )

    @property
    def lr_key(self) -> str:
        """The key of the step size, for ``hg.Unrolled(lr=family.lr_key)`` (``KeyError`` if not learnt)."""
        key = f"{self.name}.lr"
        if key not in self._t:
            raise KeyError(f"DistilledData {self.name!r} learns no step size: pass lr=<initial step size>")
        return key

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The examples, the label distributions ``softmax(Z)`` and the step size (detached)."""
        src = self._t if hparams is None else hparams
        out = {f"{self.name}.x": src[f"{self.name}.x"].detach()}
        if self.soft_labels:
            out[f"{self.name}.labels"] = src[f"{self.name}.labels"].detach().softmax(-1)
        if f"{self.name}.lr" in self._t:
            out[f"{self.name}.lr"] = src[f"{self.name}.lr"].detach()
        return out

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The examples and the step size as given (stored as they are; keep the step size positive
        with :meth:`project`), the label logits ``Z = log p`` of label distributions ``p`` (rows of
        positive numbers summing to 1, to 1e-4: ``softmax(log p) = p``)."""
        out: dict[str, Tensor] = {}
        for k, v in values.items():
            one = {k: v}
            if k == f"{self.name}.labels":
                p = torch.as_tensor(v).detach().double()
                if (
                    p.ndim == 2
                    and bool(torch.isfinite(p).all())
                    and bool((p > 0).all())
                    and float((p.sum(-1) - 1).abs().max()) > 1e-4
                ):
                    sums = p.sum(-1)
                    raise ValueError(
                        f"DistilledData {self.name!r}: the rows of {k!r} are label "
                        f"distributions and must sum to 1; they sum to {sums.min().item():g} .. "
                        f"{sums.max().item():g}"
                    )
                out.update(
                    unnatural_leaves(
                        self, one, torch.log, valid=lambda a: a > 0, domain="> 0 (a label probability)"
                    )
                )
            else:  # the examples and the step size are stored as they are
                out.update(unnatural_leaves(self, one, lambda a: a))
        return out

    def summary(self) -> dict[str, float]:
        nat = self.natural()
        out = {f"{self.name}.x_norm": float(nat[f"{self.name}.x"].double().norm())}
        if self.soft_labels:
            p = nat[f"{self.name}.labels"].double()
            true = p.gather(1, self.targets[:, None].to(p.device))
            out[f"{self.name}.true_label_prob"] = float(true.mean())
        if f"{self.name}.lr" in nat:
            out[f"{self.name}.lr"] = float(nat[f"{self.name}.lr"])
        return out

    def labels(self, hparams: Mapping[str, Tensor]) -> Tensor:
        """The training targets: class indices ``j // k``, or the distributions ``softmax(Z)``."""
        if self.soft_labels:
            return hparams[f"{self.name}.labels"].softmax(-1)
        return self.targets.to(hparams[f"{self.name}.x"].device)

    def batch(self, batch: Batch, hparams: Mapping[str, Tensor]) -> Batch:
        """The distilled set, whatever real batch came in (the inner problem sees only it).

        Soft labels go in ``y`` as probabilities: ``F.cross_entropy`` (the default losses) reads a
        float target of shape ``(B, C)`` as class probabilities.
        """
        x = hparams[f"{self.name}.x"]
        return Batch(x, self.labels(hparams), torch.arange(x.shape[0], device=x.device))

    def project(self, hparams: Mapping[str, Tensor], *, min_lr: float = 1e-6) -> None:
        """Keep the step size ``α ≥ min_lr`` (in place; pass as ``project=`` to fit / HyperOptimizer)."""
        key = f"{self.name}.lr"
        if key in hparams:
            with torch.no_grad():
                hparams[key].clamp_(min=min_lr)


def save_distilled_figure(
    family: DistilledData,
    path: str | os.PathLike[str],
    *,
    image_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """A PNG of the learned examples: one column per class, ``k`` rows (matplotlib, imported here only).

    ``image_shape``: ``(H, W)`` or ``(C, H, W)`` to view each example as (default: the family's
    shape, which must then be an image); each image is scaled to its own min..max. With soft labels
    each panel's title is the largest label probability.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nat = family.natural()
    x = nat[f"{family.name}.x"].double().cpu()
    shape = tuple(image_shape) if image_shape is not None else family.shape
    if math.prod(shape) != math.prod(family.shape) or len(shape) not in (2, 3):
        raise ValueError(
            f"image_shape {shape} cannot show examples of shape {family.shape}: give (H, W) or "
            "(C, H, W) with the same number of values"
        )
    k, c = family.per_class, family.classes
    fig, axes = plt.subplots(k, c, figsize=(1.1 * c, 1.2 * k + 0.4), squeeze=False)
    probs = nat.get(f"{family.name}.labels")
    for j in range(k * c):
        ax = axes[j % k][j // k]
        img = x[j].reshape(shape)
        if img.ndim == 3:  # (C, H, W) -> (H, W, C), or the single channel
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else img * 0
        ax.imshow(img.numpy(), cmap="gray" if img.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if j % k == 0:
            ax.set_title(class_names[j // k] if class_names else str(j // k), fontsize=8)
        if probs is not None:
            p = probs[j].double()
            ax.set_xlabel(f"{int(p.argmax())}: {float(p.max()):.2f}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
