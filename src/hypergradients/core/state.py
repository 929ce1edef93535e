"""What consecutive hypergradients carry from call to call: each method's own state, as a value.

Like an optax optimizer state: ``method.init(params)`` makes an empty one, each call returns the
next one as ``info.state``, and the caller passes that to the next call (``state=``). Nothing
updates a state in place: a state object, once made, never changes. Each method has its own type,
holding what makes its next solve cheaper:

* :class:`CGState` (:class:`~hypergradients.CG`, :class:`~hypergradients.Auto`): the last solution
  ``p`` (warm start) and the extreme Ritz values of ``H`` (Auto's curvature estimate);
* :class:`KrylovState` (GMRES, BiCGStab, NormalCG, MINRES): the last solution ``p`` (warm start);
  :class:`~hypergradients.FirstOrder` keeps its implied ``p = σ(w − w_σ)`` there too;
* :class:`NeumannState` (:class:`~hypergradients.Neumann`, ``alpha="auto"``): the power-iteration
  ``λ_max`` and how many calls have used it since it was estimated;
* :class:`NystromState` (:class:`~hypergradients.Nystrom`): the factored sketch;
* :class:`SolverState` itself, empty: the state of the methods that carry nothing (Exact,
  Identity, the path methods), and "no previous call" for every method: ``state=SolverState()``
  is accepted by all of them and behaves as their own empty state.

Every state also records the ``method`` that made it and the number of ``calls`` it has been
through. A state another method made (CG and Auto share theirs), one of another type, or one whose
tensors do not fit the weights (keys, shapes, dtypes) raises :class:`StateMismatchError` instead
of silently starting cold. Tensors on another device (a state loaded on the CPU for weights on a
GPU) are moved to the weights' device.

:meth:`SolverState.state_dict` holds only tensors, numbers, strings, ``None``, lists and dicts, so
it round-trips through ``torch.save`` and ``torch.load(weights_only=True)``;
:meth:`SolverState.from_state_dict` rebuilds the state of the type its method keeps. The layout is
one flat dict for every type (each fills its own entries, the others keep their defaults), the
layout of every checkpoint the library has written, so all of them load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .errors import HypergradientError
from .tree import Tree

STATE_DICT_VERSION = 1


class StateMismatchError(HypergradientError):
    """A state cannot be used by this method: another method's, another type, or other weights'."""


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_tree(what: str, tree: Mapping[str, Tensor], like: Mapping[str, Tensor], *, method: str) -> Tree:
    """``tree`` on ``like``'s devices; :class:`StateMismatchError` unless it has ``like``'s keys, shapes
    and dtypes."""
    if tree.keys() != like.keys():
        missing, extra = sorted(like.keys() - tree.keys()), sorted(tree.keys() - like.keys())
        raise StateMismatchError(
            f"hg.{method}: the state's {what} has keys {sorted(tree)} but the weights have {sorted(like)} "
            f"(missing {missing}, unexpected {extra}): it belongs to another model. Pass a fresh "
            "hg.SolverState() for these weights."
        )
    for k, ref in like.items():
        t = tree[k]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise StateMismatchError(
                f"hg.{method}: the state's {what}[{k!r}] has {_describe(t)} but the weight {k!r} has "
                f"{_describe(ref)}: it belongs to other weights. Pass a fresh hg.SolverState() for these "
                "weights."
            )
    return {k: t if t.device == like[k].device else t.to(like[k].device) for k, t in tree.items()}


# The flat layout of state_dict: every type writes these, filling in its own fields.
_LAYOUT: dict[str, Any] = {
    "p": None,
    "lambda_min": None,
    "lambda_max": None,
    "lambda_max_age": 0,
    "sketch": None,
}
# Method name -> the state type it keeps (filled in by the method classes as they are defined).
_TYPES: dict[str, type[SolverState]] = {}


def register(method: str, state_type: type[SolverState]) -> None:
    """Record that ``method`` (a class name) keeps ``state_type``: :meth:`SolverState.from_state_dict`
    rebuilds that type from a dict its method wrote."""
    _TYPES[method] = state_type


@dataclass(frozen=True, kw_only=True, eq=False)
class SolverState:
    """The base of every method's state, and the empty state ("no previous call").

    Fields:
        method: the name of the method that made it (``"CG"``, ``"Neumann"``, ...), ``None`` when
            empty; a method refuses another method's state (:class:`StateMismatchError`).
        calls: how many calls this state has been through.

    Frozen: :meth:`replace` makes a changed copy.
    """

    method: str | None = None
    calls: int = 0

    def replace(self, **changes: Any) -> SolverState:
        """A new state with ``changes`` (this one is left as it is)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """This state as tensors, numbers, strings, ``None``, lists and dicts only.

        So it round-trips through ``torch.save`` and ``torch.load(weights_only=True)``.
        """
        d: dict[str, Any] = {
            "version": STATE_DICT_VERSION,
            "method": self.method,
            "calls": int(self.calls),
            **_LAYOUT,
        }
        for f in dataclasses.fields(self):
            if f.name in ("method", "calls"):
                continue
            if f.name not in _LAYOUT:
                raise HypergradientError(
                    f"{type(self).__name__}.state_dict: the field {f.name!r} has no place in the state dict "
                    f"(its entries are {sorted(_LAYOUT)}): override state_dict and from_state_dict"
                )
            d[f.name] = _plain(getattr(self, f.name))
        return d

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> SolverState:
        """The state :meth:`state_dict` wrote, of the type its method keeps; a malformed dict names the
        bad entry."""

        def bad(key: str, want: str) -> HypergradientError:
            got = d.get(key, "<missing>") if isinstance(d, Mapping) else d
            return HypergradientError(
                f"SolverState.from_state_dict: {key!r} must be {want}, got "
                f"{got!r:.80}; pass the dict that SolverState.state_dict() returned"
            )

        if not isinstance(d, Mapping):
            raise bad("state", "a dict")
        if d.get("version") != STATE_DICT_VERSION:
            raise bad("version", str(STATE_DICT_VERSION))
        known = {"version", "method", "calls", *_LAYOUT}
        if set(d) != known:
            raise HypergradientError(
                f"SolverState.from_state_dict: keys {sorted(set(d) ^ known)} are "
                f"missing or unknown; expected exactly {sorted(known)}"
            )

        def opt_float(key: str) -> float | None:
            x = d[key]
            if x is None:
                return None
            if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
                raise bad(key, "a number or None")
            return float(x)

        def count(key: str) -> int:
            x = d[key]
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise bad(key, "an integer >= 0")
            return x

        method = d["method"]
        if method is not None and not isinstance(method, str):
            raise bad("method", "a method name or None")
        p = d["p"]
        if p is not None and not (
            isinstance(p, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in p.items())
        ):
            raise bad("p", "a dict of tensors or None")
        sketch = d["sketch"]
        if sketch is not None and not (
            isinstance(sketch, Mapping) and all(isinstance(k, str) for k in sketch)
        ):
            raise bad("sketch", "a dict or None")
        values = {
            "p": None if p is None else dict(p),
            "lambda_min": opt_float("lambda_min"),
            "lambda_max": opt_float("lambda_max"),
            "lambda_max_age": count("lambda_max_age"),
            "sketch": None if sketch is None else dict(sketch),
        }
        kind = _TYPES.get(method, SolverState) if method is not None else SolverState
        own = {f.name for f in dataclasses.fields(kind)}
        for key, value in values.items():
            if key not in own and value != _LAYOUT[key]:
                raise bad(key, f"{_LAYOUT[key]!r} in a state of hg.{method} (a {kind.__name__})")
        return kind(method=method, calls=count("calls"), **{k: v for k, v in values.items() if k in own})


def _plain(x: Any) -> Any:
    """Detached copies of tensors, lists for tuples, recursively through dicts."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return list(x)
    return x


@dataclass(frozen=True, kw_only=True, eq=False)
class KrylovState(SolverState):
    """The last solution ``p`` of ``(∂F/∂w)ᵀ p = v`` (``H p = v`` for a minimum): the next solve starts
    there, which after a small step of the weights and hyperparameters is already close."""

    p: Tree | None = None

    def warm_start(self, like: Mapping[str, Tensor], *, method: str) -> Tree | None:
        """The stored ``p`` (on ``like``'s devices) if there is one; :class:`StateMismatchError` if its
        keys, shapes or dtypes are not ``like``'s."""
        if self.p is None:
            return None
        return check_tree("p", self.p, like, method=method)


@dataclass(frozen=True, kw_only=True, eq=False)
class CGState(KrylovState):
    """:class:`KrylovState` plus estimates of the extreme eigenvalues of ``H`` (``hg.Auto``'s Ritz
    values, which a short warm-started run alone would over-estimate at the bottom)."""

    lambda_min: float | None = None
    lambda_max: float | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class NeumannState(SolverState):
    """``lambda_max``: the power-iteration estimate behind ``alpha="auto"``; ``lambda_max_age``: the
    calls since it was estimated."""

    lambda_max: float | None = None
    lambda_max_age: int = 0


@dataclass(frozen=True, kw_only=True, eq=False)
class NystromState(SolverState):
    """``sketch``: the factored approximation (``U``, ``d``, ``c``, the options it was made with and
    the residual it had when fresh), see :class:`~hypergradients.Nystrom`."""

    sketch: dict[str, Any] | None = None
