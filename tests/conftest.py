"""Settings every test shares; torch only.

``library/`` tests the library and needs torch, pytest and hypothesis alone; ``app/`` tests the
command line and its experiments and needs the ``cli`` extra. Without that extra, ``app/`` is not
collected (and the session header says so), so ``pytest`` on a torch-only install runs the library's
tests.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The import names of the `cli` extra (pyproject.toml; tomli only where tomllib is missing). The app's
# own list (hypergradients.app.entry.CLI_MODULES) is not imported here: the library's tests load
# nothing from the application layer.
CLI_EXTRA = (
    "numpy",
    "matplotlib",
    "tqdm",
    "sklearn",
    "mlxtend",
    "tomli_w",
    *(("tomli",) if sys.version_info < (3, 11) else ()),
)
MISSING = [m for m in CLI_EXTRA if importlib.util.find_spec(m) is None]
collect_ignore = ["app"] if MISSING else []


def pytest_report_header() -> str | None:
    if MISSING:
        return f"tests/app skipped: the cli extra is not installed (missing: {', '.join(MISSING)})"
    return None


@pytest.fixture(scope="session")
def cli_extra() -> tuple[str, ...]:
    """The import names of the ``cli`` extra."""
    return CLI_EXTRA


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread for the test: tiny models run several times slower with two threads
    spinning on a shared 2-core machine, and one thread keeps float results reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
