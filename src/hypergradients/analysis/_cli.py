"""Small helpers shared by the ``explain``, ``compare`` and ``bench`` commands (arguments, output).

Kept free of torch at import time: ``hypergradients --help`` builds every sub-command's parser.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


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


class _DeprecatedSmoke(argparse.Action):
    """``--quick``: the old name of ``--smoke``, hidden from ``--help``, kept so old scripts run."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use --smoke (the same settings)",
              file=sys.stderr)
        setattr(namespace, self.dest, True)


def add_smoke(parser: argparse.ArgumentParser, *, help: str) -> None:
    """``--smoke`` (the project's name for the tiny configuration, as in ``run --smoke``) and ``--quick``."""
    parser.add_argument("--smoke", action="store_true", help=help)
    parser.add_argument("--quick", dest="smoke", action=_DeprecatedSmoke)


def add_out(parser: argparse.ArgumentParser, *, default_out: str, what: str) -> None:
    parser.add_argument("--out", metavar="DIR", default=default_out,
                        help=f"folder for {what} (default: {default_out}); checked before any work")


def add_quiet_json(parser: argparse.ArgumentParser, *, result: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {result}'s content on stdout")
    parser.add_argument("--quiet", action="store_true",
                        help=f"no progress display and no account: stdout gets only the path of {result}")


def add_common(parser: argparse.ArgumentParser, *, default_out: str, result: str) -> None:
    add_out(parser, default_out=default_out, what="the JSON, table and PNG figures")
    add_smoke(parser, help="small settings (seconds; what the tests run)")
    add_quiet_json(parser, result=result)
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--seed", type=int, default=0, help="data split and weight-decay draw (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these problems are too small to gain "
                             "from more, and extra threads only contend on a shared machine)")


def check_out(command: str, out: str) -> Path | None:
    """The ``--out`` folder if it can be written, else ``None`` after an error line on stderr.

    Called before any work, so a bad path costs nothing (it used to fail only when writing, after
    the whole computation).
    """
    from ..files import OutputPathError, check_output_dir

    try:
        return check_output_dir(out, option="--out")
    except OutputPathError as e:
        print(f"hypergradients {command}: error: {e}", file=sys.stderr)
        return None


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous count (callers in-process, tests)."""
    import torch

    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
