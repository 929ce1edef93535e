"""How the optimization path fits into the implicit derivation, shown with numbers.

On a solved problem (``w*`` to rounding, exact IFT hypergradient ``g*`` by a dense solve) with
``α = alpha_scale/λ_max(H)``, :func:`explain` measures:

1. **The theorem** (Lorraine et al. 2020, Thm. 2): K steps of gradient descent started *at*
   ``w*``, differentiated in reverse mode (``Unrolled(steps=K, lr=α)``), against the K-term
   Neumann hypergradient ``−(∂²L_T/∂λ∂wᵀ) α Σ_{j<K}(I − αH)^j ∂L_V/∂w`` (``Neumann(iters=K,
   alpha=α)``). At ``w*`` every iterate equals ``w*``, so the recurrence
   ``∂w_{k+1}/∂λ = (I − αH) ∂w_k/∂λ − α ∂²L_T/∂w∂λ`` unrolls into exactly that sum: the two agree
   to rounding (``theorem_max_rel_diff``), and both tend to ``g*`` as K grows.
2. **Cold start**: the same unrolling from ``w₀ = 0``. Now ``w_k ≠ w*`` and ``H_k ≠ H``; the
   hypergradient reaches ``g*`` only once the path has converged (``cold_start_cosine``).
3. **Truncated unrolling** (Shaban et al. 2019) from ``w₀ = 0``: K steps, only the last T
   differentiated. Once ``w_{K−T} ≈ w*`` it *is* the T-term Neumann hypergradient, so it tends
   to that (biased) value, not to ``g*`` (``truncated_cosine``, limit ``neumann_T_cosine``).
4. **The mistaken derivation** (``mistaken_cosine``): treating ``w_K = w₀ − α Σ_k ∂L_T/∂w(w_k, λ)``
   as a sum of path gradients and differentiating each term with ``w_k`` held fixed, i.e.
   ``∂w_K/∂λ ≈ −α Σ_k ∂²L_T/∂w∂λ(w_k)``: the ``(I − αH_k)`` factors are lost, and with them
   ``H⁻¹``. From ``w*`` this is K times the one-term Neumann hypergradient (direction fixed,
   length growing ∝ K).
5. **A learning-rate hyperparameter**: ``w*`` does not depend on the step size, so the implicit
   methods refuse it (:class:`hypergradients.PathOnlyHyperparameterError`); unrolling gives a
   real hypergradient (``Unrolled(lr="lr")``), checked here by central finite differences of
   ``α ↦ L_V(w_K(α))``. Started at ``w*`` it is zero: the path does not move.

Everything is computed through the public :func:`hypergradients.hypergradient`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import hypergradients as hg

from ...core import tree
from ...core.tree import Tree
from ...paths import optim
from ..config import Config, Option, resolve, setting, settings
from ..progress import Progress as ProgressBar
from .base import Experiment, ExperimentResult, RunContext, check_settings, with_threads
from .problems import BilevelProblem, cosine, load_problem, rel_dist
from .shared import begin, finish

Progress = Callable[[int], None]


# ------------------------------------------------------------------------------- the settings
STEPS = [1, 3, 10, 30, 100, 300, 1000]
SCHEMA: dict[str, Option] = {
    "problem": Option(
        "breast-cancer",
        "bundled dataset (breast-cancer: 30 features, binary; digits: 64 features, 10 classes, softmax)",
        str,
        choices=("breast-cancer", "digits"),
    ),
    "n_train": Option(
        "auto",
        "training examples ('auto': 300 for breast-cancer, all of digits' split)",
        int,
        low=2,
        auto=True,
    ),
    "decay.low": Option(
        1e-3, "smallest per-weight decay drawn (log-uniform in [low, high])", float, positive=True
    ),
    "decay.high": Option(1e-1, "largest per-weight decay drawn", float, positive=True),
    "seed": Option(0, "data split and weight-decay draw", int),
    "threads": Option(1, "torch's CPU threads (these problems are too small to gain from more)", int, low=1),
    "figures": Option(
        True,
        "write explain_cosine.png, explain_theorem.png, explain_optimizers.png and explain_noise.png",
        bool,
    ),
    "alpha_scale": Option(1.0, "step size α = alpha_scale/λ_max(H), in (0, 2)", float, positive=True),
    "theorem.steps": Option(
        STEPS,
        "K for the theorem check: unrolled from w* against K-term Neumann",
        list,
        item=int,
        low=1,
        nonempty=True,
    ),
    "cold.steps": Option(
        STEPS,
        "K for cold-start, truncated and mistaken unrolling from w_0 = 0",
        list,
        item=int,
        low=1,
        nonempty=True,
    ),
    "cold.truncate": Option(10, "T: the steps differentiated by truncated unrolling", int, low=1),
    "lr.steps": Option(100, "unrolled steps for the learning-rate hypergradient", int, low=1),
    "momentum.beta": Option(
        0.9, "heavy-ball momentum β (with α = alpha_scale/λ_max), in [0, 1)", float, low=0.0
    ),
    "momentum.steps": Option(
        [1, 5, 10, 50, 100, 300, 1000],
        "K for heavy-ball unrolled from w* against its polynomial",
        list,
        item=int,
        low=1,
        nonempty=True,
    ),
    "adam.lr": Option(
        0.1, "Adam's learning rate (the warm-up run and the unrolled steps from w*)", float, positive=True
    ),
    "adam.b1": Option(0.9, "Adam's β₁, in [0, 1)", float, low=0.0),
    "adam.b2": Option(0.999, "Adam's β₂, in [0, 1)", float, low=0.0),
    "adam.eps": Option(1e-8, "Adam's ε", float, positive=True),
    "adam.warm_steps": Option(
        1000, "full-batch Adam steps from w_0 = 0 whose second moment v is kept", int, low=1
    ),
    "adam.steps": Option(
        [1, 10, 100, 300, 1000],
        "K for Adam unrolled from w* with the warm v",
        list,
        item=int,
        low=1,
        nonempty=True,
    ),
    "adam.zero_steps": Option(
        [1, 2, 3, 5, 10],
        "K for Adam unrolled from w* with v = 0 (a fresh state)",
        list,
        item=int,
        low=1,
        nonempty=True,
    ),
    "noise.orders": Option(20, "random minibatch orders per batch size", int, low=2),
    "noise.batch_sizes": Option(
        [10, 30, 100], "minibatch sizes for SGD from w*", list, item=int, low=1, nonempty=True
    ),
    "noise.steps": Option([10, 30, 100], "K for minibatch SGD from w*", list, item=int, low=1, nonempty=True),
}
# Every part, in a few seconds (--smoke; ExplainConfig.smoke()).
SMOKE: dict[str, Any] = {
    "theorem.steps": [1, 10, 100],
    "cold.steps": [1, 10, 100, 300],
    "lr.steps": 20,
    "momentum.steps": [1, 5, 50],
    "adam.warm_steps": 300,
    "adam.steps": [1, 10, 100],
    "adam.zero_steps": [1, 2, 3],
    "noise.orders": 5,
    "noise.batch_sizes": [10, 100],
    "noise.steps": [10, 30],
}


@dataclass(frozen=True)
class ExplainConfig:
    """Settings of :func:`explain`, each read from :data:`SCHEMA` (defaults: the full run; :meth:`smoke`:
    the tests' small one).

    ``theorem_steps``: the K of part 1; ``cold_steps``: the K of parts 2 and 3; ``truncate``: T;
    ``lr_steps``: K of part 4; ``alpha_scale``: ``α·λ_max``, in ``(0, 2)`` for convergence.
    """

    problem: str = setting(SCHEMA, "problem")
    n_train: int | None = setting(SCHEMA, "n_train")
    seed: int = setting(SCHEMA, "seed")
    decay: tuple[float, float] = setting(SCHEMA, "decay.low", "decay.high")
    theorem_steps: tuple[int, ...] = setting(SCHEMA, "theorem.steps")
    cold_steps: tuple[int, ...] = setting(SCHEMA, "cold.steps")
    truncate: int = setting(SCHEMA, "cold.truncate")
    lr_steps: int = setting(SCHEMA, "lr.steps")
    alpha_scale: float = setting(SCHEMA, "alpha_scale")
    momentum_beta: float = setting(SCHEMA, "momentum.beta")
    momentum_steps: tuple[int, ...] = setting(SCHEMA, "momentum.steps")
    adam_lr: float = setting(SCHEMA, "adam.lr")
    adam_b1: float = setting(SCHEMA, "adam.b1")
    adam_b2: float = setting(SCHEMA, "adam.b2")
    adam_eps: float = setting(SCHEMA, "adam.eps")
    adam_warm_steps: int = setting(SCHEMA, "adam.warm_steps")
    adam_steps: tuple[int, ...] = setting(SCHEMA, "adam.steps")
    adam_zero_steps: tuple[int, ...] = setting(SCHEMA, "adam.zero_steps")
    noise_orders: int = setting(SCHEMA, "noise.orders")
    noise_batch_sizes: tuple[int, ...] = setting(SCHEMA, "noise.batch_sizes")
    noise_steps: tuple[int, ...] = setting(SCHEMA, "noise.steps")

    @classmethod
    def smoke(cls, **overrides: Any) -> ExplainConfig:
        """The ``--smoke`` configuration (:data:`SMOKE`: a few seconds, every part), with ``overrides``."""
        return settings(cls, SCHEMA, resolve(SCHEMA, smoke=SMOKE), **overrides)

    def validate(self) -> None:
        for name in (
            "theorem_steps",
            "cold_steps",
            "momentum_steps",
            "adam_steps",
            "adam_zero_steps",
            "noise_steps",
            "noise_batch_sizes",
        ):
            ks = getattr(self, name)
            if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
                raise hg.HypergradientError(
                    f"{name} must be a non-empty list of positive integers, got {ks!r}"
                )
        for name in ("truncate", "lr_steps", "adam_warm_steps"):
            k = getattr(self, name)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise hg.HypergradientError(f"{name} must be a positive integer, got {k!r}")
        if not 0 < self.alpha_scale < 2:
            raise hg.HypergradientError(
                f"alpha_scale={self.alpha_scale} puts α = alpha_scale/λ_max outside (0, 2/λ_max), where "
                "gradient descent and the Neumann series diverge; use a value in (0, 2), e.g. 1"
            )
        for name in ("momentum_beta", "adam_b1", "adam_b2"):
            b = getattr(self, name)
            if not 0 <= b < 1:
                raise hg.HypergradientError(
                    f"{name}={b} must be in [0, 1): a momentum or moment decay of 1 or more never forgets "
                    "and the recurrence does not converge; use e.g. 0.9"
                )
        for name in ("adam_lr", "adam_eps"):
            x = getattr(self, name)
            if not (x > 0 and math.isfinite(x)):
                raise hg.HypergradientError(f"{name}={x} must be a finite number > 0")
        orders = self.noise_orders
        if isinstance(orders, bool) or not isinstance(orders, int) or orders < 2:
            raise hg.HypergradientError(
                f"noise_orders must be an integer >= 2 (a spread needs two orders), got {self.noise_orders!r}"
            )

    def cost(self) -> int:
        """Work units (unrolled steps or HVPs) :func:`explain` reports to its progress callback."""
        theorem = 2 * sum(self.theorem_steps)
        cold = 2 * sum(self.cold_steps) + sum(k for k in self.cold_steps if k >= self.truncate)
        per_order = max(self.noise_steps) + sum(self.noise_steps)
        noise = self.noise_orders * len(self.noise_batch_sizes) * per_order
        beyond = (
            3 * sum(self.momentum_steps)
            + 2 * sum(self.adam_zero_steps)
            + self.adam_warm_steps // 4
            + 2 * max(self.adam_steps)
            + noise
        )
        return theorem + cold + 5 * self.lr_steps + beyond


@dataclass
class ExplainResult:
    """What :func:`explain` measured; :meth:`to_json` is the content of ``explain.json``."""

    config: ExplainConfig
    problem: dict[str, object]
    alpha: float
    theorem: list[dict[str, float]]
    cold_start: list[dict[str, float]]
    truncated: list[dict[str, float]]
    mistaken: list[dict[str, float]]
    neumann_T_cosine: float
    learning_rate: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    momentum: dict[str, Any] = field(default_factory=dict)
    adam: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] = field(default_factory=dict)

    @property
    def theorem_max_rel_diff(self) -> float:
        return max(r["rel_diff"] for r in self.theorem)

    def to_json(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "config": cfg,
            "problem": self.problem,
            "alpha": self.alpha,
            "theorem_max_rel_diff": self.theorem_max_rel_diff,
            "neumann_cosine": [[r["K"], r["cosine"]] for r in self.theorem],
            "cold_start_cosine": [[r["K"], r["cosine"]] for r in self.cold_start],
            "truncated_cosine": [[r["K"], r["cosine"]] for r in self.truncated],
            "truncate": self.config.truncate,
            "neumann_T_cosine": self.neumann_T_cosine,
            "mistaken_cosine": [[r["K"], r["cosine"]] for r in self.mistaken],
            "theorem": self.theorem,
            "cold_start": self.cold_start,
            "truncated": self.truncated,
            "mistaken": self.mistaken,
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
            "adam": self.adam,
            "noise": self.noise,
            "timings_s": self.timings,
        }


def _grad_norm(prob: BilevelProblem, w: Tree) -> float:
    wr = tree.clone_leaves(w, requires_grad=True)
    g = torch.autograd.grad(prob.inner_loss(wr, prob.hparams), list(wr.values()))
    return float(tree.norm(tree.as_tree(g, wr)))


def run_gd(prob: BilevelProblem, w0: Tree, hparams: Tree, *, lr: float, steps: int) -> Tree:
    """``steps`` plain gradient-descent steps ``w ← w − lr ∂L_T/∂w`` (no graph kept)."""
    w = tree.detach(w0)
    for _ in range(steps):
        wr = tree.clone_leaves(w, requires_grad=True)
        g = torch.autograd.grad(prob.inner_loss(wr, hparams), list(wr.values()))
        w = {k: (wr[k] - lr * gk).detach() for k, gk in zip(wr, g, strict=True)}
    return w


def theorem_check(
    prob: BilevelProblem, alpha: float, steps: tuple[int, ...], *, progress: Progress | None = None
) -> list[dict[str, float]]:
    """Part 1: ``Unrolled(K, α)`` from ``w*`` vs ``Neumann(K, α)``, and both vs the exact ``g*``."""
    rows = []
    for K in steps:
        t0 = time.perf_counter()
        gu, info = hg.hypergradient(
            prob.outer_loss,
            prob.inner_loss,
            prob.params,
            prob.hparams,
            method=hg.Unrolled(steps=K, lr=alpha),
            return_info=True,
        )
        t1 = time.perf_counter()
        gn, ninfo = hg.hypergradient(
            prob.outer_loss,
            prob.inner_loss,
            prob.params,
            prob.hparams,
            method=hg.Neumann(iters=K, alpha=alpha),
            residual=False,
            return_info=True,
        )
        t2 = time.perf_counter()
        assert info.final_params is not None
        rows.append(
            {
                "K": K,
                "rel_diff": rel_dist(gu, gn),
                "cosine": cosine(gn, prob.exact),
                "rel_dist": rel_dist(gn, prob.exact),
                "unrolled_cosine": cosine(gu, prob.exact),
                "weight_drift": rel_dist(info.final_params, prob.params),
                "neumann_hvps": ninfo.hvps,
                "unrolled_s": t1 - t0,
                "neumann_s": t2 - t1,
            }
        )
        if progress:
            progress(2 * K)
    return rows


def cold_start(
    prob: BilevelProblem,
    alpha: float,
    steps: tuple[int, ...],
    *,
    truncate: int | None = None,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Parts 2–3: ``Unrolled(K, α, truncate)`` from ``w₀ = 0`` against ``g*`` (K < T skipped)."""
    rows = []
    for K in steps:
        if truncate is not None and K < truncate:
            continue
        t0 = time.perf_counter()
        g, info = hg.hypergradient(
            prob.outer_loss,
            prob.inner_loss,
            prob.zeros(),
            prob.hparams,
            method=hg.Unrolled(steps=K, lr=alpha, truncate=truncate),
            return_info=True,
        )
        assert info.final_params is not None
        rows.append(
            {
                "K": K,
                "cosine": cosine(g, prob.exact),
                "rel_dist": rel_dist(g, prob.exact),
                "weight_rel_err": rel_dist(info.final_params, prob.params),
                "grad_norm": _grad_norm(prob, info.final_params),
                "time_s": time.perf_counter() - t0,
            }
        )
        if progress:
            progress(K)
    return rows


def mistaken_hypergradient(prob: BilevelProblem, w0: Tree, alpha: float, steps: int) -> Tree:
    """``∂L_V/∂λ − α Σ_{k<K} (∂²L_T/∂λ∂wᵀ)(w_k) ∂L_V/∂w(w_K)``: the path-gradient-sum mistake.

    The iterates ``w_k`` are those of real gradient descent from ``w0``; the error is only in
    the derivative, which drops every ``H_k J_k`` term of the true recurrence. One mixed
    vector-Jacobian product per step, by autograd.
    """
    lam = tree.clone_leaves(prob.hparams, requires_grad=True)
    path = [tree.detach(w0)]
    for _ in range(steps):
        path.append(run_gd(prob, path[-1], prob.hparams, lr=alpha, steps=1))
    wK = tree.clone_leaves(path[-1], requires_grad=True)
    out = prob.outer_loss(wK, lam)
    raw = torch.autograd.grad(out, list(wK.values()) + list(lam.values()), allow_unused=True)
    v = tree.as_tree(raw[: len(wK)], wK)
    g = tree.as_tree(raw[len(wK) :], lam)  # the direct term (zero for these problems)
    for wk in path[:-1]:
        w = tree.clone_leaves(wk, requires_grad=True)
        gw = torch.autograd.grad(prob.inner_loss(w, lam), list(w.values()), create_graph=True)
        mixed = torch.autograd.grad(gw, list(lam.values()), grad_outputs=[v[k] for k in w], allow_unused=True)
        g = tree.axpy(-alpha, tree.as_tree(mixed, lam), g)
    return tree.detach(g)


def learning_rate_section(
    prob: BilevelProblem, alpha: float, steps: int, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Part 4: the step size as a hyperparameter ``"lr"``.

    The finite-difference check is central, ``(f(α+ε) − f(α−ε))/2ε`` of ``f(α) = L_V(w_K(α))``
    with ``ε = 1e-5·α``: truncation error ``O(ε²)`` ≈ 1e-10 relative and rounding ≈
    ``1e-16/1e-5`` ≈ 1e-11 relative, so agreement to ~1e-8 is what a correct derivative shows.
    """
    hp = {**prob.hparams, "lr": torch.tensor(alpha, dtype=torch.float64)}
    refused: dict[str, str] = {}
    implicit = (hg.Exact(), hg.CG(), hg.Neumann(iters=10, alpha=alpha), hg.Identity(), hg.Nystrom(rank=2))
    for m in implicit:
        try:
            hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, hp, method=m, residual=False)
        except hg.PathOnlyHyperparameterError as e:
            refused[type(m).__name__] = str(e)
        else:  # pragma: no cover - would be a bug in the core
            raise AssertionError(f"{type(m).__name__} accepted a path-only hyperparameter")
    g_cold = hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.zeros(), hp, method=hg.Unrolled(steps=steps, lr="lr")
    )
    g_opt = hg.hypergradient(
        prob.outer_loss, prob.inner_loss, prob.params, hp, method=hg.Unrolled(steps=steps, lr="lr")
    )
    if progress:
        progress(2 * steps)
    eps = 1e-5 * alpha

    def f(a: float) -> float:
        w = run_gd(prob, prob.zeros(), prob.hparams, lr=a, steps=steps)
        return float(prob.outer_loss(w, prob.hparams))

    fd = (f(alpha + eps) - f(alpha - eps)) / (2 * eps)
    if progress:
        progress(2 * steps)
    val_cold = f(alpha)
    if progress:
        progress(steps)
    lr_cold = float(g_cold["lr"])
    return {
        "lr": alpha,
        "steps": steps,
        "refused_by": refused,
        "unrolled_cold_start": lr_cold,
        "finite_difference": fd,
        "fd_eps": eps,
        "fd_rel_err": abs(lr_cold - fd) / max(abs(fd), 1e-300),
        "outer_loss_after_K": val_cold,
        "outer_loss_at_w_star": float(prob.outer_loss(prob.params, prob.hparams)),
        "unrolled_from_optimum": float(g_opt["lr"]),
        "log_weight_decay_cosine_cold_start": cosine(
            {"log_weight_decay": g_cold["log_weight_decay"]}, prob.exact
        ),
    }


# ------------------------------------------------------------------ beyond plain gradient descent
def unroll_optimizer(
    prob: BilevelProblem,
    opt: optim.Optimizer,
    state: Any,
    w0: Tree,
    steps: int,
    *,
    batches: list[Tensor] | None = None,
    record: tuple[int, ...] | None = None,
) -> tuple[dict[int, Tree], Tree]:
    """Reverse mode through ``steps`` steps of the library optimizer ``opt`` (``hg.optim``) from ``w0``.

    ``w0`` and the optimizer ``state`` are constants w.r.t. λ (as for :class:`hypergradients.Unrolled`);
    ``batches[k]`` holds the training rows of step k (``None``: full batch). One forward sweep with
    the graph kept; ``dL_V(w_K)/dλ`` for every K in ``record`` (default: ``steps`` only) by one
    backward sweep each. Returns ``({K: hypergradient}, w_steps)``.
    """
    want = set(record or (steps,))
    lam = tree.clone_leaves(prob.hparams, requires_grad=True)
    w = tree.clone_leaves(w0, requires_grad=True)
    out: dict[int, Tree] = {}
    for k in range(1, steps + 1):
        if batches is None:
            loss = prob.inner_loss(w, lam)
        else:
            assert prob.batch_loss is not None
            loss = prob.batch_loss(w, lam, batches[k - 1])
        g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w, state = opt.update(dict(zip(w, g, strict=True)), state, w, {})
        if k in want:
            val = prob.outer_loss(w, lam)
            out[k] = tree.as_tree(torch.autograd.grad(val, list(lam.values()), retain_graph=k < steps), lam)
    return out, tree.detach(w)


def library_unrolled(
    prob: BilevelProblem, opt: optim.Optimizer, steps: int, *, batches: list[Tensor] | None = None
) -> tuple[Tree, Tree]:
    """``hg.hypergradient`` with ``hg.Unrolled(steps, optimizer=opt, batches=batches)`` from ``w*``:
    ``(hypergradient, w_K)``. With ``batches`` the inner loss is ``prob.batch_loss(w, λ, rows)``."""
    inner: Any = prob.inner_loss if batches is None else prob.batch_loss
    g, info = hg.hypergradient(
        prob.outer_loss,
        inner,
        prob.params,
        prob.hparams,
        return_info=True,
        method=hg.Unrolled(steps=steps, optimizer=opt, batches=batches),
    )
    assert info.final_params is not None
    return g, info.final_params


def lucas_u(r1: Tensor, r2: Tensor, n: int) -> Tensor:
    """``U_n = Σ_{j<n} r1^j r2^{n−1−j}`` entrywise: ``(r1ⁿ − r2ⁿ)/(r1 − r2)``, ``n·r^{n−1}`` at a double root.

    The sum form has no ``0/0`` where the two characteristic roots meet (as they do at both ends of
    the spectrum for the optimal heavy-ball parameters), so it is accurate to rounding there too.
    """
    if n == 0:
        return torch.zeros_like(r1)
    p1 = torch.cumprod(torch.stack([torch.ones_like(r1)] + [r1] * (n - 1)), dim=0)  # r1^0 … r1^{n−1}
    p2 = torch.cumprod(torch.stack([torch.ones_like(r2)] + [r2] * (n - 1)), dim=0)
    return (p1 * p2.flip(0)).sum(dim=0)


def _roots(p: Tensor, q: Tensor | float) -> tuple[Tensor, Tensor]:
    """Roots of ``r² − p r + q = 0`` (complex128), entrywise."""
    x = p.to(torch.complex128)
    s = torch.sqrt(x * x - 4 * q)
    return (x + s) / 2, (x - s) / 2


def characteristic_roots(h: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """Roots of ``r² − (1 + β − αh) r + β = 0`` (complex128), one pair per entry of ``h``."""
    return _roots(1 + beta - alpha * h, beta)


def nesterov_roots(h: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """Roots of ``r² − (1 + β)(1 − αh) r + β(1 − αh) = 0``: Nesterov's recurrence, per entry of ``h``."""
    return _roots((1 + beta) * (1 - alpha * h), beta * (1 - alpha * h))


def nesterov_polynomial(h: Tensor, steps: int, alpha: float, beta: float) -> Tensor:
    """``P_K(h)`` of K Nesterov steps (``torch.optim.SGD(nesterov=True)``) from ``w*`` with zero velocity.

    The step ``b ← βb + g``, ``w ← w − α(g + βb)`` from ``b₀ = 0`` is ``w_{k+1} = w_k + β(w_k − w_{k−1})
    − α(1 + β)g_k + αβ g_{k−1}`` for k ≥ 1; its tangent from ``w*`` is ``J_K = −P_K(H) M`` with
    ``P_1 = α(1 + β)``, ``P_0 = 0`` and ``P_{k+1} = (1 + β)(1 − αh)P_k − β(1 − αh)P_{k−1} + α``: fixed
    point ``1/h``, characteristic roots :func:`nesterov_roots` (product ``q = β(1 − αh)``), so

        P_K(h) = 1/h + (α(1 + β) − 1/h) U_K + q U_{K−1}/h.
    """
    r1, r2 = nesterov_roots(h, alpha, beta)
    q = beta * (1 - alpha * h)
    u_k, u_km1 = lucas_u(r1, r2, steps), lucas_u(r1, r2, steps - 1)
    return (1 / h + (alpha * (1 + beta) - 1 / h) * u_k + q * u_km1 / h).real


def heavy_ball_polynomial(h: Tensor, steps: int, alpha: float, beta: float) -> Tensor:
    """``P_K(h)`` of K heavy-ball steps from ``w*`` with zero velocity, per eigenvalue ``h > 0``.

    The tangent ``J_k = ∂w_k/∂λ`` obeys ``J_{k+1} = (1 + β)J_k − βJ_{k−1} − α(HJ_k + M)``,
    ``J_0 = J_{−1} = 0``, so ``J_K = −P_K(H) M`` with ``P_{k+1} = (1 + β − αh)P_k − βP_{k−1} + α``.
    Its fixed point is ``1/h``; the error ``P_k − 1/h`` solves the homogeneous recurrence with roots
    ``r₁, r₂`` (:func:`characteristic_roots`), which gives the closed form

        P_K(h) = (1 − U_{K+1} + β U_K) / h,    U_n = (r₁ⁿ − r₂ⁿ)/(r₁ − r₂)   (:func:`lucas_u`).

    ``β = 0`` is Neumann's ``α Σ_{j<K} (1 − αh)^j``.
    """
    r1, r2 = characteristic_roots(h, alpha, beta)
    return ((1 - lucas_u(r1, r2, steps + 1) + beta * lucas_u(r1, r2, steps)) / h).real


def heavy_ball_rate(h: Tensor, alpha: float, beta: float, *, nesterov: bool = False) -> float:
    """``max |r|`` over the characteristic roots: the error of ``P_K`` decays like this to the K."""
    r1, r2 = (nesterov_roots if nesterov else characteristic_roots)(h, alpha, beta)
    return float(torch.maximum(r1.abs(), r2.abs()).max())


def _flat_grad(loss: Tensor, w: Tree) -> Tensor:
    return tree.flatten(tree.as_tree(torch.autograd.grad(loss, list(w.values())), w))


def _at_optimum(prob: BilevelProblem) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(eigenvalues of H, eigenvectors, v = ∂L_V/∂w, M = ∂²L_T/∂w∂λᵀ dense)`` at ``w*``.

    ``M`` by one vector-Jacobian product per weight (31 here): the problem's structure is not assumed.
    """
    ev, Q = torch.linalg.eigh(prob.hessian)
    w = tree.clone_leaves(prob.params, requires_grad=True)
    v = _flat_grad(prob.outer_loss(w, prob.hparams), w)
    lam = tree.clone_leaves(prob.hparams, requires_grad=True)
    gw = tree.flatten(
        tree.as_tree(torch.autograd.grad(prob.inner_loss(w, lam), list(w.values()), create_graph=True), w)
    )
    rows = [
        tree.flatten(tree.as_tree(torch.autograd.grad(gw[i], list(lam.values()), retain_graph=True), lam))
        for i in range(gw.numel())
    ]
    return ev, Q, v, torch.stack(rows)


def momentum_section(
    prob: BilevelProblem,
    alpha: float,
    beta: float,
    steps: tuple[int, ...],
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Part 6: heavy-ball momentum from ``w*`` with zero velocity, against its polynomial and ``g*``.

    Library: ``hg.Unrolled(optimizer=hg.optim.heavy_ball(lr=α, momentum=β))`` (:func:`library_unrolled`),
    and the same with the optimal pair for the spectrum ``α* = 4/(√L + √μ)²``, ``β* = ((√κ − 1)/(√κ + 1))²``.
    Closed form: ``−Mᵀ P_K(H) v`` by :func:`heavy_ball_polynomial` on the eigenvalues of the dense H.
    """
    ev, Q, v, M = _at_optimum(prob)
    exact = tree.flatten(prob.exact)
    L, mu = float(ev[-1]), float(ev[0])
    kappa = L / mu
    a_opt = 4.0 / (math.sqrt(L) + math.sqrt(mu)) ** 2
    b_opt = ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2

    def poly(K: int, a: float, b: float) -> Tensor:
        return -(M.T @ (Q @ (heavy_ball_polynomial(ev, K, a, b) * (Q.T @ v))))

    def dist(g: Tensor) -> float:
        return float((g - exact).norm() / exact.norm())

    b_nes = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)  # Nesterov's pair for α = 1/L

    def nes(K: int) -> Tensor:
        return -(M.T @ (Q @ (nesterov_polynomial(ev, K, 1 / L, b_nes) * (Q.T @ v))))

    cases = (
        ("", optim.heavy_ball(lr=alpha, momentum=beta), lambda K: poly(K, alpha, beta)),
        ("optimal_", optim.heavy_ball(lr=a_opt, momentum=b_opt), lambda K: poly(K, a_opt, b_opt)),
        ("nesterov_", optim.nesterov(lr=1 / L, momentum=b_nes), nes),
    )
    rows: list[dict[str, float]] = [{"K": K} for K in steps]
    for name, opt, closed in cases:
        for row, K in zip(rows, steps, strict=True):
            g, ref = tree.flatten(library_unrolled(prob, opt, K)[0]), closed(K)
            row[f"{name}rel_diff"] = float((g - ref).norm() / ref.norm())
            row[f"{name}rel_dist"] = dist(g)
            row[f"{name}cosine"] = cosine({"g": g}, {"g": exact})
        if progress:
            progress(sum(steps))
    for row, K in zip(rows, steps, strict=True):
        row["neumann_rel_dist"] = dist(poly(K, alpha, 0.0))
    decades = math.ceil(math.log10(max(steps)))
    grid = sorted({max(1, round(10 ** (e / 10))) for e in range(0, 10 * decades + 1)} | set(steps))
    grid = [K for K in grid if K <= max(steps)]
    curves = {
        "K": grid,
        "neumann": [dist(poly(K, alpha, 0.0)) for K in grid],
        "heavy_ball": [dist(poly(K, alpha, beta)) for K in grid],
        "heavy_ball_optimal": [dist(poly(K, a_opt, b_opt)) for K in grid],
        "nesterov": [dist(nes(K)) for K in grid],
    }
    return {
        "alpha": alpha,
        "beta": beta,
        "alpha_opt": a_opt,
        "beta_opt": b_opt,
        "kappa": kappa,
        "rate_neumann": heavy_ball_rate(ev, alpha, 0.0),
        "rate_heavy_ball": heavy_ball_rate(ev, alpha, beta),
        "rate_optimal": heavy_ball_rate(ev, a_opt, b_opt),
        "rate_optimal_theory": (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1),
        "nesterov_alpha": 1 / L,
        "nesterov_beta": b_nes,
        "rate_nesterov": heavy_ball_rate(ev, 1 / L, b_nes, nesterov=True),
        "rate_nesterov_theory": 1 - 1 / math.sqrt(kappa),
        "rate_neumann_theory": 1 - 1 / kappa,
        "stable": bool(0 <= beta < 1 and alpha * L < 2 * (1 + beta)),
        "max_rel_diff": max(max(r["rel_diff"], r["optimal_rel_diff"], r["nesterov_rel_diff"]) for r in rows),
        "rows": rows,
        "curves": curves,
    }


def adam_reference(
    prob: BilevelProblem, state: Any, steps: tuple[int, ...], *, lr: float, b1: float, b2: float, eps: float
) -> dict[int, Tensor]:
    """Unrolled Adam from ``w*`` by its tangent recurrence, densely (``∂L_T/∂w(w*) = 0`` taken as exact).

    With a zero gradient ``m`` stays 0 and ``v_{k+1} = β₂ v_k`` (and ``dv = 2(1 − β₂) g dg = 0``);
    with ``t = t₀ + k + 1`` and ``D_t = diag(1/(√(v_t/(1 − β₂ᵗ)) + ε))``::

        dm_{k+1} = β₁ dm_k + (1 − β₁)(H J_k + M),    J_{k+1} = J_k − lr/(1 − β₁ᵗ) · D_t dm_{k+1},

    ``J_0 = 0``, and the hypergradient is ``J_Kᵀ v``. ``state`` is the Adam state at the start
    (its first moment must be zero, or ``w*`` would move).
    """
    _, _, v, M = _at_optimum(prob)
    H = prob.hessian
    nu, t = tree.flatten(state.nu).clone(), int(state.steps)
    J = torch.zeros_like(M)
    dm = torch.zeros_like(M)
    out = {}
    for k in range(1, max(steps) + 1):
        t += 1
        nu = b2 * nu
        dm = b1 * dm + (1 - b1) * (H @ J + M)
        D = 1.0 / (torch.sqrt(nu) / math.sqrt(1 - b2**t) + eps)
        J = J - (lr / (1 - b1**t)) * D[:, None] * dm
        if k in steps:
            out[k] = J.T @ v
    return out


def adam_warm_state(prob: BilevelProblem, opt: optim.Optimizer, steps: int) -> tuple[Any, float]:
    """Run ``opt`` (Adam) for ``steps`` full-batch steps from ``w₀ = 0`` (no graph); return its state with
    the first moment set to zero (so that, started at ``w*``, the weights stay put) and ``‖w − w*‖/‖w*‖``."""
    w = tree.detach(prob.zeros())
    state = opt.init(w)
    for _ in range(steps):
        wr = tree.clone_leaves(w, requires_grad=True)
        grads = torch.autograd.grad(prob.inner_loss(wr, prob.hparams), list(wr.values()))
        w, state = opt.update(dict(zip(wr, grads, strict=True)), state, wr, {})
        w = tree.detach(w)
        state = state._replace(mu=tree.detach(state.mu), nu=tree.detach(state.nu))
    return state._replace(mu=tree.zeros_like(state.mu)), rel_dist(w, prob.params)


def adam_section(
    prob: BilevelProblem, cfg: ExplainConfig, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Part 7: Adam started at ``w*`` (``hg.optim.adam``, unrolled), with ``v = 0`` and with a trained ``v``.

    Near ``w*`` the gradient is zero, so Adam's derivative recurrence is heavy-ball with step
    ``lr(1 − β₁)`` and momentum ``β₁`` on the preconditioned system ``D H`` (bias corrections → 1):
    stable iff ``lr(1 − β₁) η_max < 2(1 + β₁)`` for the eigenvalues ``η`` of ``D^½ H D^½``; its fixed
    point is ``−(DH)⁻¹DM = −H⁻¹M``, the IFT Jacobian. With ``v = 0``, ``D = I/ε``.
    """
    lr, b1, b2, eps = cfg.adam_lr, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps
    opt = optim.adam(lr=lr, b1=b1, b2=b2, eps=eps)
    ev = torch.linalg.eigvalsh(prob.hessian)
    exact = tree.flatten(prob.exact)
    gnorm = float(exact.norm())
    # (a) a fresh state: v = 0, D = I/ε
    zero = []
    ref0 = adam_reference(prob, opt.init(prob.params), cfg.adam_zero_steps, lr=lr, b1=b1, b2=b2, eps=eps)
    for K in cfg.adam_zero_steps:
        gs, wK = unroll_optimizer(prob, opt, opt.init(prob.params), prob.params, K)
        g = tree.flatten(gs[K])
        finite = bool(torch.isfinite(g).all())
        error = None
        try:
            library_unrolled(prob, opt, K)
        except hg.HypergradientError as e:  # the public call refuses a non-finite hypergradient
            error = str(e)
        # Non-finite where a gradient entry at w* is exactly 0.0 (autograd's d√v at v = 0 is 0·∞),
        # astronomically large otherwise; JSON gets null for the former.
        zero.append(
            {
                "K": K,
                "reference_norm_ratio": float(ref0[K].norm()) / gnorm,
                "library_norm_ratio": float(g.norm()) / gnorm if finite else None,
                "library_finite": finite,
                "hypergradient_error": error,
                "weight_drift": rel_dist(wK, prob.params),
            }
        )
    if progress:
        progress(2 * sum(cfg.adam_zero_steps))
    lr_max_zero = 2 * (1 + b1) * eps / ((1 - b1) * prob.lambda_max)
    # (b) the state of a real run: Adam from w_0 = 0 for warm_steps full-batch steps
    state0, warm_dist = adam_warm_state(prob, opt, cfg.adam_warm_steps)
    if progress:
        progress(cfg.adam_warm_steps // 4)
    t0 = int(state0.steps)
    D0 = 1.0 / (torch.sqrt(tree.flatten(state0.nu) / (1 - b2 ** (t0 + 1))) + eps)
    eta = torch.linalg.eigvalsh(D0.sqrt()[:, None] * prob.hessian * D0.sqrt()[None, :])
    steps = cfg.adam_steps
    gs, wK = unroll_optimizer(prob, opt, state0, prob.params, max(steps), record=steps)
    ref = adam_reference(prob, state0, steps, lr=lr, b1=b1, b2=b2, eps=eps)
    rows = []
    for K in steps:
        g = tree.flatten(gs[K])
        rows.append(
            {
                "K": K,
                "rel_diff": float((g - ref[K]).norm() / ref[K].norm()),
                "rel_dist": float((g - exact).norm()) / gnorm,
                "cosine": cosine({"g": g}, {"g": exact}),
            }
        )
    if progress:
        progress(2 * max(steps))
    return {
        "lr": lr,
        "b1": b1,
        "b2": b2,
        "eps": eps,
        "zero_state": {
            "rows": zero,
            "rate": heavy_ball_rate(ev, lr * (1 - b1) / eps, b1),
            "step_over_eps": lr / eps,
            "lr_max_stable": lr_max_zero,
            "stable": bool(lr * (1 - b1) * prob.lambda_max / eps < 2 * (1 + b1)),
        },
        "warm_state": {
            "warm_steps": cfg.adam_warm_steps,
            "warm_weight_rel_err": warm_dist,
            "t0": t0,
            "D_min": float(D0.min()),
            "D_max": float(D0.max()),
            "eta_min": float(eta[0]),
            "eta_max": float(eta[-1]),
            "preconditioned_condition": float(eta[-1] / eta[0]),
            "step_eta_max": lr * (1 - b1) * float(eta[-1]),
            "stable_below": 2 * (1 + b1),
            "rate": heavy_ball_rate(eta, lr * (1 - b1), b1),
            "v_decay_over_K": b2 ** max(steps),
            "weight_drift": rel_dist(wK, prob.params),
            "max_rel_diff": max(r["rel_diff"] for r in rows),
            "rows": rows,
        },
    }


def batch_order(n: int, batch_size: int, steps: int, gen: torch.Generator) -> list[Tensor]:
    """The rows of ``steps`` minibatches: epochs of a fresh random permutation, cut into batches
    of ``batch_size`` (a last partial batch of an epoch is dropped, as ``drop_last=True``)."""
    per_epoch = n // batch_size
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
    return out[:steps]


def noise_section(
    prob: BilevelProblem, alpha: float, cfg: ExplainConfig, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Part 8: minibatch SGD from ``w*`` (``hg.Unrolled(optimizer=hg.optim.sgd(lr=α), batches=...)``), over
    ``noise_orders`` random orders.

    A minibatch gradient at ``w*`` is not zero, so the iterates move and each order gives another
    hypergradient. Per batch size and K: the mean and spread of the cosine and relative distance
    to ``g*``, the distance of the mean (the bias), and the full-batch value Neumann(K) beside them.
    """
    too_big = [b for b in cfg.noise_batch_sizes if b > prob.n_train]
    if too_big:
        raise hg.HypergradientError(
            f"noise batch sizes {too_big} exceed the {prob.n_train} training "
            f"examples; use sizes up to {prob.n_train}"
        )
    opt = optim.sgd(alpha)
    exact = tree.flatten(prob.exact)
    ev, Q, v, M = _at_optimum(prob)
    steps = cfg.noise_steps
    out = []
    for bs in cfg.noise_batch_sizes:
        per_k: dict[int, list[Tensor]] = {K: [] for K in steps}
        drift: list[float] = []
        for o in range(cfg.noise_orders):
            gen = torch.Generator().manual_seed(1000 * cfg.seed + o)
            batches = batch_order(prob.n_train, bs, max(steps), gen)
            for K in steps:
                g, wK = library_unrolled(prob, opt, K, batches=batches[:K])
                per_k[K].append(tree.flatten(g))
                if K == max(steps):
                    drift.append(rel_dist(wK, prob.params))
            if progress:
                progress(max(steps) + sum(steps))
        for K in steps:
            G = torch.stack(per_k[K])
            cos = [cosine({"g": g}, {"g": exact}) for g in G]
            dist = [float((g - exact).norm() / exact.norm()) for g in G]
            mean = G.mean(dim=0)
            neumann = -(M.T @ (Q @ (heavy_ball_polynomial(ev, K, alpha, 0.0) * (Q.T @ v))))
            out.append(
                {
                    "batch_size": bs,
                    "K": K,
                    "cosines": cos,
                    "rel_dists": dist,
                    "cosine_mean": sum(cos) / len(cos),
                    "cosine_std": _std(cos),
                    "cosine_min": min(cos),
                    "cosine_max": max(cos),
                    "rel_dist_mean": sum(dist) / len(dist),
                    "rel_dist_std": _std(dist),
                    "mean_rel_dist": float((mean - exact).norm() / exact.norm()),
                    "spread": float(((G - mean) ** 2).sum(dim=1).mean().sqrt() / exact.norm()),
                    "mean_vs_neumann": float((mean - neumann).norm() / neumann.norm()),
                    "neumann_rel_dist": float((neumann - exact).norm() / exact.norm()),
                    "neumann_cosine": cosine({"g": neumann}, {"g": exact}),
                    "weight_drift_at_max_K": sum(drift) / len(drift),
                }
            )
    return {"lr": alpha, "orders": cfg.noise_orders, "n_train": prob.n_train, "rows": out}


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


def explain(config: ExplainConfig | None = None, *, progress: Progress | None = None) -> ExplainResult:
    """Run all four parts on ``config.problem`` and return the numbers (nothing is printed)."""
    cfg = ExplainConfig() if config is None else config
    cfg.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prob = load_problem(cfg.problem, n_train=cfg.n_train, decay=cfg.decay, seed=cfg.seed)
    timings["problem"] = time.perf_counter() - t0
    alpha = cfg.alpha_scale / prob.lambda_max

    t0 = time.perf_counter()
    theorem = theorem_check(prob, alpha, cfg.theorem_steps, progress=progress)
    timings["theorem"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold = cold_start(prob, alpha, cfg.cold_steps, progress=progress)
    timings["cold_start"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trunc = cold_start(prob, alpha, cfg.cold_steps, truncate=cfg.truncate, progress=progress)
    g_T = hg.hypergradient(
        prob.outer_loss,
        prob.inner_loss,
        prob.params,
        prob.hparams,
        method=hg.Neumann(iters=cfg.truncate, alpha=alpha),
        residual=False,
    )
    timings["truncated"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mistaken = []
    for K in cfg.cold_steps:
        g = mistaken_hypergradient(prob, prob.zeros(), alpha, K)
        mistaken.append({"K": K, "cosine": cosine(g, prob.exact), "rel_dist": rel_dist(g, prob.exact)})
        if progress:
            progress(K)
    timings["mistaken"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lr = learning_rate_section(prob, alpha, cfg.lr_steps, progress=progress)
    timings["learning_rate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    momentum = momentum_section(prob, alpha, cfg.momentum_beta, cfg.momentum_steps, progress=progress)
    timings["momentum"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    adam = adam_section(prob, cfg, progress=progress)
    timings["adam"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    noise = noise_section(prob, alpha, cfg, progress=progress)
    timings["noise"] = time.perf_counter() - t0
    if not math.isfinite(max(r["rel_diff"] for r in theorem)):
        raise hg.HypergradientError("the theorem check produced a non-finite difference; see `theorem` rows")
    return ExplainResult(
        cfg,
        prob.summary(),
        alpha,
        theorem,
        cold,
        trunc,
        mistaken,
        cosine(g_T, prob.exact),
        lr,
        timings,
        momentum,
        adam,
        noise,
    )


def explain_config(cfg: Config) -> ExplainConfig:
    """The :class:`ExplainConfig` of a resolved configuration (dotted keys of :data:`SCHEMA`)."""
    return settings(ExplainConfig, SCHEMA, cfg)


def check(cfg: Config) -> ExplainConfig:
    """Values the schema cannot judge alone (α's range, the decay interval), before any work."""
    settings: ExplainConfig = check_settings(cfg, explain_config)
    return settings


def account(summary: dict[str, Any]) -> str:
    """The readable account printed by the command, from the ``explain.json`` content."""
    p, lr = summary["problem"], summary["learning_rate"]
    T = summary["truncate"]
    lines = [
        f"Problem: {p['name']} ({p['source']}), {p['n_train']} train / {p['n_val']} val examples, "
        f"{p['n_weights']} weights, one weight decay per weight ({p['n_hparams']} hyperparameters).",
        f"w* by Newton: |grad L_T(w*)| = {p['grad_norm_at_w_star']:.1e}.  Hessian: lambda_max = "
        f"{p['lambda_max']:.4g}, lambda_min = {p['lambda_min']:.3g} (condition {p['condition_number']:.0f}); "
        f"step size alpha = {summary['config']['alpha_scale']:g}/lambda_max = {summary['alpha']:.4g}.",
        "",
        "1. The theorem: K gradient-descent steps started AT w*, differentiated through, equal the",
        "   K-term Neumann hypergradient -(d2L_T/dlam dw) alpha sum_{j<K} (I - alpha H)^j dL_V/dw.",
        "       K   |unrolled - Neumann|/|Neumann|   cosine to exact IFT   |g - g*|/|g*|",
    ]
    for r in summary["theorem"]:
        lines.append(
            f"   {r['K']:>5}   {r['rel_diff']:>26.2e}   {r['cosine']:>19.6f}   {r['rel_dist']:>13.2e}"
        )
    lines += [
        f"   theorem_max_rel_diff = {summary['theorem_max_rel_diff']:.2e} (float64 eps = 2.2e-16): equal to "
        "rounding, for every K.",
        "   Why: at w* the gradient is zero, so w_k = w* for all k; the path never moves, and only its",
        "   derivative recurrence dw_{k+1}/dlam = (I - alpha H) dw_k/dlam - alpha d2L_T/dw dlam is left.",
        "",
        "2. From a cold start (w_0 = 0) the path matters: the iterates w_k are not w*, and unrolling",
        "   reaches the exact (IFT) hypergradient only once w_K has converged to w*.",
        "       K   cosine to exact IFT   |g - g*|/|g*|   |w_K - w*|/|w*|",
    ]
    for r in summary["cold_start"]:
        lines.append(
            f"   {r['K']:>5}   {r['cosine']:>19.6f}   {r['rel_dist']:>13.2e}   {r['weight_rel_err']:>15.2e}"
        )
    lines += [
        "",
        f"3. Truncated unrolling (only the last T = {T} steps differentiated), from w_0 = 0:",
        "       K   cosine to exact IFT",
    ]
    for r in summary["truncated"]:
        lines.append(f"   {r['K']:>5}   {r['cosine']:>19.6f}")
    lines += [
        f"   It tends to the {T}-term Neumann value (cosine {summary['neumann_T_cosine']:.6f}), not to the",
        "   exact one: once w_{K-T} = w*, the last T steps are exactly the theorem's setting with K = T.",
        "",
        "4. The common mistake: w_K = w_0 - alpha sum_k dL_T/dw(w_k), differentiated term by term with w_k",
        "   held fixed, gives dw_K/dlam = -alpha sum_k d2L_T/dw dlam(w_k): the (I - alpha H_k) factors, and",
        "   with them H^-1, are lost. From w_0 = 0:",
        "       K   cosine to exact IFT   |g - g*|/|g*|",
    ]
    for r in summary["mistaken"]:
        lines.append(f"   {r['K']:>5}   {r['cosine']:>19.6f}   {r['rel_dist']:>13.2e}")
    lines += [
        f"   The direction tends to the one-term Neumann one (cosine {summary['neumann_cosine'][0][1]:.6f}), "
        "the length grows ~K.",
        "",
        f"5. The step size as a hyperparameter (lr = alpha = {lr['lr']:.4g}, {lr['steps']} steps from "
        "w_0 = 0):",
        f"   implicit methods refuse it ({', '.join(lr['refused_by'])}): w* does not depend on the step "
        "size.",
    ]
    first = next(iter(lr["refused_by"].values()), "")
    lines.append(f"   e.g. PathOnlyHyperparameterError: {first}")
    lines += [
        f"   Unrolled(lr='lr'): dL_V/dlr = {lr['unrolled_cold_start']:.10g}; central finite difference "
        f"{lr['finite_difference']:.10g} (relative error {lr['fd_rel_err']:.1e}).",
        f"   Started at w* instead, dL_V/dlr = {lr['unrolled_from_optimum']:.1e}: the path does not move,",
        "   so the step size has nothing to change - the same reason the IFT cannot see it.",
    ]
    if summary.get("momentum"):
        lines += ["", *_account_beyond(summary)]
    return "\n".join(lines)


def _account_beyond(summary: dict[str, Any]) -> list[str]:
    """Parts 6-8 of the account: heavy-ball, Adam and minibatches started at w*."""
    m, a, nz = summary["momentum"], summary["adam"], summary["noise"]
    lines = [
        f"6. Heavy-ball momentum from w* (zero velocity), alpha = {m['alpha']:.4g}, beta = {m['beta']:g}:",
        "   the tangent obeys J_{k+1} = (1 + beta) J_k - beta J_{k-1} - alpha (H J_k + M), so K steps",
        "   give -M^T P_K(H) v with P_K(h) = (1 - U_{K+1} + beta U_K)/h, U_n = (r1^n - r2^n)/(r1 - r2),",
        "   r1, r2 the roots of r^2 - (1 + beta - alpha h) r + beta.  Optimal pair for the spectrum:",
        f"   alpha* = {m['alpha_opt']:.4g}, beta* = {m['beta_opt']:.4f}.",
        "   Nesterov (torch's nesterov=True) with alpha = 1/lambda_max, beta = (sqrt(kappa) - 1)/(sqrt(kappa)"
        f" + 1) = {m['nesterov_beta']:.4f}:",
        "   P_K = 1/h + (alpha (1 + beta) - 1/h) U_K + q U_{K-1}/h, roots of r^2 - (1 + beta)(1 - alpha h) r",
        "   + q, q = beta (1 - alpha h).",
        "       K   |unrolled - P_K|/|P_K|   |g - g*|/|g*|: Neumann   heavy-ball   (alpha*, beta*)"
        "   Nesterov",
    ]
    for r in m["rows"]:
        diff = max(r["rel_diff"], r["optimal_rel_diff"], r["nesterov_rel_diff"])
        lines.append(
            f"   {r['K']:>5}   {diff:>20.2e}   {r['neumann_rel_dist']:>22.2e}   "
            f"{r['rel_dist']:>10.2e}   {r['optimal_rel_dist']:>15.2e}   "
            f"{r['nesterov_rel_dist']:>8.2e}"
        )
    lines += [
        f"   Error per step (largest root modulus): Neumann {m['rate_neumann']:.4f} (= 1 - 1/kappa, "
        f"kappa = {m['kappa']:.1f}),",
        f"   heavy-ball {m['rate_heavy_ball']:.4f} (= sqrt(beta)), optimal {m['rate_optimal']:.4f}",
        f"   (= (sqrt(kappa) - 1)/(sqrt(kappa) + 1) = {m['rate_optimal_theory']:.4f}), Nesterov "
        f"{m['rate_nesterov']:.4f} (= 1 - 1/sqrt(kappa));",
        "   one HVP per step for each.",
        "",
        f"7. Adam from w* (lr = {a['lr']:g}, betas = ({a['b1']:g}, {a['b2']:g}), eps = {a['eps']:g}). At w*",
        "   the gradient is 0, so m stays 0, v_k = b2^k v_0, and the tangent is heavy-ball with step",
        "   lr (1 - b1) and momentum b1 on D H, D = diag(1/(sqrt(v_hat) + eps)): it tends to",
        "   -(D H)^-1 D M = -H^-1 M, the IFT Jacobian, when lr (1 - b1) eta_max(D H) < 2 (1 + b1).",
    ]
    z, w = a["zero_state"], a["warm_state"]
    lines += [
        f"   a) fresh state, v = 0: D = I/eps, lr/eps = {z['step_over_eps']:.0e}; stable only for lr < "
        f"{z['lr_max_stable']:.2g}. Growth per step {z['rate']:.2g}:",
        "       K   |g|/|g*| (tangent recurrence)   library (unrolled hg.optim.adam)   |w_K - w*|/|w*|",
    ]
    for r in z["rows"]:
        lib = "non-finite" if r["library_norm_ratio"] is None else f"{r['library_norm_ratio']:.2e}"
        lines.append(
            f"   {r['K']:>5}   {r['reference_norm_ratio']:>27.2e}   {lib:>32}   {r['weight_drift']:>15.2e}"
        )
    lines += [
        "   The derivative explodes; the library's is non-finite where a gradient entry at w* is exactly 0",
        "   (the derivative of sqrt(v) at v = 0 is infinite), and rounding-level gradients are amplified as",
        "   much: the weights leave w* within a few steps.",
        f"   b) v from {w['warm_steps']} Adam steps from w_0 = 0 (|w - w*|/|w*| = "
        f"{w['warm_weight_rel_err']:.1e}), m reset to 0: D in [{w['D_min']:.3g}, {w['D_max']:.3g}],",
        f"      lr (1 - b1) eta_max = {w['step_eta_max']:.3g} < {w['stable_below']:g} (stable), condition of "
        f"D H {w['preconditioned_condition']:.0f}, rate {w['rate']:.4f}:",
        "       K   |library - recurrence|/|recurrence|   cosine to g*   |g - g*|/|g*|",
    ]
    for r in w["rows"]:
        lines.append(
            f"   {r['K']:>5}   {r['rel_diff']:>35.2e}   {r['cosine']:>12.6f}   {r['rel_dist']:>13.2e}"
        )
    lines += [
        "",
        f"8. Minibatch SGD from w* (lr = alpha, {nz['orders']} random batch orders per batch size, "
        f"{nz['n_train']} training examples):",
        "   a minibatch gradient at w* is not zero, so the iterates move and each order gives another",
        "   hypergradient.",
        "   batch     K   cosine mean +- std   |g - g*|/|g*| mean   |mean g - g*|/|g*|   spread   "
        "full batch (Neumann)",
    ]
    for r in nz["rows"]:
        lines.append(
            f"   {r['batch_size']:>5} {r['K']:>5}   {r['cosine_mean']:>10.3f} +- "
            f"{r['cosine_std']:.3f}   "
            f"{r['rel_dist_mean']:>18.3g}   {r['mean_rel_dist']:>18.3g}   {r['spread']:>6.3g}   "
            f"{r['neumann_rel_dist']:>20.3g}"
        )
    lines.append("   (spread: root mean square of |g - mean g| over the orders, over |g*|.)")
    return lines


def _run(ctx: RunContext) -> ExperimentResult:
    """Measure, then write ``explain.json``, the figures and ``report.md`` into ``ctx.out``."""
    cfg, t0 = ctx.config, time.perf_counter()
    settings: ExplainConfig = begin(ctx, check)
    with ProgressBar(settings.cost(), desc="explain", enabled=ctx.progress) as bar:
        result = explain(settings, progress=bar.update)
    summary = result.to_json()
    figures: list[Path] = []
    if cfg["figures"]:
        from .figures import explain_figures  # matplotlib: only when figures are drawn

        figures = explain_figures(summary, ctx.out)
    summary["figures"] = [f.name for f in figures]
    text = account(summary) + "\n\nThe derivation, step by step: docs/optimization-path.md"
    p = summary["problem"]
    columns = ["K", "rel_diff", "cosine", "rel_dist"]
    notes = [
        f"theorem_max_rel_diff = {summary['theorem_max_rel_diff']:.2e}: K unrolled steps from w* equal "
        "the K-term Neumann hypergradient to float64 rounding (rel_diff); cosine and rel_dist compare "
        "them with the exact IFT hypergradient."
    ]
    return finish(
        ctx,
        t0,
        title=f"explain: the optimization path inside the IFT hypergradient ({p['name']}, "
        f"{p['n_hparams']} hyperparameters)",
        columns=columns,
        rows=[{c: r[c] for c in columns} for r in summary["theorem"]],
        notes=notes,
        result=summary,
        result_name="explain.json",
        body=[
            "Numbers of this run (all of them in `explain.json`):",
            "",
            "```",
            text,
            "```",
            "",
            *[f"![{f.stem}]({f.name})" for f in figures],
        ],
        figures=figures,
        text=text,
    )


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="explain",
    summary="show, with numbers, how the optimization path fits into the implicit derivation",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    resumable=False,
)
