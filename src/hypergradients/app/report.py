"""Figures (matplotlib, Agg backend: no display needed) and the run's ``report.md``.

Library functions here write files and return their paths; they never print.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to PNG files only
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from ..hparams import Noise
from ..hparams.augment import AugmentNet


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, ints with thousands separators; a missing value
    (``None``, as a NaN reads back from a JSON file: JSON has no NaN) and a non-finite one as ``n/a``."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) in the order of ``columns``."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def text_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width plain-text table for the terminal."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in cells:
        pairs = enumerate(zip(row, widths, strict=True))
        out.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in pairs))
    return "\n".join(out)


def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    *,
    keys: Sequence[str] = ("val_loss", "test_loss"),
    x: str = "inner_steps",
    title: str = "",
    colors: Mapping[str, Any] | None = None,
) -> Path:
    """One panel per metric in ``keys``, one line per run, against ``x`` (records lacking a key skipped).

    ``colors[name]`` fixes a run's colour (any matplotlib colour), so that it is the same in every
    figure; runs not named there take matplotlib's colour cycle.
    """
    colors = colors or {}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, hist in histories.items():
            pts = [(r[x], r[key]) for r in hist if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, lw=1.6, color=colors.get(name))
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decays(
    values: Mapping[str, Tensor],
    path: Path,
    *,
    init: float | None = None,
    trajectories: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    colors: Mapping[str, Any] | None = None,
) -> Path:
    """Histogram of learned decays (log10), one per run; optionally their trajectories beside it.

    ``values[name]`` holds all the learned decays of a run (one for a global decay, one per
    weight for per-weight decay); a run with a single value is drawn as a vertical line.
    ``colors`` maps the names of ``values`` and ``trajectories`` to colours (as in :func:`plot_curves`);
    others take matplotlib's colour cycle, in the same order in both panels.
    """
    colors = dict(colors or {})
    for i, name in enumerate([*values, *(trajectories or {})]):
        colors.setdefault(name, f"C{i}")
    ncols = 2 if trajectories else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.6 * ncols, 3.8), squeeze=False)
    ax = axes[0][0]
    for name, v in values.items():
        logv = torch.log10(v.detach().double().reshape(-1).clamp_min(1e-30))
        if logv.numel() == 1:
            ax.axvline(
                float(logv[0]),
                ls="--",
                lw=1.8,
                label=f"{name} ({float(v.reshape(-1)[0]):.3g})",
                color=colors[name],
            )
        else:
            ax.hist(
                logv.numpy(),
                bins=80,
                alpha=0.75,
                label=f"{name} ({logv.numel():,} values)",
                color=colors[name],
            )
    if init is not None:
        ax.axvline(math.log10(init), color="k", lw=1, ls=":", label=f"initial ({init:g})")
    ax.set_xlabel("log10 weight decay")
    ax.set_ylabel("count")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("learned weight decay")
    if trajectories:
        ax2 = axes[0][1]
        for name, pts in trajectories.items():
            if pts:
                ax2.plot(*zip(*pts, strict=True), label=name, color=colors[name])
        ax2.set_yscale("log")
        ax2.set_xlabel("inner steps")
        ax2.set_ylabel("weight decay")
        ax2.set_title("decay during training")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_augmented(
    fam: AugmentNet, x: Tensor, path: Path, *, stages: Sequence[tuple[str, Mapping[str, Tensor]]] = ()
) -> Path:
    """Test images (top row), their augmentation by the network's weights (one row per ``(label,
    weights)`` of ``stages``, e.g. snapshots during training; default: the current weights, one
    row), and the change ``a(x, ε) − x`` of the last of them (bottom row).

    Every image is drawn on one fixed scale, the originals' range over the batch (for MNIST,
    [0, 1]; values beyond it clip), never rescaled to its own range, so that a brightness offset
    shows as one. The change row uses a symmetric
    colour scale shared by the row, its range in the row's label. One noise draw (``Noise(0)``, in
    the network's noise shape) serves every row, so rows differ only by the weights."""
    rows_h = list(stages) or [("augmented", fam.tensors())]
    eps = fam.draw(x, Noise(0).sampler())
    with torch.no_grad():
        augmented = [(label, fam.augment(x, h, eps)) for label, h in rows_h]
    lo, hi = float(x.min()), float(x.max())
    hi = hi if hi > lo else lo + 1.0
    change = (augmented[-1][1] - x).double().cpu()
    largest = float(change.abs().max())
    m = largest or 1.0
    rows = [("original", x), *augmented]
    fig, axes = plt.subplots(
        len(rows) + 1, len(x), figsize=(1.1 * len(x), 1.25 * (len(rows) + 1)), squeeze=False
    )
    for r, (label, imgs) in enumerate(rows):
        for j in range(len(x)):
            img = ((imgs[j].double().cpu() - lo) / (hi - lo)).clamp(0, 1)
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            axes[r][j].imshow(img.numpy(), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[r][0].set_ylabel(label, fontsize=7)
    for j in range(len(x)):
        axes[-1][j].imshow(change[j].mean(0).numpy(), cmap="bwr", vmin=-m, vmax=m)
    axes[-1][0].set_ylabel(f"a(x) − x\n(±{largest:.2g})", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.1, right=0.99, bottom=0.01, top=0.99, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
