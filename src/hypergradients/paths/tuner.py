"""The truncated hypergradient of the optimizer's own hyperparameters while training.

:class:`PathHyperparameters` says which optimizer hyperparameters :func:`hypergradients.fit`
tunes through the training path (``fit(path_hparams=...)``); :class:`PathTuner` is the trainer's
side of it: the inner steps with the differentiable optimizer, the window of the last T of them,
their replay in reverse mode (:func:`hypergradients.paths.unroll.reverse`, the computation of
:class:`~hypergradients.Unrolled`) and the hyper step along the result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import tree
from ..core.errors import HypergradientError
from ..core.method import positive_int
from ..core.tree import Tree
from .optim import Optimizer, check_schedules
from .unroll import reverse as reverse_path

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
"""``factory(tensors) -> torch.optim.Optimizer``: how every ``torch.optim`` optimizer of the library is
given (the inner optimizer of :func:`~hypergradients.fit`, the hyper optimizers). It is defined here, at
the lowest layer that takes one, and used by :mod:`hypergradients.training` too."""

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
    for their hyper step (``None``: :func:`~hypergradients.fit`'s default, Adam with lr 1e-3, of
    :mod:`hypergradients.training.settings`); ``project(values)`` after each (e.g. keep a
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
    hyper_optimizer: OptimizerFactory | None = None
    project: Callable[[dict[str, Tensor]], object] | None = None

    def __post_init__(self) -> None:
        positive_int("PathHyperparameters.steps", self.steps)
        if not isinstance(self.optimizer, Optimizer):
            raise HypergradientError(
                f"PathHyperparameters.optimizer must be an optimizer of hg.optim, got {self.optimizer!r}"
            )
        missing = [k for k in self.optimizer.hparam_keys if k not in self.values]
        unused = [k for k in self.values if k not in self.optimizer.hparam_keys]
        if missing or unused or not self.values:
            raise HypergradientError(
                f"PathHyperparameters: the optimizer reads {list(self.optimizer.hparam_keys)}, the values "
                f"have {sorted(self.values)}; give one tensor for each key the optimizer names "
                "(e.g. hg.optim.sgd(lr='lr') with values={'lr': torch.tensor(0.1)})"
            )


class PathTuner:
    """The trainer's side of :class:`PathHyperparameters`: inner steps with the differentiable
    optimizer, the window of the last T steps, the truncated hypergradient and its hyper step.

    ``hyper_optimizer`` builds the optimizer of the values (the spec's own when it has one).
    Per round: :meth:`begin_round` (the number of inner steps), :meth:`step` for each inner step,
    then :meth:`hypergradient` with the validation loss and :meth:`apply` along it.
    :meth:`state_dict` holds the values, the inner optimizer state and the hyper optimizer's state
    (tensors and plain values only).
    """

    def __init__(
        self, spec: PathHyperparameters, params: Mapping[str, Tensor], *, hyper_optimizer: OptimizerFactory
    ) -> None:
        self.spec = spec
        for k, v in spec.values.items():
            if not v.is_leaf:
                raise HypergradientError(
                    f"PathHyperparameters.values[{k!r}] must be a leaf tensor "
                    "(create it with torch.tensor(...)), not a computed one"
                )
            v.requires_grad_(True)
        self.values = spec.values
        self.opt_state: Any = spec.optimizer.init(tree.detach(params))
        self.hyper_opt = (spec.hyper_optimizer or hyper_optimizer)(list(self.values.values()))
        self._n = 0
        self._i = 0
        self._start: tuple[Tree, Any] | None = None
        self._window: list[StepLoss] = []

    def begin_round(self, n_steps: int) -> None:
        # A schedule is indexed by the global inner step: this round ends at step K = done + n_steps.
        done = getattr(self.opt_state, "steps", 0)
        check_schedules(
            self.spec.optimizer,
            self.values,
            int(done) + n_steps,
            who="PathHyperparameters (a schedule is indexed by the global inner step, warm-up included)",
        )
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
            new, self.opt_state = self.spec.optimizer.update(
                g, self.opt_state, tree.detach(w), tree.detach(self.values)
            )
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

        g, _, out, _ = reverse_path(
            lambda w, lam: outer(w),
            inner,
            w0,
            self.values,
            steps=len(window),
            optimizer=self.spec.optimizer,
            batches=window,
            opt_state=s0,
        )
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
        return {
            "values": {k: v.detach().clone() for k, v in self.values.items()},
            "hyper_opt": self.hyper_opt.state_dict(),
            "opt_state": {f: (dict(x) if isinstance(x, Mapping) else x) for f, x in st._asdict().items()},
        }

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, all or nothing: the values' keys and shapes, the inner
        optimizer state's fields (and its tensors' keys and shapes) and the hyper optimizer's groups
        are checked first; a state of another setup raises and leaves this tuner as it was."""
        fix = "another setup wrote it; pass the dict that PathTuner.state_dict() returned"
        if not isinstance(st, Mapping) or any(k not in st for k in ("values", "hyper_opt", "opt_state")):
            has = sorted(st) if isinstance(st, Mapping) else type(st).__name__
            raise ValueError(
                f"not a PathTuner state (it has {has}, expected 'values', 'hyper_opt' and 'opt_state'): {fix}"
            )
        values = st["values"]
        for k, v in self.values.items():
            if k not in values:
                raise KeyError(f"checkpoint has no path hyperparameter {k!r}: another setup wrote it")
            if not isinstance(values[k], Tensor) or values[k].shape != v.shape:
                got = (
                    f"shape {tuple(values[k].shape)}"
                    if isinstance(values[k], Tensor)
                    else type(values[k]).__name__
                )
                raise ValueError(f"path hyperparameter {k!r}: saved {got}, this one {tuple(v.shape)}: {fix}")
        saved, own = st["opt_state"], self.opt_state._asdict()
        if not isinstance(saved, Mapping) or set(saved) != set(own):
            fields = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise ValueError(
                f"the inner optimizer state has the fields {fields}, this optimizer's "
                f"{self.spec.optimizer.name} has {sorted(own)}: {fix}"
            )
        for f, mine in own.items():
            x = saved[f]
            if isinstance(mine, Mapping):
                ok = (
                    isinstance(x, Mapping)
                    and set(x) == set(mine)
                    and all(isinstance(x[k], Tensor) and x[k].shape == t.shape for k, t in mine.items())
                )
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
