"""``lstm-dropout``: a 2-layer LSTM language model with per-unit dropout and DropConnect tuned by IFT,
against fixed dropout and (optionally) Optuna tuning the fixed dropout rates (the paper's §5.3 setting).

The model: embedding → LSTM → LSTM → linear decoder, word level, on a text corpus
(:mod:`hypergradients.app.corpus`: the PTB files in ``data.root``, else the King James Bible shipped
with the package). Arms, each from the same initial weights on the same batches:

* ``ift``    — per-unit concrete dropout (:class:`~hypergradients.hparams.Dropout`, one keep
  probability per unit, the same mask at every time step) on the inputs of both LSTMs and of the
  decoder, and per-weight concrete DropConnect (:class:`~hypergradients.hparams.DropConnect`) on
  both hidden-to-hidden matrices, tuned by Algorithm 1 with IFT-Neumann hypergradients on the
  validation loss;
* ``fixed``  — ordinary (``nn.Dropout``) dropout with one fixed rate ``fixed.dropout`` at the
  same three places, no DropConnect;
* ``none``   — no dropout (off by default);
* ``optuna`` — Optuna's TPE sampler tuning the three dropout rates of the ``fixed`` model, each
  trial a full training run, given the ``ift`` arm's wall time (off by default: needs the
  ``optuna`` extra; see :mod:`.optuna_arm`).

The metric is perplexity ``exp(mean cross-entropy per token)`` on the validation and test text;
the test text is only evaluated. The ``full`` configuration (``--config`` with the keys of
:data:`FULL`) is the paper's 650-unit model on PTB for a GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...hparams import DropConnect, Dropout, Family, describe
from ...training.files import json_dumps, read_json, write_atomic
from ..config import Config, ConfigError, Option
from ..corpus import Corpus, batchify, load_corpus
from ..datasets import DataFormatError, DataUnavailableError
from ..progress import Progress
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .base import with_preset as _with_preset
from .optuna_arm import Space, incumbent, require_optuna, time_to_match, tpe
from .shared import (
    ArmsProgress,
    RunMetrics,
    begin,
    finish,
    hyper_steps,
    paired_se,
    per_example,
    train_arm,
    versus,
    what_it_shows,
)

ARMS = ("ift", "fixed", "none", "optuna")
ARM_NAMES = {
    "ift": "dropout + DropConnect (IFT)",
    "fixed": "fixed dropout",
    "none": "no dropout",
    "optuna": "dropout rates by Optuna TPE",
}
SITES = ("rnn0:input", "rnn1:input", "decoder:input")
RECURRENT = ("rnn0.weight_hh_l0", "rnn1.weight_hh_l0")

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "seed of the initial weights, the data order and the noise", int, low=0),
    "threads": Option(1, "CPU threads for torch", int, low=1),
    "config": Option(
        "cpu",
        "cpu: the defaults below; full: the paper's 650-unit model on PTB from data.root, for a GPU "
        "(the keys of FULL still at their defaults)",
        str,
        choices=("cpu", "full"),
    ),
    "arms": Option(
        ["ift", "fixed"],
        "which runs to train side by side (optuna needs the optuna extra)",
        list,
        choices=ARMS,
        nonempty=True,
        unique=True,
    ),
    "data.root": Option(
        "",
        "folder with ptb.train.txt/ptb.valid.txt/ptb.test.txt (empty: the King James Bible shipped with "
        "the package)",
        str,
    ),
    "data.vocab": Option(2000, "vocabulary size (<unk> and <eos> included)", int, low=3),
    "data.seq_len": Option(35, "tokens per training sequence (truncated backpropagation length)", int, low=1),
    "data.train_tokens": Option(100_000, "training tokens used (0: all)", int, low=0),
    "data.eval_tokens": Option(20_000, "validation and test tokens used (0: all)", int, low=0),
    "model.embed": Option(64, "embedding width", int, low=1),
    "model.hidden": Option(64, "units of each LSTM layer", int, low=1),
    "train.rounds": Option(60, "rounds of Algorithm 1 (each: inner steps, then one hyper step)", int, low=1),
    "train.inner_steps": Option(10, "inner Adam steps per round", int, low=1),
    "train.batch_size": Option(32, "sequences per training batch", int, low=1),
    "train.lr": Option(3e-3, "inner Adam learning rate", float, positive=True),
    "hyper.iters": Option(5, "Neumann terms", int, low=1),
    "hyper.power_iters": Option(5, "power iterations behind α = 1/λ_max", int, low=1),
    "hyper.lr": Option(
        1e-2, "hyper learning rate (Adam on the keep-probability logits)", float, positive=True
    ),
    "hyper.val_batch_size": Option(64, "validation sequences per ∂L_V/∂w (0: all)", int, low=0),
    "dropout.init": Option(
        0.9, "initial keep probability of the tuned dropout and DropConnect", float, low=0.01, high=0.99
    ),
    "fixed.dropout": Option(0.2, "dropout rate of the fixed arm at every site", float, low=0.0, high=0.95),
    "optuna.budget_s": Option(
        "auto",
        "wall-clock budget of the optuna arm (auto: the ift arm's wall time)",
        float,
        auto=True,
        positive=True,
    ),
    "optuna.max_dropout": Option(
        0.7, "upper end of each dropout rate's search interval [0, max]", float, low=0.01, high=0.95
    ),
    "eval_every": Option(5, "rounds between evaluations of validation and test perplexity", int, low=1),
    "checkpoint_every": Option(20, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "data.vocab": 50,
    "data.seq_len": 8,
    "data.train_tokens": 400,
    "data.eval_tokens": 100,
    "model.embed": 8,
    "model.hidden": 8,
    "train.rounds": 2,
    "train.inner_steps": 2,
    "train.batch_size": 4,
    "hyper.iters": 2,
    "hyper.power_iters": 2,
    "hyper.val_batch_size": 0,
    "eval_every": 1,
    "checkpoint_every": 1,
}

# The paper's setting (Zaremba et al.'s medium model): 650 units, PTB, for a GPU.
FULL: dict[str, Any] = {
    "data.vocab": 10_000,
    "data.train_tokens": 0,
    "data.eval_tokens": 0,
    "model.embed": 650,
    "model.hidden": 650,
    "train.rounds": 2000,
    "train.batch_size": 20,
    "train.lr": 1e-3,
    "hyper.iters": 10,
    "fixed.dropout": 0.5,
    "eval_every": 50,
}


def with_preset(cfg: Config) -> Config:
    """``cfg`` with ``config=full`` applied: each key of :data:`FULL` that still has its default takes
    the full value (a key the user set keeps the user's value)."""
    return _with_preset(cfg, FULL, SCHEMA)


class LSTMLanguageModel(nn.Module):
    """``embed → dropout → LSTM → dropout → LSTM → dropout → linear``: logits ``(B, T, V)`` of the next
    token. The ``nn.Dropout`` rates ``drop`` (embedding, between the layers, before the decoder) are the
    fixed arm's; the tuned arm keeps them 0 and drops the same units through :class:`Dropout` hooks."""

    def __init__(
        self, vocab: int, embed: int, hidden: int, drop: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.drop0, self.drop1, self.drop2 = (nn.Dropout(p) for p in drop)
        self.rnn0 = nn.LSTM(embed, hidden, batch_first=True)
        self.rnn1 = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn0(self.drop0(self.embed(x)))
        h, _ = self.rnn1(self.drop1(h))
        return self.decoder(self.drop2(h))


def sequence_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sequence mean cross-entropy per token ``(B,)``; with equal-length sequences its mean is the
    mean per token, whose exponential is the perplexity."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def check(cfg: Config) -> Corpus:
    """Load the corpus (PTB from data.root, else the King James Bible) before any file is written."""
    cfg = with_preset(cfg)
    if "optuna" in cfg["arms"]:
        try:
            require_optuna()
        except ImportError as e:
            raise ConfigError(f"config key 'arms': {e}") from None
        if cfg["optuna.budget_s"] == "auto" and "ift" not in cfg["arms"]:
            raise ConfigError(
                "config key 'optuna.budget_s': 'auto' takes the ift arm's wall time, and arms "
                "has no 'ift': give a number of seconds"
            )
    try:
        corpus = load_corpus(cfg["data.root"] or None, vocab_size=cfg["data.vocab"])
    except (DataUnavailableError, DataFormatError) as e:
        raise ConfigError(f"config key 'data.root': got {cfg['data.root']!r}. {e}") from None
    for key, ids in (
        ("data.train_tokens", corpus.train),
        ("data.eval_tokens", corpus.valid),
        ("data.eval_tokens", corpus.test),
    ):
        try:
            batchify(ids, cfg["data.seq_len"], max_tokens=cfg[key])
        except ValueError as e:
            raise ConfigError(
                f"config key 'data.seq_len': {cfg['data.seq_len']} with {key}={cfg[key]}: {e}"
            ) from None
    return corpus


def _model(cfg: Config, corpus: Corpus, drop: tuple[float, float, float], device: torch.device) -> nn.Module:
    torch.manual_seed(cfg["seed"])  # the same initial weights for every arm and trial
    return LSTMLanguageModel(corpus.vocab_size, cfg["model.embed"], cfg["model.hidden"], drop).to(device)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _run(ctx: RunContext) -> ExperimentResult:
    """Train the arms; write config.toml, lstm_dropout.json, metrics.jsonl, the figure and the report."""
    ctx = replace(ctx, config=with_preset(ctx.config))   # what the run uses, and its config.toml
    cfg, t0 = ctx.config, time.perf_counter()
    arms: list[str] = list(cfg["arms"])
    corpus: Corpus = begin(ctx, check, arms=[ctx.out / arm for arm in arms],
                           resumed=[ctx.out / arm for arm in arms if arm != "optuna"])   # optuna keeps none
    seq = cfg["data.seq_len"]
    data = {
        "train": batchify(corpus.train, seq, max_tokens=cfg["data.train_tokens"]),
        "val": batchify(corpus.valid, seq, max_tokens=cfg["data.eval_tokens"]),
        "test": batchify(corpus.test, seq, max_tokens=cfg["data.eval_tokens"]),
    }
    data = {k: (x.to(ctx.device), y.to(ctx.device)) for k, (x, y) in data.items()}
    # optuna last: its budget is the ift arm's wall time
    order = [a for a in arms if a != "optuna"] + (["optuna"] if "optuna" in arms else [])
    rounds = cfg["train.rounds"]
    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    test_losses: dict[str, Tensor] = {}   # per test sequence, for the paired standard errors of the notes
    tuned: list[Family] = []
    optuna_res: dict[str, Any] | None = None
    with RunMetrics(ctx.out / "metrics.jsonl") as metrics, \
            ArmsProgress(ctx, "lstm-dropout", len(order), rounds) as bar:
        for i, arm in enumerate(order):
            arm_dir = ctx.out / arm
            if arm == "optuna":
                arm_dir.mkdir(exist_ok=True)
                optuna_res = _optuna(ctx, corpus, data, results, arm_dir, bar.bar, i * rounds)
                results[arm] = optuna_res["row"]
                continue
            p = cfg["fixed.dropout"] if arm == "fixed" else 0.0
            model = _model(cfg, corpus, (p, p, p), ctx.device)
            fams: list[Family] = []
            if arm == "ift":
                fams = [
                    Dropout(model, list(SITES), init=cfg["dropout.init"]),
                    DropConnect(model, list(RECURRENT), init=cfg["dropout.init"]),
                ]
                tuned = fams

            def show(rec: dict[str, Any]) -> dict[str, Any]:
                return {"val_ppl": _ppl(rec["val_loss"]) if "val_loss" in rec else None}

            tag = {"arm": arm}
            res = train_arm(ctx, model, fams, data["train"], data["val"], out=arm_dir,
                            evals={"val": data["val"], "test": data["test"]}, loss_fn=sequence_loss,
                            callbacks=[metrics.callback(tag, arm_dir), bar.tick(i, arm, show)])
            metrics.finish_arm(tag, res.metrics)
            test_losses[arm] = per_example(model, *data["test"], sequence_loss, batch_size=256)
            histories[arm] = res.metrics
            f = res.final
            row: dict[str, Any] = {
                "arm": ARM_NAMES[arm],
                "hyperparameters": res.hyperparameters,
                "hyper_steps": hyper_steps(res) if fams else "-",
                "val_ppl": _ppl(f["val_loss"]),
                "test_ppl": _ppl(f["test_loss"]),
                "val_loss": f["val_loss"],
                "test_loss": f["test_loss"],
                "wall_s": res.wall_s,
            }
            if fams:
                nat = {fam.name: torch.cat([v.reshape(-1) for v in fam.natural().values()]) for fam in fams}
                row["keep"] = {k: float(v.mean()) for k, v in nat.items()}
                # how far the tuning moved any keep probability from its start (the notes judge it)
                row["keep_moved"] = max(float((v - cfg["dropout.init"]).abs().max()) for v in nat.values())
            results[arm] = row
            bar.done(i)
    rows = [results[a] for a in arms]
    columns = ["arm", "hyperparameters", "hyper_steps", "val_ppl", "test_ppl", "wall_s"]
    ses: dict[str, float] = {a: paired_se(test_losses["ift"], test_losses[a]) for a in ("fixed", "none")
                             if "ift" in test_losses and a in test_losses}
    notes = interpret(results, optuna_res, se=ses, n_test=len(data["test"][1]))
    figure = _figure(ctx.out / "ppl_vs_time.png", histories, optuna_res)
    result = {
        "dataset": corpus.source,
        "vocab": corpus.vocab_size,
        "description": describe(tuned),
        "rows": rows,
        "notes": notes,
        "optuna": optuna_res,
    }
    title = (
        f"lstm-dropout: {' vs '.join(ARM_NAMES[a] for a in arms)} ({corpus.name}, "
        f"{cfg['model.hidden']} units)"
    )
    from ..report import markdown_table

    body = [
        f"Data: {corpus.source}; vocabulary {corpus.vocab_size:,}; {len(data['train'][0]):,} training "
        f"sequences of {seq} tokens. A 2-layer LSTM "
        f"({cfg['model.embed']}-dim embedding, {cfg['model.hidden']} units); "
        f"each run takes {rounds * cfg['train.inner_steps']} Adam steps (lr {cfg['train.lr']:g}, batch "
        f"{cfg['train.batch_size']}); the IFT arm a hyper step (Adam lr {cfg['hyper.lr']:g}, Neumann "
        f"{cfg['hyper.iters']} terms, α = 1/λ_max) every {cfg['train.inner_steps']} steps.",
        "",
        "```",
        describe(tuned) if tuned else "(no tuned families)",
        "```",
        "",
        markdown_table(columns, rows),
        "",
        "Perplexity = exp(mean cross-entropy per token); the test text is never used for tuning.",
        "",
        *what_it_shows(notes),
        "## Figures",
        "",
        f"![test perplexity against wall time]({figure.name})",
        "",
    ]
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=rows,
        notes=notes,
        result=result,
        result_name="lstm_dropout.json",
        body=body,
        figures=[figure],
        also=[ctx.out / "metrics.jsonl"],
    )


def _optuna(
    ctx: RunContext,
    corpus: Corpus,
    data: dict[str, tuple[Tensor, Tensor]],
    results: dict[str, dict[str, Any]],
    arm_dir: Path,
    bar: Progress,
    base: int,
) -> dict[str, Any]:
    """TPE over the fixed model's three dropout rates within the budget; kept in ``optuna.json`` (a
    resumed run reuses a finished search instead of repeating it)."""
    cfg = ctx.config
    done = arm_dir / "optuna.json"
    prev = read_json(done) if ctx.resume else None  # None also when torn: search again
    if isinstance(prev, dict):
        return prev
    budget = cfg["optuna.budget_s"]
    if budget == "auto":  # check() made sure the ift arm ran
        budget = results["ift"]["wall_s"]
    names = ("embedding", "between", "decoder")
    hi = cfg["optuna.max_dropout"]

    def objective(p: dict[str, float]) -> tuple[float, float]:
        model = _model(cfg, corpus, (p["embedding"], p["between"], p["decoder"]), ctx.device)
        res = train_arm(ctx, model, [], data["train"], data["val"], out=None,
                        evals={"val": data["val"], "test": data["test"]}, loss_fn=sequence_loss, resume=False)
        return res.final["val_loss"], res.final["test_loss"]

    def on_trial(t: Any) -> None:
        bar.postfix({"arm": "optuna", "trial": t.number, "val_ppl": _ppl(t.val)})
        bar.set(base + min(int(cfg["train.rounds"] * t.elapsed_s / max(budget, 1e-9)), cfg["train.rounds"]))

    tr = tpe(
        objective,
        {n: Space(0.0, hi, log=False) for n in names},
        budget_s=float(budget),
        seed=cfg["seed"],
        on_trial=on_trial,
    )
    target = results["ift"]["test_loss"] if "ift" in results else None
    match = time_to_match(tr.trials, target) if target is not None else None
    best = tr.best
    out = {
        "budget_s": float(budget),
        "wall_s": tr.wall_s,
        "trials": len(tr.trials),
        "incumbent": [
            {"elapsed_s": e, "val_ppl": _ppl(v), "test_ppl": _ppl(t)} for e, v, t in incumbent(tr.trials)
        ],
        "trial_list": [
            {"params": t.params, "val_ppl": _ppl(t.val), "test_ppl": _ppl(t.test), "elapsed_s": t.elapsed_s}
            for t in tr.trials
        ],
        "best_params": best.params,
        "target_test_ppl": _ppl(target) if target is not None else None,
        "time_to_match_s": match,
        "row": {
            "arm": ARM_NAMES["optuna"],
            "hyperparameters": len(names),
            "hyper_steps": f"{len(tr.trials)} trials",
            "val_ppl": _ppl(best.val),
            "test_ppl": _ppl(best.test),
            "val_loss": best.val,
            "test_loss": best.test,
            "wall_s": tr.wall_s,
        },
    }
    write_atomic(done, json_dumps(out))
    return out


def interpret(results: dict[str, dict[str, Any]], opt: dict[str, Any] | None, *,
              se: dict[str, float] | None = None, n_test: int = 0) -> list[str]:
    """Plain-language notes on the table, whichever way it came out.

    ``se[arm]`` is the paired standard error (over the same ``n_test`` test sequences) of the IFT
    arm's test loss minus ``arm``'s; the verdicts are :func:`.shared.versus`'s, on the test loss
    (the log of the perplexity). The Optuna arm keeps no per-sequence losses: no noise estimate.
    """
    se = se or {}
    notes: list[str] = []
    ift, fixed, none = results.get("ift"), results.get("fixed"), results.get("none")
    if ift:
        keep = ift.get("keep", {})
        notes.append(
            "Tuned keep probabilities (means): "
            + ", ".join(f"{k} {v:.3f}" for k, v in keep.items())
            + f" after {ift['hyper_steps']} hyper steps."
        )
        if ift.get("keep_moved", 1.0) < 0.02:  # 0.02: a keep probability moved less than that is not tuned
            notes.append(
                f"No keep probability moved more than {ift['keep_moved']:.3f} from its start: the tuning "
                "barely acted in this run, so the IFT arm's row is mostly that of its starting dropout and "
                "DropConnect, not evidence for the hypergradient. More rounds or a larger hyper.lr would "
                "let it act."
            )
    for key, other in (("fixed", fixed), ("none", none)):
        if ift and other:
            v = versus("The IFT arm (tuned dropout and DropConnect)", other["arm"], ift["test_loss"],
                       other["test_loss"], se.get(key), metric="test loss (log perplexity)",
                       higher_is_better=False,
                       se_what=f"paired standard error over the {n_test:,} test sequences, one training seed",
                       no_se="one seed, no per-sequence losses: no noise estimate")
            notes.append(
                f"{v.text}; test perplexity {ift['test_ppl']:.2f} vs {other['test_ppl']:.2f}. The IFT arm "
                f"took {ift['wall_s']:.0f} s against {other['wall_s']:.0f} s."
            )
    if opt:
        row = opt["row"]
        s = (
            f"Optuna (TPE, {opt['trials']} trials of full training, three dropout rates) used "
            f"{opt['wall_s']:.0f} s of a {opt['budget_s']:.0f} s budget; its best-validation trial has test "
            f"perplexity {row['test_ppl']:.2f} (rates "
            + ", ".join(f"{k} {v:.2f}" for k, v in opt["best_params"].items())
            + ")."
        )
        if opt.get("target_test_ppl") is not None:
            t = opt["time_to_match_s"]
            s += (
                f" It matched the IFT arm's test perplexity {opt['target_test_ppl']:.2f} after {t:.0f} s"
                + (" (beyond the budget: the last trial overran it)." if t > opt["budget_s"] else ".")
                if t is not None
                else f" It did NOT reach the IFT arm's test perplexity {opt['target_test_ppl']:.2f} within "
                "the budget."
            )
            if ift:
                v = versus("Its best trial", "the IFT arm", row["test_loss"], ift["test_loss"], None,
                           metric="test loss (log perplexity)", higher_is_better=False, se_what="",
                           no_se="one seed each and no per-sequence losses for the trials: no noise "
                           "estimate, so neither is shown to be better")
                s += f" {v.text}."
        notes.append(s)
    return notes


def _figure(path: Path, histories: dict[str, list[dict[str, Any]]], opt: dict[str, Any] | None) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for arm, h in histories.items():
        pts = [(r["time_s"], _ppl(r["test_loss"])) for r in h if "test_loss" in r and "time_s" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=ARM_NAMES[arm])
    if opt:
        inc = opt["incumbent"]
        ax.step(
            [p["elapsed_s"] for p in inc],
            [p["test_ppl"] for p in inc],
            where="post",
            marker="o",
            label=ARM_NAMES["optuna"] + " (best-validation trial so far)",
        )
    ax.set_xlabel("wall time of the arm (s)")
    ax.set_ylabel("test perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("test perplexity against wall time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="lstm-dropout",
    summary="2-layer LSTM language model: per-unit dropout + DropConnect tuned by IFT vs fixed dropout "
    "(perplexity; optional Optuna arm)",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = [
    "EXPERIMENT",
    "FULL",
    "SCHEMA",
    "SMOKE",
    "LSTMLanguageModel",
    "check",
    "interpret",
    "run",
    "sequence_loss",
]
