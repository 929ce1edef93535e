"""Algorithm 1 of Lorraine, Vicol & Duvenaud (2020): alternate inner steps and hyper steps.

One *round* is

1. ``inner_steps`` steps of any ``torch.optim`` optimizer on training batches of
   ``L_T(w, λ) = reduce(loss(model_w(x), y)) + Σ_families penalty(w, λ)`` with λ fixed
   (the optimizer and its state persist across rounds: warm-started, never reset);
2. one hyper step (:class:`~hypergradients.HyperOptimizer`, usable in any training loop):
   ``g = hypergradient(L_V, L_T, w, λ, method)`` — stochastic, as in the paper:
   a fresh *training* batch defines ``L_T`` (so the Hessian-vector products), a *validation* batch
   defines ``L_V`` and ``∂L_V/∂w`` — then any ``torch.optim`` optimizer over the families'
   unconstrained tensors takes a step along ``g``.

Round 0 first runs ``warmup_steps`` extra inner steps (the implicit methods assume ``w ≈ w*``).

Models with buffers (batch norm) work: inner steps update the running statistics; the
hypergradient evaluates ``L_T`` in training mode on copies of the buffers (so its many forward
passes leave them alone) and ``L_V`` in evaluation mode.

The settings come in small groups (:mod:`hypergradients.training.settings`: the hyper step, the
batches, the evaluation, the checkpoints), and everything that is called back during a run is a
:class:`~hypergradients.training.callbacks.Callback`.

Checkpoints (``checkpoint.pt``, written atomically by :func:`hypergradients.training.files.save_atomic`)
hold the model (parameters and buffers), the inner optimizer's state, the
:meth:`HyperOptimizer.state_dict <hypergradients.HyperOptimizer.state_dict>` (hyperparameters, their
optimizer, the solver state, the stochastic families' noise generator, the hyper-step counts) as it
is, every global RNG state, the positions of the data streams, the callbacks' states and the
metrics so far, as tensors and plain Python values only: they are read back with
``weights_only=True``, so a crafted file cannot run code, and an unreadable one raises
:class:`~hypergradients.UnreadableFileError` naming it. :func:`fit` with ``resume=True``
continues bit-for-bit. A non-finite loss, weight, hypergradient or hyperparameter stops the run
with :class:`NonFiniteError` (the round, the tensor's name and the last good checkpoint, which is
never overwritten by a non-finite state).

Away from a minimum the Hessian of a non-convex model can be indefinite: CG then meets negative
curvature, a Neumann series diverges. By default (``on_solver_error="damp"``) that hyper step is
retried, CG on ``H + δI`` with ``δ`` grown as :class:`~hypergradients.Auto` grows it, Neumann
with the safe ``α`` the error carries (halved while it still diverges); each round records what
was used. Hyper steps that are skipped all the same are counted, and :func:`fit` ends with a
:class:`SkippedHyperStepsWarning` giving the count and the reasons.
"""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from ..core import distributed, tree
from ..core.derivatives import HvpMode
from ..core.method import Method
from ..hparams.base import Batch, Family
from ..hparams.objective import Objective, TargetLoss, collect_hparams, cross_entropy, on_targets
from ..paths.tuner import PathHyperparameters, PathTuner
from .callbacks import Callback, MetricsWriter, TensorBoardCallback, _AroundHyperStep, as_callback, has_state
from .files import UnreadableFileError, load_checkpoint, remove_stale_temps, save_atomic
from .hyper import STATE_VERSION as HYPER_STATE_VERSION
from .hyper import HyperOptimizer, HyperStep, NonFiniteError, _mode
from .result import TrainResult
from .settings import (
    INNER_OPTIMIZER,
    PATH_HYPER_OPTIMIZER,
    Batches,
    Checkpoints,
    Evaluation,
    HyperSettings,
    OptimizerFactory,
    Projection,
    SolverPolicy,
)
from .stream import BatchStream

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

PerExampleLoss = TargetLoss
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_VERSION = 3
_READABLE_VERSIONS = (2, 3)  # 2: the hyper step's state copied field by field; upgraded when read

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "Callback",
    "FitKeywords",
    "NonFiniteError",
    "SkippedHyperStepsWarning",
    "TensorBoardCallback",
    "TrainResult",
    "check_checkpoint",
    "cross_entropy",
    "evaluate",
    "fit",
    "read_checkpoint",
]


class SkippedHyperStepsWarning(UserWarning):
    """Some hyper steps of :func:`fit` were skipped (the hyperparameters did not move in those rounds)."""


def evaluate(
    model: nn.Module,
    sets: Mapping[str, tuple[Tensor, Tensor]],
    *,
    loss_fn: TargetLoss = cross_entropy,
    batch_size: int = 4096,
) -> dict[str, float]:
    """``{<set>_loss, <set>_acc}`` of the model in evaluation mode on each named ``(x, y)``."""
    out: dict[str, float] = {}
    with _mode(model, False), torch.no_grad():
        for name, (x, y) in sets.items():
            total, correct = 0.0, 0
            for s in range(0, len(y), batch_size):
                logits = model(x[s : s + batch_size])
                total += float(loss_fn(logits, y[s : s + batch_size]).sum())
                if logits.ndim == 2 and y.dtype == torch.int64:
                    correct += int((logits.argmax(1) == y[s : s + batch_size]).sum())
            out[f"{name}_loss"] = total / len(y)
            out[f"{name}_acc"] = correct / len(y)
    return out


def _rng_state() -> dict[str, Any]:
    # numpy's legacy global state is saved too (user code, augmentations say, may draw from it), but
    # only when numpy is already imported: the trainer needs only torch, and a process that never
    # imported numpy has drawn nothing from it. (torch imports numpy itself when it is installed.)
    # Python's and numpy's states become tensors and plain values (numpy's holds a uint32 ndarray,
    # which weights_only=True would refuse); every value survives the round trip exactly.
    version, internal, gauss = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in st:
        try:
            import numpy as np
        except ImportError:  # saved where numpy was installed: here nothing can draw from it
            pass
        else:
            npy = st["numpy"]
            np.random.set_state(  # noqa: NPY002
                (
                    npy["kind"],
                    npy["keys"].numpy().astype(np.uint32),
                    npy["pos"],
                    npy["has_gauss"],
                    npy["cached_gaussian"],
                )
            )
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


_KEYS = {
    2: (
        "round",
        "skipped",
        "model",
        "hparams",
        "inner_opt",
        "hyper_opt",
        "streams",
        "rng",
        "metrics",
        "elapsed_s",
    ),
    3: ("round", "model", "inner_opt", "hyper", "streams", "rng", "metrics", "elapsed_s"),
}


def _upgrade_v2(st: dict[str, Any]) -> dict[str, Any]:
    """A version-2 checkpoint in version 3's layout: its hyper-step fields as one HyperOptimizer state."""
    hyper = None
    if st["hyper_opt"] is not None:
        hyper = {
            "version": HYPER_STATE_VERSION,
            "hparams": st["hparams"],
            "optimizer": st["hyper_opt"],
            "solver": st.get("solver"),
            "noise": st.get("noise"),
            "steps": int(st["round"]),
            "skipped": int(st["skipped"]),
            "retried": int(st.get("retried", 0)),
            "skip_reasons": st.get("skip_reasons", {}),
        }
    return {
        **{k: st[k] for k in _KEYS[3] if k != "hyper"},
        "version": CHECKPOINT_VERSION,
        "hyper": hyper,
        "path": st.get("path"),
        "callbacks": {},
    }


_FIX = "delete it to start this training over from round 0, or restore it from a copy"


def read_checkpoint(path: str | os.PathLike[str], *, fix: str = _FIX) -> dict[str, Any]:
    """The checkpoint :func:`fit` wrote at ``path``, read with ``weights_only=True``, in the current
    layout (an older readable version is upgraded): ``"round"``, ``"model"`` (the state dict),
    ``"hyper"`` (:meth:`HyperOptimizer.state_dict`, ``None`` without families), ... . Anything else
    raises :class:`~hypergradients.UnreadableFileError` naming the file, with ``fix`` as the advice."""
    return _read_checkpoint(Path(path), fix=fix)


def _read_checkpoint(path: Path, *, fix: str = _FIX) -> dict[str, Any]:
    """The checkpoint at ``path`` in the current layout (an older readable version is upgraded)."""
    st = load_checkpoint(path, fix=fix)
    found = st.get("version") if isinstance(st, dict) else type(st).__name__
    if found not in _READABLE_VERSIONS:
        versions = " or ".join(str(v) for v in _READABLE_VERSIONS)
        why = f"it is not a checkpoint of hypergradients.fit of version {versions} (version {found!r})"
    else:
        assert isinstance(st, dict)
        lacks = [k for k in _KEYS[int(found)] if k not in st]
        if not lacks:
            return _upgrade_v2(st) if found == 2 else st
        why = f"it lacks {lacks}, which a version-{found} checkpoint of hypergradients.fit has"
    raise UnreadableFileError(
        f"cannot read the checkpoint {str(path)!r}: {why}. To continue: {fix}.", path=path, why=why
    )


def check_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Raise the :class:`~hypergradients.UnreadableFileError` that :func:`fit` with ``resume=True``
    would raise for ``checkpoint_dir``'s checkpoint, reading only (nothing written or removed); nothing
    when it reads back or there is none (then :func:`fit` starts afresh). A caller that resumes several
    trainings checks them all first, so that a refusal changes no file."""
    path = Path(checkpoint_dir) / CHECKPOINT
    if path.exists():
        _read_checkpoint(path)


def _first_nonfinite_param(model: nn.Module) -> str | None:
    for k, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return k
    return None


def _stream(n: int, batch_size: int, seed: int) -> BatchStream:
    # A stream of example indices: batches carry their indices (for per-example families).
    idx = torch.arange(n)
    return BatchStream(idx, idx, batch_size, seed=seed)


def _batch(stream: BatchStream, x: Tensor, y: Tensor) -> Batch:
    i, _ = next(stream)
    return Batch(x[i.to(x.device)], y[i.to(y.device)], i)


@dataclass
class _Run:
    """The training state of :func:`fit`: what a checkpoint holds, and the counts of the run so far.

    ``hyper`` (``None`` without hyperparameters) holds the hyperparameters, their optimizer and the
    hyper-step counts; ``streams`` the positions in the data ("train" for inner steps, "hyper" for
    the hyper steps' ``L_T``, "val" for their ``L_V``); ``history`` one metrics record per round;
    ``callbacks`` everything called back, the metrics file first.
    """

    model: nn.Module
    objective: Objective
    inner_opt: torch.optim.Optimizer | None  # None: the path tuner's differentiable optimizer trains
    hyper: HyperOptimizer | None
    streams: dict[str, BatchStream]
    ck_path: Path | None
    callbacks: list[Callback] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    start_round: int = 0
    resumed_from: int | None = None
    last_good: Path | None = None
    elapsed0: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)
    path: PathTuner | None = None  # fit(path_hparams=): optimizer hyperparameters tuned through the path
    data_parallel: bool = False  # fit(data_parallel=True): average the inner gradients over the ranks
    writes: bool = True  # False on the ranks other than 0 under data_parallel

    @property
    def hparams(self) -> dict[str, Tensor]:
        return self.hyper.hparams if self.hyper is not None else {}

    @property
    def skipped(self) -> int:
        return self.hyper.skipped if self.hyper is not None else 0

    @property
    def retried(self) -> int:
        return self.hyper.retried if self.hyper is not None else 0

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def stateful(self) -> dict[str, Callback]:
        """The callbacks whose state the checkpoints hold, by key (two with one key are refused)."""
        out: dict[str, Callback] = {}
        for cb in self.callbacks:
            if has_state(cb):
                if cb.state_key in out:
                    raise ValueError(
                        f"two callbacks with state have the key {cb.state_key!r}: give one of "
                        "them its own state_key (override the property)"
                    )
                out[cb.state_key] = cb
        return out

    def restore(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``."""
        st = _read_checkpoint(path)
        # the checks that need no loading first, so that another setup's checkpoint changes nothing
        saved_hp = st["hyper"]["hparams"] if st["hyper"] is not None else {}
        for k in self.hparams:
            if k not in saved_hp:
                raise KeyError(
                    f"checkpoint {path} has no hyperparameter {k!r}: it was written by another setup"
                )
        if self.path is not None and st.get("path") is None:
            raise KeyError(f"checkpoint {path} has no path hyperparameters: another setup wrote it")
        self.model.load_state_dict(st["model"])
        if self.inner_opt is not None:
            self.inner_opt.load_state_dict(st["inner_opt"])
        if self.path is not None:
            self.path.load_state_dict(st["path"])
        if self.hyper is not None:
            self.hyper.load_state_dict(st["hyper"])
        for k, s in self.streams.items():
            s.load_state_dict(st["streams"][k])
        _set_rng_state(st["rng"])
        saved_cb = st.get("callbacks") or {}
        for key, cb in self.stateful().items():
            if key in saved_cb:  # a callback the checkpoint does not know keeps the state it was built with
                cb.load_state_dict(saved_cb[key])
        self.history, self.start_round = list(st["metrics"]), int(st["round"])
        self.elapsed0, self.resumed_from, self.last_good = float(st["elapsed_s"]), self.start_round, path

    def save(self, r: int) -> bool:
        """Checkpoint after round ``r``, atomically, never over a good one with a non-finite state;
        ``False`` when this run writes none."""
        if self.ck_path is None or not self.writes:  # data-parallel: rank 0 writes, the others agree
            return False
        hp = self.hparams
        bad = _first_nonfinite_param(self.model) or (tree.first_nonfinite(tree.detach(hp)) if hp else None)
        if bad is not None:  # defensive: the checks of each round should have stopped the run already
            raise NonFiniteError(
                f"round {r}: {bad!r} is not finite; not saving over {self.ck_path}",
                round=r,
                name=bad,
                checkpoint=self.last_good,
            )
        save_atomic(
            {
                "version": CHECKPOINT_VERSION,
                "round": r,
                "model": self.model.state_dict(),
                "inner_opt": self.inner_opt.state_dict() if self.inner_opt is not None else None,
                "path": self.path.state_dict() if self.path is not None else None,
                "hyper": self.hyper.state_dict() if self.hyper is not None else None,
                "streams": {k: s.state_dict() for k, s in self.streams.items()},
                "rng": _rng_state(),
                "callbacks": {k: cb.state_dict() for k, cb in self.stateful().items()},
                "metrics": self.history,
                "elapsed_s": self.elapsed(),
            },
            self.ck_path,
        )
        self.last_good = self.ck_path
        return True

    def stop(self, r: int, name: str, what: str) -> NonFiniteError:
        last = self.last_good
        where = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written"
        return NonFiniteError(
            f"round {r}: {what} {name!r} is not finite (NaN or inf){where}. Lower the "
            "learning rates or the hyper learning rate, or check the data.",
            round=r,
            name=name,
            checkpoint=last,
            what=what,
        )


def _inner_steps(run: _Run, train: tuple[Tensor, Tensor], n_steps: int, r: int) -> float:
    """``n_steps`` steps of the inner optimizer on ``L_T(w, λ)``, λ fixed; the mean loss."""
    lam_fixed = tree.detach(run.hparams)
    total = 0.0
    if run.path is not None:
        run.path.begin_round(n_steps)
    for _ in range(n_steps):
        b = _batch(run.streams["train"], *train)
        if run.path is not None:  # the differentiable optimizer; the step's loss kept for the replay
            loss = run.path.step(dict(run.model.named_parameters()), _step_loss(run, lam_fixed, b))
            if not bool(torch.isfinite(loss)):
                raise run.stop(r, "inner_loss", "the training loss")
            total += float(loss)
            continue
        assert run.inner_opt is not None
        run.inner_opt.zero_grad(set_to_none=True)
        loss = run.objective.train(
            dict(run.model.named_parameters()), lam_fixed, b, forward=run.objective.live
        )
        if not bool(torch.isfinite(loss)):
            raise run.stop(r, "inner_loss", "the training loss")
        loss.backward()
        if run.data_parallel:  # DDP's gradient average: all the weights' gradients in one all-reduce
            ps = {k: p for k, p in run.model.named_parameters() if p.grad is not None}
            grads = {k: p.grad for k, p in ps.items() if p.grad is not None}
            with distributed.data_parallel():
                for k, g in distributed.average([grads])[0].items():
                    ps[k].grad = g
        run.inner_opt.step()
        total += float(loss.detach())
    bad = _first_nonfinite_param(run.model)
    if bad is not None:
        raise run.stop(r, bad, "the weight")
    return total / n_steps


def _step_loss(run: _Run, lam: dict[str, Tensor], b: Batch) -> Callable[[Mapping[str, Tensor], bool], Tensor]:
    """``L_T`` of one inner step with its batch and random numbers fixed: the live step uses the
    module's buffers, the replay (``replay=True``) copies of them."""
    noise = run.objective.draw_noise()
    obj = run.objective

    def loss(w: Mapping[str, Tensor], replay: bool) -> Tensor:
        return obj.train(w, lam, b, forward=obj.copy_buffers if replay else obj.live, noise=noise)

    return loss


def _path_step(run: _Run, tuner: PathTuner, val: tuple[Tensor, Tensor], r: int) -> dict[str, float]:
    """The hyper step of the path hyperparameters: truncated unrolled hypergradient, then a step."""
    bv = _batch(run.streams["path"], *val)
    g, out = tuner.hypergradient(lambda w: run.objective.val(w, bv))
    bad = tree.first_nonfinite(tree.detach(g))
    if bad is not None:
        raise run.stop(r, bad, "the path hypergradient of")
    tuner.apply(g)
    bad = tree.first_nonfinite(tree.detach(tuner.values))
    if bad is not None:
        raise run.stop(r, bad, "the path hyperparameter")
    return tuner.metrics(g, out)


def _hyper_step(
    run: _Run, hyper: HyperOptimizer, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], r: int
) -> HyperStep:
    """One hyper step on a fresh training batch (``L_T``) and a validation batch (``L_V``)."""
    bt, bv = _batch(run.streams["hyper"], *train), _batch(run.streams["val"], *val)
    try:
        return hyper.step(bt, bv)
    except NonFiniteError as e:
        raise run.stop(r, e.name, e.what) from e


def _warn_skipped(run: _Run, planned: int, policy: SolverPolicy) -> None:
    if not run.skipped or run.hyper is None:
        return
    why = ", ".join(f"{k}: {v}" for k, v in sorted(run.hyper.skip_reasons.items()))
    warnings.warn(
        f"{run.skipped} of {planned} hyper steps were skipped ({why}); the hyperparameters did not "
        "change in those rounds. The model is far from a minimum of the training loss there "
        "(indefinite Hessian): train longer between hyper steps (inner_steps, warmup_steps)"
        + ("" if policy == "damp" else ", or use on_solver_error='damp'")
        + ".",
        SkippedHyperStepsWarning,
        stacklevel=3,
    )


def _check_args(**ints_with_min: tuple[int, int]) -> None:
    for nm, (v, lo) in ints_with_min.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{nm} must be an integer >= {lo}, got {v!r}")


class FitKeywords(TypedDict, total=False):
    """:func:`fit`'s keywords that give one setting of a group each (or, the last two, callbacks)."""

    method: Method | None
    hyper_optimizer: OptimizerFactory | None
    project: Projection | None
    on_solver_error: SolverPolicy
    warm_start: bool
    hvp_mode: HvpMode
    batch_size: int
    val_batch_size: int | None
    hyper_batch_size: int | None
    seed: int
    eval_sets: Mapping[str, tuple[Tensor, Tensor]] | None
    eval_every: int
    checkpoint_dir: str | os.PathLike[str] | None
    checkpoint_every: int
    resume: bool
    before_hyper_step: Sequence[Callable[[HyperOptimizer], None]]
    after_hyper_step: Sequence[Callable[[HyperOptimizer, HyperStep], None]]


# keyword -> (the group's argument of fit, its field)
_GROUPED: dict[str, tuple[str, str]] = {
    "method": ("hyper", "method"),
    "hyper_optimizer": ("hyper", "optimizer"),
    "project": ("hyper", "project"),
    "on_solver_error": ("hyper", "on_solver_error"),
    "warm_start": ("hyper", "warm_start"),
    "hvp_mode": ("hyper", "hvp_mode"),
    "batch_size": ("batches", "size"),
    "val_batch_size": ("batches", "val_size"),
    "hyper_batch_size": ("batches", "hyper_size"),
    "seed": ("batches", "seed"),
    "eval_sets": ("evaluation", "sets"),
    "eval_every": ("evaluation", "every"),
    "checkpoint_dir": ("checkpoints", "dir"),
    "checkpoint_every": ("checkpoints", "every"),
    "resume": ("checkpoints", "resume"),
}
_GROUP_TYPES: dict[str, type] = {
    "hyper": HyperSettings,
    "batches": Batches,
    "evaluation": Evaluation,
    "checkpoints": Checkpoints,
}


def _grouped(keywords: Mapping[str, Any], groups: Mapping[str, Any]) -> dict[str, Any]:
    """Each group of ``groups`` (``None``: not given) built from the keywords that set its fields."""
    unknown = sorted(set(keywords) - set(_GROUPED) - {"before_hyper_step", "after_hyper_step"})
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    fields: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for kw, v in keywords.items():
        if kw not in _GROUPED or v is None:  # None: that field's default, as it always was
            continue
        g, f = _GROUPED[kw]
        if groups[g] is not None:
            raise ValueError(
                f"give {kw} inside {g}=hg.{_GROUP_TYPES[g].__name__}(..., {f}=...) or as {kw}=, not both"
            )
        fields[g][f] = v
    return {g: given if given is not None else _GROUP_TYPES[g](**fields[g]) for g, given in groups.items()}


def fit(
    model: nn.Module,
    families: Sequence[Family],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    rounds: int,
    inner_steps: int,
    warmup_steps: int = 0,
    inner_optimizer: OptimizerFactory | None = None,
    loss_fn: TargetLoss = cross_entropy,
    hyper: HyperSettings | None = None,
    batches: Batches | None = None,
    evaluation: Evaluation | None = None,
    checkpoints: Checkpoints | None = None,
    callbacks: Sequence[Callback | Callable[[dict[str, Any]], None]] = (),
    path_hparams: PathHyperparameters | None = None,
    data_parallel: bool = False,
    **keywords: Unpack[FitKeywords],
) -> TrainResult:
    """Train ``model`` and tune the ``families``' hyperparameters by Algorithm 1.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to per-example predictions.
        families: hyperparameter families (:mod:`hypergradients.hparams`); empty = plain training.
        train, val: ``(x, y)`` tensors; ``L_T`` uses the first, ``L_V`` the second.
        rounds: number of rounds (each ``inner_steps`` inner steps then one hyper step).
        inner_steps: inner optimizer steps per round; ``warmup_steps`` more before the first round.
        inner_optimizer: ``factory(list_of_weights) -> torch.optim.Optimizer`` (default Adam, 1e-3).
            The hyper step reads it (never steps it) for ``hg.Identity(precondition="inner_optimizer")``:
            Adam's or AdamW's diagonal at each hyper step (:func:`~hypergradients.adam_diagonal`).
        loss_fn: per-example loss ``(predictions, y) -> (B,)`` (default cross-entropy): the loss
            contract's form that reads only the targets (:mod:`hypergradients.hparams.objective`).
        hyper: the hyper step, a :class:`~hypergradients.HyperSettings`: ``method`` (default
            ``Neumann(iters=20, alpha="auto")``), ``optimizer`` (default Adam, 1e-2), ``project``,
            ``on_solver_error`` (default ``"damp"``), ``warm_start`` (default ``True``), ``residual``
            (default ``False``: the ``residual`` metric is ``None`` for Neumann, Identity, Nyström),
            ``hvp_mode`` (default ``"reverse"``; ``"finite-difference"`` for a model without a double
            backward, such as attention through ``scaled_dot_product_attention`` on the CPU): as in
            :class:`~hypergradients.HyperOptimizer`, which ``fit`` builds with them. Why these
            defaults: :mod:`hypergradients.training.settings`.
        batches: a :class:`~hypergradients.Batches`: ``size`` (default 128) for the inner steps and
            the hypergradient's HVPs unless ``hyper_size``; ``val_size`` the validation batch
            (default: all of ``val``); ``seed`` (default 0) the data order of the three streams
            (train, hyper-train, validation).
        evaluation: an :class:`~hypergradients.Evaluation`: named ``(x, y)`` ``sets`` evaluated
            (loss, accuracy) every ``every`` rounds (default 1) and at the end.
        checkpoints: a :class:`~hypergradients.Checkpoints`: ``dir``, where ``checkpoint.pt`` and
            ``metrics.jsonl`` go (default ``None``: nowhere; temp files that a killed write left
            there are removed at the start), every ``every`` rounds (default 10) and after the last;
            ``resume`` (default ``False``): continue from ``dir/checkpoint.pt`` when it exists.
        callbacks: :class:`~hypergradients.Callback` objects (their hooks run in the order of
            :mod:`hypergradients.training.callbacks`; their states are saved in the checkpoints), or
            plain functions called with each round's metrics record (a dict).
        path_hparams: optimizer hyperparameters (learning rate, momentum, betas, a learning-rate
            schedule) tuned through the training path (:class:`~hypergradients.PathHyperparameters`).
            Their ``optimizer`` (:mod:`hypergradients.optim`) then trains the model instead of
            ``inner_optimizer`` (give one or the other). After each round's inner steps, the last
            ``T = path_hparams.steps`` of them are replayed differentiably from the saved weights and
            optimizer state on the same batches, ``dL_V/d(values)`` (on a validation batch of its own
            stream) is taken in reverse mode and a hyper step applied (default optimizer Adam, 1e-3);
            then the families' hyper step runs by ``method`` as usual. Two methods because the two
            kinds differ: the families' hyperparameters shape ``w*`` (implicit differentiation at
            ``w ≈ w*`` is cheap and horizon-free), the optimizer's only the path to it (their
            implicit hypergradient is zero; the unrolled one over the last T steps is the truncated
            estimate, Shaban et al. 2019). Recorded per round as ``path.<key>`` (a schedule: its
            mean), ``path_outer_loss`` and ``path_hypergrad_norm``; saved in the checkpoints
            (resumes bit for bit).
        data_parallel: under ``torch.distributed`` (torchrun, :mod:`hypergradients.distributed`):
            each rank passes its own equal-size shard of ``train`` and ``val``; the weights and
            hyperparameters are broadcast from rank 0 at the start, each inner step's gradient is
            averaged over the ranks (one all-reduce, DDP's average), each hyper step is the group-mean
            hypergradient, so every rank holds the same weights and hyperparameters. Only rank 0
            writes the checkpoints; a resume reads them on every rank (a shared folder across
            machines) and needs the same number of ranks. The metrics are rank 0's (its shard's
            losses). Not with ``path_hparams``.
        **keywords: each one field of one group, equivalent to giving the group
            (:class:`FitKeywords`; one or the other for a group, not both):

            =========================================  =========================================
            keyword                                    is
            =========================================  =========================================
            ``method``, ``hyper_optimizer``,           ``hyper=HyperSettings(method=...,
            ``project``, ``on_solver_error``,          optimizer=..., project=...,
            ``warm_start``, ``hvp_mode``               on_solver_error=..., warm_start=...,
                                                       hvp_mode=...)``
            ``batch_size``, ``val_batch_size``,        ``batches=Batches(size=..., val_size=...,
            ``hyper_batch_size``, ``seed``             hyper_size=..., seed=...)``
            ``eval_sets``, ``eval_every``              ``evaluation=Evaluation(sets=..., every=...)``
            ``checkpoint_dir``, ``checkpoint_every``,  ``checkpoints=Checkpoints(dir=...,
            ``resume``                                 every=..., resume=...)``
            ``before_hyper_step=[f(hyper)]``,          a callback whose ``on_before_hyper_step``
            ``after_hyper_step=[f(hyper, result)]``    and ``on_hyper_step`` call them
            =========================================  =========================================

            A keyword given as ``None`` means that field's default.

    Raises:
        NonFiniteError: a non-finite loss, weight, hypergradient or hyperparameter (names it).
        UnreadableFileError: ``resume=True`` and the checkpoint cannot be read (names it; nothing deleted).
    """
    _check_args(rounds=(rounds, 0), inner_steps=(inner_steps, 1), warmup_steps=(warmup_steps, 0))
    g = _grouped(
        keywords, {"hyper": hyper, "batches": batches, "evaluation": evaluation, "checkpoints": checkpoints}
    )
    hs: HyperSettings = g["hyper"]
    bs: Batches = g["batches"]
    ev: Evaluation = g["evaluation"]
    cks: Checkpoints = g["checkpoints"]
    cbs = [as_callback(cb) for cb in callbacks]
    before, after = keywords.get("before_hyper_step", ()), keywords.get("after_hyper_step", ())
    if before or after:
        cbs.append(_AroundHyperStep(before, after))
    t_start = time.perf_counter()
    if path_hparams is not None and inner_optimizer is not None:
        raise ValueError(
            "give inner_optimizer or path_hparams, not both: with path_hparams its optimizer "
            "(hg.optim) trains the model, so the path that is differentiated is the one trained"
        )
    if data_parallel and path_hparams is not None:
        raise ValueError(
            "fit(data_parallel=True) does not support path_hparams yet (the replayed path would "
            "need the averaged step gradients): tune them in one process, or drop data_parallel"
        )
    if data_parallel:  # every rank starts from rank 0's weights (as DDP does)
        with distributed.data_parallel():  # refuses without an initialised process group
            pass
        distributed.broadcast({k: t for k, t in model.state_dict().items() if t.is_floating_point()})
    inner_opt = (
        (inner_optimizer or INNER_OPTIMIZER)([p for p in model.parameters() if p.requires_grad])
        if path_hparams is None
        else None
    )
    batch_loss = on_targets(loss_fn)
    hyper_opt = (
        HyperOptimizer(
            model,
            families,
            settings=hs,
            loss_fn=batch_loss,
            before_step=[cb.on_before_hyper_step for cb in cbs],
            after_step=[cb.on_hyper_step for cb in cbs],
            data_parallel=data_parallel,
            inner_optimizer=inner_opt,
        )
        if collect_hparams(families)
        else None
    )
    n_train, n_val = len(train[1]), len(val[1])
    ckdir = Path(cks.dir) if cks.dir is not None else None
    writes = not data_parallel or distributed.is_main()
    if ckdir is not None and writes:
        cbs.insert(0, MetricsWriter(ckdir / METRICS))  # the file is written before the others see a round
    objective = hyper_opt.objective if hyper_opt is not None else Objective(model, families, batch_loss)
    run = _Run(
        model,
        objective,
        inner_opt,
        hyper_opt,
        {
            "train": _stream(n_train, bs.size, bs.seed),
            "hyper": _stream(n_train, bs.hyper_size or bs.size, bs.seed + 1),
            "val": _stream(n_val, bs.val_size or n_val, bs.seed + 2),
        },
        ckdir / CHECKPOINT if ckdir is not None else None,
        callbacks=cbs,
        t_start=t_start,
        data_parallel=data_parallel,
        writes=writes,
    )
    run.stateful()  # two callbacks with state under one key are refused before anything is written
    if path_hparams is not None:
        run.path = PathTuner(
            path_hparams, dict(model.named_parameters()), hyper_optimizer=PATH_HYPER_OPTIMIZER
        )
        run.streams["path"] = _stream(n_val, bs.val_size or n_val, bs.seed + 3)
    if ckdir is not None:
        if run.writes:
            ckdir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(ckdir)  # a kill during a checkpoint write leaves its temp file behind
        if cks.resume and (ckdir / CHECKPOINT).exists():
            run.restore(ckdir / CHECKPOINT)
    for cb in cbs:
        cb.on_fit_start(run.history)
    for r in range(run.start_round + 1, rounds + 1):  # r: this round, counted from 1
        n_steps = inner_steps + (warmup_steps if r == 1 else 0)
        rec: dict[str, Any] = {
            "round": r,
            "inner_loss": _inner_steps(run, train, n_steps, r),
            "inner_steps": r * inner_steps + warmup_steps,
        }
        if run.path is not None:  # first: its replay uses the families' λ of these inner steps
            rec.update(_path_step(run, run.path, val, r))
        if hyper_opt is not None:
            rec.update(_hyper_step(run, hyper_opt, train, val, r).metrics())
        for fam in families:
            rec.update(fam.summary())
        if ev.sets and (r % ev.every == 0 or r == rounds):
            rec.update(evaluate(model, ev.sets, loss_fn=loss_fn))
        rec.update(skipped=run.skipped, retried=run.retried, time_s=run.elapsed())
        run.history.append(rec)
        for cb in cbs:
            cb.on_round_end(rec)
        if (r % cks.every == 0 or r == rounds) and run.save(r):
            assert run.ck_path is not None
            for cb in cbs:
                cb.on_checkpoint(run.ck_path, r)
    if data_parallel:  # no rank returns before rank 0's last checkpoint is on disk (a resume reads it)
        distributed.barrier()
    planned = len(run.history) if hyper_opt is not None else 0
    _warn_skipped(run, planned, hs.on_solver_error)
    nat: dict[str, Tensor] = {}
    for fam in families:
        nat.update(fam.natural())
    ck = run.ck_path
    result = TrainResult(
        metrics=run.history,
        final=dict(run.history[-1]) if run.history else {},
        rounds=rounds,
        hyperparameters=sum(t.numel() for t in run.hparams.values()),
        skipped_hyper_steps=run.skipped,
        wall_s=run.elapsed(),
        resumed_from=run.resumed_from,
        checkpoint=ck if ck is not None and ck.exists() else None,
        natural=nat,
        hyper_steps=planned - run.skipped,
        retried_hyper_steps=run.retried,
        skip_reasons=dict(hyper_opt.skip_reasons) if hyper_opt is not None else {},
    )
    for cb in cbs:
        cb.on_fit_end(result)
    return result
