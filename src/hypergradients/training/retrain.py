"""Train a fresh model with tuned hyperparameters held fixed: the test of what tuning found.

A run of :func:`~hypergradients.fit` changes its hyperparameters while the weights train, and its
tuned values are fitted to the validation set. :func:`retrain` trains a *new* model from scratch
with the final values fixed throughout, either on the training set (``on="train"``: the tuned run's
data, so the difference to the tuned run is the hyperparameters' trajectory) or on training and
validation data together (``on="train+val"``: the paper's protocol, Lorraine et al. 2020 §5.1,
for telling what tuning found from what it fitted to the validation set: with the validation set
now training data, only hyperparameters that generalise still help on the test set).

"The same way" as the tuned run: the same initial weights (``model_factory`` seeded the same),
the same inner optimizer, batch size and batch order (``seed``: :func:`fit`'s training stream is
the same stream) and as many inner steps as the tuned run took (``rounds · inner_steps +
warmup_steps``). The retrain then differs from the tuned run only in using the final values from
the first step on, where the tuned run moved from its initial values to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import tree
from ..hparams.base import Family, Noise, unconstrained
from ..hparams.example_weights import ExampleWeights
from ..hparams.objective import Objective, TargetLoss, collect_hparams, cross_entropy, on_targets
from .export import Values, natural_values
from .fit import _batch, _stream, evaluate
from .hyper import NonFiniteError
from .settings import INNER_OPTIMIZER, OptimizerFactory

On = Literal["train", "train+val"]
ON: tuple[str, ...] = ("train", "train+val")

__all__ = ["ON", "On", "RetrainResult", "retrain"]


@dataclass
class RetrainResult:
    """What :func:`retrain` returns: the trained ``model``, the data it trained on (``on``), the
    inner ``steps``, the fixed ``natural`` values by key, ``inner_loss`` (the mean training objective
    over the last ``min(steps, 100)`` steps), ``final`` (``<set>_loss`` and ``<set>_acc`` of each
    evaluation set, evaluation mode) and the wall time."""

    model: nn.Module
    on: str
    steps: int
    natural: dict[str, Tensor]
    inner_loss: float
    final: dict[str, float]
    wall_s: float


def retrain(
    model_factory: Callable[[], nn.Module],
    families: Sequence[Family] | Family | Callable[[nn.Module], Sequence[Family]],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None = None,
    *,
    values: Values | None = None,
    on: On = "train",
    steps: int,
    optimizer: OptimizerFactory | None = None,
    batch_size: int = 128,
    seed: int = 0,
    loss_fn: TargetLoss = cross_entropy,
    eval_sets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> RetrainResult:
    """Train ``model_factory()`` for ``steps`` inner steps with the families' hyperparameters fixed.

    Args:
        model_factory: makes the fresh model (seed torch inside it for the tuned run's initial weights).
        families: the families whose terms enter the training loss: a list (or one) built for a model
            of this architecture (their keys name parameters and submodules, so the tuned run's own
            families serve), or ``families(model)`` building them for the fresh model.
        train, val: ``(x, y)``; ``val`` is needed only for ``on="train+val"``.
        values: the natural values to fix (a dict keyed by hyperparameter key or family name, an
            :class:`~hypergradients.training.export.ExportedHparams` or the path of an exported file,
            which must hold every hyperparameter of the families); ``None``: the families' current
            values. The families' own tensors are read, never changed.
        on: ``"train"`` or ``"train+val"`` (validation examples appended to the training set; refused
            with :class:`~hypergradients.ExampleWeights`, which has no weight for them).
        steps: inner optimizer steps (the tuned run's ``rounds · inner_steps + warmup_steps`` to
            train the same way).
        optimizer: ``factory(list_of_weights)``, default Adam 1e-3 (``fit``'s).
        batch_size, seed: the minibatches and their order, as :func:`fit`'s ``Batches(size, seed)``.
        loss_fn: per-example ``(predictions, y) -> (B,)``, as :func:`fit`'s.
        eval_sets: named ``(x, y)`` sets evaluated at the end (loss and accuracy).

    Returns a :class:`RetrainResult`. A non-finite training loss raises
    :class:`~hypergradients.NonFiniteError` (``round`` = the step).
    """
    t0 = time.perf_counter()
    if on not in ON:
        raise ValueError(f"on must be 'train' or 'train+val', got {on!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (inner optimizer steps) must be an integer >= 1, got {steps!r}")
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory must return an nn.Module, got {type(model).__name__}")
    if isinstance(families, Family):
        fams = [families]
    elif callable(families):
        fams = list(families(model))
    else:
        fams = list(families)
    lam = {k: t.detach().clone() for k, t in collect_hparams(fams).items()}
    if values is not None:
        given = natural_values(values, fams)
        if not isinstance(values, Mapping):  # an exported file: it must hold every hyperparameter
            missing = sorted(set(lam) - set(given))
            if missing:
                raise KeyError(
                    f"the exported values have no {missing[0]!r} (of {len(missing)} missing): they "
                    "were exported for other families"
                )
        lam.update(tree.detach(unconstrained(fams, given)))
    x, y = train
    if on == "train+val":
        if val is None:
            raise ValueError("on='train+val' trains on the validation set too: pass val=(x_val, y_val)")
        per_example = [f.name for f in fams if isinstance(f, ExampleWeights)]
        if per_example:
            raise ValueError(
                f"on='train+val' adds the validation examples, for which the ExampleWeights "
                f"{per_example[0]!r} has no weight: retrain on='train'"
            )
        x, y = torch.cat([x, val[0].to(x.device)]), torch.cat([y, val[1].to(y.device)])
    generator = torch.Generator().manual_seed(Noise.draw().seed) if any(f.stochastic for f in fams) else None
    objective = Objective(model, fams, on_targets(loss_fn), generator=generator)
    opt = (optimizer or INNER_OPTIMIZER)([p for p in model.parameters() if p.requires_grad])
    stream = _stream(len(y), batch_size, seed)
    recent: list[float] = []
    for step in range(1, steps + 1):
        b = _batch(stream, x, y)
        opt.zero_grad(set_to_none=True)
        loss = objective.train(dict(model.named_parameters()), lam, b, forward=objective.live)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(
                f"retrain step {step}: the training loss is not finite (NaN or inf): lower the "
                "learning rate, or check the values fixed",
                round=step,
                name="inner_loss",
                checkpoint=None,
                what="the training loss",
            )
        loss.backward()
        opt.step()
        recent = [*recent, float(loss.detach())][-100:]
    natural: dict[str, Tensor] = {}
    for fam in fams:
        natural.update(fam.natural({k: lam[k] for k in fam.tensors()}))
    final = evaluate(model, eval_sets, loss_fn=loss_fn) if eval_sets else {}
    return RetrainResult(
        model=model,
        on=on,
        steps=steps,
        natural=natural,
        inner_loss=sum(recent) / len(recent),
        final=final,
        wall_s=time.perf_counter() - t0,
    )
