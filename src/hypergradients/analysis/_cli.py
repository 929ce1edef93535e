"""Small helpers shared by the ``explain`` and ``compare`` commands (argument parsing, output)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def int_list(text: str) -> tuple[int, ...]:
    """``"1,10,100"`` → ``(1, 10, 100)``; argparse reports a bad item by name."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (e.g. 1,10,100)") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty; give comma-separated integers, e.g. 1,10,100")
    return values


def str_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return items
    return parse


def add_common(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    parser.add_argument("--out", metavar="DIR", default=default_out,
                        help=f"folder for the JSON, table and PNG figures (default: {default_out})")
    parser.add_argument("--quick", action="store_true", help="small settings (seconds; what the tests run)")
    parser.add_argument("--json", action="store_true", help="print the JSON summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no account on stdout")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--seed", type=int, default=0, help="data split and weight-decay draw (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these problems are too small to gain "
                             "from more, and extra threads only contend on a shared machine)")


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous count (callers in-process, tests)."""
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress_bar(total: int, *, quiet: bool, desc: str) -> tqdm:
    return tqdm(total=total, disable=quiet, file=sys.stderr, desc=desc, unit="step", leave=False)


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings rather than emit invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_finite(obj), indent=2, allow_nan=False)


def write_text(path: Path, text: str) -> None:
    """Write atomically (temp file + rename), so an interrupted run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary output files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
