"""Inverse-Hessian approximations against the exact hypergradient, per HVP spent (paper's Fig. 4).

On linear models with one weight decay per weight (:mod:`.problems`), for a budget of ``h``
Hessian-vector products, each method's hypergradient ``g`` is compared with the exact IFT one
``g*`` (dense solve) by cosine similarity and relative distance ``‖g − g*‖/‖g*‖``:

============  ========================================================  ===========================
method        call                                                      HVPs
============  ========================================================  ===========================
Identity      ``Identity(scale)``: ``p = scale·v``                      0
AdamIdentity  ``Identity(precondition=adam_diagonal(adam, w))``:         0
              ``p = lr·v/(sqrt(v̂) + eps)`` (SAMA)
Neumann       ``Neumann(iters=h+1, alpha=α)``: ``α Σ_{j≤h}(I−αH)^j v``    h (K terms cost K−1)
CG            ``CG(iters=h, tol=1e-12)``                                ≤ h (stops when converged)
Nystrom       ``Nystrom(rank=h)`` (our extra method), ``h ≤ n``         h (one batched sketch)
Unrolled      ``Unrolled(steps=h, lr=α)`` from ``w₀ = 0``               ≈ h (one backward per step)
FirstOrder    ``FirstOrder(sigma, steps=⌊h/2⌋, lr=α)``, ``h ≥ 2``       0; 4⌊h/2⌋ + 2 gradients
============  ========================================================  ===========================

No residual is requested (``residual=False``), so the counts are the method's own work, read
from :class:`hypergradients.Info`. ``α = alpha_scale/λ_max(H)``. Unrolling from ``w*`` instead
would coincide with Neumann exactly (the theorem, see :mod:`.explain`), so the cold start is
shown: it is what unrolling costs when the weights are not yet trained.

The two methods without HVPs are placed at equal cost in gradient evaluations, counting an HVP as
two (a backward pass through the gradient's graph costs about two gradient evaluations).
``FirstOrder`` (central, no second derivative) spends ``4K + 2`` gradients for K steps, so K =
``⌊h/2⌋`` at the budget ``h`` (``4K + 2 ≤ 2h + 2``; the implicit methods' fixed part, ``v`` and
the mixed product, is left out on both sides); its points carry ``grad_evals`` and are drawn at
``grad_evals/2`` HVPs. ``AdamIdentity`` reads the second moments of a ``torch.optim.Adam`` run
of ``adam_steps`` minibatch steps (batch 32, lr ``adam_lr``) on the training loss from ``w₀ = 0``,
the state a model trained by Adam has for free, and is evaluated at ``w*`` like the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import hypergradients as hg

from ...core import tree
from ..config import Config, Option, resolve, setting, settings
from ..progress import Progress as ProgressBar
from .base import Experiment, ExperimentResult, RunContext, check_settings, with_threads
from .problems import PROBLEMS, BilevelProblem, cosine, load_problem, rel_dist
from .shared import begin, finish

Progress = Callable[[int], None]
METHODS = ("Identity", "AdamIdentity", "Neumann", "CG", "Nystrom", "Unrolled", "FirstOrder")
LABELS = {
    "Neumann": "Neumann (= unrolled from $w^*$)",
    "Unrolled": "Unrolled from $w_0=0$",
    "Nystrom": "Nyström",
    "CG": "CG",
    "Identity": "Identity",
    "AdamIdentity": "Identity, Adam-preconditioned",
    "FirstOrder": "FirstOrder (2 gradients = 1 HVP)",
}
LEVELS = ("Identity", "AdamIdentity")  # no HVP, one point each


# ------------------------------------------------------------------------------- the settings
SCHEMA: dict[str, Option] = {
    "problems": Option(
        ["diabetes", "digits"],
        "bundled problems (diabetes: ridge regression; breast-cancer: "
        "binary logistic; digits: softmax regression)",
        list,
        choices=PROBLEMS,
        nonempty=True,
        unique=True,
    ),
    "budgets": Option(
        [0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100],
        "HVP budgets h",
        list,
        item=int,
        low=0,
        nonempty=True,
    ),
    "methods": Option(
        list(METHODS),
        "methods compared with the exact hypergradient",
        list,
        choices=METHODS,
        nonempty=True,
        unique=True,
    ),
    "alpha_scale": Option(
        1.0, "Neumann and unrolling step α = alpha_scale/λ_max(H), in (0, 2)", float, positive=True
    ),
    "identity_scale": Option(1.0, "Identity's p = scale·v", float, positive=True),
    "cg_tol": Option(1e-12, "CG's relative residual at which it stops early", float, low=0.0),
    "sigma": Option(1e4, "FirstOrder's penalty σ (bias O(1/σ²), rounding O(σ·eps))", float, positive=True),
    "adam_steps": Option(
        1000, "Adam steps (batch 32) whose second moments precondition AdamIdentity", int, low=1
    ),
    "adam_lr": Option(
        1e-2, "learning rate of that Adam run (AdamIdentity's p = lr·v/(sqrt(v̂)+eps))", float, positive=True
    ),
    "n_train": Option(
        "auto",
        "training examples ('auto': 300 for the sklearn sets, all of digits' split)",
        int,
        low=2,
        auto=True,
    ),
    "decay.low": Option(
        1e-3, "smallest per-weight decay drawn (log-uniform in [low, high])", float, positive=True
    ),
    "decay.high": Option(1e-1, "largest per-weight decay drawn", float, positive=True),
    "seed": Option(0, "data split, weight-decay draw and Nyström sketch", int),
    "threads": Option(1, "torch's CPU threads (these problems are too small to gain from more)", int, low=1),
    "figures": Option(True, "write compare.png", bool),
}
# The two sklearn problems, budgets up to 20: seconds (--smoke; CompareConfig.smoke()).
SMOKE: dict[str, Any] = {"problems": ["diabetes", "breast-cancer"], "budgets": [0, 1, 2, 5, 10, 20]}


@dataclass(frozen=True)
class CompareConfig:
    """Settings of :func:`compare`, each read from :data:`SCHEMA`. ``budgets``: the HVP counts ``h``."""

    problems: tuple[str, ...] = setting(SCHEMA, "problems")
    budgets: tuple[int, ...] = setting(SCHEMA, "budgets")
    methods: tuple[str, ...] = setting(SCHEMA, "methods")
    alpha_scale: float = setting(SCHEMA, "alpha_scale")
    identity_scale: float = setting(SCHEMA, "identity_scale")
    cg_tol: float = setting(SCHEMA, "cg_tol")
    sigma: float = setting(SCHEMA, "sigma")
    adam_steps: int = setting(SCHEMA, "adam_steps")
    adam_lr: float = setting(SCHEMA, "adam_lr")
    n_train: int | None = setting(SCHEMA, "n_train")
    decay: tuple[float, float] = setting(SCHEMA, "decay.low", "decay.high")
    seed: int = setting(SCHEMA, "seed")

    @classmethod
    def smoke(cls, **overrides: Any) -> CompareConfig:
        """The ``--smoke`` configuration (:data:`SMOKE`), with ``overrides``."""
        return settings(cls, SCHEMA, resolve(SCHEMA, smoke=SMOKE), **overrides)

    def validate(self) -> None:
        hs = self.budgets
        if not hs or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in hs):
            raise hg.HypergradientError(f"budgets must be a non-empty list of integers >= 0, got {hs!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise hg.HypergradientError(
                f"unknown method(s) {unknown or list(self.methods)}; choose from {', '.join(METHODS)}"
            )
        if not self.problems:
            raise hg.HypergradientError("problems is empty; choose from diabetes, breast-cancer, digits")
        if not 0 < self.alpha_scale < 2:
            raise hg.HypergradientError(
                f"alpha_scale={self.alpha_scale} must be in (0, 2): α = "
                "alpha_scale/λ_max outside (0, 2/λ_max) makes Neumann and gradient "
                "descent diverge"
            )

    def cost(self) -> int:
        """Work units (≈ HVPs) reported to the progress callback, per problem summed."""
        per = sum(5 * h for h in self.budgets) + 1
        return per * len(self.problems)


@dataclass
class ProblemCurves:
    """One problem's curves: ``curves[method]`` is a list of points ``{budget, hvps, cosine, rel_dist}``."""

    name: str
    summary: dict[str, object]
    alpha: float
    curves: dict[str, list[dict[str, float]]]

    def at(self, method: str, budget: int) -> dict[str, float] | None:
        """The point computed with that budget (Identity, AdamIdentity: its one point), or None."""
        pts = self.curves.get(method, [])
        if method in LEVELS:
            return pts[0] if pts else None
        return next((p for p in pts if p["budget"] == budget), None)


@dataclass
class CompareResult:
    config: CompareConfig
    problems: list[ProblemCurves]
    timings: dict[str, float]

    def table_budgets(self) -> list[int]:
        wanted = (0, 1, 5, 10, 20, 50, 100)
        return [h for h in wanted if h in self.config.budgets] or list(self.config.budgets)

    def table(self) -> str:
        """Markdown: cosine / relative distance to the exact hypergradient at a few budgets."""
        hs = self.table_budgets()
        lines = []
        for pr in self.problems:
            lines.append(
                f"**{pr.name}** ({pr.summary['n_weights']} weights, {pr.summary['n_hparams']} "
                f"hyperparameters, cond(H) = {pr.summary['condition_number']:.0f}): "
                "cosine / relative distance"
            )
            lines.append("")
            lines.append("| method | " + " | ".join(f"{h} HVPs" for h in hs) + " |")
            lines.append("|---|" + "---|" * len(hs))
            for m in pr.curves:
                cells = []
                for h in hs:
                    p = pr.at(m, h)
                    cells.append("—" if p is None else f"{p['cosine']:.4f} / {p['rel_dist']:.2e}")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "problems": [
                {"name": p.name, "problem": p.summary, "alpha": p.alpha, "curves": p.curves}
                for p in self.problems
            ],
            "timings_s": self.timings,
        }


def _point(prob: BilevelProblem, method: hg.Method, budget: int, *, cold: bool = False) -> dict[str, float]:
    t0 = time.perf_counter()
    w = prob.zeros() if cold else prob.params
    g, info = hg.hypergradient(
        prob.outer_loss, prob.inner_loss, w, prob.hparams, method=method, residual=False, return_info=True
    )
    point = {
        "budget": budget,
        "hvps": info.hvps,
        "cosine": cosine(g, prob.exact),
        "rel_dist": rel_dist(g, prob.exact),
        "time_s": time.perf_counter() - t0,
    }
    if "gradient_evals" in info.extra:  # FirstOrder: its cost is in gradients
        point["grad_evals"] = info.extra["gradient_evals"]
    return point


def adam_preconditioner(prob: BilevelProblem, cfg: CompareConfig) -> dict[str, Tensor]:
    """:func:`hypergradients.adam_diagonal` after ``cfg.adam_steps`` steps of ``torch.optim.Adam``
    (lr ``cfg.adam_lr``) on minibatches of 32 training rows of ``L_T``, from ``w₀ = 0`` (seeded)."""
    assert prob.batch_loss is not None
    w = tree.clone_leaves(prob.zeros(), requires_grad=True)
    opt = torch.optim.Adam(list(w.values()), lr=cfg.adam_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    lam = tree.detach(prob.hparams)
    for _ in range(cfg.adam_steps):
        idx = torch.randint(0, prob.n_train, (min(32, prob.n_train),), generator=gen)
        opt.zero_grad(set_to_none=True)
        prob.batch_loss(w, lam, idx).backward()
        opt.step()
    return hg.adam_diagonal(opt, w)


def compare_problem(
    prob: BilevelProblem, cfg: CompareConfig, *, progress: Progress | None = None
) -> ProblemCurves:
    """Every method of ``cfg.methods`` at every budget on one solved problem."""
    alpha = cfg.alpha_scale / prob.lambda_max
    n = prob.n_weights
    curves: dict[str, list[dict[str, float]]] = {m: [] for m in cfg.methods}
    if "Identity" in curves:
        curves["Identity"].append(_point(prob, hg.Identity(scale=cfg.identity_scale), 0))
    if "AdamIdentity" in curves:
        diagonal = adam_preconditioner(prob, cfg)
        curves["AdamIdentity"].append(_point(prob, hg.Identity(precondition=diagonal), 0))
    if progress:
        progress(1)
    for h in sorted(set(cfg.budgets)):
        if "Neumann" in curves:
            curves["Neumann"].append(_point(prob, hg.Neumann(iters=h + 1, alpha=alpha), h))
        if h >= 1 and "CG" in curves:
            curves["CG"].append(_point(prob, hg.CG(iters=h, tol=cfg.cg_tol), h))
        if 1 <= h <= n and "Nystrom" in curves:  # rank n is already exact: nothing to buy beyond it
            curves["Nystrom"].append(_point(prob, hg.Nystrom(rank=h, seed=cfg.seed), h))
        if h >= 1 and "Unrolled" in curves:
            curves["Unrolled"].append(_point(prob, hg.Unrolled(steps=h, lr=alpha), h, cold=True))
        if h >= 2 and "FirstOrder" in curves:  # 4K + 2 gradients ≈ 2K + 1 HVPs: K = ⌊h/2⌋
            method = hg.FirstOrder(sigma=cfg.sigma, steps=h // 2, lr=alpha)
            curves["FirstOrder"].append(_point(prob, method, h))
        if progress:
            progress(5 * h)
    return ProblemCurves(prob.name, prob.summary(), alpha, curves)


def compare(config: CompareConfig | None = None, *, progress: Progress | None = None) -> CompareResult:
    """Run the comparison on every problem of the configuration; returns the curves (no printing)."""
    cfg = CompareConfig() if config is None else config
    cfg.validate()
    out, timings = [], {}
    for name in cfg.problems:
        t0 = time.perf_counter()
        prob = load_problem(name, n_train=cfg.n_train, decay=cfg.decay, seed=cfg.seed)
        t1 = time.perf_counter()
        out.append(compare_problem(prob, cfg, progress=progress))
        timings[f"{name}_problem"] = t1 - t0
        timings[f"{name}_methods"] = time.perf_counter() - t1
    return CompareResult(cfg, out, timings)


def compare_config(cfg: Config) -> CompareConfig:
    """The :class:`CompareConfig` of a resolved configuration (dotted keys of :data:`SCHEMA`)."""
    return settings(CompareConfig, SCHEMA, cfg)


def check(cfg: Config) -> CompareConfig:
    """Values the schema cannot judge alone (α's range, the decay interval), before any work."""
    settings: CompareConfig = check_settings(cfg, compare_config)
    return settings


HEADER = (
    "Cosine similarity / relative L2 distance to the exact hypergradient, per HVP budget.\n"
    "Neumann with h HVPs is unrolling h+1 steps from w* (the theorem: `hypergradients explain`);\n"
    "Unrolled starts from w0 = 0. Nystrom stops at rank = number of weights (exact there).\n"
    "AdamIdentity: p = lr·v/(sqrt(v̂)+eps) from an Adam run's state, no HVP. FirstOrder: no HVP,\n"
    "4K+2 gradients for K = h//2 steps, at an HVP counted as 2 gradients (equal cost).\n"
)


def _run(ctx: RunContext) -> ExperimentResult:
    """Measure, then write ``compare.json``, ``compare.md``, the figure and ``report.md`` into ``ctx.out``."""
    from ...training.files import write_atomic

    cfg, t0 = ctx.config, time.perf_counter()
    settings: CompareConfig = begin(ctx, check)
    with ProgressBar(settings.cost(), desc="compare", enabled=ctx.progress) as bar:
        result = compare(settings, progress=bar.update)
    summary = result.to_json()
    table = result.table()
    figures: list[Path] = []
    if cfg["figures"]:
        from .figures import compare_figure  # matplotlib: only when figures are drawn

        figures = [compare_figure(summary, ctx.out, labels=LABELS)]
    summary["figures"] = [f.name for f in figures]
    md = write_atomic(ctx.out / "compare.md", table + "\n")
    columns = ["problem", "method", "budget", "hvps", "cosine", "rel_dist"]
    rows = [
        {"problem": pr.name, "method": m, **{k: p[k] for k in columns[2:]}}
        for pr in result.problems
        for m in pr.curves
        for h in result.table_budgets()
        for p in [pr.at(m, h)]
        if p is not None and (m not in LEVELS or h == 0)
    ]
    body = [HEADER.replace("\n", " ").strip(), "", table, *[f"![{f.stem}]({f.name})" for f in figures]]
    return finish(
        ctx,
        t0,
        title="compare: inverse-Hessian approximations against the exact hypergradient, per HVP",
        columns=columns,
        rows=rows,
        result=summary,
        result_name="compare.json",
        body=body,
        figures=figures,
        also=[md],
        text=HEADER + "\n" + table,
    )


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="compare",
    summary="compare inverse-Hessian approximations against the exact hypergradient",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    resumable=False,
)
