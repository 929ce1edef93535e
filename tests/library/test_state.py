"""Solver state as a value: each method's own frozen type, ``init``, ``info.state``, round trips
through ``state_dict``/``torch.save``/``torch.load(weights_only=True)`` (dicts written before the
types were split included), and mismatch errors."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

import hypergradients as hg
import problems as P


def hg_of(prob: P.Problem, method: hg.Method, **kw: object) -> tuple[dict, hg.Info]:
    return hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=method, return_info=True, **kw
    )  # type: ignore[call-overload,no-any-return]


def roundtrip(d: dict) -> dict:
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # type: ignore[no-any-return]


def test_info_state_is_the_next_value_and_the_state_passed_is_not_changed(logistic: P.Problem) -> None:
    # Value style: info.state is a new object of the method's own type; the state passed in stays
    # as it was (frozen), so the caller passes info.state on.
    s0 = hg.SolverState()
    _, i1 = hg_of(logistic, hg.CG(tol=1e-10), state=s0)
    assert isinstance(i1.state, hg.CGState) and i1.state is not s0
    assert i1.state.calls == 1 and i1.state.method == "CG" and i1.state.p is not None
    assert s0.calls == 0 and s0.method is None and type(s0) is hg.SolverState
    with pytest.raises(dataclasses.FrozenInstanceError):
        i1.state.calls = 5  # type: ignore[misc]
    # Without a state, the call still returns the next one: passing it on warm-starts.
    _, j1 = hg_of(logistic, hg.CG(tol=1e-10))
    assert j1.state is not None and j1.state.calls == 1 and "warm_start" not in j1.extra
    _, j2 = hg_of(logistic, hg.CG(tol=1e-10), state=j1.state)
    assert j2.extra["warm_start"] == 1.0 and j2.hvps <= 2
    assert j2.state is not None and j2.state.calls == 2 and j1.state.calls == 1


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        (hg.CG(tol=1e-8), hg.CGState),
        (hg.Auto(), hg.CGState),
        (hg.Neumann(iters=5), hg.NeumannState),
        (hg.Nystrom(rank=4), hg.NystromState),
        (hg.GMRES(tol=1e-8), hg.KrylovState),
        (hg.MINRES(tol=1e-8), hg.KrylovState),
        (hg.BiCGStab(tol=1e-8), hg.KrylovState),
        (hg.NormalCG(tol=1e-8), hg.KrylovState),
        (hg.Exact(), hg.SolverState),
        (hg.Identity(), hg.SolverState),
        (hg.Unrolled(steps=2, lr=0.1), hg.SolverState),
    ],
    ids=lambda m: type(m).__name__,
)
def test_each_method_keeps_its_own_state_type(
    logistic: P.Problem, method: hg.Method, kind: type[hg.SolverState]
) -> None:
    assert type(method.init(logistic.params)) is kind
    _, info = hg_of(logistic, method, state=hg.SolverState())
    assert type(info.state) is kind and info.state.method == type(method).__name__
    # Passing the same state object twice repeats the same computation: nothing was updated in it.
    state = info.state
    g1, a = hg_of(logistic, method, state=state)
    g2, b = hg_of(logistic, method, state=state)
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and a.hvps == b.hvps and a.extra == b.extra


FIELDS = ("p", "lambda_min", "lambda_max", "lambda_max_age", "sketch")


@pytest.mark.parametrize(
    "method",
    [
        hg.CG(tol=1e-10),
        hg.Auto(),
        hg.Neumann(iters=5),
        hg.Nystrom(rank=4),
        hg.GMRES(),
        hg.Exact(),
        hg.Identity(),
        hg.Unrolled(steps=2, lr=0.1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_state_dict_round_trips_through_torch_save_weights_only(
    logistic: P.Problem, method: hg.Method
) -> None:
    _, info = hg_of(logistic, method, state=hg.SolverState())
    assert info.state is not None
    d = info.state.state_dict()
    assert set(d) == {"version", "method", "calls", *FIELDS}  # one flat layout for every type
    back = hg.SolverState.from_state_dict(roundtrip(d))
    assert type(back) is type(info.state)
    assert back.method == info.state.method == type(method).__name__ and back.calls == 1
    for f in ("lambda_min", "lambda_max", "lambda_max_age"):
        assert getattr(back, f, None) == getattr(info.state, f, None)
    p_before, p_after = getattr(info.state, "p", None), getattr(back, "p", None)
    if p_before is None:
        assert p_after is None
    else:
        assert p_after is not None and all(torch.equal(p_after[k], p_before[k]) for k in p_before)
    # The loaded state continues exactly as the original would.
    g1, a = hg_of(logistic, method, state=back)
    g2, b = hg_of(logistic, method, state=info.state)
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and a.hvps == b.hvps


def test_state_dicts_written_before_the_types_were_split_load(logistic: P.Problem) -> None:
    # What HyperOptimizer.state_dict()["solver"] held when every method shared one SolverState:
    # the same flat layout, the unused entries at their defaults. Each loads as its method's type.
    n = {k: torch.zeros_like(t) for k, t in logistic.params.items()}
    base = {
        "version": 1,
        "calls": 3,
        "p": None,
        "lambda_min": None,
        "lambda_max": None,
        "lambda_max_age": 0,
        "sketch": None,
    }
    cg = hg.SolverState.from_state_dict(
        {**base, "method": "Auto", "p": n, "lambda_min": 0.5, "lambda_max": 9.0}
    )
    assert type(cg) is hg.CGState and cg.lambda_min == 0.5 and cg.calls == 3 and cg.p is not None
    neu = hg.SolverState.from_state_dict(
        {**base, "method": "Neumann", "lambda_max": 4.0, "lambda_max_age": 2}
    )
    assert type(neu) is hg.NeumannState and neu.lambda_max == 4.0 and neu.lambda_max_age == 2
    ex = hg.SolverState.from_state_dict({**base, "method": "Exact"})
    assert type(ex) is hg.SolverState and ex.method == "Exact"
    empty = hg.SolverState.from_state_dict({**base, "method": None, "calls": 0})
    assert type(empty) is hg.SolverState
    # ... and the loaded Neumann state is used: λ_max reused, no power iterations.
    _, info = hg_of(logistic, hg.Neumann(iters=5), state=neu, residual=False)
    assert info.extra["lambda_max"] == 4.0 and info.extra["lambda_max_age"] == 3 and info.hvps == 4


def test_from_state_dict_names_a_bad_entry() -> None:
    d = hg.SolverState().state_dict()
    with pytest.raises(hg.HypergradientError, match=r"'calls' must be an integer >= 0, got -1"):
        hg.SolverState.from_state_dict({**d, "calls": -1})
    with pytest.raises(hg.HypergradientError, match=r"'version' must be 1"):
        hg.SolverState.from_state_dict({**d, "version": 7})
    with pytest.raises(hg.HypergradientError, match=r"keys \['extra'\] are missing or unknown"):
        hg.SolverState.from_state_dict({**d, "extra": 1})
    with pytest.raises(hg.HypergradientError, match=r"'p' must be a dict of tensors or None"):
        hg.SolverState.from_state_dict({**d, "p": [1, 2]})
    # An entry the method's state type does not hold, set to something: not that method's state.
    with pytest.raises(
        hg.HypergradientError, match=r"'sketch' must be None in a state of hg\.CG \(a CGState\)"
    ):
        hg.SolverState.from_state_dict({**d, "method": "CG", "sketch": {"U": torch.ones(2)}})


def test_another_methods_state_is_refused(logistic: P.Problem) -> None:
    _, info = hg_of(logistic, hg.Neumann(iters=5))
    with pytest.raises(hg.StateMismatchError, match=r"made by hg\.Neumann, and hg\.CG cannot use it"):
        hg_of(logistic, hg.CG(), state=info.state)
    _, info = hg_of(logistic, hg.CG())
    with pytest.raises(hg.StateMismatchError, match=r"made by hg\.CG, and hg\.Nystrom cannot use it"):
        hg_of(logistic, hg.Nystrom(rank=3), state=info.state)
    # CG and Auto keep the same quantities with the same meaning: they share a state.
    _, i2 = hg_of(logistic, hg.Auto(), state=info.state)
    assert i2.extra["warm_start"] == 1.0
    # A state of another type, even one no method has stamped yet, is refused by its type.
    with pytest.raises(
        hg.StateMismatchError, match=r"state is a hg\.NeumannState, and hg\.CG keeps a hg\.CGState"
    ):
        hg_of(logistic, hg.CG(), state=hg.NeumannState(lambda_max=3.0))


def test_a_state_of_other_weights_is_refused(logistic: P.Problem) -> None:
    _, info = hg_of(logistic, hg.CG())
    assert info.state is not None and info.state.p is not None
    k = next(iter(logistic.params))
    p32 = {**info.state.p, k: info.state.p[k].float()}
    with pytest.raises(
        hg.StateMismatchError,
        match=rf"p\['{k}'\] has shape .*torch\.float32.*but the "
        rf"weight '{k}' has .*torch\.float64",
    ):
        hg_of(logistic, hg.CG(), state=info.state.replace(p=p32))
    renamed = {"other": next(iter(info.state.p.values()))}
    with pytest.raises(hg.StateMismatchError, match=r"missing \[.*\], unexpected \['other'\]"):
        hg_of(logistic, hg.CG(), state=info.state.replace(p=renamed))


# ------------------------------------------------------------------ Neumann's cached λ_max
def test_neumann_reuses_its_lambda_max_and_saves_the_power_iterations(logistic: P.Problem) -> None:
    m = hg.Neumann(iters=20, power_iters=20)
    g1, i1 = hg_of(logistic, m, state=m.init(logistic.params))
    assert i1.hvps == 20 + 19 + 1 and i1.extra["lambda_max_age"] == 0  # power, series, residual
    g2, i2 = hg_of(logistic, m, state=i1.state)
    assert i2.hvps == 19 + 1 and i2.extra["lambda_max_age"] == 1
    # The same point and the same λ_max: the same α, so the same series to the last bit.
    assert i2.extra["lambda_max"] == i1.extra["lambda_max"] and i2.extra["alpha"] == i1.extra["alpha"]
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    # Without a state, as before: the power iterations at every call.
    _, i0 = hg_of(logistic, m)
    assert i0.hvps == 40


def test_neumann_refreshes_lambda_max_every_n_calls(logistic: P.Problem) -> None:
    m = hg.Neumann(iters=5, refresh_every=3)
    state: hg.SolverState | None = hg.SolverState()
    ages, hvps = [], []
    for _ in range(7):
        _, info = hg_of(logistic, m, state=state, residual=False)
        ages.append(info.extra["lambda_max_age"])
        hvps.append(info.hvps)
        state = info.state
    assert ages == [0, 1, 2, 0, 1, 2, 0]
    assert hvps == [24, 4, 4, 24, 4, 4, 24]
    with pytest.raises(
        hg.HypergradientError, match=r"Neumann\.refresh_every must be a positive integer, got 0"
    ):
        hg.Neumann(refresh_every=0)


def test_neumann_refreshes_a_stale_lambda_max_when_the_series_grows(logistic: P.Problem) -> None:
    # A cached λ_max a third of the true one gives α·λ_max ≈ 3 > 2: the series grows, the growth
    # check (every 4th term, free) catches it at term 4, λ_max is re-estimated and the series
    # rerun: the answer is the fresh one, bit for bit, at 4 wasted HVPs.
    m = hg.Neumann(iters=20)
    fresh, i0 = hg_of(logistic, m)
    stale = hg.NeumannState(method="Neumann", lambda_max=P.lambda_max(logistic) / 3)
    g, info = hg_of(logistic, m, state=stale)
    assert info.extra["refreshed_on_growth"] == 1.0 and info.extra["lambda_max_age"] == 0
    assert all(torch.equal(g[k], fresh[k]) for k in g)
    assert info.hvps == i0.hvps + 4
    assert isinstance(info.state, hg.NeumannState) and info.state.lambda_max == i0.extra["lambda_max"]
    # A cached λ_max that is merely a little off is kept: no growth, no refresh.
    near = hg.NeumannState(lambda_max=1.2 * P.lambda_max(logistic))
    _, info2 = hg_of(logistic, m, state=near)
    assert "refreshed_on_growth" not in info2.extra and info2.hvps == 20


# ------------------------------------------------------------------ Nyström's sketch
def test_nystrom_reuses_its_sketch_while_it_stays_accurate(logistic: P.Problem) -> None:
    m = hg.Nystrom(rank=6)
    g1, i1 = hg_of(logistic, m, state=hg.SolverState(), residual=False)
    # Fresh: rank HVPs, and one for the residual that later reuse is measured against.
    assert i1.hvps == 6 + 1 and i1.residual is None and i1.state is not None
    g2, i2 = hg_of(logistic, m, state=i1.state)
    # Same point: the reused factor gives the same p (one HVP checks it), the same answer.
    assert i2.hvps == 1 and i2.extra["sketch_reused"] == 1.0 and i2.iterations == 0
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    # A far point (λ moved by 3 in log space: H changes a lot): the check fails, it re-sketches.
    far = {k: v + 3.0 for k, v in logistic.hparams.items()}
    _, i3 = hg.hypergradient(
        logistic.outer_loss,
        logistic.inner_loss,
        logistic.params,
        far,
        method=m,
        return_info=True,
        state=i2.state,
    )
    assert "sketch_reused" not in i3.extra and i3.hvps == 1 + 6 + 1
    # reuse=None: a sketch at every call; other options: a new sketch, not an error.
    _, i4 = hg_of(logistic, hg.Nystrom(rank=6, reuse=None), state=i1.state, residual=False)
    assert i4.hvps == 6
    _, i5 = hg_of(logistic, hg.Nystrom(rank=4), state=i1.state, residual=False)
    assert i5.hvps == 4 + 1 and "sketch_reused" not in i5.extra


def test_nystrom_refuses_a_sketch_of_other_weights(logistic: P.Problem, ridge: P.Problem) -> None:
    _, info = hg_of(ridge, hg.Nystrom(rank=3), state=hg.SolverState())
    with pytest.raises(hg.StateMismatchError, match=r"sketch U has \(6, 3\).*need \(18, 3\)"):
        hg_of(logistic, hg.Nystrom(rank=3), state=info.state)
