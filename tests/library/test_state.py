"""Solver state as a value: init, ``info.state``, the in-place compatibility update, round trips
through ``state_dict``/``torch.save``/``torch.load(weights_only=True)``, and mismatch errors."""

from __future__ import annotations

import io

import pytest
import torch

import hypergradients as hg
import problems as P


def hg_of(prob: P.Problem, method: hg.Method, **kw: object) -> tuple[dict, hg.Info]:
    return hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, prob.hparams, method=method,
                            return_info=True, **kw)  # type: ignore[call-overload,no-any-return]


def roundtrip(d: dict) -> dict:
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # type: ignore[no-any-return]


def test_info_state_is_the_next_value_and_the_passed_state_follows_it(logistic: P.Problem) -> None:
    # Value style: info.state is a new object; the object passed in is updated to equal it
    # (compatibility with callers that pass the same SolverState to successive calls).
    s0 = hg.SolverState()
    _, i1 = hg_of(logistic, hg.CG(tol=1e-10), state=s0)
    assert i1.state is not None and i1.state is not s0
    assert i1.state == s0 and s0.calls == 1 and s0.method == "CG" and s0.p is not None
    # Without a state, the call still returns the next one: passing it on warm-starts.
    _, j1 = hg_of(logistic, hg.CG(tol=1e-10))
    assert j1.state is not None and j1.state.calls == 1 and "warm_start" not in j1.extra
    _, j2 = hg_of(logistic, hg.CG(tol=1e-10), state=j1.state)
    assert j2.extra["warm_start"] == 1.0 and j2.hvps <= 2
    assert j2.state is not None and j2.state.calls == 2
    # The value j1.state was updated in place by that call (the documented convenience).
    assert j1.state.calls == 2


@pytest.mark.parametrize("method", [hg.CG(tol=1e-10), hg.Auto(), hg.Neumann(iters=5), hg.Nystrom(rank=4),
                                    hg.Exact(), hg.Identity(), hg.Unrolled(steps=2, lr=0.1)],
                         ids=lambda m: type(m).__name__)
def test_state_dict_round_trips_through_torch_save_weights_only(logistic: P.Problem,
                                                                method: hg.Method) -> None:
    _, info = hg_of(logistic, method, state=hg.SolverState())
    assert info.state is not None
    d = info.state.state_dict()
    back = hg.SolverState.from_state_dict(roundtrip(d))
    assert back.method == info.state.method == type(method).__name__ and back.calls == 1
    for f in ("lambda_min", "lambda_max", "lambda_max_age"):
        assert getattr(back, f) == getattr(info.state, f)
    if info.state.p is None:
        assert back.p is None
    else:
        assert back.p is not None and all(torch.equal(back.p[k], info.state.p[k]) for k in info.state.p)
    loaded = hg.SolverState()
    loaded.load_state_dict(roundtrip(d))
    assert loaded.calls == 1 and loaded.method == back.method
    # The loaded state continues exactly as the original would.
    g1, a = hg_of(logistic, method, state=back)
    g2, b = hg_of(logistic, method, state=info.state)
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and a.hvps == b.hvps


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


def test_load_state_dict_of_a_bad_dict_changes_nothing() -> None:
    # All or nothing: from_state_dict checks every entry before load_state_dict assigns any.
    s = hg.SolverState(p={"w": torch.ones(3)}, calls=4, lambda_max=2.0, method="CG")
    for bad in ({**s.state_dict(), "calls": -1}, {**s.state_dict(), "p": [1]}, {"version": 1}):
        with pytest.raises(hg.HypergradientError):
            s.load_state_dict(bad)
        assert s.calls == 4 and s.lambda_max == 2.0 and s.method == "CG" and s.p is not None
        assert torch.equal(s.p["w"], torch.ones(3))


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


def test_a_state_of_other_weights_is_refused(logistic: P.Problem) -> None:
    _, info = hg_of(logistic, hg.CG())
    assert info.state is not None and info.state.p is not None
    k = next(iter(logistic.params))
    p32 = {**info.state.p, k: info.state.p[k].float()}
    with pytest.raises(hg.StateMismatchError, match=rf"p\['{k}'\] has shape .*torch\.float32.*but the "
                                                    rf"weight '{k}' has .*torch\.float64"):
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
    state = hg.SolverState()
    ages, hvps = [], []
    for _ in range(7):
        _, info = hg_of(logistic, m, state=state, residual=False)
        ages.append(info.extra["lambda_max_age"])
        hvps.append(info.hvps)
    assert ages == [0, 1, 2, 0, 1, 2, 0]
    assert hvps == [24, 4, 4, 24, 4, 4, 24]
    with pytest.raises(hg.HypergradientError, match=r"Neumann\.refresh_every must be a positive integer, got 0"):
        hg.Neumann(refresh_every=0)


def test_neumann_refreshes_a_stale_lambda_max_when_the_series_grows(logistic: P.Problem) -> None:
    # A cached λ_max a third of the true one gives α·λ_max ≈ 3 > 2: the series grows, the growth
    # check (every 4th term, free) catches it at term 4, λ_max is re-estimated and the series
    # rerun: the answer is the fresh one, bit for bit, at 4 wasted HVPs.
    m = hg.Neumann(iters=20)
    fresh, i0 = hg_of(logistic, m)
    stale = hg.SolverState(method="Neumann", lambda_max=P.lambda_max(logistic) / 3)
    g, info = hg_of(logistic, m, state=stale)
    assert info.extra["refreshed_on_growth"] == 1.0 and info.extra["lambda_max_age"] == 0
    assert all(torch.equal(g[k], fresh[k]) for k in g)
    assert info.hvps == i0.hvps + 4
    assert info.state is not None and info.state.lambda_max == i0.extra["lambda_max"]
    # A cached λ_max that is merely a little off is kept: no growth, no refresh.
    near = hg.SolverState(method="Neumann", lambda_max=1.2 * P.lambda_max(logistic))
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
    _, i3 = hg.hypergradient(logistic.outer_loss, logistic.inner_loss, logistic.params, far, method=m,
                             return_info=True, state=i2.state)
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


@pytest.mark.parametrize("method", [hg.CG(tol=1e-8), hg.Auto(), hg.Neumann(iters=10), hg.Nystrom(rank=5)],
                         ids=lambda m: type(m).__name__)
def test_value_style_and_one_shared_object_give_the_same_sequence(logistic: P.Problem,
                                                                  method: hg.Method) -> None:
    # Three calls along a drifting λ: passing info.state on, or one SolverState object to every
    # call (the pre-existing style), must be the same computation, bit for bit and HVP for HVP.
    shared = hg.SolverState()
    value: hg.SolverState | None = method.init(logistic.params)
    for step in range(3):
        hp = {k: v + 0.02 * step for k, v in logistic.hparams.items()}
        ga, ia = hg.hypergradient(logistic.outer_loss, logistic.inner_loss, logistic.params, hp, method=method,
                                  return_info=True, state=shared)
        gb, ib = hg.hypergradient(logistic.outer_loss, logistic.inner_loss, logistic.params, hp, method=method,
                                  return_info=True, state=value)
        assert all(torch.equal(ga[k], gb[k]) for k in ga) and ia.hvps == ib.hvps and ia.extra == ib.extra
        value = ib.state
    assert shared.calls == 3 and value is not None and value.calls == 3
