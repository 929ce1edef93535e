"""``lstm-dropout``: a 2-layer LSTM language model whose dropout rates are tuned by IFT during training
(Lorraine, Vicol & Duvenaud 2020, §5.3: AWD-LSTM on Penn Treebank), against the same model with fixed
rates, without dropout, and against Optuna tuning the rates by whole training runs.

The model: embedding → LSTM → LSTM → linear decoder (optionally tied to the embedding), word level,
on a text corpus (:mod:`hypergradients.app.corpus`: the PTB files in ``data.root``, else the King
James Bible shipped with the package). The regularisers are those of the authors' code, by its
names: concrete (relaxed Bernoulli, τ = ``dropout.temperature``) dropout with masks shared over time

* ``dropouti`` on the embedding's output (the first LSTM's input), ``dropouth`` between the LSTMs,
  ``dropouto`` on the top LSTM's output (the decoder's input);
* ``dropoute``: whole words dropped from the embedding (one mask over the vocabulary per minibatch),
  one rate (``dropout.embedding``);
* ``wdrop``: DropConnect on the hidden-to-hidden matrices (``dropout.dropconnect``: ``shared``, one
  keep tensor for both layers' matrices, as the authors' code applies its one 2,600×650 tensor;
  ``first``: the first layer's only; ``each``: one tensor per layer; ``none``).

Arms, each from the same initial weights on the same batches for a seed:

* ``none``      — no dropout at all;
* ``fixed``     — every site at the fixed rate ``dropout.rate`` (the same concrete masks, shared over
  time, as the tuned arms; never tuned);
* ``ours``      — one rate per site (5 scalars), tuned by Algorithm 1: a hyper step every
  ``hyper.every`` inner steps by ``hyper.method`` (``identity``: the paper's 0 Neumann terms);
* ``ours_many`` — per-unit rates at the three dropout sites, the one embedding rate and one rate per
  recurrent weight (the paper's 1,691,951 at full size), tuned the same way;
* ``optuna``    — Optuna's TPE over the 5 scalar rates of the ``fixed`` model, each trial a whole
  training run, ``optuna.trials`` trials (a budget of ``trials × train.steps`` inner steps);
* ``sweep``     — (one seed) ``sweep.arm`` for every hyper learning rate × hyper-step frequency ×
  approximation in ``sweep.*``.

Every arm runs for each of ``seeds`` seeds (``seed``, ``seed+1``, ...; the sweep for ``seed`` only), as
separate units that ``jobs`` processes share (:func:`.shared.run_units`; the results do not depend on
``jobs``). Each unit keeps its own folder (checkpoints, ``metrics.jsonl``, ``result.json``), so a
resumed run reads finished units back and continues the others from their checkpoints.

The metric is perplexity ``exp(mean cross-entropy per token)``, reported at the evaluation with the
lowest validation loss (the authors' protocol: early stopping, the best model's perplexity) and at
the end of the budget; the test text is only evaluated. The report also measures why the tuning does
what it does: the keep probabilities over training, the hypergradient's signal-to-noise ratio over
windows of hyper steps, the fraction of hyper steps that changed anything, and the CPU time.

``config=full`` is the authors' recipe (:data:`FULL`): 2 × 650 units, 650-dim tied embedding, PTB,
SGD lr 30 with gradient clipping 0.25, batch 40, BPTT 70, a hyper step at every training step with
the identity approximation, Adam at 1e-3 on the rates, stopping after 20 epochs without a better
validation loss. What it does not reproduce of their code: the hidden state carried across
consecutive segments (here each 70-token segment starts from zero), the activation penalties
(AR/TAR, 1e-2 each), and the reuse of the inner step's (clipped) gradient in the mixed product (here
the hyper step draws its own training batch, as Algorithm 1).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.method import Method
from ...core.solvers import CG, Identity, Neumann
from ...hparams import DropConnect, Dropout, Family, describe
from ...hparams.base import Description, Hook, Sampler
from ...hparams.dropout import relaxed_mask
from ...training.callbacks import Callback
from ...training.files import json_dumps, read_json, write_atomic
from ...training.fit import METRICS
from ..config import Config, ConfigError, Option
from ..corpus import Corpus, batchify, load_corpus
from ..datasets import DataFormatError, DataUnavailableError
from ..progress import Progress
from .base import Experiment, ExperimentResult, RunContext, threads, with_threads
from .base import with_preset as _with_preset
from .optuna_arm import Space, Trial, incumbent, require_optuna, steps_to_match, time_to_match, tpe
from .shared import Verdict, begin, finish, paired_se, run_units, train_arm, versus, what_it_shows

ARMS = ("none", "fixed", "ours", "ours_many", "optuna", "sweep")
ARM_NAMES = {
    "none": "no dropout",
    "fixed": "fixed dropout",
    "ours": "Ours: IFT on the scalar rates",
    "ours_many": "Ours, many: IFT on per-unit and per-weight rates",
    "optuna": "Optuna TPE on the scalar rates",
    "sweep": "sweep",
}
TUNED = ("ours", "ours_many")
# The authors' names of the dropout sites, and where each acts in LSTMLanguageModel.
UNIT_SITES = {"dropouto": "decoder:input", "dropouth": "rnn1:input", "dropouti": "rnn0:input"}
HIDDEN_TO_HIDDEN = ("rnn0.weight_hh_l0", "rnn1.weight_hh_l0")
METHOD_FORMAT = re.compile(r"^(identity|neumann-([1-9][0-9]*)|cg-([1-9][0-9]*))$")
_EPS = 1e-6  # u ∈ [ε, 1−ε], as hparams.Dropout draws it: log u and log(1−u) stay finite

SCHEMA: dict[str, Option] = {
    "seed": Option(0, "first seed (initial weights, data order, dropout masks, TPE)", int, low=0),
    "seeds": Option(3, "seeds per arm: seed, seed+1, ... (the sweep runs seed only)", int, low=1),
    "threads": Option(1, "CPU threads of torch in each process", int, low=1),
    "jobs": Option(
        2, "processes that run the (arm, seed) units side by side (1: all in this one)", int, low=1
    ),
    "config": Option(
        "cpu",
        "cpu: the defaults below; full: the authors' recipe (2 × 650 units, PTB from data.root; a GPU) for "
        "the keys of FULL still at their defaults",
        str,
        choices=("cpu", "full"),
    ),
    "arms": Option(
        ["none", "fixed", "ours", "ours_many"],
        "which units to run (optuna needs the optuna extra; sweep: the sweep.* grid, one seed)",
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
    "data.vocab": Option(1000, "vocabulary size (<unk> and <eos> included)", int, low=3),
    "data.seq_len": Option(35, "tokens per sequence (truncated backpropagation length, BPTT)", int, low=1),
    "data.train_tokens": Option(50_000, "training tokens used (0: all)", int, low=0),
    "data.eval_tokens": Option(10_000, "validation and test tokens used (0: all)", int, low=0),
    "model.embed": Option(128, "embedding width", int, low=1),
    "model.hidden": Option(128, "units of the first LSTM (and of the second unless tied)", int, low=1),
    "model.tie": Option(
        False, "tie the decoder's weights to the embedding (the second LSTM then has model.embed units)", bool
    ),
    "train.steps": Option(1000, "inner training steps of every run", int, low=1),
    "train.batch_size": Option(32, "sequences per training batch", int, low=1),
    "train.optimizer": Option("adam", "inner optimizer", str, choices=("adam", "sgd")),
    "train.lr": Option(3e-3, "inner learning rate", float, positive=True),
    "train.clip": Option(0.0, "gradient-norm clipping of the inner steps (0: none)", float, low=0.0),
    "train.patience": Option(
        0, "evaluations without a lower validation loss before a run stops (0: never)", int, low=0
    ),
    "hyper.every": Option(
        10, "inner steps per hyper step (1: a hyper step at every training step, the paper's)", int, low=1
    ),
    "hyper.method": Option(
        "identity",
        "hypergradient approximation: identity (the paper's 0 Neumann terms), "
        "neumann-K (K Neumann terms after the first, α = hyper.alpha), cg-K (K conjugate-"
        "gradient steps, damped by hyper.damping)",
        str,
    ),
    "hyper.alpha": Option(
        "auto", "Neumann step α (auto: 1/λ_max by power iteration)", float, auto=True, positive=True
    ),
    "hyper.power_iters": Option(10, "power iterations behind hyper.alpha=auto", int, low=1),
    "hyper.damping": Option(1e-3, "CG damping δ of H + δI", float, low=0.0),
    "hyper.hvp_mode": Option(
        "auto",
        "second derivatives of L_T: reverse (double backward), "
        "finite-difference (first-order gradients only), auto (finite-difference on a "
        "CUDA device with cuDNN, whose LSTM has no double backward; reverse elsewhere)",
        str,
        choices=("auto", "reverse", "finite-difference"),
    ),
    "hyper.warm_start": Option(
        True, "carry the solver state across hyper steps (Neumann's λ_max, CG's last solution)", bool
    ),
    "hyper.optimizer": Option(
        "adam", "optimizer of the keep-probability logits", str, choices=("adam", "sgd", "rmsprop")
    ),
    "hyper.lr": Option(
        1e-2,
        "hyper learning rate (a step in keep-probability logit; the paper's 1e-3 at a "
        "hyper step per training step moves the rates as far per training step as 1e-2 every "
        "10)",
        float,
        positive=True,
    ),
    "hyper.train_batch_size": Option(
        16, "training sequences of the hyper step's L_T (0: train.batch_size)", int, low=0
    ),
    "hyper.val_batch_size": Option(16, "validation sequences of the hyper step's L_V (0: all)", int, low=0),
    "dropout.rate": Option(0.3, "dropout rate of the fixed arm at every site", float, low=0.0, high=0.95),
    "dropout.init": Option(
        "auto",
        "initial dropout rate of the tuned arms (auto: dropout.rate)",
        float,
        auto=True,
        low=1e-6,
        high=0.99,
    ),
    "dropout.temperature": Option(0.1, "temperature τ of the relaxed Bernoulli masks", float, positive=True),
    "dropout.embedding": Option(True, "drop whole words from the embedding (dropoute, one rate)", bool),
    "dropout.dropconnect": Option(
        "shared",
        "DropConnect on the hidden-to-hidden matrices: shared (one keep "
        "tensor for both layers, the authors' code), first (the first layer's), "
        "each (one tensor per layer), none",
        str,
        choices=("shared", "first", "each", "none"),
    ),
    "optuna.trials": Option(
        8,
        "training runs of the optuna arm per seed (its budget: trials × train.steps inner steps)",
        int,
        low=1,
    ),
    "optuna.max_dropout": Option(
        0.7, "upper end of each rate's search interval [0, max]", float, low=0.01, high=0.95
    ),
    "sweep.arm": Option("ours", "the arm the sweep tunes", str, choices=TUNED),
    "sweep.lr": Option(
        [1e-3, 1e-2], "hyper learning rates of the sweep", list, item=float, nonempty=True, unique=True
    ),
    "sweep.every": Option(
        [1, 10],
        "hyper-step frequencies (inner steps per hyper step) of the sweep",
        list,
        item=int,
        low=1,
        nonempty=True,
        unique=True,
    ),
    "sweep.method": Option(
        ["identity", "neumann-1"],
        "approximations of the sweep (as hyper.method)",
        list,
        nonempty=True,
        unique=True,
    ),
    "diag.window": Option(20, "hyper steps per window of the signal-to-noise diagnostics", int, low=2),
    "eval_every": Option(
        "auto",
        "inner steps between evaluations (auto: 50 for cpu, one pass over the "
        "training sequences for full); a multiple of hyper.every",
        int,
        auto=True,
        low=1,
    ),
    "checkpoint_every": Option(
        200, "inner steps between checkpoints (rounded up to a hyper step)", int, low=1
    ),
}

SMOKE: dict[str, Any] = {
    "seeds": 2,
    "jobs": 1,
    "data.vocab": 50,
    "data.seq_len": 8,
    "data.train_tokens": 400,
    "data.eval_tokens": 100,
    "model.embed": 8,
    "model.hidden": 8,
    "train.steps": 8,
    "train.batch_size": 4,
    "hyper.every": 2,
    "hyper.val_batch_size": 0,
    "optuna.trials": 2,
    "sweep.lr": [1e-2],
    "sweep.every": [2],
    "sweep.method": ["identity", "cg-2"],
    "diag.window": 2,
    "eval_every": 4,
    "checkpoint_every": 4,
}

# The authors' recipe (github.com/lorraine2/implicit-hyper-opt, rnn/train.py with
# --dropout_type=per_param, tuning dropouto, dropouth, dropouti, dropoute and wdrop): AWD-LSTM
# 2 × 650, tied 650-dim embedding, PTB (10,000 words), SGD lr 30, clip 0.25, batch 40, BPTT 70,
# a hyper step per training step with 0 Neumann terms, Adam 1e-3 on the rates, validation batch =
# the training batch's size, at most 10,000 epochs with patience 20 (epochs without a better
# validation loss). Its initial dropout rates are the code's defaults (1e-6): the run's own command
# line is not public.
FULL: dict[str, Any] = {
    "seeds": 1,
    "jobs": 1,
    "data.vocab": 10_000,
    "data.seq_len": 70,
    "data.train_tokens": 0,
    "data.eval_tokens": 0,
    "model.embed": 650,
    "model.hidden": 650,
    "model.tie": True,
    "train.steps": 10_000 * 332,  # 10,000 epochs of PTB's 929,589 training tokens in 40 × 70 batches
    "train.batch_size": 40,
    "train.optimizer": "sgd",
    "train.lr": 30.0,
    "train.clip": 0.25,
    "train.patience": 20,
    "hyper.every": 1,
    "hyper.lr": 1e-3,
    "hyper.train_batch_size": 40,
    "hyper.val_batch_size": 40,
    "dropout.init": 1e-6,
    "checkpoint_every": 332,
}


def with_preset(cfg: Config) -> Config:
    """``cfg`` with ``config=full`` applied: each key of :data:`FULL` that still has its default takes
    the full value (a key the user set keeps the user's value)."""
    return _with_preset(cfg, FULL, SCHEMA)


# ----------------------------------------------------------------------------------- the model
class LSTMLanguageModel(nn.Module):
    """``embed → LSTM → LSTM → linear``: logits ``(B, T, V)`` of the next token. With ``tie`` the decoder
    uses the embedding matrix (Press & Wolf 2017, as AWD-LSTM) and the second LSTM has ``embed`` units."""

    def __init__(self, vocab: int, embed: int, hidden: int, *, tie: bool = False) -> None:
        super().__init__()
        top = embed if tie else hidden
        self.embed = nn.Embedding(vocab, embed)
        self.rnn0 = nn.LSTM(embed, hidden, batch_first=True)
        self.rnn1 = nn.LSTM(hidden, top, batch_first=True)
        self.decoder = nn.Linear(top, vocab)
        if tie:
            self.decoder.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn0(self.embed(x))
        h, _ = self.rnn1(h)
        return self.decoder(h)


def sequence_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sequence mean cross-entropy per token ``(B,)``; with equal-length sequences its mean is the
    mean per token, whose exponential is the perplexity."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


# ------------------------------------------------------------------------------ the families
def _logit(keep: float) -> float:
    return math.log(keep) - math.log1p(-keep)


class UnitDropout(Dropout):
    """:class:`~hypergradients.hparams.Dropout` at one site, with one keep probability per unit, or
    (``scalar``) one for the whole site (then the stored logit has shape ``(1,)``)."""

    def __init__(
        self, model: nn.Module, site: str, *, name: str, scalar: bool, init: float, temperature: float
    ) -> None:
        super().__init__(model, [site], init=init, temperature=temperature, name=name)
        self.scalar = scalar
        if scalar:
            self._t = {k: t.detach()[:1].clone().requires_grad_(True) for k, t in self._t.items()}
            self.parametrisation = (
                "keep probability q = σ(θ), one for all units of the site (logit θ "
                "stored); relaxed Bernoulli mask z/q shared over time"
            )

    def hooks(self, hparams: Mapping[str, Tensor], noise: Sampler) -> list[Hook]:
        own = {k: hparams[k].expand(s.units) if self.scalar else hparams[k] for k, s in self.sites.items()}
        return super().hooks(own, noise)

    def describe(self) -> Description:
        d = super().describe()
        if not self.scalar:
            return d
        return replace(d, kind=d.kind + ", one rate for the site", groups={g: 1 for g in d.groups})


class WordDropout(Family):
    """Whole words dropped from the embedding (AWD-LSTM's ``dropoute``): one relaxed Bernoulli mask entry
    per vocabulary row, drawn once per forward call (shared by the minibatch's occurrences of a
    word), one keep probability ``q = σ(θ)`` for all words; a kept word is scaled by ``z/q``."""

    stochastic = True
    parametrisation = "keep probability q = σ(θ) of every word (logit θ stored); relaxed Bernoulli mask z/q"

    def __init__(
        self,
        model: nn.Module,
        module: str = "embed",
        *,
        init: float,
        temperature: float,
        name: str = "dropoute",
    ) -> None:
        emb = model.get_submodule(module)
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"WordDropout: {module!r} is a {type(emb).__name__}, not an nn.Embedding")
        self.name, self.module, self.temperature = name, module, float(temperature)
        self.vocab = emb.num_embeddings
        w = emb.weight
        self._t = {name: torch.full((1,), _logit(init), dtype=w.dtype, device=w.device, requires_grad=True)}

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._t)

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        src = self._t if hparams is None else hparams
        return {k: torch.sigmoid(src[k].detach()) for k in self._t}

    def describe(self) -> Description:
        return Description(
            self.name,
            f"word dropout, concrete, τ={self.temperature:g}",
            1,
            self.parametrisation,
            {f"{self.module} ({self.vocab:,} words)": 1},
        )

    def hooks(self, hparams: Mapping[str, Tensor], noise: Sampler) -> list[Hook]:
        theta = hparams[self.name]

        def post(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            u = noise.uniform((self.vocab,), dtype=out.dtype, device=out.device, eps=_EPS)
            mask = relaxed_mask(theta.to(out.dtype), u, self.temperature)
            return out * mask[args[0]].unsqueeze(-1)

        return [Hook(self.module, post, "post")]


class WeightDrop(DropConnect):
    """:class:`~hypergradients.hparams.DropConnect` on ``params`` with one keep tensor for all of them
    (``shared``: the same shape required; each draws its own mask) or one each, and one keep
    probability per weight or (``scalar``) one per tensor."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str],
        *,
        shared: bool,
        scalar: bool,
        init: float,
        temperature: float,
        name: str = "wdrop",
    ) -> None:
        super().__init__(model, list(params), init=init, temperature=temperature, name=name)
        shapes = {tuple(self._frozen[p].shape) for p in self.params}
        if shared and len(shapes) > 1:
            raise ValueError(
                f"WeightDrop: one shared keep tensor needs equal shapes, got {sorted(shapes)} "
                f"for {self.params}"
            )
        self.shared, self.scalar = shared, scalar
        ref = self._t[f"{name}.{self.params[0]}"]
        shape = (1,) if scalar else tuple(ref.shape)
        keys = [name] if shared else [f"{name}.{p}" for p in self.params]
        self._t = {
            k: torch.full(shape, _logit(init), dtype=ref.dtype, device=ref.device, requires_grad=True)
            for k in keys
        }
        one = "one for the whole matrix" if scalar else "one per weight"
        self.parametrisation = (
            f"keep probability q = σ(θ), {one}"
            + (", the same θ for every listed matrix" if shared and len(self.params) > 1 else "")
            + " (logit θ stored); relaxed Bernoulli mask z/q per minibatch"
        )

    def _key(self, param: str) -> str:
        return self.name if self.shared else f"{self.name}.{param}"

    def describe(self) -> Description:
        kind = f"DropConnect, concrete, τ={self.temperature:g}"
        if self.shared:
            return Description(
                self.name, kind, self.count(), self.parametrisation, {" = ".join(self.params): self.count()}
            )
        return Description(
            self.name,
            kind,
            self.count(),
            self.parametrisation,
            {p: self._t[self._key(p)].numel() for p in self.params},
        )

    def model_weights(
        self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], noise: Sampler
    ) -> Mapping[str, Tensor]:
        out = dict(params)
        for p in self.params:
            w = out[p] if p in out else self._frozen[p]
            u = noise.uniform(w.shape, dtype=w.dtype, device=w.device, eps=_EPS)
            out[p] = w * relaxed_mask(hparams[self._key(p)].to(w.dtype), u, self.temperature)
        return out


class Fixed(Family):
    """``family`` at its current rates, not tuned: the same masks in the training loss, no hyperparameter
    (``tensors()`` is empty, so :func:`~hypergradients.fit` takes no hyper step)."""

    def __init__(self, family: Family) -> None:
        self.inner = family
        self.name = family.name
        self.stochastic = family.stochastic
        self.parametrisation = "fixed, not tuned: " + family.parametrisation

    def _own(self) -> dict[str, Tensor]:
        return {k: t.detach() for k, t in self.inner.tensors().items()}

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def natural(self, hparams: Mapping[str, Tensor] | None = None) -> Any:
        return self.inner.natural()

    def describe(self) -> Description:
        d = self.inner.describe()
        rates = torch.cat([v.reshape(-1) for v in self.inner.natural().values()])
        return Description(
            d.name, f"{d.kind}, fixed at dropout {1 - float(rates.mean()):.3g}", 0, self.parametrisation, {}
        )

    def model_weights(
        self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], noise: Sampler
    ) -> Mapping[str, Tensor]:
        return self.inner.model_weights(params, self._own(), noise)

    def hooks(self, hparams: Mapping[str, Tensor], noise: Sampler) -> Sequence[Hook]:
        return self.inner.hooks(self._own(), noise)


def site_names(cfg: Config) -> list[str]:
    """The regulariser names of this configuration, in the order of the families."""
    return [
        *UNIT_SITES,
        *(["dropoute"] if cfg["dropout.embedding"] else []),
        *(["wdrop"] if cfg["dropout.dropconnect"] != "none" else []),
    ]


def families(
    cfg: Config, model: nn.Module, arm: str, rates: Mapping[str, float] | None = None
) -> list[Family]:
    """The regularisers of ``arm`` (none for ``none``): scalar rates for ``ours``, ``fixed`` and
    ``optuna`` (those two not tuned), per unit and per weight for ``ours_many``. ``rates`` gives each
    site's dropout rate (default: ``dropout.rate`` for the fixed arms, ``dropout.init`` for the tuned)."""
    if arm == "none":
        return []
    tuned = arm in TUNED
    init = cfg["dropout.rate"] if cfg["dropout.init"] == "auto" or not tuned else cfg["dropout.init"]
    drop = {n: float(init) for n in site_names(cfg)} | dict(rates or {})
    keep = {n: min(max(1.0 - p, 1e-6), 1 - 1e-6) for n, p in drop.items()}  # a logit needs 0 < q < 1
    scalar, tau = arm != "ours_many", cfg["dropout.temperature"]
    fams: list[Family] = [
        UnitDropout(model, site, name=n, scalar=scalar, init=keep[n], temperature=tau)
        for n, site in UNIT_SITES.items()
    ]
    if cfg["dropout.embedding"]:
        fams.append(WordDropout(model, init=keep["dropoute"], temperature=tau))
    dc = cfg["dropout.dropconnect"]
    if dc != "none":
        fams.append(
            WeightDrop(
                model,
                HIDDEN_TO_HIDDEN[:1] if dc == "first" else HIDDEN_TO_HIDDEN,
                shared=dc == "shared",
                scalar=scalar,
                init=keep["wdrop"],
                temperature=tau,
            )
        )
    return fams if tuned else [Fixed(f) for f in fams]


def hyper_method(cfg: Config, spec: str | None = None) -> Method:
    """The approximation ``spec`` (default ``hyper.method``): ``identity``; ``neumann-K``, K Neumann terms
    after the first as the paper counts them (``Neumann(iters=K+1)``, α = ``hyper.alpha``); ``cg-K``."""
    spec = cfg["hyper.method"] if spec is None else spec
    m = METHOD_FORMAT.match(spec)
    if m is None:
        raise ConfigError(
            f"config key 'hyper.method': got {spec!r}; expected identity, neumann-K or cg-K "
            "with K >= 1 (e.g. neumann-1, cg-5)"
        )
    if m[2]:
        return Neumann(iters=int(m[2]) + 1, alpha=cfg["hyper.alpha"], power_iters=cfg["hyper.power_iters"])
    if m[3]:
        return CG(iters=int(m[3]), tol=1e-6, damping=cfg["hyper.damping"])
    return Identity()


def _model(cfg: Config, vocab: int, seed: int, device: torch.device | str) -> LSTMLanguageModel:
    torch.manual_seed(seed)  # the same initial weights for every arm of a seed
    return LSTMLanguageModel(vocab, cfg["model.embed"], cfg["model.hidden"], tie=cfg["model.tie"]).to(device)


def _ppl(loss: float | None) -> float:
    return math.exp(loss) if loss is not None and loss < 700 else math.inf


# -------------------------------------------------------------------------------- checking
def check(cfg: Config) -> Corpus:
    """Settings the schema cannot judge alone, then the corpus (PTB from data.root, else the King James
    Bible), before any file is written."""
    cfg = with_preset(cfg)
    for spec in [cfg["hyper.method"], *(cfg["sweep.method"] if "sweep" in cfg["arms"] else [])]:
        hyper_method(cfg, spec)
    sizes_differ = cfg["model.embed"] != cfg["model.hidden"]
    if cfg["model.tie"] and cfg["dropout.dropconnect"] == "shared" and sizes_differ:
        raise ConfigError(
            f"config key 'dropout.dropconnect': 'shared' needs both LSTMs of one size, but "
            f"with model.tie the second has model.embed={cfg['model.embed']} units and the "
            f"first model.hidden={cfg['model.hidden']}: make them equal, or use 'each'"
        )
    if "optuna" in cfg["arms"]:
        try:
            require_optuna()
        except ImportError as e:
            raise ConfigError(f"config key 'arms': {e}") from None
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
    everies = [cfg["hyper.every"], *(cfg["sweep.every"] if "sweep" in cfg["arms"] else [])]
    ev = _eval_every(cfg, corpus)
    if cfg["train.steps"] < ev:  # the report reads each run's best evaluation: a run needs one
        raise ConfigError(
            f"config key 'train.steps': {cfg['train.steps']} inner steps end before the first "
            f"evaluation (eval_every={ev}); set eval_every to at most train.steps"
        )
    bad = [e for e in everies if ev % e]
    if bad:
        raise ConfigError(
            f"config key 'eval_every': {ev} inner steps is not a multiple of the hyper-step "
            f"frequency {bad[0]} (hyper.every or sweep.every): evaluations fall between "
            "rounds; choose a common multiple"
        )
    return corpus


def _eval_every(cfg: Config, corpus: Corpus) -> int:
    ev = cfg["eval_every"]
    if ev != "auto":
        return int(ev)
    if cfg["config"] != "full":
        return 50
    n = len(batchify(corpus.train, cfg["data.seq_len"], max_tokens=cfg["data.train_tokens"])[1])
    return max(1, round(n / cfg["train.batch_size"]))  # one pass over the training sequences


def dry_run(cfg: Config, corpus: Corpus) -> str:
    """Each arm's regularisers for this configuration (:func:`~hypergradients.hparams.describe`), built on
    the model, without training."""
    cfg = with_preset(cfg)
    model = _model(cfg, corpus.vocab_size, cfg["seed"], "cpu")
    weights = sum(p.numel() for p in model.parameters())
    lines = [
        f"lstm-dropout ({cfg['config']}): {corpus.source}; vocabulary {corpus.vocab_size:,}; model "
        f"{cfg['model.embed']}-dim embedding, 2 LSTMs of {cfg['model.hidden']} units"
        + (" (tied decoder)" if cfg["model.tie"] else "")
        + f", {weights:,} weights"
    ]
    arms = [a for a in cfg["arms"] if a not in ("optuna", "sweep")]
    arms += ["fixed"] if "optuna" in cfg["arms"] and "fixed" not in arms else []
    arms += [cfg["sweep.arm"]] if "sweep" in cfg["arms"] and cfg["sweep.arm"] not in arms else []
    for arm in arms:
        fams = families(cfg, model, arm)
        lines += ["", f"{arm} ({ARM_NAMES[arm]}):", describe(fams) if fams else "(no regulariser)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class Unit:
    """One run of the experiment: ``kind`` (an arm, or ``sweep``), its seed, its folder name and the
    configuration it runs with (the sweep's hyper settings applied); picklable, for the worker processes."""

    kind: str
    seed: int
    folder: str
    cfg: Config
    out: Path
    device: str
    resume: bool
    tensorboard: bool
    data: dict[str, tuple[Tensor, Tensor]]
    vocab: int
    eval_every: int

    @property
    def arm(self) -> str:
        return str(self.cfg["sweep.arm"]) if self.kind == "sweep" else self.kind


class Stopped(Exception):
    """Raised by :class:`EarlyStop` to end a run whose validation loss stopped improving."""


class EarlyStop(Callback):
    """Stop after ``patience`` evaluations without a lower validation loss (the state survives a resume)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.bad = patience, math.inf, 0

    def on_round_end(self, record: dict[str, Any]) -> None:
        if "val_loss" not in record:
            return
        if record["val_loss"] < self.best:
            self.best, self.bad = float(record["val_loss"]), 0
        else:
            self.bad += 1
        if self.bad >= self.patience:
            raise Stopped

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class Track(Callback):
    """What the report reads of one run: the evaluations (with the CPU time so far), each regulariser's
    keep probabilities at every evaluation (quantiles and mean), and the hypergradient's statistics
    over windows of ``window`` hyper steps:

    * ``snr`` = ‖mean g‖ / ‖std g‖ over the window (norms over all coordinates; for pure noise about
      1/√window), and per regulariser;
    * ``coords_snr_gt1``: the fraction of coordinates whose |mean| exceeds their standard deviation;
    * ``persistence`` = ‖Σ Δθ‖ / Σ ‖Δθ‖ (1: every step in one direction; about 1/√window: a random walk);
    * ``cos``: mean cosine of consecutive hypergradients;

    and over all hyper steps: applied, with a nonzero hypergradient, and those that changed some keep
    probability by more than 1e-6 (``changed``); the CPU time of the hyper steps."""

    def __init__(self, fams: Sequence[Family], window: int) -> None:
        self.fams, self.window = list(fams), window
        self.evals: list[dict[str, Any]] = []
        self.keep: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.counts = {"steps": 0, "applied": 0, "nonzero": 0, "changed": 0, "skipped": 0}
        self.max_dq: list[float] = []
        self.solver: dict[str, Any] = {
            "hvps": 0,
            "retried": 0,
            "iterations": 0,
            "lambda_max": [],
            "damping": [],
        }
        self.hyper_cpu = 0.0
        self.cpu_base, self.cpu_start = 0.0, time.process_time()
        self._acc: dict[str, Any] | None = None
        self._prev: Tensor | None = None
        self._before: Tensor | None = None
        self._c0 = 0.0

    def cpu(self) -> float:
        return self.cpu_base + time.process_time() - self.cpu_start

    def _q(self) -> Tensor:
        return torch.cat([v.reshape(-1).double() for f in self.fams for v in f.natural().values()])

    def on_before_hyper_step(self, hyper: Any) -> None:
        self._c0, self._before = time.process_time(), self._q()

    def on_hyper_step(self, hyper: Any, result: Any) -> None:
        self.hyper_cpu += time.process_time() - self._c0
        self.counts["steps"] += 1
        if not result.applied or result.hypergradient is None:
            self.counts["skipped"] += 1
            return
        self.counts["applied"] += 1
        info = result.info
        if info is not None:  # the solver's own numbers
            self.solver["hvps"] += int(info.hvps)
            self.solver["retried"] += int(bool(result.retry))
            extra = info.extra
            if "lambda_max" in extra and extra.get("lambda_max_age", 0.0) == 0.0:  # a fresh estimate
                self.solver["lambda_max"].append(float(extra["lambda_max"]))
            if "damping" in extra:
                self.solver["damping"].append(float(extra["damping"]))
            if info.iterations is not None:
                self.solver["iterations"] += int(info.iterations)
        keys = [k for f in self.fams for k in f.tensors()]
        g = torch.cat([result.hypergradient[k].detach().reshape(-1).double() for k in keys])
        self.counts["nonzero"] += int(bool(g.abs().max() > 0))
        q = self._q()
        assert self._before is not None
        dq = float((q - self._before).abs().max())
        self.max_dq.append(dq)
        self.counts["changed"] += int(dq > 1e-6)
        theta = torch.cat([t.detach().reshape(-1).double() for f in self.fams for t in f.tensors().values()])
        acc = self._acc
        if acc is None:
            acc = self._acc = {
                "n": 0,
                "sum": torch.zeros_like(g),
                "sq": torch.zeros_like(g),
                "theta0": theta,
                "path": 0.0,
                "last": theta,
                "cos": 0.0,
                "start": self.counts["steps"],
            }
        acc["n"] += 1
        acc["sum"] += g
        acc["sq"] += g * g
        acc["path"] += float((theta - acc["last"]).norm())
        acc["last"] = theta
        if self._prev is not None:
            den = float(g.norm() * self._prev.norm())
            acc["cos"] += float(g @ self._prev) / den if den > 0 else 0.0
        self._prev = g
        if acc["n"] == self.window:
            self.windows.append(self._close(acc, keys))
            self._acc = None

    def _close(self, acc: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        n = acc["n"]
        mean = acc["sum"] / n
        std = ((acc["sq"] / n - mean * mean).clamp_min(0) * n / (n - 1)).sqrt()
        per: dict[str, float] = {}
        at = 0
        for f in self.fams:
            size = sum(t.numel() for t in f.tensors().values())
            m, s = mean[at : at + size], std[at : at + size]
            per[f.name] = float(m.norm() / s.norm()) if float(s.norm()) > 0 else math.inf
            at += size
        drift = float((acc["last"] - acc["theta0"]).norm())
        return {
            "first_step": acc["start"],
            "last_step": self.counts["steps"],
            "n": n,
            "snr": float(mean.norm() / std.norm()) if float(std.norm()) > 0 else math.inf,
            "noise_snr": 1 / math.sqrt(n),
            "snr_by": per,
            "coords_snr_gt1": float((mean.abs() > std).double().mean()),
            "persistence": drift / acc["path"] if acc["path"] > 0 else 0.0,
            "cos": acc["cos"] / max(n - 1, 1),
        }

    def on_round_end(self, record: dict[str, Any]) -> None:
        if "val_loss" not in record:
            return
        step = int(record["inner_steps"])
        self.evals.append(
            {
                "step": step,
                "val_loss": record["val_loss"],
                "test_loss": record["test_loss"],
                "time_s": record["time_s"],
                "cpu_s": self.cpu(),
            }
        )
        if self.fams:
            row: dict[str, Any] = {"step": step}
            for f in self.fams:
                v = torch.cat([t.reshape(-1).double() for t in f.natural().values()])
                qs = (
                    torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype))
                    if v.numel() > 1
                    else v.repeat(len(QUANTILES))
                )
                row[f.name] = {"mean": float(v.mean()), "q": [float(x) for x in qs]}
            self.keep.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {
            "evals": self.evals,
            "keep": self.keep,
            "windows": self.windows,
            "counts": dict(self.counts),
            "max_dq": list(self.max_dq),
            "solver": self.solver,
            "hyper_cpu": self.hyper_cpu,
            "cpu": self.cpu(),
            "acc": self._acc,
            "prev": self._prev,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evals, self.keep = list(state["evals"]), list(state["keep"])
        self.windows = list(state["windows"])
        self.counts, self.max_dq = dict(state["counts"]), list(state["max_dq"])
        self.solver = {k: list(v) if isinstance(v, list) else v for k, v in state["solver"].items()}
        self.hyper_cpu, self.cpu_base, self.cpu_start = (
            float(state["hyper_cpu"]),
            float(state["cpu"]),
            time.process_time(),
        )
        self._acc, self._prev = state["acc"], state["prev"]


def run_unit(unit: Unit, tick: Any = None) -> dict[str, Any]:
    """One unit (in this process or a worker): its result, also kept in its folder's ``result.json`` (a
    resumed run reads a finished unit back)."""
    with threads(unit.cfg["threads"]):
        folder = unit.out / unit.folder
        done = folder / "result.json"
        prev = read_json(done) if unit.resume else None
        if isinstance(prev, dict):
            return prev
        res = _optuna_unit(unit) if unit.kind == "optuna" else _train_unit(unit, tick)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(done, json_dumps(res))
        return res


def _fit(
    unit: Unit,
    model: nn.Module,
    fams: list[Family],
    *,
    folder: Path | None,
    callbacks: list[Any],
    resume: bool,
) -> bool:
    """Train ``model`` with ``fams`` for ``train.steps`` inner steps (checkpointed in ``folder``); whether
    it stopped early (``train.patience``)."""
    cfg, every = unit.cfg, unit.cfg["hyper.every"]
    ck = max(1, math.ceil(cfg["checkpoint_every"] / every))
    mode = cfg["hyper.hvp_mode"]
    if mode == "auto":
        dev = torch.device(unit.device)
        cudnn = dev.type == "cuda" and torch.backends.cudnn.enabled
        mode = "finite-difference" if cudnn else "reverse"
    run_cfg = {
        **cfg,
        "seed": unit.seed,
        "train.inner_steps": every,
        "eval_every": unit.eval_every // every,
        "checkpoint_every": ck,
        "train.rounds": cfg["train.steps"] // every,
        "hyper.hvp_mode": mode,
    }
    ctx = RunContext(
        config=run_cfg,
        out=unit.out,
        device=torch.device(unit.device),
        resume=resume,
        progress=False,
        tensorboard=unit.tensorboard and folder is not None,
    )
    patience = cfg["train.patience"]
    stop = [EarlyStop(patience)] if patience else []
    try:
        train_arm(
            ctx,
            model,
            fams,
            unit.data["train"],
            unit.data["val"],
            out=folder,
            evals={"val": unit.data["val"], "test": unit.data["test"]},
            loss_fn=sequence_loss,
            callbacks=[*callbacks, *stop],
            hyper_method=hyper_method(cfg),
            resume=resume,
        )
    except Stopped:
        return True
    return False


def _train_unit(unit: Unit, tick: Any) -> dict[str, Any]:
    cfg = unit.cfg
    t0 = time.perf_counter()
    model = _model(cfg, unit.vocab, unit.seed, unit.device)
    fams = families(cfg, model, unit.arm)
    tuned = [f for f in fams if f.tensors()]
    track = Track(tuned, cfg["diag.window"])
    stopped = _fit(
        unit,
        model,
        fams,
        folder=unit.out / unit.folder,
        callbacks=[track, *([tick] if tick else [])],
        resume=unit.resume,
    )
    best = min(track.evals, key=lambda e: e["val_loss"])
    last = track.evals[-1]
    return {
        "kind": unit.kind,
        "arm": unit.arm,
        "seed": unit.seed,
        "folder": unit.folder,
        "hyper": {k: cfg[k] for k in ("hyper.lr", "hyper.every", "hyper.method")},
        "hyperparameters": sum(f.count() for f in fams),
        "stopped_early": stopped,
        "best": best,
        "last": last,
        "evals": track.evals,
        "keep": track.keep,
        "windows": track.windows,
        "counts": track.counts,
        "solver": track.solver,
        "max_dq_median": statistics.median(track.max_dq) if track.max_dq else None,
        "cpu_s": track.cpu(),
        "hyper_cpu_s": track.hyper_cpu,
        "wall_s": time.perf_counter() - t0,
        "train_wall_s": last["time_s"],
    }


def _optuna_unit(unit: Unit) -> dict[str, Any]:
    """TPE over the scalar rates, each trial a whole ``fixed`` run (no checkpoints: a resumed run repeats
    an unfinished search), scored by its best validation loss."""
    cfg = unit.cfg
    names = site_names(cfg)
    steps = cfg["train.steps"]
    cpu0 = time.process_time()
    cpu_at: list[float] = []

    def objective(p: dict[str, float]) -> tuple[float, float]:
        model = _model(cfg, unit.vocab, unit.seed, unit.device)
        track = Track([], cfg["diag.window"])
        _fit(unit, model, families(cfg, model, "fixed", p), folder=None, callbacks=[track], resume=False)
        best = min(track.evals, key=lambda e: e["val_loss"])
        cpu_at.append(time.process_time() - cpu0)
        trial_end.append(track.evals[-1])
        return best["val_loss"], best["test_loss"]

    trial_end: list[dict[str, Any]] = []
    tr = tpe(
        objective,
        {n: Space(0.0, cfg["optuna.max_dropout"], log=False) for n in names},
        budget_steps=cfg["optuna.trials"] * steps,
        steps_per_trial=steps,
        seed=unit.seed,
    )
    return {
        "kind": "optuna",
        "arm": "optuna",
        "seed": unit.seed,
        "folder": unit.folder,
        "trials": [
            {
                "params": t.params,
                "val_loss": t.val,
                "test_loss": t.test,
                "elapsed_s": t.elapsed_s,
                "steps": t.steps,
                "cpu_s": c,
                "val_loss_end": e["val_loss"],
                "test_loss_end": e["test_loss"],
            }
            for t, c, e in zip(tr.trials, cpu_at, trial_end, strict=True)
        ],
        "best_params": tr.best.params,
        "best": {"val_loss": tr.best.val, "test_loss": tr.best.test},
        "wall_s": tr.wall_s,
        "cpu_s": time.process_time() - cpu0,
    }


def _trials(res: dict[str, Any]) -> list[Trial]:
    return [
        Trial(i, t["params"], t["val_loss"], t["test_loss"], t["elapsed_s"], t["steps"])
        for i, t in enumerate(res["trials"])
    ]


# --------------------------------------------------------------------------------- the run
def _sweep_units(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for lr in cfg["sweep.lr"]:
        for every in cfg["sweep.every"]:
            for m in cfg["sweep.method"]:
                out.append(
                    (
                        f"sweep-lr{lr:g}-every{every}-{m}",
                        {"hyper.lr": lr, "hyper.every": every, "hyper.method": m},
                    )
                )
    return out


def units(ctx: RunContext, corpus: Corpus, data: dict[str, tuple[Tensor, Tensor]]) -> list[Unit]:
    """Every unit of the run, the most expensive first (so that the processes finish together)."""
    cfg = ctx.config
    ev = _eval_every(cfg, corpus)

    def make(kind: str, seed: int, folder: str, over: Mapping[str, Any] = ()) -> Unit:  # type: ignore[assignment]
        return Unit(
            kind,
            seed,
            folder,
            {**cfg, **dict(over)},
            ctx.out,
            str(ctx.device),
            ctx.resume,
            ctx.tensorboard,
            data,
            corpus.vocab_size,
            ev,
        )

    out = [
        make(arm, s, f"{arm}-s{s}")
        for s in range(cfg["seed"], cfg["seed"] + cfg["seeds"])
        for arm in cfg["arms"]
        if arm != "sweep"
    ]
    if "sweep" in cfg["arms"]:
        out += [make("sweep", cfg["seed"], name, over) for name, over in _sweep_units(cfg)]

    def cost(u: Unit) -> float:
        if u.kind == "optuna":
            return float(cfg["optuna.trials"])
        return 1.0 + (6.0 / u.cfg["hyper.every"] if u.arm in TUNED else 0.0)

    return sorted(out, key=cost, reverse=True)


def _run(ctx: RunContext) -> ExperimentResult:
    """Run the units; write config.toml, lstm_dropout.json, metrics.jsonl, the figures and the report."""
    ctx = replace(ctx, config=with_preset(ctx.config))  # what the run uses, and its config.toml
    cfg, t0 = ctx.config, time.perf_counter()
    corpus0: Corpus = ctx.data if ctx.data is not None else check(cfg)
    seq = cfg["data.seq_len"]
    data = {
        "train": batchify(corpus0.train, seq, max_tokens=cfg["data.train_tokens"]),
        "val": batchify(corpus0.valid, seq, max_tokens=cfg["data.eval_tokens"]),
        "test": batchify(corpus0.test, seq, max_tokens=cfg["data.eval_tokens"]),
    }
    data = {k: (x.to(ctx.device), y.to(ctx.device)) for k, (x, y) in data.items()}
    todo = units(ctx, corpus0, data)
    folders = [ctx.out / u.folder for u in todo]
    corpus: Corpus = begin(
        ctx, check, arms=folders, resumed=[ctx.out / u.folder for u in todo if u.kind != "optuna"]
    )
    rounds = {
        u.folder: cfg["optuna.trials"] if u.kind == "optuna" else u.cfg["train.steps"] // u.cfg["hyper.every"]
        for u in todo
    }
    total = sum(rounds.values())
    cpu0 = time.process_time()
    in_units = [0.0]  # CPU time of the units that ran in this process (their results count it)
    with Progress(total, desc="lstm-dropout", enabled=ctx.progress, unit="round") as bar:
        base = {u.folder: sum(rounds[v.folder] for v in todo[:i]) for i, u in enumerate(todo)}

        def here(u: Unit) -> dict[str, Any]:
            def tick(rec: dict[str, Any]) -> None:
                bar.postfix(
                    {"unit": u.folder, "val_ppl": _ppl(rec.get("val_loss")) if "val_loss" in rec else None}
                )
                bar.set(base[u.folder] + int(rec["round"]))

            c = time.process_time()
            res = run_unit(u, tick if u.kind != "optuna" else None)
            in_units[0] += time.process_time() - c
            bar.set(base[u.folder] + rounds[u.folder])
            return res

        def done(i: int, res: dict[str, Any]) -> None:
            bar.update(rounds[todo[i].folder])
            bar.postfix({"done": todo[i].folder})

        results = run_units(
            run_unit, todo, jobs=cfg["jobs"], here=here, on_done=done if cfg["jobs"] > 1 else None
        )
    parent_cpu = time.process_time() - cpu0 - in_units[0]  # this process's own work, outside the units
    _write_metrics(ctx.out, todo, results)
    return report(ctx, corpus, data, results, t0=t0, parent_cpu=parent_cpu)


def _write_metrics(out: Path, todo: Sequence[Unit], results: Sequence[dict[str, Any]]) -> None:
    """The run's ``metrics.jsonl``: every unit's round records, tagged with its arm and seed."""
    import json

    lines = []
    for u, r in zip(todo, results, strict=True):
        f = out / u.folder / METRICS
        tag = {"unit": u.folder, "arm": r["arm"], "seed": u.seed}
        if f.is_file():
            lines += [json_dumps({**tag, **json.loads(line)}) for line in f.read_text().splitlines() if line]
        elif u.kind == "optuna":
            lines += [json_dumps({**tag, "trial": i, **t}) for i, t in enumerate(r["trials"])]
    write_atomic(out / "metrics.jsonl", "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------- the report
def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _ms(xs: Sequence[float], digits: int = 1) -> str:
    m, s = _mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def _keep_end(r: dict[str, Any]) -> dict[str, float]:
    return {k: v["mean"] for k, v in r["keep"][-1].items() if k != "step"} if r.get("keep") else {}


def report(
    ctx: RunContext,
    corpus: Corpus,
    data: dict[str, tuple[Tensor, Tensor]],
    results: Sequence[dict[str, Any]],
    *,
    t0: float,
    parent_cpu: float,
) -> ExperimentResult:
    """Tables, figures, notes and the files of the run."""
    from ..report import markdown_table

    cfg = ctx.config
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["kind"] not in ("sweep",):
            by.setdefault(r["arm"], []).append(r)
    for rs in by.values():
        rs.sort(key=lambda r: r["seed"])
    arms = [a for a in cfg["arms"] if a in by]
    train_arms = [a for a in arms if a != "optuna"]
    seeds = sorted({r["seed"] for r in results if r["kind"] != "sweep"})
    # -- per-seed and summary rows
    seed_rows: list[dict[str, Any]] = []
    for a in train_arms:
        for r in by[a]:
            seed_rows.append(
                {
                    "arm": ARM_NAMES[a],
                    "seed": r["seed"],
                    "best_val_ppl": _ppl(r["best"]["val_loss"]),
                    "best_step": r["best"]["step"],
                    "test_ppl_at_best": _ppl(r["best"]["test_loss"]),
                    "val_ppl_end": _ppl(r["last"]["val_loss"]),
                    "test_ppl_end": _ppl(r["last"]["test_loss"]),
                    "cpu_s": r["cpu_s"],
                    "keep_end": ", ".join(f"{k} {v:.3f}" for k, v in _keep_end(r).items()) or "-",
                }
            )
    rows: list[dict[str, Any]] = []
    none_cpu = {r["seed"]: r["cpu_s"] for r in by.get("none", [])}
    for a in arms:
        rs = by[a]
        if a == "optuna":
            rows.append(
                {
                    "arm": ARM_NAMES[a],
                    "seeds": len(rs),
                    "hyperparameters": len(site_names(cfg)),
                    "test_ppl_at_best": _ms([_ppl(r["best"]["test_loss"]) for r in rs]),
                    "best_val_ppl": _ms([_ppl(r["best"]["val_loss"]) for r in rs]),
                    "test_ppl_end": _ms(
                        [
                            _ppl(
                                r["trials"][
                                    [t["val_loss"] for t in r["trials"]].index(r["best"]["val_loss"])
                                ]["test_loss_end"]
                            )
                            for r in rs
                        ]
                    ),
                    "val_ppl_end": "-",
                    "cpu_s": _ms([r["cpu_s"] for r in rs], 0),
                    "cost_vs_none": _ratio([r["cpu_s"] for r in rs], [none_cpu.get(r["seed"]) for r in rs]),
                }
            )
            continue
        rows.append(
            {
                "arm": ARM_NAMES[a],
                "seeds": len(rs),
                "hyperparameters": rs[0]["hyperparameters"],
                "test_ppl_at_best": _ms([_ppl(r["best"]["test_loss"]) for r in rs]),
                "best_val_ppl": _ms([_ppl(r["best"]["val_loss"]) for r in rs]),
                "test_ppl_end": _ms([_ppl(r["last"]["test_loss"]) for r in rs]),
                "val_ppl_end": _ms([_ppl(r["last"]["val_loss"]) for r in rs]),
                "cpu_s": _ms([r["cpu_s"] for r in rs], 0),
                "cost_vs_none": _ratio([r["cpu_s"] for r in rs], [none_cpu.get(r["seed"]) for r in rs]),
            }
        )
    columns = [
        "arm",
        "seeds",
        "hyperparameters",
        "test_ppl_at_best",
        "best_val_ppl",
        "test_ppl_end",
        "val_ppl_end",
        "cpu_s",
        "cost_vs_none",
    ]
    # -- paired differences over seeds
    verdicts = report_verdicts(by)
    diffs = [
        {
            "a": ARM_NAMES[a],
            "b": ARM_NAMES[b],
            "when": when,
            "seeds": len(_common(by, a, b)),
            "difference": v.difference,
            "se": v.se,
            "verdict": v.kind,
        }
        for (a, b, when), v in verdicts.items()
    ]
    notes = interpret(cfg, by, verdicts)
    figures = [_val_figure(ctx.out / "val_curves.png", by, train_arms)]
    if any(a in by for a in TUNED):
        figures.append(_keep_figure(ctx.out / "keep.png", by, cfg))
        figures.append(_snr_figure(ctx.out / "snr.png", by, cfg))
    optuna = _optuna_summary(by) if "optuna" in by else None
    if optuna is not None and "ours" in by:
        figures.append(_optuna_figure(ctx.out / "optuna.png", by))
    sweep = [r for r in results if r["kind"] == "sweep"]
    sweep_rows = [_sweep_row(r) for r in sweep]
    diag_rows = [_diag_row(r) for a in TUNED for r in by.get(a, [])]
    total_cpu = parent_cpu + sum(r["cpu_s"] for r in results)
    wall = time.perf_counter() - t0
    model_txt = f"{cfg['model.embed']}-dim embedding, 2 LSTMs of {cfg['model.hidden']} units" + (
        ", tied decoder" if cfg["model.tie"] else ""
    )
    opt = "SGD" if cfg["train.optimizer"] == "sgd" else "Adam"
    recipe = (
        f"{cfg['train.steps']:,} {opt} steps (lr {cfg['train.lr']:g}, batch "
        f"{cfg['train.batch_size']} × {cfg['data.seq_len']} tokens"
        + (f", clip {cfg['train.clip']:g}" if cfg["train.clip"] else "")
        + (f", patience {cfg['train.patience']} evaluations" if cfg["train.patience"] else "")
        + "); "
        f"tuned arms: a hyper step every {cfg['hyper.every']} steps by {cfg['hyper.method']}, "
        f"{cfg['hyper.optimizer']} at {cfg['hyper.lr']:g} on the keep-probability logits, from dropout "
        f"{cfg['dropout.rate'] if cfg['dropout.init'] == 'auto' else cfg['dropout.init']:g}; "
        f"fixed arm: dropout {cfg['dropout.rate']:g} at every site"
    )
    title = (
        f"lstm-dropout: {', '.join(ARM_NAMES[a] for a in arms)} ({corpus.name}, {cfg['model.hidden']} units)"
    )
    body = [
        f"Data: {corpus.source}; vocabulary {corpus.vocab_size:,}; {len(data['train'][0]):,} training, "
        f"{len(data['val'][0]):,} validation and {len(data['test'][0]):,} test sequences of "
        f"{cfg['data.seq_len']} tokens. Model: {model_txt}. Each run: {recipe}. Seeds {seeds}.",
        "",
        f"CPU time of the whole run: {total_cpu:.0f} s in {cfg['jobs']} process(es) (wall {wall:.0f} s).",
        "",
        "```",
        dry_run(
            {**cfg, "arms": [a for a in arms if a in ("fixed", "ours", "ours_many")] or ["none"]}, corpus
        ),
        "```",
        "",
        "## Perplexity (mean ± std over seeds)",
        "",
        "`test_ppl_at_best`: test perplexity at the evaluation with the lowest validation loss (early "
        "stopping, the paper's protocol); `_end`: after all the steps. `cost_vs_none`: CPU time against the "
        "no-dropout run of the same seed.",
        "",
        markdown_table(columns, rows),
        "",
        "## Paired differences (a − b, test perplexity, over seeds)",
        "",
        markdown_table(["a", "b", "when", "seeds", "difference", "se", "verdict"], diffs),
        "",
        "## Every run",
        "",
        markdown_table(
            [
                "arm",
                "seed",
                "best_val_ppl",
                "best_step",
                "test_ppl_at_best",
                "val_ppl_end",
                "test_ppl_end",
                "cpu_s",
                "keep_end",
            ],
            seed_rows,
        ),
        "",
    ]
    if diag_rows:
        body += [
            f"## The hypergradient (windows of {cfg['diag.window']} hyper steps)",
            "",
            "`snr` = ‖mean g‖/‖std g‖ over a window (pure noise: about 1/√window = "
            f"{1 / math.sqrt(cfg['diag.window']):.2f}); `persistence` = ‖Σ Δθ‖/Σ ‖Δθ‖ (a random walk: "
            "about the same 1/√window); `changed`: hyper steps that moved some keep probability by "
            "more than 1e-6.",
            "",
            markdown_table(list(diag_rows[0]), diag_rows),
            "",
        ]
    if sweep_rows:
        body += [
            f"## Sweep (seed {cfg['seed']}, {ARM_NAMES[cfg['sweep.arm']]})",
            "",
            markdown_table(list(sweep_rows[0]), sweep_rows),
            "",
        ]
    if optuna is not None:
        body += ["## Optuna", "", markdown_table(list(optuna["rows"][0]), optuna["rows"]), ""]
    body += [*what_it_shows(notes), "## Figures", "", *[f"![{f.stem}]({f.name})" for f in figures], ""]
    result = {
        "dataset": corpus.source,
        "vocab": corpus.vocab_size,
        "rows": rows,
        "differences": diffs,
        "runs": seed_rows,
        "diagnostics": diag_rows,
        "sweep": sweep_rows,
        "optuna": optuna,
        "notes": notes,
        "cpu_s": total_cpu,
        "units": list(results),
    }
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
        figures=figures,
        also=[ctx.out / "metrics.jsonl"],
    )


PAIRS = (
    ("ours", "fixed"),
    ("ours", "none"),
    ("ours_many", "fixed"),
    ("ours_many", "none"),
    ("ours_many", "ours"),
    ("fixed", "none"),
    ("optuna", "ours"),
    ("optuna", "fixed"),
)


def _common(by: Mapping[str, list[dict[str, Any]]], a: str, b: str) -> list[int]:
    return sorted({r["seed"] for r in by[a]} & {r["seed"] for r in by[b]})


def report_verdicts(by: Mapping[str, list[dict[str, Any]]]) -> dict[tuple[str, str, str], Verdict]:
    """Arm ``a`` against arm ``b`` (:data:`PAIRS`, where both ran) on the test perplexity at the best
    validation evaluation (``at_best``) and at the end (``end``; not for Optuna, whose trials keep only
    their best): :func:`.shared.versus` with the paired standard error over the seeds both ran."""
    out: dict[tuple[str, str, str], Verdict] = {}
    for a, b in PAIRS:
        if a not in by or b not in by or not _common(by, a, b):
            continue
        common = _common(by, a, b)
        for when in ("at_best", "end"):
            if when == "end" and "optuna" in (a, b):
                continue
            va = torch.tensor([_metric(by[a], s, when) for s in common], dtype=torch.float64)
            vb = torch.tensor([_metric(by[b], s, when) for s in common], dtype=torch.float64)
            out[(a, b, when)] = versus(
                ARM_NAMES[a],
                ARM_NAMES[b],
                float(va.mean()),
                float(vb.mean()),
                paired_se(va, vb),
                metric="test perplexity "
                + ("at the best validation evaluation" if when == "at_best" else "at the end of the budget"),
                higher_is_better=False,
                digits=".2f",
                se_what=f"paired standard error over {len(common)} seeds",
                no_se="one seed: no noise estimate",
            )
    return out


def _metric(rs: list[dict[str, Any]], seed: int, when: str) -> float:
    r = next(r for r in rs if r["seed"] == seed)
    if r["kind"] == "optuna":
        return _ppl(r["best"]["test_loss"])
    return _ppl(r["best" if when == "at_best" else "last"]["test_loss"])


def _ratio(xs: Sequence[float], base: Sequence[float | None]) -> str:
    rs = [x / b for x, b in zip(xs, base, strict=True) if b]
    return _ms(rs, 2) + "×" if rs else "-"


def _diag_row(r: dict[str, Any]) -> dict[str, Any]:
    w = r["windows"]
    c = r["counts"]
    return {
        "arm": ARM_NAMES[r["arm"]],
        "seed": r["seed"],
        "hyper_steps": c["steps"],
        "applied": c["applied"],
        "changed": f"{c['changed'] / max(c['steps'], 1):.0%}",
        "snr_first": w[0]["snr"] if w else None,
        "snr_last": w[-1]["snr"] if w else None,
        "snr_mean": statistics.fmean(x["snr"] for x in w) if w else None,
        "noise_snr": w[0]["noise_snr"] if w else None,
        "coords_snr_gt1": statistics.fmean(x["coords_snr_gt1"] for x in w) if w else None,
        "persistence": statistics.fmean(x["persistence"] for x in w) if w else None,
        "cos": statistics.fmean(x["cos"] for x in w) if w else None,
        "snr_by": ", ".join(f"{k} {statistics.fmean(x['snr_by'][k] for x in w):.2f}" for k in w[0]["snr_by"])
        if w
        else "-",
        "hyper_cpu_share": f"{r['hyper_cpu_s'] / max(r['cpu_s'], 1e-9):.0%}",
        "solver": _solver_text(r),
    }


def _sweep_row(r: dict[str, Any]) -> dict[str, Any]:
    w = r["windows"]
    return {
        "hyper_lr": r["hyper"]["hyper.lr"],
        "every": r["hyper"]["hyper.every"],
        "method": r["hyper"]["hyper.method"],
        "hyper_steps": r["counts"]["steps"],
        "skipped": r["counts"]["skipped"],
        "test_ppl_at_best": _ppl(r["best"]["test_loss"]),
        "test_ppl_end": _ppl(r["last"]["test_loss"]),
        "keep_end": ", ".join(f"{k} {v:.3f}" for k, v in _keep_end(r).items()),
        "snr_mean": statistics.fmean(x["snr"] for x in w) if w else None,
        "persistence": statistics.fmean(x["persistence"] for x in w) if w else None,
        "solver": _solver_text(r),
        "cpu_s": r["cpu_s"],
    }


def _solver_text(r: dict[str, Any]) -> str:
    """The solver's own numbers of a run: products, retries, skips, the power iteration's λ_max estimates,
    the damping that retries used."""
    sv, c = r.get("solver") or {}, r["counts"]
    parts = [f"{sv.get('hvps', 0)} HVPs"]
    lam = sv.get("lambda_max") or []
    if lam:
        parts.append(
            f"λ_max {statistics.median(lam):.3g} [{min(lam):.3g}, {max(lam):.3g}] ({len(lam)} estimates)"
        )
    if sv.get("damping"):
        parts.append(f"damping up to {max(sv['damping']):.3g}")
    if sv.get("retried") or c.get("skipped"):
        parts.append(f"{sv.get('retried', 0)} retried, {c.get('skipped', 0)} skipped")
    return "; ".join(parts)


def _optuna_summary(by: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    for r in by["optuna"]:
        trials = _trials(r)
        ours = next((o for o in by.get("ours", []) if o["seed"] == r["seed"]), None)
        target = ours["best"]["test_loss"] if ours else None
        row: dict[str, Any] = {
            "seed": r["seed"],
            "trials": len(trials),
            "steps": trials[-1].steps if trials else 0,
            "test_ppl_best_trial": _ppl(r["best"]["test_loss"]),
            "rates": ", ".join(f"{k} {v:.2f}" for k, v in r["best_params"].items()),
            "cpu_s": r["cpu_s"],
            "wall_s": r["wall_s"],
        }
        if ours is not None:
            s = steps_to_match(trials, target) if target is not None else None
            t = time_to_match(trials, target) if target is not None else None
            row.update(
                {
                    "ours_test_ppl": _ppl(target),
                    "tpe_steps_to_match_ours": s,
                    "tpe_wall_s_to_match_ours": t,
                    "ours_steps_to_match_tpe": _ours_steps_to(ours, r["best"]["test_loss"]),
                    "ours_wall_s": ours["train_wall_s"],
                    "ours_cpu_s": ours["cpu_s"],
                }
            )
        rows.append(row)
    return {"rows": rows, "incumbents": {r["seed"]: incumbent(_trials(r)) for r in by["optuna"]}}


def _ours_steps_to(ours: dict[str, Any], target: float) -> int | None:
    """The first evaluation step at which the tuned run's early-stopped test loss (that of the best
    validation evaluation so far) reaches ``target``."""
    best = None
    for e in ours["evals"]:
        if best is None or e["val_loss"] < best["val_loss"]:
            best = e
        if best["test_loss"] <= target:
            return int(e["step"])
    return None


def interpret(
    cfg: Config, by: dict[str, list[dict[str, Any]]], verdicts: Mapping[tuple[str, str, str], Verdict]
) -> list[str]:
    """The notes: the untuned arm's overfitting, the verdicts, where the rates went and why."""
    notes: list[str] = []
    if "none" in by:
        rs = by["none"]
        rise = [(_ppl(r["last"]["val_loss"]) / _ppl(r["best"]["val_loss"]) - 1) for r in rs]
        best_val = _ms([_ppl(r["best"]["val_loss"]) for r in rs])
        end_val = _ms([_ppl(r["last"]["val_loss"]) for r in rs])
        notes.append(
            f"No dropout overfits: its validation perplexity is lowest at step "
            f"{_ms([r['best']['step'] for r in rs], 0)} ({best_val}) and rises by "
            f"{_ms([100 * x for x in rise])}% to {end_val} at step {rs[0]['last']['step']}."
            if statistics.fmean(rise) > 0.01
            else "No dropout does NOT overfit within the budget (validation perplexity at the end within 1% "
            "of its best): the regulariser has little to do here; train longer (train.steps) or on less data."
        )
    for key in (
        ("ours", "fixed", "at_best"),
        ("ours", "fixed", "end"),
        ("ours", "none", "at_best"),
        ("ours_many", "fixed", "at_best"),
        ("ours_many", "fixed", "end"),
        ("ours_many", "none", "at_best"),
        ("fixed", "none", "at_best"),
        ("fixed", "none", "end"),
    ):
        if key in verdicts:
            text = verdicts[key].text
            notes.append(text[0].upper() + text[1:] + ".")
    for arm in TUNED:
        if arm not in by:
            continue
        rs = by[arm]
        start = 1 - (cfg["dropout.rate"] if cfg["dropout.init"] == "auto" else cfg["dropout.init"])
        ends = {k: [_keep_end(r)[k] for r in rs] for k in _keep_end(rs[0])}
        up = sum(statistics.fmean(v) > start for v in ends.values())
        w = [x for r in rs for x in r["windows"]]
        snr = statistics.fmean(x["snr"] for x in w) if w else math.nan
        noise = 1 / math.sqrt(cfg["diag.window"])
        notes.append(
            f"{ARM_NAMES[arm]}: the mean keep probabilities went from {start:.3f} to "
            + ", ".join(f"{k} {_ms(v, 3)}" for k, v in ends.items())
            + f" ({up} of {len(ends)} regularisers toward less dropout); hypergradient window SNR "
            f"{snr:.2f} against {noise:.2f} for pure noise; "
            f"{statistics.fmean(r['counts']['changed'] / max(r['counts']['steps'], 1) for r in rs):.0%} of "
            f"the hyper steps changed a keep probability; the hyper steps took "
            f"{statistics.fmean(r['hyper_cpu_s'] / r['cpu_s'] for r in rs):.0%} of the CPU time."
        )
    lost = [k for k, v in verdicts.items() if k[0] in TUNED and k[1] == "fixed" and v.kind != "beats"]
    if lost and "ours" in by:
        rs = by["ours"]
        start = 1 - (cfg["dropout.rate"] if cfg["dropout.init"] == "auto" else cfg["dropout.init"])
        moved = statistics.fmean(statistics.fmean(_keep_end(r).values()) for r in rs) - start
        steps = statistics.fmean(r["counts"]["applied"] for r in rs)
        if abs(moved) < 0.005:  # under half a percentage point of keep probability: not tuned
            notes.append(
                f"The tuned rates barely moved (mean keep probability {moved:+.4f} after {steps:.0f} hyper "
                f"steps): with Adam each hyper step moves a logit by at most about hyper.lr "
                f"({cfg['hyper.lr']:g}), so the arm is its own start, not evidence about the hypergradient."
            )
        elif moved > 0:
            notes.append(
                f"Why the tuned rates do not clearly beat the fixed ones (not on every measure): the keep "
                f"probabilities rose ({moved:+.3f} "
                "on average, less dropout) although the untuned model overfits. The identity approximation "
                "(and one Neumann term) measures how the validation loss changes over about one more "
                "training step, and over one step less dropout always fits better; dropout pays off only "
                "over many steps, by slowing the memorising that makes the validation loss rise later. The "
                "hypergradient therefore lowers the dropout rates, also while the validation loss rises: the "
                "short-horizon bias of greedy hyperparameter adaptation (Wu et al. 2018)."
            )
        else:
            notes.append(
                f"The tuned rates moved toward more dropout ({moved:+.3f} in mean keep probability) without "
                "beating the fixed rates."
            )
    return notes


# --------------------------------------------------------------------------------- figures
COLORS = {"none": "C0", "fixed": "C1", "ours": "C2", "ours_many": "C3", "optuna": "C4"}


def _val_figure(path: Path, by: dict[str, list[dict[str, Any]]], arms: Sequence[str]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for a in arms:
        rs = by[a]
        steps = [e["step"] for e in rs[0]["evals"]]
        n = min(len(r["evals"]) for r in rs)
        vals = torch.tensor([[_ppl(e["val_loss"]) for e in r["evals"][:n]] for r in rs], dtype=torch.float64)
        m = vals.mean(0)
        ax.plot(steps[:n], m.tolist(), color=COLORS[a], label=f"{ARM_NAMES[a]} ({len(rs)} seeds)")
        if len(rs) > 1:
            ax.fill_between(
                steps[:n],
                vals.min(0).values.tolist(),
                vals.max(0).values.tolist(),
                color=COLORS[a],
                alpha=0.15,
            )
    lows = [_ppl(min(e["val_loss"] for e in r["evals"])) for a in arms for r in by[a]]
    if lows:  # the early, steep part off the top: the rise at the end is what matters
        ax.set_ylim(min(lows) * 0.97, min(lows) * 1.35)
    ax.set_xlabel("inner training step")
    ax.set_ylabel("validation perplexity (mean; band: min–max over seeds)")
    ax.set_title("validation perplexity over training", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _keep_figure(path: Path, by: dict[str, list[dict[str, Any]]], cfg: Config) -> Path:
    import matplotlib.pyplot as plt

    names = site_names(cfg)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for a in TUNED:
            for j, r in enumerate(by.get(a, [])):
                steps = [k["step"] for k in r["keep"]]
                q = [k[name]["q"] for k in r["keep"]]
                if a == "ours" or j > 0:
                    ax.plot(
                        steps,
                        [k[name]["mean"] for k in r["keep"]],
                        color=COLORS[a],
                        lw=0.8,
                        label=ARM_NAMES[a] + " (mean, each seed)" if j == 0 else None,
                    )
                else:  # the many rates of one seed: their spread
                    ax.fill_between(
                        steps,
                        [x[0] for x in q],
                        [x[4] for x in q],
                        color=COLORS[a],
                        alpha=0.15,
                        label=ARM_NAMES[a] + f" 5–95% (seed {r['seed']})",
                    )
                    ax.fill_between(steps, [x[1] for x in q], [x[3] for x in q], color=COLORS[a], alpha=0.3)
                    ax.plot(steps, [x[2] for x in q], color=COLORS[a], lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("inner step", fontsize=8)
    axes[0][0].set_ylabel("keep probability")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _snr_figure(path: Path, by: dict[str, list[dict[str, Any]]], cfg: Config) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for a in TUNED:
        for j, r in enumerate(by.get(a, [])):
            w = r["windows"]
            ax.plot(
                [x["last_step"] for x in w],
                [x["snr"] for x in w],
                color=COLORS[a],
                lw=0.8,
                marker=".",
                label=ARM_NAMES[a] if j == 0 else None,
            )
    ax.axhline(
        1 / math.sqrt(cfg["diag.window"]),
        color="k",
        ls="--",
        lw=0.8,
        label=f"pure noise (1/√{cfg['diag.window']})",
    )
    ax.set_xlabel("hyper step")
    ax.set_ylabel("‖mean g‖ / ‖std g‖ over a window")
    ax.set_yscale("log")
    ax.set_title("hypergradient signal-to-noise over windows of hyper steps", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _optuna_figure(path: Path, by: dict[str, list[dict[str, Any]]]) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for j, r in enumerate(by["ours"]):
        best = None
        xs, ts, ys = [], [], []
        for e in r["evals"]:
            if best is None or e["val_loss"] < best["val_loss"]:
                best = e
            xs.append(e["step"])
            ts.append(e["time_s"])
            ys.append(_ppl(best["test_loss"]))
        for ax, x in zip(axes, (xs, ts), strict=True):
            ax.plot(x, ys, color=COLORS["ours"], lw=1, label=ARM_NAMES["ours"] if j == 0 else None)
    for j, r in enumerate(by["optuna"]):
        inc = incumbent(_trials(r))
        steps = [t["steps"] for t in r["trials"]]
        for ax, x in zip(axes, (steps, [e for e, _, _ in inc]), strict=True):
            ax.step(
                x,
                [_ppl(t) for _, _, t in inc],
                where="post",
                marker="o",
                ms=3,
                color=COLORS["optuna"],
                label=ARM_NAMES["optuna"] + " (best-validation trial so far)" if j == 0 else None,
            )
    axes[0].set_xlabel("inner training steps spent")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel("test perplexity (early-stopped)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("test perplexity of the tuned run and of Optuna's incumbent, each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="lstm-dropout",
    summary="2-layer LSTM language model: dropout and DropConnect rates tuned by IFT during training vs "
    "fixed rates, none and Optuna (perplexity, several seeds)",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    dry_run=dry_run,
)

__all__ = [
    "EXPERIMENT",
    "FULL",
    "SCHEMA",
    "SMOKE",
    "Fixed",
    "LSTMLanguageModel",
    "UnitDropout",
    "WeightDrop",
    "WordDropout",
    "check",
    "dry_run",
    "families",
    "hyper_method",
    "interpret",
    "report_verdicts",
    "run",
    "run_unit",
    "sequence_loss",
]
