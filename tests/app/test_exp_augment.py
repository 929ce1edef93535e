"""The ``augment`` experiment: the hand-made augmentation is a rotation + shift (checked against a
closed form), the --smoke run writes its folder with mean ± std rows, ResNet-18 has its known size,
and bad settings name their key before any file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext
from hypergradients.app.experiments.augment_mnist import (
    EXPERIMENT,
    FULL,
    SCHEMA,
    SMOKE,
    RandomShiftRotate,
    mean_std,
    resnet18,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_handmade_shift_moves_a_pixel_by_the_drawn_amount(monkeypatch):
    # With rotation 0 and torch.rand forced to 1, the warp shifts by exactly +shift pixels along
    # both axes (affine_grid's [-1, 1] coordinates: 2·shift/size), so an integer shift moves a
    # single bright pixel exactly, to float64 rounding.
    aug = RandomShiftRotate(shift=2.0, degrees=0.0).train()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[0, 0, 3, 3] = 1.0
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, **kw))
    y = aug(x)
    # sampling at (i + 2, j + 2): the bright pixel appears at (1, 1)
    assert y[0, 0, 1, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_handmade_rotation_by_90_degrees_is_a_transpose_flip(monkeypatch):
    aug = RandomShiftRotate(shift=0.0, degrees=90.0).train()
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, **kw))
    y = aug(x)
    # a 90° rotation of the sampling grid: output (i, j) samples input (j, 3 − i) up to orientation
    assert torch.allclose(y[0, 0], torch.rot90(x[0, 0], k=1, dims=(0, 1)), atol=1e-12) or torch.allclose(
        y[0, 0], torch.rot90(x[0, 0], k=-1, dims=(0, 1)), atol=1e-12
    )


def test_handmade_is_the_identity_in_evaluation_mode():
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(RandomShiftRotate(2.0, 10.0).eval()(x), x)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_smoke_writes_the_run_folder(tmp_path: Path) -> None:
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["seeds=[0,1]"])
    ds = EXPERIMENT.check(cfg) if EXPERIMENT.check else None
    res = EXPERIMENT.run(
        RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False, data=ds)
    )
    assert [r["arm"] for r in res.rows] == [
        "no augmentation",
        "hand-made (shift + rotation)",
        "augmentation network (IFT)",
    ]
    for r in res.rows:
        accs = [x["test_acc"] for x in r["runs"]]
        assert r["seeds"] == 2 and (r["test_acc_mean"], r["test_acc_std"]) == mean_std(accs)
    augnet = res.rows[2]
    assert augnet["hyperparameters"] > 0 and all(x["hyper_steps"] == 2 for x in augnet["runs"])
    for name in ("config.toml", "augment.json", "metrics.jsonl", "report.md", "augmented.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "augment.json").read_text())["rows"] == json.loads(json.dumps(res.rows))
    report = (tmp_path / "report.md").read_text()
    assert "changes a test image by" in report
    # two hyper steps at lr 1e-3 leave the identity-initialised U-Net where it started: said so
    assert "stayed near the identity" in report


def test_too_deep_unet_is_refused_naming_the_key() -> None:
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["augment.depth=4"])  # 28 is not divisible by 8
    with pytest.raises(ConfigError, match=r"augment\.depth"):
        EXPERIMENT.check(cfg) if EXPERIMENT.check else None


def test_full_is_resnet18_on_cifar10():
    from hypergradients.app.experiments.augment_mnist import with_preset

    cfg = with_preset(resolve(SCHEMA, sets=["config=full", "seeds=[4]"]))
    assert cfg["model.name"] == "resnet18" and cfg["data.dataset"] == "cifar10" and cfg["seeds"] == [4]
    assert all(cfg[k] == v for k, v in FULL.items())
    # without data.root, CIFAR-10 is refused naming the key, before any file
    with pytest.raises(ConfigError, match=r"data\.root"):
        EXPERIMENT.check(resolve(SCHEMA, sets=["config=full"])) if EXPERIMENT.check else None
    net = resnet18(3, 10)
    # ResNet-18 for CIFAR (3×3 stem): 11,173,962 weights
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
