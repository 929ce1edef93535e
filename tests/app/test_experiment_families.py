"""The ``families`` experiment: every family's --smoke configuration runs and writes its folder
(config, result, metrics, report, figures), the hyperparameter count is printed before training,
a cut run resumed ends as one never stopped, and bad settings name their key."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypergradients.app.config import ConfigError, read_toml, resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments.families import FAMILIES, NOISY, check, flip_labels, flipped_auc

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

FIGURES = {"augment": "augmented.png", "distill": "distilled.png"}  # besides loss_curves.png


def _run(tmp: Path, *sets: str, resume: bool = False) -> dict:
    exp = get("families")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=list(sets))
    res = exp.run(RunContext(config=cfg, out=tmp, device=torch.device("cpu"), progress=False, resume=resume))
    assert res.result is not None and res.result_file == tmp / "families.json"
    return res.result


@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_writes_the_run_folder(family: str, tmp_path: Path) -> None:
    result = _run(tmp_path, f"family={family}")
    arms = [r["arm"] for r in result["rows"]]
    assert arms == ["tuned", "baseline"] + (["real-k"] if family == "distill" else [])
    tuned = result["rows"][0]
    assert tuned["hyperparameters"] == result["hyperparameters"] > 0 and tuned["hyper_steps"] == "3/3"
    assert all(0 <= r["test_acc"] <= 1 for r in result["rows"])
    for name in (
        "config.toml",
        "families.json",
        "report.md",
        "metrics.jsonl",
        "loss_curves.png",
        FIGURES.get(family, "loss_curves.png"),
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "families.json").read_text()) == result
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in lines} == set(arms) and len(lines) == 3 * len(arms)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# families: ") and FIGURES.get(family, "loss_curves") in report
    assert ("flipped_auc" in report) == (family in NOISY)
    assert ("changes a test image by" in report) == (family == "augment")
    if family in NOISY:  # 20% of the 120 smoke training labels flipped
        assert 0 <= tuned["flipped_auc"] <= 1 and "24 training labels were flipped" in report
    assert read_toml(tmp_path / "config.toml")["family"] == family


def test_distill_soft_labels_count(tmp_path: Path) -> None:
    result = _run(
        tmp_path, "family=distill", "distill.per_class=2", "distill.soft_labels=true", "train.rounds=1"
    )
    assert result["hyperparameters"] == 10 * 2 * 64 + 10 * 2 * 10


def test_cli_prints_the_count_before_training(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypergradients",
            "run",
            "families",
            "--smoke",
            "--set",
            "family=augment",
            "--set",
            "train.rounds=1",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # smoke: U-Net depth 2, wf 1 (2 and 4 filters) on 1 channel + noise: (2·2·9+2) + (2·2·9+2)
    # + (4·2·9+4) + (4·4·9+4) + (4·2·2·2+2) + (2·4·9+2) + (2·2·9+2) + (1·2+1) = 449.
    first = out.stderr.splitlines()[0]
    assert first.startswith("augment (AugmentNet): 449 hyperparameters"), out.stderr


def test_a_cut_run_resumed_ends_as_one_never_stopped(tmp_path: Path) -> None:
    full = _run(tmp_path / "full", "family=distill")
    _run(tmp_path / "cut", "family=distill", "train.rounds=2")
    resumed = _run(tmp_path / "cut", "family=distill", resume=True)
    for a, b in zip(full["rows"], resumed["rows"], strict=True):
        assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


def test_bad_sizes_name_their_key(tmp_path: Path) -> None:
    exp = get("families")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=["data.n_train=100000"])
    with pytest.raises(ConfigError, match=r"'data\.n_train'"):
        check(cfg)
    for sets, msg in (
        (["family=distill", "distill.per_class=50"], r"'distill\.per_class': 50 examples of"),
        (["family=augment", "augment.depth=5"], r"'augment\.depth': 5 needs image sides divisible"),
        (["family=dropout", "model.hidden=[]"], r"'model\.hidden': family=dropout drops hidden"),
    ):
        with pytest.raises(ConfigError, match=msg):
            check(resolve(exp.schema, smoke=exp.smoke, sets=sets))


def test_flipped_labels_and_their_auc() -> None:
    y = torch.arange(50) % 5
    out, mask = flip_labels(y, 5, 0.2, seed=0)
    assert int(mask.sum()) == 10 and bool((out[mask] != y[mask]).all()) and torch.equal(out[~mask], y[~mask])
    assert bool(((out >= 0) & (out < 5)).all())
    flipped = torch.tensor([True, True, False, False, False])
    assert flipped_auc(torch.tensor([0.1, 0.2, 1.0, 1.5, 0.9]), flipped) == 1.0  # all clean above
    assert flipped_auc(torch.tensor([2.0, 2.0, 1.0, 1.5, 0.9]), flipped) == 0.0  # all clean below
    # clean 1.0, 0.15, 0.9 against flipped 0.1, 0.9: pairs (>, >), (>, <), (>, =) -> (2 + 1 + 1.5)/6
    assert flipped_auc(torch.tensor([0.1, 0.9, 1.0, 0.15, 0.9]), flipped) == pytest.approx(4.5 / 6)
    assert math.isnan(flipped_auc(torch.ones(3), torch.zeros(3, dtype=torch.bool)))
