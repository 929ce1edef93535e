"""`hypergradients explain` (placeholder until its issue lands: it says so and exits non-zero)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    print("hypergradients explain: not implemented yet", file=sys.stderr)
    return 2
