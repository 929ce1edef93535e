"""What the experiments share, so that each one is its schema, its model and data, its arms and its
report.

A run that trains goes the same way in every experiment (``run = with_threads(_run)``)::

    data = begin(ctx, check, arms=[ctx.out / arm for arm in arms])      # config.toml; the data
    with RunMetrics(ctx.out / "metrics.jsonl") as metrics, \
            ArmsProgress(ctx, "name", len(arms), rounds) as bar:
        for i, arm in enumerate(arms):
            tag, out = {"arm": arm}, ctx.out / arm
            res = train_arm(ctx, model, fams, train, val, out=out, evals=...,
                            callbacks=[metrics.callback(tag, out), bar.tick(i, arm)])
            metrics.finish_arm(tag, res.metrics)
    return finish(ctx, t0, title=..., rows=..., result=..., body=...)  # the result file, report.md

:func:`train_arm` is one arm of Algorithm 1 (:func:`~hypergradients.fit`) with the settings every
schema spells the same way (``train.*``, ``hyper.*``, ``eval_every``, ``checkpoint_every``; a key an
experiment does not have keeps ``fit``'s default), in the arm's checkpoint folder. ``explain``,
``compare`` and ``bench`` train nothing, but start with :func:`begin` and end with :func:`finish` too.
Also here: the models and data loading several experiments use, and the statistics behind the
reports' words (:func:`paired_se`, :func:`versus`, :func:`flipped_auc`).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from ...core.method import Method
from ...core.solvers import CG, Auto, Identity, Neumann, Nystrom
from ...hparams import Family, Noise
from ...hparams.augment import AugmentNet
from ...training.callbacks import Callback as FitCallback
from ...training.files import UnreadableFileError, json_dumps, remove_stale_temps, write_atomic
from ...training.fit import (
    METRICS,
    SkippedHyperStepsWarning,
    TensorBoardCallback,
    TrainResult,
    check_checkpoint,
    fit,
)
from ...training.hyper import _mode
from ..config import Config, ConfigError, write_toml
from ..datasets import DataFormatError, Dataset, DataUnavailableError, load_dataset
from ..progress import Progress
from .base import ExperimentResult, RunContext, write_report

Callback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------- models
def mlp(inputs: int, hidden: Sequence[int], outputs: int, *, flatten: bool = False) -> nn.Sequential:
    """``inputs → hidden… → outputs`` with ReLUs (no hidden layer: a linear model); ``flatten`` puts an
    ``nn.Flatten`` first, for images."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for h in hidden:
        layers += [nn.Linear(inputs, h), nn.ReLU()]
        inputs = h
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


class FixedL2(Family):
    """A fixed penalty ``γ/2 Σ ‖w‖²`` on every weight, with no hyperparameter of its own: it makes the
    inner problem strongly convex (so ``w*`` exists and ``H ⪰ γI``) without being tuned."""

    name = "fixed_l2"

    def __init__(self, gamma: float) -> None:
        self.gamma = float(gamma)

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def natural(self, hparams: Any = None) -> dict[str, Tensor]:
        return {}

    def penalty(self, params: Any, hparams: Any) -> Tensor | None:
        if self.gamma == 0:
            return None
        return 0.5 * self.gamma * sum((p * p).sum() for p in params.values())


# ------------------------------------------------------------------------------------------- data
def load_data(
    cfg: Config,
    name: str,
    *,
    n_train: int | None,
    n_val: int | None = None,
    n_test: int | None = None,
    flatten: bool = True,
    seed: int | None = None,
) -> Dataset:
    """:func:`~hypergradients.app.datasets.load_dataset` with ``data.root`` (where the schema has it) and
    the seed (``seed``, else the ``seed`` setting); a failure is a :class:`ConfigError` naming the key to
    change: ``data.root`` for missing or unreadable files (``data.dataset`` where the data is bundled
    and there is no root), ``data.n_*`` for a size the split does not have."""
    root = cfg.get("data.root", "")
    try:
        return load_dataset(
            name,
            root=root or None,
            seed=cfg["seed"] if seed is None else seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            flatten=flatten,
        )
    except (DataUnavailableError, DataFormatError) as e:
        if "data.root" not in cfg:  # bundled data: only a broken install
            raise ConfigError(f"config key 'data.dataset': {name!r} cannot be loaded: {e}") from None
        if isinstance(e, DataFormatError):
            raise ConfigError(
                f"config key 'data.root': the {name!r} files in {root!r} cannot be read: {e}"
            ) from None
        raise ConfigError(
            f"config key 'data.root': got {root!r}, but the dataset {name!r} needs its files there. {e}"
        ) from None
    except ValueError as e:
        msg = str(e)
        key = next((f"data.{k}" for k in ("n_train", "n_val", "n_test") if k in msg), "data.dataset")
        most = re.search(r"maximum \w+=(\d+)", msg)
        expected = f"expected at most {most[1]} (0: all of them)" if most else "expected another value"
        raise ConfigError(f"config key {key!r}: got {cfg.get(key)!r}; {expected}: {msg}") from None


def rounds(cfg: Config, cpu: int, full: int) -> int:
    """``train.rounds``, with ``auto`` resolved by the ``config`` preset (``cpu`` or ``full``)."""
    r = cfg["train.rounds"]
    return int(r) if r != "auto" else (full if cfg["config"] == "full" else cpu)


# ------------------------------------------------------------------------ method and optimizers
def method(cfg: Config) -> Method:
    """The hypergradient method of ``hyper.method`` (``neumann`` where the schema has no such key), with
    ``hyper.iters`` terms, iterations or rank; ``hyper.alpha``, ``hyper.power_iters`` and
    ``hyper.damping`` where the schema has them. CG stops at a relative residual of 1e-6, damped by
    1e-3 unless ``hyper.damping`` says otherwise (a small training set leaves ``H`` near-singular)."""
    name, iters = cfg.get("hyper.method", "neumann"), cfg["hyper.iters"]
    if name == "neumann":
        extra = {"power_iters": cfg["hyper.power_iters"]} if "hyper.power_iters" in cfg else {}
        return Neumann(iters=iters, alpha=cfg.get("hyper.alpha", "auto"), **extra)
    if name == "cg":
        return CG(iters=iters, tol=1e-6, damping=cfg.get("hyper.damping", 1e-3))
    if name == "auto":
        return Auto(max_iters=iters)
    if name == "nystrom":
        return Nystrom(rank=iters)
    if name == "identity":
        return Identity()
    raise ConfigError(
        f"config key 'hyper.method': unknown {name!r}; one of neumann, cg, auto, nystrom, identity"
    )


def optimizer(name: str, lr: float, *, clip: float = 0.0) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """The factory ``fit`` takes: ``adam``, ``rmsprop``, ``sgd`` or ``momentum`` (SGD with momentum 0.9);
    ``clip > 0`` rescales the gradients to a total norm of at most ``clip`` before every step
    (``torch.nn.utils.clip_grad_norm_``, as AWD-LSTM's training loop does)."""

    def make(ps: list[Tensor]) -> torch.optim.Optimizer:
        cls: type[torch.optim.Optimizer]
        kw: dict[str, Any] = {"lr": lr}
        if name == "adam":
            cls = torch.optim.Adam
        elif name == "rmsprop":
            cls = torch.optim.RMSprop
        else:
            cls, kw["momentum"] = torch.optim.SGD, 0.9 if name == "momentum" else 0.0
        return (clipped(cls, clip) if clip > 0 else cls)(ps, **kw)

    return make


def clipped(cls: type[torch.optim.Optimizer], max_norm: float) -> type[torch.optim.Optimizer]:
    """``cls`` whose ``step`` first rescales the gradients of all its parameters to a total (2-)norm of at
    most ``max_norm``; its state dict is ``cls``'s (checkpoints and resumes unchanged)."""

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        return cls.step(self, closure)

    return type(f"Clipped{cls.__name__}", (cls,), {"step": step})


# ------------------------------------------------------------------------------------ the run
def begin(
    ctx: RunContext,
    check: Callable[[Config], Any],
    *,
    arms: Sequence[Path] = (),
    resumed: Sequence[Path] | None = None,
    restart: str = "arm",
) -> Any:
    """The start of a run, before its first arm: on ``--resume`` the checkpoint in each folder of
    ``resumed`` (default: every folder of ``arms``) reads back (:func:`check_checkpoints`: a refused
    resume changes no file); then the run folder and its ``arms``' folders lose the temp files a killed
    write left, and ``config.toml`` is written. Returns the data: what ``check`` returned before the
    run (:attr:`RunContext.data`), else ``check`` again."""
    check_checkpoints(ctx, arms if resumed is None else resumed, restart=restart)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for d in (ctx.out, *arms):
        remove_stale_temps(d)
    write_toml(ctx.config, ctx.out / "config.toml")
    return ctx.data if ctx.data is not None else check(ctx.config)


def unreadable(e: UnreadableFileError, folder: Path | None, what: str) -> UnreadableFileError:
    """The error of an unreadable checkpoint, with the choices: restart ``what`` (e.g. ``the arm
    'global'``) by deleting its ``folder``, or restore the file."""
    return UnreadableFileError(
        f"cannot read the checkpoint {str(e.path)!r}: {e.why}. To continue: delete the folder "
        f"{str(folder)!r} to restart {what} (the rest of the run is kept), or restore it from a copy.",
        path=e.path,
        why=e.why,
    )


def check_checkpoints(ctx: RunContext, dirs: Iterable[Path], *, restart: str = "arm") -> None:
    """On ``--resume``, before the run writes anything: the checkpoint in each of ``dirs`` (the arms'
    folders, as given to :func:`train_arm`) reads back, else the error :func:`train_arm` would raise, so
    that a refused resume leaves every file of the run as it was (an arm trained or a metrics file
    rewritten before a later arm's checkpoint turns out unreadable would not be)."""
    if not ctx.resume:
        return
    for d in dirs:
        try:
            check_checkpoint(d)
        except UnreadableFileError as e:
            raise unreadable(e, d, f"the {restart} {d.name!r}") from None


def train_arm(
    ctx: RunContext,
    model: nn.Module,
    fams: Sequence[Family],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    out: Path | None,
    evals: Mapping[str, tuple[Tensor, Tensor]],
    callbacks: Sequence[Callback | FitCallback] = (),
    rounds: int | None = None,
    batch_size: int | None = None,
    val_batch_size: int | Literal["config"] | None = "config",
    hyper_lr: float | None = None,
    seed: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    resume: bool | None = None,
    restart: str = "arm",
    warmup_steps: int | None = None,
    inner_steps: int | None = None,
    inner_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    hyper_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    hyper_method: Method | None = None,
) -> TrainResult:
    """One arm of Algorithm 1 (:func:`~hypergradients.fit`), checkpointed in ``out`` (``None``: no
    checkpoint), with the run's settings:

    ``train.rounds`` (or ``rounds``), ``train.inner_steps`` (or ``inner_steps``), ``train.warmup_steps``,
    ``train.batch_size`` (or ``batch_size``), the inner optimizer ``train.optimizer`` (Adam where absent)
    at ``train.lr`` with ``train.clip`` (gradient-norm clipping, where present), the hyper optimizer
    ``hyper.optimizer`` (Adam) at ``hyper.lr`` (or ``hyper_lr``), :func:`method`,
    ``hyper.val_batch_size`` (0: all; or ``val_batch_size``), ``hyper.batch_size`` or
    ``hyper.train_batch_size`` (the hyper step's training batch; 0 or absent: ``train.batch_size``),
    ``hyper.on_solver_error``, ``hyper.warm_start``, ``hyper.hvp_mode``, ``seed`` (or ``seed``),
    ``eval_every``, ``checkpoint_every``; a key the schema does not have keeps ``fit``'s default.
    ``warmup_steps``, ``inner_optimizer``, ``hyper_optimizer`` (factories) and ``hyper_method`` replace
    what the keys would give, for an experiment whose schema spells them otherwise. ``--resume``
    continues from the checkpoint (``resume`` overrides it); ``--tensorboard`` logs the rounds to
    ``<run>/tensorboard/<arm>``. Skipped hyper steps are counted in the result, not warned; an
    unreadable checkpoint names the folder to delete to restart that ``restart`` (``arm``, ``run``).
    Without a ``hyper.warm_start`` key each hyper step solves from scratch (``warm_start=False``), the
    setting the experiments' documented figures were measured with.
    """
    cfg = ctx.config
    kwargs: dict[str, Any] = {"warm_start": False}
    for key, arg in (
        ("train.warmup_steps", "warmup_steps"),
        ("hyper.on_solver_error", "on_solver_error"),
        ("hyper.warm_start", "warm_start"),
        ("hyper.hvp_mode", "hvp_mode"),
        ("hyper.batch_size", "hyper_batch_size"),
    ):
        if key in cfg:
            kwargs[arg] = cfg[key]
    if warmup_steps is not None:
        kwargs["warmup_steps"] = warmup_steps
    if val_batch_size == "config":
        val_batch_size = (cfg["hyper.val_batch_size"] or None) if "hyper.val_batch_size" in cfg else None
    if cfg.get("hyper.train_batch_size"):
        kwargs["hyper_batch_size"] = cfg["hyper.train_batch_size"]
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    tb = TensorBoardCallback(ctx.out / "tensorboard" / out.name) if ctx.tensorboard and out else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=SkippedHyperStepsWarning)  # counted in the table
        try:
            return fit(
                model,
                fams,
                train,
                val,
                rounds=cfg["train.rounds"] if rounds is None else rounds,
                inner_steps=cfg["train.inner_steps"] if inner_steps is None else inner_steps,
                inner_optimizer=inner_optimizer
                or optimizer(
                    cfg.get("train.optimizer", "adam"), cfg["train.lr"], clip=cfg.get("train.clip", 0.0)
                ),
                hyper_optimizer=hyper_optimizer
                or optimizer(
                    cfg.get("hyper.optimizer", "adam"), cfg["hyper.lr"] if hyper_lr is None else hyper_lr
                ),
                method=hyper_method or method(cfg),
                batch_size=cfg["train.batch_size"] if batch_size is None else batch_size,
                val_batch_size=val_batch_size,
                seed=cfg["seed"] if seed is None else seed,
                eval_sets=evals,
                eval_every=cfg["eval_every"],
                callbacks=[*callbacks, *([tb] if tb is not None else [])],
                checkpoint_dir=out,
                checkpoint_every=cfg["checkpoint_every"],
                resume=ctx.resume if resume is None else resume,
                **kwargs,
            )
        except UnreadableFileError as e:
            raise unreadable(e, out, f"the {restart} {out.name if out else ''!r}") from None
        finally:
            if tb is not None:
                tb.close()


U = TypeVar("U")
R = TypeVar("R")


def run_units(
    fn: Callable[[U], R],
    units: Sequence[U],
    *,
    jobs: int,
    on_done: Callable[[int, R], None] | None = None,
    here: Callable[[U], R] | None = None,
) -> list[R]:
    """``fn(unit)`` for every unit, the results in the order of ``units``.

    ``jobs == 1`` (or a single unit): one after the other in this process (``here`` instead of ``fn``
    where given, e.g. ``fn`` with a progress display bound to it). ``jobs > 1``: in ``jobs`` fresh
    processes (``spawn``: nothing of this process's state is inherited), so ``fn`` must be a
    module-level function and the units picklable; ``on_done(i, result)`` is called here as each
    unit finishes. The results do not depend on ``jobs`` as long as every unit seeds whatever it
    draws from and sets its own thread count (as a fresh process would need anyway). The first
    failure is raised here (as itself when it can cross the process boundary, else as a
    ``RuntimeError`` carrying its text) after the other units are cancelled.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    results: list[Any] = [None] * len(units)
    if jobs == 1 or len(units) <= 1:
        call = here or fn
        for i, u in enumerate(units):
            results[i] = call(u)
            if on_done is not None:
                on_done(i, results[i])
        return results
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(
        max_workers=min(jobs, len(units)), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        index = {pool.submit(_portable, fn, u): i for i, u in enumerate(units)}
        pending = set(index)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    results[index[f]] = f.result()  # raises the unit's error
                    if on_done is not None:
                        on_done(index[f], results[index[f]])
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return results


def _portable(fn: Callable[[U], R], unit: U) -> R:
    """``fn(unit)`` in a worker process, with an error that cannot be pickled (one whose constructor
    takes keyword arguments) turned into a ``RuntimeError`` that says what it was."""
    import pickle

    try:
        return fn(unit)
    except Exception as e:
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            raise RuntimeError(f"{type(e).__name__}: {e}") from None
        raise


def hyper_steps(res: TrainResult) -> str:
    """The table's ``hyper_steps`` cell: the hyper steps taken out of those planned (``taken/planned``)."""
    return f"{res.hyper_steps}/{res.hyper_steps + res.skipped_hyper_steps}"


class ArmsProgress:
    """One progress display over a run's arms of ``rounds`` rounds each (off without ``ctx.progress``)."""

    def __init__(self, ctx: RunContext, desc: str, arms: int, rounds: int) -> None:
        self.rounds = rounds
        self.bar = Progress(rounds * arms, desc=desc, enabled=ctx.progress, unit="round")

    def tick(
        self, i: int, arm: str, show: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
    ) -> Callback:
        """The callback of arm ``i`` (called ``arm``): its round, and beside the bar the arm and
        ``show(record)`` (default: the validation loss)."""

        def tick(rec: dict[str, Any]) -> None:
            shown = show(rec) if show else {"val": rec.get("hyper_val_loss", rec.get("val_loss"))}
            self.bar.postfix({"arm": arm, **shown})
            self.bar.set(i * self.rounds + int(rec["round"]))

        return tick

    def done(self, i: int) -> None:
        """Arm ``i`` finished (a resumed arm that had finished reports no round)."""
        self.bar.set((i + 1) * self.rounds)

    def __enter__(self) -> ArmsProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


class RunMetrics:
    """The run folder's ``metrics.jsonl``: every arm's round records, each with its ``tag`` (e.g.
    ``{"arm": "global"}``) first, written as the rounds come.

    Rebuilt from scratch at every start (a resume included), in arm order: the rounds a resumed arm
    ran before its checkpoint come from its own ``metrics.jsonl``, then each new round as the trainer
    reports it; :meth:`finish_arm` adds what no callback reported (an arm resumed at its last round,
    or one whose records were read from its files).
    """

    def __init__(self, path: Path) -> None:
        write_atomic(path, "")
        self._f: IO[str] = open(path, "a", encoding="utf-8")
        self.written: dict[str, int] = {}

    def add(self, tag: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
        for rec in records:
            self._f.write(json_dumps({**tag, **rec}) + "\n")
        self._f.flush()
        key = json.dumps(tag)
        self.written[key] = self.written.get(key, 0) + len(records)

    def callback(self, tag: Mapping[str, Any], arm_dir: Path | None) -> Callback:
        """The trainer's callback for the arm ``tag`` checkpointed in ``arm_dir``."""

        def tee(rec: dict[str, Any]) -> None:
            done = self.written.get(json.dumps(tag), 0)
            if done < int(rec["round"]) - 1 and arm_dir is not None:  # a resumed arm: its earlier rounds
                now = int(rec["round"])
                lines = (arm_dir / METRICS).read_text().splitlines()
                self.add(tag, [r for r in map(json.loads, lines) if done < int(r["round"]) < now])
            self.add(tag, [rec])

        return tee

    def finish_arm(self, tag: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
        self.add(tag, records[self.written.get(json.dumps(tag), 0) :])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------- the end
def what_it_shows(notes: list[str]) -> list[str]:
    """The report's ``## What it shows`` section: one bullet per note, then a blank line."""
    return ["## What it shows", "", *[f"- {n}" for n in notes], ""]


def finish(
    ctx: RunContext,
    t0: float,
    *,
    title: str,
    columns: list[str],
    rows: list[dict[str, Any]],
    result: dict[str, Any],
    result_name: str,
    body: list[str],
    notes: Sequence[str] = (),
    figures: Sequence[Path] = (),
    also: Sequence[Path] = (),
    text: str | None = None,
    exit_code: int = 0,
) -> ExperimentResult:
    """The end of every run: ``result`` written to ``out/result_name`` (JSON), then ``report.md``
    (``# title`` and ``body``). The :class:`ExperimentResult` holds the table (``columns``, ``rows``),
    the ``notes``, the readable account ``text`` where the table alone would not say enough, the files
    (the result file, ``also``, the ``figures``, the report), the wall time since ``t0`` and
    ``exit_code`` (nonzero where the run finished but part of it failed)."""
    result_file = write_atomic(ctx.out / result_name, json_dumps(result, indent=1) + "\n")
    path = write_report(ctx.out, title, body)
    return ExperimentResult(
        title=title,
        columns=columns,
        rows=rows,
        report=path,
        out=ctx.out,
        notes=list(notes),
        wall_s=time.perf_counter() - t0,
        result=result,
        result_file=result_file,
        text=text,
        files=[result_file, *also, *figures, path],
        exit_code=exit_code,
    )


# -------------------------------------------------------------------- statistics and their words
def per_example(
    model: nn.Module, x: Tensor, y: Tensor, fn: Callable[[Tensor, Tensor], Tensor], *, batch_size: int = 4096
) -> Tensor:
    """``fn(model(x), y)`` per example (``(N,)``, on the CPU, float64), the model in evaluation mode and
    no graph: the paired data behind a standard error of the difference between two arms evaluated
    on the same examples (:func:`paired_se`)."""
    parts = []
    with _mode(model, False), torch.no_grad():
        for s in range(0, len(y), batch_size):
            parts.append(fn(model(x[s : s + batch_size]), y[s : s + batch_size]).detach().double().cpu())
    return torch.cat(parts)


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example 0/1 correctness of a classifier (the mean is the accuracy)."""
    return (logits.argmax(1) == y).double()


def paired_se(a: Tensor, b: Tensor) -> float:
    """Standard error of ``mean(a) − mean(b)`` for per-example values on the same examples (NaN for
    fewer than two examples: no estimate)."""
    d = (a - b).double()
    return float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")


def flipped_auc(weights: Tensor, flipped: Tensor) -> float:
    """``P(ω_clean > ω_flipped) + ½ P(ω_clean = ω_flipped)`` over all clean/flipped pairs (the AUC of
    "a low weight means a wrong label"); NaN without both kinds."""
    w = weights.detach().double().cpu()
    clean, bad = w[~flipped], w[flipped]
    if not len(clean) or not len(bad):
        return float("nan")
    greater = (clean[:, None] > bad[None, :]).double().mean()
    equal = (clean[:, None] == bad[None, :]).double().mean()
    return float(greater + 0.5 * equal)


def augment_change(fam: AugmentNet, x: Tensor) -> float:
    """The median over images of ``‖a(x, ε) − x‖ / ‖x‖`` with one noise draw (``Noise(0)``, in the
    network's noise shape)."""
    eps = fam.draw(x, Noise(0).sampler())
    with torch.no_grad():
        d = (fam.augment(x, fam.tensors(), eps) - x).flatten(1).norm(dim=1)
    return float((d / x.flatten(1).norm(dim=1).clamp_min(1e-12)).median())


Kind = Literal["beats", "worse", "within noise", "negligible", "unmeasured"]

# A difference under this fraction of the compared values is not called a win or a loss even when it
# exceeds two standard errors: the paired standard error measures the test examples' noise between two
# fixed models only, so two arms that barely moved from the same start differ "significantly" by a
# few parts in a million, a difference no one would act on.
NEGLIGIBLE = 1e-3


@dataclass(frozen=True)
class Verdict:
    """How arm A compares with arm B on one number (:func:`versus`): ``kind`` for the caller's logic,
    ``text`` the words for the report."""

    kind: Kind
    text: str
    difference: float
    se: float | None


def versus(
    a: str,
    b: str,
    value_a: float,
    value_b: float,
    se: float | None,
    *,
    metric: str,
    higher_is_better: bool,
    se_what: str,
    no_se: str,
    digits: str = ".4g",
) -> Verdict:
    """Arm ``a`` against arm ``b`` on ``metric``, in words that follow the numbers.

    ``d = value_a − value_b`` with standard error ``se`` (``se_what`` says which: paired over the
    test examples, over seeds...). ``a`` *beats* or *is worse than* ``b`` only when ``|d| > 2·se``
    and ``|d|`` is at least :data:`NEGLIGIBLE` of the values; within two standard errors it is
    *within noise* (difference d ± se); beyond them but below that size the two *do not differ
    materially*. Without a standard error (``None`` or NaN: one seed, no per-example data) no side is
    called better or noise: the difference is given with ``no_se``, e.g. ``"one seed: no noise
    estimate"``. Equal values with a zero standard error (the same on every pair) are a tie.
    """
    d = value_a - value_b
    vals = f"{value_a:{digits}} vs {value_b:{digits}}"
    if se is None or not math.isfinite(se):
        return Verdict(
            "unmeasured", f"{a} vs {b} on {metric}: {vals} (difference {d:+.3g}; {no_se})", d, None
        )
    if d == 0 and se == 0:
        return Verdict(
            "within noise",
            f"{a} ties with {b} on {metric}: {vals} (no difference on any pair, {se_what})",
            d,
            se,
        )
    diff = f"difference {d:+.3g} ± {se:.2g}, {se_what}"
    if abs(d) <= 2 * se:
        return Verdict("within noise", f"{a} is within noise of {b} on {metric}: {vals} ({diff})", d, se)
    if abs(d) < NEGLIGIBLE * max(abs(value_a), abs(value_b)):
        return Verdict(
            "negligible",
            f"{a} does not differ materially from {b} on {metric}: {vals} ({diff}: "
            f"beyond two standard errors, but under {NEGLIGIBLE:.1%} of the values)",
            d,
            se,
        )
    if (d > 0) == higher_is_better:
        return Verdict("beats", f"{a} beats {b} on {metric}: {vals} ({diff})", d, se)
    return Verdict("worse", f"{a} is worse than {b} on {metric}: {vals} ({diff})", d, se)
