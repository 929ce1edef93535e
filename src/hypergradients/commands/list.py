"""``hypergradients list``: the registered experiments, or one experiment's settings."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
List the registered experiments. With a name, list that experiment's settings: key, default,
what it accepts, and what --smoke changes. Settings are changed with `hypergradients run NAME
--set key=value` or a TOML file (--config).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", help="show the settings of this experiment")
    parser.add_argument("--json", action="store_true", help="print JSON")


def main(args: argparse.Namespace) -> int:
    from ..experiments import REGISTRY

    if args.experiment is None:
        if args.json:
            print(json.dumps([{"name": e.name, "summary": e.summary} for e in REGISTRY.values()]))
        else:
            width = max(len(n) for n in REGISTRY)
            for e in REGISTRY.values():
                print(f"{e.name.ljust(width)}  {e.summary}")
        return 0
    exp = REGISTRY.get(args.experiment)
    if exp is None:
        print(f"hypergradients list: error: unknown experiment {args.experiment!r}; registered: "
              f"{', '.join(REGISTRY)}", file=sys.stderr)
        return 2
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
