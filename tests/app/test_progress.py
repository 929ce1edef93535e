"""``hypergradients.app.progress.Progress``: a bar on a terminal; off a terminal, a bounded number of
plain lines and no carriage returns; nothing at all when disabled."""

from __future__ import annotations

import io

from hypergradients.app.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal() -> None:
    s = io.StringIO()
    with Progress(1000, desc="job", stream=s) as p:
        for i in range(1000):
            p.postfix({"loss": 0.123456, "skip": None})
            p.update()
            assert p.n == i + 1
    lines = s.getvalue().splitlines()
    assert "\r" not in s.getvalue() and 20 <= len(lines) <= 21
    assert lines[-1].startswith("job: 100% (1000/1000)") and lines[-1].endswith("loss=0.123")


def test_set_jumps_and_disabled_is_silent() -> None:
    s = io.StringIO()
    p = Progress(10, desc="x", stream=s)
    p.set(10)
    p.close()
    assert s.getvalue().count("\n") == 1
    q = io.StringIO()
    with Progress(10, desc="x", stream=q, enabled=False) as p:
        p.update(10)
    assert q.getvalue() == ""


def test_a_bar_on_a_terminal() -> None:
    s = _Tty()
    with Progress(5, desc="bar", stream=s) as p:
        p.update(5)
    assert "\r" in s.getvalue() and "bar" in s.getvalue()
