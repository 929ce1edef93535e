"""The ``hypergradients`` command line: ``run | list | explain | compare | bench | export | retrain``.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; this file only wires them together, so the modules stay independent.
``explain``, ``compare`` and ``bench`` are registered experiments like ``weight-decay``
(``hypergradients run explain``); their sub-commands map their flags to its settings.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Sequence

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("hypergradients.app.commands.run", "run a registered experiment and write its run folder"),
    "list": ("hypergradients.app.commands.list", "list the registered experiments and their settings"),
    "explain": (
        "hypergradients.app.commands.explain",
        "show, with numbers, how the optimization path fits into the implicit derivation (= run explain)",
    ),
    "compare": (
        "hypergradients.app.commands.compare",
        "compare inverse-Hessian approximations against the exact hypergradient (= run compare)",
    ),
    "bench": (
        "hypergradients.app.commands.bench",
        "time, memory and accuracy of our hypergradient methods against a plain autograd loop (= run bench)",
    ),
    "export": (
        "hypergradients.app.commands.export",
        "write a run's tuned hyperparameters, in natural units, to a plain file",
    ),
    "retrain": (
        "hypergradients.app.commands.retrain",
        "train a fresh model with a run's tuned values fixed, on train and on train+val",
    ),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the flags' help between words only: a default such as ``Identity,Neumann,CG`` is one
    token a user copies, and argparse's wrapper would cut it in two."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="hypergradients",
        description="Gradient-based hyperparameter optimization at scale (implicit and unrolled "
        "hypergradients for PyTorch).",
    )
    parser.add_argument("--version", action="version", version=f"hypergradients {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_text,
            description=getattr(mod, "DESCRIPTION", help_text),
            formatter_class=_HelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._main(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
