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

``hvp_mode="finite-difference"`` needs first-order gradients only, for losses built from
operations that have no double backward (fused attention kernels such as
``scaled_dot_product_attention`` on CPU, custom autograd Functions whose backward is
``@once_differentiable``):

* ``H v ≈ (∇_w L_T(w + εv, λ) − ∇_w L_T(w − εv, λ)) / 2ε``;
* ``(∂²L_T/∂λ∂wᵀ) p = ∂_λ⟨∇_w L_T, p⟩ ≈ (∇_λ L_T(w + εp, λ) − ∇_λ L_T(w − εp, λ)) / 2ε``,

each two gradient evaluations, with ``ε`` from :func:`fd_step`. Central differences are exact
for quadratic losses up to rounding. Every evaluation replays the random-number state of the
first call of ``L_T``, so a loss with dropout sees one mask, as the reverse mode's single graph
does. In the reverse and forward modes a once-differentiable backward would silently drop its
part of the second derivative (autograd prunes the node that would raise; ``torch.func``
differentiates a backward that was computed without a graph): :class:`InnerDerivatives` looks for
such nodes in the gradient's graph and refuses, naming the finite-difference mode.

Nothing else in the package calls ``torch.autograd.grad`` with ``create_graph=True``, except
the path-based methods in :mod:`hypergradients.paths.unroll`, which differentiate through training,
and the transpose product of a root condition (:class:`~hypergradients.core.conditions.Root`),
a VJP of a VJP where forward mode fails.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import distributed, tree
from .errors import HypergradientError
from .tree import Tree

LossFn = Callable[[Tree, Tree], Tensor]
HvpMode = Literal["reverse", "forward", "finite-difference"]
HVP_MODES: tuple[HvpMode, ...] = ("reverse", "forward", "finite-difference")

_NO_DOUBLE_BACKWARD = (
    "a second-order product of inner_loss (double backward) failed: {err}. Some operations have no "
    "double backward (fused attention kernels such as scaled_dot_product_attention, custom "
    "autograd.Functions with a @once_differentiable backward, many custom CUDA ops): pass "
    'hvp_mode="finite-difference" to hg.hypergradient or hg.HyperOptimizer, which needs first-order '
    "gradients only."
)


def forward_mode_error(err: BaseException, *, what: str, fix: str) -> HypergradientError:
    """The library's error for a failure inside forward-mode AD (``torch.func.jvp``, ``forward_ad``).

    Names the cause torch's message leaves implicit and ends with ``fix`` (what to use instead).
    "ZeroTensors are immutable" is a PyTorch bug, not the user's: the forward-mode derivative of
    some backward formulas (``F.mse_loss`` with ``reduction="mean"``) writes into torch's
    immutable zero tensor; the same loss written out, ``((a - b) ** 2).mean()``, avoids it.
    """
    msg = str(err).rstrip(". ")
    if "ZeroTensors are immutable" in msg:
        cause = (
            "This is a known PyTorch bug in forward-mode AD, not an error in the losses: the "
            "forward-mode derivative of some backward formulas writes into an immutable zero tensor "
            "(F.mse_loss with reduction='mean' is one; write it out as ((a - b) ** 2).mean(), which "
            "computes the same loss without that formula)"
        )
    else:
        cause = (
            "The usual cause: an operation without a forward-mode derivative (fused kernels such as "
            "scaled_dot_product_attention on CPU, the backward of F.huber_loss, custom "
            "autograd.Functions without setup_context and jvp)"
        )
    return HypergradientError(f"{what} failed in forward-mode AD: {msg}. {cause}. {fix}")


def fd_step(x: Mapping[str, Tensor], direction: Mapping[str, Tensor]) -> float:
    """The central-difference step ``ε = ∛eps · (1 + ‖x‖) / ‖d‖`` along direction ``d`` at ``x``.

    ``eps`` is the machine epsilon of the least precise floating dtype among ``x``'s leaves. The
    central difference ``(g(x + εd) − g(x − εd)) / 2ε`` of a gradient ``g`` has truncation error
    ``O(ε²‖d‖³ ‖∇³L‖)`` and rounding error ``O(eps · ‖g‖ / ε)`` (each gradient is off by about
    ``eps`` relative); their sum is smallest for ``ε‖d‖ ∝ ∛eps`` times the scale of ``x``, with a
    relative error ``O(eps^{2/3})``: about 2e-5 in float32 and 4e-11 in float64 along directions of
    curvature near ``‖H‖``, up to cond(H) times more along the flattest ones (the rounding error
    does not shrink with ``‖Hd‖``; measured in ``benchmarks/fd_hvp_accuracy.py``). ``1 + ‖x‖``
    makes the step relative for large weights and absolute (``∛eps``) near zero. Returns 0 for a
    zero direction.
    """
    dn = float(_detached_norm(direction)) if direction else 0.0
    if dn == 0.0:
        return 0.0
    eps = max(
        (torch.finfo(t.dtype).eps for t in x.values() if t.is_floating_point()),
        default=torch.finfo(torch.float64).eps,
    )
    xn = float(_detached_norm(x)) if x else 0.0
    step = eps ** (1.0 / 3.0) * (1.0 + xn) / dn
    if not (step > 0 and math.isfinite(step)):
        raise HypergradientError(
            f"finite-difference step is {step!r} (‖x‖ = {xn:g}, ‖d‖ = {dn:g}); the "
            "weights or the direction are not finite"
        )
    return step


def _detached_norm(a: Mapping[str, Tensor]) -> Tensor:
    """``tree.norm`` on detached leaves (no graph is built for a step size)."""
    return tree.norm({k: t.detach() for k, t in a.items()})


class _RngReplay:
    """The random-number state of this moment (CPU, and every CUDA device of ``tensors``), replayable.

    ``with replay():`` runs its body from that state and restores the state found on entry
    afterwards, so the body's draws (dropout masks) repeat and leave no trace.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.devices = sorted(
            {
                torch.cuda.current_device() if t.device.index is None else t.device.index
                for t in tensors
                if t.device.type == "cuda"
            }
        )
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, st in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(st, d)
            yield


def _graph(outputs: Sequence[Tensor], seen: set[object] | None = None) -> Iterator[object]:
    """The autograd nodes of the outputs' graph, each once (``seen``: nodes to skip, updated)."""
    seen = set() if seen is None else seen
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(f for f, _ in node.next_functions if f is not None)


def _once_differentiable_node(outputs: Sequence[Tensor], seen: set[object] | None = None) -> str | None:
    """Name of an autograd ``Error`` node (a ``@once_differentiable`` backward) in the outputs' graph.

    Such a node stands for a backward that ran without building a graph; autograd does not link it
    to its inputs, so a second backward skips it without raising and drops its contribution.
    ``seen``: nodes not to walk (updated), e.g. the graph of the weights an unrolled step starts
    from, checked with the steps before.
    """
    for node in _graph(outputs, seen):
        if type(node).__name__ == "Error":
            return str(node.name())  # type: ignore[attr-defined]
    return None


# Every backward wrapped by @once_differentiable shares the code object of its wrapper.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx: None).__code__


def once_differentiable_on_weights(outputs: Sequence[Tensor], weights: Sequence[Tensor]) -> str | None:
    """Name of a custom ``autograd.Function`` with a ``@once_differentiable`` backward that lies on a
    path from ``outputs`` (a loss) to ``weights``, or ``None``.

    The ``Error`` node that :func:`_once_differentiable_node` finds in a gradient's graph exists only
    when the gradient flowing into that backward requires grad. When it does not (the op feeds a
    plain ``.mean()``, say), the backward runs without a graph, no node is left, and a second
    derivative through the gradient silently misses the op's curvature. So the loss's own graph is
    searched: any such Function between the loss and the weights makes the second derivative
    unavailable. A weight that is not a leaf (an unrolled step's) stops the walk at its ``grad_fn``.
    """
    leaf_ids = {id(t) for t in weights if t.grad_fn is None}
    stops = {t.grad_fn for t in weights if t.grad_fn is not None}
    seen: set[object] = set()
    order: list[object] = []
    stack: list[tuple[object, bool]] = [(t.grad_fn, False) for t in outputs if t.grad_fn is not None]
    while stack:  # post-order: every node after the nodes it leads to
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        if node not in stops:
            stack.extend((f, False) for f, _ in node.next_functions if f is not None and f not in seen)  # type: ignore[attr-defined]
    reaches: dict[object, bool] = {}
    for node in order:
        hit = (
            node in stops
            or id(getattr(node, "variable", None)) in leaf_ids
            or (
                node not in stops
                and any(
                    reaches.get(f, False)
                    for f, _ in node.next_functions  # type: ignore[attr-defined]
                    if f is not None
                )
            )
        )
        reaches[node] = hit
        cls = getattr(node, "_forward_cls", None)
        if hit and cls is not None and getattr(cls.backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            return str(cls.__name__)
    return None


def once_differentiable_culprits(outputs: Sequence[Tensor], node: str) -> str:
    """What to call the once-differentiable operation(s) of the outputs' graph in a message.

    An ``Error`` node does not say which operation made it; the custom ``autograd.Function`` classes
    whose backward is ``@once_differentiable`` are found in the forward part of the graph (the
    loss, or the tensors a gradient's graph saved), by their backward's code object. ``node``:
    the name of the ``Error`` node, for the message when no such Function is found.
    """
    names = sorted(
        {
            cls.__name__
            for node in _graph(outputs)
            if (cls := getattr(node, "_forward_cls", None)) is not None
            and getattr(cls.backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE
        }
    )
    if names:
        return f"the custom autograd.Function {', '.join(names)} (its backward is @once_differentiable)"
    return (
        f"an operation whose backward is once-differentiable ({node} in the gradient's graph: a custom "
        "autograd.Function with a @once_differentiable backward, or an extension op's)"
    )


def _double_backward(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` through a gradient's graph; a missing double backward names the fix."""
    try:
        return torch.autograd.grad(
            list(outputs), list(inputs), grad_outputs=list(grad_outputs), retain_graph=True, allow_unused=True
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise HypergradientError(_NO_DOUBLE_BACKWARD.format(err=e)) from e


def scalar_loss(
    loss_fn: LossFn, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], *, name: str
) -> Tensor:
    """Call a loss and check that it returned a finite scalar tensor (errors name the loss)."""
    out = loss_fn(dict(params), dict(hparams))
    if not isinstance(out, Tensor):
        raise HypergradientError(
            f"{name}(params, hparams) must return a torch.Tensor, got {type(out).__name__}"
        )
    if out.numel() != 1:
        raise HypergradientError(
            f"{name}(params, hparams) must return a scalar, got a tensor of shape {tuple(out.shape)}; "
            "reduce it (e.g. .mean()) inside the loss"
        )
    out = out.reshape(())
    if not bool(torch.isfinite(out)):
        raise HypergradientError(f"{name}(params, hparams) returned a non-finite value ({out.item()})")
    return out


def grad(
    loss: Tensor,
    inputs: Mapping[str, Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tree:
    """``∂loss/∂inputs`` as a tree; inputs the loss does not use get zeros."""
    vals = torch.autograd.grad(
        loss, list(inputs.values()), create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
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
    copies). The products are counted by the operator that uses them
    (:class:`~hypergradients.HessianOperator`); ``gradient_evals`` counts the extra first-order
    gradients of the finite-difference mode (two per product), its cost in passes over the data.
    With ``hvp_mode="finite-difference"`` no graph is kept: :attr:`grad` is the plain first-order
    gradient.
    """

    def __init__(
        self, inner_loss: LossFn, params: Tree, hparams: Tree, *, hvp_mode: HvpMode = "reverse"
    ) -> None:
        if hvp_mode not in HVP_MODES:
            raise HypergradientError(
                f"hvp_mode must be one of {', '.join(map(repr, HVP_MODES))}, got {hvp_mode!r}"
            )
        self.inner_loss = inner_loss
        self.params = params
        self.hparams = hparams
        self.hvp_mode: HvpMode = hvp_mode
        self.gradient_evals = 0
        self._w_in = list(params.values())
        self._keys = list(params)
        if hvp_mode == "finite-difference":
            self._init_fd()
            return
        self.loss = scalar_loss(inner_loss, params, hparams, name="inner_loss")
        raw = torch.autograd.grad(self.loss, list(params.values()), create_graph=True, allow_unused=True)
        self.grad: Tree = tree.as_tree(raw, params)
        # Entries of ∂L_T/∂w that depend on nothing (a param L_T does not use, or a purely linear
        # term) have no graph: their rows of H and of the mixed partial are zero.
        self._live = [k for k, g in self.grad.items() if g.requires_grad]
        # Built once: every product reuses the same output/input lists (no per-call rebuilds).
        self._outs = [self.grad[k] for k in self._live]
        # A @once_differentiable backward leaves an Error node here. Double backward skips it and
        # forward-over-reverse differentiates a backward computed without a graph: both would lose
        # its second derivative silently, so both modes refuse.
        bad = _once_differentiable_node(self._outs)
        if bad is not None:
            raise HypergradientError(
                _NO_DOUBLE_BACKWARD.format(
                    err=f"the gradient of inner_loss was built through "
                    f"{once_differentiable_culprits([self.loss, *self._outs], bad)}, whose second "
                    "derivative autograd would silently drop"
                )
            )
        # The same backward fed a gradient that needs no graph leaves no Error node: look in L_T itself.
        fn = once_differentiable_on_weights([self.loss], self._w_in)
        if fn is not None:
            raise HypergradientError(
                _NO_DOUBLE_BACKWARD.format(
                    err=f"inner_loss goes through the custom autograd.Function {fn}, whose backward is "
                    "@once_differentiable: autograd would silently drop its second derivative"
                )
            )

    def _init_fd(self) -> None:
        # The RNG state before the first call of L_T: every later evaluation replays it.
        self._rng = _RngReplay(self._w_in)
        self.loss = scalar_loss(self.inner_loss, self.params, self.hparams, name="inner_loss")
        both = self._w_in + list(self.hparams.values())
        raw = (
            torch.autograd.grad(self.loss, both, allow_unused=True)
            if self.loss.requires_grad
            else (None,) * len(both)
        )
        self.grad = tree.as_tree(raw[: len(self._w_in)], self.params)
        self._live = []
        self._outs = []
        # Without a graph of ∂L_T/∂w the mixed VJP cannot see which λ it depends on: it reports
        # those that L_T uses at all (a λ in L_T that does not touch w gets an exact zero).
        self._fd_used = {
            k for k, g in zip(self.hparams, raw[len(self._w_in) :], strict=True) if g is not None
        }

    def _fd_grad(self, w: Mapping[str, Tensor], *, of: Literal["w", "lam"]) -> Tree:
        """``∇_w L_T`` or ``∇_λ L_T`` at ``(w, λ)``, first order, with the replayed RNG state."""
        self.gradient_evals += 1
        with self._rng.replay(), torch.enable_grad():
            x = tree.clone_leaves(w, requires_grad=of == "w")
            lam = tree.clone_leaves(self.hparams, requires_grad=of == "lam")
            wrt = x if of == "w" else lam
            try:
                loss = scalar_loss(self.inner_loss, x, lam, name="inner_loss")
            except HypergradientError as e:
                raise HypergradientError(
                    f"{e} at a finite-difference point w ± εd (‖εd‖ = ∛eps·(1 + ‖w‖), see fd_step): the loss "
                    "must be defined around the weights; use hvp_mode='reverse' or move away from the "
                    "boundary of its domain"
                ) from e
            return grad(loss, wrt) if loss.requires_grad else tree.zeros_like(wrt)

    def _fd_central(self, d: Mapping[str, Tensor], *, of: Literal["w", "lam"]) -> Tree | None:
        """``(∇ L_T(w + εd) − ∇ L_T(w − εd)) / 2ε``, or ``None`` for ``d = 0``."""
        eps = fd_step(self.params, d)
        if eps == 0.0:
            return None
        w = tree.detach(self.params)
        d = tree.detach(d)
        plus = self._fd_grad(tree.axpy(eps, d, w), of=of)
        minus = self._fd_grad(tree.axpy(-eps, d, w), of=of)
        return {k: (plus[k] - minus[k]) / (2.0 * eps) for k in plus}

    # ------------------------------------------------------------------ products
    def hvp(self, v: Mapping[str, Tensor]) -> Tree:
        """``H v`` (one product); inside :func:`~hypergradients.distributed.data_parallel` the
        group mean ``(1/N) Σ_r H_r v`` (one all-reduce)."""
        return distributed.average([self._hvp_local(v)])[0]

    def _hvp_local(self, v: Mapping[str, Tensor]) -> Tree:
        if self.hvp_mode == "forward":
            return self._hvp_forward(v)
        if self.hvp_mode == "finite-difference":
            hv = self._fd_central(v, of="w")
            return tree.zeros_like(self.params) if hv is None else hv
        if not self._live:
            return tree.zeros_like(self.params)
        out = _double_backward(self._outs, self._w_in, [v[k] for k in self._live])
        return {
            k: (torch.zeros_like(ref) if g is None else g)
            for k, ref, g in zip(self._keys, self._w_in, out, strict=True)
        }

    def hvp_batched(self, vs: Mapping[str, Tensor]) -> Tree:
        """``H v_i`` for a batch: every leaf of ``vs`` has a leading batch dimension ``m``.

        Uses autograd's ``is_grads_batched`` (vmap over the backward pass) and falls back to a
        loop for operators that have no batching rule.
        """
        m = next(iter(vs.values())).shape[0]
        if self.hvp_mode == "reverse" and self._live:
            try:
                out = torch.autograd.grad(
                    self._outs,
                    self._w_in,
                    grad_outputs=[vs[k] for k in self._live],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
                return distributed.average(
                    [
                        {
                            k: (torch.zeros_like(vs[k]) if g is None else g)
                            for k, g in zip(self.params, out, strict=True)
                        }
                    ]
                )[0]
            except RuntimeError:
                pass  # an op without a vmap rule: do it column by column below
        cols = [self._hvp_local({k: vs[k][i] for k in vs}) for i in range(m)]
        # the whole batch in one all-reduce (data-parallel), not one per column
        return distributed.average([{k: torch.stack([c[k] for c in cols]) for k in self.params}])[0]

    def mixed_vjp(self, p: Mapping[str, Tensor]) -> tuple[Tree, set[str]]:
        """``(∂²L_T/∂λ∂wᵀ) p`` over every hyperparameter, and the keys it actually depends on.

        In the finite-difference mode the keys are those ``L_T`` depends on at all.
        """
        if self.hvp_mode == "finite-difference":
            out_fd = self._fd_central(p, of="lam")
            res = tree.zeros_like(self.hparams) if out_fd is None else out_fd
            return distributed.average([res])[0], set(self._fd_used)
        if not self._live:
            return distributed.average([tree.zeros_like(self.hparams)])[0], set()
        out = _double_backward(self._outs, list(self.hparams.values()), [p[k] for k in self._live])
        used = {k for k, g in zip(self.hparams, out, strict=True) if g is not None}
        # data-parallel: the group mean (every rank calls the all-reduce, even with nothing live)
        return distributed.average([tree.as_tree(out, self.hparams)])[0], used

    def _hvp_forward(self, v: Mapping[str, Tensor]) -> Tree:
        lam = tree.detach(self.hparams)
        w = tree.detach(self.params)

        def loss_of_w(ww: Tree) -> Tensor:
            return self.inner_loss(ww, lam).reshape(())

        try:
            out = torch.func.jvp(torch.func.grad(loss_of_w), (w,), (dict(v),))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # NotImplementedError included
            raise forward_mode_error(
                e,
                what='a Hessian-vector product of inner_loss with hvp_mode="forward"',
                fix='Use hvp_mode="reverse" (the default, double backward), or "finite-difference" for '
                "operations without a double backward",
            ) from e
        return dict(out[1])
