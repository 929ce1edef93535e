"""The interface every hyperparameter family implements, and how families compose.

A *family* owns a group of hyperparameter tensors and says how they enter the training loss
``L_T``. :class:`~hypergradients.hparams.objective.Objective` (used by ``HyperOptimizer`` and ``fit``)
only talks to this interface, so a new family (dropout, an augmentation network, distilled data,
per-example weights) plugs in without changing the trainer.

**Tensors.** :meth:`Family.tensors` are the *unconstrained* leaves the hyper-optimizer updates
(a positive quantity stored as its log, a probability as its logit); :meth:`Family.natural` maps
them to the values a user reads, and :attr:`Family.parametrisation` says how in words. Keys are
global across families, so each family prefixes them with its ``name``.

**Hooks.** A family enters ``L_T`` through any of six hooks, each a no-op by default. One
evaluation of ``L_T(w, λ)`` on a training batch is, in this order:

===============================  ================================================================
:meth:`~Family.batch`            rewrites the training batch (augmentation, appended distilled
                                 data); chained in family order: family 2 sees family 1's batch
:meth:`~Family.model_weights`    rewrites the weights the model is called with (DropConnect);
                                 chained in family order; the penalties see the *untouched* ``w``
:meth:`~Family.hooks`            forward pre/post hooks on named submodules, registered on the
                                 model for the duration of this one forward call only (dropout
                                 on hidden units); on one submodule they run in family order
:meth:`~Family.forward`          wraps the whole functional forward; nested in family order
                                 (family 1's wrapper is innermost)
:meth:`~Family.reduce`           per-example losses ``(B,)`` → one number (example weights); **at
                                 most one family may reduce**: two are refused when the
                                 ``Objective`` is built (a product of weights is one family's job)
:meth:`~Family.penalty`          a term added to ``L_T`` (weight decay); penalties add
===============================  ================================================================

The validation loss ``L_V`` never goes through these hooks: it measures the plain model in
evaluation mode (no dropout, no reweighting, the real validation data).

**Noise.** A family that draws random numbers sets ``stochastic = True``. One hypergradient
evaluates ``L_T`` many times (every reverse-mode HVP re-runs the backward of one graph, but every
forward-mode or finite-difference HVP and every unrolled step runs ``L_T`` again), and all those
evaluations must see the *same* noise, or the Hessian, the mixed partials and ``∂L_V/∂w`` would
belong to different functions. So the hyper step draws one :class:`Noise` (a seed, from the
``HyperOptimizer``'s own generator, whose state its ``state_dict`` holds, so a resumed run draws
the seeds an uninterrupted one would) and every evaluation of ``L_T`` within that hypergradient
starts a fresh :class:`Sampler` from it: the same seed, so the same draws in the same order. Each
inner step draws its own :class:`Noise` from the same generator. The sampler is passed to
:meth:`~Family.model_weights` and :meth:`~Family.hooks` always, and as the keyword ``noise=`` to
:meth:`~Family.batch`, :meth:`~Family.forward`, :meth:`~Family.reduce` and
:meth:`~Family.penalty` of a stochastic family that overrides them (its override adds the
parameter ``noise: Sampler | None = None``; a deterministic family keeps the plain signatures).
Draw with the sampler only (``noise.uniform``, ``noise.normal``, ``noise.generator(device)``),
never from torch's global generator, in an order that depends only on the shapes.

What the hypergradient then is: with noise ``ε`` fixed, ``L_T(w, λ; ε)`` is a deterministic
function, and the hyper step returns *its* hypergradient ``g_ε = ∂L_V/∂λ − ∂²L_T(ε)/∂λ∂wᵀ · p``,
``p = H_ε⁻¹ ∂L_V/∂w``, at the current weights (taken as ``≈ w*``). It is an unbiased estimate of
the hypergradient of the expected objective ``E_ε L_T`` only if (a) the weights minimise
``E_ε L_T`` and (b) the Hessian ``H_ε`` does not depend on ``ε`` (noise entering ``L_T`` at most
linearly in ``w``, e.g. noise added to the targets of least squares): then ``g_ε`` is linear
in ``L_T(ε)`` and ``E g_ε`` is the expected objective's hypergradient. Otherwise
``E[H_ε⁻¹] ≠ (E H_ε)⁻¹`` and the estimate is biased, the bias shrinking with the noise's effect
on ``H``; the spread over noise samples is measured in docs/families.md.

**Counting.** :meth:`Family.describe` gives the count, the parametrisation and a breakdown by
group, for printing before training; :func:`describe` does it for a list of families.

**Natural values in.** :meth:`Family.from_natural` is the inverse of :meth:`Family.natural`: the
unconstrained tensors whose natural values are the ones given (a decay's log, a keep
probability's logit), refusing values outside the natural domain by key. :func:`unconstrained`
does it for a list of families from a dict keyed by hyperparameter key or by family name (a
number under a family's name sets every value of that family: ``{"weight_decay": 3e-4}``), which
is how a tuned value comes in from elsewhere, e.g. a black-box search's best value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..core.tree import Tree

ModelForward = Callable[[Mapping[str, Tensor], Tensor], Tensor]
"""``forward(params, x) -> outputs``: the model called functionally with the weights ``params`` (what
:meth:`Family.forward` wraps; not the path method :class:`hypergradients.Forward`)."""

_SEED_RANGE = 2**62


@dataclass
class Batch:
    """A training or validation minibatch: inputs, targets and the examples' dataset indices."""

    x: Tensor
    y: Tensor
    index: Tensor


class Sampler:
    """The random numbers of ONE evaluation of ``L_T``: generators seeded with the noise's seed.

    A generator is made per device on first use, so the draws depend only on the seed, the order
    of the calls and their shapes: an evaluation that makes the same calls gets the same numbers.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._gens: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """This evaluation's generator on ``device`` (seeded with :attr:`seed` when first asked)."""
        key = str(torch.device(device))
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=key).manual_seed(self.seed)
        return self._gens[key]

    def uniform(
        self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str, eps: float = 0.0
    ) -> Tensor:
        """Uniform draws on ``[eps, 1 − eps]`` (``eps > 0`` keeps ``log u`` and ``log(1 − u)`` finite)."""
        u = torch.rand(tuple(shape), generator=self.generator(device), dtype=dtype, device=device)
        return u.clamp(eps, 1 - eps) if eps > 0 else u

    def normal(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """Standard normal draws."""
        return torch.randn(tuple(shape), generator=self.generator(device), dtype=dtype, device=device)


@dataclass(frozen=True)
class Noise:
    """One fixed noise sample: a seed. :meth:`sampler` starts an evaluation's draws from it."""

    seed: int

    @classmethod
    def draw(cls, generator: torch.Generator | None = None) -> Noise:
        """A fresh seed, uniform in ``[0, 2⁶²)``, from the CPU ``generator`` (default: torch's global one)."""
        return cls(int(torch.randint(0, _SEED_RANGE, (1,), generator=generator).item()))

    def sampler(self) -> Sampler:
        return Sampler(self.seed)


@dataclass(frozen=True)
class Hook:
    """A forward hook on the submodule ``module`` (dotted name, ``""`` = the model itself).

    ``kind="pre"``: ``fn(submodule, args) -> new args tuple or None`` (PyTorch's forward pre-hook);
    ``kind="post"``: ``fn(submodule, args, output) -> new output or None`` (forward hook).
    """

    module: str
    fn: Callable[..., Any]
    kind: Literal["pre", "post"] = "post"


@dataclass(frozen=True)
class Description:
    """What a family tunes: ``count`` scalars, their ``parametrisation``, and ``groups`` (name → count)."""

    name: str
    kind: str
    count: int
    parametrisation: str
    groups: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v:,}" for k, v in self.groups.items())
        return f"{self.name} ({self.kind}): {self.count:,} hyperparameters; {self.parametrisation}" + (
            f" [{parts}]" if parts else ""
        )


NaturalValue = Tensor | float | int
"""A natural value: a tensor shaped like the hyperparameter's, or a number (every entry of it)."""


def natural_leaves(
    own: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor] | None,
    fn: Callable[[Tensor], Tensor] | None = None,
) -> Tree:
    """A family's leaves keyed like ``own`` (its stored tensors), read from ``hparams`` (default:
    ``own``), detached and mapped by ``fn`` (default: unchanged): the body of :meth:`Family.natural`
    for the families whose leaves map one by one."""
    src = own if hparams is None else hparams
    return {k: src[k].detach() if fn is None else fn(src[k].detach()) for k in own}


def unnatural_leaves(
    family: Family,
    values: Mapping[str, Tensor],
    inverse: Callable[[Tensor], Tensor],
    *,
    valid: Callable[[Tensor], Tensor] | None = None,
    domain: str = "",
) -> Tree:
    """The body of :meth:`Family.from_natural` for the families whose leaves map one by one:
    ``inverse(v)`` for each ``values[k]`` (checked finite, shaped like ``family.tensors()[k]``, inside
    the domain where ``valid(v)`` holds, ``domain`` saying it in words), computed in float64 and
    returned in the tensor's own dtype and device."""
    own = family.tensors()
    out: dict[str, Tensor] = {}
    for k, v in values.items():
        if k not in own:
            raise KeyError(
                f"{type(family).__name__} {family.name!r} has no hyperparameter {k!r}; its keys "
                f"are {sorted(own)[:8]}{' ...' if len(own) > 8 else ''}"
            )
        t = own[k]
        x = torch.as_tensor(v).detach().to(device=t.device, dtype=torch.float64)
        if x.shape != t.shape:
            raise ValueError(
                f"{k!r}: a value of shape {tuple(x.shape)} for a hyperparameter of shape "
                f"{tuple(t.shape)}: give that shape, or one number for all of it"
            )
        bad = ~torch.isfinite(x) if valid is None else ~(torch.isfinite(x) & valid(x))
        if bool(bad.any()):
            i = tuple(int(j) for j in bad.nonzero()[0].tolist())
            at = f" at index {i}" if i else ""
            need = f"{domain} and finite" if domain else "finite"
            raise ValueError(
                f"{type(family).__name__} {family.name!r}: the value of {k!r}{at} is "
                f"{float(x[i] if i else x):g}, but must be {need} ({family.parametrisation})"
            )
        out[k] = inverse(x).to(t.dtype)
    return out


class Family:
    """Base class of hyperparameter families: override :meth:`tensors`, :meth:`natural` and the hooks used.

    Hyperparameter keys are global across families, so each family prefixes its keys with its
    ``name`` (``"weight_decay"``, ``"weight_decay.fc1.weight"``, ...). The module docstring says
    how the hooks compose and how noise is fixed within one hypergradient.
    """

    name: str = "family"
    #: ``True`` if the hooks draw random numbers (then they get the ``noise`` sampler).
    stochastic: bool = False
    #: how the stored unconstrained values map to the natural ones, in words.
    parametrisation: str = "unconstrained"

    def tensors(self) -> dict[str, Tensor]:
        """The unconstrained leaves (``requires_grad=True``) that the hyper-optimizer owns."""
        raise NotImplementedError

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Tree:
        """The user-facing (constrained) values, from ``hparams`` or the family's own tensors."""
        raise NotImplementedError

    def from_natural(self, values: Mapping[str, Tensor]) -> Tree:
        """The unconstrained values whose :meth:`natural` values are ``values``: the inverse of
        :meth:`natural`, for some or all of this family's keys, each value shaped like its tensor;
        returned in the tensors' dtype and device, nothing assigned. A value outside the natural
        domain (a decay ≤ 0, a probability outside (0, 1)) raises ``ValueError`` naming the key.
        The default refuses: a new family overrides it to be settable in natural units."""
        raise NotImplementedError(
            f"{type(self).__name__} {self.name!r} does not map natural values back to "
            "its tensors: override from_natural, or set its tensors in place"
        )

    def penalty(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Tensor | None:
        """A term added to the training loss, or ``None``."""
        return None

    def batch(self, batch: Batch, hparams: Mapping[str, Tensor]) -> Batch:
        """The training batch the model sees (default: unchanged)."""
        return batch

    def model_weights(
        self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], noise: Sampler
    ) -> Mapping[str, Tensor]:
        """The weights the model is called with on training batches (default: ``params``)."""
        return params

    def hooks(self, hparams: Mapping[str, Tensor], noise: Sampler) -> Sequence[Hook]:
        """Forward hooks on named submodules for one training forward (default: none)."""
        return ()

    def forward(self, forward: ModelForward, hparams: Mapping[str, Tensor]) -> ModelForward:
        """The forward used on training batches (default: unchanged)."""
        return forward

    def reduce(self, losses: Tensor, batch: Batch, hparams: Mapping[str, Tensor]) -> Tensor | None:
        """One training loss from per-example ``losses``, or ``None`` for the plain mean."""
        return None

    @property
    def reduces(self) -> bool:
        """Whether this family overrides :meth:`reduce` (at most one family of a setup may)."""
        return type(self).reduce is not Family.reduce

    def count(self) -> int:
        """The number of scalar hyperparameters."""
        return sum(t.numel() for t in self.tensors().values())

    def describe(self) -> Description:
        """The count, the parametrisation and the count per tensor (override for better groups)."""
        groups = {k: t.numel() for k, t in self.tensors().items()}
        return Description(self.name, type(self).__name__, self.count(), self.parametrisation, groups)

    def summary(self) -> dict[str, float]:
        """A few numbers that describe the natural values (logged with the metrics every hyper step)."""
        vals = [v.detach().reshape(-1).double() for v in self.natural().values()]
        flat = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
        if flat.numel() == 0:
            return {}
        if flat.numel() == 1:
            return {f"{self.name}": float(flat[0])}
        return {
            f"{self.name}.mean": float(flat.mean()),
            f"{self.name}.min": float(flat.min()),
            f"{self.name}.max": float(flat.max()),
        }

    def load_tensors(self, values: Mapping[str, Tensor]) -> None:
        """Copy saved unconstrained values into :meth:`tensors` in place (used on resume)."""
        own = self.tensors()
        missing = sorted(set(own) - set(values))
        if missing:
            raise KeyError(f"{type(self).__name__} {self.name!r}: saved state lacks {missing}")
        with torch.no_grad():
            for k, t in own.items():
                if values[k].shape != t.shape:
                    raise ValueError(f"{k}: saved shape {tuple(values[k].shape)} != {tuple(t.shape)}")
                t.copy_(values[k])


def unconstrained(
    families: Sequence[Family], values: Mapping[str, NaturalValue], *, strict: bool = True
) -> dict[str, Tensor]:
    """The unconstrained tensors that give ``families`` the natural ``values`` (nothing assigned).

    ``values`` is keyed by hyperparameter key (``"weight_decay.0.weight"``) or by family name
    (``"weight_decay"``, ``"dropout"``); a value is a tensor shaped like the hyperparameter, or a
    number for every entry of it, and one under a family's name goes to each of that family's
    hyperparameters (a global value from a black-box search refined per unit later). A key names
    the hyperparameter itself where it is both (a global decay's key is its family's name); a value
    under a key beats its family's. Natural units are each family's (:meth:`Family.natural`:
    decays for :class:`~hypergradients.WeightDecay`, *keep* probabilities for
    :class:`~hypergradients.Dropout`). Returns the hyperparameters named, by key. ``strict``: a key
    that is neither raises ``KeyError`` naming the keys and families there are (``False``: ignored).
    """
    by_key: dict[str, Family] = {}
    by_name: dict[str, Family] = {}
    for fam in families:
        by_name.setdefault(fam.name, fam)
        for k in fam.tensors():
            by_key[k] = fam
    chosen: dict[str, NaturalValue] = {}
    for name, v in values.items():  # family names first, so that a value under a key beats them
        if name not in by_key and name in by_name:
            chosen.update({k: v for k in by_name[name].tensors()})
    unknown = []
    for k, v in values.items():
        if k in by_key:
            chosen[k] = v
        elif k not in by_name:
            unknown.append(k)
    if unknown and strict:
        keys = sorted(by_key)
        raise KeyError(
            f"no hyperparameter or family is called {unknown[0]!r}: the families are "
            f"{sorted(by_name)}, the keys {keys[:8]}{' ...' if len(keys) > 8 else ''} (pass "
            "strict=False to ignore the other entries)"
        )
    out: dict[str, Tensor] = {}
    for fam in families:
        own = fam.tensors()
        mine: dict[str, Tensor] = {}
        for k in own:
            if k in chosen:
                v = chosen[k]
                if isinstance(v, Tensor):
                    t = v
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    t = torch.tensor(float(v), dtype=torch.float64)
                else:
                    raise TypeError(
                        f"the value for {k!r} must be a number or a tensor, got {type(v).__name__}"
                    )
                mine[k] = t.expand(own[k].shape) if t.ndim == 0 else t
        if mine:
            out.update(fam.from_natural(mine))
    return out


def check_composable(families: Sequence[Family]) -> None:
    """Refuse a setup whose families cannot compose: two that reduce."""
    reducing = [f.name for f in families if f.reduces]
    if len(reducing) > 1:
        raise ValueError(
            f"the families {reducing} all weight the examples (override reduce); at most one "
            "may: keep one, or write one family whose weights are the product of both"
        )


def describe(families: Sequence[Family]) -> str:
    """One line per family (count, parametrisation, groups) and the total: print it before training."""
    lines = [str(f.describe()) for f in families]
    total = sum(f.count() for f in families)
    lines.append(
        f"total: {total:,} hyperparameters in {len(families)} famil{'y' if len(families) == 1 else 'ies'}"
    )
    return "\n".join(lines)
