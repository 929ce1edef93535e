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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from . import tree
from .derivatives import LossFn, grad, scalar_loss
from .errors import HypergradientError
from .tree import Tree


def step_size(lr: float | str, hparams: Mapping[str, Tensor]) -> Tensor | float:
    """The step size ``α``: a number, or the hyperparameter ``hparams[lr]`` (a scalar tensor)."""
    if isinstance(lr, str):
        if lr not in hparams:
            raise HypergradientError(
                f"Unrolled(lr={lr!r}) names a hyperparameter that is not in hparams "
                f"(keys: {sorted(hparams)}); pass a number or one of those keys")
        a = hparams[lr]
        if a.numel() != 1:
            raise HypergradientError(f"the step-size hyperparameter {lr!r} must be a scalar, "
                                     f"got shape {tuple(a.shape)}")
        return a.reshape(())
    return float(lr)


def _sgd_step(inner_loss: LossFn, w: Tree, lam: Tree, alpha: Tensor | float, *, create_graph: bool,
              step: int) -> Tree:
    if not create_graph:
        w = tree.clone_leaves(w, requires_grad=True)
    try:
        loss = scalar_loss(inner_loss, w, lam, name="inner_loss")
    except HypergradientError as e:
        raise HypergradientError(f"unrolled step {step}: {e}") from e
    g = grad(loss, w, create_graph=create_graph)
    with torch.set_grad_enabled(create_graph):
        if isinstance(alpha, Tensor):  # a step-size hyperparameter
            return {k: w[k] - alpha * g[k] for k in w}
        return {k: torch.add(w[k], g[k], alpha=-alpha) for k in w}  # one autograd node, not two


def _free_steps(inner_loss: LossFn, w: Tree, lam: Tree, alpha: Tensor | float, start: int, stop: int) -> Tree:
    """Steps ``start..stop-1`` without a graph to ``λ`` (constants in the derivative)."""
    lam_const = tree.detach(lam)
    alpha_const = alpha.detach() if isinstance(alpha, Tensor) else alpha
    for k in range(start, stop):
        w = _sgd_step(inner_loss, w, lam_const, alpha_const, create_graph=False, step=k)
    return w


def _outer(outer_loss: LossFn, w: Tree, lam: Mapping[str, Tensor], steps: int) -> Tensor:
    try:
        return scalar_loss(outer_loss, w, lam, name="outer_loss")
    except HypergradientError as e:
        raise HypergradientError(f"after {steps} unrolled steps: {e}") from e


def unroll(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
           steps: int, lr: float | str, truncate: int | None = None) -> tuple[Tensor, Tree]:
    """Run the K steps and return ``(L_V(w_K, λ), w_K)`` with the graph to ``λ`` kept.

    ``lam`` must be leaves that require grad; ``params`` are copied, never modified.
    """
    alpha = step_size(lr, lam)
    n_diff = steps if truncate is None else truncate
    w = _free_steps(inner_loss, tree.clone_leaves(params, requires_grad=False), lam, alpha, 0, steps - n_diff)
    # The start of the differentiated segment is a constant w.r.t. λ, as in the definition.
    w = tree.clone_leaves(w, requires_grad=True)
    for k in range(steps - n_diff, steps):
        w = _sgd_step(inner_loss, w, lam, alpha, create_graph=True, step=k)
    return _outer(outer_loss, w, lam, steps), w


def checkpoint_interval(steps: int, checkpoint: bool | int | None) -> int | None:
    """Segment length for :func:`reverse`: ``None`` (no checkpointing), ``⌈√steps⌉`` for ``True``."""
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint is True:
        return max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1
    return int(checkpoint)


def reverse(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor], lam: Tree, *,
            steps: int, lr: float | str, truncate: int | None = None,
            checkpoint: bool | int | None = None) -> tuple[Tree, set[str], Tensor, Tree]:
    """Reverse-mode ``dL_V(w_K, λ)/dλ``; returns ``(gradient, used keys, L_V, w_K)``.

    ``checkpoint=None``: the whole differentiated path is one graph. ``checkpoint=s`` (or
    ``True`` for ``s = ⌈√T⌉``, T the differentiated steps): a graph-free sweep stores
    ``w`` every ``s`` steps (``⌈T/s⌉`` iterates), then for each segment from the last one back,
    the ``≤ s`` steps are recomputed from their stored start with a graph, and
    ``a_start = (∂w_end/∂w_start)ᵀ a_end`` and ``(∂w_end/∂λ)ᵀ a_end`` come from one backward pass.
    Peak memory: ``⌈T/s⌉`` iterates plus one segment's graph, ``O(√T)`` for ``s = ⌈√T⌉``.
    """
    n_diff = steps if truncate is None else truncate
    s = checkpoint_interval(n_diff, checkpoint)
    keys = list(lam)
    if s is None:
        out, w = unroll(outer_loss, inner_loss, params, lam, steps=steps, lr=lr, truncate=truncate)
        raw = torch.autograd.grad(out, [lam[k] for k in keys], allow_unused=True)
        used = {k for k, g in zip(keys, raw, strict=True) if g is not None}
        return tree.as_tree(raw, lam), used, out.detach(), tree.detach(w)

    alpha = step_size(lr, lam)
    first = steps - n_diff
    w = _free_steps(inner_loss, tree.clone_leaves(params, requires_grad=False), lam, alpha, 0, first)
    # Forward sweep without a graph, keeping the start of every segment.
    starts = list(range(first, steps, s))
    stored: list[Tree] = []
    for a in starts:
        stored.append(w)
        w = _free_steps(inner_loss, w, lam, alpha, a, min(a + s, steps))
    # Adjoint of the end point, and the direct term ∂L_V/∂λ.
    wK = tree.clone_leaves(w, requires_grad=True)
    out = _outer(outer_loss, wK, lam, steps)
    raw = torch.autograd.grad(out, list(wK.values()) + [lam[k] for k in keys], allow_unused=True)
    adj = tree.as_tree(raw[:len(wK)], wK)
    used = {k for k, g in zip(keys, raw[len(wK):], strict=True) if g is not None}
    acc = tree.as_tree(raw[len(wK):], lam)
    # Backward sweep: one segment's graph at a time.
    for a, w_a in zip(reversed(starts), reversed(stored), strict=True):
        w0 = tree.clone_leaves(w_a, requires_grad=True)
        wk = w0
        for step in range(a, min(a + s, steps)):
            wk = _sgd_step(inner_loss, wk, lam, alpha, create_graph=True, step=step)
        outs = [wk[k] for k in wk if wk[k].requires_grad]
        if not outs:  # the path does not depend on w or λ at all
            adj = tree.zeros_like(adj)
            continue
        gouts = [adj[k] for k in wk if wk[k].requires_grad]
        back = torch.autograd.grad(outs, list(w0.values()) + [lam[k] for k in keys], grad_outputs=gouts,
                                   allow_unused=True)
        adj = tree.as_tree(back[:len(w0)], w0)
        for k, g in zip(keys, back[len(w0):], strict=True):
            if g is not None:
                acc[k] = acc[k] + g
                used.add(k)
        del wk, outs, back
    return acc, used, out.detach(), w


def forward(outer_loss: LossFn, inner_loss: LossFn, params: Mapping[str, Tensor],
            lam: Mapping[str, Tensor], *, steps: int, lr: float | str, truncate: int | None = None,
            chunk: int | None = 64) -> tuple[Tree, float, Tree, int]:
    """Forward-mode ``dL_V(w_K, λ)/dλ``; returns ``(gradient, L_V, w_K, jvps)``.

    For each unit direction ``e_i`` of the flattened hyperparameters the tangent
    ``ẇ_{k+1} = ẇ_k − α(H_k ẇ_k + ∂²L_T/∂w∂λ e_i) − (∂α/∂λ·e_i) ∂L_T/∂w`` is carried along the
    path by ``torch.func.jvp`` of the step map ``Φ(w, λ) = w − α ∂L_T/∂w`` (``∂L_T/∂w`` by
    ``torch.func.grad``: forward-over-reverse), starting from ``ẇ_{K−T} = 0``; then
    ``dL_V/dλ · e_i = jvp(L_V, (w_K, λ), (ẇ_K, e_i))``. Up to ``chunk`` directions share one
    ``vmap``-ed pass (``chunk=None``: all of them); memory is ``O(chunk · |w|)``, independent of K.
    """
    n_diff = steps if truncate is None else truncate
    lam0 = tree.detach(lam)
    alpha0 = step_size(lr, lam0)
    w = _free_steps(inner_loss, tree.clone_leaves(params, requires_grad=False), lam0, alpha0, 0,
                    steps - n_diff)
    w = tree.detach(w)
    lr_key = lr if isinstance(lr, str) else None

    def phi(ww: Tree, ll: Tree) -> Tree:
        a = ll[lr_key].reshape(()) if lr_key is not None else alpha0

        def loss_w(x: Tree) -> Tensor:
            return inner_loss(x, ll).reshape(())

        g = torch.func.grad(loss_w)(ww)
        return {k: ww[k] - a * g[k] for k in ww}

    def run_path(dl: Tree) -> Tensor:
        """``dL_V/dλ · dl``: the tangent pushed along the whole path."""
        ww, dw = w, tree.zeros_like(w)
        for _ in range(n_diff):
            ww, dw = torch.func.jvp(phi, (ww, lam0), (dw, dl))[:2]
        dout: Tensor = torch.func.jvp(lambda x, ll: outer_loss(x, ll).reshape(()), (ww, lam0), (dw, dl))[1]
        return dout

    # Non-finite values are checked once on the primal path (cheaper than inside the transforms).
    w_check = _free_steps(inner_loss, w, lam0, alpha0, steps - n_diff, steps)
    out = _outer(outer_loss, w_check, lam0, steps)

    flat = tree.flatten(lam0)
    n = flat.numel()
    size = n if chunk is None else max(1, min(chunk, n))
    dirs_all = torch.eye(n, dtype=flat.dtype, device=flat.device)
    vals: list[Tensor] = []
    for start in range(0, n, size):
        rows = dirs_all[start:start + size]
        batch = tree.unflatten_rows(rows, lam0)
        try:
            dout = torch.func.vmap(run_path)(batch)
        except RuntimeError:
            # An operator without a batching rule: one direction at a time.
            dout = torch.stack([run_path({k: batch[k][i] for k in batch}) for i in range(rows.shape[0])])
        vals.append(dout.reshape(-1))
    g = tree.unflatten(torch.cat(vals), lam0)
    return g, float(out), w_check, n * n_diff
