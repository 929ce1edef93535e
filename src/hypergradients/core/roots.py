r"""Hypergradients through any optimality condition: a root ``F(w, λ) = 0`` or a fixed point ``w = T(w, λ)``.

Derivation and sign convention. Let ``w*(λ)`` satisfy ``F(w*(λ), λ) = 0`` with ``F`` a tree shaped
like the weights, and write ``A = ∂F/∂w`` (square, non-singular), ``B = ∂F/∂λ``, both at
``(w*, λ)``. Differentiating the identity ``F(w*(λ), λ) = 0`` gives ``A·dw*/dλ + B = 0``, so
``dw*/dλ = −A⁻¹B`` (the implicit function theorem), and for the outer loss ``L_V(w, λ)``

    dL_V/dλ = ∂L_V/∂λ + (dw*/dλ)ᵀ ∂L_V/∂w = ∂L_V/∂λ − Bᵀ u,      Aᵀ u = ∂L_V/∂w.

So one *transpose* solve ``Aᵀ u = v`` (``v = ∂L_V/∂w``) and one vector-Jacobian product ``Bᵀu``.
Each product ``Aᵀx`` is one VJP of ``F`` through a graph built once: ``F`` itself is only
differentiated once (no double backward of ``F``). The result does not change when ``F`` is
scaled or negated (``A`` and ``B`` change together), which is why the sign of the condition is
free; the result is the gradient to *descend*, like :func:`hypergradients.hypergradient`.

* **Minimisation** (``F = ∂L_T/∂w``): ``A = H`` is the symmetric Hessian and ``Bᵀu`` the mixed
  product ``(∂²L_T/∂λ∂wᵀ) u``: the formula is the library's ``∂L_V/∂λ − (∂²L_T/∂λ∂wᵀ) H⁻¹∂L_V/∂w``.
* **Fixed point** ``w = T(w, λ)`` (``fixed_point=True``): the condition used is ``F = w − T(w, λ)``
  (the same hypergradient as ``T − w``), so ``A = I − J`` with ``J = ∂T/∂w``, ``B = −∂T/∂λ`` and

      dL_V/dλ = ∂L_V/∂λ + (∂T/∂λ)ᵀ (I − Jᵀ)⁻¹ ∂L_V/∂w.

  ``A`` has eigenvalues with positive real part when ``T`` is a contraction (``‖J‖ < 1``), and
  then the Neumann series ``(I − Jᵀ)⁻¹ v = Σ_j (Jᵀ)^j v`` converges.

Linear solvers for ``Aᵀ u = v`` (:class:`GMRES` by default):

| method | solve | products per iteration |
|---|---|---|
| :class:`GMRES` | restarted GMRES, any non-singular ``A`` | one VJP |
| :class:`BiCGStab` | BiCGStab, constant memory | two VJPs |
| :class:`NormalCG` | CG on ``A Aᵀ u = A v`` (CGLS), rate of ``cond(A)²`` | a VJP and a JVP |
| ``hg.Exact(damping=δ)`` | dense ``(A + δI)ᵀ u = v`` from ``n`` VJPs | (``n ≤ max_size``) |
| ``hg.Neumann(iters=K, alpha=α)`` | ``u = α Σ_{j<K} (I − αAᵀ)^j v`` | one VJP |

For a fixed point, ``hg.Neumann(alpha=1)`` is the classic series ``Σ_{j<K} (Jᵀ)^j v``.

``hg.Neumann(alpha="auto")`` uses ``α = 1`` for a fixed point (the plain series, convergent iff
the spectral radius of ``J`` is below one) and ``α = 1/|θ|`` for a root, ``θ`` the power-iteration
estimate of the dominant eigenvalue of ``A`` (the library's choice for ``F = ∂L_T/∂w``). A
growing series raises :class:`~hypergradients.NeumannDivergenceError`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import distributed, tree
from .derivatives import (
    LossFn,
    _once_differentiable_node,
    forward_mode_error,
    once_differentiable_culprits,
    power_iteration,
    scalar_loss,
)
from .errors import HypergradientError, NeumannDivergenceError, ProblemTooLargeError
from .kernels import krylov
from .method import UnusedHyperparameterWarning
from .solvers import Exact, Neumann
from .tree import Tree

Condition = Callable[[Tree, Tree], Mapping[str, Tensor]]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HypergradientError(f"{name} must be a positive integer, got {value!r}")


def _tolerance(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and
                                                                          math.isfinite(value)):
        raise HypergradientError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class GMRES:
    """Restarted GMRES on ``(∂F/∂w)ᵀ u = ∂L_V/∂w``: at most ``iters`` VJPs of ``F`` (plus one per
    restart for the true residual), restarting every ``restart``, stopping at ``‖r‖ ≤ tol·‖v‖``.

    Any non-singular Jacobian; the residual falls monotonically. Memory: ``restart + 1`` trees
    the size of the weights. See :func:`hypergradients.core.kernels.krylov.gmres`.
    """

    iters: int = 200
    tol: float = 1e-10
    restart: int = 30

    def __post_init__(self) -> None:
        _positive_int("GMRES.iters", self.iters)
        _tolerance("GMRES.tol", self.tol)
        _positive_int("GMRES.restart", self.restart)


@dataclass(frozen=True)
class BiCGStab:
    """BiCGStab on ``(∂F/∂w)ᵀ u = ∂L_V/∂w``: at most ``iters`` iterations of two VJPs each.

    Constant memory (seven trees); the residual is not monotone and the method can break down
    (it then restarts from the true residual). See :func:`hypergradients.core.kernels.krylov.bicgstab`.
    """

    iters: int = 100
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _positive_int("BiCGStab.iters", self.iters)
        _tolerance("BiCGStab.tol", self.tol)


@dataclass(frozen=True)
class NormalCG:
    """CG on the normal equations of ``(∂F/∂w)ᵀ u = ∂L_V/∂w`` (CGLS): a VJP and a JVP per iteration.

    Minimises the residual monotonically for any Jacobian, singular included, but converges at
    the rate of CG on ``cond(∂F/∂w)²``: the fallback where GMRES stagnates. The JVPs use forward
    mode (``torch.autograd.forward_ad``). Where forward mode fails (an operation without a
    forward-mode formula; PyTorch's "ZeroTensors are immutable" bug in ``F.mse_loss``'s mean
    reduction) they are computed in reverse mode instead, as ``(∂F/∂w)x = ∂/∂u ⟨(∂F/∂w)ᵀu, x⟩``
    (a VJP of a VJP, one backward pass each after a graph built once), which needs a second
    derivative of the condition; ``info.extra["double_vjp"]`` is then 1. See
    :func:`.kernels.krylov.cgls`.
    """

    iters: int = 200
    tol: float = 1e-10

    def __post_init__(self) -> None:
        _positive_int("NormalCG.iters", self.iters)
        _tolerance("NormalCG.tol", self.tol)


RootMethod = GMRES | BiCGStab | NormalCG | Exact | Neumann
_ROOT_METHODS = (GMRES, BiCGStab, NormalCG, Exact, Neumann)
_ROOT_METHOD_NAMES = "hg.GMRES, hg.BiCGStab, hg.NormalCG, hg.Exact or hg.Neumann"


@dataclass
class RootInfo:
    """What a :func:`root_hypergradient` cost and how good it is.

    ``iterations`` of the linear solver; ``vjps`` products ``(∂F/∂w)ᵀx`` (the transpose solve's
    matvecs, residual checks included); ``jvps`` products ``(∂F/∂w)x`` (``NormalCG`` only);
    ``residual`` the relative residual ``‖(∂F/∂w)ᵀu − v‖/‖v‖`` when computed; ``converged``
    whether the solver met its tolerance (``None`` for Neumann's fixed budget); ``direct`` the
    term ``∂L_V/∂λ``; ``condition_norm`` ``‖F(w, λ)‖`` at the given weights (for a fixed point
    ``‖w − T(w, λ)‖``): the derivative is that of the root, so it should be small; ``extra``
    method facts (``alpha``, ``lambda_max``, ``damping``, ``double_vjp``).
    """

    method: str
    iterations: int
    vjps: int
    jvps: int
    residual: float | None
    converged: bool | None
    direct: Tree
    condition_norm: float
    outer_loss: float = float("nan")
    time_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _validate_tree(name: str, t: object) -> dict[str, Tensor]:
    if not isinstance(t, Mapping) or not t:
        raise HypergradientError(f"{name} must be a non-empty dict[str, Tensor], got {type(t).__name__}")
    for k, v in t.items():
        if not isinstance(k, str) or not isinstance(v, Tensor) or not v.is_floating_point():
            raise HypergradientError(f"{name}[{k!r}] must be a floating-point torch.Tensor under a str key, "
                                     f"got {type(v).__name__}"
                                     + (f" of dtype {v.dtype}" if isinstance(v, Tensor) else ""))
    return dict(t)


def _call_condition(condition: Condition, w: Mapping[str, Tensor], lam: Mapping[str, Tensor], *,
                    fixed_point: bool) -> Tree:
    """``F(w, λ)``, or ``w − T(w, λ)`` for a fixed point, checked to be shaped like ``w``."""
    name = "the fixed-point map T" if fixed_point else "condition"
    out = condition(dict(w), dict(lam))
    if not isinstance(out, Mapping) or out.keys() != w.keys():
        got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise HypergradientError(f"{name}(params, hparams) must return a dict with the keys of params "
                                 f"{sorted(w)}, got {got}")
    for k, t in out.items():
        if not isinstance(t, Tensor) or t.shape != w[k].shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise HypergradientError(f"{name}(params, hparams)[{k!r}] must have the shape of params[{k!r}], "
                                     f"{tuple(w[k].shape)}; got {shape}")
    return {k: w[k] - out[k] for k in w} if fixed_point else dict(out)


class _Jacobian:
    """Products with ``A = ∂F/∂w`` at fixed ``(w, λ)`` from one graph of ``F``: ``Aᵀx`` and ``Bᵀx``
    by VJPs, ``A x`` by forward mode (re-evaluating ``F``)."""

    def __init__(self, condition: Condition, w: Tree, lam: Tree, *, fixed_point: bool) -> None:
        self.condition, self.w, self.lam, self.fixed_point = condition, w, lam, fixed_point
        self.F = _call_condition(condition, w, lam, fixed_point=fixed_point)
        if not tree.all_finite(self.F):
            raise HypergradientError(f"the condition is not finite at these weights (leaf "
                                     f"{tree.first_nonfinite(self.F)!r}); pass the root or fixed point")
        self.live = [k for k, t in self.F.items() if t.requires_grad]
        bad = _once_differentiable_node([self.F[k] for k in self.live])
        if bad is not None:
            what = once_differentiable_culprits(list(self.F.values()), bad)
            raise HypergradientError(
                f"the condition was computed through {what}: "
                "a backward run without a graph (F = ∂L_T/∂w built with create_graph=True through such an "
                "operation, say), so every product with ∂F/∂w would silently lose that operation's part and "
                "the hypergradient would be wrong. For F = ∂L_T/∂w use hg.hypergradient(outer_loss, "
                'inner_loss, params, hparams, hvp_mode="finite-difference"), which needs first-order '
                "gradients only; otherwise write the condition with operations that have a derivative (a "
                "custom autograd.Function whose backward is itself differentiable, plain torch ops)")
        self.vjps = 0
        self.jvps = 0
        self.double_vjp = False   # A x by a VJP of a VJP (forward mode failed)
        self._fwd_error: RuntimeError | None = None
        self._u: Tree = {}
        self._Atu: list[tuple[str, Tensor]] | None = None   # (key, (Aᵀu)_key), built at the first use

    def _vjp(self, x: Mapping[str, Tensor], inputs: Tree) -> tuple[Tree, set[str]]:
        if not self.live:
            return tree.zeros_like(inputs), set()
        out = torch.autograd.grad([self.F[k] for k in self.live], list(inputs.values()),
                                  grad_outputs=[x[k] for k in self.live], retain_graph=True,
                                  allow_unused=True)
        return tree.as_tree(out, inputs), {k for k, g in zip(inputs, out, strict=True) if g is not None}

    def rmatvec(self, x: Tree) -> Tree:
        """``Aᵀ x``, one VJP."""
        self.vjps += 1
        return self._vjp(x, self.w)[0]

    def matvec(self, x: Tree) -> Tree:
        """``A x``, one forward-mode JVP of the condition (or a VJP of a VJP, where forward mode fails)."""
        self.jvps += 1
        if self.double_vjp:
            return self._matvec_reverse(x)
        try:
            with fwAD.dual_level():
                # The weights stay leaves that require grad: a condition may call torch.autograd.grad.
                wd = {k: fwAD.make_dual(t.detach().requires_grad_(True), x[k]) for k, t in self.w.items()}
                out = _call_condition(self.condition, wd, tree.detach(self.lam), fixed_point=self.fixed_point)
                tangents = {k: fwAD.unpack_dual(t).tangent for k, t in out.items()}
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # NotImplementedError included
            self._fwd_error = e
            self.double_vjp = True
            return self._matvec_reverse(x)
        return {k: (torch.zeros_like(self.w[k]) if t is None else t.detach()) for k, t in tangents.items()}

    def _matvec_reverse(self, x: Tree) -> Tree:
        """``A x = ∂/∂u ⟨Aᵀu, x⟩``: ``Aᵀu`` is linear in ``u``, so its graph (built at the first call,
        ``u = 0``) serves every product, one backward pass each."""
        if self._Atu is None:
            self._Atu = self._transpose_graph() if self.live else []
        zeros = {k: torch.zeros_like(t) for k, t in self.F.items()}
        if not self._Atu:
            return zeros
        try:
            back = torch.autograd.grad([t for _, t in self._Atu], [self._u[k] for k in self.live],
                                       grad_outputs=[x[k] for k, _ in self._Atu], retain_graph=True,
                                       allow_unused=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise self._no_jvp(e) from e
        return {**zeros, **{k: b for k, b in zip(self.live, back, strict=True) if b is not None}}

    def _transpose_graph(self) -> list[tuple[str, Tensor]]:
        """``Aᵀu`` with its graph to ``u`` (leaves, zero), the pieces that depend on ``u``."""
        self._u = {k: torch.zeros_like(self.F[k], requires_grad=True) for k in self.live}
        try:
            Atu = torch.autograd.grad([self.F[k] for k in self.live], list(self.w.values()),
                                      grad_outputs=[self._u[k] for k in self.live], retain_graph=True,
                                      create_graph=True, allow_unused=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise self._no_jvp(e) from e
        pieces = [(k, t) for k, t in zip(self.w, Atu, strict=True) if t is not None and t.requires_grad]
        bad = _once_differentiable_node([t for _, t in pieces])
        if bad is not None:
            what = once_differentiable_culprits(list(self.F.values()), bad)
            raise self._no_jvp(RuntimeError(f"the VJP of the condition runs through {what}, whose "
                                            "derivative autograd would silently drop"))
        return pieces

    def _no_jvp(self, err: RuntimeError) -> HypergradientError:
        assert self._fwd_error is not None
        fwd = forward_mode_error(self._fwd_error, what="NormalCG's product (∂F/∂w)x",
                                 fix="The reverse-mode alternative, a VJP of a VJP, needs a second "
                                     f"derivative of the condition and failed too: {err}")
        return HypergradientError(f"{fwd}. Use hg.GMRES or hg.BiCGStab, which need only VJPs of the "
                                  "condition")

    def mixed(self, u: Tree) -> tuple[Tree, set[str]]:
        """``Bᵀ u = (∂F/∂λ)ᵀ u`` and the hyperparameters ``F`` depends on."""
        return self._vjp(u, self.lam)

    def dense_transpose(self, max_size: int) -> Tensor:
        """The n×n matrix ``Aᵀ`` from n VJPs (batched where autograd can vmap them)."""
        n = tree.numel(self.w)
        if n > max_size:
            raise ProblemTooLargeError(
                f"hg.Exact would materialise a {n}×{n} Jacobian of the condition, above its max_size="
                f"{max_size} weights. Use hg.GMRES or hg.BiCGStab (matrix-free), or raise max_size.")
        flat = tree.flatten(self.w).detach()
        eye = tree.unflatten_rows(torch.eye(n, dtype=flat.dtype, device=flat.device), self.w)
        if not self.live:
            return torch.zeros(n, n, dtype=flat.dtype, device=flat.device)
        try:
            out = torch.autograd.grad([self.F[k] for k in self.live], list(self.w.values()),
                                      grad_outputs=[eye[k] for k in self.live], retain_graph=True,
                                      allow_unused=True, is_grads_batched=True)
            rows = torch.cat([(torch.zeros((n, *t.shape), dtype=t.dtype, device=t.device) if g is None
                               else g).reshape(n, -1) for t, g in zip(self.w.values(), out, strict=True)], 1)
        except RuntimeError:  # an operation without a batching rule: one VJP per row
            rows = torch.stack([tree.flatten(self._vjp({k: eye[k][i] for k in eye}, self.w)[0])
                                for i in range(n)])
        self.vjps += n
        return rows.T  # the VJP with e_i is e_iᵀA, the i-th row of A: rows is A


@dataclass
class _Solution:
    u: Tree
    iterations: int
    residual: float | None
    converged: bool | None
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, r: krylov.KrylovResult) -> _Solution:
        return cls(r.x, r.iterations, r.residual, r.converged)


def _neumann(J: _Jacobian, v: Tree, method: Neumann, *, residual: bool) -> _Solution:
    """``u = α Σ_{j<K} (I − αAᵀ)^j v``: ``K − 1`` VJPs, one more for the residual."""
    extra: dict[str, float] = {}
    if method.alpha != "auto":
        alpha = float(method.alpha)
    elif J.fixed_point:
        alpha = 1.0  # A = I − J: the plain series Σ (Jᵀ)^j v
    else:
        lam_max = power_iteration(J.rmatvec, v, iters=method.power_iters)
        if not lam_max > 0:
            raise HypergradientError("Neumann(alpha='auto'): the dominant eigenvalue of ∂F/∂w is estimated "
                                     f"as {lam_max:g}; pass an explicit alpha or use hg.GMRES")
        alpha = 1.0 / lam_max
        extra["lambda_max"] = lam_max
    extra["alpha"] = alpha
    vn = float(tree.norm(v))
    term = {k: t.clone() for k, t in v.items()}
    acc = {k: t.clone() for k, t in v.items()}
    for j in range(1, method.iters):
        term = tree.axpy(-alpha, J.rmatvec(term), term)  # term ← (I − αAᵀ) term
        tn = float(tree.norm(term))
        if not (math.isfinite(tn) and tn <= method.max_growth * max(vn, 1e-300)):
            rho = power_iteration(J.rmatvec, v, iters=method.power_iters)
            what = ("the fixed-point map is not a contraction here: the series Σ (∂T/∂w)ᵀʲ v needs the "
                    "eigenvalues of ∂T/∂w inside the unit disc" if J.fixed_point else
                    "the series needs the eigenvalues of I − α·∂F/∂w inside the unit disc")
            safe = 1.0 / rho if rho > 0 else float("nan")
            raise NeumannDivergenceError(
                f"Neumann series diverged at term {j}: ‖term‖ = {tn:.3g} vs ‖v‖ = {vn:.3g} with "
                f"alpha={alpha:g}; {what}. The dominant eigenvalue of ∂F/∂w is estimated as {rho:.4g}: "
                f"try alpha={safe:.3g} (a damped series), or hg.GMRES, which needs no contraction.",
                lambda_max=rho, safe_alpha=safe)
        acc = tree.add(acc, term)
    res = None
    if residual:
        # Aᵀu − v = −(I − αAᵀ)^K v (since αAᵀ Σ_{j<K} (I − αAᵀ)^j = I − (I − αAᵀ)^K): one more VJP.
        res = float(tree.norm(tree.axpy(-alpha, J.rmatvec(term), term))) / vn
    return _Solution(tree.scale(acc, alpha), method.iters, res, None, extra)


def _solve(J: _Jacobian, v: Tree, method: RootMethod, *, residual: bool) -> _Solution:
    if isinstance(method, GMRES):
        return _Solution.of(krylov.gmres(J.rmatvec, v, iters=method.iters, tol=method.tol,
                                         restart=method.restart))
    if isinstance(method, BiCGStab):
        return _Solution.of(krylov.bicgstab(J.rmatvec, v, iters=method.iters, tol=method.tol))
    if isinstance(method, NormalCG):
        # CGLS on M u = v with M = Aᵀ: it needs M (VJPs) and Mᵀ = A (JVPs).
        return _Solution.of(krylov.cgls(J.rmatvec, J.matvec, v, iters=method.iters, tol=method.tol))
    if isinstance(method, Exact):
        At = J.dense_transpose(method.max_size)
        if method.damping:
            At = At + method.damping * torch.eye(At.shape[0], dtype=At.dtype, device=At.device)
        b = tree.flatten(v)
        try:
            x = torch.linalg.solve(At, b)
        except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
            raise HypergradientError(
                f"hg.Exact: ∂F/∂w is singular at these weights ({e}): the condition does not determine the "
                "weights locally. Add damping (hg.Exact(damping=...)) or check the condition") from e
        res = float(torch.linalg.vector_norm(At @ x - b) / torch.linalg.vector_norm(b))
        return _Solution(tree.unflatten(x, v), 1, res, True, {"damping": float(method.damping)})
    return _neumann(J, v, method, residual=residual)


@overload
def root_hypergradient(outer_loss: LossFn, condition: Condition, params: Mapping[str, Tensor],
                       hparams: Mapping[str, Tensor], *, fixed_point: bool = ...,
                       method: RootMethod | None = ..., return_info: Literal[False] = ...,
                       residual: bool | None = ...) -> Tree: ...


@overload
def root_hypergradient(outer_loss: LossFn, condition: Condition, params: Mapping[str, Tensor],
                       hparams: Mapping[str, Tensor], *, fixed_point: bool = ...,
                       method: RootMethod | None = ..., return_info: Literal[True],
                       residual: bool | None = ...) -> tuple[Tree, RootInfo]: ...


def root_hypergradient(outer_loss: LossFn, condition: Condition, params: Mapping[str, Tensor],
                       hparams: Mapping[str, Tensor], *, fixed_point: bool = False,
                       method: RootMethod | None = None, return_info: bool = False,
                       residual: bool | None = None) -> Tree | tuple[Tree, RootInfo]:
    """``dL_V/dλ`` at a root ``F(w, λ) = 0`` (or a fixed point ``w = T(w, λ)``) of any optimality condition.

    ``dL_V/dλ = ∂L_V/∂λ − (∂F/∂λ)ᵀ u`` with ``(∂F/∂w)ᵀ u = ∂L_V/∂w``, all at the given weights,
    which must be the root (the module docstring derives it). With ``F = ∂L_T/∂w`` this is
    :func:`hypergradients.hypergradient`; ``F`` may also be a deep-equilibrium layer's
    ``f(z, x) − z``, a proximal-gradient step's fixed point, or any non-symmetric condition.

    Args:
        outer_loss: ``(params, hparams) -> scalar tensor``, ``L_V``.
        condition: ``(params, hparams) -> dict`` with the keys and shapes of ``params``: ``F(w, λ)``,
            or with ``fixed_point=True`` the map ``T(w, λ)``. Differentiated once per product (one
            VJP), so its operations need a first derivative only.
        params: ``dict[str, Tensor]``, the root ``w*`` (for a fixed point, ``w* = T(w*, λ)``).
        hparams: ``dict[str, Tensor]`` of floating-point hyperparameters.
        fixed_point: ``condition`` is ``T`` and the condition is ``w − T(w, λ) = 0``.
        method: the solver of ``(∂F/∂w)ᵀ u = ∂L_V/∂w``: :class:`GMRES` (default ``GMRES()``),
            :class:`BiCGStab`, :class:`NormalCG`, ``hg.Exact`` or ``hg.Neumann``.
        return_info: also return a :class:`RootInfo`.
        residual: report ``‖(∂F/∂w)ᵀu − v‖/‖v‖``: ``None`` (default) only with ``return_info``. Free
            for the Krylov methods and Exact; one VJP for Neumann.

    Returns:
        A dict with the keys, shapes, dtypes and devices of ``hparams`` (and the :class:`RootInfo`).
        Inputs are never modified.
    """
    t0 = time.perf_counter()
    if distributed.current() is not None:
        # Its VJPs of F are not averaged over the group: refuse rather than return one rank's answer.
        raise HypergradientError(
            "hg.root_hypergradient is not data-parallel: inside hg.distributed.data_parallel it would "
            "return each rank's local answer. Call it outside data_parallel on the whole data, or use "
            "hg.hypergradient (F = ∂L_T/∂w), which averages every product over the group")
    method = GMRES() if method is None else method
    if not isinstance(method, _ROOT_METHODS):
        hint = (" CG and Auto need a symmetric positive-definite Jacobian; the condition's need not be: "
                "use hg.GMRES (or hg.hypergradient for F = ∂L_T/∂w)."
                if type(method).__name__ in ("CG", "Auto") else "")
        raise HypergradientError(f"method must be {_ROOT_METHOD_NAMES}; got {method!r}.{hint}")
    params = _validate_tree("params", params)
    hparams = _validate_tree("hparams", hparams)
    if not callable(outer_loss) or not callable(condition):
        raise HypergradientError("outer_loss and condition must be callables of (params, hparams)")
    w = tree.clone_leaves(params, requires_grad=True)
    lam = tree.clone_leaves(hparams, requires_grad=True)

    outer = scalar_loss(outer_loss, w, lam, name="outer_loss")
    both = list(w.values()) + list(lam.values())
    raw = torch.autograd.grad(outer, both, allow_unused=True) if outer.requires_grad else (None,) * len(both)
    v = tree.as_tree(raw[:len(w)], w)
    direct = tree.as_tree(raw[len(w):], lam)
    direct_used = {k for k, g in zip(lam, raw[len(w):], strict=True) if g is not None}

    J = _Jacobian(condition, w, lam, fixed_point=fixed_point)
    want_residual = return_info if residual is None else bool(residual)
    if float(tree.norm(v)) == 0.0:  # L_V does not depend on w: only the direct term
        sol = _Solution(tree.zeros_like(v), 0, 0.0, True)
    else:
        sol = _solve(J, v, method, residual=want_residual)
    if J.double_vjp:
        sol.extra["double_vjp"] = 1.0
    indirect, used = J.mixed(sol.u)
    unused = [k for k in hparams if k not in used | direct_used]
    if unused:
        warnings.warn(f"hyperparameter(s) {unused} affect neither the condition nor L_V: their hypergradient "
                      "is zero", UnusedHyperparameterWarning, stacklevel=2)
    g = tree.sub(direct, indirect)
    result = {k: g[k].detach().to(dtype=hparams[k].dtype, device=hparams[k].device) for k in hparams}
    bad = tree.first_nonfinite(result)
    if bad is not None:
        raise HypergradientError(f"the hypergradient of {bad!r} is not finite ({type(method).__name__}); the "
                                 "Jacobian ∂F/∂w may be singular here, or the solver diverged")
    if not return_info:
        return result
    info = RootInfo(type(method).__name__, sol.iterations, J.vjps, J.jvps,
                    sol.residual if want_residual else None, sol.converged,
                    direct=tree.detach(direct), condition_norm=float(tree.norm(tree.detach(J.F))),
                    outer_loss=float(outer.detach()), extra=sol.extra)
    info.time_s = time.perf_counter() - t0
    return result, info
