"""The ``distill`` experiment: its --smoke run writes the run folder with 784 × 10 learned pixels,
the fixed inner L2 penalty is the stated one, the real draws take k images of each class, learned
images beat the real ones they started from, and a cut run resumed ends as one never stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments.distill_mnist import FixedL2, check, pick_per_class

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp: Path, *sets: str, resume: bool = False) -> dict[str, Any]:
    exp = get("distill")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=list(sets))
    res = exp.run(RunContext(config=cfg, out=tmp, device=torch.device("cpu"), progress=False, resume=resume))
    assert res.result is not None and res.result_file == tmp / "distill.json"
    return res.result


def test_smoke_writes_the_run_folder(tmp_path: Path) -> None:
    result = _run(tmp_path)
    assert result["hyperparameters"] == 784 * 10
    assert [r["arm"] for r in result["rows"]] == ["distilled", "co-trained", "real-1", "all"]
    assert [r["train_images"] for r in result["rows"]] == [10, 10, 10, 200]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["rows"][1]["test_acc"] == last["test_acc"]  # the co-trained model's final evaluation
    real = result["rows"][2]
    assert real["draws"] == 2 == len(result["real_draws"])
    assert real["test_acc"] == pytest.approx(sum(result["real_draws"]) / 2, abs=1e-12)
    assert result["eval_steps"] == 3 * 2  # as many steps as the tuned arm took
    for name in (
        "config.toml",
        "distill.json",
        "metrics.jsonl",
        "report.md",
        "distilled.png",
        "distilled/checkpoint.pt",
    ):
        assert (tmp_path / name).is_file(), name
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "distill.json").read_text()) == result


def test_fixed_l2_is_half_gamma_squared_norm_and_has_no_hyperparameter() -> None:
    params = {
        "a": torch.tensor([1.0, -2.0], dtype=torch.float64),
        "b": torch.tensor([[3.0]], dtype=torch.float64),
    }
    fam = FixedL2(0.1)
    assert fam.tensors() == {} and fam.count() == 0
    pen = fam.penalty(params, {})
    assert pen is not None and float(pen) == pytest.approx(0.5 * 0.1 * (1 + 4 + 9), rel=1e-15)
    assert FixedL2(0.0).penalty(params, {}) is None


def test_pick_per_class_takes_k_of_each_class_in_class_order() -> None:
    y = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
    assert pick_per_class(y, 3, 2, None).tolist() == [1, 3, 2, 5, 0, 4]
    drawn = pick_per_class(y, 3, 2, torch.Generator().manual_seed(0))
    assert y[drawn].tolist() == [0, 0, 1, 1, 2, 2] and len(set(drawn.tolist())) == 6


def _final_outer_loss(out: Path) -> float:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return float(lines[-1]["val_loss"])


def test_learned_images_beat_the_real_ones_they_started_from(tmp_path: Path) -> None:
    # Started from the first real image of each class, 60 hyper steps on 1000 real images (about 3 s):
    # the co-trained model's outer loss on the real images is lower than with the images frozen
    # (hyper.lr tiny), and a fresh model trained on the learned images beats one trained on the
    # images before any hyper step. Measured: test accuracy 0.707 vs 0.463 on 300 test images, outer
    # loss 0.587 vs 1.720.
    sets = (
        "distill.init=real",
        "data.n_val=1000",
        "data.n_test=300",
        "train.rounds=60",
        "train.inner_steps=10",
        "train.lr=1e-2",
        "inner.l2=1e-3",
        "hyper.optimizer=adam",
        "hyper.lr=0.02",
        "hyper.method=cg",
        "hyper.iters=20",
        "eval.draws=1",
        "eval_every=60",
        "checkpoint_every=60",
    )
    tuned = _run(tmp_path / "a", *sets)["rows"][0]["test_acc"]
    frozen = _run(tmp_path / "b", *sets, "hyper.lr=1e-9")["rows"][0]["test_acc"]
    assert _final_outer_loss(tmp_path / "a") < _final_outer_loss(tmp_path / "b") - 0.1
    assert tuned > frozen + 0.1, (tuned, frozen)


def test_a_cut_run_resumed_ends_as_one_never_stopped(tmp_path: Path) -> None:
    full = _run(tmp_path / "full")
    _run(tmp_path / "cut", "train.rounds=2")
    resumed = _run(tmp_path / "cut", resume=True)
    assert full["rows"] == resumed["rows"] and full["real_draws"] == resumed["real_draws"]


def test_more_images_per_class_than_a_class_has_names_the_key() -> None:
    exp = get("distill")
    with pytest.raises(ConfigError, match=r"'distill\.per_class'"):
        check(resolve(exp.schema, smoke=exp.smoke, sets=["data.n_train=20", "distill.per_class=5"]))


def test_the_ceiling_on_every_training_image_is_trained_only_when_asked(tmp_path: Path) -> None:
    # Off by default: the ceiling's full-batch steps on every training image cost more than the rest
    # of the default run together; the smoke configuration turns it on.
    assert get("distill").schema["eval.ceiling"].default is False
    result = _run(tmp_path, "eval.ceiling=false")
    assert [r["arm"] for r in result["rows"]] == ["distilled", "co-trained", "real-1"]
    assert result["per_seed"][0]["all"] is None
    assert "eval.ceiling=true" in result["notes"][0]
