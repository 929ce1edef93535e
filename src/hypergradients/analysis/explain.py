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
from typing import Any

import torch

import hypergradients as hg

from .. import tree
from ..tree import Tree
from .problems import BilevelProblem, cosine, load_problem, rel_dist

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ExplainConfig:
    """Settings of :func:`explain` (defaults: the full run; :meth:`quick`: the tests' small one).

    ``theorem_steps``: the K of part 1; ``cold_steps``: the K of parts 2 and 3; ``truncate``: T;
    ``lr_steps``: K of part 4; ``alpha_scale``: ``α·λ_max``, in ``(0, 2)`` for convergence.
    """

    problem: str = "breast-cancer"
    n_train: int | None = None
    seed: int = 0
    decay: tuple[float, float] = (1e-3, 1e-1)
    theorem_steps: tuple[int, ...] = (1, 3, 10, 30, 100, 300, 1000)
    cold_steps: tuple[int, ...] = (1, 3, 10, 30, 100, 300, 1000)
    truncate: int = 10
    lr_steps: int = 100
    alpha_scale: float = 1.0

    @classmethod
    def quick(cls, **overrides: Any) -> ExplainConfig:
        """A small configuration (a few seconds) exercising every part."""
        base: dict[str, Any] = dict(theorem_steps=(1, 10, 100), cold_steps=(1, 10, 100, 300),
                                    truncate=10, lr_steps=20)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        for name in ("theorem_steps", "cold_steps"):
            ks = getattr(self, name)
            if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
                raise hg.HypergradientError(f"{name} must be a non-empty list of positive integers, "
                                            f"got {ks!r}")
        for name in ("truncate", "lr_steps"):
            k = getattr(self, name)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise hg.HypergradientError(f"{name} must be a positive integer, got {k!r}")
        if not 0 < self.alpha_scale < 2:
            raise hg.HypergradientError(
                f"alpha_scale={self.alpha_scale} puts α = alpha_scale/λ_max outside (0, 2/λ_max), where "
                "gradient descent and the Neumann series diverge; use a value in (0, 2), e.g. 1")

    def cost(self) -> int:
        """Work units (unrolled steps or HVPs) :func:`explain` reports to its progress callback."""
        theorem = 2 * sum(self.theorem_steps)
        cold = 2 * sum(self.cold_steps) + sum(k for k in self.cold_steps if k >= self.truncate)
        return theorem + cold + 5 * self.lr_steps


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


def theorem_check(prob: BilevelProblem, alpha: float, steps: tuple[int, ...], *,
                  progress: Progress | None = None) -> list[dict[str, float]]:
    """Part 1: ``Unrolled(K, α)`` from ``w*`` vs ``Neumann(K, α)``, and both vs the exact ``g*``."""
    rows = []
    for K in steps:
        t0 = time.perf_counter()
        gu, info = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, prob.hparams,
                                    method=hg.Unrolled(steps=K, lr=alpha), return_info=True)
        t1 = time.perf_counter()
        gn, ninfo = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, prob.hparams,
                                     method=hg.Neumann(iters=K, alpha=alpha), residual=False,
                                     return_info=True)
        t2 = time.perf_counter()
        assert info.final_params is not None
        rows.append({"K": K, "rel_diff": rel_dist(gu, gn), "cosine": cosine(gn, prob.exact),
                     "rel_dist": rel_dist(gn, prob.exact), "unrolled_cosine": cosine(gu, prob.exact),
                     "weight_drift": rel_dist(info.final_params, prob.params),
                     "neumann_hvps": ninfo.hvps, "unrolled_s": t1 - t0, "neumann_s": t2 - t1})
        if progress:
            progress(2 * K)
    return rows


def cold_start(prob: BilevelProblem, alpha: float, steps: tuple[int, ...], *, truncate: int | None = None,
               progress: Progress | None = None) -> list[dict[str, float]]:
    """Parts 2–3: ``Unrolled(K, α, truncate)`` from ``w₀ = 0`` against ``g*`` (K < T skipped)."""
    rows = []
    for K in steps:
        if truncate is not None and K < truncate:
            continue
        t0 = time.perf_counter()
        g, info = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.zeros(), prob.hparams,
                                   method=hg.Unrolled(steps=K, lr=alpha, truncate=truncate), return_info=True)
        assert info.final_params is not None
        rows.append({"K": K, "cosine": cosine(g, prob.exact), "rel_dist": rel_dist(g, prob.exact),
                     "weight_rel_err": rel_dist(info.final_params, prob.params),
                     "grad_norm": _grad_norm(prob, info.final_params), "time_s": time.perf_counter() - t0})
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
    v = tree.as_tree(raw[:len(wK)], wK)
    g = tree.as_tree(raw[len(wK):], lam)  # the direct term (zero for these problems)
    for wk in path[:-1]:
        w = tree.clone_leaves(wk, requires_grad=True)
        gw = torch.autograd.grad(prob.inner_loss(w, lam), list(w.values()), create_graph=True)
        mixed = torch.autograd.grad(gw, list(lam.values()), grad_outputs=[v[k] for k in w],
                                    allow_unused=True)
        g = tree.axpy(-alpha, tree.as_tree(mixed, lam), g)
    return tree.detach(g)


def learning_rate_section(prob: BilevelProblem, alpha: float, steps: int, *,
                          progress: Progress | None = None) -> dict[str, Any]:
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
    g_cold = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.zeros(), hp,
                              method=hg.Unrolled(steps=steps, lr="lr"))
    g_opt = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, hp,
                             method=hg.Unrolled(steps=steps, lr="lr"))
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
    return {"lr": alpha, "steps": steps, "refused_by": refused,
            "unrolled_cold_start": lr_cold, "finite_difference": fd, "fd_eps": eps,
            "fd_rel_err": abs(lr_cold - fd) / max(abs(fd), 1e-300),
            "outer_loss_after_K": val_cold,
            "outer_loss_at_w_star": float(prob.outer_loss(prob.params, prob.hparams)),
            "unrolled_from_optimum": float(g_opt["lr"]),
            "log_weight_decay_cosine_cold_start": cosine(
                {"log_weight_decay": g_cold["log_weight_decay"]}, prob.exact)}


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
    g_T = hg.hypergradient(prob.outer_loss, prob.inner_loss, prob.params, prob.hparams,
                           method=hg.Neumann(iters=cfg.truncate, alpha=alpha), residual=False)
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
    if not math.isfinite(max(r["rel_diff"] for r in theorem)):
        raise hg.HypergradientError("the theorem check produced a non-finite difference; see `theorem` rows")
    return ExplainResult(cfg, prob.summary(), alpha, theorem, cold, trunc, mistaken, cosine(g_T, prob.exact),
                         lr, timings)
