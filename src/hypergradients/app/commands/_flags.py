"""The ``explain``, ``compare`` and ``bench`` sub-commands as aliases of registered experiments.

``hypergradients explain --steps 1,10`` is ``hypergradients run explain --set theorem.steps=[1,10]``
with the command's own output (the readable account, ``--json`` the result file's content,
``--quiet`` its path): each command maps its flags to settings (:func:`run_alias`), and the run
itself is :func:`hypergradients.app.commands.run.execute`, the same as ``run``'s.

Kept free of torch at import time: ``hypergradients --help`` builds every sub-command's parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
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


def add_out(parser: argparse.ArgumentParser, *, name: str, what: str) -> None:
    parser.add_argument("--out", metavar="DIR",
                        help=f"run folder for config.toml, {what} and report.md (default: runs/{name}-<UTC "
                             "timestamp>; written again if it holds an earlier run of it, refused if it "
                             "holds another run or a report.md/metrics.jsonl of your own); checked before "
                             "any work")


def add_quiet_json(parser: argparse.ArgumentParser, *, result: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {result}'s content on stdout")
    parser.add_argument("--quiet", action="store_true",
                        help=f"no progress display and no account: stdout gets only the path of {result}")


def add_common(parser: argparse.ArgumentParser, *, name: str, result: str) -> None:
    add_out(parser, name=name, what=f"{result}, the PNG figures")
    add_smoke(parser, help="small settings (seconds; what the tests run)")
    add_quiet_json(parser, result=result)
    parser.add_argument("--no-figures", action="store_true",
                        help="skip the PNG figures (setting figures=false)")
    parser.add_argument("--seed", type=int, help="data split and weight-decay draw (default 0)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default 1: these problems are too small to gain "
                             "from more, and extra threads only contend on a shared machine)")


def check_out(command: str, out: str) -> Path | None:
    """The ``--out`` folder if it can be written, else ``None`` after an error line on stderr.

    Called before any work, so a bad path costs nothing (it used to fail only when writing, after
    the whole computation).
    """
    from ...training.files import OutputPathError, check_output_dir

    try:
        return check_output_dir(out, option="--out")
    except OutputPathError as e:
        print(f"hypergradients {command}: error: {e}", file=sys.stderr)
        return None


def run_alias(name: str, args: argparse.Namespace, settings: Mapping[str, Any]) -> int:
    """Run the registered experiment ``name`` with ``settings`` (flags mapped to its dotted keys).

    Settings resolve as for ``run``: defaults, ``--smoke``, then ``settings``; ``--out`` defaults to
    ``runs/<name>-<UTC timestamp>``. Prints the readable account (``account(result)``, else the
    experiment's text) and the files written; ``--json`` the result file's content; ``--quiet`` its path.
    """
    from ...training.files import json_dumps
    from ..config import ConfigError, resolve
    from ..experiments import get
    from .run import default_out, execute

    prog = f"hypergradients {name}"
    exp = get(name)
    try:
        cfg = resolve(exp.schema, smoke=exp.smoke if args.smoke else None,
                      extra={k: v for k, v in settings.items() if v is not None})
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    out = check_out(name, args.out if args.out else str(default_out(name, smoke=args.smoke)))
    if out is None:
        return 2
    res = execute(exp, cfg, out, prog=prog, progress=not args.quiet)
    if isinstance(res, int):
        return res
    if args.json:
        print(json_dumps(res.result, indent=2))
    elif args.quiet:
        print(res.result_file)
    else:
        print(res.text)
        print("\nWrote " + ", ".join(str(f) for f in res.files))
    return int(res.exit_code)
