"""``hypergradients.training.files``: the one atomic writer, checkpoint loading that runs no code and names
the file it cannot read, JSON without NaN, and the checks of command-line paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hypergradients.training.files import (
    OutputPathError,
    UnreadableFileError,
    check_input_file,
    check_output_dir,
    json_dumps,
    load_checkpoint,
    read_json,
    remove_stale_temps,
    save_atomic,
    write_atomic,
)


def test_write_atomic_leaves_no_temp_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    write_atomic(p, "one")
    write_atomic(p, b"two")
    assert p.read_text() == "two" and [f.name for f in tmp_path.iterdir()] == ["a.json"]
    assert p.stat().st_mode & 0o777 == 0o644


def test_save_and_load_checkpoint_round_trip(tmp_path: Path) -> None:
    obj = {"t": torch.arange(3), "n": 1, "x": 0.5, "s": "a", "l": [1, (2, 3)], "none": None}
    save_atomic(obj, tmp_path / "c.pt")
    got = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(got["t"], obj["t"]) and {k: v for k, v in got.items() if k != "t"} == {
        k: v for k, v in obj.items() if k != "t"
    }


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_crafted_file_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    torch.save({"x": _Evil(marker)}, tmp_path / "c.pt")
    with pytest.raises(UnreadableFileError, match=r"refused for safety \(.*Unsupported global") as ei:
        load_checkpoint(tmp_path / "c.pt")
    assert not marker.exists() and ei.value.path == tmp_path / "c.pt"
    assert "weights_only` set to `False" not in str(ei.value)  # never the advice to run the file's code


@pytest.mark.parametrize("content", [b"", b"garbage" * 30, None])
def test_unreadable_files_are_named_with_the_fix(content: bytes | None, tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    if content is None:  # cut in the middle, as a non-atomic write killed half-way leaves it
        save_atomic({"t": torch.zeros(1000)}, p)
        content = p.read_bytes()[:2000]
    p.write_bytes(content)
    with pytest.raises(
        UnreadableFileError,
        match=rf"cannot read the decays '{p}': it is truncated, empty or not "
        r"a checkpoint .*To continue: recompute it\.",
    ) as ei:
        load_checkpoint(p, what="decays", fix="recompute it")
    assert ei.value.why.startswith("it is truncated") and p.read_bytes() == content


def test_remove_stale_temps_only_removes_temp_files(tmp_path: Path) -> None:
    keep = [tmp_path / "checkpoint.pt", tmp_path / ".hidden", tmp_path / "x.tmp-1"]
    gone = [tmp_path / ".checkpoint.pt.tmp-12", tmp_path / ".result.json.tmp-3-abc"]
    for f in keep + gone:
        f.write_text("x")
    (tmp_path / ".dir.tmp-1").mkdir()
    assert sorted(remove_stale_temps(tmp_path)) == sorted(gone)
    assert all(f.exists() for f in keep) and (tmp_path / ".dir.tmp-1").is_dir()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_json_without_nan() -> None:
    s = json_dumps({"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)], "c": "x"})
    assert json.loads(s, parse_constant=lambda c: pytest.fail(c)) == {
        "a": None,
        "b": [1.0, None, [None, 2]],
        "c": "x",
    }


def test_read_json_treats_torn_files_as_absent(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    assert read_json(p) is None
    p.write_text('{"a": 1')
    assert read_json(p) is None
    p.write_text("")
    assert read_json(p) is None
    p.write_text('{"a": 1}')
    assert read_json(p) == {"a": 1}


def test_path_checks(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # nothing left behind
    with pytest.raises(OutputPathError, match=r"--out '.*f' is a file, not a folder"):
        check_output_dir(f)
    with pytest.raises(OutputPathError, match="is a file, so no folder can be made under it"):
        check_output_dir(f / "x")
    with pytest.raises(OutputPathError, match="--out '/proc/x': cannot create anything in '/proc'"):
        check_output_dir("/proc/x")
    assert check_input_file(f, option="--config") == f
    with pytest.raises(OutputPathError, match=r"--config '.*' is not a file"):
        check_input_file(tmp_path, option="--config")
    with pytest.raises(OutputPathError, match="does not exist"):
        check_input_file(tmp_path / "nope", option="--config")
