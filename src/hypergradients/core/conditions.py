r"""Optimality conditions ``F(w, λ) = 0``: what the implicit function theorem differentiates.

At a point ``(w, λ)`` a condition gives the three things :func:`~.implicit.implicit` needs: its value
``F`` (whose norm says how far the weights are from a solution), the operator
``x ↦ (∂F/∂w)ᵀx`` of the transpose solve, and the mixed product ``u ↦ (∂F/∂λ)ᵀu``.

* :class:`Stationarity` — ``F = ∂L_T/∂w``, the condition of a minimum of the training loss
  (:func:`~hypergradients.hypergradient`). ``∂F/∂w = H`` is the symmetric Hessian, its products
  are Hessian-vector products and the mixed product is ``(∂²L_T/∂λ∂wᵀ)u``, all from one graph of
  ``∂L_T/∂w`` (:class:`~.derivatives.InnerDerivatives`: reverse, forward-over-reverse or
  finite-difference products).
* :class:`Root` — any condition given as a function: a root ``F(w, λ) = 0`` or a fixed point
  ``w = T(w, λ)`` (then ``F = w − T``), :func:`~hypergradients.root_hypergradient`. Its products are
  vector-Jacobian products of ``F`` through one graph of ``F``: ``F`` is differentiated once, never
  twice. ``∂F/∂w`` is in general not symmetric; ``symmetric=True`` declares that it is (``F`` a
  gradient), which admits the symmetric solvers and finite-difference products.

Every product is the group mean inside :func:`~hypergradients.distributed.data_parallel` (one
all-reduce per product, one per batch of products), so both conditions are data-parallel.

A new condition is a class with the attributes and methods of :class:`Condition`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import distributed, tree
from .derivatives import (
    HvpMode,
    InnerDerivatives,
    LossFn,
    _once_differentiable_node,
    _RngReplay,
    fd_step,
    forward_mode_error,
    once_differentiable_culprits,
)
from .errors import HypergradientError
from .operators import HessianOperator, LinearOperator
from .tree import Tree

ConditionFn = Callable[[Tree, Tree], Mapping[str, Tensor]]
RootMode = Literal["reverse", "finite-difference"]


class Condition(Protocol):
    """An optimality condition ``F(w, λ) = 0`` evaluated at one point ``(w, λ)``.

    ``symmetric``: whether ``∂F/∂w`` is symmetric. ``name``: what the condition is called in
    messages (``"∂L_T/∂w"``, ``"the condition"``).
    """

    symmetric: bool
    name: str

    def value(self) -> Tree:
        """``F(w, λ)``, detached (this rank's, in a data-parallel group)."""
        ...

    def operator(self) -> LinearOperator:
        """``x ↦ (∂F/∂w)ᵀx``, a fresh operator whose count of products starts at zero."""
        ...

    def mixed_vjp(self, u: Tree) -> tuple[Tree, set[str]]:
        """``(∂F/∂λ)ᵀu`` over every hyperparameter, and the keys ``F`` depends on."""
        ...

    def facts(self) -> dict[str, float]:
        """What the products found out, for ``info.extra`` (``{}`` when nothing)."""
        ...


class Stationarity:
    """``F = ∂L_T/∂w = 0``: the weights minimise the training loss ``L_T(w, λ)``.

    ``w`` and ``lam`` are leaf tensors that require grad (the caller's private copies);
    ``hvp_mode`` as for :func:`~hypergradients.hypergradient`. Builds the graph of ``∂L_T/∂w`` once.
    """

    symmetric = True
    name = "∂L_T/∂w"

    def __init__(self, inner_loss: LossFn, w: Tree, lam: Tree, *, hvp_mode: HvpMode = "reverse") -> None:
        self.derivatives = InnerDerivatives(inner_loss, w, lam, hvp_mode=hvp_mode)

    def value(self) -> Tree:
        return tree.detach(self.derivatives.grad)

    def operator(self) -> HessianOperator:
        return HessianOperator.of(self.derivatives)

    def mixed_vjp(self, u: Tree) -> tuple[Tree, set[str]]:
        return self.derivatives.mixed_vjp(u)

    def facts(self) -> dict[str, float]:
        return {}


def call_condition(
    condition: ConditionFn, w: Mapping[str, Tensor], lam: Mapping[str, Tensor], *, fixed_point: bool
) -> Tree:
    """``F(w, λ)``, or ``w − T(w, λ)`` for a fixed point, checked to be shaped like ``w``."""
    name = "the fixed-point map T" if fixed_point else "condition"
    out = condition(dict(w), dict(lam))
    if not isinstance(out, Mapping) or out.keys() != w.keys():
        got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise HypergradientError(
            f"{name}(params, hparams) must return a dict with the keys of params {sorted(w)}, got {got}"
        )
    for k, t in out.items():
        if not isinstance(t, Tensor) or t.shape != w[k].shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise HypergradientError(
                f"{name}(params, hparams)[{k!r}] must have the shape of params[{k!r}], "
                f"{tuple(w[k].shape)}; got {shape}"
            )
    return {k: w[k] - out[k] for k in w} if fixed_point else dict(out)


_FD_NEEDS_SYMMETRY = (
    "hvp_mode='finite-difference' for a root condition needs symmetric=True: central differences of F "
    "give (∂F/∂w)x, while the transpose solve needs (∂F/∂w)ᵀx, and the two agree only when ∂F/∂w is "
    "symmetric (F the gradient of some loss). Pass symmetric=True if it is; otherwise use "
    "hvp_mode='reverse' (vector-Jacobian products of F, which need its first derivative), or, for "
    "F = ∂L_T/∂w with L_T at hand, hg.hypergradient(..., hvp_mode='finite-difference')"
)


class Root:
    """``F(w, λ) = 0`` for a function ``F`` shaped like the weights, or a fixed point ``w = T(w, λ)``.

    Args:
        condition: ``(params, hparams) -> dict`` with the keys and shapes of ``params``: ``F``, or
            with ``fixed_point=True`` the map ``T``.
        w, lam: leaf tensors that require grad (the caller's private copies; a condition may call
            ``torch.autograd.grad``).
        fixed_point: the condition is ``F = w − T(w, λ)``; its operator is ``I − (∂T/∂w)ᵀ``.
        symmetric: ``∂F/∂w`` is symmetric (``F`` is a gradient ``∂L/∂w``): admits the symmetric
            solvers (CG, Auto, Nyström, MINRES) and ``hvp_mode="finite-difference"``.
        hvp_mode: how products are formed:

            * ``"reverse"`` (default): ``(∂F/∂w)ᵀx`` and ``(∂F/∂λ)ᵀu`` are vector-Jacobian products
              through one graph of ``F`` (``F``'s first derivative only). The transpose's transpose,
              ``(∂F/∂w)x`` (NormalCG on a non-symmetric condition), is a forward-mode JVP, or a VJP
              of a VJP where forward mode fails (``facts()["double_vjp"] = 1``).
            * ``"finite-difference"``: no derivative of ``F`` at all, for a condition built from
              operations without one (a gradient ``∂L/∂w`` taken through a ``@once_differentiable``
              backward): ``(∂F/∂w)x ≈ (F(w + εx, λ) − F(w − εx, λ))/2ε``, which is the product the
              solve needs only when ``∂F/∂w`` is symmetric, so ``symmetric=True`` is required; and
              ``(∂F/∂λ)ᵀu`` column by column, ``Σ_j e_j ⟨(F(w, λ + ε_j e_j) − F(w, λ − ε_j e_j))/2ε_j, u⟩``
              over the scalar hyperparameters ``j``: ``2·n_λ`` evaluations of ``F``. ``ε`` as in
              :func:`~.derivatives.fd_step`; every evaluation replays the random-number state of the
              first one. ``facts()["condition_evals"]`` counts the evaluations.
    """

    name = "the condition"

    def __init__(
        self,
        condition: ConditionFn,
        w: Tree,
        lam: Tree,
        *,
        fixed_point: bool = False,
        symmetric: bool = False,
        hvp_mode: RootMode = "reverse",
    ) -> None:
        if hvp_mode not in ("reverse", "finite-difference"):
            raise HypergradientError(
                "hvp_mode for a root condition must be 'reverse' (vector-Jacobian products of F) or "
                "'finite-difference' (central differences of F, symmetric conditions only), got "
                f"{hvp_mode!r}"
            )
        if hvp_mode == "finite-difference" and not symmetric:
            raise HypergradientError(_FD_NEEDS_SYMMETRY)
        self.condition, self.w, self.lam = condition, w, lam
        self.fixed_point, self.symmetric, self.hvp_mode = bool(fixed_point), bool(symmetric), hvp_mode
        self.evaluations = 0
        if hvp_mode == "finite-difference":
            self._rng = _RngReplay(list(w.values()))  # before F's first evaluation: replayed by the others
        self.F = call_condition(condition, w, lam, fixed_point=fixed_point)
        self.evaluations += 1
        if not tree.all_finite(self.F):
            raise HypergradientError(
                f"the condition is not finite at these weights (leaf "
                f"{tree.first_nonfinite(self.F)!r}); pass the root or fixed point"
            )
        self.live = [k for k, t in self.F.items() if t.requires_grad]
        if hvp_mode == "reverse":
            self._refuse_once_differentiable()
        self.double_vjp = False  # (∂F/∂w)x by a VJP of a VJP (forward mode failed)
        self._fwd_error: RuntimeError | None = None
        self._u: Tree = {}
        self._Atu: list[tuple[str, Tensor]] | None = None  # (key, ((∂F/∂w)ᵀu)_key), built at the first use

    def _refuse_once_differentiable(self) -> None:
        bad = _once_differentiable_node([self.F[k] for k in self.live])
        if bad is None:
            return
        what = once_differentiable_culprits(list(self.F.values()), bad)
        raise HypergradientError(
            f"the condition was computed through {what}: a backward run without a graph (F = ∂L_T/∂w built "
            "with create_graph=True through such an operation, say), so every product with ∂F/∂w would "
            "silently lose that operation's part and the hypergradient would be wrong. For F = ∂L_T/∂w use "
            'hg.hypergradient(outer_loss, inner_loss, params, hparams, hvp_mode="finite-difference"), which '
            "needs first-order gradients only, or root_hypergradient(..., symmetric=True, "
            'hvp_mode="finite-difference"), which needs no derivative of F; otherwise write the condition '
            "with operations that have a derivative (a custom autograd.Function whose backward is itself "
            "differentiable, plain torch ops)"
        )

    # ------------------------------------------------------------------ the Condition protocol
    def value(self) -> Tree:
        return tree.detach(self.F)

    def operator(self) -> LinearOperator:
        if self.hvp_mode == "finite-difference":
            return LinearOperator(
                self._fd_jvp,
                batched=self._fd_jvp_batched,
                symmetric=True,
                name="(∂F/∂w)ᵀ",
                fixed_point=self.fixed_point,
            )
        return LinearOperator(
            self._vjp_w,
            rmatvec=self._jvp,
            batched=self._vjp_w_batched,
            symmetric=self.symmetric,
            name="(∂F/∂w)ᵀ",
            fixed_point=self.fixed_point,
        )

    def mixed_vjp(self, u: Tree) -> tuple[Tree, set[str]]:
        if self.hvp_mode == "finite-difference":
            return self._fd_mixed(u)
        out, used = self._vjp(u, self.lam)
        return distributed.average([out])[0], used

    def facts(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.double_vjp:
            out["double_vjp"] = 1.0
        if self.hvp_mode == "finite-difference":
            out["condition_evals"] = float(self.evaluations)
        return out

    # ------------------------------------------------------------------ reverse mode
    def _vjp(self, x: Mapping[str, Tensor], inputs: Tree) -> tuple[Tree, set[str]]:
        """``(∂F/∂inputs)ᵀ x`` (this rank's) and the keys of ``inputs`` that ``F`` depends on."""
        if not self.live:
            return tree.zeros_like(inputs), set()
        out = torch.autograd.grad(
            [self.F[k] for k in self.live],
            list(inputs.values()),
            grad_outputs=[x[k] for k in self.live],
            retain_graph=True,
            allow_unused=True,
        )
        return tree.as_tree(out, inputs), {k for k, g in zip(inputs, out, strict=True) if g is not None}

    def _vjp_w(self, x: Tree) -> Tree:
        """``(∂F/∂w)ᵀ x``, one VJP (the group mean: one all-reduce)."""
        return distributed.average([self._vjp(x, self.w)[0]])[0]

    def _vjp_w_batched(self, xs: Tree) -> Tree:
        """``(∂F/∂w)ᵀ x_i`` for a batch (leaves with a leading dimension m), vmapped where autograd can."""
        m = next(iter(xs.values())).shape[0]
        local: Tree | None = None
        if not self.live:
            local = {k: torch.zeros((m, *t.shape), dtype=t.dtype, device=t.device) for k, t in self.w.items()}
        else:
            try:
                out = torch.autograd.grad(
                    [self.F[k] for k in self.live],
                    list(self.w.values()),
                    grad_outputs=[xs[k] for k in self.live],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
                local = {
                    k: (torch.zeros((m, *t.shape), dtype=t.dtype, device=t.device) if g is None else g)
                    for (k, t), g in zip(self.w.items(), out, strict=True)
                }
            except RuntimeError:  # an operation without a batching rule: one VJP per row below
                local = None
        if local is None:
            rows = [self._vjp({k: t[i] for k, t in xs.items()}, self.w)[0] for i in range(m)]
            local = {k: torch.stack([r[k] for r in rows]) for k in self.w}
        return distributed.average([local])[0]  # the whole batch in one all-reduce

    def _jvp(self, x: Tree) -> Tree:
        """``(∂F/∂w) x``, one forward-mode JVP of the condition (or a VJP of a VJP, where forward mode
        fails); the group mean."""
        return distributed.average([self._jvp_local(x)])[0]

    def _jvp_local(self, x: Tree) -> Tree:
        if self.double_vjp:
            return self._jvp_reverse(x)
        try:
            with fwAD.dual_level():
                # The weights stay leaves that require grad: a condition may call torch.autograd.grad.
                wd = {k: fwAD.make_dual(t.detach().requires_grad_(True), x[k]) for k, t in self.w.items()}
                out = call_condition(self.condition, wd, tree.detach(self.lam), fixed_point=self.fixed_point)
                tangents = {k: fwAD.unpack_dual(t).tangent for k, t in out.items()}
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # NotImplementedError included
            self._fwd_error = e
            self.double_vjp = True
            return self._jvp_reverse(x)
        return {k: (torch.zeros_like(self.w[k]) if t is None else t.detach()) for k, t in tangents.items()}

    def _jvp_reverse(self, x: Tree) -> Tree:
        """``(∂F/∂w) x = ∂/∂u ⟨(∂F/∂w)ᵀu, x⟩``: linear in ``u``, so its graph (built at the first call,
        ``u = 0``) serves every product, one backward pass each."""
        if self._Atu is None:
            self._Atu = self._transpose_graph() if self.live else []
        zeros = {k: torch.zeros_like(t) for k, t in self.F.items()}
        if not self._Atu:
            return zeros
        try:
            back = torch.autograd.grad(
                [t for _, t in self._Atu],
                [self._u[k] for k in self.live],
                grad_outputs=[x[k] for k, _ in self._Atu],
                retain_graph=True,
                allow_unused=True,
            )
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise self._no_jvp(e) from e
        return {**zeros, **{k: b for k, b in zip(self.live, back, strict=True) if b is not None}}

    def _transpose_graph(self) -> list[tuple[str, Tensor]]:
        """``(∂F/∂w)ᵀu`` with its graph to ``u`` (leaves, zero), the pieces that depend on ``u``."""
        self._u = {k: torch.zeros_like(self.F[k], requires_grad=True) for k in self.live}
        try:
            Atu = torch.autograd.grad(
                [self.F[k] for k in self.live],
                list(self.w.values()),
                grad_outputs=[self._u[k] for k in self.live],
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
            )
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise self._no_jvp(e) from e
        pieces = [(k, t) for k, t in zip(self.w, Atu, strict=True) if t is not None and t.requires_grad]
        bad = _once_differentiable_node([t for _, t in pieces])
        if bad is not None:
            what = once_differentiable_culprits(list(self.F.values()), bad)
            raise self._no_jvp(
                RuntimeError(
                    f"the VJP of the condition runs through {what}, whose "
                    "derivative autograd would silently drop"
                )
            )
        return pieces

    def _no_jvp(self, err: RuntimeError) -> HypergradientError:
        assert self._fwd_error is not None
        fwd = forward_mode_error(
            self._fwd_error,
            what="NormalCG's product (∂F/∂w)x",
            fix="The reverse-mode alternative, a VJP of a VJP, needs a second "
            f"derivative of the condition and failed too: {err}",
        )
        return HypergradientError(
            f"{fwd}. Use hg.GMRES or hg.BiCGStab, which need only VJPs of the condition"
        )

    # ------------------------------------------------------------------ finite differences
    def _evaluate(self, w: Mapping[str, Tensor], lam: Mapping[str, Tensor]) -> Tree:
        """``F`` at another point, detached, with the random-number state of the first evaluation."""
        self.evaluations += 1
        with self._rng.replay(), torch.enable_grad():
            out = call_condition(
                self.condition,
                tree.clone_leaves(w, requires_grad=True),
                tree.clone_leaves(lam, requires_grad=False),
                fixed_point=self.fixed_point,
            )
            return tree.detach(out)

    def _fd_jvp_local(self, x: Mapping[str, Tensor]) -> Tree:
        eps = fd_step(self.w, x)
        if eps == 0.0:
            return tree.zeros_like(self.w)
        w, lam, d = tree.detach(self.w), tree.detach(self.lam), tree.detach(x)
        plus = self._evaluate(tree.axpy(eps, d, w), lam)
        minus = self._evaluate(tree.axpy(-eps, d, w), lam)
        return {k: (plus[k] - minus[k]) / (2.0 * eps) for k in plus}

    def _fd_jvp(self, x: Tree) -> Tree:
        """``(∂F/∂w) x`` by central differences (two evaluations of ``F``), the group mean."""
        return distributed.average([self._fd_jvp_local(x)])[0]

    def _fd_jvp_batched(self, xs: Tree) -> Tree:
        m = next(iter(xs.values())).shape[0]
        cols = [self._fd_jvp_local({k: t[i] for k, t in xs.items()}) for i in range(m)]
        return distributed.average([{k: torch.stack([c[k] for c in cols]) for k in self.w}])[0]

    def _fd_mixed(self, u: Tree) -> tuple[Tree, set[str]]:
        """``(∂F/∂λ)ᵀu``, one central difference of ``F`` per scalar hyperparameter."""
        w, lam = tree.detach(self.w), tree.detach(self.lam)
        flat = tree.flatten(lam)
        out = torch.zeros_like(flat)
        for j in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[j] = 1.0
            d = tree.unflatten(e, lam)
            eps = fd_step(lam, d)
            plus = self._evaluate(w, tree.axpy(eps, d, lam))
            minus = self._evaluate(w, tree.axpy(-eps, d, lam))
            out[j] = tree.dot({k: (plus[k] - minus[k]) / (2.0 * eps) for k in plus}, u)
        res = distributed.average([tree.unflatten(out, lam)])[0]
        return res, {k for k, t in res.items() if bool((t != 0).any())} | self._graph_used()

    def _graph_used(self) -> set[str]:
        """The hyperparameters in ``F``'s graph (a first derivative of ``F``; none if it has no graph)."""
        if not self.live:
            return set()
        try:
            out = torch.autograd.grad(
                [self.F[k] for k in self.live],
                list(self.lam.values()),
                grad_outputs=[torch.ones_like(self.F[k]) for k in self.live],
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError:
            return set()
        return {k for k, g in zip(self.lam, out, strict=True) if g is not None}
