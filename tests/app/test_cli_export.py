"""``hypergradients export RUN_DIR`` and ``hypergradients retrain RUN_DIR`` on the run folders of
weight-decay and overfit-validation: the files, the numbers against the run's own, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hypergradients as hg
from hypergradients.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


@pytest.fixture(scope="module")
def wd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --smoke weight-decay run with the arms none, global and weight (made once for the module)."""
    out = tmp_path_factory.mktemp("runs") / "wd"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(
                [
                    "run",
                    "weight-decay",
                    "--smoke",
                    "--set",
                    'arms=["none","global","weight"]',
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(n)
    return out


def test_export_writes_each_tuned_arm_in_natural_units(
    wd_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(wd_run), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert [w["arm"] for w in written] == ["global", "weight"]  # 'none' tunes nothing
    for arm in ("global", "weight"):
        tuned = hg.load_hparams(wd_run / arm / "hparams.json")
        assert tuned.source == {"experiment": "weight-decay", "run": str(wd_run), "arm": arm, "round": 3}
        # the same decays the run itself saved (decays.pt: its final natural values, flattened)
        flat = torch.cat([v.reshape(-1) for v in tuned.values.values()])
        assert torch.equal(flat, torch.load(wd_run / arm / "decays.pt", weights_only=True))
        assert tuned.families[0].kind == "WeightDecay"
    assert (wd_run / "weight" / "hparams.pt").exists() and not (wd_run / "global" / "hparams.pt").exists()
    assert written[1]["tensor_file"] == str(wd_run / "weight" / "hparams.pt")
    counts = {w["arm"]: w["hyperparameters"] for w in written}
    assert counts["global"] == 1 and counts["weight"] == sum(
        v.numel() for v in hg.load_hparams(wd_run / "weight" / "hparams.json").values.values()
    )


def test_export_of_one_arm_elsewhere_and_what_it_refuses(
    wd_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tuned.json"
    assert main(["export", str(wd_run), "--arm", "weight", "--out", str(target)]) == 0
    assert f"-> {target} (+ {tmp_path / 'tuned.pt'})" in capsys.readouterr().out
    assert hg.load_hparams(target).source["arm"] == "weight"
    assert main(["export", str(wd_run), "--arm", "weight", "--out", str(target)]) == 0  # ours: replaced
    capsys.readouterr()
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    refusals = [
        (["--out", str(tmp_path / "x.json")], "--out writes one arm's values: name the arm with --arm ARM"),
        (
            ["--arm", "none"],
            "no tuned arm of that name with a checkpoint; its tuned arms are ['global', 'weight']",
        ),
        (["--arm", "weight", "--out", str(mine)], "exists and is not a file of exported hyperparameters"),
        (["--arm", "weight", "--out", str(tmp_path / "x.pt")], "give a path ending in .json"),
    ]
    for extra, message in refusals:
        assert main(["export", str(wd_run), *extra]) == 2
        assert message in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}'
    assert main(["export", str(tmp_path)]) == 2
    assert "holds no config.toml, so it is not the folder of a run" in capsys.readouterr().err


def test_a_run_of_another_experiment_is_refused_with_the_supported_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hypergradients.app.config import resolve, write_toml
    from hypergradients.app.experiments import get

    write_toml(resolve(get("data-cleaning").schema), tmp_path / "config.toml")
    for cmd in ("export", "retrain"):
        assert main([cmd, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert (
            "is a run of 'data-cleaning'; export and retrain read runs of weight-decay, overfit-validation, "
            "families"
        ) in err


def test_retrain_reports_the_tuned_run_and_both_retrains(
    wd_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert main(["retrain", str(wd_run), "--arm", "global", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["trained"] for r in res["rows"]] == [
        "tuned run (round 3)",
        "retrain on train",
        "retrain on train+val",
    ]
    tuned, on_train, on_both = res["rows"]
    # the tuned run's row is its checkpoint's model on the test set: the run's own final test loss
    assert tuned["test_loss"] == pytest.approx(
        json.loads((wd_run / "global" / "result.json").read_text())["test_loss"], rel=1e-5
    )
    assert on_train["steps"] == 9 and on_train["vs_tuned"] == pytest.approx(
        on_train["test_loss"] - tuned["test_loss"]
    )
    assert on_both["paired_se"] > 0
    assert json.loads((out / "retrain.json").read_text())["rows"] == res["rows"]
    assert (
        "retrained on train: the test loss differs from the tuned run's by" in (out / "report.md").read_text()
    )
    # the same values from an exported file: the same retrain, bit for bit
    assert main(["export", str(wd_run), "--arm", "global", "--out", str(tmp_path / "g.json")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "retrain",
                str(wd_run),
                "--arm",
                "global",
                "--on",
                "train",
                "--hparams",
                str(tmp_path / "g.json"),
                "--out",
                str(tmp_path / "r2"),
                "--json",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)["rows"]
    assert [r["trained"] for r in again] == ["tuned run (round 3)", "retrain on train"]
    assert again[1]["test_loss"] == on_train["test_loss"]


def test_retrain_refusals(wd_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.md").write_text("mine")
    cases = [
        (
            ["--hparams", str(tmp_path / "g.json")],
            "--hparams holds one arm's values: name the arm with --arm ARM",
        ),
        (["--arm", "global", "--hparams", str(tmp_path / "missing.json")], "does not exist"),
        (["--out", str(tmp_path)], "holds a report.md but no retrain.json"),
    ]
    for extra, message in cases:
        assert main(["retrain", str(wd_run), *extra]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "mine"
    hg.export_hparams(hg.WeightDecay(torch.nn.Linear(3, 2), granularity="weight"), tmp_path / "other.json")
    assert (
        main(
            [
                "retrain",
                str(wd_run),
                "--arm",
                "global",
                "--hparams",
                str(tmp_path / "other.json"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "with other keys than the family here" in capsys.readouterr().err


def test_overfit_validation_runs_export_and_retrain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ov"
    assert (
        main(
            [
                "run",
                "overfit-validation",
                "--smoke",
                "--set",
                'models=["linear"]',
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["export", str(run)]) == 0
    tuned = hg.load_hparams(run / "linear" / "hparams.json")
    assert tuned.families[0].keys == ("weight_decay.1.weight", "weight_decay.1.bias")  # biases too
    capsys.readouterr()
    assert main(["retrain", str(run), "--on", "train+val", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["trained"] for r in rows] == ["tuned run (round 3)", "retrain on train+val"]
    final = json.loads((run / "linear" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[0]["test_acc"] == pytest.approx(final["test_acc"])
    assert rows[1]["steps"] == 3 * 2


def test_a_families_run_exports_its_family_and_retrains_where_it_means_something(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ew"
    assert (
        main(["run", "families", "--smoke", "--set", "family=example-weights", "--out", str(run), "--quiet"])
        == 0
    )
    assert main(["export", str(run)]) == 0
    tuned = hg.load_hparams(run / "tuned" / "hparams.json")
    assert [(f.name, f.kind) for f in tuned.families] == [("example_weights", "ExampleWeights")]
    capsys.readouterr()
    assert main(["retrain", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    # the run's own test accuracy from its checkpoint (its flipped training labels rebuilt), then one retrain
    final = json.loads((run / "tuned" / "metrics.jsonl").read_text().splitlines()[-1])
    assert res["rows"][0]["test_acc"] == pytest.approx(final["test_acc"])
    from hypergradients.app.tuned import open_run
    from hypergradients.training.fit import evaluate

    opened = open_run(run)  # the training set the retrain uses is the one the run trained on
    model, _, _ = opened.arms[0].tuned()
    assert evaluate(model, {"train": opened.train})["train_loss"] == pytest.approx(
        final["train_loss"], rel=1e-5
    )
    assert [r["trained"] for r in res["rows"]] == ["tuned run (round 3)", "retrain on train"]
    assert any(
        "no retrain on train+val: the example weights 'example_weights' have no weight" in n
        for n in res["notes"]
    )
