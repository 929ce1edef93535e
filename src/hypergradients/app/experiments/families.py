"""``families``: one hyperparameter family tuned by IFT on a small classifier, against the same
classifier without it.

``hypergradients run families --set family=<name>`` trains a ReLU MLP (the images flattened inside
the model) on a bundled dataset (``digits``: 8×8 scikit-learn digits; ``mnist-5k``: 5000 real
MNIST images) twice, from the same initial weights, with the same data order and the same number
of inner steps:

* ``tuned``    — with the family, its hyperparameters tuned by Algorithm 1 with IFT hypergradients
  (Neumann series or CG, ``hyper.method``) on the validation set;
* ``baseline`` — the same model without the family.

Families (:mod:`hypergradients.hparams`):

* ``dropout``  — per-unit concrete dropout on the hidden units (the inputs of every ``nn.Linear``
  after the first), one keep probability per unit;
* ``dropconnect`` — per-weight concrete DropConnect on every weight matrix;
* ``example-weights`` — one loss weight per training example; ``noise.flip`` (20%) of the training
  labels are flipped (in both arms) and the result gives the AUC of the learned weights for telling
  the flipped examples from the clean ones (``flipped_auc``: ``P(ω_clean > ω_flipped)``);
* ``reweight-net`` — a loss → weight MLP (Meta-Weight-Net style), same flipped labels, the AUC of
  ``ω(ℓ_i)`` at the final weights;
* ``augment``  — a U-Net augmentation network (:class:`~hypergradients.hparams.augment.AugmentNet`,
  noise channel, identity residual; 6,659 weights on RGB, 6,497 on grey images); the classifier
  trains on augmented batches (``augment.with_original`` adds the originals), the figure shows
  test images and one augmentation of each, and a note gives how much it changes an image;
* ``distill``  — ``distill.per_class`` learnable examples per class
  (:class:`~hypergradients.hparams.distill.DistilledData`, started from real training examples):
  the tuned model trains on them *only*; a third arm, ``real-k``, trains on the real examples they
  started from, so the table shows what distillation bought; a figure shows the learned examples.

Before training the hyperparameter count is printed (with the progress display) and written to
the result. The test set is only evaluated, never used for tuning. Run folder: ``config.toml``,
``families.json`` (the result), ``metrics.jsonl`` (every arm's rounds, with an ``arm`` field),
one folder per arm with its checkpoint (``--resume`` continues bit for bit), ``report.md`` and
the figures (loss curves; the distilled examples; original vs augmented images).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...hparams import DropConnect, Dropout, ExampleWeights, Family, LossReweighting, describe
from ...hparams.augment import AugmentNet
from ...hparams.distill import DistilledData
from ..config import Config, ConfigError, Option
from ..datasets import Dataset
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .shared import (
    ArmsProgress,
    RunMetrics,
    augment_change,
    begin,
    correct,
    finish,
    flipped_auc,
    hyper_steps,
    load_data,
    mlp,
    paired_se,
    per_example,
    train_arm,
    versus,
    what_it_shows,
)

FAMILIES: tuple[str, ...] = (
    "dropout",
    "dropconnect",
    "augment",
    "distill",
    "example-weights",
    "reweight-net",
)
FAMILY_NAMES = {
    "dropout": "per-unit dropout",
    "dropconnect": "per-weight DropConnect",
    "augment": "augmentation network",
    "distill": "distilled data",
    "example-weights": "per-example loss weights",
    "reweight-net": "loss-reweighting network",
}
# Families that clean labels: their runs flip `noise.flip` of the training labels (both arms).
NOISY = ("example-weights", "reweight-net")
SCHEMA: dict[str, Option] = {
    "seed": Option(
        0, "seed of the data split, the data order, the initial weights and the noise", int, low=0
    ),
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "family": Option("augment", "the hyperparameter family to tune", str, choices=FAMILIES),
    "data.dataset": Option(
        "digits",
        "bundled dataset (digits: 8×8; mnist-5k: 28×28 real MNIST)",
        str,
        choices=("digits", "mnist-5k"),
    ),
    "data.n_train": Option(0, "training examples (0: all of the split)", int, low=0),
    "data.n_val": Option(0, "validation examples (0: all of the split)", int, low=0),
    "data.n_test": Option(0, "test examples (0: all of the split)", int, low=0),
    "model.hidden": Option([64], "hidden layer widths of the ReLU MLP", list, item=int, low=1),
    "train.rounds": Option(100, "rounds of Algorithm 1 (each: inner steps, then one hyper step)", int, low=1),
    "train.inner_steps": Option(10, "inner Adam steps per round", int, low=1),
    "train.batch_size": Option(64, "training batch size (inner steps and HVPs)", int, low=1),
    "train.lr": Option(1e-3, "inner (Adam) learning rate", float, positive=True),
    "hyper.method": Option(
        "neumann",
        "IFT method: neumann (α = 1/λ_max by power iteration) or cg",
        str,
        choices=("neumann", "cg"),
    ),
    "hyper.iters": Option(10, "Neumann terms / CG iterations", int, low=1),
    "hyper.lr": Option(
        "auto",
        "hyper learning rate (Adam on the unconstrained hyperparameters; auto: 1e-3 "
        "for the augmentation network's weights, 1e-2 otherwise)",
        float,
        auto=True,
        positive=True,
    ),
    "hyper.val_batch_size": Option(
        0, "validation batch of ∂L_V/∂w (0: the whole validation set)", int, low=0
    ),
    "augment.depth": Option(2, "U-Net levels", int, low=1),
    "augment.wf": Option(3, "U-Net filters at the first level: 2^wf (the paper: 3, i.e. 8)", int, low=0),
    # Off by default: beside the originals the network drifts to a label-blind pattern that the
    # hypergradient does not correct; alone it learns a mild augmentation (docs/families.md).
    "augment.with_original": Option(
        False,
        "train on the original and the augmented batch together (default: the augmented batch only)",
        bool,
    ),
    "distill.per_class": Option(1, "learnable examples per class", int, low=1),
    "distill.soft_labels": Option(False, "learn soft labels too", bool),
    "dropout.init": Option(
        0.9, "initial keep probability (dropout, dropconnect)", float, low=0.01, high=0.99
    ),
    "reweight.hidden": Option(16, "hidden width of the loss-reweighting network", int, low=1),
    "weights.normalise": Option(
        "auto",
        "example-weights and reweight-net: mean (Σ ω ℓ / |B|: the weights' "
        "scale matters) or weights (Σ ω ℓ / Σ ω: only relative weights); auto: mean "
        "for example-weights, weights for reweight-net",
        str,
        choices=("auto", "mean", "weights"),
    ),
    "noise.flip": Option(
        0.2,
        "fraction of training labels flipped for example-weights and reweight-net",
        float,
        low=0.0,
        high=0.9,
    ),
    "eval_every": Option(10, "rounds between evaluations of train, validation and test loss", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "data.n_train": 120,
    "data.n_val": 60,
    "data.n_test": 60,
    "model.hidden": [16],
    "train.rounds": 3,
    "train.inner_steps": 2,
    "train.batch_size": 32,
    "hyper.iters": 2,
    "augment.wf": 1,
    "eval_every": 1,
    "checkpoint_every": 2,
}


def _hyper_lr(cfg: Config) -> float:
    # Adam moves every hyperparameter by about lr per step: 1e-2 a hundred times over destroys a U-Net
    # whose weights are ~0.1 (docs/families.md has the run that showed it).
    if cfg["hyper.lr"] == "auto":
        return 1e-3 if cfg["family"] == "augment" else 1e-2
    return float(cfg["hyper.lr"])


def _normalise(cfg: Config) -> Any:
    # With "mean" the network's overall scale is a free direction that the hyper steps push up (ω
    # towards 2, increasing with the loss), and its ranking comes out inverted; "weights" counts only
    # relative weights. One weight per example separates the flipped labels with either
    # (docs/families.md).
    if cfg["weights.normalise"] == "auto":
        return "weights" if cfg["family"] == "reweight-net" else "mean"
    return cfg["weights.normalise"]


def check(cfg: Config) -> Dataset:
    """Load the data (about a second) and check the family's settings against it, before any file
    is written: a size the data lacks, a U-Net too deep for the images or more distilled examples
    per class than the training set has raise :class:`ConfigError` naming the key."""
    ds = load_data(
        cfg,
        cfg["data.dataset"],
        n_train=cfg["data.n_train"] or None,
        n_val=cfg["data.n_val"] or None,
        n_test=cfg["data.n_test"] or None,
    )
    if cfg["family"] == "augment":
        side = 2 ** (cfg["augment.depth"] - 1)
        if any(s % side for s in ds.input_shape[1:]):
            raise ConfigError(
                f"config key 'augment.depth': {cfg['augment.depth']} needs image sides divisible "
                f"by {side}; {cfg['data.dataset']} images are {ds.input_shape[1:]}: lower it"
            )
    if cfg["family"] == "dropout" and not cfg["model.hidden"]:
        raise ConfigError(
            "config key 'model.hidden': family=dropout drops hidden units, and [] gives the "
            "model none: give at least one hidden layer"
        )
    if cfg["family"] == "distill":
        _first_per_class(ds.x_train, ds.y_train, ds.num_classes, cfg["distill.per_class"])
    return ds


def _images(ds: Dataset, x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], *ds.input_shape)


def _first_per_class(x: Tensor, y: Tensor, classes: int, k: int) -> Tensor:
    """``k`` training examples of each class in class order (the distilled set's start)."""
    picks = []
    for c in range(classes):
        idx = (y == c).nonzero().reshape(-1)
        if len(idx) < k:
            raise ConfigError(
                f"config key 'distill.per_class': {k} examples of class {c} wanted, the training "
                f"set has {len(idx)}: lower distill.per_class or raise data.n_train"
            )
        picks.append(idx[:k])
    return x[torch.cat(picks)]


def _families(cfg: Config, ds: Dataset, model: nn.Module, xtr: Tensor, ytr: Tensor) -> list[Family]:
    fam, dtype = cfg["family"], xtr.dtype
    if fam == "augment":
        return [
            AugmentNet(
                ds.input_shape[0],
                depth=cfg["augment.depth"],
                wf=cfg["augment.wf"],
                with_original=cfg["augment.with_original"],
                seed=cfg["seed"],
                dtype=dtype,
                device=xtr.device,
            )
        ]
    if fam == "dropout":  # the hidden units: the inputs of every Linear after the first (after a ReLU)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return [Dropout(model, [f"{n}:input" for n in linears[1:]], init=cfg["dropout.init"])]
    if fam == "dropconnect":
        weights = [n for n, p in model.named_parameters() if p.ndim == 2]
        return [DropConnect(model, weights, init=cfg["dropout.init"])]
    if fam == "example-weights":
        return [ExampleWeights(len(ytr), normalise=_normalise(cfg), dtype=dtype, device=xtr.device)]
    if fam == "reweight-net":
        return [
            LossReweighting(
                cfg["reweight.hidden"],
                normalise=_normalise(cfg),
                seed=cfg["seed"],
                dtype=dtype,
                device=xtr.device,
            )
        ]
    if fam == "distill":
        k = cfg["distill.per_class"]
        return [
            DistilledData(
                ds.input_shape,
                ds.num_classes,
                per_class=k,
                init=_first_per_class(xtr, ytr, ds.num_classes, k),
                soft_labels=cfg["distill.soft_labels"],
            )
        ]
    raise ConfigError(f"config key 'family': unknown {fam!r}; one of {', '.join(FAMILIES)}")


def _run(ctx: RunContext) -> ExperimentResult:
    """Train the tuned and the baseline arm (and ``real-k`` for distill); write the run folder."""
    cfg, t0 = ctx.config, time.perf_counter()
    family = cfg["family"]
    arms = ["tuned", "baseline"] + (["real-k"] if family == "distill" else [])
    ds: Dataset = begin(ctx, check, arms=[ctx.out / arm for arm in arms]).to(ctx.device)
    xtr, ytr = _images(ds, ds.x_train), ds.y_train
    flipped = torch.zeros(len(ytr), dtype=torch.bool)
    if family in NOISY:
        ytr, flipped = flip_labels(ytr, ds.num_classes, cfg["noise.flip"], seed=cfg["seed"])
    evals = {
        "train": (xtr, ytr),
        "val": (_images(ds, ds.x_val), ds.y_val),
        "test": (_images(ds, ds.x_test), ds.y_test),
    }
    rounds = cfg["train.rounds"]
    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    test_correct: dict[str, Tensor] = {}  # per test example, for the paired standard errors of the notes
    tuned_fams: list[Family] = []
    count = 0
    with (
        RunMetrics(ctx.out / "metrics.jsonl") as metrics,
        ArmsProgress(ctx, f"families: {family}", len(arms), rounds) as bar,
    ):
        for i, arm in enumerate(arms):
            torch.manual_seed(cfg["seed"])  # the same initial weights for every arm
            model = mlp(ds.num_features, cfg["model.hidden"], ds.num_classes, flatten=True).to(
                ctx.device, xtr.dtype
            )
            fams: list[Family] = []
            train, batch_size = (xtr, ytr), cfg["train.batch_size"]
            if arm == "tuned":
                fams = _families(cfg, ds, model, xtr, ytr)
                tuned_fams = fams
                count = sum(f.count() for f in fams)
                if ctx.progress:  # the count before any training, as the description says
                    print(describe(fams), file=sys.stderr, flush=True)
            elif arm == "real-k":
                k = cfg["distill.per_class"]
                xk = _first_per_class(xtr, ytr, ds.num_classes, k)
                train = (xk, torch.arange(ds.num_classes, device=xk.device).repeat_interleave(k))
                batch_size = len(xk)  # the distilled arm also sees its whole set at every step
            tag, out = {"arm": arm}, ctx.out / arm
            res = train_arm(
                ctx,
                model,
                fams,
                train,
                evals["val"],
                out=out,
                evals=evals,
                batch_size=batch_size,
                hyper_lr=_hyper_lr(cfg),
                callbacks=[metrics.callback(tag, out), bar.tick(i, arm)],
            )
            metrics.finish_arm(tag, res.metrics)
            histories[arm] = res.metrics
            test_correct[arm] = per_example(model, *evals["test"], correct)
            f = res.final
            results[arm] = {
                "arm": arm,
                "hyperparameters": res.hyperparameters,
                "hyper_steps": hyper_steps(res) if fams else "-",
                "test_acc": f["test_acc"],
                "test_loss": f["test_loss"],
                "val_loss": f["val_loss"],
                "train_loss": f["train_loss"],
                "wall_s": res.wall_s,
            }
            if family in NOISY:
                results[arm]["flipped_auc"] = "-"  # set below for the tuned arm
            if arm == "tuned" and family in NOISY:
                results[arm]["flipped_auc"] = flipped_auc(_example_weights(fams[0], model, xtr, ytr), flipped)
            bar.done(i)
    rows = [results[a] for a in arms]
    columns = [
        "arm",
        "hyperparameters",
        "hyper_steps",
        "test_acc",
        "test_loss",
        "val_loss",
        "train_loss",
        "wall_s",
    ] + (["flipped_auc"] if family in NOISY else [])
    ses = {a: paired_se(test_correct["tuned"], test_correct[a]) for a in arms if a != "tuned"}
    notes = _notes(family, results, int(flipped.sum()), se=ses, n_test=len(evals["test"][1]))
    for fam in tuned_fams:
        if isinstance(fam, AugmentNet):
            change = augment_change(fam, evals["test"][0])
            notes.append(
                f"The learned augmentation changes a test image by {change:.2f} of its norm (median "
                "‖a(x, ε) − x‖/‖x‖, one noise draw); the figure scales each image to its own range."
            )
    figures = _figures(ctx.out, tuned_fams, histories, evals)
    result = {
        "family": family,
        "hyperparameters": count,
        "description": describe(tuned_fams),
        "dataset": ds.source,
        "rows": rows,
        "notes": notes,
    }
    if family in NOISY:
        result["flipped"] = int(flipped.sum())
        result["normalise"] = _normalise(cfg)
    title = f"families: {FAMILY_NAMES[family]} on {cfg['data.dataset']} ({count:,} hyperparameters, IFT)"
    lines = [
        f"Data: {ds.source}; a ReLU MLP (hidden {'-'.join(map(str, cfg['model.hidden']))}); every arm "
        f"starts from the same weights and takes {rounds * cfg['train.inner_steps']} Adam steps (lr "
        f"{cfg['train.lr']:g}); the tuned arm takes a hyper step (Adam, lr {_hyper_lr(cfg):g}, "
        f"{cfg['hyper.method']}, {cfg['hyper.iters']} iterations) every {cfg['train.inner_steps']} steps.",
        "",
        "```",
        describe(tuned_fams),
        "```",
        "",
        _table(columns, rows),
        "",
        *what_it_shows(notes),
        "## Figures",
        "",
        *[f"![{p.stem}]({p.name})\n" for p in figures],
    ]
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="families.json",
        body=lines,
        figures=figures,
    )


def _table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    from ..report import markdown_table

    return markdown_table(columns, rows)


def _notes(
    family: str,
    results: dict[str, dict[str, Any]],
    n_flipped: int,
    *,
    se: dict[str, float] | None = None,
    n_test: int = 0,
) -> list[str]:
    """The report's notes. ``se[arm]``: the paired standard error (over the same test examples) of the
    tuned arm's test accuracy minus ``arm``'s; the verdicts are :func:`.shared.versus`'s."""
    se = se or {}
    t, b = results["tuned"], results["baseline"]
    paired = f"paired standard error over the {n_test:,} test examples, one training seed"
    no_se = "no standard error: no noise estimate"
    v = versus(
        f"The model with the tuned {FAMILY_NAMES[family]}",
        "the one without it",
        t["test_acc"],
        b["test_acc"],
        se.get("baseline"),
        metric="test accuracy",
        higher_is_better=True,
        se_what=paired,
        no_se=no_se,
        digits=".3f",
    )
    notes = [f"{v.text}."]
    if family == "distill":
        r = results["real-k"]
        v = versus(
            "Training on the distilled examples",
            "training on the real examples they started from",
            t["test_acc"],
            r["test_acc"],
            se.get("real-k"),
            metric="test accuracy",
            higher_is_better=True,
            se_what=paired,
            no_se=no_se,
            digits=".3f",
        )
        notes.append(
            f"The tuned arm trains on the distilled examples only, the baseline on the whole "
            f"training set. {v.text}."
        )
    if family in NOISY:
        auc = t["flipped_auc"]
        notes.append(
            f"{n_flipped} training labels were flipped (both arms train on them). The learned weights rank "
            f"a clean example above a flipped one with probability {auc:.3f} (the AUC; 0.5 is chance, 1 "
            "is a perfect separation)"
            + (
                ": the weights find the flipped labels."
                if auc > 0.6
                else ": the weights rank them the wrong way round, the flipped examples weighted MORE."
                if auc < 0.4
                else ": the weights barely tell them apart in this run."
            )
        )
    return notes


def flip_labels(y: Tensor, classes: int, fraction: float, *, seed: int) -> tuple[Tensor, Tensor]:
    """``y`` with ``round(fraction·n)`` labels (chosen by ``seed``) changed to another class, uniformly,
    and the boolean mask of the flipped examples."""
    g = torch.Generator().manual_seed(seed + 1)
    n = len(y)
    idx = torch.randperm(n, generator=g)[: round(fraction * n)]
    out = y.clone()
    shift = torch.randint(1, classes, (len(idx),), generator=g).to(y.device)
    out[idx.to(y.device)] = (y[idx.to(y.device)] + shift) % classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return out, mask


def _example_weights(fam: Family, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Each training example's learned weight: its own (ExampleWeights) or ω(its loss at the final
    weights) (LossReweighting)."""
    if isinstance(fam, ExampleWeights):
        return next(iter(fam.natural().values()))
    assert isinstance(fam, LossReweighting)
    with torch.no_grad():
        model.eval()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        return fam.weight(losses, fam.tensors())


def _figures(
    out: Path,
    fams: list[Family],
    histories: dict[str, list[dict[str, Any]]],
    evals: dict[str, tuple[Tensor, Tensor]],
) -> list[Path]:
    from .. import report  # matplotlib: only when figures are drawn

    paths = [
        report.plot_curves(
            histories,
            out / "loss_curves.png",
            keys=("val_loss", "test_loss", "train_loss"),
            title="evaluated every few rounds; the test set is never used for tuning",
        )
    ]
    for fam in fams:
        if isinstance(fam, DistilledData):
            from ...hparams.distill import save_distilled_figure

            paths.append(
                save_distilled_figure(fam, out / "distilled.png", title="learned examples, by class")
            )
        if isinstance(fam, AugmentNet):
            paths.append(report.plot_augmented(fam, evals["test"][0][:8], out / "augmented.png"))
    return paths


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="families",
    summary="one hyperparameter family (" + "|".join(FAMILIES) + ") tuned by IFT on digits/mnist-5k vs the "
    "same model without it",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = ["EXPERIMENT", "FAMILIES", "SCHEMA", "SMOKE", "check", "flip_labels", "run"]
