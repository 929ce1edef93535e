r"""A hypergradient from first-order gradients only: the value-function penalty (F2SA, ScaleBiO).

Kwon et al. (2023, "A fully first-order method for stochastic bilevel optimization") and Pan et
al. (2024, ScaleBiO) replace the Hessian solve of the implicit function theorem by a second,
penalised training problem. For ``ε = 1/σ`` let

    w_ε(λ) = argmin_w  L_T(w, λ) + ε·L_V(w, λ),      V(ε, λ) = min_w  L_T(w, λ) + ε·L_V(w, λ).

**Why it works.** ``w_0 = w*``. Differentiating the optimality condition
``∂L_T/∂w + ε ∂L_V/∂w = 0`` in ``ε`` at ``ε = 0`` gives ``H·dw_ε/dε + v = 0``, so

    w_ε − w*  =  −ε H⁻¹v + O(ε²),        v = ∂L_V/∂w,   H = ∂²L_T/∂w∂wᵀ,

and a first-order difference of ``∇_λL_T`` along that displacement is the implicit term:

    σ (∇_λL_T(w*, λ) − ∇_λL_T(w_σ, λ))  =  (∂²L_T/∂λ∂wᵀ) H⁻¹v + O(1/σ)

(``w_σ`` is ``w_ε`` at ``ε = 1/σ``). Hence the **forward** estimate

    g_σ = ∂L_V/∂λ(w_σ, λ) − σ (∇_λL_T(w, λ) − ∇_λL_T(w_σ, λ))  =  dL_V/dλ + O(1/σ),

with ``w`` the given weights taken as ``w*``, as the implicit methods take them (F2SA runs a
second sequence of steps on ``L_T`` alone for ``w*``). With exact minimisers, by Danskin's
theorem, ``g_σ`` is ``∇_λ`` of ``(V(1/σ, λ) − V(0, λ))·σ``, a forward difference in ``ε``
of the value function, whose ``ε``-derivative at 0 is ``L_V(w*(λ), λ)``: the estimate is the
gradient of a surrogate that is ``O(1/σ)`` off the true objective. The **central** estimate
(``central=True``, the default) is the gradient of the central difference
``σ(V(1/σ) − V(−1/σ))/2``, with ``w_{±σ} = argmin L_T ± L_V/σ``:

    g_σ = ½(∂L_V/∂λ(w_{+σ}) + ∂L_V/∂λ(w_{−σ})) + (σ/2)(∇_λL_T(w_{+σ}) − ∇_λL_T(w_{−σ}))
        = dL_V/dλ + O(1/σ²).

**The minimisers** are found by ``steps`` gradient steps ``x ← x − lr·(∇_wL_T ± ∇_wL_V/σ)`` from the
given weights (or from ``w ∓ p/σ`` with ``p`` the previous call's, carried in the state). The
displacement is tracked apart from the weights, so that steps far below the weights' rounding
are not lost. After K steps from ``w = w*`` on a quadratic ``L_T``,
``σ(w − x_K) = lr Σ_{j<K} (I − lr·H)^j v + O(1/σ)``: the K-term Neumann series of
:class:`~hypergradients.Neumann` with ``α = lr``, so ``FirstOrder(steps=K, lr=α)`` tends to
``Neumann(iters=K, alpha=α)`` as ``σ → ∞`` (and ``steps=1`` to ``Identity(scale=lr)``), and to the
exact hypergradient as K grows too, for ``0 < lr < 2/λ_max(H)``. The implied
``p = σ(w − x_K)`` (central: ``σ(x_{−} − x_{+})/2``) is the state passed to the next call.

**Errors.** The bias is ``O(1/σ)`` (forward) or ``O(1/σ²)`` (central), plus the inner error of
K steps (the Neumann truncation), plus rounding: the difference ``∇_λL_T(x_+) − ∇_λL_T(x_-)`` of
two gradients at points ``~‖p‖/σ`` apart loses about ``σ·eps·‖w‖/‖p‖`` relative (``eps`` the
dtype's unit roundoff), as a finite difference does. Against the central bias ``~1/σ²`` that
balances near ``σ ~ eps^(−1/3)``, a few hundred in float32 (``eps ≈ 6e-8``, ``‖p‖ ~ ‖w‖``): the
default is ``1e3``; in float64 ``σ`` can be far larger (``1e4`` in the tests).

Where the given weights are **not** a minimum of the ``L_T`` given (a fresh minibatch, weights
still training: the gradient ``g = ∇_wL_T(w) ≠ 0``), the forward estimate's steps drift by
``−lr·K·g`` while its reference is the given ``w``, so the drift enters multiplied by ``σ``: an
error of ``~σ·‖g‖/‖v‖`` times the signal. The central estimate's two runs drift alike and the
drift cancels in their difference; use it (the default) in training loops
(:class:`~hypergradients.HyperOptimizer`, :func:`~hypergradients.fit`).

**Cost.** No second derivative at all: every product is a plain gradient, so ``L_T`` may contain
operations without a double backward (``@once_differentiable`` Functions, fused attention
kernels). Counted in ``info.extra``: ``inner_gradients`` (of ``L_T``), ``outer_gradients`` (of
``L_V``) and ``gradient_evals``, their sum. Forward, cold: ``2K + 2`` (``K + 1`` of ``L_T``,
``K + 1`` of ``L_V``: a run's first step shares the gradients at the given weights); central,
cold: ``4K + 2``. Warm-started, the runs start elsewhere and the first steps share nothing:
``2K + 3`` and ``4K + 5``. ``info.hvps`` is 0. An HVP costs about two gradient evaluations.

Randomness: every evaluation of either loss replays the random-number state found on entry (as
``hvp_mode="finite-difference"`` does), so a loss with dropout is one deterministic function of
the weights throughout; a mask drawn afresh at each evaluation would enter the difference
multiplied by ``σ``. Inside :func:`~hypergradients.distributed.data_parallel` every gradient is
the group mean (one all-reduce per evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import distributed, tree
from .derivatives import HvpMode, LossFn, _RngReplay, scalar_loss
from .errors import HypergradientError
from .implicit import report_unused
from .info import Info
from .method import Method, positive_int
from .state import KrylovState, SolverState
from .tree import Tree

__all__ = ["FirstOrder"]


class _Gradients:
    """Gradients of one loss, each from the random-number state found on entry; counted."""

    def __init__(self, fn: LossFn, name: str, lam: Tree, rng: _RngReplay) -> None:
        self.fn, self.name, self.lam, self.rng = fn, name, lam, rng
        self.count = 0
        self.used: set[str] = set()

    def __call__(
        self,
        x: Mapping[str, Tensor],
        *,
        wrt_w: bool,
        wrt_lam: bool,
        on_error: Callable[[HypergradientError], HypergradientError] | None = None,
    ) -> tuple[float, Tree | None, Tree | None]:
        """``(loss, ∇_w, ∇_λ)`` at ``(x, λ)``, the gradients asked for (group means)."""
        with self.rng.replay(), torch.enable_grad():
            w = tree.clone_leaves(x, requires_grad=wrt_w)
            lam = self.lam if wrt_lam else tree.detach(self.lam)
            try:
                loss = scalar_loss(self.fn, w, lam, name=self.name)
            except HypergradientError as e:
                raise (e if on_error is None else on_error(e)) from e
            inputs = (list(w.values()) if wrt_w else []) + (list(lam.values()) if wrt_lam else [])
            if not inputs:
                return float(loss.detach()), None, None
            self.count += 1
            raw = (
                torch.autograd.grad(loss, inputs, allow_unused=True)
                if loss.requires_grad
                else (None,) * len(inputs)
            )
        n = len(w) if wrt_w else 0
        out: list[Tree] = []
        if wrt_w:
            out.append(tree.as_tree(raw[:n], w))
        if wrt_lam:
            self.used |= {k for k, g in zip(lam, raw[n:], strict=True) if g is not None}
            out.append(tree.as_tree(raw[n:], lam))
        it = iter(distributed.average(out))
        gw = next(it) if wrt_w else None
        gl = next(it) if wrt_lam else None
        return float(loss.detach()), gw, gl


@dataclass(frozen=True)
class FirstOrder(Method):
    """``dL_V/dλ`` from first-order gradients only (value-function penalty; F2SA, Kwon et al. 2023;
    ScaleBiO, Pan et al. 2024): no Hessian-vector product, no double backward.

    ``steps`` gradient steps of size ``lr`` on ``L_T ± L_V/σ`` (``sigma``) from the given weights
    approach ``w_{±σ}``, the minimisers of the penalised training losses; the hypergradient is then
    a difference of ``∇_λL_T`` between them (``central=True``, the default, bias ``O(1/σ²)``) or
    between ``w_σ`` and the given weights (``central=False``, F2SA's estimate with the given weights
    as ``w*``, bias ``O(1/σ)``).
    The derivation, the errors and the cost are in :mod:`hypergradients.core.first_order`; in short:

    * forward: ``g = ∂L_V/∂λ(w_σ) − σ(∇_λL_T(w) − ∇_λL_T(w_σ))``, ``2·steps + 2`` gradient evaluations;
    * central: ``g = ½(∂L_V/∂λ(w_{+σ}) + ∂L_V/∂λ(w_{−σ})) + (σ/2)(∇_λL_T(w_{+σ}) − ∇_λL_T(w_{−σ}))``,
      ``4·steps + 2``;

    at ``w = w*`` both tend to ``Neumann(iters=steps, alpha=lr)`` as ``σ → ∞``. The forward form
    needs the given weights to be a minimum of the ``L_T`` given (its error grows as ``σ·‖∇_wL_T‖``);
    the central one does not multiply that error by ``σ``: it is the one for training loops, where
    ``L_T`` is a fresh minibatch's.

    It does not fit :class:`~hypergradients.ImplicitMethod`'s ``solve(op, v)``: it never forms a
    product with ``H`` or solves a system, and its mixed term is a difference of gradients, not
    ``(∂²L_T/∂λ∂wᵀ)p``; so it is its own :class:`~hypergradients.Method`. Like the implicit methods
    it differentiates the minimum (a step size or momentum that only shapes the path is refused).
    ``hypergradient``'s ``hvp_mode`` and ``residual`` do not apply (no products; ``info.residual``
    is ``None``).

    State: a :class:`~hypergradients.KrylovState` whose ``p`` is the implied ``σ(w − w_σ) ≈ H⁻¹v``;
    the next call starts its runs at ``w ∓ p/σ`` (``info.extra["warm_start"] = 1``), which after a
    small step of the weights and hyperparameters is already near ``w_{±σ}``. ``info.extra``:
    ``sigma``, ``inner_gradients``, ``outer_gradients``, ``gradient_evals``.
    """

    sigma: float = 1e3
    steps: int = 10
    lr: float = 0.1
    central: bool = True

    state_type: ClassVar[type[SolverState]] = KrylovState

    def __post_init__(self) -> None:
        for name, x in (("sigma", self.sigma), ("lr", self.lr)):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (x > 0 and math.isfinite(x)):
                raise HypergradientError(f"FirstOrder.{name} must be a finite number > 0, got {x!r}")
        positive_int("FirstOrder.steps", self.steps)
        if not isinstance(self.central, bool):
            raise HypergradientError(f"FirstOrder.central must be True or False, got {self.central!r}")

    def compute(
        self,
        outer_loss: LossFn,
        inner_loss: LossFn,
        params: Mapping[str, Tensor],
        lam: Tree,
        *,
        state: SolverState | None,
        residual: bool,
        hvp_mode: HvpMode,
    ) -> tuple[Tree, Info]:
        del residual, hvp_mode  # no products, no linear system
        st = self.own_state(state)
        assert isinstance(st, KrylovState)
        name = type(self).__name__
        w = tree.detach(params)
        p0 = st.warm_start(w, method=name)
        rng = _RngReplay(list(w.values()))
        inner = _Gradients(inner_loss, "inner_loss", lam, rng)
        outer = _Gradients(outer_loss, "outer_loss", lam, rng)
        sigma = float(self.sigma)
        signs = (1.0, -1.0) if self.central else (1.0,)

        # At the given weights: ∇_wL_T (the first step's, and info.grad_norm) with, for the forward
        # form, the reference ∇_λL_T(w); ∇_wL_V where a run starts there.
        _, gT_w, gT_lam = inner(w, wrt_w=True, wrt_lam=not self.central)
        assert gT_w is not None
        if p0 is None:
            out_w, gV_w, _ = outer(w, wrt_w=True, wrt_lam=False)
        else:
            out_w, gV_w, _ = outer(w, wrt_w=False, wrt_lam=False)

        ends: list[tuple[Tree, Tree, Tree]] = []  # per run: displacement, ∇_λL_T, ∇_λL_V at its end
        for s in signs:
            d = tree.zeros_like(w) if p0 is None else tree.scale(p0, -s / sigma)
            for k in range(self.steps):
                gT: Tree | None
                gV: Tree | None
                if k == 0 and p0 is None:
                    gT, gV = gT_w, gV_w
                else:
                    x = tree.add(w, d)
                    _, gT, _ = inner(x, wrt_w=True, wrt_lam=False, on_error=self._diverged(k))
                    _, gV, _ = outer(x, wrt_w=True, wrt_lam=False, on_error=self._diverged(k))
                assert gT is not None and gV is not None
                step = tree.axpy(s / sigma, gV, gT)
                if not tree.all_finite(step):
                    raise self._diverged(k)(None)
                d = tree.axpy(-float(self.lr), step, d)
            x = tree.add(w, d)
            _, _, lT = inner(x, wrt_w=False, wrt_lam=True, on_error=self._diverged(self.steps))
            _, _, lV = outer(x, wrt_w=False, wrt_lam=True, on_error=self._diverged(self.steps))
            assert lT is not None and lV is not None
            ends.append((d, lT, lV))

        if self.central:
            (d_p, lT_p, lV_p), (d_m, lT_m, lV_m) = ends
            direct = {k: 0.5 * (lV_p[k] + lV_m[k]) for k in lam}
            g = {k: direct[k] + (0.5 * sigma) * (lT_p[k] - lT_m[k]) for k in lam}
            p = {k: (0.5 * sigma) * (d_m[k] - d_p[k]) for k in w}
        else:
            ((d_p, lT_p, lV_p),) = ends
            assert gT_lam is not None
            direct = lV_p
            g = {k: direct[k] - sigma * (gT_lam[k] - lT_p[k]) for k in lam}
            p = {k: -sigma * d_p[k] for k in w}
        report_unused(lam, inner.used | outer.used, method=name, implicit_minimum=True, condition="L_T")
        extra = {
            "sigma": sigma,
            "inner_gradients": float(inner.count),
            "outer_gradients": float(outer.count),
            "gradient_evals": float(inner.count + outer.count),
        }
        if p0 is not None:
            extra["warm_start"] = 1.0
        grad_norm = float(tree.norm(gT_w))
        info = Info(
            name,
            self.steps,
            0,
            None,
            None,
            direct=tree.detach(direct),
            outer_loss=out_w,
            extra=extra,
            state=st.replace(p=tree.detach(p)),
            grad_norm=grad_norm,
            condition_norm=grad_norm,
        )
        return g, info

    def _diverged(self, k: int) -> Callable[[HypergradientError | None], HypergradientError]:
        def error(cause: HypergradientError | None) -> HypergradientError:
            why = "" if cause is None else f" ({cause})"
            return HypergradientError(
                f"hg.FirstOrder: the gradient steps on L_T ± L_V/σ became non-finite at step {k}{why}: "
                f"lr={self.lr:g} is too large for this loss (the steps need lr < 2/λ_max(H)); lower lr"
            )

        return error
