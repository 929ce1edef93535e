"""Tuned hyperparameters out of a run and back in: one plain file in natural units.

:func:`export_hparams` writes the families' natural values (decays, keep probabilities, example
weights: what :meth:`~hypergradients.hparams.Family.natural` gives) to a JSON file, ``NAME.json``,
with each family's name, kind and parametrisation and each value's key, shape and dtype. A tensor
of at most ``inline_max`` numbers (default :data:`INLINE_MAX` = 1024) is written in the JSON itself,
as a number or nested lists; larger ones go to ``NAME.pt`` beside it, written by ``torch.save`` as
a dict of tensors by key and nothing else, so that ``torch.load(..., weights_only=True)`` reads it.
The threshold keeps every scalar, per-layer and per-unit value readable in the JSON (1024 float32
numbers are about 20 KB of text) while a per-weight decay (10⁵ numbers) stays binary. Numbers are
written exactly: a float32 or float64 value read back is the same bits.

:func:`load_hparams` reads such a file back (:class:`ExportedHparams`): the tensor file only with
``weights_only=True``, and anything else (a tensor file that holds more than tensors by key, a
JSON of another format, shapes or dtypes that disagree, a value that is not finite) is refused with
:class:`~hypergradients.UnreadableFileError` naming the file and what is wrong.

:func:`set_natural` puts natural values into families (in place), from a dict keyed by
hyperparameter key or family name (``{"weight_decay": 3e-4}``, a black-box search's best value),
from an :class:`ExportedHparams` or from the path of an exported file.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..hparams.base import Family, NaturalValue, unconstrained
from ..hparams.objective import collect_hparams
from .files import UnreadableFileError, json_dumps, load_checkpoint, write_atomic

FORMAT = "hypergradients.hparams"
VERSION = 1
INLINE_MAX = 1024
_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

__all__ = [
    "FORMAT",
    "INLINE_MAX",
    "VERSION",
    "ExportedFamily",
    "ExportedHparams",
    "Values",
    "export_hparams",
    "load_hparams",
    "natural_values",
    "set_natural",
]


@dataclass(frozen=True)
class ExportedFamily:
    """One family of an exported file: its ``name`` (the key prefix), ``kind`` (the class name),
    ``parametrisation`` (how its stored values map to the natural ones) and its ``keys``."""

    name: str
    kind: str
    parametrisation: str
    keys: tuple[str, ...]


@dataclass
class ExportedHparams:
    """What :func:`load_hparams` read: the natural ``values`` by key (CPU tensors, the dtypes
    written), the ``families`` they belong to, the ``source`` the exporter recorded (e.g. the run
    folder and arm) and the file's ``path``."""

    values: dict[str, Tensor]
    families: list[ExportedFamily]
    source: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def family(self, name: str) -> ExportedFamily:
        """The family called ``name`` (``KeyError`` naming the ones there are)."""
        for f in self.families:
            if f.name == name:
                return f
        raise KeyError(f"{self._where()} has no family {name!r}; it has {[f.name for f in self.families]}")

    def check(self, families: Sequence[Family]) -> None:
        """Refuse ``families`` whose names this file has under another kind, other keys or other
        shapes (values exported from per-layer decays do not fit per-weight ones), naming both. To
        start finer families from coarser values on purpose, pass ``.values`` (a plain dict, whose
        numbers broadcast) instead of the file."""
        for fam in families:
            mine = next((f for f in self.families if f.name == fam.name), None)
            if mine is None:
                continue
            if mine.kind != type(fam).__name__:
                raise ValueError(
                    f"{self._where()} holds {fam.name!r} as a {mine.kind}, but the family of that "
                    f"name here is a {type(fam).__name__}: build the families it was exported from"
                )
            theirs = set(fam.tensors())
            if set(mine.keys) != theirs:
                odd = sorted(set(mine.keys) ^ theirs)[0]
                raise ValueError(
                    f"{self._where()} holds {fam.name!r} ({mine.kind}) with other keys than the family "
                    f"here ({odd!r} is in one and not the other): it was exported for another model "
                    "or granularity"
                )
            for k, t in fam.tensors().items():
                if self.values[k].shape != t.shape:
                    raise ValueError(
                        f"{self._where()} holds {k!r} of shape {tuple(self.values[k].shape)}, the family "
                        f"here has it of shape {tuple(t.shape)}: it was exported for another model or "
                        "granularity"
                    )

    def _where(self) -> str:
        return f"the exported file {str(self.path)!r}" if self.path is not None else "the exported values"


Values = Mapping[str, NaturalValue] | ExportedHparams | str | os.PathLike[str]
"""Natural values: a dict keyed by hyperparameter key or family name, what :func:`load_hparams`
returned, or the path of a file :func:`export_hparams` wrote."""


class HasFamilies(Protocol):
    """What is read of a :class:`~hypergradients.HyperOptimizer` here: its families."""

    families: list[Family]


def _families(source: HasFamilies | Family | Sequence[Family]) -> list[Family]:
    if isinstance(source, Family):
        return [source]
    if not isinstance(source, Sequence):
        held = getattr(source, "families", None)
        fams: list[Any] = list(held) if isinstance(held, list) else [source]  # a non-family is refused below
    else:
        fams = list(source)
    bad = next((f for f in fams if not isinstance(f, Family)), None)
    if bad is not None or not fams:
        got = type(bad).__name__ if bad is not None else "an empty list"
        raise TypeError(f"export_hparams takes a HyperOptimizer, a family or a list of families, got {got}")
    return fams


def _tensor_file(path: Path) -> Path:
    return path.with_suffix(".pt")


def export_hparams(
    source: HasFamilies | Family | Sequence[Family],
    path: str | os.PathLike[str],
    *,
    inline_max: int = INLINE_MAX,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the natural values of ``source``'s families to ``path`` (a ``.json`` file).

    Args:
        source: a :class:`~hypergradients.HyperOptimizer`, one family or a list of families.
        path: the JSON file (its folder must exist). Tensors of more than ``inline_max`` numbers go
            to the file of the same name ending in ``.pt`` beside it (written first; the JSON last,
            so a JSON that exists names a complete tensor file).
        inline_max: the largest tensor, in numbers, written into the JSON (default 1024; 0: every
            tensor in the ``.pt`` file).
        meta: plain values recorded as the file's ``source`` (where the values came from).

    Returns the JSON's path. Non-finite values are refused (``ValueError`` naming the key); nothing
    is written then. Both files are written atomically.
    """
    p = Path(path)
    if p.suffix != ".json":
        raise ValueError(
            f"export_hparams writes a .json file (large tensors go to a .pt beside it), got "
            f"{str(p)!r}: give a path ending in .json"
        )
    if isinstance(inline_max, bool) or not isinstance(inline_max, int) or inline_max < 0:
        raise ValueError(
            f"inline_max must be an integer >= 0 (numbers per tensor kept in the JSON), got {inline_max!r}"
        )
    fams = _families(source)
    collect_hparams(fams)  # a key that two families use is refused here, as everywhere
    tensor_name = _tensor_file(p).name
    records: list[dict[str, Any]] = []
    big: dict[str, Tensor] = {}
    inline: list[str] = []
    for fam in fams:
        entries: dict[str, Any] = {}
        for k, v in fam.natural().items():
            t = v.detach().cpu()
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise ValueError(
                    f"{k!r} has dtype {t.dtype}; exported values are floating point ({', '.join(_DTYPES)})"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the natural value of {k!r} ({type(fam).__name__} {fam.name!r}) is not finite "
                    "(NaN or inf): nothing written; export the values of a run that finished"
                )
            entry: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype}
            if t.numel() <= inline_max:
                # one line per value (a placeholder now, the numbers after the indented dump below)
                entry["value"] = f"\0{len(inline)}\0"
                inline.append(json_dumps(t.double().tolist()))
            else:
                entry["file"] = tensor_name
                big[k] = t.clone()
            entries[k] = entry
        records.append(
            {
                "name": fam.name,
                "kind": type(fam).__name__,
                "parametrisation": fam.parametrisation,
                "count": fam.count(),
                "values": entries,
            }
        )
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "inline_max": inline_max,
        "tensor_file": tensor_name if big else None,
        "source": dict(meta or {}),
        "families": records,
    }
    text = json_dumps(doc, indent=1, ensure_ascii=False)  # before any file: a bad meta fails here
    text = re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: inline[int(m.group(1))], text)
    if big:
        buf = io.BytesIO()
        torch.save(big, buf)
        write_atomic(_tensor_file(p), buf.getvalue())
    write_atomic(p, text + "\n")
    return p


def _refuse(path: Path, why: str) -> UnreadableFileError:
    return UnreadableFileError(
        f"cannot read the exported hyperparameters {str(path)!r}: {why}. Give a file that "
        "hypergradients.export_hparams (or `hypergradients export`) wrote",
        path=path,
        why=why,
    )


def load_hparams(path: str | os.PathLike[str]) -> ExportedHparams:
    """The natural values that :func:`export_hparams` wrote to ``path``, checked (module docstring).

    The ``.pt`` file beside it is read with ``torch.load(..., weights_only=True)`` only, and must hold
    a dict of tensors by key and nothing else. Raises :class:`~hypergradients.UnreadableFileError`
    naming the file and what is wrong.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refuse(p, "it does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(p, f"it is not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _refuse(p, f"its format is {found!r}, not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise _refuse(
            p,
            f"it is version {doc.get('version')!r} of the format; this hypergradients reads "
            f"version {VERSION}",
        )
    fams_doc = doc.get("families")
    if not isinstance(fams_doc, list) or not fams_doc:
        raise _refuse(p, "it lists no families")
    tensors: dict[str, Any] | None = None
    values: dict[str, Tensor] = {}
    families: list[ExportedFamily] = []
    for rec in fams_doc:
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("values"), dict)
            or not all(isinstance(rec.get(k), str) for k in ("name", "kind", "parametrisation"))
        ):
            raise _refuse(p, f"a family entry is malformed ({str(rec)[:80]})")
        for k, entry in rec["values"].items():
            if k in values:
                raise _refuse(p, f"the key {k!r} appears twice")
            shape, dtype = (
                (entry.get("shape"), entry.get("dtype")) if isinstance(entry, dict) else (None, None)
            )
            if (
                not isinstance(shape, list)
                or not all(isinstance(n, int) and n >= 0 for n in shape)
                or dtype not in _DTYPES
            ):
                raise _refuse(
                    p, f"the entry of {k!r} lacks a shape or a floating-point dtype ({str(entry)[:80]})"
                )
            if "value" in entry:
                try:
                    t = torch.tensor(entry["value"], dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError) as e:
                    raise _refuse(
                        p, f"the value of {k!r} is not a number or nested lists of numbers ({e})"
                    ) from None
                t = t.to(_DTYPES[dtype])
            elif "file" in entry:
                if tensors is None:
                    tensors = _read_tensor_file(p, entry["file"])
                if k not in tensors:
                    raise _refuse(p, f"its tensor file has no tensor {k!r}")
                t = tensors[k]
                if t.dtype != _DTYPES[dtype]:
                    raise _refuse(p, f"the tensor {k!r} is {t.dtype}, the JSON says {dtype}")
            else:
                raise _refuse(p, f"the entry of {k!r} has neither a 'value' nor a 'file'")
            if list(t.shape) != shape:
                raise _refuse(p, f"the value of {k!r} has shape {list(t.shape)}, the JSON says {shape}")
            if not bool(torch.isfinite(t).all()):
                raise _refuse(p, f"the value of {k!r} is not finite")
            values[k] = t
        families.append(
            ExportedFamily(rec["name"], rec["kind"], rec["parametrisation"], tuple(rec["values"]))
        )
    source = doc.get("source")
    return ExportedHparams(values, families, source if isinstance(source, dict) else {}, p)


def _read_tensor_file(path: Path, name: Any) -> dict[str, Tensor]:
    if not isinstance(name, str) or Path(name).name != name:
        raise _refuse(path, f"it names the tensor file {name!r}, which is not a file name beside it")
    where = path.parent / name
    obj = load_checkpoint(
        where,
        what="tensor file of the exported hyperparameters",
        fix=f"export the hyperparameters again (it belongs to {str(path)!r})",
    )
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict with other values than tensors"
        raise _refuse(path, f"its tensor file {str(where)!r} holds {what}, not only tensors by key")
    return obj


def natural_values(values: Values, families: Sequence[Family] | None = None) -> Mapping[str, NaturalValue]:
    """``values`` as a dict (an exported file read, checked against ``families`` when given)."""
    if isinstance(values, (str, os.PathLike)):
        values = load_hparams(values)
    if isinstance(values, ExportedHparams):
        if families is not None:
            values.check(families)
        return values.values
    if not isinstance(values, Mapping):
        raise TypeError(
            f"values must be a dict of natural values, an ExportedHparams or the path of an exported "
            f"file, got {type(values).__name__}"
        )
    return values


def set_natural(families: Sequence[Family], values: Values, *, strict: bool = True) -> dict[str, Tensor]:
    """Give ``families`` the natural ``values``, in place, all or nothing.

    ``values``: a dict keyed by hyperparameter key or by family name (a number under a family's
    name sets every value of it, e.g. ``{"weight_decay": 3e-4}`` from a black-box search, to refine
    per weight afterwards), what :func:`load_hparams` returned, or the path of an exported file.
    Units are the families' natural ones (:meth:`~hypergradients.hparams.Family.natural`: decays,
    *keep* probabilities for dropout). Every value is converted and checked before any tensor is
    written (:func:`hypergradients.hparams.unconstrained`); the tensors are the families' own, so a
    :class:`~hypergradients.HyperOptimizer` or optimizer built over them sees the new values.
    ``strict``: an unknown key raises ``KeyError`` (``False``: ignored). Returns the unconstrained
    values written, by key.
    """
    fams = list(families)
    new = unconstrained(fams, natural_values(values, fams), strict=strict)
    own = {k: t for f in fams for k, t in f.tensors().items()}
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v)
    return new
