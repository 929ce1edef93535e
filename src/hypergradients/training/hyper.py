"""The hyper step of Algorithm 1 (Lorraine, Vicol & Duvenaud 2020) for any training loop.

Create one :class:`HyperOptimizer` next to the model's own optimizer and call
:meth:`HyperOptimizer.step` every ``N`` inner steps::

    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model)])
    for i, batch in enumerate(train_batches):
        opt.zero_grad()
        hyper.train_loss(batch).backward()     # L_T(w, λ): the loss plus the families' terms, λ fixed
        opt.step()
        if i % 10 == 9:
            hyper.step(next(hyper_batches), next(val_batches))

One hyper step is

    g = dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) p,     p ≈ H⁻¹ ∂L_V/∂w,   H = ∂²L_T/∂w∂wᵀ,

computed by :func:`~hypergradients.hypergradient` at the model's current weights ``w`` (taken as
``≈ w*``) with ``L_T`` on the training batch and ``L_V`` on the validation batch, then one step of
the hyperparameters' own ``torch.optim`` optimizer along ``g``, then the optional projection
``project(hparams)``. The model's weights and the model's optimizer are never touched (only the
``before_step``/``after_step`` hooks may do that, e.g. to re-initialise the weights).

The losses are composed by :class:`~hypergradients.hparams.objective.Objective` from the loss
contract ``loss_fn(outputs, batch)`` (per-example ``(B,)`` or a scalar; default the cross-entropy
``−log softmax(outputs)[y]``): ``L_T`` adds the families' penalties and sees the batch and forward
through their hooks, in training mode on copies of the buffers; ``L_V`` is the plain loss in
evaluation mode. Batches may be given as ``(x, y)``, ``(x, y, index)`` or a ``Batch``, or as a dict
of a model's keyword inputs (a Hugging Face batch: ``input_ids``, ``attention_mask``, ``labels``,
...): then ``x`` is that dict without ``"index"``, the model is called as ``model(**x)``, ``y`` is
``x["labels"]`` and ``index`` is ``batch["index"]`` (default ``arange(B)``); ``outputs`` is then
whatever the model returns (a ``ModelOutput``: see :mod:`hypergradients.hf` for its losses). The
defaults (the method, ``warm_start``, the optimizer) are those of
:mod:`hypergradients.training.settings`, which says why.

Failures are typed: a non-finite loss on the hyper step's batches, a non-finite hypergradient or a
non-finite hyperparameter after the step raises :class:`NonFiniteError` (``.name``, ``.round`` =
the hyper step, 1-based);
a solver failure (CG's negative curvature, a diverging Neumann series) is retried with a damped
solver, skipped (the result says why) or raised, as ``on_solver_error`` says.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core import distributed, tree
from ..core.derivatives import HvpMode
from ..core.errors import (
    HypergradientError,
    NegativeCurvatureError,
    NeumannDivergenceError,
    NonFiniteHypergradientError,
)
from ..core.hypergradient import hypergradient
from ..core.method import Info, Method
from ..core.modules import in_mode
from ..core.state import SolverState
from ..hparams.base import Family, Noise
from ..hparams.objective import BatchLike, BatchLoss, Objective, as_batch, collect_hparams, cross_entropy
from .export import Values, set_natural
from .precondition import optimizer_diagonal
from .settings import HyperSettings, OptimizerFactory, Projection, SolverPolicy

STATE_VERSION = 1
_MAX_RETRIES = 30  # safer variants tried per hyper step (each damped CG at least doubles δ)


class NonFiniteError(RuntimeError):
    """A loss, weight, hypergradient or hyperparameter became NaN/inf.

    ``name`` is the offending tensor or loss (``"inner_loss"``, ``"val_loss"``, a weight's or a
    hyperparameter's key), ``what`` what it is in words, ``round`` the round of :func:`fit` (for
    :class:`HyperOptimizer`: the hyper step, counted from 1), ``checkpoint`` the last good
    checkpoint (``None`` if none).
    """

    def __init__(
        self, message: str, *, round: int, name: str, checkpoint: Path | None, what: str = ""
    ) -> None:
        super().__init__(message)
        self.round = round
        self.name = name
        self.checkpoint = checkpoint
        self.what = what


def _skip_reason(e: HypergradientError, method: Method) -> str:
    # A fixed phrase per cause (the messages carry numbers), so that skips can be counted by reason.
    if isinstance(e, NeumannDivergenceError):
        return "Neumann series diverged"
    return f"{type(method).__name__} met negative curvature"


def solve_with_retries(
    call: Callable[[Method], tuple[dict[str, Tensor], Info]], method: Method, policy: SolverPolicy
) -> tuple[dict[str, Tensor], Info, dict[str, Any]]:
    """``call(method)``; on a solver failure with ``policy="damp"``, retries with the method's own safer
    variant (:meth:`~hypergradients.Method.safer`: CG damped, Neumann with a smaller α), asking the
    variant again when it fails too, at most ``_MAX_RETRIES`` times.

    Returns the hypergradient, its info and what the retry changed (empty if none:
    ``solver_retry`` names the options, ``solver_<option>`` their new values), or raises the last
    failure (the caller skips that hyper step or re-raises it).
    """
    try:
        return (*call(method), {})
    except (NeumannDivergenceError, NegativeCurvatureError) as e:
        if policy != "damp":
            raise
        err: HypergradientError = e
    current = method
    for _ in range(_MAX_RETRIES):
        retry = current.safer(err)
        if retry is None:
            raise err  # no safer variant of this method: the caller skips the step
        changed = _changed_options(method, retry)
        used: dict[str, Any] = {
            "solver_retry": "+".join(changed),
            **{f"solver_{k}": v for k, v in changed.items()},
        }
        try:
            return (*call(retry), used)
        except (NeumannDivergenceError, NegativeCurvatureError) as e:
            err, current = e, retry
    raise err


def _changed_options(method: Method, retry: Method) -> dict[str, Any]:
    """The options of ``retry`` that differ from ``method``'s (both dataclasses), by name."""
    if not (dataclasses.is_dataclass(method) and dataclasses.is_dataclass(retry)):
        return {"method": repr(retry)}
    return {
        f.name: getattr(retry, f.name)
        for f in dataclasses.fields(retry)
        if getattr(retry, f.name) != getattr(method, f.name, None)
    }


@dataclass
class HyperStep:
    """What one :meth:`HyperOptimizer.step` did.

    ``applied``: the hyperparameters moved. Then ``hypergradient`` is ``g`` (keys of the
    hyperparameters), ``info`` the :class:`~hypergradients.Info` of its computation and ``retry``
    what a damped retry used (``{}`` if none: ``solver_retry``, ``solver_damping`` or
    ``solver_alpha``). Otherwise the step was skipped: ``skip_reason`` says why and ``error`` is
    the solver's exception.
    """

    applied: bool
    hypergradient: dict[str, Tensor] | None = None
    info: Info | None = None
    retry: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None
    error: HypergradientError | None = None

    def metrics(self) -> dict[str, Any]:
        """Plain numbers for a log: ``hyper_val_loss`` (``L_V`` on the validation batch),
        ``hypergrad_norm``, ``hvps``, ``residual`` (``None`` when not computed: see
        ``HyperSettings.residual``), ``solver_*`` facts and the retry; or ``skip_reason``."""
        if not self.applied or self.hypergradient is None or self.info is None:
            return {"skip_reason": self.skip_reason}
        info = self.info
        rec: dict[str, Any] = {
            "hyper_val_loss": info.outer_loss,
            "hypergrad_norm": float(tree.norm(self.hypergradient)),
            "hvps": info.hvps,
            "residual": info.residual,
        }
        rec.update({f"solver_{k}": v for k, v in info.extra.items()})
        rec.update(self.retry)
        return rec


class HyperOptimizer:
    """The hyper step of Algorithm 1 for any training loop: ``step(train_batch, val_batch)``.

    Args:
        model: the ``nn.Module`` being trained (by any optimizer; this object never touches it).
        families: hyperparameter families (:mod:`hypergradients.hparams`), at least one tensor.
        settings: how the step is taken, as one :class:`~hypergradients.HyperSettings` (its fields
            are the next six keywords, which give them one by one instead; not both).
        method: the hypergradient method (default ``Neumann(iters=20, alpha="auto")``; why:
            :mod:`hypergradients.training.settings`).
        optimizer: ``factory(list_of_hyperparameter_tensors) -> torch.optim.Optimizer`` (default
            Adam, lr 1e-2) or an optimizer built over exactly the families' tensors.
        project: ``project(hparams)`` after every applied step, under ``torch.no_grad()``, with the
            families' unconstrained tensors by key: modify them in place (``t.clamp_(-10, 0)``) or
            return a dict of new values, which are copied in.
        on_solver_error: ``"damp"`` (default: retry CG on ``H + δI``, Neumann with a safe ``α``;
            skip if that fails too), ``"skip"`` or ``"raise"``.
        warm_start: carry a :class:`~hypergradients.SolverState` from step to step (default
            ``True``: CG/Auto start from the last ``p``, Neumann keeps its ``λ_max``, Nyström its
            sketch); it belongs to ``method``'s class (:meth:`hypergradient` with another class
            solves from scratch).
        residual: also compute the solver's residual ``‖Hp − v‖/‖v‖`` (``info.residual``; default
            ``False``: one HVP saved for Neumann, Identity and Nyström, whose metric is then ``None``;
            CG, Auto and Exact report theirs either way, at no cost).
        loss_fn: ``loss_fn(outputs, batch)`` → per-example ``(B,)`` or scalar, the contract of
            :mod:`hypergradients.hparams.objective`; default: cross-entropy.
        before_step, after_step: hooks ``f(hyper)`` and ``f(hyper, result)`` run at the start and
            the end of every step (e.g. re-initialise the weights).
        data_parallel: under ``torch.distributed`` (torchrun), each rank passes its own shard's
            batches and the hypergradient is that of the group-mean losses
            (:mod:`hypergradients.distributed`); the hyperparameters are broadcast from rank 0 here,
            and the all-reduced hypergradients keep them identical on every rank. Pass the plain
            module (``ddp.module``), not the DDP wrapper. ``group``: the process group (default: all).
        hvp_mode: how the hypergradient's Hessian-vector products are computed, as
            :func:`~hypergradients.hypergradient`'s argument: ``"reverse"`` (double backward, the
            default), ``"forward"`` or ``"finite-difference"`` (first-order gradients only: for models
            built from operations without a double backward, such as ``scaled_dot_product_attention``
            on the CPU).
        inner_optimizer: the model's own optimizer (a ``torch.optim.Adam`` or ``AdamW``, or a wrapper
            of one), read, never stepped or changed: a method that preconditions with its state,
            ``hg.Identity(precondition="inner_optimizer")``, gets the diagonal
            :func:`~hypergradients.adam_diagonal` of the moment at every step. ``None`` (default):
            such a method raises, naming this argument. Settable later as ``hyper.inner_optimizer``
            (:mod:`hypergradients.hf` sets it to the Trainer's); :func:`~hypergradients.fit` passes its own.

    ``hparams`` maps each key to the families' own unconstrained tensors (the objects of
    ``family.tensors()``, which the hyper optimizer updates); :meth:`natural` gives the
    constrained values and :meth:`set_natural` sets them (``hyper.set_natural({"weight_decay":
    1e-3})``), in place. Writing an unconstrained value in place works too
    (``with torch.no_grad(): hyper.hparams["weight_decay"].fill_(math.log(1e-3))``); rebinding a
    dict entry reaches neither the families nor the optimizer.

    Noise: with a stochastic family (dropout), every fresh noise sample (one per :meth:`train_loss`
    call, one per :meth:`step`) is a seed drawn from ``noise_generator``, a CPU ``torch.Generator``
    of this object, seeded once from torch's global generator when the object is built (so
    ``torch.manual_seed`` before building fixes every draw); torch's global generator is not used
    after that. ``noise_generator`` is ``None`` without a stochastic family.

    ``state_dict()`` holds tensors and plain values only (``torch.load(weights_only=True)`` reads
    it): the hyperparameters, the optimizer's state, the solver state, the noise generator's state
    and the step counts.
    """

    def __init__(
        self,
        model: nn.Module,
        families: Sequence[Family],
        *,
        settings: HyperSettings | None = None,
        method: Method | None = None,
        optimizer: OptimizerFactory | torch.optim.Optimizer | None = None,
        project: Projection | None = None,
        on_solver_error: SolverPolicy | None = None,
        warm_start: bool | None = None,
        residual: bool | None = None,
        loss_fn: BatchLoss = cross_entropy,
        before_step: Sequence[Callable[[HyperOptimizer], None]] = (),
        after_step: Sequence[Callable[[HyperOptimizer, HyperStep], None]] = (),
        data_parallel: bool = False,
        group: Any = None,
        hvp_mode: HvpMode | None = None,
        inner_optimizer: Any = None,
    ) -> None:
        given: dict[str, Any] = {
            k: v
            for k, v in (
                ("method", method),
                ("optimizer", optimizer),
                ("project", project),
                ("on_solver_error", on_solver_error),
                ("warm_start", warm_start),
                ("residual", residual),
                ("hvp_mode", hvp_mode),
            )
            if v is not None
        }
        if settings is not None and given:
            k = next(iter(given))
            raise ValueError(f"give {k} inside settings=hg.HyperSettings(..., {k}=...) or as {k}=, not both")
        self.settings: HyperSettings = settings if settings is not None else HyperSettings(**given)
        self.model = model
        self.families = list(families)
        self.hparams = collect_hparams(self.families)
        if not self.hparams:
            raise ValueError(
                "HyperOptimizer needs at least one hyperparameter: pass a family such as "
                "hg.WeightDecay(model)"
            )
        self.method: Method = self.settings.method
        self.hvp_mode: HvpMode = self.settings.hvp_mode
        optimizer = self.settings.optimizer
        if isinstance(optimizer, torch.optim.Optimizer):
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if owned != {id(t) for t in self.hparams.values()}:
                raise ValueError(
                    "the optimizer must be built over exactly the families' tensors "
                    "(list(hyper.hparams.values())); pass a factory lambda ps: ... instead"
                )
            self.optimizer = optimizer
        else:
            self.optimizer = optimizer(list(self.hparams.values()))
        # The noise's own generator: its state goes into state_dict, so a resumed run (Lightning,
        # an own loop) draws the noise an uninterrupted one would without restoring torch's global one.
        self.noise_generator: torch.Generator | None = None
        if any(f.stochastic for f in self.families):
            self.noise_generator = torch.Generator().manual_seed(Noise.draw().seed)
        self.objective = Objective(model, self.families, loss_fn, generator=self.noise_generator)
        self.project = self.settings.project
        self.before_step = list(before_step)
        self.after_step = list(after_step)
        self.on_solver_error: SolverPolicy = self.settings.on_solver_error
        self.solver_state: SolverState | None = SolverState() if self.settings.warm_start else None
        self.steps = 0  # hyper steps attempted
        self.skipped = 0  # ... of which skipped (solver failures)
        self.retried = 0  # ... of which applied after a damped retry
        self.skip_reasons: Counter[str] = Counter()
        self.data_parallel = data_parallel
        self.group = group
        self.inner_optimizer = inner_optimizer
        if data_parallel:
            with distributed.data_parallel(group):  # refuses without an initialised process group
                pass
            distributed.broadcast(self.hparams, src=0, group=group)

    # ------------------------------------------------------------------ the losses
    def train_loss(self, batch: BatchLike) -> Tensor:
        """``L_T(w, λ)`` on ``batch`` with the model's live weights and ``λ`` fixed (detached): what the
        inner optimizer should minimise (the loss plus the families' terms)."""
        return self.objective.train(
            dict(self.model.named_parameters()),
            tree.detach(self.hparams),
            as_batch(batch),
            forward=self.objective.live,
        )

    def penalty(self) -> Tensor:
        """``Σ_families penalty(w, λ)`` at the live weights, ``λ`` fixed: for a loop that computes its own
        data loss (then ``loss + hyper.penalty()`` is ``L_T`` for penalty-only families)."""
        params, lam = dict(self.model.named_parameters()), tree.detach(self.hparams)
        ref = next(iter(lam.values()))
        total = torch.zeros((), dtype=ref.dtype, device=ref.device)
        for fam in self.families:
            pen = fam.penalty(params, lam)
            if pen is not None:
                total = total + pen
        return total

    def natural(self) -> dict[str, Tensor]:
        """The families' natural (constrained) values by key, detached: the decays ``exp(λ)``, the keep
        probabilities ``σ(θ)``, ... (each family's :attr:`~hypergradients.hparams.Family.parametrisation`)."""
        out: dict[str, Tensor] = {}
        for fam in self.families:
            out.update(fam.natural())
        return out

    def set_natural(self, values: Values, *, strict: bool = True) -> None:
        """Set hyperparameters in natural units: the inverse of :meth:`natural`.

        ``values`` is keyed by hyperparameter key or by family name (a number under a family's name
        sets all of its values: ``{"weight_decay": 3e-4}``), or is an exported file
        (:func:`~hypergradients.load_hparams`, or its path); natural units as :meth:`natural` gives
        them (*keep* probabilities for dropout). Everything is converted and checked first (a value
        outside a family's domain, an unknown key with ``strict=True``, raise and change nothing),
        then copied *in place* into the families' tensors, which are :attr:`hparams` and the
        optimizer's own: the next :meth:`step` moves from the values set. The optimizer's state (Adam's
        moment estimates of past hypergradients), the solver state and the counts are kept, as after
        a :meth:`step`; to start afresh, build a new ``HyperOptimizer`` over the families. With
        ``data_parallel=True``, call it on every rank with the same values.
        """
        set_natural(self.families, values, strict=strict)

    # ------------------------------------------------------------------ the step
    def hypergradient(
        self,
        train_batch: BatchLike,
        val_batch: BatchLike,
        *,
        method: Method | None = None,
        noise: Noise | None = None,
    ) -> tuple[dict[str, Tensor], Info]:
        """``g = dL_V/dλ`` and its Info at the current weights (no retry, nothing updated but the solver
        state). A non-finite loss raises :class:`NonFiniteError` naming ``"inner_loss"`` or ``"val_loss"``,
        a non-finite hypergradient one naming its key. ``noise`` fixes the stochastic families' random
        numbers for every evaluation of ``L_T`` in this hypergradient (``None``: one fresh draw).

        ``method``: default this object's own method. The carried solver state (``warm_start``)
        belongs to that method's kind: a method of the same class (``hg.CG(iters=50)`` beside an own
        ``hg.CG()``) uses and updates it; a method of another class is a one-off computation from
        scratch, which neither reads nor changes it (the next :meth:`step` continues as if the call
        had not happened)."""
        bt, bv = as_batch(train_batch), as_batch(val_batch)
        obj = self.objective
        if noise is None:
            noise = obj.draw_noise()
        w = tree.detach({k: p for k, p in self.model.named_parameters() if p.requires_grad})
        lam = tree.detach(self.hparams)
        bad: list[str] = []  # the non-finite loss, seen from the values themselves (not the message)

        def outer(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
            out = obj.val(p, bv)
            if out.numel() == 1 and not bool(torch.isfinite(out.detach()).all()):
                bad.append("val_loss")
            return out

        def inner(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
            out = obj.train(p, h, bt, forward=obj.copy_buffers, noise=noise)
            if out.numel() == 1 and not bool(torch.isfinite(out.detach()).all()):
                bad.append("inner_loss")
            return out

        m = method or self.method
        # The carried state holds the own method's quantities (another class would refuse it with a
        # StateMismatchError); a safer retry of the same class (CG's, Neumann's) continues from it.
        state = self.solver_state if type(m) is type(self.method) else None
        fallbacks: list[list[str]] = []  # read only when the method asks for the optimizer's diagonal
        m = m.with_inner_optimizer(lambda: self._inner_diagonal(fallbacks))
        dp = distributed.data_parallel(self.group) if self.data_parallel else contextlib.nullcontext()
        try:
            with dp:
                g, info = hypergradient(
                    outer,
                    inner,
                    w,
                    lam,
                    method=m,
                    return_info=True,
                    state=state,
                    hvp_mode=self.hvp_mode,
                    residual=self.settings.residual,
                )
        except (NeumannDivergenceError, NegativeCurvatureError):
            raise
        except HypergradientError as e:
            if bad:
                what, name = "on the hyper step's batch, the loss", bad[0]
            elif isinstance(e, NonFiniteHypergradientError):
                what, name = "the hypergradient of", e.key
            else:
                raise
            raise NonFiniteError(
                f"hyper step {self.steps + 1}: {what} {name!r} is not finite (NaN or inf): "
                "check the data, the weights and the method's settings",
                round=self.steps + 1,
                name=name,
                checkpoint=None,
                what=what,
            ) from e
        if state is not None:
            self.solver_state = info.state  # states are values: the next step continues from this one
        if fallbacks:  # weights the optimizer had no state for yet (p = lr·v there)
            info.extra["precondition_fallbacks"] = float(len(fallbacks[0]))
        return g, info

    def _inner_diagonal(self, fallbacks: list[list[str]]) -> dict[str, Tensor]:
        """The inner optimizer's diagonal now, keyed like the weights (``fallbacks``: appends the weights
        without state)."""
        if self.inner_optimizer is None:
            raise ValueError(
                "the method preconditions with the model's optimizer (hg.Identity(precondition="
                "'inner_optimizer')), but this HyperOptimizer has none: pass "
                "HyperOptimizer(..., inner_optimizer=opt) with the torch.optim.Adam/AdamW that "
                "trains the model (fit passes its own, but with path_hparams the model is "
                "trained by hg.optim, which has no such state: use hg.Identity(scale=...) "
                "there)"
            )
        diagonal, missing = optimizer_diagonal(self.inner_optimizer, self.model)
        fallbacks.append(missing)
        return diagonal

    def step(self, train_batch: BatchLike, val_batch: BatchLike) -> HyperStep:
        """One hyper step: hooks, ``g`` on the two batches, the optimizer step, the projection, hooks.

        ``train_batch`` defines ``L_T`` (the Hessian-vector products: a fresh training batch, as in
        the paper), ``val_batch`` defines ``L_V``. Returns a :class:`HyperStep`; raises
        :class:`NonFiniteError` for a non-finite loss or hyperparameter (the hyperparameters are then
        as the failed step left them: restore a :meth:`state_dict`), and the solver's error with
        ``on_solver_error="raise"``.
        """
        for hook in self.before_step:
            hook(self)
        noise = self.objective.draw_noise()  # one noise sample for this step, retries included
        try:
            g, info, used = solve_with_retries(
                lambda m: self.hypergradient(train_batch, val_batch, method=m, noise=noise),
                self.method,
                self.on_solver_error,
            )
        except (NeumannDivergenceError, NegativeCurvatureError) as e:
            if self.on_solver_error == "raise":
                self.steps += 1
                raise
            result = HyperStep(applied=False, skip_reason=_skip_reason(e, self.method), error=e)
            self.skipped += 1
            self.skip_reasons[result.skip_reason or ""] += 1
        else:
            # Only now is any hyperparameter changed: a failed hypergradient leaves λ as it was.
            self.optimizer.zero_grad(set_to_none=True)
            for k, t in self.hparams.items():
                t.grad = g[k]
            self.optimizer.step()
            if self.project is not None:
                with torch.no_grad():
                    new = self.project(dict(self.hparams))
                    if new is not None and not isinstance(new, Mapping):
                        raise TypeError(
                            "project must return None (after changing the tensors in place) or a "
                            f"dict of new values by key, got {type(new).__name__}"
                        )
                    if new is not None:
                        for k, v in new.items():
                            if k not in self.hparams:
                                raise KeyError(
                                    f"project returned the key {k!r}, which is no hyperparameter; "
                                    f"the keys are {sorted(self.hparams)}"
                                )
                            self.hparams[k].copy_(v)
            bad = tree.first_nonfinite(tree.detach(self.hparams))
            if bad is not None:
                self.steps += 1
                what = "the hyperparameter"
                raise NonFiniteError(
                    f"hyper step {self.steps}: {what} {bad!r} is not finite (NaN or inf): "
                    "lower the hyper learning rate",
                    round=self.steps,
                    name=bad,
                    checkpoint=None,
                    what=what,
                )
            if used:
                self.retried += 1
            result = HyperStep(applied=True, hypergradient=g, info=info, retry=used)
        self.steps += 1
        for after in self.after_step:
            after(self, result)
        return result

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, optimizer state, solver state, noise generator state and counts, as tensors
        and plain values (``"noise"``: ``None`` without a stochastic family)."""
        return {
            "version": STATE_VERSION,
            "hparams": {k: t.detach().clone() for k, t in self.hparams.items()},
            "optimizer": self.optimizer.state_dict(),
            "solver": self.solver_state.state_dict() if self.solver_state is not None else None,
            "noise": self.noise_generator.get_state() if self.noise_generator is not None else None,
            "steps": self.steps,
            "skipped": self.skipped,
            "retried": self.retried,
            "skip_reasons": dict(self.skip_reasons),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the hyperparameters are copied into the families' tensors).

        All or nothing: every part is checked against this object first (the hyperparameters' keys
        and shapes, the solver state, the noise generator's state, the counts; the optimizer's
        groups by ``torch.optim``), and only then is anything assigned, so a state written for
        another setup raises and leaves this object as it was. A state without ``"noise"`` (written
        before it was saved) keeps this object's noise generator as it is.
        """
        fix = "pass the dict that HyperOptimizer.state_dict() returned"
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"not a HyperOptimizer state (version {found!r}, expected {STATE_VERSION}): {fix}"
            )
        lacks = [
            k
            for k in ("hparams", "optimizer", "steps", "skipped", "retried", "skip_reasons")
            if k not in state
        ]
        if lacks:
            raise ValueError(f"the HyperOptimizer state lacks {lacks}: {fix}")
        saved = state["hparams"]
        if not isinstance(saved, Mapping):
            raise ValueError(
                f"the HyperOptimizer state's 'hparams' is a {type(saved).__name__}, not a "
                f"dict of tensors: {fix}"
            )
        missing = sorted(set(self.hparams) - set(saved))
        if missing:
            raise KeyError(
                f"the saved state has no hyperparameter {missing[0]!r} (it has {sorted(saved)}): "
                "it was written for other families"
            )
        for k, t in self.hparams.items():
            v = saved[k]
            if not isinstance(v, Tensor) or v.shape != t.shape:
                got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else f"a {type(v).__name__}"
                raise ValueError(
                    f"hyperparameter {k!r}: saved {got}, this one {tuple(t.shape)}: it was "
                    "written for another model"
                )
        solver = None
        if self.solver_state is not None and state.get("solver") is not None:
            solver = SolverState.from_state_dict(state["solver"])
        noise = state.get("noise")
        if noise is not None and self.noise_generator is not None:
            own = self.noise_generator.get_state()
            if not isinstance(noise, Tensor) or noise.dtype != own.dtype or noise.shape != own.shape:
                got = (
                    f"{noise.dtype} of shape {tuple(noise.shape)}"
                    if isinstance(noise, Tensor)
                    else type(noise).__name__
                )
                raise ValueError(
                    f"the saved noise generator state is {got}, not a CPU generator's "
                    f"({own.dtype} of shape {tuple(own.shape)}): {fix}"
                )
        try:
            counts = [int(state[k]) for k in ("steps", "skipped", "retried")]
            reasons = Counter({str(k): int(v) for k, v in state["skip_reasons"].items()})
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"the HyperOptimizer state's counts are malformed ({e}): {fix}") from e
        # torch checks the groups before it changes anything; the copy puts back whatever a later
        # failure inside it would leave.
        before = copy.deepcopy(self.optimizer.state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception:
            self.optimizer.load_state_dict(before)
            raise
        # Everything fits: assign (nothing below can fail).
        with torch.no_grad():
            for k, t in self.hparams.items():
                t.copy_(saved[k])
        if solver is not None:
            self.solver_state = solver
        if noise is not None and self.noise_generator is not None:
            self.noise_generator.set_state(noise.cpu())
        self.steps, self.skipped, self.retried = counts
        self.skip_reasons = reasons


__all__ = [
    "HyperOptimizer",
    "HyperStep",
    "NonFiniteError",
    "Objective",
    "as_batch",
    "classification_loss",
    "collect_hparams",
    "solve_with_retries",
]

# Kept importable from here: the application's experiments import these names from this module.
classification_loss = cross_entropy
_mode = in_mode
