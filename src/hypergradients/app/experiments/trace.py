"""What the hyper steps of a tuned arm did, measured while it trains: the diagnostics a report gives
when a tuned arm does not move or does not win.

:class:`HyperTrace` is a :class:`~hypergradients.Callback` of :func:`~hypergradients.fit` that looks
at every hyper step's hypergradient ``g`` and the change ``Δλ`` of the unconstrained hyperparameters
(log-decays, the logits of example weights, pixels) and keeps, with O(#hyperparameters) memory:

* ``snr``: over each window of ``window`` applied hyper steps, ``‖mean g‖ / ‖std g‖`` (the mean and
  the standard deviation taken per coordinate over the window, then their norms): near or below 1
  the hypergradient's direction is mostly noise from step to step, and its steps mostly cancel;
* ``moved``: the fraction of hyper steps after which some hyperparameter changed by more than
  ``tol`` (a step that changed nothing is one skipped, a zero hypergradient or an optimizer step
  below ``tol``);
* ``drift``: ``‖λ_T − λ_0‖ / Σ_t ‖Δλ_t‖``, the net displacement over the length of the path the
  hyperparameters took (1: every step in one direction; near 0: a random walk that went nowhere);
* ``trajectory``: every ``every`` hyper steps the 10th, 50th and 90th percentile of ``λ`` (and its
  mean), for the figure :func:`plot_trajectories`.

Its state is saved in ``fit``'s checkpoints, so a resumed arm continues the same numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...training.callbacks import Callback

if TYPE_CHECKING:
    from ...training.hyper import HyperOptimizer, HyperStep

__all__ = ["HyperTrace", "plot_trajectories", "trace_words"]

_QUANTILES = (0.1, 0.5, 0.9)


def _flat(d: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([d[k].detach().reshape(-1).double().cpu() for k in sorted(d)])


def _quantiles(x: Tensor) -> list[float]:
    if x.numel() > 1_000_000:  # torch.quantile's limit is 16M; a fixed subsample keeps it cheap
        x = x[torch.linspace(0, x.numel() - 1, 1_000_000).long()]
    q = torch.quantile(x, torch.tensor(_QUANTILES, dtype=x.dtype))
    return [float(v) for v in q]


class HyperTrace(Callback):
    """The hyper steps' diagnostics (module docstring); :meth:`summary` returns them."""

    def __init__(self, window: int = 20, tol: float = 1e-3, every: int = 1) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2 hyper steps, got {window}")
        self.window, self.tol, self.every = int(window), float(tol), max(1, int(every))
        self.steps = self.applied = self.moved = 0
        self.path = 0.0
        self.snr: list[float] = []
        self.trajectory: list[list[float]] = []  # [hyper step, mean, q10, q50, q90]
        self.lam0: Tensor | None = None
        self.lam: Tensor | None = None
        self._before: Tensor | None = None
        self._sum: Tensor | None = None
        self._sq: Tensor | None = None
        self._n = 0

    def on_before_hyper_step(self, hyper: HyperOptimizer) -> None:
        self._before = _flat(hyper.hparams)
        if self.lam0 is None:
            self.lam0 = self._before.clone()
            self._record(0, self._before)

    def on_hyper_step(self, hyper: HyperOptimizer, result: HyperStep) -> None:
        self.steps += 1
        now = _flat(hyper.hparams)
        if self._before is not None:
            step = now - self._before
            self.path += float(step.norm())
            if step.numel() and float(step.abs().max()) > self.tol:
                self.moved += 1
        self.lam = now
        if result.applied and result.hypergradient is not None:
            self.applied += 1
            g = _flat(result.hypergradient)
            if self._sum is None or self._sq is None or self._n == 0:
                self._sum, self._sq = torch.zeros_like(g), torch.zeros_like(g)
            self._sum += g
            self._sq += g * g
            self._n += 1
            if self._n == self.window:
                mean = self._sum / self._n
                var = (self._sq / self._n - mean * mean).clamp_min(0) * self._n / (self._n - 1)
                sd = float(var.sqrt().norm())
                self.snr.append(float(mean.norm()) / sd if sd > 0 else float("inf"))
                self._n = 0
        if self.steps % self.every == 0:
            self._record(self.steps, now)

    def _record(self, step: int, lam: Tensor) -> None:
        self.trajectory.append([float(step), float(lam.mean()), *_quantiles(lam)])

    def summary(self) -> dict[str, Any]:
        """The numbers (module docstring) as plain values: ``hyper_steps``, ``applied``,
        ``moved_fraction``, ``snr`` (per window) and ``snr_median``, ``drift``, ``displacement``
        (``‖λ_T − λ_0‖``), ``path``, ``mean_step`` (the mean ‖Δλ‖ per hyper step), ``window``,
        ``tol``, ``trajectory``; a number with nothing to measure (no window yet, no step) is ``None``,
        so that the summary reads back from JSON as it was written."""
        disp = float((self.lam - self.lam0).norm()) if self.lam is not None and self.lam0 is not None else 0.0
        finite = [s for s in self.snr if math.isfinite(s)]
        return {
            "hyper_steps": self.steps,
            "applied": self.applied,
            "moved_fraction": self.moved / self.steps if self.steps else None,
            "snr": [s if math.isfinite(s) else None for s in self.snr],
            "snr_median": statistics.median(finite) if finite else None,
            "drift": disp / self.path if self.path > 0 else None,
            "displacement": disp,
            "path": self.path,
            "mean_step": self.path / self.steps if self.steps else None,
            "window": self.window,
            "tol": self.tol,
            "trajectory": self.trajectory,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "applied": self.applied,
            "moved": self.moved,
            "path": self.path,
            "snr": list(self.snr),
            "trajectory": [list(r) for r in self.trajectory],
            "n": self._n,
            "lam0": self.lam0,
            "lam": self.lam,
            "sum": self._sum,
            "sq": self._sq,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.applied, self.moved = int(state["steps"]), int(state["applied"]), int(state["moved"])
        self.path, self._n = float(state["path"]), int(state["n"])
        self.snr = [float(s) for s in state["snr"]]
        self.trajectory = [[float(v) for v in r] for r in state["trajectory"]]
        self.lam0, self.lam, self._sum, self._sq = state["lam0"], state["lam"], state["sum"], state["sq"]


def trace_words(name: str, s: Mapping[str, Any]) -> str:
    """One sentence on an arm's :meth:`HyperTrace.summary`."""
    if not s.get("hyper_steps"):
        return f"{name}: no hyper step was traced."
    snr = s["snr_median"] if s.get("snr_median") is not None else float("nan")
    drift = s["drift"] if s.get("drift") is not None else float("nan")
    snr_t = (
        f"the hypergradient's signal-to-noise ‖mean‖/‖std‖ over windows of {s['window']} hyper steps "
        f"has median {snr:.2g}"
        if math.isfinite(snr)
        else f"fewer than {s['window']} hyper steps: no signal-to-noise window"
    )
    what = (
        "mostly noise from step to step"
        if math.isfinite(snr) and snr < 1
        else "a consistent direction"
        if math.isfinite(snr)
        else ""
    )
    return (
        f"{name}: {s['applied']} of {s['hyper_steps']} hyper steps applied, "
        f"{s['moved_fraction']:.0%} changed some hyperparameter by more than {s['tol']:g}; {snr_t}"
        + (f" ({what})" if what else "")
        + f"; the hyperparameters moved {s['displacement']:.3g} net along a path of {s['path']:.3g} "
        f"(drift {drift:.2f}: 1 = one direction, near 0 = a random walk)."
    )


def plot_trajectories(
    traces: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    *,
    ylabel: str,
    title: str = "",
    colors: Mapping[str, Any] | None = None,
) -> Path:
    """The unconstrained hyperparameters against the hyper steps: per arm (``traces[name]``: one
    :meth:`HyperTrace.summary` per seed) the median line and the 10–90% band of each seed."""
    import matplotlib.pyplot as plt

    colors = colors or {}
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for i, (name, per_seed) in enumerate(traces.items()):
        c = colors.get(name, f"C{i}")
        for j, s in enumerate(per_seed):
            tr = s.get("trajectory") or []
            if not tr:
                continue
            x = [r[0] for r in tr]
            ax.fill_between(x, [r[2] for r in tr], [r[4] for r in tr], color=c, alpha=0.12, lw=0)
            ax.plot(x, [r[3] for r in tr], color=c, lw=1.3, label=name if j == 0 else None)
    ax.set_xlabel("hyper steps")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "median and 10–90% of the hyperparameters, one line per seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
