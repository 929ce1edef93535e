"""``hypergradients run --resume`` on damaged or hostile run folders: a crafted checkpoint runs no
code, a torn or truncated file is named with the choices (nothing deleted), a recomputable file is
recomputed, the default configuration of every experiment resumes, and Ctrl-C prints the command
that continues the run."""

from __future__ import annotations

import json
import pickle
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from hypergradients.app.cli import main
from hypergradients.app.experiments import REGISTRY, shared

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

SMOKE2 = ["--smoke", "--set", 'arms=["none","global"]', "--set", "train.rounds=2"]


def _rows(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["rows"]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")} for r in rows]  # clocks differ


def _strip(lines: list[str]) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(s).items() if k != "time_s"} for s in lines]


@pytest.fixture
def finished(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path / "run"
    assert main(["run", "weight-decay", *SMOKE2, "--out", str(out), "--json", "--quiet"]) == 0
    return out, _rows(capsys)


class _Evil:
    """Unpickling it with weights_only=False calls ``open(marker, "w")``: it creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoint_runs_no_code(
    finished: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = finished
    marker = tmp_path / "marker"
    ck = out / "global" / "checkpoint.pt"
    (out / "global" / "result.json").unlink()  # so that the resume reads the checkpoint
    torch.save({"version": 1, "payload": _Evil(marker)}, ck)
    with pytest.raises(pickle.UnpicklingError):  # the file really is hostile to a plain load
        torch.load(ck, weights_only=True)
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the checkpoint '{ck}'" in err and "refused for safety" in err, err
    assert (
        f"delete the folder '{out / 'global'}' to restart the arm 'global'" in err and "Traceback" not in err
    )
    assert not marker.exists()
    assert ck.exists()  # nothing deleted


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_checkpoint_is_named_with_the_choices(
    damage: str, finished: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = finished
    ck = out / "global" / "checkpoint.pt"
    (out / "global" / "result.json").unlink()
    raw = ck.read_bytes()
    ck.write_bytes(
        {"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": b"not a checkpoint\n" * 9}[damage]
    )
    before = ck.read_bytes()
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"hypergradients run: error: cannot read the checkpoint '{ck}': it is truncated, "
        "empty or not a checkpoint"
    ), err
    assert (
        f"delete the folder '{out / 'global'}' to restart the arm 'global'" in err and "or restore it" in err
    )
    assert ck.read_bytes() == before


@pytest.mark.parametrize("damage", ["result.json", "decays.pt", "test_losses.pt", "metrics.jsonl"])
def test_torn_recomputable_file_is_recomputed(
    damage: str, finished: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, rows = finished
    top = (out / "metrics.jsonl").read_text().splitlines()
    f = out / "global" / damage
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # as a kill mid-write (non-atomic) left it
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--json", "--quiet"]) == 0
    assert _rows(capsys) == rows
    assert f.stat().st_size > 0
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(top)


def test_stale_temp_files_are_removed_at_the_next_start(
    finished: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, rows = finished
    stale = [
        out / "global" / ".checkpoint.pt.tmp-123",
        out / "global" / ".checkpoint.pt.tmp-99-abc",
        out / ".metrics.jsonl.tmp-7-x",
        out / "none" / ".result.json.tmp-5-y",
    ]
    for s in stale:
        s.write_bytes(b"half a write")
    (out / "global" / "result.json").unlink()
    assert main(["run", "weight-decay", "--out", str(out), "--resume", "--json", "--quiet"]) == 0
    assert _rows(capsys) == rows
    assert not [s for s in stale if s.exists()]


# A few rounds of each registered experiment that keeps checkpoints, otherwise its defaults (not
# --smoke): a new one must add itself here, so its default configuration is known to resume.
FEW_ROUNDS = {
    "weight-decay": ["train.rounds=2"],
    "families": ["train.rounds=2"],
    "overfit-validation": ["train.rounds=2"],
    "distill": ["train.rounds=2"],
    "data-cleaning": ["train.rounds=2"],
    "lstm-dropout": [
        "train.steps=20",
        "eval_every=10",
        "seeds=1",
        "jobs=1",
        "data.train_tokens=3000",
        "data.eval_tokens=700",
    ],
    "augment": ["train.steps=18", "seeds=[0]"],
    "lm-reweight": ["train.rounds=2", "seeds=[0]", "data.n_train=512", "data.n_test=64"],
}


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.resumable))
def test_default_configuration_resumes(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert name in FEW_ROUNDS, f"add {name!r} to FEW_ROUNDS"
    out = tmp_path / "run"
    sets = [a for s in FEW_ROUNDS[name] for a in ("--set", s)]
    assert main(["run", name, *sets, "--out", str(out), "--json", "--quiet"]) == 0
    rows = _rows(capsys)
    assert main(["run", name, "--out", str(out), "--resume", "--json", "--quiet"]) == 0, (
        capsys.readouterr().err
    )
    assert _rows(capsys) == rows


def test_ctrl_c_prints_the_command_that_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tmp_path / "ref"
    assert main(["run", "weight-decay", *SMOKE2, "--out", str(ref), "--json", "--quiet"]) == 0
    rows = _rows(capsys)
    real_fit = shared.fit

    def interrupted(*args: Any, **kw: Any) -> Any:
        def ctrl_c(rec: dict[str, Any]) -> None:
            if rec["round"] == 1 and kw["checkpoint_dir"].name == "global":
                raise KeyboardInterrupt

        kw["callbacks"] = [*kw["callbacks"], ctrl_c]
        return real_fit(*args, **kw)

    out = tmp_path / "my run"  # a space: the printed command must quote it
    monkeypatch.setattr(shared, "fit", interrupted)
    assert main(["run", "weight-decay", *SMOKE2, "--set", "checkpoint_every=1", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    cmd = f"hypergradients run weight-decay --out {shlex.quote(str(out))} --resume"
    assert "interrupted" in err and cmd in err, err
    monkeypatch.setattr(shared, "fit", real_fit)
    # Part of the top metrics.jsonl was written as rounds finished: the whole arm 'none', round 1 of 'global'.
    assert [
        (r["arm"], r["round"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ] == [("none", 1), ("none", 2), ("global", 1)]
    argv = shlex.split(cmd)[1:]
    assert main([*argv, "--json", "--quiet"]) == 0
    assert _rows(capsys) == rows
    assert _strip((out / "metrics.jsonl").read_text().splitlines()) == _strip(
        (ref / "metrics.jsonl").read_text().splitlines()
    )


def test_top_metrics_grow_as_rounds_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    seen: list[int] = []
    real_fit = shared.fit

    def watched(*args: Any, **kw: Any) -> Any:
        def count(rec: dict[str, Any]) -> None:
            seen.append(len((out / "metrics.jsonl").read_text().splitlines()))

        kw["callbacks"] = [*kw["callbacks"], count]
        return real_fit(*args, **kw)

    monkeypatch.setattr(shared, "fit", watched)
    assert main(["run", "weight-decay", *SMOKE2, "--out", str(out), "--quiet"]) == 0
    assert seen == [1, 2, 3, 4]


def _snapshot(folder: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``folder``: a file's bytes, modification time and inode (an atomic rewrite of
    the same bytes is a new inode), a folder's presence."""
    snap: dict[str, tuple[Any, ...]] = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        snap[str(p.relative_to(folder))] = (
            ("dir",) if p.is_dir() else (p.read_bytes(), st.st_mtime_ns, st.st_ino)
        )
    return snap


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.resumable))
def test_refused_resume_changes_no_file(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", name, "--smoke", "--out", str(out), "--quiet"]) == 0
    for done in out.glob("*/result.json"):  # weight-decay: a finished arm never reads its checkpoint again
        done.unlink()
    # The checkpoint written last (the last arm's): every arm before it would resume first.
    ck = max(out.rglob("checkpoint.pt"), key=lambda p: p.stat().st_mtime_ns)
    ck.write_bytes(b"not a checkpoint\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["run", name, "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hypergradients run: error: cannot read the checkpoint '{ck}'"), err
    assert "To continue: delete" in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_resumed_table_prints_what_the_fresh_one_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", "weight-decay", *SMOKE2, "--out", str(out)]) == 0
    fresh = capsys.readouterr().out
    assert main(["run", "weight-decay", "--out", str(out), "--resume"]) == 0
    again = capsys.readouterr().out

    def table(s: str) -> list[str]:
        return [line for line in s.splitlines() if not line.startswith(("total wall time", "report:"))]

    assert "n/a" in fresh  # the arm without decay has none to show
    assert "None" not in again and table(again) == table(fresh)
