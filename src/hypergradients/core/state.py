"""Solver state carried between consecutive :func:`~hypergradients.hypergradient` calls, as a value.

Like an optax optimizer state: a method makes an empty one (``method.init(params)``, or
``SolverState()``, the empty value every method accepts), each call returns the next one as
``info.state``, and the caller passes it to the next call. Each method keeps there what makes
its next solve cheaper:

* :class:`~hypergradients.CG` and :class:`~hypergradients.Auto`: the last solution ``p``
  (warm start) and the extreme Ritz values of ``H`` (Auto's curvature estimate);
* :class:`~hypergradients.Neumann` with ``alpha="auto"``: the power-iteration ``λ_max(H)`` and
  the number of calls since it was estimated (``lambda_max_age``);
* :class:`~hypergradients.Nystrom`: the factored sketch ``Ĥ = U diag(Λ) Uᵀ``.

A state another method made, or one whose tensors do not fit the weights (keys, shapes, dtypes),
raises :class:`StateMismatchError` instead of silently starting cold. Tensors on another device
(a state loaded on the CPU for weights on a GPU) are moved to the weights' device. CG and Auto
share their state (both keep ``p`` and the Ritz values, with the same meaning).

:meth:`SolverState.state_dict` holds only tensors, numbers, strings, ``None``, lists and dicts,
so it round-trips through ``torch.save`` and ``torch.load(weights_only=True)``.
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
    """A :class:`SolverState` cannot be used by this method: another method's, or other weights'."""


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
            "hg.SolverState() for these weights.")
    for k, ref in like.items():
        t = tree[k]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise StateMismatchError(
                f"hg.{method}: the state's {what}[{k!r}] has {_describe(t)} but the weight {k!r} has "
                f"{_describe(ref)}: it belongs to other weights. Pass a fresh hg.SolverState() for these "
                "weights.")
    return {k: t if t.device == like[k].device else t.to(like[k].device) for k, t in tree.items()}


@dataclass
class SolverState:
    """What consecutive :func:`~hypergradients.hypergradient` calls carry (``state=``, ``info.state``).

    Value style, like optax: ``method.init(params)`` (or ``SolverState()``, accepted by every
    method) makes an empty one, each call returns the next as ``info.state``. For compatibility
    with code written before ``info.state`` existed, :func:`~hypergradients.hypergradient` also
    copies the new state into the ``SolverState`` object it was given (``state=s`` leaves ``s``
    equal to ``info.state``), so passing the same object to successive calls keeps working.
    The methods themselves never modify a state they receive.

    Fields:
        p: the last ``p ≈ H⁻¹ ∂L_V/∂w`` (CG, Auto: the warm start).
        calls: how many calls this state has been through.
        lambda_min, lambda_max: estimates of the extreme eigenvalues of ``H``: Auto's extreme
            Ritz values, or (``lambda_max``) Neumann's power-iteration estimate behind
            ``alpha="auto"``.
        method: the name of the method that made it (``"CG"``, ``"Neumann"``, ...), ``None`` when
            empty; a method refuses another method's state (:class:`StateMismatchError`).
        lambda_max_age: Neumann: calls since ``lambda_max`` was estimated.
        sketch: Nyström: the factored approximation (``U``, ``Lambda``, the shift rule and the
            residual it had when fresh), see :class:`~hypergradients.Nystrom`.
    """

    p: Tree | None = None
    calls: int = 0
    lambda_min: float | None = None
    lambda_max: float | None = None
    method: str | None = None
    lambda_max_age: int = 0
    sketch: dict[str, Any] | None = None

    def warm(self, like: Mapping[str, Tensor], *, method: str = "CG") -> Tree | None:
        """The stored ``p`` (on ``like``'s devices) if there is one; :class:`StateMismatchError` if its
        keys, shapes or dtypes are not ``like``'s."""
        if self.p is None:
            return None
        return check_tree("p", self.p, like, method=method)

    def replace(self, **changes: Any) -> SolverState:
        """A new state with ``changes`` (this one is left as it is)."""
        return dataclasses.replace(self, **changes)

    def assign(self, other: SolverState) -> None:
        """Make this object equal to ``other`` (the in-place compatibility update)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """This state as tensors, numbers, strings, ``None``, lists and dicts only.

        So it round-trips through ``torch.save`` and ``torch.load(weights_only=True)``.
        """
        return {
            "version": STATE_DICT_VERSION,
            "method": self.method,
            "calls": int(self.calls),
            "p": None if self.p is None else {k: v.detach().clone() for k, v in self.p.items()},
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "lambda_max_age": int(self.lambda_max_age),
            "sketch": None if self.sketch is None else {
                k: (v.detach().clone() if isinstance(v, Tensor) else (list(v) if isinstance(v, tuple) else v))
                for k, v in self.sketch.items()},
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Set this state from :meth:`state_dict`'s output (as ``nn.Module.load_state_dict`` does)."""
        self.assign(SolverState.from_state_dict(d))

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> SolverState:
        """A new state from :meth:`state_dict`'s output; a malformed dict names the bad entry."""
        def bad(key: str, want: str) -> HypergradientError:
            got = d.get(key, "<missing>") if isinstance(d, Mapping) else d
            return HypergradientError(f"SolverState.from_state_dict: {key!r} must be {want}, got "
                                      f"{got!r:.80}; pass the dict that SolverState.state_dict() returned")

        if not isinstance(d, Mapping):
            raise bad("state", "a dict")
        if d.get("version") != STATE_DICT_VERSION:
            raise bad("version", str(STATE_DICT_VERSION))
        known = {"version", "method", "calls", "p", "lambda_min", "lambda_max", "lambda_max_age", "sketch"}
        if set(d) != known:
            raise HypergradientError(f"SolverState.from_state_dict: keys {sorted(set(d) ^ known)} are "
                                     f"missing or unknown; expected exactly {sorted(known)}")

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
        if p is not None and not (isinstance(p, Mapping) and all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in p.items())):
            raise bad("p", "a dict of tensors or None")
        sketch = d["sketch"]
        if sketch is not None and not (isinstance(sketch, Mapping) and all(isinstance(k, str)
                                                                             for k in sketch)):
            raise bad("sketch", "a dict or None")
        return cls(p=None if p is None else dict(p), calls=count("calls"), lambda_min=opt_float("lambda_min"),
                   lambda_max=opt_float("lambda_max"), method=method, lambda_max_age=count("lambda_max_age"),
                   sketch=None if sketch is None else dict(sketch))
