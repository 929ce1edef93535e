"""The ``overfit-validation`` experiment (paper §5.1): its --smoke run writes the run folder with one
decay per weight, a few dozen hyper steps fit the 50 validation images, a cut run resumed ends as
one never stopped, and data it cannot have names its key before any file is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments.overfit_validation import check

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp: Path, *sets: str, resume: bool = False) -> dict[str, Any]:
    exp = get("overfit-validation")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=list(sets))
    res = exp.run(RunContext(config=cfg, out=tmp, device=torch.device("cpu"), progress=False, resume=resume))
    assert res.result is not None and res.result_file == tmp / "overfit_validation.json"
    return res.result


def test_smoke_writes_the_run_folder_with_one_decay_per_weight(tmp_path: Path) -> None:
    result = _run(tmp_path)
    rows = {(r["model"], r["arm"]): r for r in result["rows"]}
    arms = [
        "tuned",
        "untuned",
        "tuned, retrained on train",
        "tuned, retrained on train+val",
        "untuned, retrained on train+val",
    ]
    assert list(rows) == [(m, a) for m in ("linear", "mlp") for a in arms]
    # every weight and bias decayed: 784·10 + 10 (linear); 784·8 + 8 + 8·10 + 10 (smoke mlp, 8 hidden)
    assert (
        rows["linear", "tuned"]["hyperparameters"] == 7850 and rows["mlp", "tuned"]["hyperparameters"] == 6370
    )
    assert rows["linear", "untuned"]["hyperparameters"] == 0
    assert all(rows[m, "tuned"]["hyper_steps"] == "3/3" for m in ("linear", "mlp"))
    assert (result["n_train"], result["n_val"], result["n_test"]) == (50, 50, 100)
    for name in (
        "config.toml",
        "overfit_validation.json",
        "metrics.jsonl",
        "report.md",
        "accuracy.png",
        "linear/checkpoint.pt",
        "mlp/checkpoint.pt",
    ):
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # one line per hyper step and model, each with validation and test accuracy (the figure's points)
    tuned = [(r["model"], r["round"]) for r in lines if r["arm"] == "tuned"]
    assert tuned == [(m, i) for m in ("linear", "mlp") for i in (1, 2, 3)]
    assert all("val_acc" in r and "test_acc" in r for r in lines)
    assert "accuracy.png" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "overfit_validation.json").read_text()) == result


def test_the_decays_fit_the_validation_set(tmp_path: Path) -> None:
    # 40 hyper steps of the linear model (about a second): validation accuracy from the first hyper
    # step's 0.6 to above 0.9, far above what the same model reaches on test images. Without the
    # hyper steps (hyper.lr tiny) validation accuracy stays where plain training leaves it.
    # The fast settings of this check (not the paper's recipe, which takes hundreds of hyper steps).
    fast = (
        'models=["linear"]',
        "train.rounds=40",
        "train.inner_steps=10",
        "train.lr=1e-2",
        "hyper.optimizer=adam",
        "hyper.lr=0.1",
        "hyper.init=1e-3",
        "hyper.method=cg",
        "hyper.iters=20",
        "retrain=false",
    )
    tuned = _run(tmp_path / "a", *fast)["rows"][0]
    assert tuned["val_acc"] >= 0.9 > tuned["val_acc_first"] + 0.1
    assert tuned["val_acc"] - tuned["test_acc"] > 0.1
    frozen = _run(tmp_path / "b", *fast, "hyper.lr=1e-9")["rows"][0]
    assert frozen["val_acc"] < tuned["val_acc"] - 0.1


def test_a_cut_run_resumed_ends_as_one_never_stopped(tmp_path: Path) -> None:
    full = _run(tmp_path / "full")
    _run(tmp_path / "cut", "train.rounds=2")
    resumed = _run(tmp_path / "cut", resume=True)
    for a, b in zip(full["rows"], resumed["rows"], strict=True):
        # the clocks differ between runs; every other number is the same
        assert {k: v for k, v in a.items() if k not in ("wall_s", "cpu_s")} == {
            k: v for k, v in b.items() if k not in ("wall_s", "cpu_s")
        }


def test_missing_data_names_the_key(tmp_path: Path) -> None:
    exp = get("overfit-validation")
    with pytest.raises(ConfigError, match=r"'data\.n_train'"):
        check(resolve(exp.schema, sets=["data.n_train=999999"]))
    with pytest.raises(ConfigError, match=r"'data\.root'"):
        check(resolve(exp.schema, sets=["config=full", f"data.root={tmp_path}"]))
