"""Hypergradients through the optimization path: differentiate K steps of gradient descent.

From the given weights ``w_0`` (held constant w.r.t. ``λ``), K steps

    w_{k+1} = Φ(w_k, λ) = w_k − α ∂L_T/∂w (w_k, λ)

are taken and ``L_V(w_K, λ)`` is differentiated w.r.t. ``λ``. The Jacobian obeys

    ∂w_{k+1}/∂λ = (I − αH_k) ∂w_k/∂λ − α ∂²L_T/∂w∂λ(w_k) [− ∂α/∂λ ∂L_T/∂w(w_k)],   ∂w_0/∂λ = 0.

Started at an optimum ``w*`` every ``w_k = w*`` and ``H_k = H``, so

    ∂w_K/∂λ = −α Σ_{j<K} (I − αH)^j ∂²L_T/∂w∂λ,

which makes ``dL_V/dλ`` equal to the K-term Neumann hypergradient (Lorraine et al. 2020, Thm. 2).

Three ways to evaluate the same derivative (they agree to float64 rounding):

* :func:`reverse` — reverse mode. Plain: the graph of all K steps is kept, memory ``O(K)``.
  ``checkpoint=s``: only every s-th iterate is stored during a graph-free forward sweep; the
  backward sweep recomputes one segment of ``s`` steps at a time with its graph and pulls the
  adjoint ``a_k = ∂L_V/∂w_k`` back through it (Griewank & Walther 2000, §12). With
  ``s = ⌈√K⌉`` that keeps ``O(√K)`` iterates alive for one extra forward pass of compute.
* :func:`forward` — forward mode. The tangent ``ẇ_k = ∂w_k/∂λ · λ̇`` is pushed through each step
  with ``torch.func.jvp`` (forward-over-reverse for the HVP inside), one tangent per
  hyperparameter scalar, batched with ``vmap``. Memory is independent of K; cost is
  proportional to the number of hyperparameters, so it is the natural choice for a few of them
  (learning rates, a global weight decay).

``truncate=T`` differentiates only the last T steps (Shaban et al. 2019): the first K−T run
without a graph and their end point is treated as constant. ``lr`` may name a key of
``hparams``: then the step size itself gets a hypergradient (implicit methods cannot give one,
as the optimum does not depend on the step size).

Any differentiable optimizer and minibatches. With a :class:`~hypergradients.optim.Optimizer`
``O`` (:mod:`hypergradients.optim`: SGD, heavy-ball and Nesterov momentum, Adam, AdamW) the step
carries the optimizer state ``s`` (momentum buffer, Adam's moments) along with the weights,

    (w_{k+1}, s_{k+1}) = Φ_k(w_k, s_k, λ) = O.update(∂L_T/∂w(w_k, λ; b_k), s_k, w_k, λ),   s_0 = O.init(w_0),

and the three evaluations above differentiate the pair ``z_k = (w_k, s_k)`` (the checkpointed
sweep stores and pulls back both; forward mode pushes tangents of both). With ``batches`` the
inner loss of step ``k`` is ``inner_loss(w, λ, b_k)``, ``b_k`` the k-th batch; without, the
2-argument ``inner_loss(w, λ)``. The outer loss is always ``outer_loss(w, λ)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..core import distributed, tree
from ..core.derivatives import (
    LossFn,
    _once_differentiable_node,
    forward_mode_error,
    grad,
    once_differentiable_culprits,
    once_differentiable_on_weights,
    scalar_loss,
)
from ..core.errors import HypergradientError
from ..core.tree import Tree
from .optim import Optimizer


def step_size(lr: float | str, hparams: Mapping[str, Tensor]) -> Tensor | float:
    """The step size ``α``: a number, or the hyperparameter ``hparams[lr]`` (a tensor with one element,
    shape ``()`` or ``(1,)``: a scalar, as in :mod:`hypergradients.optim`)."""
    if isinstance(lr, str):
        if lr not in hparams:
            raise HypergradientError(
                f"Unrolled(lr={lr!r}) names a hyperparameter that is not in hparams "
                f"(keys: {sorted(hparams)}); pass a number or one of those keys"
            )
        a = hparams[lr]
        if a.numel() != 1:
            raise HypergradientError(
                f"the step-size hyperparameter {lr!r} must have one element (a scalar), got shape "
                f"{tuple(a.shape)}; for a per-step schedule of shape (K,) use "
                f"optimizer=hg.optim.gd(lr={lr!r}) instead of lr={lr!r}"
            )
        return a.reshape(())
    return float(lr)


def take_batches(batches: Iterable[object], steps: int, *, who: str) -> list[object]:
    """The first ``steps`` batches of ``batches``: a sequence's first ones on every call, an iterator's
    next ones (so successive calls see successive batches), a fresh ``iter()`` of any other iterable."""
    taken = list(itertools.islice(iter(batches), steps))
    if len(taken) < steps:
        raise HypergradientError(
            f"{who}: steps={steps} needs {steps} batches, the batches gave only "
            f"{len(taken)}; pass more batches or fewer steps"
        )
    return taken


_NEEDS_SECOND_DERIVATIVE = (
    "Path methods (hg.Unrolled, hg.Forward, fit(path_hparams=)) differentiate every step's gradient, so "
    "every operation of inner_loss needs a second derivative. Write that operation with one (plain torch "
    "ops such as torch.tanh; a custom autograd.Function whose backward is itself differentiable; attention "
    "under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), or, for hyperparameters of the losses (not "
    'the optimizer\'s), use an implicit method with hvp_mode="finite-difference", which needs '
    "first-order gradients only"
)


def refuse_once_differentiable(
    loss: Tensor, grads: Sequence[Tensor], w: Mapping[str, Tensor], *, step: int
) -> None:
    """Raise if a step's gradient ``grads`` of ``loss`` at ``w`` was built through a ``@once_differentiable``
    backward.

    Such a backward leaves an autograd ``Error`` node that is not linked to the weights: the
    backward pass through the path skips it without raising, and the hypergradient silently
    loses that operation's second derivative (a wrong answer, not an error). The walk stops at
    the graph of ``w`` (the earlier steps, each checked when it was taken), so every step costs one
    walk over its own gradient's graph, whatever the number of steps and the optimizer.
    """
    bad = _once_differentiable_node(grads, {t.grad_fn for t in w.values() if t.grad_fn is not None})
    if bad is not None:
        raise HypergradientError(
            f"unrolled step {step}: the gradient of inner_loss was built through "
            f"{once_differentiable_culprits([loss, *grads], bad)}, whose second derivative autograd would "
            f"silently drop: the hypergradient would be wrong. {_NEEDS_SECOND_DERIVATIVE}."
        )
    fn = once_differentiable_on_weights([loss], list(w.values()))
    if fn is not None:
        raise HypergradientError(
            f"unrolled step {step}: inner_loss goes through the custom autograd.Function {fn}, whose "
            "backward is @once_differentiable: autograd would silently drop its second derivative and the "
            f"hypergradient would be wrong. {_NEEDS_SECOND_DERIVATIVE}."
        )


def _missing_derivative(err: RuntimeError) -> bool:
    """Whether a failed backward pass names a derivative that torch does not implement."""
    msg = str(err).lower()
    return "derivative" in msg and "not implemented" in msg


@dataclass(frozen=True)
class Path:
    """The step maps ``Φ_k``: ``optimizer`` (or plain gradient descent with ``lr``) on batch ``k``.

    ``batches`` (already taken, one per step index) make the inner loss ``inner_loss(w, λ, b_k)``.
    ``stats``: a dict :meth:`step` fills with ``grad_norm``, ``‖∂L_T/∂w‖`` at step 0 (``None``: not
    recorded).
    """

    inner_loss: Callable[..., Tensor]
    lr: float | str | None = None
    optimizer: Optimizer | None = None
    batches: Sequence[object] | None = None
    stats: dict[str, float] | None = None

    def loss_at(self, k: int) -> LossFn:
        if self.batches is None:
            return self.inner_loss
        b = self.batches[k]
        fn = self.inner_loss
        return lambda w, lam: fn(w, lam, b)

    def init(self, params: Mapping[str, Tensor]) -> Any:
        return None if self.optimizer is None else self.optimizer.init(params)

    def apply(
        self,
        g: Mapping[str, Tensor],
        s: Any,
        w: Mapping[str, Tensor],
        lam: Mapping[str, Tensor],
        *,
        fused: bool = True,
        alpha: Tensor | float | None = None,
    ) -> tuple[Tree, Any]:
        """The update from gradient ``g``: ``O.update``, or ``w − α g`` for plain gradient descent
        (``fused=False``: as a product and a difference, the form forward mode uses: it keeps no graph,
        so the one-node form would save it nothing)."""
        if self.optimizer is not None:
            return self.optimizer.update(g, s, w, lam)
        assert self.lr is not None
        if alpha is None:
            alpha = step_size(self.lr, lam)
        if isinstance(alpha, Tensor) or not fused:  # a step-size hyperparameter
            return {k: w[k] - alpha * g[k] for k in w}, s
        return {k: torch.add(w[k], g[k], alpha=-alpha) for k in w}, s  # one autograd node, not two

    def step_size(self, lam: Mapping[str, Tensor]) -> Tensor | float | None:
        """Plain gradient descent's ``α`` from ``lam``, to share one node among the steps of one graph
        (autograd then sums the steps' contributions to ``∂/∂α`` in one place)."""
        return step_size(self.lr, lam) if self.optimizer is None and self.lr is not None else None

    def step(
        self,
        w: Tree,
        s: Any,
        lam: Mapping[str, Tensor],
        k: int,
        *,
        create_graph: bool,
        alpha: Tensor | float | None = None,
    ) -> tuple[Tree, Any]:
        """``Φ_k``; without ``create_graph`` nothing of the result keeps a graph.

        With ``create_graph`` the gradient's graph is checked for once-differentiable nodes
        (:func:`refuse_once_differentiable`). ``stats["grad_norm"]``: ``‖∂L_T/∂w‖`` at step 0.
        """
        if not create_graph:
            w = tree.clone_leaves(w, requires_grad=True)
        try:
            loss = scalar_loss(self.loss_at(k), w, lam, name="inner_loss")
        except HypergradientError as e:
            raise HypergradientError(f"unrolled step {k}: {e}") from e
        g = grad(loss, w, create_graph=create_graph)
        if create_graph:
            refuse_once_differentiable(loss, [t for t in g.values() if t.requires_grad], w, step=k)
        # data-parallel: every rank steps along the group-mean gradient (a differentiable all-reduce)
        g = distributed.average_differentiable(g) if create_graph else distributed.average([g])[0]
        if k == 0 and self.stats is not None and "grad_norm" not in self.stats:
            self.stats["grad_norm"] = float(tree.norm(tree.detach(g)))
        with torch.set_grad_enabled(create_graph):
            return self.apply(g, s, w, lam, alpha=alpha)

    def free_steps(
        self, w: Tree, s: Any, lam: Mapping[str, Tensor], start: int, stop: int
    ) -> tuple[Tree, Any]:
        """Steps ``start..stop-1`` without a graph to ``λ`` (constants in the derivative)."""
        lam_const = tree.detach(lam)
        for k in range(start, stop):
            w, s = self.step(w, s, lam_const, k, create_graph=False)
        return w, s


def tensors_of(x: Any) -> list[Tensor]:
    """The tensor leaves of a pytree (weights, an optimizer state), in a fixed order."""
    return [leaf for leaf in pytree.tree_leaves(x) if isinstance(leaf, Tensor)]


def with_tensors(template: Any, tensors: Sequence[Tensor]) -> Any:
    """``template`` with its tensor leaves replaced, in :func:`tensors_of`'s order."""
    leaves, spec = pytree.tree_flatten(template)
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)


def _detach_state(s: Any) -> Any:
    return with_tensors(s, [t.detach() for t in tensors_of(s)])


def _start(
    path: Path, params: Mapping[str, Tensor], lam: Mapping[str, Tensor], first: int, opt_state: Any = None
) -> tuple[Tree, Any]:
    """``(w, s)`` after the first ``first`` steps, without a graph (``s_0 = opt_state`` when given)."""
    w = tree.clone_leaves(params, requires_grad=False)
    s0 = path.init(w) if opt_state is None else _detach_state(opt_state)
    return path.free_steps(w, s0, lam, 0, first)


def _outer(outer_loss: LossFn, w: Tree, lam: Mapping[str, Tensor], steps: int) -> Tensor:
    try:
        return scalar_loss(outer_loss, w, lam, name="outer_loss")
    except HypergradientError as e:
        raise HypergradientError(f"after {steps} unrolled steps: {e}") from e


def _path(
    inner_loss: Callable[..., Tensor],
    lr: float | str | None,
    optimizer: Optimizer | None,
    batches: Sequence[object] | None,
    stats: dict[str, float] | None = None,
) -> Path:
    return Path(inner_loss, lr=lr, optimizer=optimizer, batches=batches, stats=stats)


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` back through unrolled steps; a missing double backward names the fix."""
    try:
        return torch.autograd.grad(
            list(outputs),
            list(inputs),
            allow_unused=True,
            grad_outputs=None if grad_outputs is None else list(grad_outputs),
        )
    except RuntimeError as e:
        if not _missing_derivative(e):
            raise
        raise HypergradientError(
            f"differentiating through the unrolled steps failed: {str(e).rstrip('. ')}. "
            f"{_NEEDS_SECOND_DERIVATIVE}."
        ) from e


def unroll(
    outer_loss: LossFn,
    inner_loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    lam: Tree,
    *,
    steps: int,
    lr: float | str | None = None,
    truncate: int | None = None,
    optimizer: Optimizer | None = None,
    batches: Sequence[object] | None = None,
    opt_state: Any = None,
    stats: dict[str, float] | None = None,
) -> tuple[Tensor, Tree]:
    """Run the K steps and return ``(L_V(w_K, λ), w_K)`` with the graph to ``λ`` kept.

    ``lam`` must be leaves that require grad; ``params`` are copied, never modified. ``opt_state``:
    the optimizer state to start from (a constant; default ``optimizer.init(params)``).
    ``stats``: filled with ``grad_norm``, ``‖∂L_T/∂w‖`` at ``params``.
    """
    path = _path(inner_loss, lr, optimizer, batches, stats)
    n_diff = steps if truncate is None else truncate
    w, s = _start(path, params, lam, steps - n_diff, opt_state)
    # The start of the differentiated segment is a constant w.r.t. λ, as in the definition.
    w = tree.clone_leaves(w, requires_grad=True)
    alpha = path.step_size(lam)
    for k in range(steps - n_diff, steps):
        w, s = path.step(w, s, lam, k, create_graph=True, alpha=alpha)
    return _outer(outer_loss, w, lam, steps), w


def checkpoint_interval(steps: int, checkpoint: bool | int | None) -> int | None:
    """Segment length for :func:`reverse`: ``None`` (no checkpointing), ``⌈√steps⌉`` for ``True``."""
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint is True:
        return max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1
    return int(checkpoint)


def reverse(
    outer_loss: LossFn,
    inner_loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    lam: Tree,
    *,
    steps: int,
    lr: float | str | None = None,
    truncate: int | None = None,
    checkpoint: bool | int | None = None,
    optimizer: Optimizer | None = None,
    batches: Sequence[object] | None = None,
    opt_state: Any = None,
    stats: dict[str, float] | None = None,
) -> tuple[Tree, set[str], Tensor, Tree]:
    """Reverse-mode ``dL_V(w_K, λ)/dλ``; returns ``(gradient, used keys, L_V, w_K)``.

    ``checkpoint=None``: the whole differentiated path is one graph. ``checkpoint=s`` (or
    ``True`` for ``s = ⌈√T⌉``, T the differentiated steps): a graph-free sweep stores
    ``z = (w, optimizer state)`` every ``s`` steps (``⌈T/s⌉`` of them), then for each segment from
    the last one back, the ``≤ s`` steps are recomputed from their stored start with a graph, and
    ``a_start = (∂z_end/∂z_start)ᵀ a_end`` and ``(∂z_end/∂λ)ᵀ a_end`` come from one backward pass
    (the adjoint of the final optimizer state is zero: ``L_V`` reads only ``w_K``).
    Peak memory: ``⌈T/s⌉`` stored ``z`` plus one segment's graph, ``O(√T)`` for ``s = ⌈√T⌉``.

    Every differentiated step's gradient graph is checked for once-differentiable nodes, whose
    second derivative autograd would silently drop (:func:`refuse_once_differentiable`), and a
    backward pass that fails on a derivative torch does not implement (an operation without a
    double backward) raises :class:`~hypergradients.core.errors.HypergradientError` naming the
    alternatives. ``stats``: as in :func:`unroll`.
    """
    n_diff = steps if truncate is None else truncate
    s_len = checkpoint_interval(n_diff, checkpoint)
    keys = list(lam)
    if s_len is None:
        out, w = unroll(
            outer_loss,
            inner_loss,
            params,
            lam,
            steps=steps,
            lr=lr,
            truncate=truncate,
            optimizer=optimizer,
            batches=batches,
            opt_state=opt_state,
            stats=stats,
        )
        raw = _grad([out], [lam[k] for k in keys])
        used = {k for k, g in zip(keys, raw, strict=True) if g is not None}
        # data-parallel: the rank-local adjoints average to the single-process one (module docstring
        # of hypergradients.distributed), so the λ-gradient is their group mean
        return distributed.average([tree.as_tree(raw, lam)])[0], used, out.detach(), tree.detach(w)

    path = _path(inner_loss, lr, optimizer, batches, stats)
    first = steps - n_diff
    w, st = _start(path, params, lam, first, opt_state)
    # Forward sweep without a graph, keeping the start of every segment.
    starts = list(range(first, steps, s_len))
    stored: list[tuple[Tree, Any]] = []
    for a in starts:
        stored.append((w, st))
        w, st = path.free_steps(w, st, lam, a, min(a + s_len, steps))
    # Adjoint of the end point, and the direct term ∂L_V/∂λ.
    wK = tree.clone_leaves(w, requires_grad=True)
    out = _outer(outer_loss, wK, lam, steps)
    raw = torch.autograd.grad(out, list(wK.values()) + [lam[k] for k in keys], allow_unused=True)
    adj_w = tree.as_tree(raw[: len(wK)], wK)
    adj: list[Tensor] = list(adj_w.values()) + [torch.zeros_like(t) for t in tensors_of(st)]
    used = {k for k, g in zip(keys, raw[len(wK) :], strict=True) if g is not None}
    acc = tree.as_tree(raw[len(wK) :], lam)
    # Backward sweep: one segment's graph at a time.
    alpha = path.step_size(lam)
    for a, (w_a, s_a) in zip(reversed(starts), reversed(stored), strict=True):
        w0 = tree.clone_leaves(w_a, requires_grad=True)
        s0 = with_tensors(s_a, [t.detach().requires_grad_(True) for t in tensors_of(s_a)])
        wk, sk = w0, s0
        for step in range(a, min(a + s_len, steps)):
            wk, sk = path.step(wk, sk, lam, step, create_graph=True, alpha=alpha)
        ins = list(w0.values()) + tensors_of(s0)
        ends = list(wk.values()) + tensors_of(sk)
        pairs = [(e, g) for e, g in zip(ends, adj, strict=True) if e.requires_grad]
        if not pairs:  # the path does not depend on w or λ at all
            adj = [torch.zeros_like(t) for t in adj]
            continue
        back = _grad([e for e, _ in pairs], ins + [lam[k] for k in keys], [g for _, g in pairs])
        adj = [torch.zeros_like(x) if b is None else b for x, b in zip(ins, back[: len(ins)], strict=True)]
        for k, g in zip(keys, back[len(ins) :], strict=True):
            if g is not None:
                acc[k] = acc[k] + g
                used.add(k)
        del wk, sk, ends, pairs, back
    return distributed.average([acc])[0], used, out.detach(), w  # group mean, as above


def forward(
    outer_loss: LossFn,
    inner_loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    lam: Mapping[str, Tensor],
    *,
    steps: int,
    lr: float | str | None = None,
    truncate: int | None = None,
    chunk: int | None = 64,
    optimizer: Optimizer | None = None,
    batches: Sequence[object] | None = None,
    stats: dict[str, float] | None = None,
) -> tuple[Tree, float, Tree, int]:
    """Forward-mode ``dL_V(w_K, λ)/dλ``; returns ``(gradient, L_V, w_K, jvps)``.

    For each unit direction ``e_i`` of the flattened hyperparameters the tangent
    ``ż_k = ∂z_k/∂λ · e_i`` of ``z_k = (w_k, s_k)`` is carried along the path by
    ``torch.func.jvp`` of the step map ``Φ_k`` (for plain gradient descent
    ``ẇ_{k+1} = ẇ_k − α(H_k ẇ_k + ∂²L_T/∂w∂λ e_i) − (∂α/∂λ·e_i) ∂L_T/∂w``; ``∂L_T/∂w`` by
    ``torch.func.grad``: forward-over-reverse), starting from ``ż_{K−T} = 0``; then
    ``dL_V/dλ · e_i = jvp(L_V, (w_K, λ), (ẇ_K, e_i))``. Up to ``chunk`` directions share one
    ``vmap``-ed pass (``chunk=None``: all of them); memory is ``O(chunk · |z|)``, independent of K.
    A failure inside the transforms (an operation without a forward-mode derivative of its
    backward, PyTorch's "ZeroTensors are immutable") raises
    :class:`~hypergradients.core.errors.HypergradientError` naming the cause and hg.Unrolled.
    ``stats``: as in :func:`unroll`.
    """
    if distributed.current() is not None:
        raise HypergradientError(
            "forward-mode path hypergradients (hg.Forward) cannot run inside hg.distributed.data_parallel: "
            "their tangents go through torch.func transforms, where a collective cannot run. Use "
            "hg.Unrolled (reverse mode), which averages each step's gradient over the group"
        )
    path = _path(inner_loss, lr, optimizer, batches, stats)
    n_diff = steps if truncate is None else truncate
    first = steps - n_diff
    lam0 = tree.detach(lam)
    w, st = _start(path, params, lam0, first)
    w = tree.detach(w)

    # Non-finite values are checked once on the primal path (cheaper than inside the transforms);
    # the optimizer states met on the way are the templates of the tangent states (their step counts).
    # Only their non-tensor leaves are kept (a shared empty marker stands for each tensor), so the
    # memory stays independent of the number of steps.
    templates: list[Any] = []
    w_check, s_check = w, st
    marker = torch.empty(0)
    for k in range(first, steps):
        templates.append(with_tensors(s_check, [marker] * len(tensors_of(s_check))))
        w_check, s_check = path.step(w_check, s_check, lam0, k, create_graph=False)
    out = _outer(outer_loss, w_check, lam0, steps)
    s_tensors = tensors_of(st)

    def grad_at(k: int, ww: Tree, ll: Tree) -> Tree:
        fn = path.loss_at(k)

        def loss_w(x: Tree) -> Tensor:
            return fn(x, ll).reshape(())

        g: Tree = torch.func.grad(loss_w)(ww)
        return g

    def run_path(dl: Tree) -> Tensor:
        """``dL_V/dλ · dl``: the tangent pushed along the whole path."""
        ww, dw = w, tree.zeros_like(w)
        if not s_tensors:  # no optimizer state to carry (plain gradient descent, momentum-free SGD)
            for j in range(n_diff):
                k = first + j

                def phi(x: Tree, ll: Tree, k: int = k, j: int = j) -> Tree:
                    return path.apply(grad_at(k, x, ll), templates[j], x, ll, fused=False)[0]

                ww, dw = torch.func.jvp(phi, (ww, lam0), (dw, dl))[:2]
        else:
            ss, ds = list(s_tensors), [torch.zeros_like(t) for t in s_tensors]
            for j in range(n_diff):
                k = first + j

                def phi_s(
                    x: Tree, sx: list[Tensor], ll: Tree, k: int = k, j: int = j
                ) -> tuple[Tree, list[Tensor]]:
                    w2, s2 = path.apply(grad_at(k, x, ll), with_tensors(templates[j], sx), x, ll)
                    return w2, tensors_of(s2)

                (ww, ss), (dw, ds) = torch.func.jvp(phi_s, (ww, ss, lam0), (dw, ds, dl))[:2]
        dout: Tensor = torch.func.jvp(lambda x, ll: outer_loss(x, ll).reshape(()), (ww, lam0), (dw, dl))[1]
        return dout

    flat = tree.flatten(lam0)
    n = flat.numel()
    size = n if chunk is None else max(1, min(chunk, n))
    dirs_all = torch.eye(n, dtype=flat.dtype, device=flat.device)
    vals: list[Tensor] = []
    for start in range(0, n, size):
        rows = dirs_all[start : start + size]
        batch = tree.unflatten_rows(rows, lam0)
        try:
            dout = torch.func.vmap(run_path)(batch)
        except RuntimeError:
            # An operator without a batching rule: one direction at a time.
            try:
                dout = torch.stack([run_path({k: batch[k][i] for k in batch}) for i in range(rows.shape[0])])
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # NotImplementedError included
                raise forward_mode_error(
                    e,
                    what="hg.Forward's tangent pass through the unrolled steps",
                    fix="hg.Unrolled computes the same derivative in reverse mode (every operation then "
                    "needs a double backward instead)",
                ) from e
        vals.append(dout.reshape(-1))
    g = tree.unflatten(torch.cat(vals), lam0)
    return g, float(out), w_check, n * n_diff
