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
A run of several seeds keeps each seed as a one-seed run in its folder ``seed<N>``: give that folder.

The experiments use the same pieces for their own "freeze and retrain" check:
:func:`experiment_arms` builds the arms from a configuration and the data already loaded, and
:meth:`Arm.retrain` trains a fresh model with the tuned values fixed, the way the arm was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..hparams import Family
from ..training.fit import CHECKPOINT
from .arms import Arm, Data
from .config import Config, ConfigError, read_toml, resolve
from .datasets import Dataset
from .experiments import shared

SUPPORTED = ("weight-decay", "overfit-validation", "families")

__all__ = ["SUPPORTED", "Arm", "TunedRun", "experiment_arms", "open_run"]


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
    if int(cfg.get("seeds", 1)) > 1:
        folders = ", ".join(str(d / f"seed{int(cfg['seed']) + i}") for i in range(int(cfg["seeds"])))
        raise ConfigError(
            f"{str(d)!r} is a run of {cfg['seeds']} seeds, each a one-seed run in its own "
            f"folder: give one of {folders}"
        )
    (train, val, test), arms = experiment_arms(name, d, cfg, None, torch.device(device))
    present = [a for a in arms if (a.folder / CHECKPOINT).is_file()]
    missing = {a.name: f"{str(a.folder / CHECKPOINT)!r} does not exist" for a in arms if a not in present}
    return TunedRun(name, d, cfg, train, val, test, present, missing)


def experiment_arms(
    experiment: str, folder: Path, cfg: Config, ds: Dataset | None, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    """The train, validation and test sets and the tuned arms of a one-seed run of ``experiment``
    (one of :data:`SUPPORTED`) with the resolved configuration ``cfg`` in ``folder``, from the
    dataset ``ds`` its ``check`` returned (``None``: loaded here), on ``device``. Every arm the
    configuration tunes is given, whether its checkpoint exists yet or not."""
    build = {"weight-decay": _weight_decay, "overfit-validation": _overfit_validation, "families": _families}
    if experiment not in build:
        raise ConfigError(f"no tuned arms are built for {experiment!r}; one of {', '.join(SUPPORTED)}")
    return build[experiment](folder, cfg, ds, device)


def _adam(lr: float) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def make(ps: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(ps, lr=lr)

    return make


def _weight_decay(
    d: Path, cfg: Config, ds: Dataset | None, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    from .experiments import weight_decay as wd

    return wd.tuned_arms(d, cfg, ds, device)


def _overfit_validation(
    d: Path, cfg: Config, ds: Dataset | None, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    from .experiments import overfit_validation as ov

    return ov.tuned_arms(d, cfg, ds, device)


def _families(
    d: Path, cfg: Config, ds: Dataset | None, device: torch.device
) -> tuple[tuple[Data, Data, Data], list[Arm]]:
    from .experiments import families as fx

    ds = (ds if ds is not None else fx.check(cfg)).to(device)
    xtr, ytr = fx._images(ds, ds.x_train), ds.y_train
    if cfg["family"] in fx.NOISY:  # the labels the run trained on: the same flips, from the same seed
        ytr, _ = fx.flip_labels(ytr, ds.num_classes, cfg["noise.flip"], seed=cfg["seed"])
    val, test = (fx._images(ds, ds.x_val), ds.y_val), (fx._images(ds, ds.x_test), ds.y_test)

    def model() -> nn.Module:
        torch.manual_seed(cfg["seed"])
        return shared.mlp(ds.num_features, cfg["model.hidden"], ds.num_classes, flatten=True).to(
            device, xtr.dtype
        )

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
