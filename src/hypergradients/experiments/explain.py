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

import hypergradients as hg

from .. import tree
from ..config import Config, Option
from ..tree import Tree
from .base import Experiment, ExperimentResult, RunContext, check_settings, compute, write_report
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


# ------------------------------------------------------------------------- the registered experiment
STEPS = [1, 3, 10, 30, 100, 300, 1000]
SCHEMA: dict[str, Option] = {
    "problem": Option("breast-cancer", "bundled dataset (breast-cancer: 30 features, binary; digits: 64 "
                      "features, 10 classes, softmax)", str, choices=("breast-cancer", "digits")),
    "n_train": Option("auto", "training examples ('auto': 300 for breast-cancer, all of digits' split)", int,
                      low=2, auto=True),
    "decay.low": Option(1e-3, "smallest per-weight decay drawn (log-uniform in [low, high])", float,
                        positive=True),
    "decay.high": Option(1e-1, "largest per-weight decay drawn", float, positive=True),
    "seed": Option(0, "data split and weight-decay draw", int),
    "threads": Option(1, "torch intra-op threads (1: these problems are too small to gain from more, and "
                      "extra threads only contend on a shared machine)", int, low=1),
    "figures": Option(True, "write explain_cosine.png and explain_theorem.png", bool),
    "alpha_scale": Option(1.0, "step size α = alpha_scale/λ_max(H), in (0, 2)", float, positive=True),
    "theorem.steps": Option(STEPS, "K for the theorem check: unrolled from w* against K-term Neumann", list,
                            item=int, low=1, nonempty=True),
    "cold.steps": Option(STEPS, "K for cold-start, truncated and mistaken unrolling from w_0 = 0", list,
                         item=int, low=1, nonempty=True),
    "cold.truncate": Option(10, "T: the steps differentiated by truncated unrolling", int, low=1),
    "lr.steps": Option(100, "unrolled steps for the learning-rate hypergradient", int, low=1),
}
# The same settings as ExplainConfig.quick(): every part, in a few seconds.
SMOKE: dict[str, Any] = {"theorem.steps": [1, 10, 100], "cold.steps": [1, 10, 100, 300],
                         "lr.steps": 20}


def explain_config(cfg: Config) -> ExplainConfig:
    """The :class:`ExplainConfig` of a resolved configuration (dotted keys of :data:`SCHEMA`)."""
    n_train = None if cfg["n_train"] == "auto" else cfg["n_train"]
    return ExplainConfig(problem=cfg["problem"], n_train=n_train,
                         seed=cfg["seed"], decay=(cfg["decay.low"], cfg["decay.high"]),
                         theorem_steps=tuple(cfg["theorem.steps"]), cold_steps=tuple(cfg["cold.steps"]),
                         truncate=cfg["cold.truncate"], lr_steps=cfg["lr.steps"],
                         alpha_scale=cfg["alpha_scale"])


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
        lines.append(f"   {r['K']:>5}   {r['rel_diff']:>26.2e}   {r['cosine']:>19.6f}   "
                     f"{r['rel_dist']:>13.2e}")
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
        lines.append(f"   {r['K']:>5}   {r['cosine']:>19.6f}   {r['rel_dist']:>13.2e}   "
                     f"{r['weight_rel_err']:>15.2e}")
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
    return "\n".join(lines)


def run(ctx: RunContext) -> ExperimentResult:
    """Measure, then write ``explain.json``, the figures and ``report.md`` into ``ctx.out``."""
    from ..files import json_dumps, write_atomic

    t0 = time.perf_counter()
    cfg = ctx.config
    settings = ctx.data if isinstance(ctx.data, ExplainConfig) else check(cfg)
    result = compute(ctx, settings, explain, desc="explain")
    summary = result.to_json()
    figures: list[Path] = []
    if cfg["figures"]:
        from .figures import explain_figures  # matplotlib: only when figures are drawn

        figures = explain_figures(result, ctx.out)
    summary["figures"] = [f.name for f in figures]
    main_file = write_atomic(ctx.out / "explain.json", json_dumps(summary, indent=2) + "\n")
    text = account(summary) + "\n\nThe derivation, step by step: docs/optimization-path.md"
    p = summary["problem"]
    title = (f"explain: the optimization path inside the IFT hypergradient ({p['name']}, "
             f"{p['n_hparams']} hyperparameters)")
    report = write_report(ctx.out, title, [
        f"Numbers of this run (all of them in `{main_file.name}`):", "", "```", text, "```", "",
        *[f"![{f.stem}]({f.name})" for f in figures]])
    columns = ["K", "rel_diff", "cosine", "rel_dist"]
    rows = [{c: r[c] for c in columns} for r in summary["theorem"]]
    notes = [f"theorem_max_rel_diff = {summary['theorem_max_rel_diff']:.2e}: K unrolled steps from w* equal "
             "the K-term Neumann hypergradient to float64 rounding (rel_diff); cosine and rel_dist compare "
             "them with the exact IFT hypergradient."]
    return ExperimentResult(title=title, columns=columns, rows=rows, report=report, out=ctx.out, notes=notes,
                            wall_s=time.perf_counter() - t0, result=summary, result_file=main_file, text=text,
                            files=[main_file, *figures, report])


EXPERIMENT = Experiment(
    name="explain",
    summary="show, with numbers, how the optimization path fits into the implicit derivation",
    schema=SCHEMA, smoke=SMOKE, run=run, check=check, resumable=False)
