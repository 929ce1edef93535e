"""Files the library writes and reads back: one atomic writer, safe loading, JSON without NaN.

Everything a resume reads goes through :func:`write_atomic` (temp file in the same folder, fsync,
rename): a crash, even SIGKILL, leaves the old file or the new one, never a torn one. Temp files
left by a kill *during* a write are named ``.<name>.tmp-<pid>-<random>`` and removed by
:func:`remove_stale_temps` at the next start.

Nothing read here runs code: checkpoints load with ``torch.load(..., weights_only=True)``
(tensors, numbers, strings, lists, tuples and dicts only), and a file that is truncated, empty,
garbage or refused raises :class:`UnreadableFileError` naming the file and the choices.

JSON has no NaN or infinity: :func:`json_dumps` writes them as ``null`` (the one place that decides
this), so every ``.json``/``.jsonl`` file and ``--json`` output parses with any JSON reader.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

_TMP_MARK = ".tmp-"


class UnreadableFileError(RuntimeError):
    """A file the library wrote cannot be read back (truncated, empty, garbage or refused).

    ``path`` is the file; ``why`` the reason alone (without the advice), for callers that rephrase
    the advice, e.g. to name the part of a run that the file belongs to.
    """

    def __init__(self, message: str, *, path: Path, why: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.why = why or message


class OutputPathError(ValueError):
    """An output folder or input file given on the command line cannot be used as asked."""


def _temp_name(path: Path) -> str:
    return f".{path.name}{_TMP_MARK}{os.getpid()}-"


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    Text is written as UTF-8. The folder must exist. Returns ``path``.
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=_temp_name(p))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary output files
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` through :func:`write_atomic`.

    ``obj`` should hold only what :func:`load_checkpoint` accepts back (tensors, numbers, strings,
    ``None``, lists, tuples, dicts): anything else would be refused when read.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_atomic(path, buf.getvalue())


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files that a killed write left in ``folder`` (not recursive); returns them."""
    d = Path(folder)
    if not d.is_dir():
        return []
    gone = []
    for f in d.iterdir():
        if f.name.startswith(".") and _TMP_MARK in f.name and f.is_file():
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    what: str = "checkpoint",
    fix: str = "delete it to start over, or restore it from a copy",
) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, or :class:`UnreadableFileError`.

    ``weights_only=True`` refuses any pickled object other than tensors and plain Python values, so
    a crafted file cannot run code. ``what`` and ``fix`` shape the message: it names the file, why
    it cannot be read, and what the user can do; nothing is deleted here.
    """
    p = Path(path)
    try:
        if p.is_file() and not zipfile.is_zipfile(p):
            # torch.save writes a zip archive; anything else (empty, cut before the archive's directory,
            # garbage) would reach torch's legacy pickle reader and fail with a misleading message.
            raise EOFError("not a zip archive (a complete torch.save file is one)")
        return torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        why = "it does not exist"
    except pickle.UnpicklingError as e:  # weights_only refused a global: a crafted or foreign file
        why = f"it holds objects other than tensors and plain values, refused for safety ({_refused(e)})"
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        why = f"it is truncated, empty or not a checkpoint ({type(e).__name__}: {_first_line(e)})"
    raise UnreadableFileError(
        f"cannot read the {what} {str(p)!r}: {why}. To continue: {fix}.", path=p, why=why
    )


def _refused(e: BaseException) -> str:
    # torch's message starts with advice to turn the weights-only safety off, the very thing that
    # would run a crafted file's code: quote only the line that names what was refused.
    for line in str(e).splitlines():
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.strip()[:200]
    return type(e).__name__


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with NaN and ±inf written as ``null`` (JSON has neither)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in ``path``, or ``None`` if it is missing, empty or torn (a value to recompute)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def check_output_dir(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Check, before any work, that ``path`` is or can become a writable folder; nothing is left behind.

    Raises :class:`OutputPathError` naming ``option`` when ``path`` is an existing file, lies under
    a file, or its nearest existing folder refuses a new entry (``/proc``, ``/sys``, read-only).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{option} {str(p)!r} is a file, not a folder; give a folder path")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(
            f"{option} {str(p)!r}: {str(probe)!r} is a file, so no folder can be made "
            "under it; give another path"
        )
    try:  # the real test: make (and remove) an entry where the first new folder would go
        tempfile.TemporaryDirectory(dir=probe, prefix=".hypergradients-probe-").cleanup()
    except OSError as e:
        # /proc and /sys answer "no such file" to a new entry: say what it means for the user.
        why = "not writable" if e.errno == errno.ENOENT else (e.strerror or str(e))
        raise OutputPathError(
            f"{option} {str(p)!r}: cannot create anything in {str(probe)!r} ({why}); give a writable folder"
        ) from None
    return p


def check_input_file(path: str | os.PathLike[str], *, option: str) -> Path:
    """``path`` if it is a readable file, else :class:`OutputPathError` naming ``option``."""
    p = Path(path)
    if not p.exists():
        raise OutputPathError(f"{option} {str(p)!r} does not exist")
    if not p.is_file():
        raise OutputPathError(f"{option} {str(p)!r} is not a file (a folder?); give a file")
    if not os.access(p, os.R_OK):
        raise OutputPathError(f"{option} {str(p)!r} cannot be read (permissions)")
    return p


__all__ = [
    "OutputPathError",
    "UnreadableFileError",
    "check_input_file",
    "check_output_dir",
    "json_dumps",
    "load_checkpoint",
    "read_json",
    "remove_stale_temps",
    "save_atomic",
    "write_atomic",
]
