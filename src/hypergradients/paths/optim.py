"""Differentiable inner optimizers: ``(init, update)`` pairs whose hyperparameters may be tensors.

An optimizer here is a pair of pure functions (as in optax), bundled in :class:`Optimizer`:

* ``state = opt.init(params)`` — the state for weights ``params`` (a NamedTuple: a step count and
  trees of tensors with the keys and shapes of ``params``, e.g. Adam's first and second moments);
* ``params, state = opt.update(grads, state, params, hparams)`` — one step; it returns the NEW
  weights and the new state and modifies nothing it is given.

Every optimizer hyperparameter (learning rate, momentum, betas, eps, weight decay) is either a
number or the NAME of a key of ``hparams``. A named one is read from ``hparams`` at each step, so the
step is differentiable with respect to it. The rule for its shape, the same as for
``hg.Unrolled(lr="key")``: a tensor with one element (shape ``()``, ``(1,)``, ...) is a scalar, used
at every step; a 1-D tensor of ``K ≥ 2`` entries is a per-step schedule whose entry ``k`` is used at
step ``k`` (``lr="lr_schedule"``; ``k`` counts from 0 at :meth:`Optimizer.init`), so a path of K
steps needs ``K`` entries (:func:`check_schedules` says so before the first step).
``opt.hparam_keys`` lists the names an optimizer reads.

The updates are those of ``torch.optim`` (``SGD`` with ``momentum``, ``nesterov``, ``weight_decay``
and ``dampening=0``; ``Adam``; ``AdamW``), written without in-place operations so autograd and
``torch.func`` can differentiate them; on the same gradients the trajectories agree with
``torch.optim``'s to float64 rounding.

K steps of optimizer ``O`` from ``w0`` on batches ``b_0 … b_{K−1}``, differentiated w.r.t. ``hparams``
(leaves with ``requires_grad=True``)::

    opt = hg.optim.adam(lr="lr")                 # hparams["lr"]: a scalar tensor
    w, state = dict(w0), opt.init(w0)
    for b in batches:
        loss = inner_loss(w, hparams, b)
        g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w, state = opt.update(dict(zip(w, g)), state, w, hparams)
    outer_loss(w, hparams).backward()            # d L_V(w_K) / d hparams, through all K steps

(``w0`` leaves need ``requires_grad=True`` for the first ``autograd.grad``.) :class:`hypergradients.Unrolled`
and :class:`hypergradients.Forward` do exactly this with ``optimizer=`` and ``batches=``, in reverse
mode (optionally truncated or checkpointed) or forward mode.

Adam divides by ``√v̂ + eps``; the derivative of ``√v`` is infinite at ``v = 0``, which plain
autograd turns into NaN for a weight whose gradient has been exactly zero so far (the weights
reading an input pixel that is 0 in every image, as MNIST's border; an embedding row no batch
touched). Here ``√v`` has derivative 0 there, the true derivative along
such a path (``v`` and its tangent are both 0), so the hypergradient stays finite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.errors import HypergradientError
from ..core.tree import Tree

Hyper = float | str
"""A number, or the name of a key of ``hparams`` (a one-element tensor, or a per-step ``(K,)`` schedule)."""


class Optimizer(NamedTuple):
    """A differentiable optimizer: ``init(params) -> state``, ``update(grads, state, params, hparams)
    -> (params, state)``; ``hparam_keys`` are the keys of ``hparams`` it reads; ``name`` is for messages."""

    init: Callable[[Mapping[str, Tensor]], Any]
    update: Callable[
        [Mapping[str, Tensor], Any, Mapping[str, Tensor], Mapping[str, Tensor]], tuple[Tree, Any]
    ]
    hparam_keys: tuple[str, ...]
    name: str


class SgdState(NamedTuple):
    """``steps``: steps taken so far; ``momentum``: the buffer ``b`` (empty without momentum)."""

    steps: int
    momentum: Tree


class AdamState(NamedTuple):
    """``steps``: steps taken so far; ``mu``: first moment ``m``; ``nu``: second moment ``v``."""

    steps: int
    mu: Tree
    nu: Tree


def value(h: Hyper, hparams: Mapping[str, Tensor], count: int, *, what: str) -> float | Tensor:
    """The value of hyperparameter ``h`` at step ``count`` (0-based): a number, ``hparams[h]`` when it
    has one element (any shape, returned as a 0-d tensor), or ``hparams[h][count]`` when it is a
    ``(K,)`` schedule with ``K ≥ 2``."""
    if not isinstance(h, str):
        return float(h)
    if h not in hparams:
        raise HypergradientError(
            f"the optimizer's {what}={h!r} names a hyperparameter that is not in "
            f"hparams (keys: {sorted(hparams)}); pass a number or one of those keys"
        )
    t = hparams[h]
    if t.numel() == 1:
        return t.reshape(())
    if t.dim() != 1:
        raise HypergradientError(
            f"the optimizer's {what} hyperparameter {h!r} must be a scalar or a "
            "per-step schedule of shape (K,) (a tensor with one element is a scalar), "
            f"got shape {tuple(t.shape)}"
        )
    if count >= t.shape[0]:
        raise HypergradientError(
            f"the {what} schedule {h!r} has {t.shape[0]} entries, one per step, and has run out at step "
            f"{count} (0-based, counted from the optimizer's init): K steps need a (K,) schedule, here at "
            f"least ({count + 1},); or give a one-element tensor for a constant {what}"
        )
    return t[count]


def check_schedules(opt: Optimizer, hparams: Mapping[str, Tensor], steps: int, *, who: str) -> None:
    """Refuse, before the first step, a per-step schedule of ``opt`` shorter than the ``steps`` (K)
    steps a path takes from the optimizer's init; the error names K and the length given."""
    for k in opt.hparam_keys:
        t = hparams.get(k)
        if t is not None and t.numel() > 1 and t.dim() == 1 and t.shape[0] < steps:
            raise HypergradientError(
                f"{who}: hparams[{k!r}] is a per-step schedule of hg.optim.{opt.name} with {t.shape[0]} "
                f"entries, but the path takes K = {steps} steps: give one entry per step, shape ({steps},), "
                "or a one-element tensor for a constant value"
            )


def _keys(*hs: Hyper) -> tuple[str, ...]:
    return tuple(dict.fromkeys(h for h in hs if isinstance(h, str)))


def _check(name: str, **hs: Hyper) -> None:
    for what, h in hs.items():
        if isinstance(h, bool) or not isinstance(h, (int, float, str)):
            raise HypergradientError(f"{name}: {what} must be a number or a key of hparams, got {h!r}")


def _axpy(w: Tensor, g: Tensor, a: float | Tensor) -> Tensor:
    """``w + a·g``: ``torch.add(alpha=)`` for a number (torch.optim's rounding), a product for a tensor."""
    if isinstance(a, Tensor):
        return w + a * g
    return torch.add(w, g, alpha=a)


def _sqrt(v: Tensor) -> Tensor:
    """``√v`` for ``v ≥ 0`` with derivative 0 (not ``∞·0 = NaN``) where ``v = 0``.

    A weight whose gradient has been exactly zero so far has ``v = 0`` and ``dv = 0``; the true
    derivative of ``√v`` along such a path is 0, but autograd's ``0.5/√v · dv`` gives NaN. The
    double ``where`` evaluates the square root at 1 there (finite derivative, masked out) and
    returns 0; elsewhere the value is ``v.sqrt()`` exactly (multiplied by 1.0)."""
    pos = v > 0
    return torch.where(pos, v, torch.ones_like(v)).sqrt() * pos


def _scale(x: Tensor, a: float | Tensor) -> Tensor:
    return x * a


def sgd(lr: Hyper, momentum: Hyper = 0.0, *, nesterov: bool = False, weight_decay: Hyper = 0.0) -> Optimizer:
    """Stochastic gradient descent, ``torch.optim.SGD(dampening=0)``'s update:

        g ← g + wd·w;   b ← μ·b + g  (b₀ = 0);   d = g + μ·b if nesterov else b;   w ← w − lr·d

    (without momentum, ``d = g``). ``momentum`` is the heavy-ball coefficient μ; ``nesterov=True``
    is Nesterov's (Sutskever et al. 2013, as in PyTorch). Every hyperparameter may name a key of
    ``hparams``: a one-element tensor (shape ``()`` or ``(1,)``) is a scalar used at every step, a
    ``(K,)`` tensor with ``K ≥ 2`` a per-step schedule (the rule of ``hg.Unrolled(lr="key")`` too).
    """
    _check("sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)
    use_momentum = isinstance(momentum, str) or momentum != 0.0
    use_wd = isinstance(weight_decay, str) or weight_decay != 0.0
    if nesterov and not use_momentum:
        raise HypergradientError("sgd(nesterov=True) needs a momentum: pass momentum=0.9 or a key of hparams")

    def init(params: Mapping[str, Tensor]) -> SgdState:
        buf = {k: torch.zeros_like(v) for k, v in params.items()} if use_momentum else {}
        return SgdState(0, buf)

    def update(
        grads: Mapping[str, Tensor],
        state: SgdState,
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor],
    ) -> tuple[Tree, SgdState]:
        n = state.steps
        a = value(lr, hparams, n, what="lr")
        g = dict(grads)
        if use_wd:
            wd = value(weight_decay, hparams, n, what="weight_decay")
            g = {k: _axpy(g[k], params[k], wd) for k in g}
        buf = state.momentum
        if use_momentum:
            mu = value(momentum, hparams, n, what="momentum")
            # b₀ = 0 makes μ·b₀ + g = g exactly: torch.optim's first step (b₁ = g) bit for bit.
            buf = {k: _scale(buf[k], mu) + g[k] for k in g}
            d = {k: _axpy(g[k], buf[k], mu) for k in g} if nesterov else buf
        else:
            d = g
        new = {k: _axpy(params[k], d[k], -a) for k in params}
        return new, SgdState(n + 1, buf)

    kind = "nesterov" if nesterov else ("momentum" if use_momentum else "sgd")
    return Optimizer(init, update, _keys(lr, momentum, weight_decay), kind)


def heavy_ball(lr: Hyper, momentum: Hyper = 0.9, *, weight_decay: Hyper = 0.0) -> Optimizer:
    """SGD with heavy-ball momentum: :func:`sgd` with ``momentum`` (``torch.optim.SGD(momentum=μ)``)."""
    return sgd(lr, momentum, weight_decay=weight_decay)


def nesterov(lr: Hyper, momentum: Hyper = 0.9, *, weight_decay: Hyper = 0.0) -> Optimizer:
    """SGD with Nesterov momentum: :func:`sgd` with ``nesterov=True`` (``torch.optim.SGD(nesterov=True)``)."""
    return sgd(lr, momentum, nesterov=True, weight_decay=weight_decay)


def _adam(
    name: str, lr: Hyper, b1: Hyper, b2: Hyper, eps: Hyper, weight_decay: Hyper, decoupled: bool
) -> Optimizer:
    _check(name, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    use_wd = isinstance(weight_decay, str) or weight_decay != 0.0

    def init(params: Mapping[str, Tensor]) -> AdamState:
        return AdamState(
            0,
            {k: torch.zeros_like(v) for k, v in params.items()},
            {k: torch.zeros_like(v) for k, v in params.items()},
        )

    def update(
        grads: Mapping[str, Tensor],
        state: AdamState,
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor],
    ) -> tuple[Tree, AdamState]:
        n = state.steps
        t = n + 1
        a = value(lr, hparams, n, what="lr")
        beta1 = value(b1, hparams, n, what="b1")
        beta2 = value(b2, hparams, n, what="b2")
        e = value(eps, hparams, n, what="eps")
        w = dict(params)
        g = dict(grads)
        if use_wd:
            wd = value(weight_decay, hparams, n, what="weight_decay")
            if decoupled:  # AdamW: w ← w·(1 − lr·wd) before the Adam step (Loshchilov & Hutter 2019)
                w = {k: w[k] * (1 - a * wd) for k in w}
            else:  # Adam's L2 penalty: added to the gradient
                g = {k: _axpy(g[k], w[k], wd) for k in g}
        mu = {k: state.mu[k] * beta1 + g[k] * (1 - beta1) for k in g}
        nu = {k: state.nu[k] * beta2 + g[k] * g[k] * (1 - beta2) for k in g}
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        # torch.optim.Adam's arithmetic order: w − (lr/bc1)·m / (√v/√bc2 + eps).
        step = a / bc1
        sq = bc2**0.5
        new = {k: w[k] - step * mu[k] / (_sqrt(nu[k]) / sq + e) for k in w}
        return new, AdamState(t, mu, nu)

    return Optimizer(init, update, _keys(lr, b1, b2, eps, weight_decay), name)


def adam(
    lr: Hyper = 1e-3, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8, *, weight_decay: Hyper = 0.0
) -> Optimizer:
    """Adam (Kingma & Ba 2015), ``torch.optim.Adam``'s update (L2 ``weight_decay`` added to the gradient):

        g ← g + wd·w;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
        w ← w − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + eps),    t = 1, 2, …

    Every hyperparameter may name a key of ``hparams`` (scalar or ``(K,)`` schedule); the betas'
    bias corrections ``β^t`` are then differentiated too.
    """
    return _adam("adam", lr, b1, b2, eps, weight_decay, decoupled=False)


def adamw(
    lr: Hyper = 1e-3, b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8, *, weight_decay: Hyper = 1e-2
) -> Optimizer:
    """AdamW (Loshchilov & Hutter 2019), ``torch.optim.AdamW``'s update: decoupled weight decay
    ``w ← w·(1 − lr·wd)`` first, then the :func:`adam` step on the undecayed gradient."""
    return _adam("adamw", lr, b1, b2, eps, weight_decay, decoupled=True)


def gd(lr: Hyper) -> Optimizer:
    """Plain gradient descent ``w ← w − lr·g``: :func:`sgd` without momentum or weight decay.

    ``hg.Unrolled(steps=K, optimizer=hg.optim.gd(lr="lr_schedule"))`` is the path of
    ``hg.Unrolled(steps=K, lr=...)`` with a per-step learning-rate schedule (a ``(K,)`` tensor in
    ``hparams``), which ``Unrolled(lr=)`` itself does not take; with a one-element ``lr`` the two
    are the same path.
    """
    return sgd(lr)


__all__ = [
    "AdamState",
    "Hyper",
    "Optimizer",
    "SgdState",
    "adam",
    "adamw",
    "check_schedules",
    "gd",
    "heavy_ball",
    "nesterov",
    "sgd",
    "value",
]
