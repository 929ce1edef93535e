"""Experiment configuration: a schema of dotted keys, TOML files, ``--set key=value`` overrides.

An experiment declares its settings as ``{"train.rounds": Option(200, "rounds of Algorithm 1", min=0), ...}``.
:func:`resolve` merges, in order, the defaults, the experiment's ``--smoke`` overrides, a TOML
file (nested tables map to dotted keys) and ``--set`` pairs, and validates every value *before*
any work starts: an unknown key, a wrong type or an impossible value raises :class:`ConfigError`
naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

import tomli_w

Config = dict[str, Any]
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key, type or value is not accepted; the message names the key and the fix."""


@dataclass(frozen=True)
class Option:
    """One setting: its default, a one-line help, and what it accepts.

    ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``list`` (of ``str`` or ``int`` per
    ``item``); ``choices`` restricts values (or list items); ``low``/``high`` bound numbers
    (inclusive); ``auto=True`` also accepts the string ``"auto"`` for a number. ``nonempty`` refuses
    an empty list; ``unique`` refuses a list with repeated items (a list of arms to run, not one of
    layer sizes, where ``[128, 128]`` is valid); ``positive`` refuses numbers ``<= 0``.
    """

    default: Any
    help: str
    kind: type = str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    item: type = str
    auto: bool = False
    nonempty: bool = False
    unique: bool = False
    positive: bool = False

    def describe(self) -> str:
        """What the option accepts, in words (used in error messages and ``hypergradients list``)."""
        if self.kind is list:
            what = f"a list of {'distinct ' if self.unique else ''}{self.item.__name__}"
            if self.choices:
                what += f" from {{{', '.join(map(str, self.choices))}}}"
            if self.low is not None:
                what += f", each >= {self.low:g}"
            return what
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in [{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            what += f" >= {self.low:g}"
        elif self.high is not None:
            what += f" <= {self.high:g}"
        if self.positive:
            what += " > 0"
        return what + (" or 'auto'" if self.auto else "")

    def check(self, key: str, value: Any) -> Any:
        """The validated value (ints accepted for floats), or :class:`ConfigError`."""

        def bad(why: str = "") -> ConfigError:
            return ConfigError(f"config key {key!r}: got {value!r}{why}; expected {self.describe()}")

        if self.auto and isinstance(value, str) and value == "auto":
            return value
        if self.kind is list:
            if not isinstance(value, list):
                raise bad()
            if self.nonempty and not value:
                raise bad(" (empty)")
            for v in value:
                wrong = isinstance(v, bool) or not isinstance(v, self.item)
                if (
                    wrong
                    or (self.choices and v not in self.choices)
                    or (isinstance(v, int) and self.low is not None and v < self.low)
                ):
                    raise bad(f" (item {v!r})")
            if self.unique and len(set(map(repr, value))) != len(value):
                raise bad(" (repeated items)")
            return list(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad()
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            value = float(value)
            if not math.isfinite(value):
                raise bad()
        elif not isinstance(value, self.kind):
            raise bad()
        if self.choices is not None and value not in self.choices:
            raise bad()
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise bad()
        if self.positive and not value > 0:
            raise bad()
        return value


Schema = Mapping[str, Option]


def defaults(schema: Schema) -> Config:
    """``{key: default}``."""
    return {k: (list(o.default) if isinstance(o.default, list) else o.default) for k, o in schema.items()}


def flatten(table: Mapping[str, Any], prefix: str = "") -> Config:
    """Nested TOML tables to dotted keys: ``{"train": {"rounds": 3}} -> {"train.rounds": 3}``."""
    out: Config = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nest(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys back to nested tables (for writing TOML)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        *parents, leaf = k.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def _unknown(key: str, schema: Schema, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(schema), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({source}).{hint} Known keys: {', '.join(schema)}")


def parse_set(pair: str, schema: Schema) -> tuple[str, Any]:
    """``"train.rounds=5"`` -> ``("train.rounds", 5)``: the value is read as TOML, else as a bare string."""
    if "=" not in pair:
        raise ConfigError(f"--set expects key=value, got {pair!r} (e.g. --set train.rounds=50)")
    key, raw = (s.strip() for s in pair.split("=", 1))
    if key not in schema:
        raise _unknown(key, schema, "--set")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string such as `adam` or `auto`
    if schema[key].kind is str and not isinstance(value, str):
        value = raw
    return key, value


def read_toml(path: str | Path) -> Config:
    """A TOML file as dotted keys (:class:`ConfigError` if missing or malformed)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return flatten(tomllib.load(f))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {str(p)!r} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e


def resolve(
    schema: Schema,
    *,
    smoke: Mapping[str, Any] | None = None,
    file: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults ← smoke overrides ← TOML file ← ``--set`` ← ``extra`` (e.g. ``--seed``); all validated."""
    cfg = defaults(schema)
    layers: list[tuple[str, Mapping[str, Any]]] = [("--smoke", smoke or {}), ("config file", file or {})]
    layers.append(("--set", dict(parse_set(p, schema) for p in sets)))
    layers.append(("command line", extra or {}))
    for source, layer in layers:
        for k, v in layer.items():
            if k not in schema:
                raise _unknown(k, schema, source)
            cfg[k] = schema[k].check(k, v)
    return cfg


def write_toml(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved configuration (nested tables), atomically: a resume reads it back."""
    from ..training.files import write_atomic  # imports torch: only when a file is written

    write_atomic(path, tomli_w.dumps(nest(cfg)))


# ---------------------------------------------------------------- settings objects (dataclasses)
def _value(schema: Schema, keys: tuple[str, ...], cfg: Mapping[str, Any]) -> Any:
    """The field value of ``keys`` in ``cfg``: a list as a tuple, ``'auto'`` as ``None``; several keys
    give the tuple of their values (e.g. an interval)."""

    def one(key: str) -> Any:
        v = cfg[key]
        if isinstance(v, list):
            return tuple(v)
        return None if schema[key].auto and v == "auto" else v

    return one(keys[0]) if len(keys) == 1 else tuple(one(k) for k in keys)


def setting(schema: Schema, *keys: str) -> Any:
    """A dataclass field read from ``schema``: its default is the keys' default (see :func:`settings`),
    so that a settings object states no default of its own."""
    if not keys or any(k not in schema for k in keys):
        raise KeyError(f"setting: {keys!r} names no key of the schema")
    return dataclasses.field(default=_value(schema, keys, defaults(schema)), metadata={"keys": keys})


def settings(cls: type[T], schema: Schema, cfg: Mapping[str, Any], **overrides: Any) -> T:
    r"""The dataclass ``cls``, whose fields are :func:`setting`\ s of ``schema``, of the resolved ``cfg``
    (with ``overrides`` by field name)."""
    values = {
        f.name: _value(schema, f.metadata["keys"], cfg)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if "keys" in f.metadata
    }
    return cls(**{**values, **overrides})
