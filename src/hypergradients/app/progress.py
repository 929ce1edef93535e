"""One progress display for every command: a tqdm bar on a terminal, plain lines elsewhere.

On a terminal a bar redraws in place. When stderr is not a terminal (CI logs, ``make demo | tee``,
a file), carriage-return redraws would fill the log with thousands of updates, so a plain line is
printed each time another ``every`` fraction of the work is done (5% by default) and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, Any


class Progress:
    """Progress of ``total`` units of work on ``stream`` (stderr by default).

    ``enabled=False`` shows nothing (``--quiet``). Use :meth:`update` (add), :meth:`set` (absolute
    position) and :meth:`postfix` (a few named values shown beside it); :meth:`close` ends it (also
    as a context manager).
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        enabled: bool = True,
        unit: str = "step",
        stream: IO[str] | None = None,
        every: float = 0.05,
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.n = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._every = every
        self._post: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._last_step = -1
        self._bar: Any = None
        self._closed = False
        if enabled and _isatty(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc=desc, unit=unit, file=self._stream, leave=False, dynamic_ncols=True
            )

    def update(self, n: int = 1) -> None:
        """Add ``n`` units done."""
        self.set(self.n + n)

    def set(self, n: int) -> None:
        """The absolute position: ``n`` units done."""
        self.n = int(n)
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.n = self.n
            self._bar.set_postfix(self._fmt_post(), refresh=False)
            self._bar.refresh()
            return
        step = int(self.n / self.total / self._every) if self.total else 0
        if step > self._last_step:
            self._last_step = step
            self._line()

    def postfix(self, values: Mapping[str, Any]) -> None:
        """Named values shown with the next update (floats to 3 significant digits; ``None`` dropped)."""
        self._post = {k: v for k, v in values.items() if v is not None}

    def _fmt_post(self) -> dict[str, str]:
        return {k: (f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in self._post.items()}

    def _line(self) -> None:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        post = "".join(f" {k}={v}" for k, v in self._fmt_post().items())
        took = time.perf_counter() - self._t0
        print(
            f"{self.desc}: {pct:3.0f}% ({self.n}/{self.total}) {took:.1f} s{post}",
            file=self._stream,
            flush=True,
        )

    def close(self) -> None:
        """End the display."""
        if self._bar is not None and not self._closed:
            self._bar.close()
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["Progress"]
