"""Algorithm 1 of Lorraine, Vicol & Duvenaud (2020): alternate inner steps and hyper steps.

One *round* is

1. ``inner_steps`` steps of any ``torch.optim`` optimizer on training batches of
   ``L_T(w, λ) = reduce(loss(model_w(x), y)) + Σ_families penalty(w, λ)`` with λ fixed
   (the optimizer and its state persist across rounds: warm-started, never reset);
2. one hyper step: ``g = hypergradient(L_V, L_T, w, λ, method)`` — stochastic, as in the paper:
   a fresh *training* batch defines ``L_T`` (so the Hessian-vector products), a *validation* batch
   defines ``L_V`` and ``∂L_V/∂w`` — then any ``torch.optim`` optimizer over the families'
   unconstrained tensors takes a step along ``g``.

Round 0 first runs ``warmup_steps`` extra inner steps (the implicit methods assume ``w ≈ w*``).

Models with buffers (batch norm) work: inner steps update the running statistics; the
hypergradient evaluates ``L_T`` in training mode on copies of the buffers (so its many forward
passes leave them alone) and ``L_V`` in evaluation mode.

Checkpoints (``checkpoint.pt``, written atomically by :func:`hypergradients.files.save_atomic`)
hold the model (parameters and buffers), the hyperparameters, both optimizer states, every RNG
state, the positions of the data streams and the metrics so far, as tensors and plain Python
values only: they are read back with ``weights_only=True``, so a crafted file cannot run code, and
an unreadable one raises :class:`~hypergradients.files.UnreadableFileError` naming it. :func:`fit`
with ``resume=True`` continues bit-for-bit. A non-finite loss, weight, hypergradient or
hyperparameter stops the run with :class:`NonFiniteError` (the round, the tensor's name and the
last good checkpoint, which is never overwritten by a non-finite state).

Away from a minimum the Hessian of a non-convex model can be indefinite: CG then meets negative
curvature, a Neumann series diverges. By default (``on_solver_error="damp"``) that hyper step is
retried, CG on ``H + δI`` with ``δ`` grown as :class:`~hypergradients.methods.Auto` grows it, Neumann
with the safe ``α`` the error carries (halved while it still diverges); each round records what
was used. Hyper steps that are skipped all the same are counted, and :func:`fit` ends with a
:class:`SkippedHyperStepsWarning` giving the count and the reasons.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import tree
from .data import BatchStream
from .errors import HypergradientError, NegativeCurvatureError, NeumannDivergenceError
from .files import UnreadableFileError, json_dumps, load_checkpoint, remove_stale_temps, write_atomic
from .files import save_atomic as save_atomic  # re-exported: users and older code import it from here
from .hparams.base import Batch, Family, Forward
from .methods import CG, Info, Method, Neumann, hypergradient
from .modules import functional_model

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
SolverPolicy = Literal["damp", "skip", "raise"]
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_VERSION = 2   # 2: RNG states as tensors and plain values (loadable with weights_only=True)
_MAX_RETRIES = 30        # damped CG retries per hyper step (hg.Auto allows 40 doublings)
_MAX_ALPHA_RETRIES = 8   # Neumann retries per hyper step, α halved each time


class SkippedHyperStepsWarning(UserWarning):
    """Some hyper steps of :func:`fit` were skipped (the hyperparameters did not move in those rounds)."""


class NonFiniteError(RuntimeError):
    """A loss, weight or hypergradient became NaN/inf; the last good checkpoint is kept."""

    def __init__(self, message: str, *, round: int, name: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.round = round
        self.name = name
        self.checkpoint = checkpoint


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (the default loss): ``−log softmax(logits)[y]``."""
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class TrainResult:
    """What :func:`fit` returns: one metrics record per round, the final one, and run facts.

    ``hyper_steps`` counts the hyper steps that changed the hyperparameters, ``skipped_hyper_steps``
    those that did not (``skip_reasons``: how many for each reason), ``retried_hyper_steps`` those
    that took effect only after a damped retry (``on_solver_error="damp"``).
    """

    metrics: list[dict[str, Any]]
    final: dict[str, Any]
    rounds: int
    hyperparameters: int
    skipped_hyper_steps: int
    wall_s: float
    resumed_from: int | None = None
    checkpoint: Path | None = None
    natural: dict[str, Tensor] = field(default_factory=dict)
    hyper_steps: int = 0
    retried_hyper_steps: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


def evaluate(model: nn.Module, sets: Mapping[str, tuple[Tensor, Tensor]], *,
             loss_fn: PerExampleLoss = cross_entropy, batch_size: int = 4096) -> dict[str, float]:
    """``{<set>_loss, <set>_acc}`` of the model in evaluation mode on each named ``(x, y)``."""
    out: dict[str, float] = {}
    with _mode(model, False), torch.no_grad():
        for name, (x, y) in sets.items():
            total, correct = 0.0, 0
            for s in range(0, len(y), batch_size):
                logits = model(x[s:s + batch_size])
                total += float(loss_fn(logits, y[s:s + batch_size]).sum())
                if logits.ndim == 2 and y.dtype == torch.int64:
                    correct += int((logits.argmax(1) == y[s:s + batch_size]).sum())
            out[f"{name}_loss"] = total / len(y)
            out[f"{name}_acc"] = correct / len(y)
    return out


def _rng_state() -> dict[str, Any]:
    # numpy's legacy global state is saved too: user code (augmentations) may draw from it. Both the
    # Python and the numpy state become tensors and plain values (numpy's holds a uint32 ndarray,
    # which weights_only=True would refuse); every value survives the round trip exactly.
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = st["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],  # noqa: NPY002
                         npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _write_metrics(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    write_atomic(path, "".join(json_dumps(r) + "\n" for r in records))


_CHECKPOINT_KEYS = ("round", "skipped", "model", "hparams", "inner_opt", "hyper_opt", "streams", "rng",
                    "metrics", "elapsed_s")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    fix = "delete it to start this training over from round 0, or restore it from a copy"
    st = load_checkpoint(path, fix=fix)
    if not isinstance(st, dict) or st.get("version") != CHECKPOINT_VERSION or \
            any(k not in st for k in _CHECKPOINT_KEYS):
        found = st.get("version") if isinstance(st, dict) else type(st).__name__
        why = (f"it is not a version-{CHECKPOINT_VERSION} checkpoint of hypergradients.train.fit "
               f"(version {found!r})")
        raise UnreadableFileError(f"cannot read the checkpoint {str(path)!r}: {why}. To continue: {fix}.",
                                  path=path, why=why)
    return st


def _skip_reason(e: HypergradientError, method: Method) -> str:
    # A fixed phrase per cause (the messages carry numbers), so that skips can be counted by reason.
    if isinstance(e, NeumannDivergenceError):
        return "Neumann series diverged"
    return f"{type(method).__name__} met negative curvature"


def _solve_with_retries(call: Callable[[Method], tuple[dict[str, Tensor], Info]], method: Method,
                        policy: SolverPolicy) -> tuple[dict[str, Tensor], Info, dict[str, Any]]:
    """``call(method)``; on a solver failure with ``policy="damp"``, retries with a safer method.

    Returns the hypergradient, its info and what the retry used (empty if none), or raises the
    last failure (the caller skips that hyper step or re-raises it).
    """
    try:
        return (*call(method), {})
    except (NeumannDivergenceError, NegativeCurvatureError) as e:
        if policy != "damp":
            raise
        err: HypergradientError = e
    damping, alpha = 0.0, None
    for _ in range(_MAX_RETRIES):
        if isinstance(err, NegativeCurvatureError) and isinstance(method, CG):
            # As hg.Auto does: δ from twice the curvature found, grown until CG runs through
            # (a Rayleigh quotient under-estimates |λ_min|), a Levenberg-style step.
            curv = abs(err.curvature) if math.isfinite(err.curvature) else 0.0
            damping = 2.0 * (damping + curv) or 1e-8
            retry: Method = CG(iters=method.iters, tol=method.tol, damping=method.damping + damping)
            used: dict[str, Any] = {"solver_retry": "damping", "solver_damping": method.damping + damping}
        elif isinstance(err, NeumannDivergenceError) and isinstance(method, Neumann) and \
                math.isfinite(err.safe_alpha) and err.safe_alpha > 0:
            # The error's safe α = 1/λ_max first; if even that diverges (negative curvature), halve it:
            # the growth (1 + α|λ_min|)^K of the series shrinks with α.
            if alpha is None:
                first = err.safe_alpha if method.alpha == "auto" else float(method.alpha)
                alpha = err.safe_alpha if first > err.safe_alpha else first / 2
            elif alpha <= err.safe_alpha / 2 ** _MAX_ALPHA_RETRIES:
                raise err
            else:
                alpha = min(err.safe_alpha, alpha / 2)
            retry = Neumann(iters=method.iters, alpha=alpha, power_iters=method.power_iters,
                            max_growth=method.max_growth)
            used = {"solver_retry": "alpha", "solver_alpha": alpha}
        else:
            raise err   # no safer variant of this method: the caller skips the step
        try:
            return (*call(retry), used)
        except (NeumannDivergenceError, NegativeCurvatureError) as e:
            err = e
    raise err


def _first_nonfinite_param(model: nn.Module) -> str | None:
    for k, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return k
    return None


class _Losses:
    """Builds ``L_T`` and ``L_V`` for one batch each, through the families' hooks."""

    def __init__(self, model: nn.Module, families: Sequence[Family], loss_fn: PerExampleLoss) -> None:
        self.model = model
        self.families = families
        self.loss_fn = loss_fn
        self.copy_buffers = functional_model(model)   # buffers copied per call: for the hypergradient

        def live(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
            # Parameters substituted, buffers the module's own: batch norm's running statistics
            # are updated by inner steps, as in ordinary training.
            out: Tensor = torch.func.functional_call(model, dict(params), (x,))
            return out

        self.live: Forward = live

    def train(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], batch: Batch, *,
              forward: Forward) -> Tensor:
        for fam in self.families:
            batch = fam.batch(batch, hparams)
            forward = fam.forward(forward, hparams)
        with _mode(self.model, True):
            losses = self.loss_fn(forward(params, batch.x), batch.y)
        loss: Tensor | None = None
        for fam in self.families:
            r = fam.reduce(losses, batch, hparams)
            if r is not None:
                loss = r
        loss = losses.mean() if loss is None else loss
        for fam in self.families:
            pen = fam.penalty(params, hparams)
            if pen is not None:
                loss = loss + pen
        return loss

    def val(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        with _mode(self.model, False):
            return self.loss_fn(self.copy_buffers(params, batch.x), batch.y).mean()


def _stream(n: int, batch_size: int, seed: int) -> BatchStream:
    # A stream of example indices: batches carry their indices (for per-example families).
    idx = torch.arange(n)
    return BatchStream(idx, idx, batch_size, seed=seed)


def _batch(stream: BatchStream, x: Tensor, y: Tensor) -> Batch:
    i, _ = next(stream)
    return Batch(x[i.to(x.device)], y[i.to(y.device)], i)


def fit(model: nn.Module, families: Sequence[Family], train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor], *, rounds: int, inner_steps: int, warmup_steps: int = 0,
        inner_optimizer: OptimizerFactory | None = None, hyper_optimizer: OptimizerFactory | None = None,
        method: Method | None = None, loss_fn: PerExampleLoss = cross_entropy, batch_size: int = 128,
        val_batch_size: int | None = None, hyper_batch_size: int | None = None, seed: int = 0,
        eval_sets: Mapping[str, tuple[Tensor, Tensor]] | None = None, eval_every: int = 1,
        callbacks: Sequence[Callback] = (), checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 10, resume: bool = False,
        on_solver_error: SolverPolicy = "damp") -> TrainResult:
    """Train ``model`` and tune the ``families``' hyperparameters by Algorithm 1.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to per-example predictions.
        families: hyperparameter families (:mod:`hypergradients.hparams`); empty = plain training.
        train, val: ``(x, y)`` tensors; ``L_T`` uses the first, ``L_V`` the second.
        rounds: number of rounds (each ``inner_steps`` inner steps then one hyper step).
        inner_steps: inner optimizer steps per round; ``warmup_steps`` more before the first round.
        inner_optimizer: ``factory(list_of_weights) -> torch.optim.Optimizer`` (default Adam, 1e-3).
        hyper_optimizer: ``factory(list_of_hyperparameters) -> Optimizer`` (default Adam, 1e-2).
        method: the hypergradient method (default ``Neumann(iters=20, alpha="auto")``).
        loss_fn: per-example loss ``(predictions, y) -> (B,)`` (default cross-entropy).
        batch_size: training batch size (inner steps and the hypergradient's HVPs unless
            ``hyper_batch_size``); ``val_batch_size`` the validation batch (default: all of ``val``).
        seed: seeds the data order of the three streams (train, hyper-train, validation).
        eval_sets: named ``(x, y)`` evaluated (loss, accuracy) every ``eval_every`` rounds and at the end.
        callbacks: called with each round's metrics record (a dict).
        checkpoint_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (``None``: nowhere); temp
            files that a killed write left there are removed at the start.
        checkpoint_every: rounds between checkpoints (and after the last round).
        resume: continue from ``checkpoint_dir/checkpoint.pt`` when it exists.
        on_solver_error: what a Neumann divergence or CG negative curvature (a non-convex model
            far from a minimum) does: ``"damp"`` retries that hyper step with CG on ``H + δI`` (δ grown
            until CG runs through) or Neumann with a safe ``α`` (recorded per round as
            ``solver_retry`` and ``solver_damping``/``solver_alpha``) and skips it only if that fails
            too; ``"skip"`` skips it; ``"raise"`` raises the solver's error. Skipped steps leave the
            hyperparameters unchanged, are counted (``skipped``, ``skip_reason`` per round) and end
            the run with a :class:`SkippedHyperStepsWarning`.

    Raises:
        NonFiniteError: a non-finite loss, weight, hypergradient or hyperparameter (names it).
        UnreadableFileError: ``resume=True`` and the checkpoint cannot be read (names it; nothing deleted).
    """
    for nm, v, lo in (("rounds", rounds, 0), ("inner_steps", inner_steps, 1),
                      ("warmup_steps", warmup_steps, 0), ("batch_size", batch_size, 1),
                      ("eval_every", eval_every, 1), ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{nm} must be an integer >= {lo}, got {v!r}")
    if on_solver_error not in ("damp", "skip", "raise"):
        raise ValueError(f"on_solver_error must be 'damp', 'skip' or 'raise', got {on_solver_error!r}")
    t_start = time.perf_counter()
    method = Neumann(iters=20, alpha="auto") if method is None else method
    weights: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    inner_opt = (inner_optimizer or (lambda ps: torch.optim.Adam(ps, lr=1e-3)))(weights)
    hp: dict[str, Tensor] = {}
    for fam in families:
        for k, t in fam.tensors().items():
            if k in hp:
                raise ValueError(f"hyperparameter key {k!r} is used by two families: "
                                 "give them distinct names")
            hp[k] = t
    hyper_factory = hyper_optimizer or (lambda ps: torch.optim.Adam(ps, lr=1e-2))
    hyper_opt = hyper_factory(list(hp.values())) if hp else None
    losses = _Losses(model, families, loss_fn)
    n_val = len(val[1])
    streams = {"train": _stream(len(train[1]), batch_size, seed),
               "hyper": _stream(len(train[1]), hyper_batch_size or batch_size, seed + 1),
               "val": _stream(n_val, val_batch_size or n_val, seed + 2)}
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ck_path = ckdir / CHECKPOINT if ckdir is not None else None
    history: list[dict[str, Any]] = []
    start_round, skipped, retried, resumed_from, elapsed0 = 0, 0, 0, None, 0.0
    reasons: Counter[str] = Counter()
    last_good: Path | None = None
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(ckdir)   # a kill during a checkpoint write leaves its temp file behind
    if resume and ck_path is not None and ck_path.exists():
        st = _read_checkpoint(ck_path)
        model.load_state_dict(st["model"])
        with torch.no_grad():
            for k, t in hp.items():
                if k not in st["hparams"]:
                    raise KeyError(f"checkpoint {ck_path} has no hyperparameter {k!r}: "
                                   "it was written by another setup")
                t.copy_(st["hparams"][k])
        inner_opt.load_state_dict(st["inner_opt"])
        if hyper_opt is not None:
            hyper_opt.load_state_dict(st["hyper_opt"])
        for k, s in streams.items():
            s.load_state_dict(st["streams"][k])
        _set_rng_state(st["rng"])
        history, start_round, skipped = list(st["metrics"]), int(st["round"]), int(st["skipped"])
        retried = int(st.get("retried", 0))
        reasons.update({str(k): int(v) for k, v in st.get("skip_reasons", {}).items()})
        elapsed0 = float(st["elapsed_s"])
        resumed_from = start_round
        last_good = ck_path
        if ckdir is not None:
            _write_metrics(ckdir / METRICS, history)   # drop the lines written after that checkpoint

    def checkpoint(r: int) -> None:
        nonlocal last_good
        if ck_path is None:
            return
        bad = _first_nonfinite_param(model) or (tree.first_nonfinite(tree.detach(hp)) if hp else None)
        if bad is not None:   # defensive: the checks below should have stopped the run already
            raise NonFiniteError(f"round {r}: {bad!r} is not finite; not saving over {ck_path}",
                                 round=r, name=bad, checkpoint=last_good)
        save_atomic({"version": CHECKPOINT_VERSION, "round": r, "skipped": skipped, "retried": retried,
                     "skip_reasons": dict(reasons), "model": model.state_dict(),
                     "hparams": {k: t.detach().clone() for k, t in hp.items()},
                     "inner_opt": inner_opt.state_dict(),
                     "hyper_opt": hyper_opt.state_dict() if hyper_opt is not None else None,
                     "streams": {k: s.state_dict() for k, s in streams.items()}, "rng": _rng_state(),
                     "metrics": history, "elapsed_s": elapsed0 + time.perf_counter() - t_start}, ck_path)
        last_good = ck_path

    def stop(r: int, name: str, what: str) -> NonFiniteError:
        where = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written"
        return NonFiniteError(f"round {r}: {what} {name!r} is not finite (NaN or inf){where}. Lower the "
                              "learning rates or the hyper learning rate, or check the data.",
                              round=r, name=name, checkpoint=last_good)

    if ckdir is not None and resumed_from is None:
        write_atomic(ckdir / METRICS, "")   # a fresh run starts a fresh metrics file
    metrics_f = open(ckdir / METRICS, "a") if ckdir is not None else None
    try:
        for r in range(start_round, rounds):
            rec: dict[str, Any] = {"round": r + 1}
            lam_fixed = tree.detach(hp)
            train_sum, n_steps = 0.0, inner_steps + (warmup_steps if r == 0 else 0)
            for _ in range(n_steps):
                b = _batch(streams["train"], *train)
                inner_opt.zero_grad(set_to_none=True)
                loss = losses.train(dict(model.named_parameters()), lam_fixed, b, forward=losses.live)
                if not bool(torch.isfinite(loss)):
                    raise stop(r + 1, "inner_loss", "the training loss")
                loss.backward()
                inner_opt.step()
                train_sum += float(loss.detach())
            bad = _first_nonfinite_param(model)
            if bad is not None:
                raise stop(r + 1, bad, "the weight")
            rec["inner_loss"] = train_sum / n_steps   # mean over the round's batches, penalties included
            rec["inner_steps"] = (r + 1) * inner_steps + warmup_steps
            if hyper_opt is not None:
                bt, bv = _batch(streams["hyper"], *train), _batch(streams["val"], *val)
                w = tree.detach(dict(model.named_parameters()))

                def call(m: Method, bt: Batch = bt, bv: Batch = bv, w: dict[str, Tensor] = w,
                         lam: dict[str, Tensor] = lam_fixed) -> tuple[dict[str, Tensor], Info]:
                    return hypergradient(
                        lambda p, h: losses.val(p, bv),
                        lambda p, h: losses.train(p, h, bt, forward=losses.copy_buffers),
                        w, lam, method=m, return_info=True)

                try:
                    g, info, used = _solve_with_retries(call, method, on_solver_error)
                except (NeumannDivergenceError, NegativeCurvatureError) as e:
                    if on_solver_error == "raise":
                        raise
                    skipped += 1
                    rec["skip_reason"] = _skip_reason(e, method)
                    reasons[rec["skip_reason"]] += 1
                except HypergradientError as e:
                    msg = str(e)
                    if "is not finite" in msg and "'" in msg:   # the hypergradient of one key
                        raise stop(r + 1, msg.split("'")[1], "the hypergradient of") from e
                    if "non-finite" in msg:   # a loss on the hyper step's batches
                        raise stop(r + 1, "val_loss" if msg.startswith("outer_loss") else "inner_loss",
                                   "on the hyper step's batch, the loss") from e
                    raise
                else:
                    # Only now is any hyperparameter changed: a bad hypergradient leaves λ as it was.
                    rec.update(hyper_val_loss=info.outer_loss, hypergrad_norm=float(tree.norm(g)),
                               hvps=info.hvps,
                               residual=info.residual if info.residual is not None else float("nan"))
                    rec.update({f"solver_{k}": v for k, v in info.extra.items()})
                    if used:
                        retried += 1
                        rec.update(used)
                    hyper_opt.zero_grad(set_to_none=True)
                    for k, t in hp.items():
                        t.grad = g[k]
                    hyper_opt.step()
                    bad_h = tree.first_nonfinite(tree.detach(hp))
                    if bad_h is not None:
                        raise stop(r + 1, bad_h, "the hyperparameter")
            for fam in families:
                rec.update(fam.summary())
            if eval_sets and ((r + 1) % eval_every == 0 or r + 1 == rounds):
                rec.update(evaluate(model, eval_sets, loss_fn=loss_fn))
            rec["skipped"] = skipped
            rec["retried"] = retried
            rec["time_s"] = elapsed0 + time.perf_counter() - t_start
            history.append(rec)
            if metrics_f is not None:
                metrics_f.write(json_dumps(rec) + "\n")
                metrics_f.flush()
            for cb in callbacks:
                cb(rec)
            if (r + 1) % checkpoint_every == 0 or r + 1 == rounds:
                checkpoint(r + 1)
    finally:
        if metrics_f is not None:
            metrics_f.close()
    final = dict(history[-1]) if history else {}
    nat: dict[str, Tensor] = {}
    for fam in families:
        nat.update(fam.natural())
    planned = len(history) if hyper_opt is not None else 0
    if skipped:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        warnings.warn(f"{skipped} of {planned} hyper steps were skipped ({why}); the hyperparameters did not "
                      "change in those rounds. The model is far from a minimum of the training loss there "
                      "(indefinite Hessian): train longer between hyper steps (inner_steps, warmup_steps)"
                      + ("" if on_solver_error == "damp" else ", or use on_solver_error='damp'") + ".",
                      SkippedHyperStepsWarning, stacklevel=2)
    return TrainResult(metrics=history, final=final, rounds=rounds,
                       hyperparameters=sum(t.numel() for t in hp.values()), skipped_hyper_steps=skipped,
                       wall_s=elapsed0 + time.perf_counter() - t_start, resumed_from=resumed_from,
                       checkpoint=ck_path if ck_path is not None and ck_path.exists() else None, natural=nat,
                       hyper_steps=planned - skipped, retried_hyper_steps=retried, skip_reasons=dict(reasons))


class TensorBoardCallback:
    """Writes each round's numeric metrics to TensorBoard (``pip install 'hypergradients[tensorboard]'``)."""

    def __init__(self, logdir: str | os.PathLike[str], *, prefix: str = "") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional extra
            raise ImportError("TensorBoard logging needs the tensorboard package: "
                              "pip install 'hypergradients[tensorboard]' (or drop --tensorboard)") from e
        self.writer = SummaryWriter(str(logdir))
        self.prefix = prefix

    def __call__(self, rec: dict[str, Any]) -> None:
        step = int(rec["round"])
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
                self.writer.add_scalar(f"{self.prefix}{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
