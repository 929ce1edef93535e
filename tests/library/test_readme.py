"""The README's example runs as printed (the first ```python block)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import warnings

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs_as_printed() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    # It prints the hypergradient's shape, the CG iterations and a tiny residual.
    m = re.fullmatch(r"torch\.Size\(\[10\]\) (\d+) residual (\S+)\n", out.getvalue())
    assert m is not None, out.getvalue()
    assert int(m.group(1)) <= 20 and float(m.group(2)) < 1e-8


def test_own_loop_example_runs_as_printed() -> None:
    """The '## Your own training loop' example: at most 15 lines, and the decay moves up."""
    section = README.read_text(encoding="utf-8").split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    assert len([line for line in block.splitlines() if line.strip()]) <= 15
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    m = re.fullmatch(r"weight decay (\S+) after 10 hyper steps\n", out.getvalue())
    assert m is not None, out.getvalue()
    # Random labels: nothing generalises, so L_V asks for more decay (observed 1e-4 -> 1.5e-3, seeded).
    assert float(m.group(1)) > 5e-4


def test_hugging_face_example_runs_as_printed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The '## Hugging Face transformers' example, with nothing fetched from a hub; it prints what the
    README says it prints."""
    pytest.importorskip("transformers")  # a guard only: the dev extra installs it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the Trainer's output folder "out"
    section = (
        README.read_text(encoding="utf-8").split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    )
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's advice for real runs (pinned memory, workers)
        exec(compile(block, "README.md", "exec"), {})
    last = out.getvalue().strip().splitlines()[-1]  # the Trainer prints its own summary first
    m = re.fullmatch(r"6 decays from (\S+) to (\S+) after 6 hyper steps", last)
    assert m is not None, out.getvalue()
    if not torch.cuda.is_available():  # the Trainer trains on a GPU where there is one: other rounding
        assert f"`{last}`" in section  # the README quotes the line it prints on the CPU
    assert float(m.group(1)) < 1e-4 < float(m.group(2))  # the decays moved both ways from 1e-4
