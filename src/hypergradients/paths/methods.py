"""The path methods: differentiate ``steps`` steps of an inner optimizer from the given weights.

:class:`Unrolled` (reverse mode, optionally truncated or checkpointed) and :class:`Forward`
(forward mode) own their computation, which is :mod:`hypergradients.paths.unroll`'s. They keep nothing
between calls: a state passes through them with only its call count advanced.

The inner optimizer is plain gradient descent with ``lr`` (the default), or any differentiable
optimizer of :mod:`hypergradients.optim` given as ``optimizer=`` (its hyperparameters then live
in the optimizer: ``hg.optim.adam(lr="lr")``). With ``batches=`` step ``k`` sees the k-th batch:
the inner loss is then called as ``inner_loss(params, hparams, batch)``; the outer loss stays
``outer_loss(params, hparams)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core import tree
from ..core.derivatives import HvpMode, LossFn, grad, scalar_loss, used_keys
from ..core.errors import HypergradientError
from ..core.method import Info, PathMethod, positive_int, report_unused
from ..core.state import SolverState
from ..core.tree import Tree
from .optim import Optimizer, check_schedules
from .unroll import checkpoint_interval, refuse_once_differentiable, take_batches
from .unroll import forward as forward_path
from .unroll import reverse as reverse_path


def _validate_path(name: str, steps: object, lr: object, truncate: object, optimizer: object) -> None:
    positive_int(f"{name}.steps", steps)
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise HypergradientError(f"{name}.optimizer must be an optimizer of hg.optim (e.g. "
                                     f"hg.optim.adam(lr=1e-3)), got {optimizer!r}")
        if lr is not None:
            raise HypergradientError(f"{name}: give the learning rate to the optimizer "
                                     f"(hg.optim.{optimizer.name}(lr={lr!r}, ...)), not lr={lr!r} beside it")
    elif isinstance(lr, bool) or not isinstance(lr, (int, float, str)):
        raise HypergradientError(f"{name}.lr must be a number or a key of hparams, got {lr!r}")
    elif not isinstance(lr, str) and not (lr > 0 and math.isfinite(lr)):
        raise HypergradientError(f"{name}.lr must be a finite number > 0, got {lr!r}")
    if truncate is not None:
        positive_int(f"{name}.truncate", truncate)
        assert isinstance(truncate, int) and isinstance(steps, int)
        if truncate > steps:
            raise HypergradientError(f"{name}.truncate={truncate} exceeds steps={steps}")


@dataclass(frozen=True)
class Unrolled(PathMethod):
    """Reverse-mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w`` from the given weights.

    ``truncate=T`` differentiates only the last T steps. ``lr`` is a number (0.1 when neither
    ``lr`` nor ``optimizer`` is given), or the name of an entry of ``hparams`` with one element
    (shape ``()`` or ``(1,)``: a scalar, the rule of :mod:`hypergradients.optim` too) whose
    hypergradient is then returned too. A per-step learning-rate schedule (a ``(K,)`` tensor) is
    ``optimizer=hg.optim.gd(lr="key")``, the same plain gradient descent.

    ``optimizer``: any differentiable optimizer of :mod:`hypergradients.optim` instead of plain
    gradient descent (``hg.optim.adam(lr="lr", b1="b1")``, ``hg.optim.nesterov(lr="lr_schedule",
    momentum=0.9)``): the path is ``(w, s) ← O.update(∂L_T/∂w, s, w, λ)`` from ``s = O.init(w)``,
    and every optimizer hyperparameter named by a key of ``hparams`` gets its hypergradient.
    ``lr`` must then be left out (the optimizer has it).

    ``batches``: a sequence, iterator or other iterable of batches, one per step: step ``k``
    computes ``inner_loss(params, hparams, b_k)`` (3 arguments). Each call takes ``steps`` batches
    from it: a sequence's first ones every time, an iterator's next ones (successive calls see
    successive batches), a fresh ``iter()`` of another iterable (a DataLoader: a new epoch).

    ``checkpoint`` trades compute for memory: ``None``/``False`` keeps the graph of every step
    (memory ``O(T)``); ``True`` stores only every ``⌈√T⌉``-th iterate and recomputes one segment
    at a time in the backward sweep (memory ``O(√T)``, one extra forward pass); an int ``s``
    stores every s-th. The result is the same derivative (equal to float64 rounding).

    Every operation of ``inner_loss`` needs a second derivative (each step's gradient is
    differentiated): a ``@once_differentiable`` backward or a kernel without a double backward
    raises :class:`~hypergradients.HypergradientError` rather than dropping its part of the
    derivative. ``info.grad_norm`` is ``‖∂L_T/∂w‖`` at the given weights (the first step's).
    """

    steps: int = 100
    lr: float | str | None = None
    truncate: int | None = None
    checkpoint: bool | int | None = None
    optimizer: Optimizer | None = None
    batches: Iterable[object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _default_lr(self)
        _validate_path("Unrolled", self.steps, self.lr, self.truncate, self.optimizer)
        if self.checkpoint is not None and not isinstance(self.checkpoint, bool):
            positive_int("Unrolled.checkpoint", self.checkpoint)

    def compute(self, outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
                state: SolverState | None, residual: bool, hvp_mode: HvpMode) -> tuple[Tree, Info]:
        batches = _batches(self, "Unrolled")
        _check_schedules(self, lam, "Unrolled")
        stats: dict[str, float] = {}
        g, used, out, w_final = reverse_path(outer_loss, inner_loss, params, lam, steps=self.steps,
                                             lr=self.lr, truncate=self.truncate, checkpoint=self.checkpoint,
                                             optimizer=self.optimizer, batches=batches, stats=stats)
        report_unused(lam, used, self)
        extra = {"truncate": float(self.truncate or self.steps)}
        if self.checkpoint:
            every = checkpoint_interval(self.truncate or self.steps, self.checkpoint)
            extra["checkpoint"] = float(every or 0)
        return g, Info(type(self).__name__, self.steps, self.steps, None, None, direct=tree.zeros_like(lam),
                       final_params=tree.detach(w_final), outer_loss=float(out), extra=extra,
                       state=SolverState() if state is None else state, grad_norm=stats.get("grad_norm"))


def _default_lr(method: Unrolled | Forward) -> None:
    """Plain gradient descent's step size defaults to 0.1; with an optimizer, the optimizer has it."""
    if method.lr is None and method.optimizer is None:
        object.__setattr__(method, "lr", 0.1)


def _check_schedules(method: Unrolled | Forward, lam: Mapping[str, Tensor], who: str) -> None:
    if method.optimizer is not None:
        check_schedules(method.optimizer, lam, method.steps, who=f"{who}(steps={method.steps})")


def _batches(method: Unrolled | Forward, who: str) -> Sequence[object] | None:
    return None if method.batches is None else take_batches(method.batches, method.steps, who=who)


def _path_used(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree,
               lr: float | str | None, optimizer: Optimizer | None = None,
               batches: Sequence[object] | None = None) -> set[str]:
    """Hyperparameters the path can depend on: those in ``∂L_T/∂w`` (on the first batch) or ``L_V``
    (by autograd's graph, not by value), the step size when it is one, and the optimizer's.

    The graph of ``∂L_T/∂w`` built here is also checked for once-differentiable nodes: forward
    mode needs the same second derivative that reverse mode would silently lose there."""
    w = tree.clone_leaves(params, requires_grad=True)
    first = inner_loss if batches is None else (lambda p, h: inner_loss(p, h, batches[0]))  # type: ignore[call-arg]
    inner = scalar_loss(first, w, lam, name="inner_loss")
    gw = grad(inner, w, create_graph=True)
    refuse_once_differentiable(inner, [t for t in gw.values() if t.requires_grad], w, step=0)
    probe = scalar_loss(outer_loss, w, lam, name="outer_loss") + sum(
        (gk.sum() for gk in gw.values() if gk.requires_grad), torch.zeros((), dtype=inner.dtype))
    used = used_keys(probe, lam)
    if isinstance(lr, str):
        used.add(lr)
    if optimizer is not None:
        used.update(optimizer.hparam_keys)
    return used


@dataclass(frozen=True)
class Forward(PathMethod):
    """Forward mode through ``steps`` steps of ``w ← w − lr·∂L_T/∂w``: the derivative of :class:`Unrolled`.

    Propagates ``∂w_k/∂λ`` along the path with ``torch.func.jvp``, one tangent per scalar
    hyperparameter (``chunk`` of them batched with ``vmap``): memory independent of ``steps``,
    cost ``∝`` the number of hyperparameters. The natural choice for a few hyperparameters, such
    as a learning rate (``lr="<key>"``). The losses must be ``torch.func``-compatible (no
    ``.item()``, no in-place updates of their inputs) and every operation of ``inner_loss`` needs a
    forward-mode derivative of its backward: where one is missing (fused kernels, custom
    ``autograd.Function`` classes, PyTorch's "ZeroTensors are immutable" bug in ``F.mse_loss``'s mean
    reduction) it raises :class:`~hypergradients.HypergradientError` naming the cause, and
    :class:`Unrolled` computes the same derivative in reverse mode. ``optimizer`` and ``batches`` as
    in :class:`Unrolled`: the tangent of the optimizer state is carried along with the weights'.
    ``info.grad_norm`` as in :class:`Unrolled`.
    """

    steps: int = 100
    lr: float | str | None = None
    truncate: int | None = None
    chunk: int | None = 64
    optimizer: Optimizer | None = None
    batches: Iterable[object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _default_lr(self)
        _validate_path("Forward", self.steps, self.lr, self.truncate, self.optimizer)
        if self.chunk is not None:
            positive_int("Forward.chunk", self.chunk)

    def compute(self, outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
                state: SolverState | None, residual: bool, hvp_mode: HvpMode) -> tuple[Tree, Info]:
        batches = _batches(self, "Forward")
        _check_schedules(self, lam, "Forward")
        used = _path_used(outer_loss, inner_loss, params, lam, self.lr, self.optimizer, batches)
        report_unused(lam, used, self)
        stats: dict[str, float] = {}
        g, out_f, w_final, jvps = forward_path(outer_loss, inner_loss, params, lam, steps=self.steps,
                                               lr=self.lr, truncate=self.truncate, chunk=self.chunk,
                                               optimizer=self.optimizer, batches=batches, stats=stats)
        return g, Info(type(self).__name__, self.steps, jvps, None, None, direct=tree.zeros_like(lam),
                       final_params=tree.detach(w_final), outer_loss=out_f,
                       extra={"truncate": float(self.truncate or self.steps), "jvps": float(jvps)},
                       state=SolverState() if state is None else state, grad_norm=stats.get("grad_norm"))


StepLoss = Callable[[Mapping[str, Tensor], bool], Tensor]
"""One inner step's training loss ``loss(w, replay)``: its batch, random numbers and the implicit
hyperparameters fixed; ``replay=True`` when the step is replayed for the hypergradient."""


@dataclass
class PathHyperparameters:
    """Optimizer hyperparameters that :func:`hypergradients.fit` tunes through the training path.

    ``values``: the hyperparameters as tensors (e.g. ``{"lr": torch.tensor(0.05), "momentum":
    torch.tensor(0.9)}``, or a per-step schedule ``{"lr_schedule": torch.full((K,), 0.05)}`` indexed
    by the global inner step, warm-up included); they are tuned in place. ``optimizer``: the
    differentiable optimizer of :mod:`hypergradients.optim` that names them
    (``hg.optim.heavy_ball(lr="lr", momentum="momentum")``): it IS the inner optimizer, so the
    path that is differentiated is the path that is trained. ``steps``: T, how many of each round's
    last inner steps are differentiated. ``hyper_optimizer``: ``factory(list_of_tensors)``
    (default Adam, lr 1e-3) for their hyper step; ``project(values)`` after each (e.g. keep a
    learning rate positive: ``lambda v: v["lr"].data.clamp_(min=1e-4)``).

    Why a path method. The implicit (IFT) hypergradient differentiates the optimum ``w*(λ)``;
    an optimizer hyperparameter changes how ``w*`` is reached, not ``w*`` itself, so its IFT
    hypergradient is zero (undefined, really). Here it is the truncated unrolled hypergradient
    (Shaban et al. 2019): after each round the last T inner steps are replayed from the saved
    weights and optimizer state on the same batches (and the same random numbers), with a graph,
    and ``d L_V(w_end)/d values`` is taken in reverse mode — the same derivative as
    ``Unrolled(steps=T, optimizer=..., batches=...)`` from the weights T steps back. It is biased
    (the steps before the window count as constant) and its cost is T replayed steps plus their
    backward, memory ``O(T)``.
    """

    values: dict[str, Tensor]
    optimizer: Optimizer
    steps: int = 10
    hyper_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None
    project: Callable[[dict[str, Tensor]], object] | None = None

    def __post_init__(self) -> None:
        positive_int("PathHyperparameters.steps", self.steps)
        if not isinstance(self.optimizer, Optimizer):
            raise HypergradientError(f"PathHyperparameters.optimizer must be an optimizer of hg.optim, "
                                     f"got {self.optimizer!r}")
        missing = [k for k in self.optimizer.hparam_keys if k not in self.values]
        unused = [k for k in self.values if k not in self.optimizer.hparam_keys]
        if missing or unused or not self.values:
            raise HypergradientError(
                f"PathHyperparameters: the optimizer reads {list(self.optimizer.hparam_keys)}, the values "
                f"have {sorted(self.values)}; give one tensor for each key the optimizer names "
                "(e.g. hg.optim.sgd(lr='lr') with values={'lr': torch.tensor(0.1)})")


class PathTuner:
    """The trainer's side of :class:`PathHyperparameters`: inner steps with the differentiable
    optimizer, the window of the last T steps, the truncated hypergradient and its hyper step.

    Per round: :meth:`begin_round` (the number of inner steps), :meth:`step` for each inner step,
    then :meth:`hyper_step` with the validation loss. :meth:`state_dict` holds the values, the
    inner optimizer state and the hyper optimizer's state (tensors and plain values only).
    """

    def __init__(self, spec: PathHyperparameters, params: Mapping[str, Tensor]) -> None:
        self.spec = spec
        for k, v in spec.values.items():
            if not v.is_leaf:
                raise HypergradientError(f"PathHyperparameters.values[{k!r}] must be a leaf tensor "
                                         "(create it with torch.tensor(...)), not a computed one")
            v.requires_grad_(True)
        self.values = spec.values
        self.opt_state: Any = spec.optimizer.init(tree.detach(params))
        factory = spec.hyper_optimizer or (lambda ps: torch.optim.Adam(ps, lr=1e-3))
        self.hyper_opt = factory(list(self.values.values()))
        self._n = 0
        self._i = 0
        self._start: tuple[Tree, Any] | None = None
        self._window: list[StepLoss] = []

    def begin_round(self, n_steps: int) -> None:
        # A schedule is indexed by the global inner step: this round ends at step K = done + n_steps.
        done = getattr(self.opt_state, "steps", 0)
        check_schedules(self.spec.optimizer, self.values, int(done) + n_steps,
                        who="PathHyperparameters (a schedule is indexed by the global inner step, warm-up "
                            "included)")
        self._n, self._i, self._start, self._window = n_steps, 0, None, []

    def step(self, params: Mapping[str, Tensor], loss: StepLoss) -> Tensor:
        """One inner step: ``params`` (the model's parameters) are updated in place by the optimizer."""
        if self._i == self._n - min(self.spec.steps, self._n):
            # clones: the model's parameters are updated in place below
            self._start = ({k: v.detach().clone() for k, v in params.items()}, self.opt_state)
        if self._start is not None:
            self._window.append(loss)
        self._i += 1
        w = dict(params)
        val = loss(w, False)
        g = tree.as_tree(torch.autograd.grad(val, list(w.values()), allow_unused=True), w)
        with torch.no_grad():
            new, self.opt_state = self.spec.optimizer.update(g, self.opt_state, tree.detach(w),
                                                             tree.detach(self.values))
            for k, p in params.items():
                p.copy_(new[k])
        return val.detach()

    def hypergradient(self, outer: Callable[[Mapping[str, Tensor]], Tensor]) -> tuple[Tree, float]:
        """``d L_V(w_end)/d values`` through the window (reverse mode); returns it and ``L_V``."""
        if self._start is None:
            raise HypergradientError("PathTuner.hypergradient before any inner step of the round")
        w0, s0 = self._start
        window = self._window

        def inner(w: Mapping[str, Tensor], lam: Mapping[str, Tensor], step_loss: StepLoss) -> Tensor:
            return step_loss(w, True)

        g, _, out, _ = reverse_path(lambda w, lam: outer(w), inner, w0, self.values, steps=len(window),
                                    optimizer=self.spec.optimizer, batches=window, opt_state=s0)
        return g, float(out)

    def apply(self, g: Mapping[str, Tensor]) -> None:
        """One step of the hyper optimizer along ``g``, then the projection."""
        self.hyper_opt.zero_grad(set_to_none=True)
        for k, v in self.values.items():
            v.grad = g[k].detach().clone()
        self.hyper_opt.step()
        if self.spec.project is not None:
            with torch.no_grad():
                self.spec.project(self.values)

    def metrics(self, g: Mapping[str, Tensor], outer: float) -> dict[str, float]:
        rec = {"path_outer_loss": outer, "path_hypergrad_norm": float(tree.norm(tree.detach(dict(g))))}
        for k, v in self.values.items():
            rec[f"path.{k}"] = float(v.detach()) if v.numel() == 1 else float(v.detach().mean())
        return rec

    def state_dict(self) -> dict[str, Any]:
        st = self.opt_state
        return {"values": {k: v.detach().clone() for k, v in self.values.items()},
                "hyper_opt": self.hyper_opt.state_dict(),
                "opt_state": {f: (dict(x) if isinstance(x, Mapping) else x) for f, x in st._asdict().items()}}

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, all or nothing: the values' keys and shapes, the inner
        optimizer state's fields (and its tensors' keys and shapes) and the hyper optimizer's groups
        are checked first; a state of another setup raises and leaves this tuner as it was."""
        fix = "another setup wrote it; pass the dict that PathTuner.state_dict() returned"
        if not isinstance(st, Mapping) or any(k not in st for k in ("values", "hyper_opt", "opt_state")):
            has = sorted(st) if isinstance(st, Mapping) else type(st).__name__
            raise ValueError(f"not a PathTuner state (it has {has}, expected 'values', 'hyper_opt' and "
                             f"'opt_state'): {fix}")
        values = st["values"]
        for k, v in self.values.items():
            if k not in values:
                raise KeyError(f"checkpoint has no path hyperparameter {k!r}: another setup wrote it")
            if not isinstance(values[k], Tensor) or values[k].shape != v.shape:
                got = (f"shape {tuple(values[k].shape)}" if isinstance(values[k], Tensor)
                       else type(values[k]).__name__)
                raise ValueError(f"path hyperparameter {k!r}: saved {got}, this one {tuple(v.shape)}: {fix}")
        saved, own = st["opt_state"], self.opt_state._asdict()
        if not isinstance(saved, Mapping) or set(saved) != set(own):
            fields = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise ValueError(f"the inner optimizer state has the fields {fields}, this optimizer's "
                             f"{self.spec.optimizer.name} has {sorted(own)}: {fix}")
        for f, mine in own.items():
            x = saved[f]
            if isinstance(mine, Mapping):
                ok = isinstance(x, Mapping) and set(x) == set(mine) and all(
                    isinstance(x[k], Tensor) and x[k].shape == t.shape for k, t in mine.items())
            else:
                ok = isinstance(x, type(mine))
            if not ok:
                raise ValueError(f"the inner optimizer state's {f!r} does not fit these weights: {fix}")
        before = copy.deepcopy(self.hyper_opt.state_dict())
        try:
            self.hyper_opt.load_state_dict(st["hyper_opt"])
        except Exception:
            self.hyper_opt.load_state_dict(before)
            raise
        with torch.no_grad():
            for k, v in self.values.items():
                v.copy_(values[k])
        self.opt_state = self.opt_state._replace(**saved)
