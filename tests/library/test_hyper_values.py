"""The hyper step's values in natural units (``HyperOptimizer.natural`` / ``set_natural``, the
families' ``from_natural``, ``hypergradients.hparams.unconstrained``) and the solver's residual,
which the hyper step computes only when asked (``HyperSettings(residual=True)``)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import Tensor, nn

import hypergradients as hg
from hypergradients.core.derivatives import InnerDerivatives
from hypergradients.hparams import unconstrained

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _batches(seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(32, 6, generator=g, dtype=DT), torch.randn(24, 6, generator=g, dtype=DT)
    return (x, torch.randint(0, 3, (32,), generator=g)), (xv, torch.randint(0, 3, (24,), generator=g))


@pytest.fixture
def hvp_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every Hessian-vector product, counted where it is computed, whatever Info says."""
    count = [0]
    hvp = InnerDerivatives.hvp

    def counting(self: InnerDerivatives, v: dict) -> dict:
        count[0] += 1
        return hvp(self, v)

    monkeypatch.setattr(InnerDerivatives, "hvp", counting)
    return count


# ------------------------------------------------------------------ the residual, off by default
def test_identity_hyper_step_spends_no_hvp_and_reports_no_residual(hvp_counter: list[int]) -> None:
    model = _net()
    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model)], method=hg.Identity())
    bt, bv = _batches()
    res = hyper.step(bt, bv)
    assert res.applied and res.info is not None
    # T1-T2 needs no HVP at all: before, the step computed ‖Hp − v‖/‖v‖ for nobody (one HVP).
    assert hvp_counter[0] == 0 and res.info.hvps == 0
    assert res.info.residual is None and res.metrics()["residual"] is None


@pytest.mark.parametrize(
    ("method", "off", "on"),
    [
        (hg.Identity(), 0, 1),
        (hg.Neumann(iters=5, alpha=0.1), 4, 5),
        (hg.CG(iters=4, tol=0.0, damping=1.0), 4, 4),
    ],
    ids=["identity", "neumann", "cg"],
)
def test_residual_setting_costs_its_hvp_and_changes_nothing_else(
    hvp_counter: list[int], method: hg.Method, off: int, on: int
) -> None:
    # Off, no method reports a residual (CG has one anyway, but "off" means never, as in hg.hypergradient).
    bt, bv = _batches()
    out = {}
    for residual in (False, True):
        model = _net()
        hyper = hg.HyperOptimizer(
            model,
            [hg.WeightDecay(model, granularity="layer")],
            settings=hg.HyperSettings(method=method, residual=residual),
        )
        hvp_counter[0] = 0
        res = hyper.step(bt, bv)
        assert res.info is not None and hvp_counter[0] == res.info.hvps == (on if residual else off)
        assert (res.info.residual is not None) == residual
        assert (res.metrics()["residual"] is None) != residual
        out[residual] = {k: t.detach().clone() for k, t in hyper.hparams.items()}
    # The residual is a diagnostic: the same hypergradient, so the same step, bit for bit.
    assert all(torch.equal(out[False][k], out[True][k]) for k in out[False])


def test_fit_logs_the_residual_only_when_asked() -> None:
    (x, y), (xv, yv) = _batches()
    runs = {}
    for residual in (False, True):
        model = _net()
        res = hg.fit(
            model,
            [hg.WeightDecay(model)],
            (x, y),
            (xv, yv),
            rounds=3,
            inner_steps=2,
            batch_size=16,
            hyper=hg.HyperSettings(method=hg.Neumann(iters=4, alpha="auto"), residual=residual),
        )
        runs[residual] = res
        assert all((r["residual"] is None) != residual for r in res.metrics)
    assert [r["hvps"] + 1 for r in runs[False].metrics] == [r["hvps"] for r in runs[True].metrics]
    assert torch.equal(runs[False].natural["weight_decay"], runs[True].natural["weight_decay"])
    with pytest.raises(ValueError, match="residual must be True or False"):
        hg.HyperSettings(residual="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"give residual inside settings=hg\.HyperSettings"):
        hg.HyperOptimizer(_net(), [hg.WeightDecay(_net())], settings=hg.HyperSettings(), residual=True)


# ------------------------------------------------------------------ natural values in
def _every_family() -> list[hg.Family]:
    model = _net()
    return [
        hg.WeightDecay(model, granularity="weight", init=3e-3),
        hg.WeightDecay(model, name="wd_g"),
        hg.WeightDecay(model, granularity="layer", name="wd_l"),
        hg.Dropout(model, ["0"], init=0.7),
        hg.DropConnect(model, ["2.weight"], init=0.8),
        hg.ExampleWeights(5, init=0.5, dtype=DT),
        hg.ExampleWeights(5, init=3.0, parametrisation="softplus", dtype=DT, name="ew_s"),
        hg.LossReweighting(4, dtype=DT),
        hg.AugmentNet(1, depth=1, wf=1, dtype=DT),
        hg.DistilledData((6,), 3, soft_labels=True, lr=0.2, dtype=DT),
    ]


def test_from_natural_inverts_natural_for_every_family() -> None:
    g = torch.Generator().manual_seed(1)
    for fam in _every_family():
        own = fam.tensors()
        # new unconstrained values, their natural values, and back: the same natural values
        moved = {
            k: t.detach() + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in own.items()
        }
        nat = fam.natural(moved)
        back = fam.from_natural(nat)
        assert set(back) == set(own)
        for k in own:
            assert back[k].dtype == own[k].dtype and back[k].shape == own[k].shape
            # float64 through exp/log, sigmoid/logit, softplus, softmax/log: a few ulps of the values
            torch.testing.assert_close(fam.natural({**moved, **back})[k], nat[k], rtol=1e-12, atol=1e-14)


def test_values_outside_the_natural_domain_are_refused_by_key() -> None:
    model = _net()
    wd, drop = hg.WeightDecay(model, granularity="weight"), hg.Dropout(model, ["0"])
    ew = hg.ExampleWeights(4, dtype=DT)
    with pytest.raises(
        ValueError, match=r"'weight_decay\.0\.weight' at index \(1, 2\) is -1.*> 0 \(a decay\)"
    ):
        bad = torch.full((8, 6), 1e-3, dtype=DT)
        bad[1, 2] = -1
        wd.from_natural({"weight_decay.0.weight": bad})
    with pytest.raises(ValueError, match=r"in \(0, 1\) \(a keep probability\)"):
        unconstrained([drop], {"dropout": 1.0})
    with pytest.raises(ValueError, match=r"in \(0, 2\)"):
        unconstrained([ew], {"example_weights": 2.5})
    with pytest.raises(ValueError, match=r"must be > 0 .* and finite"):
        unconstrained([wd], {"weight_decay": float("nan")})
    with pytest.raises(ValueError, match=r"shape \(3,\) for a hyperparameter of shape \(8, 6\)"):
        unconstrained([wd], {"weight_decay.0.weight": torch.ones(3)})
    with pytest.raises(TypeError, match="must be a number or a tensor"):
        unconstrained([wd], {"weight_decay": "1e-3"})  # type: ignore[dict-item]
    dd = hg.DistilledData((2,), 2, soft_labels=True)
    with pytest.raises(ValueError, match="must sum to 1"):
        dd.from_natural({"distill.labels": torch.full((2, 2), 0.3)})

    class Plain(hg.Family):
        name = "plain"

        def tensors(self) -> dict[str, Tensor]:
            return {"plain": torch.zeros(())}

    with pytest.raises(NotImplementedError, match="override from_natural"):
        unconstrained([Plain()], {"plain": 1.0})


def test_unconstrained_takes_family_names_and_keys_keys_winning() -> None:
    model = _net()
    wd, drop = hg.WeightDecay(model, granularity="weight"), hg.Dropout(model, ["0"])
    u = unconstrained([wd, drop], {"weight_decay": 3e-4, "weight_decay.2.weight": 1e-2, "dropout": 0.8})
    assert set(u) == {"weight_decay.0.weight", "weight_decay.2.weight", "dropout.0.output"}
    torch.testing.assert_close(u["weight_decay.0.weight"], torch.full((8, 6), math.log(3e-4), dtype=DT))
    torch.testing.assert_close(u["weight_decay.2.weight"], torch.full((3, 8), math.log(1e-2), dtype=DT))
    torch.testing.assert_close(u["dropout.0.output"], torch.full((8,), math.log(0.8 / 0.2), dtype=DT))
    with pytest.raises(KeyError, match=r"no hyperparameter or family is called 'lr'.*strict=False"):
        unconstrained([wd, drop], {"weight_decay": 1e-3, "lr": 0.1})
    assert set(unconstrained([wd, drop], {"lr": 0.1}, strict=False)) == set()


def test_set_natural_keeps_the_hyper_optimizer_consistent() -> None:
    model = _net()
    fams = [hg.WeightDecay(model, granularity="weight"), hg.Dropout(model, ["0"])]
    hyper = hg.HyperOptimizer(model, fams, method=hg.Neumann(iters=3, alpha=0.1))
    bt, bv = _batches()
    hyper.step(bt, bv)  # the optimizer has a state (Adam's moments) before the values are set
    objects = {k: id(t) for k, t in hyper.hparams.items()}
    before = copy.deepcopy(hyper.state_dict())
    hyper.set_natural({"weight_decay": 3e-4, "dropout.0.output": torch.linspace(0.5, 0.9, 8, dtype=DT)})
    nat = hyper.natural()
    torch.testing.assert_close(nat["weight_decay.2.weight"], torch.full((3, 8), 3e-4, dtype=DT))
    torch.testing.assert_close(nat["dropout.0.output"], torch.linspace(0.5, 0.9, 8, dtype=DT))
    # the same tensor objects: the families, hyper.hparams and the optimizer see the new values
    assert {k: id(t) for k, t in hyper.hparams.items()} == objects
    assert {id(p) for g in hyper.optimizer.param_groups for p in g["params"]} == set(objects.values())
    assert all(hyper.hparams[k] is t for f in fams for k, t in f.tensors().items())
    # everything else is as it was: the optimizer's state, the solver state, the counts
    after = hyper.state_dict()
    assert after["steps"] == before["steps"] and after["solver"] == before["solver"]
    st_a, st_b = after["optimizer"]["state"], before["optimizer"]["state"]
    assert all(torch.equal(st_a[i][m], st_b[i][m]) for i in st_b for m in st_b[i])
    # the next step moves from the values set, as one from a copy restored with those values does
    buf = io.BytesIO()
    torch.save(after, buf)
    buf.seek(0)
    twin_model = _net()
    twin = hg.HyperOptimizer(
        twin_model,
        [hg.WeightDecay(twin_model, granularity="weight"), hg.Dropout(twin_model, ["0"])],
        method=hg.Neumann(iters=3, alpha=0.1),
    )
    twin.load_state_dict(torch.load(buf, weights_only=True))
    r1, r2 = hyper.step(bt, bv), twin.step(bt, bv)
    assert r1.applied and r2.applied
    assert all(torch.equal(hyper.hparams[k], twin.hparams[k]) for k in objects)


def test_set_natural_is_all_or_nothing_and_refuses_an_unknown_key() -> None:
    model = _net()
    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model, granularity="layer"), hg.Dropout(model, ["0"])])
    before = {k: t.detach().clone() for k, t in hyper.hparams.items()}
    with pytest.raises(ValueError, match="keep probability"):
        hyper.set_natural({"weight_decay": 1e-2, "dropout": 1.5})  # the decay is valid, the probability not
    with pytest.raises(KeyError, match="'momentum'"):
        hyper.set_natural({"weight_decay": 1e-2, "momentum": 0.9})
    assert all(torch.equal(before[k], hyper.hparams[k]) for k in before)
    hyper.set_natural({"weight_decay": 1e-2, "momentum": 0.9}, strict=False)
    assert float(hyper.natural()["weight_decay.0.weight"]) == pytest.approx(1e-2, rel=1e-12)
