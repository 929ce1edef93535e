"""Every second-order autograd product of the library lives here.

At weights ``w`` and hyperparameters ``λ`` with inner loss ``L_T(w, λ)``:

* gradient ``g(w, λ) = ∂L_T/∂w``;
* Hessian-vector product ``H v = ∂/∂w ⟨g, v⟩``, ``H = ∂²L_T/∂w∂wᵀ``;
* mixed vector-Jacobian product ``(∂²L_T/∂λ∂wᵀ) p = ∂/∂λ ⟨g, p⟩``.

:class:`InnerDerivatives` builds the graph of ``g`` **once** (``create_graph=True``) and then
answers any number of HVPs and mixed VJPs by differentiating that graph again
(double-backward). That costs one backward pass over the graph per product: on a data-bound
model, two passes over the data, which is the memory-bandwidth floor. The alternative,
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), recomputes the gradient with
every product but keeps no graph alive; it is available as ``hvp_mode="forward"``
(see ``benchmarks/`` for the measurement that picked the default).
Nothing else in the package calls ``torch.autograd.grad`` with ``create_graph=True``, except
the path-based methods in :mod:`hypergradients.unroll`, which differentiate through training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from . import tree
from .errors import HypergradientError
from .tree import Tree

LossFn = Callable[[Tree, Tree], Tensor]
HvpMode = Literal["reverse", "forward"]


def scalar_loss(loss_fn: LossFn, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
                *, name: str) -> Tensor:
    """Call a loss and check that it returned a finite scalar tensor (errors name the loss)."""
    out = loss_fn(dict(params), dict(hparams))
    if not isinstance(out, Tensor):
        raise HypergradientError(
            f"{name}(params, hparams) must return a torch.Tensor, got {type(out).__name__}")
    if out.numel() != 1:
        raise HypergradientError(
            f"{name}(params, hparams) must return a scalar, got a tensor of shape {tuple(out.shape)}; "
            "reduce it (e.g. .mean()) inside the loss")
    out = out.reshape(())
    if not bool(torch.isfinite(out)):
        raise HypergradientError(f"{name}(params, hparams) returned a non-finite value ({out.item()})")
    return out


def grad(loss: Tensor, inputs: Mapping[str, Tensor], *, create_graph: bool = False,
         retain_graph: bool | None = None) -> Tree:
    """``∂loss/∂inputs`` as a tree; inputs the loss does not use get zeros."""
    vals = torch.autograd.grad(loss, list(inputs.values()), create_graph=create_graph,
                               retain_graph=retain_graph, allow_unused=True)
    return tree.as_tree(vals, inputs)


def used_keys(loss: Tensor, inputs: Mapping[str, Tensor]) -> set[str]:
    """Keys of ``inputs`` that ``loss`` depends on (through autograd), without consuming the graph."""
    if not loss.requires_grad:
        return set()
    vals = torch.autograd.grad(loss, list(inputs.values()), retain_graph=True, allow_unused=True)
    return {k for k, g in zip(inputs, vals, strict=True) if g is not None}


class InnerDerivatives:
    """Gradient, HVPs and mixed VJPs of ``L_T`` at fixed ``(w, λ)``, sharing one graph.

    ``params`` and ``hparams`` must be leaf tensors that require grad (the caller's private
    copies). ``hvp_count`` counts Hessian-vector products, batched ones column by column.
    """

    def __init__(self, inner_loss: LossFn, params: Tree, hparams: Tree, *,
                 hvp_mode: HvpMode = "reverse") -> None:
        if hvp_mode not in ("reverse", "forward"):
            raise HypergradientError(f"hvp_mode must be 'reverse' or 'forward', got {hvp_mode!r}")
        self.inner_loss = inner_loss
        self.params = params
        self.hparams = hparams
        self.hvp_mode: HvpMode = hvp_mode
        self.hvp_count = 0
        self.loss = scalar_loss(inner_loss, params, hparams, name="inner_loss")
        raw = torch.autograd.grad(self.loss, list(params.values()), create_graph=True, allow_unused=True)
        self.grad: Tree = tree.as_tree(raw, params)
        # Entries of ∂L_T/∂w that depend on nothing (a param L_T does not use, or a purely linear
        # term) have no graph: their rows of H and of the mixed partial are zero.
        self._live = [k for k, g in self.grad.items() if g.requires_grad]
        # Built once: every product reuses the same output/input lists (no per-call rebuilds).
        self._outs = [self.grad[k] for k in self._live]
        self._w_in = list(params.values())
        self._keys = list(params)

    # ------------------------------------------------------------------ products
    def hvp(self, v: Mapping[str, Tensor]) -> Tree:
        """``H v`` (one product)."""
        self.hvp_count += 1
        if self.hvp_mode == "forward":
            return self._hvp_forward(v)
        if not self._live:
            return tree.zeros_like(self.params)
        out = torch.autograd.grad(self._outs, self._w_in, grad_outputs=[v[k] for k in self._live],
                                  retain_graph=True, allow_unused=True)
        return {k: (torch.zeros_like(ref) if g is None else g)
                for k, ref, g in zip(self._keys, self._w_in, out, strict=True)}

    def hvp_batched(self, vs: Mapping[str, Tensor]) -> Tree:
        """``H v_i`` for a batch: every leaf of ``vs`` has a leading batch dimension ``m``.

        Uses autograd's ``is_grads_batched`` (vmap over the backward pass) and falls back to a
        loop for operators that have no batching rule.
        """
        m = next(iter(vs.values())).shape[0]
        if self.hvp_mode == "reverse" and self._live:
            try:
                out = torch.autograd.grad(self._outs, self._w_in, grad_outputs=[vs[k] for k in self._live],
                                          retain_graph=True, allow_unused=True, is_grads_batched=True)
                self.hvp_count += m
                return {k: (torch.zeros_like(vs[k]) if g is None else g)
                        for k, g in zip(self.params, out, strict=True)}
            except RuntimeError:
                pass  # an op without a vmap rule: do it column by column below
        cols = [self.hvp({k: vs[k][i] for k in vs}) for i in range(m)]
        return {k: torch.stack([c[k] for c in cols]) for k in self.params}

    def mixed_vjp(self, p: Mapping[str, Tensor]) -> tuple[Tree, set[str]]:
        """``(∂²L_T/∂λ∂wᵀ) p`` over every hyperparameter, and the keys it actually depends on."""
        if not self._live:
            return tree.zeros_like(self.hparams), set()
        out = torch.autograd.grad(self._outs, list(self.hparams.values()),
                                  grad_outputs=[p[k] for k in self._live], retain_graph=True,
                                  allow_unused=True)
        used = {k for k, g in zip(self.hparams, out, strict=True) if g is not None}
        return tree.as_tree(out, self.hparams), used

    def _hvp_forward(self, v: Mapping[str, Tensor]) -> Tree:
        lam = tree.detach(self.hparams)
        w = tree.detach(self.params)

        def loss_of_w(ww: Tree) -> Tensor:
            return self.inner_loss(ww, lam).reshape(())

        out = torch.func.jvp(torch.func.grad(loss_of_w), (w,), (dict(v),))
        return dict(out[1])


def power_iteration(matvec: Callable[[Tree], Tree], like: Mapping[str, Tensor], *, iters: int = 20,
                    seed: int = 0) -> float:
    """Estimate the largest-magnitude eigenvalue of a symmetric operator (Rayleigh quotient).

    A random start (fixed seed, so results are reproducible) and ``iters`` products. The
    estimate approaches ``max |λ_i|`` from below.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in like.items()}
    nv = tree.norm(v)
    v = tree.scale(v, 1.0 / nv)
    est = 0.0
    for _ in range(max(1, iters)):
        hv = matvec(v)
        est = float(tree.dot(v, hv))
        nh = float(tree.norm(hv))
        if nh == 0.0 or not torch.isfinite(torch.tensor(nh)):
            break
        v = tree.scale(hv, 1.0 / nh)
    return abs(est)
