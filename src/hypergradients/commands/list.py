"""``hypergradients list``: everything runnable (the registered experiments and the analysis
commands), or one of them in detail."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DESCRIPTION = """\
List everything runnable: the registered experiments (`hypergradients run NAME`) and the
commands explain, compare and bench, each with what it does and its tiny configuration
(--smoke). With an experiment's name, list its settings: key, default, what it accepts, and what
--smoke changes; settings are changed with `hypergradients run NAME --set key=value` or a TOML
file (--config). With a command's name, say what it does and how to see its options.
"""

# The analysis commands listed beside the experiments; what each does comes from cli.COMMANDS.
RUNNABLE_COMMANDS = ("explain", "compare", "bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="an experiment (show its settings) or a command (explain, compare, bench)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _runnable() -> list[dict[str, Any]]:
    from ..cli import COMMANDS
    from ..experiments import REGISTRY

    items = [{"name": e.name, "kind": "experiment", "summary": e.summary,
              "run": f"hypergradients run {e.name}", "smoke": f"hypergradients run {e.name} --smoke"}
             for e in REGISTRY.values()]
    items += [{"name": c, "kind": "command", "summary": COMMANDS[c][1], "run": f"hypergradients {c}",
               "smoke": f"hypergradients {c} --smoke"} for c in RUNNABLE_COMMANDS]
    return items


def main(args: argparse.Namespace) -> int:
    from ..experiments import REGISTRY

    items = _runnable()
    if args.name is None:
        if args.json:
            print(json.dumps(items))
            return 0
        width = max(len(i["name"]) for i in items)
        for i in items:
            more = (f"settings: hypergradients list {i['name']}" if i["kind"] == "experiment"
                    else f"options: hypergradients {i['name']} --help")
            print(f"{i['name'].ljust(width)}  {i['summary']}\n{' ' * width}  {i['smoke']}   (tiny; {more})")
        return 0
    exp = REGISTRY.get(args.name)
    if exp is None:
        command = next((i for i in items if i["kind"] == "command" and i["name"] == args.name), None)
        if command is None:
            print(f"hypergradients list: error: unknown experiment {args.name!r}, nor a command; "
                  f"experiments: {', '.join(REGISTRY)}; commands: {', '.join(RUNNABLE_COMMANDS)}",
                  file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(command))
        else:
            print(f"{command['name']}: {command['summary']}\n\n  run:     {command['run']}\n"
                  f"  tiny:    {command['smoke']}\n  options: hypergradients {command['name']} --help")
        return 0
    if args.json:
        print(json.dumps({"name": exp.name, "summary": exp.summary, "settings": [
            {"key": k, "default": o.default, "accepts": o.describe(), "help": o.help,
             "smoke": exp.smoke.get(k)}
            for k, o in exp.schema.items()]}))
        return 0
    print(f"{exp.name}: {exp.summary}\n")
    width = max(len(k) for k in exp.schema)
    for k, o in exp.schema.items():
        smoke = f" [--smoke: {exp.smoke[k]!r}]" if k in exp.smoke else ""
        print(f"  {k.ljust(width)}  = {o.default!r}{smoke}\n  {' ' * width}    {o.help}; {o.describe()}")
    return 0
