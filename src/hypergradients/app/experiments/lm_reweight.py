"""``lm-reweight``: learned data weights for a small transformer language model, by the implicit
function theorem, against plain training, a clean-only oracle and cheaper hyper steps.

**The data.** Byte-level language modelling (256 tokens, one per byte) on the King James Bible shipped
with the package (``data.root`` empty; :mod:`hypergradients.app.corpus`), split by position as
:func:`~hypergradients.app.corpus.load_corpus` splits it (90 / 5 / 5 % of the verses), or on the text
files of a corpus in ``data.root``. The training text is cut into ``data.n_train`` sequences of
``data.seq_len + 1`` bytes (inputs and next-byte targets). A fraction ``noise.p`` of them (exactly
``round(p·n)``, chosen by the seed) is corrupted, in equal shares, in the ways web-scale training data
is (:func:`corrupt`):

* ``shuffled``    — the sequence's words (split at spaces) in a random order: word salad. A byte-level
  model's tokens are bytes, and bytes shuffled would be the ``random`` kind again, so the shuffle is
  by words;
* ``foreign``     — another language, simulated: the letters through a fixed random substitution
  (one permutation of a–z per seed, the same for capitals), so the text keeps English's word lengths,
  spacing and punctuation but not its spelling;
* ``random``      — uniformly random printable ASCII bytes (32–126), the same alphabet as the text;
* ``boilerplate`` — duplicated boilerplate: a window (at one of 8 offsets) of one of three fixed
  web-page footers, so at most 24 distinct sequences repeated hundreds of times.

The validation set (for the hyper steps) and the test set (only evaluated) are clean sequences of the
validation and test text.

**The model** (:class:`TransformerLM`): a decoder-only transformer, pre-LayerNorm, learned positions,
causal self-attention through ``torch.nn.functional.scaled_dot_product_attention`` — whose fused CPU
kernel has no second derivative, so every hyper step computes its Hessian-vector products and mixed
products by finite differences of gradients (``hyper.hvp_mode = "finite-difference"``, the only mode
that works for it on the CPU). Trained by Adam on the mean per-sequence cross-entropy.

**The hyperparameters** and arms, every arm of a seed from the same initial weights, with the same
number of training steps (``train.rounds × train.inner_steps``):

* ``plain``       — plain training on all the sequences;
* ``clean-only``  — training on the uncorrupted sequences only (an oracle: it knows which they are);
* ``neumann``     — one weight per training sequence (:class:`~hypergradients.ExampleWeights`,
  ``ω = 2σ(θ)``, ``L_T = mean_i ω_i ℓ_i``), a hyper step every ``train.inner_steps`` steps by the
  implicit function theorem with a Neumann series of ``hyper.iters`` terms (``α = 1/λ_max``);
* ``cg``          — the same weights, the hyper step by ``hyper.iters`` damped conjugate-gradient
  iterations;
* ``sama``        — the same weights, the hyper step SAMA's (Choe et al. 2023): the identity
  approximation of ``H⁻¹`` preconditioned by the model's Adam, ``p = lr·v/(√v̂ + ε)``
  (:class:`~hypergradients.Identity` with ``precondition="inner_optimizer"``): no Hessian-vector
  product, only the mixed product;
* ``first-order`` — the same weights, the hyper step :class:`~hypergradients.FirstOrder` (the
  value-function penalty of F2SA and ScaleBiO, central form): ``hyper.iters`` gradient steps of size
  ``hyper.fo_lr`` on ``L_T ± L_V/σ`` (``σ = hyper.fo_sigma``), no second derivative at all;
* ``net``         — :class:`~hypergradients.LossReweighting`: a 1-``net.hidden``-1 network from each
  sequence's loss to its weight, its weights the hyperparameters, the hyper step as ``neumann``'s.

The hyper steps use a training batch of ``hyper.batch_size`` sequences for ``L_T`` (and so for
every Hessian-vector product) and a clean validation batch of ``hyper.val_batch_size`` for ``L_V``.
Neumann's ``λ_max`` is carried from one hyper step to the next (``hyper.warm_start``: re-estimated
every 10 steps, or when the series grows); CG and first-order start every hyper step from zero
(first-order's carried ``p`` is the same kind of iterate as CG's), because CG's carried
solution diverged on this model's indefinite Hessian (measured: with the last solution as the start
and 3 iterations, the hypergradient's norm grew about 1.3× per hyper step, from 0.5 to 1e16 in 170
steps, until a finite-difference step overflowed).

**Measured**, over ``seeds``: clean test perplexity (``exp`` of the mean cross-entropy per byte);
for the arms with weights, the AUC of "a low weight means corrupted" over all training sequences
(:func:`~hypergradients.app.experiments.shared.flipped_auc`), overall and per kind of corruption
(the net's weights are ``ω(ℓ_i)`` at the final model); the wall and CPU time of a hyper step relative
to a training step of the same arm (:class:`StepTimes`); the peak memory of each arm above its start
(:func:`peak_memory`). For reference, the same AUC of the plain model's final per-sequence loss ("a
high loss means corrupted"), a detector that costs nothing.

``config=full`` (for a GPU): a GPT-2-small-sized model (12 layers, width 768, 12 heads), sequences of
256 bytes, every sequence of the corpus in ``data.root`` (or the King James Bible); ``model.init``
loads weights of this model class saved by ``torch.save(model.state_dict())``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.first_order import FirstOrder
from ...core.method import Method
from ...core.solvers import CG, Identity, Neumann
from ...hparams import ExampleWeights, Family, LossReweighting
from ...training.callbacks import Callback
from ...training.files import json_dumps, write_atomic
from ...training.hyper import _mode
from ..config import Config, ConfigError, Option
from ..corpus import kjv_lines
from ..datasets import DataFormatError, DataUnavailableError
from .base import Experiment, ExperimentResult, RunContext, with_threads
from .base import with_preset as _with_preset
from .shared import (
    ArmsProgress,
    RunMetrics,
    begin,
    finish,
    flipped_auc,
    hyper_steps,
    train_arm,
    versus,
    what_it_shows,
)

KINDS = ("shuffled", "foreign", "random", "boilerplate")
ARMS = ("plain", "clean-only", "neumann", "cg", "sama", "first-order", "net")
WEIGHTED = ("neumann", "cg", "sama", "first-order")  # one weight per training sequence
TUNED = (*WEIGHTED, "net")
ARM_NAMES = {
    "plain": "plain training",
    "clean-only": "clean-only (oracle)",
    "neumann": "per-sequence weights, IFT Neumann",
    "cg": "per-sequence weights, IFT CG",
    "sama": "per-sequence weights, Adam-preconditioned identity (SAMA-style)",
    "first-order": "per-sequence weights, first-order penalty (F2SA-style)",
    "net": "loss-reweighting net, IFT Neumann",
}
#: Three web-page footers: the ``boilerplate`` corruption's texts (``corrupt``).
BOILERPLATE = (
    "Subscribe to our newsletter for the latest news and offers. All rights reserved. "
    "Privacy Policy | Terms of Use | Contact Us | Sitemap\n",
    "This website uses cookies to improve your experience. By continuing to browse the site you agree "
    "to our use of cookies. Accept | Learn more\n",
    "Click here to download the free e-book! Copyright (c) 2009-2024. Do not redistribute without "
    "permission. Share on Facebook | Tweet | Pin it\n",
)
MEASURED = "measured.json"  # an arm's CPU seconds and peak memory, read back on --resume
_OFFSETS = 8  # boilerplate windows start at 0, 8, ..., 56 bytes into the footer
#: Text files of a corpus in ``data.root``: the first triple present is read (train, validation, test).
CORPUS_FILES = (
    ("train.txt", "valid.txt", "test.txt"),
    ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),
    ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
)

SCHEMA: dict[str, Option] = {
    "seeds": Option(
        [0, 1, 2],
        "seeds (corruption, initial weights, data order); the table averages over them",
        list,
        item=int,
        low=0,
        nonempty=True,
        unique=True,
    ),
    "threads": Option(1, "torch's CPU threads", int, low=1),
    "config": Option(
        "cpu",
        "cpu: the defaults below; full: a GPT-2-small-sized model for a GPU (the keys "
        "of FULL still at their defaults)",
        str,
        choices=("cpu", "full"),
    ),
    "arms": Option(list(ARMS), "which arms to train", list, choices=ARMS, nonempty=True, unique=True),
    "data.root": Option(
        "",
        "folder with a corpus as text files (train.txt/valid.txt/test.txt, WikiText's "
        "wiki.*.raw or PTB's ptb.*.txt); empty: the King James Bible shipped with the "
        "package",
        str,
    ),
    "data.seq_len": Option(
        32, "bytes per training sequence (inputs; the targets are shifted by one)", int, low=2
    ),
    "data.n_train": Option(
        16384, "training sequences, one weight each (0: all of the training text)", int, low=0
    ),
    "data.n_val": Option(256, "clean validation sequences (the hyper steps' L_V)", int, low=1),
    "data.n_test": Option(1024, "clean test sequences (only evaluated)", int, low=1),
    "noise.p": Option(0.5, "fraction of the training sequences corrupted", float, low=0.0, high=0.95),
    "noise.kinds": Option(
        list(KINDS), "the corruptions, in equal shares", list, choices=KINDS, nonempty=True, unique=True
    ),
    "model.width": Option(64, "transformer width", int, low=1),
    "model.layers": Option(2, "transformer blocks", int, low=1),
    "model.heads": Option(4, "attention heads (must divide the width)", int, low=1),
    "model.init": Option("", "a state_dict of this model (torch.save) to start from; empty: random", str),
    "train.rounds": Option(
        100, "rounds (each: train.inner_steps training steps, then one hyper step)", int, low=1
    ),
    "train.inner_steps": Option(4, "training steps per round (between hyper steps)", int, low=1),
    "train.batch_size": Option(32, "sequences per training step", int, low=1),
    "train.lr": Option(3e-3, "Adam learning rate of the model", float, positive=True),
    "hyper.batch_size": Option(32, "training sequences in a hyper step's L_T (and its HVPs)", int, low=1),
    "hyper.val_batch_size": Option(
        32, "clean validation sequences in a hyper step's L_V (0: all)", int, low=0
    ),
    "hyper.lr": Option(
        0.1, "hyper learning rate (Adam on the weights' logits and the net's weights)", float, positive=True
    ),
    "hyper.iters": Option(2, "Neumann terms / CG iterations / first-order steps", int, low=1),
    "hyper.power_iters": Option(5, "power iterations behind Neumann's α = 1/λ_max", int, low=1),
    "hyper.damping": Option(1e-2, "CG's damping δ (solves (H + δI)p = v)", float, low=0.0),
    "hyper.fo_lr": Option(
        1e-2,
        "first-order's inner step size: below 2/λ_max of the training loss's "
        "Hessian (the neumann arm's metrics log λ_max)",
        float,
        positive=True,
    ),
    "hyper.fo_sigma": Option(
        1e3, "first-order's penalty σ (bias O(1/σ²), rounding O(σ·eps))", float, positive=True
    ),
    "hyper.hvp_mode": Option(
        "finite-difference",
        "Hessian-vector products: finite-difference (the attention "
        "kernel has no double backward on the CPU), reverse or forward",
        str,
        choices=("finite-difference", "reverse", "forward"),
    ),
    "hyper.warm_start": Option(
        True,
        "carry Neumann's λ_max from one hyper step to the next (CG and "
        "first-order always start from zero: see the module docstring)",
        bool,
    ),
    "net.hidden": Option(16, "hidden units of the loss-reweighting network", int, low=1),
    "eval_every": Option(25, "rounds between evaluations of the validation and test perplexity", int, low=1),
    "checkpoint_every": Option(50, "rounds between checkpoints", int, low=1),
}

SMOKE: dict[str, Any] = {
    "seeds": [0],
    "data.seq_len": 8,
    "data.n_train": 64,
    "data.n_val": 8,
    "data.n_test": 8,
    "model.width": 8,
    "model.layers": 1,
    "model.heads": 2,
    "train.rounds": 2,
    "train.inner_steps": 2,
    "train.batch_size": 8,
    "hyper.batch_size": 8,
    "hyper.val_batch_size": 0,
    "hyper.iters": 2,
    "hyper.power_iters": 2,
    "eval_every": 1,
    "checkpoint_every": 1,
}

#: ``config=full``: a GPT-2-small-sized model (85M weights besides the 256-byte embedding and head),
#: every sequence of the corpus, for a GPU.
FULL: dict[str, Any] = {
    "data.seq_len": 256,
    "data.n_train": 0,
    "data.n_val": 1024,
    "data.n_test": 4096,
    "model.width": 768,
    "model.layers": 12,
    "model.heads": 12,
    "train.rounds": 5000,
    "train.batch_size": 64,
    "train.lr": 6e-4,
    "hyper.batch_size": 64,
    "hyper.val_batch_size": 64,
    "hyper.iters": 5,
    "eval_every": 250,
    "checkpoint_every": 250,
}


def with_preset(cfg: Config) -> Config:
    """``cfg`` with ``config=full`` applied (each key of :data:`FULL` still at its default)."""
    return _with_preset(cfg, FULL, SCHEMA)


# ------------------------------------------------------------------------------------------ data
def read_texts(root: str) -> tuple[bytes, bytes, bytes, str]:
    """The training, validation and test text as bytes, and where they came from: the King James Bible
    shipped with the package (``root`` empty; verses one a line, split 90/5/5 by position) or the first
    triple of :data:`CORPUS_FILES` present in ``root``."""
    if not root:
        lines = kjv_lines()
        a, b = int(0.9 * len(lines)), int(0.95 * len(lines))
        parts = [("\n".join(p) + "\n").encode("ascii") for p in (lines[:a], lines[a:b], lines[b:])]
        source = f"King James Bible (shipped, {len(lines):,} verses; 90/5/5 by position)"
        return parts[0], parts[1], parts[2], source
    folder = Path(root)
    for names in CORPUS_FILES:
        if all((folder / n).is_file() for n in names):
            texts = [(folder / n).read_bytes() for n in names]
            return texts[0], texts[1], texts[2], f"{', '.join(names)} in {folder}"
    expected = "; ".join("/".join(n) for n in CORPUS_FILES)
    raise DataUnavailableError(
        f"{str(folder)!r} has none of the corpus file triples ({expected}): put the "
        "training, validation and test text there under one of these names"
    )


def sequences(text: bytes, seq_len: int, n: int = 0) -> Tensor:
    """The first ``n`` (0: all) non-overlapping windows of ``seq_len + 1`` bytes of ``text``, ``(n,
    seq_len + 1)`` int64: ``w[:, :-1]`` the inputs, ``w[:, 1:]`` the next-byte targets. Window ``i``
    starts at byte ``i·seq_len`` (a window's last byte is the next one's first input), as
    :func:`~hypergradients.app.corpus.batchify` cuts a token stream."""
    # frombuffer refuses an empty buffer
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long() if text else torch.zeros(0).long()
    m = (len(ids) - 1) // seq_len
    if n:
        if n > m:
            raise ValueError(
                f"the text has {len(ids):,} bytes: {m:,} sequences of {seq_len} (+1) bytes, "
                f"fewer than the {n:,} asked for"
            )
        m = n
    if m < 1:
        raise ValueError(f"{len(ids)} bytes make no sequence of {seq_len} (+1) bytes")
    return ids[torch.arange(m)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]]


def corrupt(w: Tensor, p: float, kinds: Sequence[str], *, seed: int) -> tuple[Tensor, Tensor]:
    """``w`` (``(n, L)`` byte windows) with ``round(p·n)`` rows (chosen by ``seed``) corrupted, the
    ``kinds`` in equal shares (round robin over a random order), and each row's kind: 0 clean, ``j``
    the ``j``-th of ``kinds`` (module docstring for what each does)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown corruption {unknown[0]!r}; the kinds are {', '.join(KINDS)}")
    g = torch.Generator().manual_seed(10_007 + seed)
    n, length = w.shape
    out = w.clone()
    kind = torch.zeros(n, dtype=torch.long)
    picked = torch.randperm(n, generator=g)[: round(p * n)]
    if not kinds or not len(picked):
        return out, kind
    kind[picked] = torch.arange(len(picked)) % len(kinds) + 1
    cipher = torch.arange(256)
    perm = torch.randperm(26, generator=g)
    cipher[97:123], cipher[65:91] = 97 + perm, 65 + perm
    texts = [(t * (length // len(t) + 2 + _OFFSETS * 8 // len(t))).encode() for t in BOILERPLATE]
    for j, k in enumerate(kinds, start=1):
        rows = (kind == j).nonzero().flatten()
        if k == "random":
            out[rows] = torch.randint(32, 127, (len(rows), length), generator=g)
        elif k == "foreign":
            out[rows] = cipher[w[rows]]
        elif k == "boilerplate":
            which = torch.randint(len(texts), (len(rows),), generator=g).tolist()
            offset = (torch.randint(_OFFSETS, (len(rows),), generator=g) * 8).tolist()
            for r, t, o in zip(rows.tolist(), which, offset, strict=True):
                out[r] = torch.tensor(list(texts[t][o : o + length]))
        else:  # shuffled: the words (split at spaces) in a random order; the length is kept
            for r in rows.tolist():
                words = bytes(w[r].tolist()).split(b" ")
                order = torch.randperm(len(words), generator=g).tolist()
                out[r] = torch.tensor(list(b" ".join(words[i] for i in order)))
    return out, kind


@dataclass
class LMData:
    """Training windows (corrupted), their kinds (0 clean), the clean validation and test windows."""

    train: Tensor
    kind: Tensor
    val: Tensor
    test: Tensor
    source: str


def load(cfg: Config, texts: tuple[bytes, bytes, bytes, str], seed: int) -> LMData:
    """The seed's data: the same windows for every seed, corrupted by the seed."""
    tr, va, te, source = texts
    seq = cfg["data.seq_len"]
    w = sequences(tr, seq, cfg["data.n_train"])
    bad, kind = corrupt(w, cfg["noise.p"], cfg["noise.kinds"], seed=seed)
    return LMData(
        bad, kind, sequences(va, seq, cfg["data.n_val"]), sequences(te, seq, cfg["data.n_test"]), source
    )


def check(cfg: Config) -> tuple[bytes, bytes, bytes, str]:
    """Read the text and check every size before any file is written (errors name the key)."""
    cfg = with_preset(cfg)
    if cfg["model.width"] % cfg["model.heads"]:
        raise ConfigError(
            f"config key 'model.heads': {cfg['model.heads']} does not divide model.width "
            f"{cfg['model.width']}; pick a divisor"
        )
    if cfg["model.init"] and not Path(cfg["model.init"]).is_file():
        raise ConfigError(
            f"config key 'model.init': no file {cfg['model.init']!r}; give a state_dict saved "
            "by torch.save(model.state_dict()), or '' for random initial weights"
        )
    try:
        texts = read_texts(cfg["data.root"])
    except (DataUnavailableError, DataFormatError) as e:
        raise ConfigError(f"config key 'data.root': got {cfg['data.root']!r}. {e}") from None
    for key, text in (("data.n_train", texts[0]), ("data.n_val", texts[1]), ("data.n_test", texts[2])):
        try:
            sequences(text, cfg["data.seq_len"], cfg[key])
        except ValueError as e:
            raise ConfigError(
                f"config key {key!r}: got {cfg[key]} with data.seq_len={cfg['data.seq_len']}: {e}; lower it"
            ) from None
    return texts


# ----------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """``x + attn(LN(x))``, then ``x + MLP(LN(x))``: causal self-attention through
    ``scaled_dot_product_attention``, a 4× GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TransformerLM(nn.Module):
    """A decoder-only byte-level transformer: embedding + learned positions, ``layers`` pre-LN blocks,
    a final LayerNorm and a linear head; logits ``(B, T, vocab)`` of the next byte. GPT-2's
    initialisation (normal, std 0.02; the residual projections scaled by ``1/√(2·layers)``)."""

    def __init__(self, *, vocab: int = 256, seq_len: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            for lin in (blk.proj, blk.out):
                assert isinstance(lin, nn.Linear)
                nn.init.normal_(lin.weight, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))


def sequence_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sequence mean cross-entropy per byte ``(B,)``; equal lengths make its mean the mean per byte."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def model(cfg: Config, seed: int, device: torch.device) -> TransformerLM:
    """The seed's initial model (the same for every arm of a seed), or ``model.init``'s weights."""
    torch.manual_seed(seed)
    net = TransformerLM(
        seq_len=cfg["data.seq_len"],
        width=cfg["model.width"],
        layers=cfg["model.layers"],
        heads=cfg["model.heads"],
    )
    if cfg["model.init"]:
        try:
            net.load_state_dict(torch.load(cfg["model.init"], map_location="cpu", weights_only=True))
        except (RuntimeError, OSError) as e:
            raise ConfigError(
                f"config key 'model.init': {cfg['model.init']!r} is not a state_dict of this "
                f"model (model.width/layers/heads, data.seq_len): {e}"
            ) from None
    return net.to(device)


def families(cfg: Config, arm: str, n: int, device: torch.device) -> list[Family]:
    """The arm's tuned families: one weight per training sequence, the loss-reweighting network, or none."""
    if arm in WEIGHTED:
        return [ExampleWeights(n, device=device)]
    if arm == "net":
        return [LossReweighting(cfg["net.hidden"], device=device)]
    return []


def method(cfg: Config, arm: str) -> Method | None:
    """The arm's hypergradient method (``None``: an arm without hyperparameters)."""
    if arm in ("neumann", "net"):
        return Neumann(iters=cfg["hyper.iters"], alpha="auto", power_iters=cfg["hyper.power_iters"])
    if arm == "cg":
        return CG(iters=cfg["hyper.iters"], tol=1e-6, damping=cfg["hyper.damping"])
    if arm == "sama":
        return Identity(precondition="inner_optimizer")
    if arm == "first-order":
        return FirstOrder(sigma=cfg["hyper.fo_sigma"], steps=cfg["hyper.iters"], lr=cfg["hyper.fo_lr"])
    return None


# ------------------------------------------------------------------------------- measurements
class StepTimes(Callback):
    """Wall and CPU seconds of the training steps and of the hyper steps of one ``fit`` (evaluations
    and checkpoints excluded): a training step's time is that from the end of a round (or its
    checkpoint) to the next hyper step, divided by the steps taken."""

    def __init__(self, inner_steps: int) -> None:
        self.inner_steps = inner_steps
        self.totals = {
            "inner_s": 0.0,
            "inner_cpu_s": 0.0,
            "hyper_s": 0.0,
            "hyper_cpu_s": 0.0,
            "inner": 0.0,
            "hyper": 0.0,
        }
        self._mark = self._now()
        self._hyper = self._mark

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def _since(self, mark: tuple[float, float]) -> tuple[float, float]:
        now = self._now()
        return now[0] - mark[0], now[1] - mark[1]

    def on_fit_start(self, history: Sequence[Mapping[str, Any]]) -> None:
        self._mark = self._now()

    def on_before_hyper_step(self, hyper: Any) -> None:
        wall, cpu = self._since(self._mark)
        self.totals["inner_s"] += wall
        self.totals["inner_cpu_s"] += cpu
        self.totals["inner"] += self.inner_steps
        self._hyper = self._now()

    def on_hyper_step(self, hyper: Any, result: Any) -> None:
        wall, cpu = self._since(self._hyper)
        self.totals["hyper_s"] += wall
        self.totals["hyper_cpu_s"] += cpu
        self.totals["hyper"] += 1

    def on_round_end(self, record: dict[str, Any]) -> None:
        self._mark = self._now()

    def on_checkpoint(self, path: Path, round: int) -> None:
        self._mark = self._now()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.totals)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.totals.update({k: float(v) for k, v in state.items() if k in self.totals})

    def summary(self) -> dict[str, float]:
        """Seconds per training step and per hyper step (wall and CPU) and their ratios (NaN without)."""
        t, nan = self.totals, float("nan")
        out = {
            "train_step_s": t["inner_s"] / t["inner"] if t["inner"] else nan,
            "train_step_cpu_s": t["inner_cpu_s"] / t["inner"] if t["inner"] else nan,
            "hyper_step_s": t["hyper_s"] / t["hyper"] if t["hyper"] else nan,
            "hyper_step_cpu_s": t["hyper_cpu_s"] / t["hyper"] if t["hyper"] else nan,
        }
        both = t["inner"] and t["hyper"]
        out["hyper_over_train"] = out["hyper_step_s"] / out["train_step_s"] if both else nan
        out["hyper_over_train_cpu"] = (
            out["hyper_step_cpu_s"] / out["train_step_cpu_s"] if both and out["train_step_cpu_s"] > 0 else nan
        )
        return out


def _rss_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m[1]) if m else None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """The peak memory of the block above its start, in MB, in the yielded dict's ``"peak_mb"`` once
    the block ends: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``); on the CPU the
    process's peak resident set (Linux: ``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
    resident set at the start; NaN where neither can be read."""
    out = {"peak_mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
        start = _rss_kb("VmRSS")
    except OSError:
        start = None
    yield out
    peak = _rss_kb("VmHWM")
    if start is not None and peak is not None:
        out["peak_mb"] = (peak - start) / 1024


def kind_aucs(weights: Tensor, kind: Tensor, kinds: Sequence[str]) -> dict[str, float]:
    """:func:`~.shared.flipped_auc` overall (``"all"``) and of the clean sequences against each kind."""
    bad = kind != 0
    out = {"all": flipped_auc(weights, bad)}
    for j, k in enumerate(kinds, start=1):
        keep = (kind == 0) | (kind == j)
        out[k] = flipped_auc(weights[keep], bad[keep])
    return out


def per_sequence_loss(net: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Each window's loss ``(N,)`` under ``net`` in evaluation mode (windows ``(N, L+1)``), on the CPU."""
    parts = []
    with _mode(net, False), torch.no_grad():
        for s in range(0, len(x), batch_size):
            w = x[s : s + batch_size]
            parts.append(sequence_loss(net(w[:, :-1]), w[:, 1:]).float().cpu())
    return torch.cat(parts)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# ------------------------------------------------------------------------------------------ run
def _run(ctx: RunContext) -> ExperimentResult:
    """Train every arm for every seed; write config.toml, lm_reweight.json, metrics.jsonl, the figure
    and the report."""
    ctx = replace(ctx, config=with_preset(ctx.config))
    cfg, t0 = ctx.config, time.perf_counter()
    arms, seeds, rounds = list(cfg["arms"]), list(cfg["seeds"]), cfg["train.rounds"]
    runs = [(a, s) for s in seeds for a in arms]
    texts = begin(ctx, check, arms=[ctx.out / f"{a}-seed{s}" for a, s in runs])
    steps = rounds * cfg["train.inner_steps"]
    per: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    histories: dict[tuple[str, int], list[dict[str, Any]]] = {}
    loss_auc: list[dict[str, float]] = []
    seed_weights: dict[str, Tensor] = {}
    data = load(cfg, texts, seeds[0])
    with (
        RunMetrics(ctx.out / "metrics.jsonl") as metrics,
        ArmsProgress(ctx, "lm-reweight", len(runs), rounds) as bar,
    ):
        for i, (arm, seed) in enumerate(runs):
            if i == 0 or runs[i - 1][1] != seed:
                data = load(cfg, texts, seed)
            train_w = data.train if arm != "clean-only" else data.train[data.kind == 0]
            net = model(cfg, seed, ctx.device)
            fams = families(cfg, arm, len(train_w), ctx.device)
            out, tag = ctx.out / f"{arm}-seed{seed}", {"arm": arm, "seed": seed}
            timer = StepTimes(cfg["train.inner_steps"])
            dev = {
                k: v.to(ctx.device) for k, v in (("train", train_w), ("val", data.val), ("test", data.test))
            }
            sets = {k: (v[:, :-1], v[:, 1:]) for k, v in dev.items()}

            def show(rec: dict[str, Any], seed: int = seed) -> dict[str, Any]:
                return {"seed": seed, "test_ppl": _ppl(rec["test_loss"]) if "test_loss" in rec else None}

            cpu0 = time.process_time()
            # CG and first-order from zero at every hyper step (module docstring); Neumann carries its λ_max
            cold = arm in ("cg", "first-order")
            arm_ctx = replace(ctx, config={**cfg, "hyper.warm_start": False}) if cold else ctx
            with peak_memory(ctx.device) as mem:
                res = train_arm(
                    arm_ctx,
                    net,
                    fams,
                    sets["train"],
                    sets["val"],
                    out=out,
                    evals={"val": sets["val"], "test": sets["test"]},
                    loss_fn=sequence_loss,
                    hyper_method=method(cfg, arm),
                    seed=seed,
                    callbacks=[metrics.callback(tag, out), bar.tick(i, arm, show), timer],
                )
            measured = {"cpu_s": time.process_time() - cpu0, "peak_mb": mem["peak_mb"]}
            # a finished arm that --resume reads back costs no time or memory now: its own figures stand
            stored = out / MEASURED
            if ctx.resume and stored.is_file():
                measured = {
                    k: float("nan") if v is None else float(v)
                    for k, v in json.loads(stored.read_text()).items()
                }
            else:
                write_atomic(stored, json_dumps(measured))
            metrics.finish_arm(tag, res.metrics)
            histories[(arm, seed)] = res.metrics
            row: dict[str, Any] = {
                "arm": arm,
                "seed": seed,
                "hyperparameters": res.hyperparameters,
                "hyper_steps": hyper_steps(res) if fams else "-",
                "train_sequences": len(train_w),
                "test_loss": res.final["test_loss"],
                "val_loss": res.final["val_loss"],
                "test_ppl": _ppl(res.final["test_loss"]),
                "wall_s": res.wall_s,
                **measured,
                **timer.summary(),
            }
            weights: Tensor | None = None
            if arm in WEIGHTED:
                weights = next(iter(fams[0].natural().values())).detach().float().cpu()
                moved = (weights - 1).abs() > 1e-6
                row["moved"] = int(moved.sum())
                # among the sequences some hyper step has touched (the others are tied at 1)
                row["auc_moved"] = flipped_auc(weights[moved], data.kind[moved] != 0)
            elif arm == "net":
                fam = fams[0]
                assert isinstance(fam, LossReweighting)
                losses = per_sequence_loss(net, dev["train"])
                with torch.no_grad():
                    weights = fam.weight(losses.to(ctx.device), fam.tensors()).float().cpu()
                row.update(fam.summary())
            elif arm == "plain":
                # the free detector: a high final training loss means corrupted
                loss_auc.append(
                    kind_aucs(-per_sequence_loss(net, dev["train"]), data.kind, cfg["noise.kinds"])
                )
            if weights is not None:
                row["auc"] = kind_aucs(weights, data.kind, cfg["noise.kinds"])
                if seed == seeds[0]:
                    seed_weights[arm] = weights
            per[arm].append(row)
            bar.done(i)
    table = summarise(per, arms)
    notes = interpret(table, per, loss_auc=loss_auc, kinds=cfg["noise.kinds"], steps=steps)
    figure = _figure(
        ctx.out / "lm_reweight.png",
        histories,
        seed_weights,
        data.kind if seed_weights else None,
        cfg["noise.kinds"],
        seeds[0],
    )
    columns = [
        "arm",
        "hyperparameters",
        "seeds",
        "test_ppl",
        "test_ppl_sd",
        "d_test_loss",
        "auc",
        "auc_moved",
        "hyper_over_train",
        "peak_mb",
        "wall_s",
        "cpu_s",
    ]
    result = {
        "dataset": data.source,
        "n_train": len(data.train),
        "corrupted": int((data.kind != 0).sum()),
        "steps": steps,
        "rows": table,
        "runs": per,
        "loss_auc": loss_auc,
        "notes": notes,
    }
    from ..report import markdown_table

    body = [
        f"Data: {data.source}; {len(data.train):,} training sequences of {cfg['data.seq_len']} bytes, "
        f"{int((data.kind != 0).sum()):,} corrupted ({', '.join(cfg['noise.kinds'])} in equal shares); "
        f"{len(data.val):,} clean validation and {len(data.test):,} clean test sequences. A "
        f"{cfg['model.layers']}-block transformer, width {cfg['model.width']}, {cfg['model.heads']} heads; "
        f"every arm takes {steps} Adam steps (lr {cfg['train.lr']:g}, batch {cfg['train.batch_size']}); the "
        f"tuned arms a hyper step every {cfg['train.inner_steps']} (Adam lr {cfg['hyper.lr']:g}, "
        f"{cfg['hyper.iters']} Neumann terms, CG iterations or first-order steps, {cfg['hyper.hvp_mode']} "
        "products, "
        f"L_T on {cfg['hyper.batch_size']} training sequences, L_V on {cfg['hyper.val_batch_size'] or 'all'} "
        f"validation sequences). Seeds {', '.join(map(str, seeds))}.",
        "",
        markdown_table(columns, table),
        "",
        "test_ppl: clean test perplexity per byte, mean (sd) over the seeds; d_test_loss: the arm's test "
        "loss minus plain training's, mean ± standard error over the seeds (paired: same seed, same "
        "corruption); "
        "auc: P(weight of a clean sequence > weight of a corrupted one), mean over the seeds; auc_moved: the "
        "same among the sequences whose weight a hyper step moved; "
        "hyper_over_train: wall time of a hyper step over a training step of the same arm; peak_mb: peak "
        "memory of the arm above its start; wall_s, cpu_s: wall and CPU seconds, all seeds.",
        "",
        *what_it_shows(notes),
        "## Figures",
        "",
        f"![test perplexity and weights]({figure.name})",
        "",
    ]
    title = f"lm-reweight: data weights for a byte-level transformer, {len(seeds)} seed(s)"
    return finish(
        ctx,
        t0,
        title=title,
        columns=columns,
        rows=table,
        notes=notes,
        result=result,
        result_name="lm_reweight.json",
        body=body,
        figures=[figure],
        also=[ctx.out / "metrics.jsonl"],
    )


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarise(per: Mapping[str, Sequence[Mapping[str, Any]]], arms: Sequence[str]) -> list[dict[str, Any]]:
    """One row per arm: means over the seeds, and the test loss paired with plain training's (same seed)."""
    plain = {r["seed"]: r["test_loss"] for r in per.get("plain", [])}
    rows = []
    for a in arms:
        rs = list(per[a])
        ppl = [r["test_ppl"] for r in rs]
        diffs = [r["test_loss"] - plain[r["seed"]] for r in rs if r["seed"] in plain]
        aucs = [r["auc"]["all"] for r in rs if "auc" in r]
        rows.append(
            {
                "arm": ARM_NAMES[a],
                "key": a,
                "hyperparameters": rs[0]["hyperparameters"],
                "seeds": len(rs),
                "test_ppl": _mean(ppl),
                "test_ppl_sd": _sd(ppl) if len(ppl) > 1 else "-",
                "test_loss": _mean([r["test_loss"] for r in rs]),
                "d_test_loss": (
                    f"{_mean(diffs):+.4f} ± {_sd(diffs) / math.sqrt(len(diffs)):.4f}"
                    if a != "plain" and len(diffs) > 1
                    else "-"
                ),
                "d_mean": _mean(diffs) if a != "plain" else float("nan"),
                "d_se": _sd(diffs) / math.sqrt(len(diffs))
                if a != "plain" and len(diffs) > 1
                else float("nan"),
                "auc": _mean(aucs) if aucs else "-",
                "auc_moved": _mean([r["auc_moved"] for r in rs]) if "auc_moved" in rs[0] else "-",
                "hyper_over_train": _mean([r["hyper_over_train"] for r in rs])
                if a not in ("plain", "clean-only")
                else "-",
                "peak_mb": _mean([r["peak_mb"] for r in rs]),
                "wall_s": sum(r["wall_s"] for r in rs),
                "cpu_s": sum(r["cpu_s"] for r in rs),
            }
        )
    return rows


def interpret(
    table: Sequence[Mapping[str, Any]],
    per: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    loss_auc: Sequence[Mapping[str, float]],
    kinds: Sequence[str],
    steps: int,
) -> list[str]:
    """Plain-language notes on the table, whichever way it came out: each tuned arm against plain
    training and the oracle (paired over the seeds, :func:`~.shared.versus`), what its weights find
    (AUC per kind against the free loss detector) and what its hyper step costs."""
    by = {r["key"]: r for r in table}
    notes: list[str] = []
    n = len(next(iter(per.values()))) if per else 0
    se_what = f"standard error of the mean paired difference over {n} seeds"
    oracle = by.get("clean-only")
    if "plain" in by and oracle is not None:
        v = versus(
            "Clean-only training (the oracle)",
            "plain training",
            oracle["test_loss"],
            by["plain"]["test_loss"],
            oracle["d_se"],
            metric="clean test loss",
            higher_is_better=False,
            se_what=se_what,
            no_se="one seed: no noise estimate",
        )
        notes.append(
            f"{v.text}: the corruption's cost to the clean perplexity "
            f"({by['plain']['test_ppl']:.3f} vs {oracle['test_ppl']:.3f}) is the most reweighting "
            f"could recover in {steps} steps."
        )
    for key in TUNED:
        r = by.get(key)
        if r is None:
            continue
        if "plain" in by:
            v = versus(
                r["arm"],
                "plain training",
                r["test_loss"],
                by["plain"]["test_loss"],
                r["d_se"],
                metric="clean test loss",
                higher_is_better=False,
                se_what=se_what,
                no_se="one seed: no noise estimate",
            )
            s = v.text
            if oracle is not None and "plain" in by:
                gap = by["plain"]["test_loss"] - oracle["test_loss"]
                if gap > 0:
                    got = (by["plain"]["test_loss"] - r["test_loss"]) / gap
                    s += f"; it recovers {got:.0%} of the gap between plain training and the oracle"
            notes.append(s + ".")
        runs = per.get(key, [])
        if runs and "auc" in runs[0]:
            parts = ", ".join(f"{k} {_mean([x['auc'][k] for x in runs]):.3f}" for k in kinds)
            s = f"{r['arm']}: AUC {_mean([x['auc']['all'] for x in runs]):.3f} overall ({parts})"
            if "moved" in runs[0]:
                s += (
                    f"; {_mean([x['moved'] for x in runs]):,.0f} of {runs[0]['hyperparameters']:,} weights "
                    "moved (the others were never in a hyper step's batch and stay at 1, tied)"
                )
                if "auc_moved" in runs[0]:
                    s += f", AUC {_mean([x['auc_moved'] for x in runs]):.3f} among those"
            notes.append(s + ".")
        if isinstance(r["hyper_over_train"], float) and math.isfinite(r["hyper_over_train"]):
            cpu = _mean([x["hyper_over_train_cpu"] for x in runs])
            notes.append(
                f"{r['arm']}: a hyper step costs {r['hyper_over_train']:.1f} training steps of wall "
                f"time ({cpu:.1f} of CPU time)."
            )
    notes += ift_versus_cheaper(per)
    if loss_auc:
        parts = ", ".join(f"{k} {_mean([x[k] for x in loss_auc]):.3f}" for k in kinds)
        notes.append(
            f"For reference, ranking the sequences by plain training's final loss (no hyper step at "
            f"all) has AUC {_mean([x['all'] for x in loss_auc]):.3f} ({parts})."
        )
    return notes


def paired(
    per: Mapping[str, Sequence[Mapping[str, Any]]], a: str, b: str, key: str = "test_loss"
) -> tuple[float, float, float, float] | None:
    """Arm ``a``'s ``key`` against arm ``b``'s over the seeds both ran: their means, and the mean and
    standard error of the paired difference ``a − b`` (NaN with one seed); ``None`` without a common
    seed or without the key."""
    xs = {r["seed"]: r[key] for r in per.get(a, []) if key in r}
    ys = {r["seed"]: r[key] for r in per.get(b, []) if key in r}
    common = sorted(set(xs) & set(ys))
    if not common:
        return None
    diffs = [xs[s] - ys[s] for s in common]
    se = _sd(diffs) / math.sqrt(len(diffs))
    return _mean([xs[s] for s in common]), _mean([ys[s] for s in common]), _mean(diffs), se


def ift_versus_cheaper(per: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """IFT-Neumann's per-sequence weights against the SAMA-style and first-order steps on the same
    weights, paired over the seeds: clean test loss and the AUC among the moved weights."""
    notes = []
    for cheap in ("sama", "first-order"):
        for key, metric, higher in (
            ("test_loss", "clean test loss", False),
            ("auc_moved", "AUC among the moved weights", True),
        ):
            got = paired(per, "neumann", cheap, key)
            if got is None:
                continue
            a, b, _, se = got
            n = len({r["seed"] for r in per["neumann"]} & {r["seed"] for r in per[cheap]})
            what = f"standard error of the mean paired difference over {n} seeds"
            v = versus(
                ARM_NAMES["neumann"],
                ARM_NAMES[cheap],
                a,
                b,
                se,
                metric=metric,
                higher_is_better=higher,
                se_what=what,
                no_se="one seed: no noise estimate",
            )
            notes.append(v.text + ".")
    return notes


def _figure(
    path: Path,
    histories: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    weights: Mapping[str, Tensor],
    kind: Tensor | None,
    kinds: Sequence[str],
    seed: int,
) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    curves: dict[str, dict[int, list[float]]] = {}
    for (arm, _), h in histories.items():
        for r in h:
            if "test_loss" in r:
                curves.setdefault(arm, {}).setdefault(int(r["inner_steps"]), []).append(r["test_loss"])
    for arm, pts in curves.items():
        xs = sorted(pts)
        ax.plot(xs, [_ppl(_mean(pts[x])) for x in xs], marker=".", label=ARM_NAMES[arm])
    ax.set_xlabel("training steps")
    ax.set_ylabel("clean test perplexity per byte (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if weights and kind is not None:
        arm = next(a for a in TUNED if a in weights)
        w, k = weights[arm], kind
        title = f"{ARM_NAMES[arm]}, seed {seed}"
        if arm in WEIGHTED:  # the weights no hyper step touched are tied at 1: they would hide the rest
            moved = (w - 1).abs() > 1e-6
            w, k = w[moved], kind[moved]
            title += f" ({int(moved.sum()):,} weights moved)"
        groups = [w[k == 0].numpy()] + [w[k == j].numpy() for j in range(1, len(kinds) + 1)]
        bx.boxplot(groups, showfliers=False)
        bx.set_xticks(range(1, len(groups) + 1), ["clean", *kinds], fontsize=8)
        bx.set_ylabel("learned weight ω")
        bx.set_title(title, fontsize=9)
    else:
        bx.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


run = with_threads(_run)

EXPERIMENT = Experiment(
    name="lm-reweight",
    summary="byte-level transformer LM on partly corrupted text: per-sequence weights and a loss-reweighting "
    "net by IFT (finite-difference HVPs) vs plain, clean-only and cheaper hyper steps",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
)

__all__ = [
    "ARMS",
    "BOILERPLATE",
    "EXPERIMENT",
    "FULL",
    "KINDS",
    "SCHEMA",
    "SMOKE",
    "LMData",
    "StepTimes",
    "TransformerLM",
    "check",
    "corrupt",
    "families",
    "ift_versus_cheaper",
    "interpret",
    "kind_aucs",
    "load",
    "method",
    "model",
    "paired",
    "peak_memory",
    "read_texts",
    "sequence_loss",
    "sequences",
    "summarise",
]
