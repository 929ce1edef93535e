"""A black-box tuner to compare the hypergradient arms with: Optuna's TPE sampler under a budget of
training steps (or of wall-clock time).

The experiments that offer an ``optuna`` arm (``weight-decay``, ``lstm-dropout``, ``data-cleaning``,
``augment``) give it the same model, data and number of inner steps per training run as their
hypergradient arm, and a budget of ``optuna.trials`` such runs. Each *trial* trains the model from
scratch with hyperparameters the sampler proposes (held fixed during training) and reports the
validation metric, which TPE minimises; the test metric is recorded but never shown to the sampler.

What comes out (:class:`TunerResult`): every trial with the wall time at its end, the
*incumbent* curve (after each trial: the test metric of the trial with the best validation metric
so far, i.e. what a user of the tuner would deploy) and :func:`time_to_match`, the wall time at
which the incumbent first reaches a target test metric (the hypergradient arm's).

Budget rules. ``budget_steps``: every trial trains ``steps_per_trial`` inner steps, and trials are
started while the steps spent stay within the budget, so the number of trials is
``budget_steps // steps_per_trial`` whatever the machine's load (the comparison a busy machine
cannot change). ``budget_s``: a trial is started while the elapsed time is below the budget, so the
tuner overruns by at most one trial, and a busy machine gets fewer trials. Either way at least
``min_trials`` are run. Each :class:`Trial` records the steps spent so far beside the wall time, so
the incumbent can be read against either (:func:`incumbent`, :func:`steps_to_match`). Optuna is an
optional extra (``pip install 'hypergradients[optuna]'``); :func:`require_optuna` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Space",
    "Trial",
    "TunerResult",
    "by_seed",
    "incumbent",
    "require_optuna",
    "steps_to_match",
    "time_to_match",
    "tpe",
]


@dataclass(frozen=True)
class Space:
    """One hyperparameter's search interval ``[low, high]``, sampled uniformly in log space if ``log``."""

    low: float
    high: float
    log: bool = True


@dataclass
class Trial:
    """One training run: the proposed values, its validation and test metric (lower is better),
    ``elapsed_s``, the tuner's wall time when it finished, and ``steps``, the inner training steps of
    all trials up to and including this one (0 when the objective's steps are not known)."""

    number: int
    params: dict[str, float]
    val: float
    test: float
    elapsed_s: float
    steps: int = 0

    def record(self) -> dict[str, Any]:
        """The trial as a JSON-ready record: ``number``, the proposed values, ``val``, ``test``,
        ``elapsed_s``, ``steps`` (a run's result file keeps these)."""
        return {
            "number": self.number,
            **self.params,
            "val": self.val,
            "test": self.test,
            "elapsed_s": self.elapsed_s,
            "steps": self.steps,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Trial:
        """The trial of a :meth:`record`, without its proposed values (what :func:`steps_to_match`,
        :func:`time_to_match` and :func:`incumbent` read)."""
        return cls(r["number"], {}, r["val"], r["test"], r["elapsed_s"], r["steps"])


@dataclass
class TunerResult:
    """Every trial in order, and the trial with the lowest validation metric."""

    trials: list[Trial]
    best: Trial
    wall_s: float
    budget_s: float | None
    budget_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def require_optuna() -> Any:
    """The ``optuna`` module, or an ``ImportError`` saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "the optuna arm needs Optuna, an optional extra: pip install "
            "'hypergradients[optuna]' (or leave 'optuna' out of arms)"
        ) from None
    return optuna


def tpe(
    objective: Callable[[dict[str, float]], tuple[float, float]],
    space: Mapping[str, Space],
    *,
    budget_s: float | None = None,
    budget_steps: int | None = None,
    steps_per_trial: int | None = None,
    seed: int = 0,
    min_trials: int = 1,
    max_trials: int = 1000,
    on_trial: Callable[[Trial], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TunerResult:
    """Minimise ``objective(params) -> (val, test)`` over ``space`` with Optuna's TPE sampler (seeded).

    Give one budget: ``budget_steps`` with ``steps_per_trial`` (the inner steps each call of
    ``objective`` trains: trials run while ``(n + 1)·steps_per_trial <= budget_steps``), or
    ``budget_s`` (trials start while the elapsed time is below it). At least ``min_trials``, at most
    ``max_trials``; ``on_trial`` is called after each (progress). Only ``val`` reaches the sampler.
    """
    if not space:
        raise ValueError("space must name at least one hyperparameter")
    for k, s in space.items():
        if not s.low < s.high or (s.log and s.low <= 0):
            raise ValueError(
                f"search interval of {k!r}: [{s.low:g}, {s.high:g}] must have low < high "
                "(and low > 0 on a log scale)"
            )
    if min_trials < 1 or max_trials < min_trials:
        raise ValueError(f"need 1 <= min_trials <= max_trials, got {min_trials} and {max_trials}")
    if (budget_s is None) == (budget_steps is None):
        raise ValueError("give one budget: budget_steps (with steps_per_trial) or budget_s")
    if budget_steps is not None and (steps_per_trial is None or steps_per_trial < 1 or budget_steps < 0):
        raise ValueError(
            f"budget_steps needs steps_per_trial >= 1 and a budget >= 0, got "
            f"{steps_per_trial!r} and {budget_steps!r}"
        )
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    trials: list[Trial] = []
    per = steps_per_trial or 0
    t0 = clock()

    def within_budget() -> bool:
        if budget_steps is not None:
            return (len(trials) + 1) * per <= budget_steps
        assert budget_s is not None
        return clock() - t0 < budget_s

    while len(trials) < max_trials and (len(trials) < min_trials or within_budget()):
        ot = study.ask()
        params = {k: float(ot.suggest_float(k, s.low, s.high, log=s.log)) for k, s in space.items()}
        val, test = objective(params)
        study.tell(ot, val)
        spent = (len(trials) + 1) * per
        trials.append(Trial(len(trials), params, float(val), float(test), clock() - t0, spent))
        if on_trial is not None:
            on_trial(trials[-1])
    best = min(trials, key=lambda t: t.val)
    return TunerResult(
        trials, best, clock() - t0, None if budget_s is None else float(budget_s), budget_steps
    )


def incumbent(trials: list[Trial]) -> list[tuple[float, float, float]]:
    """After each trial, ``(elapsed_s, best val so far, test metric of that best-val trial)``."""
    out: list[tuple[float, float, float]] = []
    best: Trial | None = None
    for t in trials:
        if best is None or t.val < best.val:
            best = t
        out.append((t.elapsed_s, best.val, best.test))
    return out


def steps_to_match(trials: list[Trial], target: float) -> int | None:
    """The inner steps spent when the incumbent's test metric (lower is better) first reaches
    ``target``, or ``None`` if it never does within these trials."""
    best: Trial | None = None
    for t in trials:
        if best is None or t.val < best.val:
            best = t
        if best.test <= target:
            return t.steps
    return None


def time_to_match(trials: list[Trial], target: float) -> float | None:
    """The wall time at which the incumbent's test metric (lower is better) first reaches ``target``,
    or ``None`` if it never does within these trials."""
    for elapsed, _, test in incumbent(trials):
        if test <= target:
            return elapsed
    return None


def by_seed(xs: Sequence[float | None], unit: str) -> str:
    """Steps or seconds to match, one per seed, ``/``-separated; ``None`` (never matched) as ``never``."""
    return "/".join("never" if v is None else f"{v:,.0f}{unit}" for v in xs)
