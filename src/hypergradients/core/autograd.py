r"""The solution ``w*(λ)`` as a node of PyTorch autograd: :func:`custom_root` and :func:`custom_argmin`.

A decorated solver returns ``w*(λ)`` as tensors that carry a ``grad_fn``: an outer loss built from
them (and from anything else) gets its gradient from ``.backward()``. The forward pass is the
user's solver, run on detached inputs (no graph of its iterations is kept). The backward pass
receives the cotangent ``v = ∂L/∂w*`` of whatever loss is being differentiated and applies the
implicit function theorem (:mod:`.implicit`) at ``(w*, λ)``:

    v · dw*/dλ = −(∂F/∂λ)ᵀ u,      (∂F/∂w)ᵀ u = v,

one transpose solve by any implicit method (:class:`~hypergradients.ImplicitMethod`) and one
vector-Jacobian product, with the products of the library's conditions (:mod:`.conditions`):
``F = ∂L_T/∂w`` for a minimiser (:func:`custom_argmin`, Hessian-vector products) or any
``F(w, λ) = 0`` / fixed point ``w = T(w, λ)`` (:func:`custom_root`, vector-Jacobian products of
``F``). The gradient of ``L(w*(λ), λ)`` is then autograd's sum of the direct term and this one:
:func:`~hypergradients.hypergradient` and :func:`~hypergradients.root_hypergradient` to rounding.

After torchopt's and jaxopt's ``custom_root``, in the library's conventions: ``params`` and
``hparams`` are ``dict[str, Tensor]`` (or single tensors), the solver is ``solver(init, hparams,
*args, **kwargs)`` and the condition ``condition(params, hparams, *args, **kwargs)``; ``args`` are
passed to both and never differentiated.

What it does not do: differentiate twice (a second derivative through the node raises
:class:`~hypergradients.HypergradientError` when one is taken; ``create_graph=True`` itself works,
for the rest of the graph) and run under ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``:
refused with the way out).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from . import tree
from .conditions import _FD_NEEDS_SYMMETRY, Condition, Root, Stationarity
from .derivatives import HVP_MODES, HvpMode
from .errors import (
    HypergradientError,
    NonFiniteHypergradientError,
    PathOnlyHyperparameterError,
    UnusedHyperparameterWarning,
    warn_user,
)
from .implicit import _looks_path_only
from .info import Info, RootInfo, Stats
from .method import ImplicitMethod, Method
from .solvers import CG, GMRES
from .tree import Tree

__all__ = ["ImplicitSolver", "custom_argmin", "custom_root"]

Kind = Literal["root", "argmin"]

_SECOND_ORDER = (
    "a second derivative through hg.{deco}'s node was asked for (double backward): its backward solves "
    "(∂F/∂w)ᵀu = v with {method}, whose iterations are not differentiated, so the gradient it returned "
    "has no derivative. The first derivative is exact under create_graph=True; for a second one "
    "(a Hessian-vector product of the outer loss, a gradient penalty through w*), differentiate through "
    "the solver itself (call it undecorated, autograd through its iterations) or use hg.Unrolled"
)

_TRANSFORMS = (
    "hg.{deco}'s node does not run under torch.func transforms (vmap, grad, jacrev, jvp, ...): its "
    "backward forms its products with torch.autograd on leaves of its own (which functorch forbids "
    "inside a transform), and the solver and the implicit methods decide when to stop from the values "
    "they compute (tolerances, convergence checks), which vmap cannot batch. Call it outside the "
    "transform and "
    "differentiate with .backward() or torch.autograd.grad: for a batch of tasks, loop over them, or "
    "solve them as one problem whose weights and hyperparameters have a leading task dimension (the "
    "conditions of independent tasks make a block-diagonal Jacobian: one solve serves all)"
)


# ---------------------------------------------------------------------------------- dicts or tensors
@dataclass(frozen=True)
class _Shape:
    """How the user holds a tree: a ``dict`` (``key is None``) or one tensor (stored under ``key``)."""

    key: str | None

    def pack(self, t: Mapping[str, Tensor]) -> Any:
        return dict(t) if self.key is None else t[self.key]


def _as_tree(name: str, x: object, key: str) -> tuple[Tree, _Shape]:
    """``x`` as a dict of floating-point tensors (a tensor is stored under ``key``); errors name it."""
    if isinstance(x, Tensor):
        x = {key: x}
        shape = _Shape(key)
    elif isinstance(x, Mapping):
        shape = _Shape(None)
    else:
        raise HypergradientError(
            f"{name} must be a dict[str, Tensor] or a torch.Tensor, got {type(x).__name__}"
        )
    if not x:
        raise HypergradientError(f"{name} is empty")
    for k, t in x.items():
        if not isinstance(k, str):
            raise HypergradientError(f"{name} keys must be strings, got {k!r}")
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise HypergradientError(f"{name}[{k!r}] must be a floating-point torch.Tensor, got {got}")
    return dict(x), shape


def _tensors_requiring_grad(x: object, path: str) -> list[str]:
    """Where in ``x`` (nested tuples, lists, dicts) a tensor requires grad."""
    if isinstance(x, Tensor):
        return [path] if x.requires_grad else []
    if isinstance(x, (tuple, list)):
        return [p for i, item in enumerate(x) for p in _tensors_requiring_grad(item, f"{path}[{i}]")]
    if isinstance(x, Mapping):
        return [p for k, item in x.items() for p in _tensors_requiring_grad(item, f"{path}[{k!r}]")]
    return []


def _detached(x: object) -> object:
    """``x`` with every tensor (in tuples, lists, dicts) detached: the solver builds no graph to λ."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(item) for item in x)
    if isinstance(x, Mapping):
        return {k: _detached(item) for k, item in x.items()}
    return x


def _under_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is active."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is not None and level() is not None


# ---------------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class _Problem:
    """What the backward differentiates: the condition (or training loss) and how to solve it."""

    kind: Kind
    fn: Callable[..., Any]
    method: ImplicitMethod
    fixed_point: bool
    symmetric: bool
    hvp_mode: str
    residual: bool

    @property
    def decorator(self) -> str:
        return "custom_root" if self.kind == "root" else "custom_argmin"


@dataclass
class _Call:
    """One call of the node: the problem, how the user holds its trees, and the extra arguments."""

    problem: _Problem
    owner: ImplicitSolver
    w_keys: list[str]
    w_shape: _Shape
    lam_keys: list[str]
    lam_shape: _Shape
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def condition(self, w: Tree, lam: Tree, const: Tree) -> Condition:
        """The condition at ``(w, λ)``: ``lam`` the leaves differentiated, ``const`` the other hparams."""
        p = self.problem

        def full(ll: Mapping[str, Tensor]) -> Any:
            return self.lam_shape.pack({k: ll[k] if k in ll else const[k] for k in self.lam_keys})

        if p.kind == "argmin":

            def inner_loss(ww: Tree, ll: Tree) -> Tensor:
                return p.fn(self.w_shape.pack(ww), full(ll), *self.args, **self.kwargs)

            return Stationarity(inner_loss, w, lam, hvp_mode=p.hvp_mode)  # type: ignore[arg-type]

        def F(ww: Tree, ll: Tree) -> Mapping[str, Tensor]:
            out = p.fn(self.w_shape.pack(ww), full(ll), *self.args, **self.kwargs)
            if self.w_shape.key is not None and isinstance(out, Tensor):
                return {self.w_shape.key: out}
            return out

        return Root(F, w, lam, fixed_point=p.fixed_point, symmetric=p.symmetric, hvp_mode=p.hvp_mode)  # type: ignore[arg-type]

    def gradient(
        self, w_star: list[Tensor], lam_vals: list[Tensor], cotangent: list[Tensor | None], needs: list[bool]
    ) -> tuple[Tree, Info]:
        """``−(∂F/∂λ)ᵀu`` with ``(∂F/∂w)ᵀu = v`` for the hparams in ``needs``, and the :class:`Info`."""
        p = self.problem
        w = tree.clone_leaves(dict(zip(self.w_keys, w_star, strict=True)), requires_grad=True)
        lam_all = dict(zip(self.lam_keys, lam_vals, strict=True))
        wanted = [k for k, n in zip(self.lam_keys, needs, strict=True) if n]
        lam = tree.clone_leaves({k: lam_all[k] for k in wanted}, requires_grad=True)
        const = {k: t.detach() for k, t in lam_all.items() if k not in lam}
        v = {
            k: torch.zeros_like(w[k]) if c is None else c.detach()
            for k, c in zip(self.w_keys, cotangent, strict=True)
        }
        cond = self.condition(w, lam, const)
        p.method.check_condition(cond)
        op = cond.operator()
        if float(tree.norm(v)) == 0.0:  # the loss does not depend on w*: u = 0 whatever the operator
            u, state, stats = tree.zeros_like(v), p.method.own_state(None), Stats(0, 0.0, True)
        else:
            u, state, stats = p.method.solve(op, v, None, residual=p.residual)
        indirect, used = cond.mixed_vjp(u)
        self._report_unused([k for k in lam if k not in used])
        name = type(p.method).__name__
        g = {k: -indirect[k].detach() for k in lam}
        bad = tree.first_nonfinite(g)
        if bad is not None:
            raise NonFiniteHypergradientError(
                f"the gradient of {bad!r} through hg.{p.decorator}'s node is not finite ({name}): check that "
                "the solver returned a solution of the condition, that its Jacobian ∂F/∂w is non-singular "
                "there, or the method's settings",
                key=bad,
                method=name,
            )
        info_type = RootInfo if p.kind == "root" else Info
        info = info_type(
            name,
            stats.iterations,
            op.products,
            stats.residual if p.residual else None,
            stats.converged,
            direct={},
            extra={**stats.extra, **cond.facts()},
            state=state,
            condition_norm=float(tree.norm(cond.value())),
            transposed=op.transposed,
        )
        if p.kind == "argmin":
            info.grad_norm = info.condition_norm
        return g, info

    def _report_unused(self, unused: list[str]) -> None:
        if not unused:
            return
        p = self.problem
        what = "inner_loss" if p.kind == "argmin" else "the condition"
        path_like = [k for k in unused if _looks_path_only(k)] if p.kind == "argmin" else []
        if path_like:
            raise PathOnlyHyperparameterError(
                f"hparams {path_like} require grad, but inner_loss does not depend on them: they look like "
                "step sizes or momenta, which shape only the solver's path to the minimiser, and the "
                "minimiser itself does not depend on them, so hg.custom_argmin's node would give them a "
                "silent zero. To differentiate through the path, call the solver undecorated (autograd "
                "through its steps) or use hg.Unrolled; to use them without a gradient, pass them detached "
                "(or as an extra argument after hparams)."
            )
        warn_user(
            f"hparams {unused} require grad, but {what} does not depend on them: their gradient "
            f"through hg.{p.decorator}'s node is zero (pass them detached, or as an extra argument "
            "after hparams, to say so)",
            UnusedHyperparameterWarning,
        )


class _SecondOrderRefused(torch.autograd.Function):
    """The node's gradients as seen by a second differentiation: its backward raises the library's error."""

    @staticmethod
    def forward(ctx: Any, message: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.message = message
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:
        raise HypergradientError(ctx.message)


class ImplicitSolution(torch.autograd.Function):
    """``λ ↦ w*(λ)``: the forward returns the solution found already, the backward is the theorem."""

    @staticmethod
    def forward(ctx: Any, call: _Call, w_star: list[Tensor], *lam: Tensor) -> tuple[Tensor, ...]:
        ctx.call = call
        ctx.save_for_backward(*lam, *w_star)
        return tuple(w_star)

    @staticmethod
    def backward(ctx: Any, *cotangent: Tensor | None) -> tuple[Tensor | None, ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        n = len(call.lam_keys)
        lam_vals, w_star = list(saved[:n]), list(saved[n:])
        needs = list(ctx.needs_input_grad[2:])
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():  # the condition's own graph, whatever mode the backward runs in
            g, info = call.gradient(w_star, lam_vals, list(cotangent), needs)
        call.owner.last_info = info
        out: list[Tensor | None] = [g.get(k) for k in call.lam_keys]
        if create_graph:
            # A second derivative would go through the gradient just returned: route it to an error.
            deps = [t for t in (*lam_vals, *cotangent) if isinstance(t, Tensor) and t.requires_grad]
            given = [t for t in out if t is not None]
            if deps and given:
                msg = _SECOND_ORDER.format(deco=call.problem.decorator, method=f"hg.{info.method}")
                wrapped = iter(_SecondOrderRefused.apply(msg, len(given), *given, *deps))
                out = [None if t is None else next(wrapped) for t in out]
        return (None, None, *out)


# ---------------------------------------------------------------------------------- the public face
class ImplicitSolver:
    """A solver whose result ``w*(λ)`` is differentiable: made by :func:`custom_root` / :func:`custom_argmin`.

    ``solver(init, hparams, *args, **kwargs)`` runs the wrapped solver on detached inputs and returns
    its result (a dict of tensors, or one tensor, as the solver returns it) as tensors whose
    ``grad_fn`` applies the implicit function theorem; :meth:`attach` does the same for weights
    found elsewhere. Without a hyperparameter that requires grad (or under ``torch.no_grad()``) the
    result is returned detached, with no node. ``last_info`` is the :class:`~hypergradients.Info`
    (:class:`~hypergradients.RootInfo` for :func:`custom_root`) of the latest backward through a
    node of this solver: iterations, products, ``converged``, ``residual`` (with ``residual=True``),
    ``condition_norm`` (``‖F(w*, λ)‖``: large when the solver did not reach a solution); its
    ``direct`` is empty, since autograd adds the direct term ``∂L/∂λ`` itself.
    """

    def __init__(self, solver: Callable[..., Any], problem: _Problem) -> None:
        if not callable(solver):
            raise HypergradientError(
                f"hg.{problem.decorator}(...) decorates a solver function "
                f"solver(init, hparams, ...); got {type(solver).__name__}"
            )
        self.solver = solver
        self.problem = problem
        self.last_info: Info | None = None
        functools.update_wrapper(self, solver)

    def __call__(self, init: Any, hparams: Mapping[str, Tensor] | Tensor, *args: Any, **kwargs: Any) -> Any:
        """``w*(λ)`` from ``solver(init, hparams, *args, **kwargs)``, differentiable w.r.t. ``hparams``.

        ``init`` (the starting point) is passed detached and gets no gradient: ``w*`` does not
        depend on it.
        """
        lam, lam_shape = self._check(hparams, args, kwargs)
        with torch.enable_grad():  # a solver may use autograd (gradient steps, torch.optim)
            out = self.solver(_detached(init), lam_shape.pack(tree.detach(lam)), *args, **kwargs)
        return self._node(out, lam, lam_shape, args, kwargs, name="the solver's result")

    def attach(
        self,
        params: Mapping[str, Tensor] | Tensor,
        hparams: Mapping[str, Tensor] | Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """``params``, already a solution at ``hparams`` (trained by your own loop), as ``w*(λ)``: the same
        values, differentiable w.r.t. ``hparams`` through the implicit function theorem."""
        lam, lam_shape = self._check(hparams, args, kwargs)
        return self._node(params, lam, lam_shape, args, kwargs, name="params")

    def _check(self, hparams: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tree, _Shape]:
        deco = self.problem.decorator
        if _under_transform():
            raise HypergradientError(_TRANSFORMS.format(deco=deco))
        lam, shape = _as_tree("hparams", hparams, "hparams")
        live = _tensors_requiring_grad(args, "args") + _tensors_requiring_grad(kwargs, "kwargs")
        if live:
            raise HypergradientError(
                f"{', '.join(live)} require grad, but the arguments after hparams are not differentiated by "
                f"hg.{deco}'s node, so their gradient would be silently lost: put them in hparams (a DEQ "
                "layer's input x, say), or detach them"
            )
        return lam, shape

    def _node(
        self,
        out: object,
        lam: Tree,
        lam_shape: _Shape,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        name: str,
    ) -> Any:
        w, w_shape = _as_tree(name, out, "params")
        w_star = [t.detach() for t in w.values()]
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in lam.values()):
            return w_shape.pack(dict(zip(w, w_star, strict=True)))
        call = _Call(self.problem, self, list(w), w_shape, list(lam), lam_shape, args, dict(kwargs))
        outs = ImplicitSolution.apply(call, w_star, *lam.values())
        return w_shape.pack(dict(zip(w, outs, strict=True)))

    def __repr__(self) -> str:
        p = self.problem
        name = getattr(self.solver, "__name__", self.solver)
        return f"hg.{p.decorator}(..., method={p.method!r})({name!r})"


def _check_method(method: Method | None, default: ImplicitMethod, deco: str) -> ImplicitMethod:
    method = default if method is None else method
    if not isinstance(method, ImplicitMethod):
        raise HypergradientError(
            f"hg.{deco}'s method must be an implicit method (hg.CG, hg.GMRES, hg.Exact, hg.Neumann, "
            f"hg.MINRES, ..., or a subclass of hg.ImplicitMethod), got {method!r}. Differentiating through "
            "the solver's path (hg.Unrolled, hg.Forward) needs no node: call the solver undecorated and let "
            "autograd follow its steps"
        )
    return method


def custom_root(
    condition: Callable[..., Any],
    *,
    method: Method | None = None,
    fixed_point: bool = False,
    symmetric: bool = False,
    hvp_mode: Literal["reverse", "finite-difference"] = "reverse",
    residual: bool = False,
) -> Callable[[Callable[..., Any]], ImplicitSolver]:
    r"""Decorate a solver of ``F(w, λ) = 0`` (or of a fixed point ``w = T(w, λ)``) so that autograd
    differentiates its result by the implicit function theorem.

    .. code-block:: python

        @hg.custom_root(T, fixed_point=True, method=hg.GMRES(tol=1e-10))
        def solve(init, hparams):             # any solver: the forward pass, never differentiated
            z = init
            for _ in range(100):
                z = T(z, hparams)
            return z

        z = solve(z0, hparams)                # w*(λ), with a grad_fn to every hparam that requires grad
        loss(z, hparams).backward()           # hparams[k].grad = dL/dλ_k, direct and implicit terms

    Args:
        condition: ``condition(params, hparams, *args, **kwargs)`` returning ``F`` with the keys and
            shapes of ``params`` (the solver's result; a tensor if it returns a tensor), or with
            ``fixed_point=True`` the map ``T``. Differentiated once per product (a VJP).
        method: the solver of ``(∂F/∂w)ᵀu = v``: :class:`~hypergradients.GMRES` (default ``GMRES()``),
            ``BiCGStab``, ``NormalCG``, ``Exact``, ``Neumann``, ``Identity``, one of your own; with
            ``symmetric=True`` also ``CG``, ``MINRES``, ``Auto``, ``Nystrom``.
        fixed_point, symmetric, hvp_mode: as for :func:`~hypergradients.root_hypergradient`.
        residual: compute ``‖(∂F/∂w)ᵀu − v‖/‖v‖`` for ``last_info.residual`` (a product where the
            method lacks it).

    Returns:
        A decorator; the decorated ``solver(init, hparams, *args, **kwargs)`` is an
        :class:`ImplicitSolver`. ``args``/``kwargs`` go to the solver and the condition, never
        differentiated (a tensor among them that requires grad is refused: put it in ``hparams``).
    """
    if not callable(condition):
        raise HypergradientError(
            f"hg.custom_root's condition must be a callable (params, hparams) -> F, "
            f"got {type(condition).__name__}"
        )
    if hvp_mode not in ("reverse", "finite-difference"):
        raise HypergradientError(
            f"hg.custom_root's hvp_mode must be 'reverse' (VJPs of F) or "
            f"'finite-difference' (symmetric conditions only), got {hvp_mode!r}"
        )
    if hvp_mode == "finite-difference" and not symmetric:
        raise HypergradientError(_FD_NEEDS_SYMMETRY)
    m = _check_method(method, GMRES(), "custom_root")
    if m.requires is not None and not symmetric:
        raise HypergradientError(
            f"hg.{type(m).__name__} needs a {m.requires} Jacobian; hg.custom_root's condition need not be "
            "symmetric: use hg.GMRES (the default) or hg.BiCGStab; pass symmetric=True if ∂F/∂w is "
            "symmetric (F the gradient of a loss), or use hg.custom_argmin(inner_loss) for F = ∂L_T/∂w"
        )
    problem = _Problem("root", condition, m, bool(fixed_point), bool(symmetric), hvp_mode, bool(residual))
    return functools.partial(ImplicitSolver, problem=problem)


def custom_argmin(
    inner_loss: Callable[..., Tensor],
    *,
    method: Method | None = None,
    hvp_mode: HvpMode = "reverse",
    residual: bool = False,
) -> Callable[[Callable[..., Any]], ImplicitSolver]:
    r"""Decorate a minimiser of ``inner_loss(params, hparams)`` so that autograd differentiates its result
    by the implicit function theorem (the condition ``∂L_T/∂w = 0``).

    .. code-block:: python

        @hg.custom_argmin(inner_loss, method=hg.CG(iters=50))
        def train(init, hparams):             # any optimiser: torch.optim, L-BFGS, a closed form
            ...
            return params

        w = train(w0, hparams)                # w*(λ) = argmin_w L_T(w, λ), differentiable in hparams
        outer_loss(w, hparams).backward()     # hparams[k].grad = dL_V/dλ_k, as hg.hypergradient

    The backward solves ``H u = v`` with ``H = ∂²L_T/∂w∂wᵀ`` at the returned weights (which it takes
    as the minimiser) and returns ``−(∂²L_T/∂λ∂wᵀ) u``: the indirect term of
    :func:`~hypergradients.hypergradient`, with ``v`` the cotangent of any loss.

    Args:
        inner_loss: ``inner_loss(params, hparams, *args, **kwargs) -> scalar``, ``L_T``.
        method: any implicit method (default ``hg.CG()``): the symmetric ones (CG, MINRES, Auto,
            Nyström) apply, since ``H`` is symmetric.
        hvp_mode: ``"reverse"``, ``"forward"`` or ``"finite-difference"``, as for
            :func:`~hypergradients.hypergradient`.
        residual: compute ``‖Hu − v‖/‖v‖`` for ``last_info.residual``.

    Returns:
        A decorator; the decorated ``solver(init, hparams, *args, **kwargs)`` is an :class:`ImplicitSolver`.
        A hyperparameter that requires grad but that ``L_T`` does not use gets a zero gradient and an
        :class:`~hypergradients.UnusedHyperparameterWarning`; one named like a step size or momentum
        (which shapes the solver's path only) is refused with
        :class:`~hypergradients.PathOnlyHyperparameterError`.
    """
    if not callable(inner_loss):
        raise HypergradientError(
            f"hg.custom_argmin's inner_loss must be a callable (params, hparams) -> "
            f"scalar, got {type(inner_loss).__name__}"
        )
    if hvp_mode not in HVP_MODES:
        raise HypergradientError(
            f"hg.custom_argmin's hvp_mode must be one of {', '.join(map(repr, HVP_MODES))}, got {hvp_mode!r}"
        )
    m = _check_method(method, CG(), "custom_argmin")
    problem = _Problem("argmin", inner_loss, m, False, True, hvp_mode, bool(residual))
    return functools.partial(ImplicitSolver, problem=problem)
