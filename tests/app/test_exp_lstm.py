"""The ``lstm-dropout`` experiment: the --smoke run on a tiny PTB corpus written here writes its folder,
the tuned arm counts its dropout and DropConnect hyperparameters, the optuna arm gets the IFT arm's
budget, a resumed run ends with the same rows, and bad settings name their key before any file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments.lstm_dropout import FULL, SCHEMA, LSTMLanguageModel, sequence_loss

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on the mat and the dog ran to the cat while a bird sang in the tree".split()


def _ptb(tmp: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    root = tmp / "ptb"
    root.mkdir()
    for name, lines in (("train", 60), ("valid", 15), ("test", 15)):
        text = "\n".join(
            " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=g))
            for _ in range(lines)
        )
        (root / f"ptb.{name}.txt").write_text(text + "\n")
    return root


def _run(tmp: Path, root: Path, *sets: str, resume: bool = False):
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{root}'", *sets])
    data = exp.check(cfg) if exp.check else None
    return exp.run(
        RunContext(
            config=cfg, out=tmp / "run", device=torch.device("cpu"), progress=False, resume=resume, data=data
        )
    )


def test_sequence_loss_is_the_mean_per_token():
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    y = torch.randint(7, (3, 5))
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))
    assert torch.allclose(sequence_loss(logits, y).mean(), per_token, rtol=1e-12, atol=0)


def test_smoke_ift_and_fixed(tmp_path: Path) -> None:
    res = _run(tmp_path, _ptb(tmp_path))
    out = tmp_path / "run"
    for name in ("config.toml", "lstm_dropout.json", "metrics.jsonl", "report.md", "ppl_vs_time.png"):
        assert (out / name).is_file(), name
    ift, fixed = res.rows
    # dropout on 8 embedding + 8 + 8 hidden units; DropConnect on two 4·8 × 8 recurrent matrices
    assert ift["hyperparameters"] == 8 * 3 + 2 * 32 * 8 and ift["hyper_steps"] == "2/2"
    assert fixed["hyperparameters"] == 0 and fixed["hyper_steps"] == "-"
    for r in res.rows:  # perplexity is exp of the loss per token, below the vocabulary size at the start
        assert math.isclose(r["test_ppl"], math.exp(r["test_loss"]), rel_tol=1e-12)
        assert 1 < r["test_ppl"]
    assert json.loads((out / "lstm_dropout.json").read_text())["rows"] == json.loads(json.dumps(res.rows))
    report = (out / "report.md").read_text()
    assert "Tuned keep probabilities" in report
    # two hyper steps at lr 1e-2 move a logit by at most ~0.02, a keep probability by < 0.02: said so
    assert 0 <= ift["keep_moved"] < 0.02 and "the tuning barely acted" in report


def test_resume_gives_the_same_rows(tmp_path: Path) -> None:
    root = _ptb(tmp_path)
    first = _run(tmp_path, root, "arms=['ift']")
    again = _run(tmp_path, root, "arms=['ift']", resume=True)
    keys = ("hyperparameters", "hyper_steps", "val_loss", "test_loss")
    assert [{k: r[k] for k in keys} for r in again.rows] == [{k: r[k] for k in keys} for r in first.rows]


def test_optuna_arm_gets_the_ift_budget(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    res = _run(tmp_path, _ptb(tmp_path), "arms=['ift','optuna']")
    opt = res.result["optuna"]
    assert math.isclose(opt["budget_s"], res.rows[0]["wall_s"])
    assert opt["trials"] >= 1 and len(opt["incumbent"]) == opt["trials"]
    assert res.rows[1]["hyperparameters"] == 3
    assert all(0.0 <= v <= 0.7 for v in opt["best_params"].values())
    assert "Optuna (TPE" in (tmp_path / "run" / "report.md").read_text()


def test_optuna_auto_budget_without_ift_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    with pytest.raises(ConfigError, match=r"optuna\.budget_s"):
        _run(tmp_path, _ptb(tmp_path), "arms=['optuna']")
    assert not (tmp_path / "run").exists()  # refused by check, before any file


def test_missing_corpus_names_the_key(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{tmp_path}'"])   # a folder without PTB
    with pytest.raises(ConfigError, match=r"(?s)data\.root.*none of the PTB files.*King James Bible shipped"):
        exp.check(cfg) if exp.check else None


def test_default_corpus_needs_no_bible_program(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))   # Debian's `bible` hidden, as on a machine without it
    exp = get("lstm-dropout")
    corpus = exp.check(resolve(exp.schema, smoke=exp.smoke)) if exp.check else None
    assert corpus is not None and corpus.name == "kjv" and corpus.vocab_size == exp.smoke["data.vocab"]


def test_sequence_too_long_for_the_data_names_the_key(tmp_path: Path) -> None:
    exp = get("lstm-dropout")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=[f"data.root='{_ptb(tmp_path)}'", "data.seq_len=5000"])
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        exp.check(cfg) if exp.check else None


def test_full_configuration_is_the_papers_model():
    from hypergradients.app.experiments.lstm_dropout import with_preset

    cfg = with_preset(resolve(SCHEMA, sets=["config=full", "train.rounds=7"]))
    assert cfg["model.hidden"] == cfg["model.embed"] == 650 and cfg["data.vocab"] == 10_000
    assert cfg["train.rounds"] == 7   # a key the user set keeps the user's value
    assert {k: v for k, v in cfg.items() if k in FULL and k != "train.rounds"} == {
        k: v for k, v in FULL.items() if k != "train.rounds"}
    assert with_preset(resolve(SCHEMA))["model.hidden"] == 64   # config=cpu: the defaults
    m = LSTMLanguageModel(100, 650, 650)
    assert m.rnn0.hidden_size == m.rnn1.hidden_size == 650
