"""The console script checks for the ``cli`` extra before anything else: without it, one line says how
to install it; here, the extra is installed and the command-line tests run against the real packages."""

from __future__ import annotations

import subprocess
import sys

from hypergradients.app import entry as _entry


def test_console_script_without_the_extra_prints_one_line_and_exits_2() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['mlxtend'] = None\n"
        "from hypergradients.app.entry import main\nsys.exit(main(['list']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "hypergradients: the command line needs the 'cli' extra (missing: matplotlib, "
        "mlxtend); install it with: pip install 'hypergradients[cli]'\n"
    )


def test_this_environment_has_the_cli_extra(cli_extra: tuple[str, ...]) -> None:
    # `make test` installs '.[dev,cli]': the CLI tests run against the real packages.
    assert _entry.missing_cli_modules() == []
    # and the tests' list of the extra (tests/conftest.py, which decides whether tests/app runs) is the
    # console script's
    assert cli_extra == _entry.CLI_MODULES
