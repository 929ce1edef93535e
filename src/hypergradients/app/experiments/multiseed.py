"""Several seeds of one experiment, and the statistics that compare its arms over them.

A run of ``seeds = S`` is ``S`` one-seed runs of the same settings, with ``seed``, ``seed + 1``, …,
one after another, each in its own folder ``seed<N>`` (its ``config.toml`` says ``seeds = 1`` and its
own seed, so ``hypergradients export`` / ``retrain`` read it as the one-seed run it is); a run of one
seed keeps the one-seed layout in the run folder itself. :func:`seed_runs` gives each seed's
:class:`~.base.RunContext`; the experiment runs its one-seed body in each and writes the aggregate.

The statistics (:func:`across`): where two arms are compared on the same test examples in every
seed, each seed gives a difference ``d_s`` and its paired standard error ``se_s`` over the test
examples. Over ``S`` seeds the mean difference has two standard errors: ``sqrt(Σ se_s²) / S`` from
the test examples (how well each seed's test set measures its two models) and ``std(d_s) / √S`` from
the seeds (how much the difference changes with the initial weights, the data order, the split).
The verdict uses the larger, so that neither source of noise is ignored.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Config, Option
from .base import RunContext
from .shared import Verdict, paired_se, versus

__all__ = [
    "SEEDS",
    "Across",
    "across",
    "mean_std",
    "merge_seed_metrics",
    "plot_against_tuner",
    "plot_seed_curves",
    "pm",
    "se_words",
    "seed_list",
    "seed_runs",
    "turning",
    "versus_across",
]

SEEDS = Option(
    3,
    "how many seeds: seed, seed+1, ... one after another (each in a folder seed<N> when "
    "more than one); the report gives mean ± std over them and paired differences",
    int,
    low=1,
)


def seed_list(cfg: Config) -> list[int]:
    """``seed, seed + 1, …`` (``seeds`` of them; one where the schema has no ``seeds``)."""
    return [int(cfg["seed"]) + i for i in range(int(cfg.get("seeds", 1)))]


def seed_runs(ctx: RunContext) -> Iterator[tuple[int, RunContext]]:
    """Each seed and its context: the same settings with that ``seed`` and ``seeds = 1``, in
    ``ctx.out/seed<N>`` (``ctx.out`` itself for a run of one seed); the data ``check`` loaded goes to
    the first seed only (it was loaded with that seed)."""
    seeds = seed_list(ctx.config)
    for s in seeds:
        cfg = {**ctx.config, "seed": s}
        if "seeds" in cfg:
            cfg["seeds"] = 1
        out = ctx.out if len(seeds) == 1 else ctx.out / f"seed{s}"
        yield s, replace(ctx, config=cfg, out=out, data=ctx.data if s == seeds[0] else None)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    m = statistics.fmean(xs)
    return m, statistics.stdev(xs) if len(xs) > 1 else float("nan")


def pm(xs: Sequence[float], digits: str = ".4g") -> str:
    """``mean ± std`` of ``xs`` as text (the mean alone for one value)."""
    m, s = mean_std(xs)
    return f"{m:{digits}}" if not math.isfinite(s) else f"{m:{digits}} ± {s:.2g}"


@dataclass(frozen=True)
class Across:
    """Arm A minus arm B over seeds: per seed the difference ``diffs[s]`` of the means over the same
    test examples and its paired standard error ``ses[s]``; their ``mean``; ``se_examples``
    (``sqrt(Σ se_s²)/S``), ``se_seeds`` (``std(d_s)/√S``, NaN for one seed) and ``se``, the larger
    (the one a verdict uses)."""

    a: list[float]
    b: list[float]
    diffs: list[float]
    ses: list[float]
    mean: float
    se_examples: float
    se_seeds: float
    se: float

    @property
    def seeds(self) -> int:
        return len(self.diffs)

    def text(self) -> str:
        """``d ± se`` with where the standard error comes from."""
        return f"{self.mean:+.3g} ± {self.se:.2g}"


def across(pairs: Sequence[tuple[Tensor, Tensor]]) -> Across:
    """:class:`Across` from one ``(a, b)`` pair of per-example values per seed (the same examples in
    both of a pair)."""
    if not pairs:
        raise ValueError("across() needs at least one seed's pair of per-example values")
    a = [float(x.double().mean()) for x, _ in pairs]
    b = [float(y.double().mean()) for _, y in pairs]
    d = [x - y for x, y in zip(a, b, strict=True)]
    ses = [paired_se(x, y) for x, y in pairs]
    n = len(d)
    se_ex = math.sqrt(sum(s * s for s in ses)) / n
    se_seeds = statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    se = max(se_ex, se_seeds) if math.isfinite(se_seeds) else se_ex
    return Across(a, b, d, ses, statistics.fmean(d), se_ex, se_seeds, se)


def se_words(x: Across) -> str:
    """Which standard error a verdict on ``x`` used, in words."""
    if x.seeds == 1:
        return "paired standard error over the test examples, one seed"
    which = "over the seeds" if x.se_seeds > x.se_examples else "over the test examples"
    return (
        f"{x.seeds} seeds; the larger standard error, {which} (test examples {x.se_examples:.2g}, "
        f"seeds {x.se_seeds:.2g})"
    )


def versus_across(
    a: str, b: str, x: Across, *, metric: str, higher_is_better: bool, digits: str = ".4g"
) -> Verdict:
    """:func:`.shared.versus` on the means over seeds with :class:`Across`'s standard error."""
    return versus(
        a,
        b,
        statistics.fmean(x.a),
        statistics.fmean(x.b),
        x.se,
        metric=metric,
        higher_is_better=higher_is_better,
        se_what=se_words(x),
        no_se="no standard error: no noise estimate",
        digits=digits,
    )


def plot_seed_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    path: Path,
    *,
    keys: Sequence[str],
    x: str = "inner_steps",
    title: str = "",
    colors: Mapping[str, Any] | None = None,
    logy: bool = False,
) -> Path:
    """One panel per metric in ``keys``; per run name (``histories[name]``: one list of round records
    per seed) one line per seed in the run's colour, labelled once."""
    import matplotlib.pyplot as plt

    colors = colors or {}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 3.7), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, (name, seeds) in enumerate(histories.items()):
            c = colors.get(name, f"C{i}")
            labelled = False
            for hist in seeds:
                pts = [(r[x], r[key]) for r in hist if r.get(key) is not None and math.isfinite(r[key])]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True), color=c, lw=1.3, alpha=0.85, label=None if labelled else name
                    )
                    labelled = True
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(key.replace("_", " "))
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def turning(
    hist: Sequence[Mapping[str, Any]], key: str = "val_loss", x: str = "inner_steps"
) -> tuple[float, float, float, float] | None:
    """Where ``key`` was lowest and where it ended: ``(x at the minimum, the minimum, the last x, the
    last value)``; ``None`` without the key. A last value above the minimum is a curve that turned
    up: the arm overfits."""
    pts = [(float(r[x]), float(r[key])) for r in hist if r.get(key) is not None and math.isfinite(r[key])]
    if not pts:
        return None
    best = min(pts, key=lambda p: p[1])
    return best[0], best[1], pts[-1][0], pts[-1][1]


def merge_seed_metrics(out: Path, seeds: Sequence[int]) -> None:
    """The run folder's ``metrics.jsonl`` of a run of several seeds: every seed's records (from its
    folder's ``metrics.jsonl``), each tagged with its ``seed`` first."""
    import json

    from ...training.files import json_dumps, write_atomic

    lines = []
    for s in seeds:
        for line in (out / f"seed{s}" / "metrics.jsonl").read_text().splitlines():
            lines.append(json_dumps({"seed": s, **json.loads(line)}) + "\n")
    write_atomic(out / "metrics.jsonl", "".join(lines))


def plot_against_tuner(
    path: Path,
    curves: Mapping[str, Sequence[Sequence[tuple[float, float, float]]]],
    tuner: Sequence[Sequence[Mapping[str, Any]]],
    *,
    metric: str,
    title: str,
    colors: Mapping[str, Any] | None = None,
    tuner_name: str = "Optuna TPE",
) -> Path:
    """The test metric of hypergradient arms and of a black-box tuner, against inner steps (left) and
    wall time (right), one line per seed.

    ``curves[name]``: per seed the arm's ``(inner steps, seconds, metric)`` at its evaluations (a
    single one is drawn as a marker);
    ``tuner``: per seed its trials in order, each with ``steps`` (all trials' inner steps so far),
    ``elapsed_s``, ``val`` (what it selects on, lower is better) and ``test`` (the metric): drawn is
    the incumbent, the test metric of the best-validation trial so far."""
    import matplotlib.pyplot as plt

    colors = dict(colors or {})
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for col, ax, label in (
        (0, axes[0], "inner steps (a tuner: all its trials)"),
        (1, axes[1], "wall time (s)"),
    ):
        for i, (name, seeds) in enumerate(curves.items()):
            c = colors.get(name, f"C{i}")
            for j, pts in enumerate(seeds):
                if pts:  # an arm tested once (at its end) is a point per seed
                    ax.plot(
                        [p[col] for p in pts],
                        [p[2] for p in pts],
                        color=c,
                        lw=1.2,
                        marker="s" if len(pts) == 1 else None,
                        label=name if j == 0 else None,
                    )
        c = colors.get(tuner_name, "C4")
        for j, trials in enumerate(tuner):
            best: Mapping[str, Any] | None = None
            xs, ys = [], []
            for t in trials:
                if best is None or t["val"] < best["val"]:
                    best = t
                xs.append(float(t["steps"] if col == 0 else t["elapsed_s"]))
                ys.append(float(best["test"]))
            ax.step(
                xs,
                ys,
                where="post",
                color=c,
                lw=1.4,
                label=f"{tuner_name} (best-validation trial so far)" if j == 0 else None,
            )
            ax.plot(xs, ys, "o", color=c, ms=3)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
