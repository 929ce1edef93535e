"""The Optuna (TPE) arm: budget rule, seeding, the incumbent curve and the time to match a target."""

from __future__ import annotations

import math
import sys

import pytest

from hypergradients.experiments.optuna_arm import Space, Trial, incumbent, require_optuna, time_to_match, tpe

pytest.importorskip("optuna")


class FakeClock:
    """Each objective call advances the clock by one second: the budget rule becomes exact."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _objective(clock: FakeClock):
    def f(p: dict[str, float]) -> tuple[float, float]:
        clock.t += 1.0
        v = (math.log10(p["decay"]) + 2.0) ** 2   # minimum at decay = 1e-2
        return v, v + 0.5
    return f


def test_trials_start_while_under_budget_and_tpe_finds_the_minimum():
    clock = FakeClock()
    res = tpe(_objective(clock), {"decay": Space(1e-5, 1.0)}, budget_s=30.0, seed=0, clock=clock)
    # trials start at t = 0, 1, ..., 29 (elapsed below 30): exactly 30 of them
    assert len(res.trials) == 30 and res.trials[-1].elapsed_s == 30.0
    assert res.best.val == min(t.val for t in res.trials)
    # 30 TPE trials on a 1-D log interval of 5 decades: within a quarter decade of the minimum
    # (a random search has a 1 − 0.9^30 ≈ 96 % chance too; TPE concentrates near it)
    assert abs(math.log10(res.best.params["decay"]) + 2.0) < 0.25
    assert all(1e-5 <= t.params["decay"] <= 1.0 for t in res.trials)


def test_same_seed_same_trials():
    a = tpe(_objective(FakeClock()), {"decay": Space(1e-5, 1.0)}, budget_s=5.0, seed=3, clock=FakeClock())
    b = tpe(_objective(FakeClock()), {"decay": Space(1e-5, 1.0)}, budget_s=5.0, seed=3, clock=FakeClock())
    assert [t.params for t in a.trials] == [t.params for t in b.trials]


def test_min_trials_run_even_without_budget():
    clock = FakeClock()
    res = tpe(_objective(clock), {"decay": Space(1e-5, 1.0)}, budget_s=0.0, min_trials=2, clock=clock)
    assert len(res.trials) == 2


def test_incumbent_and_time_to_match():
    trials = [Trial(0, {}, 3.0, 2.0, 1.0), Trial(1, {}, 4.0, 0.1, 2.0),   # better test, worse val: not deployed
              Trial(2, {}, 2.0, 1.5, 3.0), Trial(3, {}, 1.0, 0.9, 4.0)]
    assert incumbent(trials) == [(1.0, 3.0, 2.0), (2.0, 3.0, 2.0), (3.0, 2.0, 1.5), (4.0, 1.0, 0.9)]
    assert time_to_match(trials, 1.5) == 3.0
    assert time_to_match(trials, 0.9) == 4.0
    assert time_to_match(trials, 0.5) is None


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\] must have low < high \(and low > 0"):
        tpe(lambda p: (0.0, 0.0), {"decay": Space(0.0, 1.0)}, budget_s=1.0)


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"hypergradients\[optuna\]"):
        require_optuna()
