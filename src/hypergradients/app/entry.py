"""The ``hypergradients`` console script: checks for the ``cli`` extra, then runs :mod:`.cli`.

The library needs only torch; the command line (experiments, datasets, figures, reports) needs the
packages of the ``cli`` extra. Without them the script prints one line saying how to install them
and exits with status 2, instead of a traceback from deep inside a sub-command.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

# The import names of the `cli` extra in pyproject.toml (tomli only where tomllib is missing).
CLI_MODULES: tuple[str, ...] = (
    "numpy",
    "matplotlib",
    "tqdm",
    "sklearn",
    "mlxtend",
    "tomli_w",
    *(("tomli",) if sys.version_info < (3, 11) else ()),
)


def missing_cli_modules() -> list[str]:
    """The modules of the ``cli`` extra that cannot be imported here (found without importing them)."""
    missing = []
    for name in CLI_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or half-removed package counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_cli_modules()
    if missing:
        print(
            f"hypergradients: the command line needs the 'cli' extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'hypergradients[cli]'",
            file=sys.stderr,
        )
        return 2
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
