"""The ``explain``, ``compare`` and ``bench`` sub-commands as aliases of registered experiments.

``hypergradients explain --steps 1,10`` is ``hypergradients run explain --set theorem.steps=[1,10]``
with the command's own output (the readable account, ``--json`` the result file's content,
``--quiet`` its path). A command names its flags and the setting each one sets (a :data:`Flags`
table); everything else about a flag, its type, its choices and its help with the default and the
``--smoke`` value, is read from the experiment's schema (:func:`add_settings`), so the schema is the
one place where a setting is described. The run itself is
:func:`hypergradients.app.commands.run.execute`, the same as ``run``'s (:func:`run_alias`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# flag -> (setting key, metavar of one item); a bool setting whose default is true becomes --no-<flag>.
Flags = Mapping[str, tuple[str, str]]


def int_list(text: str) -> tuple[int, ...]:
    """``"1,10,100"`` → ``(1, 10, 100)``; argparse reports a bad item by name."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (e.g. 1,10,100)"
        ) from None
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


def shown(value: Any) -> str:
    """A setting's value as a user types it on the command line (lists comma-separated)."""
    if isinstance(value, (list, tuple)):
        return ",".join(shown(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_settings(parser: argparse.ArgumentParser, experiment: str, flags: Flags) -> None:
    """One flag per entry of ``flags``, each setting one setting of the registered ``experiment``: its
    type and choices are the schema's, its help the schema's help, default and ``--smoke`` value."""
    from ..experiments import get

    exp = get(experiment)
    for flag, (key, item) in flags.items():
        opt = exp.schema[key]
        default = f"default {shown(opt.default)}"
        if key in exp.smoke:
            default += f"; --smoke {shown(exp.smoke[key])}"
        kw: dict[str, Any] = {"dest": key, "default": None, "help": f"{key}: {opt.help} ({default})"}
        if opt.kind is bool:
            if opt.default is not True:
                raise ValueError(f"{flag}: only a setting that is true by default becomes a --no- flag")
            parser.add_argument(
                f"--no-{flag.removeprefix('--')}",
                action="store_const",
                const=False,
                help=f"sets {key} to false ({key}: {opt.help}; default true)",
                dest=key,
                default=None,
            )
            continue
        if opt.kind is list:
            kw["type"] = int_list if opt.item is int else str_list(tuple(opt.choices or ()))
            kw["metavar"] = f"{item},{item},..."
        elif opt.choices:
            kw["choices"] = opt.choices
        else:
            kw["type"], kw["metavar"] = opt.kind, item
        parser.add_argument(flag, **kw)


def given(args: argparse.Namespace, flags: Flags) -> dict[str, Any]:
    """The settings the flags of ``flags`` set (a flag not given sets none), lists as lists."""
    out = {}
    for key, _ in flags.values():
        v = getattr(args, key)
        if v is not None:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


class _DeprecatedSmoke(argparse.Action):
    """``--quick``: the old name of ``--smoke``, hidden from ``--help``, for one release."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: {option_string} is deprecated; use --smoke (the same settings)", file=sys.stderr
        )
        setattr(namespace, self.dest, True)


def add_run_flags(parser: argparse.ArgumentParser, *, name: str, result: str, smoke: str) -> None:
    """The flags every alias has: ``--out`` (``runs/<name>-<UTC timestamp>`` by default), ``--smoke``
    (help ``smoke``; ``--quick`` its hidden old name), ``--json`` and ``--quiet``."""
    parser.add_argument(
        "--out",
        metavar="DIR",
        help=f"run folder for config.toml, {result} and report.md (default: runs/{name}-<UTC "
        "timestamp>; written again if it holds an earlier run of it, refused if it "
        "holds another run or a report.md/metrics.jsonl of your own); checked before "
        "any work",
    )
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--quick", dest="smoke", action=_DeprecatedSmoke)
    parser.add_argument("--json", action="store_true", help=f"print {result}'s content on stdout")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help=f"no progress display and no account: stdout gets only the path of {result}",
    )


def check_out(command: str, out: str) -> Path | None:
    """The ``--out`` folder if it can be written, else ``None`` after an error line on stderr (called
    before any work, so a bad path costs nothing)."""
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
        cfg = resolve(exp.schema, smoke=exp.smoke if args.smoke else None, extra=settings)
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
