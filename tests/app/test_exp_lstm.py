"""The ``lstm-dropout`` experiment: the --smoke run on a tiny PTB corpus written here writes its folder with
every arm over two seeds; the regularisers are the authors' (word dropout drops whole words, DropConnect
shares one keep tensor over both layers, the fixed arm draws the same masks as the tuned one); the results
do not depend on the number of processes; a resumed run reads finished units back and continues the
others from their checkpoints to the same numbers; the full configuration is the authors' recipe; bad
settings name their key before any file."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments.lstm_dropout import (
    FULL,
    SCHEMA,
    EarlyStop,
    Fixed,
    LSTMLanguageModel,
    Stopped,
    UnitDropout,
    WeightDrop,
    WordDropout,
    families,
    hyper_method,
    sequence_loss,
    with_preset,
)
from hypergradients.core.solvers import CG, Identity, Neumann
from hypergradients.hparams import Noise
from hypergradients.hparams.base import Batch
from hypergradients.hparams.objective import Objective, on_targets

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on the mat and the dog ran to the cat while a bird sang in the tree".split()


def _ptb(tmp: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    root = tmp / "ptb"
    root.mkdir(exist_ok=True)
    for name, lines in (("train", 60), ("valid", 15), ("test", 15)):
        text = "\n".join(
            " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=g))
            for _ in range(lines)
        )
        (root / f"ptb.{name}.txt").write_text(text + "\n")
    return root


def _run(tmp: Path, root: Path, *sets: str, resume: bool = False, out: str = "run"):
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{root}'", *sets])
    data = exp.check(cfg) if exp.check else None
    return exp.run(
        RunContext(
            config=cfg, out=tmp / out, device=torch.device("cpu"), progress=False, resume=resume, data=data
        )
    )


def _units(res) -> dict[str, dict]:
    return {u["folder"]: u for u in res.result["units"]}


def test_sequence_loss_is_the_mean_per_token():
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    y = torch.randint(7, (3, 5))
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
    assert torch.allclose(sequence_loss(logits, y).mean(), per_token, rtol=1e-12, atol=0)


def test_smoke_runs_every_arm_over_the_seeds(tmp_path: Path) -> None:
    res = _run(tmp_path, _ptb(tmp_path))
    out = tmp_path / "run"
    for name in (
        "config.toml",
        "lstm_dropout.json",
        "metrics.jsonl",
        "report.md",
        "val_curves.png",
        "keep.png",
        "snr.png",
    ):
        assert (out / name).is_file(), name
    rows = {r["arm"]: r for r in res.rows}
    assert [r["seeds"] for r in res.rows] == [2, 2, 2, 2]
    # 5 scalar rates; per-unit dropout on 3 sites of 8 units + 1 word rate + one 4·8 × 8 DropConnect tensor
    assert rows["Ours: IFT on the scalar rates"]["hyperparameters"] == 5
    assert rows["Ours, many: IFT on per-unit and per-weight rates"]["hyperparameters"] == 3 * 8 + 1 + 32 * 8
    assert rows["fixed dropout"]["hyperparameters"] == rows["no dropout"]["hyperparameters"] == 0
    units = _units(res)
    assert sorted(units) == [f"{a}-s{s}" for a in ("fixed", "none", "ours", "ours_many") for s in (0, 1)]
    for u in units.values():  # 8 steps, a hyper step every 2, an evaluation every 4
        assert [e["step"] for e in u["evals"]] == [4, 8]
        assert math.isclose(math.exp(u["best"]["test_loss"]), math.exp(u["best"]["test_loss"]))
        if u["arm"] in ("ours", "ours_many"):
            assert u["counts"]["steps"] == 4 and u["counts"]["applied"] == 4
            assert len(u["windows"]) == 2 and all(w["n"] == 2 for w in u["windows"])
            assert [k["step"] for k in u["keep"]] == [4, 8]
    # the paired differences are over the two seeds, with a standard error
    d = {(x["a"], x["b"], x["when"]): x for x in res.result["differences"]}
    ours_fixed = d[("Ours: IFT on the scalar rates", "fixed dropout", "at_best")]
    assert ours_fixed["seeds"] == 2 and math.isfinite(ours_fixed["se"])
    report = (out / "report.md").read_text()
    assert "total: 281 hyperparameters" in report and "Paired differences" in report
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(x["arm"], x["seed"]) for x in lines} == {
        (a, s) for a in ("fixed", "none", "ours", "ours_many") for s in (0, 1)
    }


def test_cpu_time_of_units_in_this_process_counts_once(tmp_path: Path) -> None:
    root = _ptb(tmp_path)
    c0 = time.process_time()
    res = _run(tmp_path, root, "arms=['none','ours']", "seeds=1", "jobs=1")
    spent = time.process_time() - c0
    units = sum(u["cpu_s"] for u in res.result["units"])
    # the units ran here: the total is theirs plus this process's overhead, at most what it spent
    assert units <= res.result["cpu_s"] <= spent


def test_results_do_not_depend_on_the_processes(tmp_path: Path) -> None:
    root = _ptb(tmp_path)
    one = _run(tmp_path, root, "arms=['none','ours_many']", "jobs=1", out="one")
    two = _run(tmp_path, root, "arms=['none','ours_many']", "jobs=2", out="two")
    keys = ("best", "last", "keep", "windows", "counts")
    a, b = _units(one), _units(two)
    assert sorted(a) == sorted(b)
    for k in a:
        for key in keys:
            got, want = b[k][key], a[k][key]
            if key in ("best", "last"):  # timings differ; the losses are bitwise equal
                got = {x: got[x] for x in ("step", "val_loss", "test_loss")}
                want = {x: want[x] for x in ("step", "val_loss", "test_loss")}
            assert got == want, (k, key)


def test_resume_reads_finished_units_and_continues_the_others(tmp_path: Path) -> None:
    root = _ptb(tmp_path)
    first = _run(tmp_path, root, "arms=['ours','fixed']", "seeds=1")
    # ours-s0 as if killed after its last checkpoint: no result.json, so the resume continues it
    (tmp_path / "run" / "ours-s0" / "result.json").unlink()
    again = _run(tmp_path, root, "arms=['ours','fixed']", "seeds=1", resume=True)
    keys = ("best", "last", "keep", "windows", "counts")
    a, b = _units(first), _units(again)
    for k in a:
        for key in keys:
            got, want = b[k][key], a[k][key]
            if key in ("best", "last"):
                got = {x: got[x] for x in ("step", "val_loss", "test_loss")}
                want = {x: want[x] for x in ("step", "val_loss", "test_loss")}
            assert got == want, (k, key)


def test_optuna_and_sweep_units(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    res = _run(tmp_path, _ptb(tmp_path), "arms=['ours','optuna','sweep']", "seeds=1")
    opt = res.result["optuna"]["rows"][0]
    assert opt["trials"] == 2 and opt["steps"] == 2 * 8  # the budget: trials × train.steps inner steps
    assert "tpe_steps_to_match_ours" in opt and "ours_steps_to_match_tpe" in opt
    unit = _units(res)["optuna-s0"]
    assert all(0 <= v <= 0.7 for v in unit["best_params"].values()) and len(unit["best_params"]) == 5
    # the sweep: 1 hyper lr × 1 frequency × 2 approximations, seed 0 only
    assert [(r["hyper_lr"], r["every"], r["method"]) for r in res.result["sweep"]] == [
        (1e-2, 2, "identity"),
        (1e-2, 2, "cg-2"),
    ]
    assert (tmp_path / "run" / "optuna.png").is_file()
    assert "## Sweep" in res.report.read_text() and "## Optuna" in res.report.read_text()


def _tiny_model() -> LSTMLanguageModel:
    torch.manual_seed(0)
    return LSTMLanguageModel(20, 6, 6).double()


def test_the_fixed_arm_draws_the_masks_of_the_tuned_arm() -> None:
    cfg = resolve(SCHEMA, sets=["dropout.rate=0.4"])
    model = _tiny_model()
    tuned = families({**cfg, "dropout.init": 0.4}, model, "ours")
    fixed = families(cfg, model, "fixed")
    assert all(isinstance(f, Fixed) and not f.tensors() for f in fixed)
    x = torch.randint(20, (3, 5))
    b = Batch(x, torch.randint(20, (3, 5)), torch.arange(3))
    w = dict(model.named_parameters())
    lt = Objective(model, tuned, on_targets(sequence_loss))
    lf = Objective(model, fixed, on_targets(sequence_loss))
    hp = {k: t for f in tuned for k, t in f.tensors().items()}
    for seed in (1, 2):
        a = lt.train(w, hp, b, forward=lt.live, noise=Noise(seed))
        c = lf.train(w, {}, b, forward=lf.live, noise=Noise(seed))
        assert torch.equal(a, c)
    # and the masks act: another noise sample gives another loss, no dropout yet another
    assert not torch.equal(
        lf.train(w, {}, b, forward=lf.live, noise=Noise(1)),
        lf.train(w, {}, b, forward=lf.live, noise=Noise(2)),
    )


def test_word_dropout_drops_whole_words() -> None:
    model = _tiny_model()
    fam = WordDropout(model, init=0.5, temperature=1e-3)  # nearly hard masks
    x = torch.tensor([[3, 4, 3, 5, 3], [4, 4, 3, 5, 6]])
    theta = fam.tensors()["dropoute"]
    (hook,) = fam.hooks({"dropoute": theta}, Noise(7).sampler())
    emb = model.embed(x)
    out = hook.fn(model.embed, (x,), emb)
    scale = (out / emb)[..., 0].detach()
    for word in (3, 4, 5, 6):  # one factor per word, wherever it occurs in the minibatch
        vals = scale[x == word]
        assert torch.allclose(vals, vals[:1].expand_as(vals))
        assert float(vals[0]) == pytest.approx(0.0, abs=1e-6) or float(vals[0]) == pytest.approx(
            2.0, rel=1e-6
        )
    assert fam.count() == 1 and fam.describe().groups == {"embed (20 words)": 1}


def test_shared_dropconnect_is_one_tensor_for_both_layers() -> None:
    model = _tiny_model()
    fam = WeightDrop(
        model,
        ["rnn0.weight_hh_l0", "rnn1.weight_hh_l0"],
        shared=True,
        scalar=False,
        init=0.5,
        temperature=0.1,
    )
    assert list(fam.tensors()) == ["wdrop"] and fam.count() == 24 * 6
    w = dict(model.named_parameters())
    out = fam.model_weights(w, fam.tensors(), Noise(3).sampler())
    m0 = out["rnn0.weight_hh_l0"] / w["rnn0.weight_hh_l0"]
    m1 = out["rnn1.weight_hh_l0"] / w["rnn1.weight_hh_l0"]
    assert not torch.allclose(m0, m1)  # each layer draws its own mask from the shared rates
    theta = fam.tensors()["wdrop"]
    g = torch.autograd.grad((out["rnn0.weight_hh_l0"].sum() + out["rnn1.weight_hh_l0"].sum()), theta)[0]
    assert g.shape == (24, 6) and bool((g != 0).all())  # both layers reach the one tensor
    each = WeightDrop(
        model,
        ["rnn0.weight_hh_l0", "rnn1.weight_hh_l0"],
        shared=False,
        scalar=True,
        init=0.5,
        temperature=0.1,
    )
    assert each.count() == 2
    with pytest.raises(ValueError, match="equal shapes"):
        WeightDrop(
            LSTMLanguageModel(20, 4, 6, tie=True),
            ["rnn0.weight_hh_l0", "rnn1.weight_hh_l0"],
            shared=True,
            scalar=False,
            init=0.5,
            temperature=0.1,
        )


def test_scalar_unit_dropout_is_one_rate_for_the_site() -> None:
    model = _tiny_model()
    one = UnitDropout(model, "rnn1:input", name="dropouth", scalar=True, init=0.8, temperature=0.1)
    many = UnitDropout(model, "rnn1:input", name="dropouth", scalar=False, init=0.8, temperature=0.1)
    assert one.count() == 1 and many.count() == 6
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    (h1,) = one.hooks(one.tensors(), Noise(5).sampler())
    (h2,) = many.hooks(many.tensors(), Noise(5).sampler())
    assert torch.equal(h1.fn(model.rnn1, (x,))[0], h2.fn(model.rnn1, (x,))[0])  # same rates, same masks


def test_tied_model_shares_the_embedding() -> None:
    m = LSTMLanguageModel(30, 6, 5, tie=True)
    assert m.decoder.weight is m.embed.weight and m.rnn1.hidden_size == 6


def test_hyper_method_names() -> None:
    cfg = resolve(SCHEMA)
    assert isinstance(hyper_method(cfg, "identity"), Identity)
    n = hyper_method(cfg, "neumann-2")  # the paper's 2 terms after the first: 3 terms of the series
    assert isinstance(n, Neumann) and n.iters == 3 and n.alpha == "auto"
    c = hyper_method(cfg, "cg-5")
    assert isinstance(c, CG) and c.iters == 5
    for bad in ("neumann-0", "cg", "neumann", "exact"):
        with pytest.raises(ConfigError, match=r"hyper\.method"):
            hyper_method(cfg, bad)


def test_bad_method_is_refused_before_any_file(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(
        exp.schema, smoke=exp.smoke, sets=[f"data.root='{_ptb(tmp_path)}'", "hyper.method='neumann'"]
    )
    with pytest.raises(ConfigError, match=r"hyper\.method.*neumann-K"):
        exp.check(cfg) if exp.check else None


def test_evaluations_must_fall_on_hyper_steps(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{_ptb(tmp_path)}'", "hyper.every=3"])
    with pytest.raises(ConfigError, match=r"eval_every.*multiple"):
        exp.check(cfg) if exp.check else None


def test_a_run_shorter_than_one_evaluation_is_refused(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{_ptb(tmp_path)}'", "train.steps=2"])
    with pytest.raises(ConfigError, match=r"train\.steps.*before the first evaluation"):
        exp.check(cfg) if exp.check else None


def test_early_stop_after_patience_evaluations() -> None:
    stop = EarlyStop(2)
    for v in (3.0, 2.0, 2.5):
        stop.on_round_end({"val_loss": v})
    stop.on_round_end({"round": 4})  # no evaluation: nothing counted
    with pytest.raises(Stopped):
        stop.on_round_end({"val_loss": 2.1})
    again = EarlyStop(2)
    again.load_state_dict(stop.state_dict())
    assert (again.best, again.bad) == (2.0, 2)


def test_missing_corpus_names_the_key(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{tmp_path}'"])  # a folder without PTB
    with pytest.raises(ConfigError, match=r"(?s)data\.root.*none of the PTB files.*King James Bible shipped"):
        exp.check(cfg) if exp.check else None


def test_default_corpus_needs_no_bible_program(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # Debian's `bible` hidden, as on a machine without it
    exp = get("lstm-dropout")
    corpus = exp.check(resolve(exp.schema, smoke=exp.smoke)) if exp.check else None
    assert corpus is not None and corpus.name == "kjv" and corpus.vocab_size == exp.smoke["data.vocab"]


def test_sequence_too_long_for_the_data_names_the_key(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{_ptb(tmp_path)}'", "data.seq_len=5000"])
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        exp.check(cfg) if exp.check else None


def test_full_configuration_is_the_authors_recipe():
    cfg = with_preset(resolve(SCHEMA, sets=["config=full", "train.steps=7"]))
    assert cfg["train.steps"] == 7  # a key the user set keeps the user's value
    assert {k: v for k, v in cfg.items() if k in FULL and k != "train.steps"} == {
        k: v for k, v in FULL.items() if k != "train.steps"
    }
    expected = {
        "model.hidden": 650,
        "model.embed": 650,
        "model.tie": True,
        "data.vocab": 10_000,
        "data.seq_len": 70,
        "train.optimizer": "sgd",
        "train.lr": 30.0,
        "train.clip": 0.25,
        "train.batch_size": 40,
        "train.patience": 20,
        "hyper.every": 1,
        "hyper.method": "identity",
        "hyper.optimizer": "adam",
        "hyper.lr": 1e-3,
        "dropout.dropconnect": "shared",
        "dropout.embedding": True,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert with_preset(resolve(SCHEMA))["model.hidden"] == 128  # config=cpu: the defaults
