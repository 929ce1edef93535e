"""Per-unit dropout and per-weight DropConnect with a continuous relaxation (concrete dropout).

Each dropped unit (or weight) ``i`` has a keep probability ``q_i = σ(θ_i)``; the family stores the
logit ``θ_i`` (unconstrained) and reports ``q_i``. A hard Bernoulli mask has no derivative in
``q``, so the mask is the relaxed Bernoulli (binary concrete) sample of Maddison et al. 2017 and
Jang et al. 2017, as in concrete dropout (Gal, Hron & Kendall 2017):

    z_i = σ((θ_i + log u − log(1 − u)) / τ),     u ~ U(0, 1),

which tends to a Bernoulli(``q_i``) draw as the temperature ``τ → 0``; the unit is scaled by
``z_i / q_i`` (inverted dropout, so the expected activation stays close to the undropped one and
evaluation needs no rescaling). ``u`` comes from the hypergradient's fixed noise
(:class:`~hypergradients.hparams.Noise`), so within one hypergradient the mask is a fixed smooth
function of ``θ`` and ``dL_T/dθ`` is exact for that sample. The validation loss has no dropout.
Exactly: ``u = clamp(torch.rand(mask shape, generator=g, dtype=dt), ε, 1 − ε)``, ``ε = 1e-6``
(``_EPS``), ``g`` the evaluation's generator on the tensor's device (seeded with the noise's
seed), ``dt`` the masked tensor's dtype; the clamp keeps ``|log u − log(1 − u)| ≤ 13.8``.

:class:`Dropout` drops *units*: a forward hook on a named submodule masks its input (pre-hook) or
its output (post-hook) along the unit axis, one mask entry per example per unit, shared across
time steps and spatial positions (variational dropout for sequences, Gal & Ghahramani 2016;
channel dropout for convolutions). Units, unit axis and batch axis are read from the submodule:

================  ==========================  ====================  ==========================
submodule         ``"input"`` units           ``"output"`` units    mask shape
================  ==========================  ====================  ==========================
``nn.Linear``     ``in_features``             ``out_features``      ``(B, …1, units)`` or
                                                                    ``(…1, B, units)``
``nn.ConvNd``     ``in_channels``             ``out_channels``      ``(B, units, 1, …)``
``nn.Embedding``  (ids: refused)              ``embedding_dim``     ``(B, …1, units)`` or
                                                                    ``(…1, B, units)``
``nn.LSTM/GRU``   ``input_size``              hidden (×2 if bidir)  ``(B, 1, units)`` or
                                                                    ``(1, B, units)`` (time
                                                                    first); output = ``out[0]``
================  ==========================  ====================  ==========================

Where the examples are: a recurrent layer says so itself (its ``batch_first``). For ``nn.Linear``
and ``nn.Embedding`` sites the :class:`Dropout` argument ``batch_first`` says it: ``True``, the
examples are on the first axis (``(B, T, units)``, ``(B, units)``); ``False``, time first
(``(T, B, units)``, ``nn.LSTM``'s default layout), the examples are on the axis before the units
(a 2-D ``(B, units)`` still gets one mask per row). Its default, ``None``, follows the model's
recurrent layers: ``False`` if all of them are time first, ``True`` if they are batch first or
there are none; a model whose recurrent layers disagree must say which.

LSTM units: *input* = the pre-hook on the first LSTM layer (the embedding's output as the LSTM
sees it), *hidden* = the output of layer ``l`` on its way to layer ``l+1`` (use one ``nn.LSTM``
per layer and hook the lower one's output; PyTorch's fused multi-layer LSTM has no hook between
its layers), *output* = the top layer's output, *embedding* = the ``nn.Embedding``'s output.

:class:`DropConnect` drops *weights* (Wan et al. 2013; on an LSTM's hidden-to-hidden matrices
``weight_hh_l*`` as in AWD-LSTM, Merity et al. 2018): one logit per scalar weight, one mask per
minibatch (shared by its examples and time steps), applied through the ``model_weights`` hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.tree import Tree
from .base import Description, Family, Hook, Sampler, natural_leaves, unnatural_leaves

Where = Literal["input", "output"]
_EPS = 1e-6  # u ∈ [ε, 1−ε]: log u and log(1−u) stay finite (|logit| ≤ 13.8)


def _check_prob(init: float, what: str) -> None:
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < 1:
        raise ValueError(f"{what} (the initial keep probability) must be a number in (0, 1), got {init!r}")


def _check_temperature(t: float) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0 (0.1 is a common choice), got {t!r}")


def _logits(family: Family, values: Mapping[str, Tensor]) -> Tree:
    """The logits ``θ = log q − log(1 − q)`` of keep probabilities ``q`` in (0, 1)."""
    return unnatural_leaves(
        family,
        values,
        lambda q: torch.log(q) - torch.log1p(-q),
        valid=lambda q: (q > 0) & (q < 1),
        domain="in (0, 1) (a keep probability)",
    )


def relaxed_mask(theta: Tensor, u: Tensor, temperature: float) -> Tensor:
    """``σ((θ + log u − log(1 − u)) / τ) / σ(θ)``: a relaxed Bernoulli(``σ(θ)``) keep mask, rescaled."""
    z = torch.sigmoid((theta + torch.log(u) - torch.log1p(-u)) / temperature)
    return z / torch.sigmoid(theta)


@dataclass(frozen=True)
class Site:
    """Where :class:`Dropout` acts: the ``where`` side of submodule ``module``, ``units`` wide along
    ``unit_axis``, examples along ``batch_axis`` when the tensor has at least ``batched_ndim`` axes
    (fewer: an unbatched call, one mask for all of it; ``batch_axis=None``: always one mask)."""

    module: str
    where: Where
    units: int
    unit_axis: int = -1
    batch_axis: int | None = 0
    batched_ndim: int = 2


def _batch_first(model: nn.Module, batch_first: bool | None) -> bool:
    """The layout of the Linear and Embedding sites: ``batch_first``, or the recurrent layers' own."""
    if batch_first is not None:
        if not isinstance(batch_first, bool):
            raise ValueError(
                f"batch_first must be True, False or None (follow the model's recurrent "
                f"layers), got {batch_first!r}"
            )
        return batch_first
    rnns = {n: m.batch_first for n, m in model.named_modules() if isinstance(m, nn.RNNBase)}
    if len(set(rnns.values())) > 1:
        raise ValueError(
            f"Dropout: the model's recurrent layers disagree on batch_first ({rnns}), so the "
            "examples' axis of its Linear and Embedding sites is not known: pass "
            "batch_first=True (B, T, ...) or batch_first=False (T, B, ...)"
        )
    return all(rnns.values())  # no recurrent layer: batch first


def _infer(model: nn.Module, module: str, where: Where, batch_first: bool | None = None) -> Site:
    try:
        sub = model.get_submodule(module)
    except AttributeError as e:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"Dropout: the model has no submodule {module!r}; it has {names[:20]}") from e
    if where not in ("input", "output"):
        raise ValueError(f"Dropout site {module!r}: where must be 'input' or 'output', got {where!r}")
    # Time first: the examples are on the axis before the units, (T, B, units), and a 2-D
    # (B, units) keeps one mask per row; batch first: on axis 0.
    if isinstance(sub, nn.Linear):
        return Site(
            module,
            where,
            sub.in_features if where == "input" else sub.out_features,
            batch_axis=0 if _batch_first(model, batch_first) else -2,
        )
    if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Site(
            module,
            where,
            sub.in_channels if where == "input" else sub.out_channels,
            1,
            0,
            len(sub.kernel_size) + 2,
        )
    if isinstance(sub, nn.Embedding):
        if where == "input":
            raise ValueError(
                f"Dropout site {module!r}: an nn.Embedding's input is token ids; drop its "
                "'output' units instead"
            )
        return Site(
            module, where, sub.embedding_dim, batch_axis=0 if _batch_first(model, batch_first) else -2
        )
    if isinstance(sub, nn.RNNBase):
        out = (sub.proj_size or sub.hidden_size) * (2 if sub.bidirectional else 1)
        return Site(
            module, where, sub.input_size if where == "input" else out, -1, 0 if sub.batch_first else 1, 3
        )
    raise ValueError(
        f"Dropout site {module!r}: cannot infer the units of a {type(sub).__name__}; drop "
        "the input or output of an nn.Linear, nn.ConvNd, nn.Embedding or nn.LSTM/GRU/RNN, "
        "or pass a Site(module, where, units, unit_axis, batch_axis)"
    )


def _mask_shape(x: Tensor, site: Site) -> list[int]:
    ua = site.unit_axis % x.ndim
    if x.shape[ua] != site.units:
        raise ValueError(
            f"Dropout at {site.module!r} ({site.where}): expected {site.units} units along axis "
            f"{site.unit_axis}, got a tensor of shape {tuple(x.shape)}"
        )
    shape = [1] * x.ndim
    shape[ua] = site.units
    # An unbatched input (e.g. an LSTM's (T, F)) has one axis fewer: then one mask for all of it.
    if site.batch_axis is not None and x.ndim >= site.batched_ndim:
        ba = site.batch_axis % x.ndim
        if ba != ua:
            shape[ba] = x.shape[ba]
    return shape


class Dropout(Family):
    """Per-unit concrete dropout at named submodules (see the module docstring for the maths).

    Args:
        model: the model (only its submodules' types and sizes are read).
        sites: where to drop: submodule names (their ``"output"``), ``"name:input"`` /
            ``"name:output"`` strings, or :class:`Site` objects.
        init: the initial keep probability ``q`` of every unit (stored as ``logit q``).
        temperature: ``τ`` of the relaxed Bernoulli mask (smaller = closer to hard dropout, with
            larger gradients' variance).
        name: key prefix; the keys are ``"<name>.<module>.<where>"``, one logit per unit.
        batch_first: where the examples are at ``nn.Linear`` and ``nn.Embedding`` sites: ``True``
            on the first axis, ``False`` time first (``(T, B, units)``); ``None`` (default) follows
            the model's recurrent layers (time first only if all of them are). Recurrent sites
            follow their own module's ``batch_first``; :class:`Site` objects are used as given.
        dtype: of the logits; default the model's first parameter's (floating) dtype, else torch's
            default dtype. They live on that parameter's device.
    """

    stochastic = True
    parametrisation = "keep probability q = σ(θ) per unit (logit θ stored); relaxed Bernoulli mask z/q"

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str | Site],
        *,
        init: float = 0.9,
        temperature: float = 0.1,
        name: str = "dropout",
        dtype: torch.dtype | None = None,
        batch_first: bool | None = None,
    ) -> None:
        _check_prob(init, "init")
        _check_temperature(temperature)
        if isinstance(sites, str) or not sites:
            raise ValueError(
                f"sites must be a non-empty list of submodule names or Site objects, got {sites!r}"
            )
        ref = next(iter(model.parameters()), None)
        floating = ref is not None and ref.is_floating_point()
        dtype = dtype or (ref.dtype if ref is not None and floating else torch.get_default_dtype())
        device = ref.device if ref is not None else torch.device("cpu")
        self.name, self.init, self.temperature = name, float(init), float(temperature)
        self.sites: dict[str, Site] = {}
        for s in sites:
            if isinstance(s, str):
                mod, _, where = s.partition(":")
                s = _infer(model, mod, where or "output", batch_first)  # type: ignore[arg-type]
            key = f"{name}.{s.module}.{s.where}"
            if key in self.sites:
                raise ValueError(f"Dropout {name!r}: the site {s.module}:{s.where} is listed twice")
            self.sites[key] = s
        logit = math.log(init) - math.log1p(-init)
        self._t = {
            k: torch.full((s.units,), logit, dtype=dtype, device=device, requires_grad=True)
            for k, s in self.sites.items()
        }

    def __repr__(self) -> str:
        where = [f"{s.module}:{s.where}" for s in self.sites.values()]
        return (
            f"Dropout(name={self.name!r}, sites={where}, "
            f"init={self.init:g}, temperature={self.temperature:g}, {self.count()} hyperparameters)"
        )

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The keep probabilities ``σ(θ)`` (detached), keyed like :meth:`tensors`."""
        return natural_leaves(self._t, hparams, torch.sigmoid)

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The logits ``θ`` of the *keep* probabilities ``q`` given (a drop rate ``p`` is ``q = 1 − p``)."""
        return _logits(self, values)

    def describe(self) -> Description:
        groups = {f"{s.module}:{s.where}": s.units for s in self.sites.values()}
        return Description(
            self.name,
            f"Dropout, concrete, τ={self.temperature:g}",
            self.count(),
            self.parametrisation,
            groups,
        )

    def hooks(self, hparams: Mapping[str, Tensor], noise: Sampler) -> list[Hook]:
        out: list[Hook] = []
        for key, site in self.sites.items():
            theta = hparams[key]

            def drop(x: Tensor, site: Site = site, theta: Tensor = theta) -> Tensor:
                shape = _mask_shape(x, site)
                u = noise.uniform(shape, dtype=x.dtype, device=x.device, eps=_EPS)
                view = [1] * x.ndim
                view[site.unit_axis % x.ndim] = site.units
                return x * relaxed_mask(theta.to(x.dtype).reshape(view), u, self.temperature)

            if site.where == "input":

                def pre(mod: nn.Module, args: tuple[Any, ...], drop: Any = drop) -> tuple[Any, ...]:
                    return (drop(args[0]), *args[1:])

                out.append(Hook(site.module, pre, "pre"))
            else:

                def post(mod: nn.Module, args: tuple[Any, ...], output: Any, drop: Any = drop) -> Any:
                    if isinstance(output, tuple):  # an RNN's (output, state): drop the output sequence
                        return (drop(output[0]), *output[1:])
                    return drop(output)

                out.append(Hook(site.module, post, "post"))
        return out


class DropConnect(Family):
    """Per-weight concrete DropConnect on named parameters (e.g. an LSTM's ``weight_hh_l0``).

    ``w_ij ← w_ij · z_ij / q_ij`` with ``q = σ(θ)`` per scalar weight and ``z`` the relaxed
    Bernoulli mask of the module docstring, one mask per minibatch, through the
    ``model_weights`` hook (the penalties, e.g. weight decay, see the undropped weights).

    Args:
        model: the model (names, shapes, dtypes read; a frozen parameter is taken from it).
        params: the parameter names to drop, e.g. ``["rnn.weight_hh_l0", "rnn.weight_hh_l1"]``.
        init, temperature, name: as for :class:`Dropout`; keys ``"<name>.<param>"``.
    """

    stochastic = True
    parametrisation = "keep probability q = σ(θ) per weight (logit θ stored); relaxed Bernoulli mask z/q"

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str],
        *,
        init: float = 0.9,
        temperature: float = 0.1,
        name: str = "dropconnect",
    ) -> None:
        _check_prob(init, "init")
        _check_temperature(temperature)
        named = dict(model.named_parameters())
        if isinstance(params, str) or not params:
            raise ValueError(f"params must be a non-empty list of parameter names, got {params!r}")
        unknown = [p for p in params if p not in named]
        if unknown:
            hh = [k for k in named if "weight_hh" in k]
            raise ValueError(
                f"DropConnect: the model has no parameter {unknown[0]!r}"
                + (f"; its recurrent weights are {hh}" if hh else f"; it has {sorted(named)[:20]}")
            )
        self.name, self.init, self.temperature = name, float(init), float(temperature)
        self.params = list(params)
        self._frozen = {k: named[k].detach() for k in self.params}
        logit = math.log(init) - math.log1p(-init)
        self._t = {
            f"{name}.{k}": torch.full(
                named[k].shape, logit, dtype=named[k].dtype, device=named[k].device, requires_grad=True
            )
            for k in self.params
        }

    def __repr__(self) -> str:
        return (
            f"DropConnect(name={self.name!r}, params={self.params}, init={self.init:g}, "
            f"temperature={self.temperature:g}, {self.count()} hyperparameters)"
        )

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The keep probabilities ``σ(θ)`` (detached), keyed like :meth:`tensors`."""
        return natural_leaves(self._t, hparams, torch.sigmoid)

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The logits ``θ`` of the *keep* probabilities ``q`` given (a drop rate ``p`` is ``q = 1 − p``)."""
        return _logits(self, values)

    def describe(self) -> Description:
        groups = {k: self._t[f"{self.name}.{k}"].numel() for k in self.params}
        return Description(
            self.name,
            f"DropConnect, concrete, τ={self.temperature:g}",
            self.count(),
            self.parametrisation,
            groups,
        )

    def model_weights(
        self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], noise: Sampler
    ) -> Mapping[str, Tensor]:
        out = dict(params)
        for k in self.params:
            w = out[k] if k in out else self._frozen[k]
            u = noise.uniform(w.shape, dtype=w.dtype, device=w.device, eps=_EPS)
            out[k] = w * relaxed_mask(hparams[f"{self.name}.{k}"].to(w.dtype), u, self.temperature)
        return out
