"""``hypergradients list``: everything runnable (the registered experiments), or one in detail."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DESCRIPTION = """\
List everything runnable: the registered experiments (`hypergradients run NAME`), among them
explain, compare and bench (which keep their own sub-commands too, e.g. `hypergradients explain`),
each with what it does and its tiny configuration (--smoke). With a name, list its settings: key,
default, what it accepts, and what --smoke changes; settings are changed with
`hypergradients run NAME --set key=value` or a TOML file (--config).
"""

# Experiments that also have a sub-command of their own name (whose flags map to settings).
ALIASES = ("explain", "compare", "bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="an experiment: show its settings")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _item(exp: Any) -> dict[str, Any]:
    item = {
        "name": exp.name,
        "kind": "experiment",
        "summary": exp.summary,
        "run": f"hypergradients run {exp.name}",
        "smoke": f"hypergradients run {exp.name} --smoke",
        "resumable": exp.resumable,
    }
    if exp.name in ALIASES:
        item["command"] = f"hypergradients {exp.name}"
    return item


def main(args: argparse.Namespace) -> int:
    from ..experiments import REGISTRY

    if args.name is None:
        items = [_item(e) for e in REGISTRY.values()]
        if args.json:
            print(json.dumps(items))
            return 0
        width = max(len(i["name"]) for i in items)
        for i in items:
            also = f"; also {i['command']} [flags]" if "command" in i else ""
            print(
                f"{i['name'].ljust(width)}  {i['summary']}\n{' ' * width}  {i['smoke']}   "
                f"(tiny; settings: hypergradients list {i['name']}{also})"
            )
        return 0
    exp = REGISTRY.get(args.name)
    if exp is None:
        print(
            f"hypergradients list: error: unknown experiment {args.name!r}; registered: "
            f"{', '.join(REGISTRY)}",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    **_item(exp),
                    "settings": [
                        {
                            "key": k,
                            "default": o.default,
                            "accepts": o.describe(),
                            "help": o.help,
                            "smoke": exp.smoke.get(k),
                        }
                        for k, o in exp.schema.items()
                    ],
                }
            )
        )
        return 0
    print(f"{exp.name}: {exp.summary}\n")
    width = max(len(k) for k in exp.schema)
    for k, o in exp.schema.items():
        smoke = f" [--smoke: {exp.smoke[k]!r}]" if k in exp.smoke else ""
        print(f"  {k.ljust(width)}  = {o.default!r}{smoke}\n  {' ' * width}    {o.help}; {o.describe()}")
    print(f"\n  run:  hypergradients run {exp.name} [--smoke] [--set KEY=VALUE ...]")
    if exp.name in ALIASES:
        print(f"  or:   hypergradients {exp.name} [flags]   (flags: hypergradients {exp.name} --help)")
    if not exp.resumable:
        print(
            "  keeps no checkpoints: --resume is refused; running again into the same --out replaces "
            "its files"
        )
    return 0
