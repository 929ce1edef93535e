"""The tuned values in a plain file and back: ``hg.export_hparams``, ``hg.load_hparams`` and
``hg.set_natural`` (the format is documented in docs/user-guide.md, section 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import hypergradients as hg
from hypergradients.training.export import FORMAT, INLINE_MAX

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 3)).to(dtype)


def _moved(fams: list[hg.Family], seed: int = 0) -> None:
    """Give every family values away from its initial ones (so that a test cannot pass on defaults)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in fams:
            for t in f.tensors().values():
                t.add_(0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_exact_for_every_family(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _net(dtype=dtype)
    fams = [
        hg.WeightDecay(model, granularity="weight"),
        hg.WeightDecay(model, name="wd_global"),
        hg.WeightDecay(model, granularity="layer", name="wd_layer"),
        hg.Dropout(model, ["0", "2:input"]),
        hg.DropConnect(model, ["2.weight"]),
        hg.ExampleWeights(2000, dtype=dtype),
        hg.ExampleWeights(7, parametrisation="softplus", dtype=dtype, name="ew_small"),
        hg.LossReweighting(8, dtype=dtype),
        hg.AugmentNet(1, depth=1, wf=1, dtype=dtype),
        hg.DistilledData((4,), 3, soft_labels=True, lr=0.1, dtype=dtype),
    ]
    _moved(fams)
    path = hg.export_hparams(fams, tmp_path / "tuned.json")
    back = hg.load_hparams(path)
    nat = {k: v for f in fams for k, v in f.natural().items()}
    assert set(back.values) == set(nat)
    for k, v in nat.items():  # the same bits, wherever the value was written (JSON or .pt)
        assert back.values[k].dtype == dtype and torch.equal(back.values[k], v), k
    assert [f.name for f in back.families] == [f.name for f in fams]
    assert [f.kind for f in back.families] == [type(f).__name__ for f in fams]
    assert back.family("dropout").parametrisation == fams[3].parametrisation
    assert back.family("dropout").keys == ("dropout.0.output", "dropout.2.input")
    # and into fresh families of the same layout, through set_natural: the same natural values
    fresh_model = _net(1, dtype=dtype)
    fresh = [
        hg.WeightDecay(fresh_model, granularity="weight"),
        hg.WeightDecay(fresh_model, name="wd_global"),
        hg.WeightDecay(fresh_model, granularity="layer", name="wd_layer"),
        hg.Dropout(fresh_model, ["0", "2:input"]),
        hg.DropConnect(fresh_model, ["2.weight"]),
        hg.ExampleWeights(2000, dtype=dtype),
        hg.ExampleWeights(7, parametrisation="softplus", dtype=dtype, name="ew_small"),
        hg.LossReweighting(8, dtype=dtype, seed=5),
        hg.AugmentNet(1, depth=1, wf=1, dtype=dtype, seed=3),
        hg.DistilledData((4,), 3, soft_labels=True, lr=0.5, dtype=dtype),
    ]
    hg.set_natural(fresh, path)
    again = {k: v for f in fresh for k, v in f.natural().items()}
    # exp(log d), σ(logit q), ... in the family's dtype: within a few ulps of the exported values
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-14, "atol": 1e-15}
    for k in nat:
        torch.testing.assert_close(again[k], nat[k], **tol)


def test_the_file_says_family_parametrisation_shape_and_keeps_small_tensors_in_the_json(
    tmp_path: Path,
) -> None:
    model = _net()
    wd = hg.WeightDecay(model, granularity="weight", init=2e-3)  # 1280 and 96 decays
    drop = hg.Dropout(model, ["0"], init=0.75)  # 32 keep probabilities
    path = hg.export_hparams([wd, drop], tmp_path / "t.json", meta={"arm": "weight", "round": 7})
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["format"] == FORMAT and doc["version"] == 1 and doc["inline_max"] == INLINE_MAX == 1024
    assert doc["source"] == {"arm": "weight", "round": 7} and doc["tensor_file"] == "t.pt"
    fam = doc["families"][0]
    assert (fam["name"], fam["kind"], fam["count"]) == ("weight_decay", "WeightDecay", 1280 + 96)
    assert fam["parametrisation"] == wd.parametrisation
    big, small = fam["values"]["weight_decay.0.weight"], fam["values"]["weight_decay.2.weight"]
    assert big == {"shape": [32, 40], "dtype": "float32", "file": "t.pt"}  # 1280 > 1024 numbers
    assert small["shape"] == [3, 32] and small["dtype"] == "float32" and "file" not in small
    assert small["value"][0][0] == pytest.approx(2e-3, rel=1e-6)  # natural units: a decay
    assert doc["families"][1]["values"]["dropout.0.output"]["value"] == [pytest.approx(0.75)] * 32
    # the tensor file is a plain dict of tensors: torch.load(weights_only=True) reads it
    tensors = torch.load(tmp_path / "t.pt", weights_only=True)
    assert set(tensors) == {"weight_decay.0.weight"} and isinstance(tensors["weight_decay.0.weight"], Tensor)
    # the threshold: 0 sends every tensor to the .pt file, a large one keeps everything in the JSON
    hg.export_hparams([wd, drop], tmp_path / "all_pt.json", inline_max=0)
    assert set(torch.load(tmp_path / "all_pt.pt", weights_only=True)) == {
        "weight_decay.0.weight",
        "weight_decay.2.weight",
        "dropout.0.output",
    }
    hg.export_hparams([wd, drop], tmp_path / "all_json.json", inline_max=10**6)
    assert json.loads((tmp_path / "all_json.json").read_text())["tensor_file"] is None
    assert not (tmp_path / "all_json.pt").exists()
    # a HyperOptimizer exports its families
    hyper = hg.HyperOptimizer(model, [wd, drop])
    hg.export_hparams(hyper, tmp_path / "h.json")
    assert hg.load_hparams(tmp_path / "h.json").values.keys() == hg.load_hparams(path).values.keys()


def test_what_cannot_be_exported_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = _net()
    wd = hg.WeightDecay(model, granularity="weight")
    with pytest.raises(ValueError, match=r"ending in \.json"):
        hg.export_hparams(wd, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="inline_max"):
        hg.export_hparams(wd, tmp_path / "t.json", inline_max=-1)
    with pytest.raises(ValueError, match="is used by two families: give them distinct names"):
        hg.export_hparams([wd, hg.WeightDecay(model, granularity="weight")], tmp_path / "t.json")
    with pytest.raises(TypeError, match="a HyperOptimizer, a family or a list of families"):
        hg.export_hparams([model], tmp_path / "t.json")  # type: ignore[list-item]
    with torch.no_grad():
        wd.tensors()["weight_decay.0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'weight_decay\.0\.weight' .* is not finite.*nothing written"):
        hg.export_hparams(wd, tmp_path / "t.json")
    with pytest.raises(TypeError):  # a meta that JSON cannot hold fails before any file
        hg.export_hparams(hg.WeightDecay(model), tmp_path / "m.json", meta={"model": model})
    assert list(tmp_path.iterdir()) == []


def _export(tmp_path: Path) -> Path:
    model = _net()
    return hg.export_hparams(
        [hg.WeightDecay(model, granularity="weight"), hg.Dropout(model, ["0"])], tmp_path / "t.json"
    )


def _rewrite(path: Path, change: object) -> None:
    doc = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


class Payload:
    """Not a tensor: pickling an instance of a class is what weights_only refuses."""


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "does not exist"),
        (lambda p: p.write_text("{not json"), "not a JSON file"),
        (lambda p: _rewrite(p, lambda d: d.update(format="something.else")), "format is 'something.else'"),
        (lambda p: _rewrite(p, lambda d: d.update(version=2)), "version 2 of the format"),
        (
            lambda p: _rewrite(
                p, lambda d: d["families"][1]["values"]["dropout.0.output"].update(shape=[31])
            ),
            r"has shape \[32\], the JSON says \[31\]",
        ),
        (
            lambda p: _rewrite(p, lambda d: d["families"][1]["values"]["dropout.0.output"].update(value="x")),
            "is not a number or nested lists",
        ),
        (
            lambda p: _rewrite(
                p, lambda d: d["families"][1]["values"]["dropout.0.output"].update(dtype="int64")
            ),
            "floating-point dtype",
        ),
        (
            lambda p: _rewrite(
                p,
                lambda d: d["families"][0]["values"]["weight_decay.0.weight"].update(file="../elsewhere.pt"),
            ),
            "not a file name beside it",
        ),
        (
            lambda p: p.with_suffix(".pt").unlink(),
            "tensor file of the exported hyperparameters .* does not exist",
        ),
        (
            lambda p: torch.save({"weight_decay.0.weight": [1.0, 2.0]}, p.with_suffix(".pt")),
            "holds a dict with other values than tensors",
        ),
        (lambda p: torch.save(torch.ones(3), p.with_suffix(".pt")), "holds Tensor, not only tensors by key"),
        (
            lambda p: torch.save({"weight_decay.0.weight": Payload()}, p.with_suffix(".pt")),
            "objects other than tensors and plain values, refused for safety",
        ),
        (
            lambda p: torch.save(
                {"weight_decay.0.weight": torch.full((32, 40), float("inf"))}, p.with_suffix(".pt")
            ),
            "is not finite",
        ),
        (
            lambda p: torch.save(
                {"weight_decay.0.weight": torch.ones(32, 40, dtype=torch.float64)}, p.with_suffix(".pt")
            ),
            "is torch.float64, the JSON says float32",
        ),
    ],
    ids=[
        "missing",
        "not-json",
        "format",
        "version",
        "shape",
        "value",
        "dtype",
        "path",
        "no-pt",
        "pt-list",
        "pt-tensor",
        "pt-object",
        "pt-inf",
        "pt-dtype",
    ],
)
def test_a_damaged_or_foreign_file_is_refused_with_what_is_wrong(
    tmp_path: Path, damage: object, message: str
) -> None:
    path = _export(tmp_path)
    damage(path)  # type: ignore[operator]
    with pytest.raises(hg.UnreadableFileError, match=message) as e:
        hg.load_hparams(path)
    assert "hyperparameters" in str(e.value) and str(path.name) in str(e.value)


def test_values_exported_for_other_families_are_refused(tmp_path: Path) -> None:
    model = _net()
    path = hg.export_hparams(hg.WeightDecay(model, granularity="layer"), tmp_path / "layer.json")
    per_weight = hg.WeightDecay(model, granularity="weight")
    with pytest.raises(
        ValueError,
        match=r"holds 'weight_decay\.0\.weight' of shape \(\), the family here has "
        r"it of shape \(32, 40\)",
    ):
        hg.set_natural([per_weight], path)
    with pytest.raises(ValueError, match="with other keys than the family here"):
        hg.set_natural([hg.WeightDecay(model, granularity="layer", include=lambda n, p: True)], path)
    # on purpose, per-layer values start per-weight decays: the plain dict broadcasts its numbers
    hg.set_natural([per_weight], hg.load_hparams(path).values)
    named_alike = hg.Dropout(model, ["0"], name="weight_decay")
    with pytest.raises(
        ValueError,
        match="holds 'weight_decay' as a WeightDecay, but the family of that name here is a Dropout",
    ):
        hg.set_natural([named_alike], path)
    with pytest.raises(KeyError, match="has no family 'dropout'"):
        hg.load_hparams(path).family("dropout")
