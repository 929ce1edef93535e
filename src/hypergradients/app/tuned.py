"""The tuned values of a run folder: what ``hypergradients export`` and ``hypergradients retrain`` read.

A run folder of an experiment that tunes families holds its resolved ``config.toml`` and, per arm,
the final ``checkpoint.pt`` of :func:`~hypergradients.fit` (the model and the hyper step's state).
:func:`open_run` finds which experiment wrote the folder (the one whose settings its
``config.toml`` resolves against), loads its data, and gives each tuned arm as an :class:`Arm`:
how the experiment built the arm's model and families, trained it (the inner optimizer, the batch
size and order, the inner steps per round) and where its checkpoint is. Supported:

* ``weight-decay``: the arms ``global``, ``layer`` and ``weight`` (``none`` tunes nothing; the
  ``optuna`` arm keeps no checkpoint: its decay is in ``optuna/decays.pt``);
* ``overfit-validation``: the models ``linear`` and ``mlp`` (one decay per weight, biases included);
* ``families``: the ``tuned`` arm, whichever family it tunes (dropout, DropConnect, example
  weights, the reweighting network, the augmentation network, distilled data), on the training
  labels the run used (with its flipped labels where it flipped them).

The other experiments (``data-cleaning``, ``distill``, ``augment``, ``lstm-dropout``) are refused
with that list: their families are exported from Python with :func:`hypergradients.export_hparams`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..hparams import Family, WeightDecay
from ..training.fit import CHECKPOINT, read_checkpoint
from .config import Config, ConfigError, read_toml, resolve
from .datasets import Dataset
from .experiments import shared

SUPPORTED = ("weight-decay", "overfit-validation", "families")

__all__ = ["SUPPORTED", "Arm", "TunedRun", "open_run"]


@dataclass
class Arm:
    """One tuned arm of a run: ``model()`` the fresh model with the run's initial weights,
    ``families(model)`` its families at their initial values, ``optimizer`` the inner optimizer's
    factory, ``inner_steps``/``warmup_steps`` per round and before the first, ``batch_size`` and
    ``seed`` of the training batches, ``folder`` where its checkpoint is."""

    name: str
    folder: Path
    model: Callable[[], nn.Module]
    families: Callable[[nn.Module], list[Family]]
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]
    inner_steps: int
    warmup_steps: int
    batch_size: int
    seed: int

    def steps(self, rounds: int) -> int:
        """The inner steps that ``rounds`` rounds of the run took."""
        return rounds * self.inner_steps + (self.warmup_steps if rounds else 0)

    def tuned(self) -> tuple[nn.Module, list[Family], int]:
        """The model and families as the arm's checkpoint left them, and the checkpoint's round."""
        st = read_checkpoint(
            self.folder / CHECKPOINT, fix="run the experiment again (or --resume it) to write the checkpoint"
        )
        model = self.model()
        model.load_state_dict(st["model"])
        fams = self.families(model)
        if st.get("hyper") is None:
            raise ConfigError(
                f"the checkpoint {str(self.folder / CHECKPOINT)!r} holds no hyperparameters: the "
                f"arm {self.name!r} tuned none"
            )
        for fam in fams:
            fam.load_tensors(st["hyper"]["hparams"])
        return model, fams, int(st["round"])


Data = tuple[Tensor, Tensor]


@dataclass
class TunedRun:
    """A run folder: the ``experiment`` that wrote it, its resolved ``config``, its ``train``, ``val``
    and ``test`` sets as the run used them (on the device asked for) and its tuned ``arms`` that have
    a checkpoint (``missing``: the others, with why)."""

    experiment: str
    folder: Path
    config: Config
    train: Data
    val: Data
    test: Data
    arms: list[Arm]
    missing: dict[str, str]


def _experiment(folder: Path, cfg_file: dict[str, Any], name: str | None) -> tuple[str, Config]:
    from .experiments import MODULES, get

    names = [name] if name is not None else list(MODULES)
    fits: dict[str, Config] = {}
    for n in names:
        try:
            fits[n] = resolve(get(n).schema, file=cfg_file)
        except ConfigError:
            continue
    if name is not None and name not in fits:
        try:
            resolve(get(name).schema, file=cfg_file)
        except ConfigError as e:
            raise ConfigError(
                f"{str(folder)!r} is not a run of {name!r}: its config.toml does not resolve ({e})"
            ) from None
    if len(fits) != 1:
        what = "no registered experiment" if not fits else f"several experiments ({', '.join(fits)})"
        raise ConfigError(
            f"the config.toml of {str(folder)!r} is a configuration of {what}: give --experiment "
            f"NAME ({', '.join(SUPPORTED)})"
        )
    found, cfg = next(iter(fits.items()))
    if found not in SUPPORTED:
        raise ConfigError(
            f"{str(folder)!r} is a run of {found!r}; export and retrain read runs of "
            f"{', '.join(SUPPORTED)}. Export another experiment's families from Python with "
            "hypergradients.export_hparams(families, 'tuned.json')"
        )
    return found, cfg


def open_run(
    folder: str | Path, *, experiment: str | None = None, device: torch.device | str = "cpu"
) -> TunedRun:
    """The run in ``folder`` (module docstring). Raises :class:`~hypergradients.app.config.ConfigError`
    when it is no run folder, a run of an unsupported experiment, or its data cannot be loaded."""
    d = Path(folder)
    if not (d / "config.toml").is_file():
        raise ConfigError(
            f"{str(d)!r} holds no config.toml, so it is not the folder of a run (`hypergradients run "
            "EXPERIMENT --out DIR` writes one)"
        )
    name, cfg = _experiment(d, read_toml(d / "config.toml"), experiment)
    dev = torch.device(device)
    build = {"weight-decay": _weight_decay, "overfit-validation": _overfit_validation, "families": _families}
    (train, val, test), arms = build[name](d, cfg, dev)
    present = [a for a in arms if (a.folder / CHECKPOINT).is_file()]
    missing = {a.name: f"{str(a.folder / CHECKPOINT)!r} does not exist" for a in arms if a not in present}
    return TunedRun(name, d, cfg, train, val, test, present, missing)


def _splits(ds: Dataset) -> tuple[Data, Data, Data]:
    return (ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)


def _adam(lr: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(ps: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(ps, lr=lr)

    return make


def _weight_decay(d: Path, cfg: Config, device: torch.device) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    from .experiments import weight_decay as wd

    ds = wd.check(cfg).to(device)
    include = (lambda n, p: True) if cfg["hyper.include_biases"] else None

    def model() -> nn.Module:
        torch.manual_seed(cfg["seed"])  # the experiment's initial weights, the same for every arm
        return shared.mlp(ds.num_features, cfg["model.hidden"], ds.num_classes).to(device)

    arms = []
    for arm in cfg["arms"]:
        if arm in ("none", "optuna"):
            continue

        def families(m: nn.Module, arm: str = arm) -> list[Family]:
            return [WeightDecay(m, granularity=arm, init=cfg["hyper.init"], include=include)]  # type: ignore[arg-type]

        arms.append(
            Arm(
                arm,
                d / arm,
                model,
                families,
                shared.optimizer(cfg["train.optimizer"], cfg["train.lr"]),
                cfg["train.inner_steps"],
                cfg["train.warmup_steps"],
                cfg["train.batch_size"],
                cfg["seed"],
            )
        )
    return _splits(ds), arms


def _overfit_validation(
    d: Path, cfg: Config, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    from .experiments import overfit_validation as ov

    ds = ov.check(cfg).to(device)
    arms = []
    for name in cfg["models"]:
        hidden = [cfg["model.hidden"]] if name == "mlp" else []

        def model(hidden: list[int] = hidden) -> nn.Module:
            torch.manual_seed(cfg["seed"])
            return shared.mlp(ds.num_features, hidden, ds.num_classes, flatten=True).to(device,
                                                                             ds.x_train.dtype)

        def families(m: nn.Module) -> list[Family]:
            return [WeightDecay(m, granularity="weight", init=cfg["hyper.init"], include=lambda n, p: True)]

        arms.append(
            Arm(
                name,
                d / name,
                model,
                families,
                _adam(cfg["train.lr"]),
                cfg["train.inner_steps"],
                0,
                len(ds.y_train),
                cfg["seed"],
            )
        )
    return _splits(ds), arms


def _families(d: Path, cfg: Config, device: torch.device) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    from .experiments import families as fx

    ds = fx.check(cfg).to(device)
    xtr, ytr = fx._images(ds, ds.x_train), ds.y_train
    if cfg["family"] in fx.NOISY:  # the labels the run trained on: the same flips, from the same seed
        ytr, _ = fx.flip_labels(ytr, ds.num_classes, cfg["noise.flip"], seed=cfg["seed"])
    val, test = (fx._images(ds, ds.x_val), ds.y_val), (fx._images(ds, ds.x_test), ds.y_test)

    def model() -> nn.Module:
        torch.manual_seed(cfg["seed"])
        return shared.mlp(ds.num_features, cfg["model.hidden"], ds.num_classes, flatten=True).to(
            device, xtr.dtype)

    def families(m: nn.Module) -> list[Family]:
        return fx._families(cfg, ds, m, xtr, ytr)

    arm = Arm(
        "tuned",
        d / "tuned",
        model,
        families,
        _adam(cfg["train.lr"]),
        cfg["train.inner_steps"],
        0,
        cfg["train.batch_size"],
        cfg["seed"],
    )
    return ((xtr, ytr), val, test), [arm]
