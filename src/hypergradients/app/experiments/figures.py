"""PNG figures for ``explain`` and ``compare`` (matplotlib's object API: no pyplot global state), drawn
from their result files' content (``explain.json``, ``compare.json``), so a saved run can be drawn again.

Small on purpose (4.6 to 8.4 inches wide at 100 dpi): they are committed under ``docs/figures/``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ...training.files import write_atomic

Summary = Mapping[str, Any]

DPI = 100
EPS64 = 2.220446049250313e-16


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buf.getvalue())  # an interrupted run leaves no half PNG


def explain_figures(summary: Summary, out_dir: Path) -> list[Path]:
    """``explain_cosine.png`` (cosine and distance to ``g*`` against K), ``explain_theorem.png``, and when
    the result has them ``explain_optimizers.png`` and ``explain_noise.png``."""
    T = summary["truncate"]
    name = summary["problem"]["name"]
    curves = [
        ("unrolled from $w^*$ = Neumann($K$)", summary["theorem"], "o-", "C0"),
        ("unrolled from $w_0=0$", summary["cold_start"], "s-", "C1"),
        (f"truncated ($T={T}$) from $w_0=0$", summary["truncated"], "^-", "C2"),
        (r"mistaken: $-\alpha\,\Sigma_k M_k$ from $w_0=0$", summary["mistaken"], "x--", "C3"),
    ]
    fig = Figure(figsize=(8.4, 3.3))
    ax1, ax2 = fig.subplots(1, 2)
    for label, rows, style, color in curves:
        ks = [r["K"] for r in rows]
        ax1.plot(ks, [r["cosine"] for r in rows], style, color=color, label=label, ms=4)
        ax2.plot(ks, [max(r["rel_dist"], EPS64) for r in rows], style, color=color, label=label, ms=4)
    ax1.axhline(summary["neumann_T_cosine"], color="C2", ls=":", lw=1, label=f"Neumann($T={T}$)")
    ax1.set(
        xscale="log",
        xlabel="steps $K$",
        ylabel="cosine to exact IFT hypergradient",
        title=f"{name}: path vs implicit",
        ylim=(-0.05, 1.05),
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="steps $K$",
        ylabel=r"$\|g - g^*\| / \|g^*\|$",
        title=r"relative distance to $g^*$",
    )
    for ax in (ax1, ax2):
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    paths = [_save(fig, out_dir / "explain_cosine.png")]

    fig = Figure(figsize=(4.6, 3.2))
    ax = fig.subplots()
    theorem = summary["theorem"]
    ks = [r["K"] for r in theorem]
    ax.plot(
        ks,
        [max(r["rel_diff"], EPS64 / 10) for r in theorem],
        "o-",
        color="C0",
        label="unrolled from $w^*$ vs Neumann($K$)",
    )
    ax.plot(
        ks,
        [max(r["rel_dist"], EPS64 / 10) for r in theorem],
        "s--",
        color="C3",
        label="Neumann($K$) vs exact IFT",
    )
    ax.axhline(EPS64, color="k", lw=0.8, ls=":", label="float64 eps")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="steps / terms $K$",
        ylabel="relative difference",
        title="the Neumann–SGD theorem in float64",
    )
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "explain_theorem.png"))
    if summary.get("momentum"):
        paths.append(_optimizers_figure(summary, out_dir))
    if summary.get("noise"):
        paths.append(_noise_figure(summary, out_dir))
    return paths


def _optimizers_figure(summary: Summary, out_dir: Path) -> Path:
    """``explain_optimizers.png``: distance to ``g*`` against K from ``w*`` for Neumann (= GD), heavy-ball
    (the configured β and the optimal pair), Nesterov and Adam with a trained ``v``, with predicted rates."""
    m, a = summary["momentum"], summary["adam"]["warm_state"]
    c = m["curves"]
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.subplots()
    ks = c["K"]
    ax.plot(
        ks,
        [max(x, EPS64) for x in c["neumann"]],
        "-",
        color="C0",
        label=rf"GD = Neumann, $\alpha={m['alpha']:.3g}$",
    )
    ax.plot(
        ks,
        [max(x, EPS64) for x in c["heavy_ball"]],
        "-",
        color="C1",
        label=rf"heavy-ball $\alpha={m['alpha']:.3g}, \beta={m['beta']:g}$",
    )
    ax.plot(
        ks,
        [max(x, EPS64) for x in c["heavy_ball_optimal"]],
        "-",
        color="C2",
        label=rf"heavy-ball $\alpha^*={m['alpha_opt']:.3g}, \beta^*={m['beta_opt']:.3f}$",
    )
    ax.plot(
        ks,
        [max(x, EPS64) for x in c["nesterov"]],
        "-",
        color="C3",
        label=rf"Nesterov $\alpha={m['nesterov_alpha']:.3g}, \beta={m['nesterov_beta']:.3f}$",
    )
    rows = m["rows"]
    ax.plot(
        [r["K"] for r in rows],
        [max(r["rel_dist"], EPS64) for r in rows],
        "o",
        color="C1",
        ms=4,
        label="unrolled hg.optim.heavy_ball",
    )
    ax.plot(
        [r["K"] for r in rows],
        [max(r["optimal_rel_dist"], EPS64) for r in rows],
        "s",
        color="C2",
        ms=4,
        mfc="none",
        label="unrolled, optimal pair",
    )
    ax.plot(
        [r["K"] for r in rows],
        [max(r["nesterov_rel_dist"], EPS64) for r in rows],
        "^",
        color="C3",
        ms=4,
        mfc="none",
        label="unrolled hg.optim.nesterov",
    )
    ax.plot(
        [r["K"] for r in a["rows"]],
        [max(r["rel_dist"], EPS64) for r in a["rows"]],
        "D--",
        color="C4",
        ms=4,
        label=f"unrolled hg.optim.adam, trained $v$ (lr={summary['adam']['lr']:g})",
    )
    for rate, color in ((m["rate_neumann_theory"], "C0"), (m["rate_optimal_theory"], "C2")):
        ax.plot(ks, [max(rate**k, EPS64) for k in ks], ":", color=color, lw=1)
    ax.axhline(EPS64, color="k", lw=0.8, ls=":")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="steps $K$ from $w^*$ (one HVP each)",
        ylabel=r"$\|g_K - g^*\| / \|g^*\|$",
        ylim=(1e-16, 3),
        title=rf"beyond plain GD ($\kappa={m['kappa']:.0f}$; dotted: $(1-1/\kappa)^K$, "
        r"$((\sqrt{\kappa}-1)/(\sqrt{\kappa}+1))^K$)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_dir / "explain_optimizers.png")


def _noise_figure(summary: Summary, out_dir: Path) -> Path:
    """``explain_noise.png``: every batch order's cosine and distance to ``g*`` against K, per batch size,
    the mean as a line, and the full-batch value (Neumann(K)) dashed."""
    rows = summary["noise"]["rows"]
    sizes = sorted({r["batch_size"] for r in rows})
    fig = Figure(figsize=(8.4, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, b in enumerate(sizes):
        rs = sorted((r for r in rows if r["batch_size"] == b), key=lambda r: r["K"])
        ks = [r["K"] for r in rs]
        color = f"C{i + 1}"
        shift = 1.0 + 0.06 * (i - (len(sizes) - 1) / 2)  # side by side, not on top of each other
        for r in rs:
            xs = [r["K"] * shift] * len(r["cosines"])
            ax1.plot(xs, r["cosines"], ".", color=color, alpha=0.35, ms=3)
            ax2.plot(xs, r["rel_dists"], ".", color=color, alpha=0.35, ms=3)
        ax1.plot(ks, [r["cosine_mean"] for r in rs], "-", color=color, label=f"batch {b}: mean over orders")
        ax2.plot(
            ks, [r["mean_rel_dist"] for r in rs], "-", color=color, label=f"batch {b}: mean hypergradient"
        )
    full = sorted((r for r in rows if r["batch_size"] == sizes[0]), key=lambda r: r["K"])
    ax1.plot(
        [r["K"] for r in full],
        [r["neumann_cosine"] for r in full],
        "k--",
        lw=1,
        label="full batch = Neumann($K$)",
    )
    ax2.plot(
        [r["K"] for r in full],
        [r["neumann_rel_dist"] for r in full],
        "k--",
        lw=1,
        label="full batch = Neumann($K$)",
    )
    ax1.set(
        xscale="log",
        xlabel="SGD steps $K$ from $w^*$",
        ylabel="cosine to exact IFT hypergradient",
        title=f"minibatch SGD, {summary['noise']['orders']} orders each",
        ylim=(-1.05, 1.05),
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="SGD steps $K$ from $w^*$",
        ylabel=r"$\|g - g^*\| / \|g^*\|$",
        title="each order (dots), the mean (line)",
    )
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out_dir / "explain_noise.png")


def compare_figure(summary: Summary, out_dir: Path, *, labels: Mapping[str, str]) -> Path:
    """``compare.png``: per problem, cosine (top) and relative distance (bottom) against HVPs; ``labels``
    names the methods in the legend."""
    problems = summary["problems"]
    n = len(problems)
    fig = Figure(figsize=(4.2 * n, 6.0))
    axes = fig.subplots(2, n, squeeze=False)
    styles = {
        "Neumann": "o-",
        "CG": "s-",
        "Identity": "k--",
        "Nystrom": "D-",
        "Unrolled": "^-",
        "FirstOrder": "v-",
    }
    levels = {"Identity": "k", "AdamIdentity": "tab:gray"}
    for j, pr in enumerate(problems):
        top, bottom = axes[0][j], axes[1][j]
        for method, pts in pr["curves"].items():
            # FirstOrder spends gradients, no HVP: drawn at its cost, an HVP counted as two gradients
            xs = [p["grad_evals"] / 2 if "grad_evals" in p else p["hvps"] for p in pts]
            style = styles.get(method, "-")
            if method in levels and pts:  # zero HVPs: a level, drawn across the budget
                label = labels.get(method, method)
                top.axhline(pts[0]["cosine"], color=levels[method], ls="--", lw=1, label=label)
                bottom.axhline(pts[0]["rel_dist"], color=levels[method], ls="--", lw=1, label=label)
                continue
            top.plot(xs, [p["cosine"] for p in pts], style, ms=3, label=labels.get(method, method))
            bottom.plot(
                xs, [max(p["rel_dist"], EPS64) for p in pts], style, ms=3, label=labels.get(method, method)
            )
        top.set(
            title=f"{pr['name']} ({pr['problem']['n_weights']} weights)",
            ylabel="cosine to exact",
            ylim=(-0.05, 1.05),
        )
        bottom.set(
            xlabel="Hessian-vector products (or gradients/2)", ylabel="relative L2 distance", yscale="log"
        )
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
        if j == 0:
            top.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_dir / "compare.png")
