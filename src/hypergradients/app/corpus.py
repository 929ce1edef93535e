"""Word-level text corpora for language models, offline (torch only).

:func:`load_corpus` returns a :class:`Corpus`: train / validation / test streams of token ids
over one vocabulary built on the training text. Looked for, in order:

``ptb``    The Penn Treebank language-model files (Mikolov's preprocessing: ``ptb.train.txt``,
           ``ptb.valid.txt``, ``ptb.test.txt``, 10 000 words, ``<unk>`` already in the text)
           in ``root``. The official splits.
``kjv``    The King James Bible of Debian's ``bible-kjv`` package (``apt-get install
           bible-kjv``). Its ``/usr/lib/bible.data`` is a compressed binary format, not text,
           so the text is read through the package's own program, ``bible -f
           Gen1:1-Rev22:21``, which prints the 31 102 verses one a line (4.4 MB, about 820 000
           words). Lower-cased, punctuation split off as tokens, one ``<eos>`` per verse (as
           PTB has one per sentence). Split by position, no shuffling (a language model's test
           text must not be interleaved with its training text): the first 90% of the verses
           train, the next 5% validate, the last 5% test.

Neither found: :class:`~hypergradients.app.datasets.DataUnavailableError` naming both options.

Words outside the ``vocab_size − 1`` most frequent training words (ties broken by first
occurrence) become ``<unk>``; ``<eos>`` ends each line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .datasets import DataFormatError, DataUnavailableError

__all__ = ["PTB_FILES", "Corpus", "batchify", "build_vocab", "kjv_lines", "load_corpus", "tokenize"]

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
EOS, UNK = "<eos>", "<unk>"
BIBLE_PROGRAM = "bible"
BIBLE_RANGE = "Gen1:1-Rev22:21"
_TOKEN = re.compile(r"<unk>|[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_VERSE_REF = re.compile(r"^\S+\d+:\d+\s+")


@dataclass
class Corpus:
    """Token-id streams (``int64``, 1-D) and their vocabulary (``vocab[i]`` is the word of id ``i``)."""

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: list[str]
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def tokenize(line: str) -> list[str]:
    """Lower-cased words (inner apostrophe kept: ``lord's``), single punctuation marks, then ``<eos>``."""
    return [*_TOKEN.findall(line.lower()), EOS]


def build_vocab(lines: list[list[str]], vocab_size: int) -> list[str]:
    """``<unk>``, ``<eos>``, then the ``vocab_size − 2`` most frequent other tokens of ``lines``
    (``Counter.most_common``: ties in order of first occurrence)."""
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (<unk>, <eos> and one word), got {vocab_size}")
    counts = Counter(t for line in lines for t in line if t not in (EOS, UNK))
    return [UNK, EOS, *[w for w, _ in counts.most_common(vocab_size - 2)]]


def _ids(lines: list[list[str]], index: dict[str, int]) -> Tensor:
    unk = index[UNK]
    return torch.tensor([index.get(t, unk) for line in lines for t in line], dtype=torch.int64)


def kjv_lines(program: str | None = None) -> list[str]:
    """The verses of the King James Bible, one a line, through the ``bible`` program (reference removed).

    Raises :class:`DataUnavailableError` when the program is missing, :class:`DataFormatError`
    when it prints something else than the expected verses.
    """
    exe = shutil.which(program or BIBLE_PROGRAM)
    if exe is None:
        raise DataUnavailableError("the `bible` program of Debian's bible-kjv package is not installed")
    # A fixed installed program with fixed arguments; nothing of the user's runs here.
    done = subprocess.run([exe, "-f", BIBLE_RANGE], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120, check=False)
    lines = [_VERSE_REF.sub("", ln) for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or len(lines) < 1000:
        raise DataFormatError(f"`{exe} -f {BIBLE_RANGE}` exited with {done.returncode} and printed "
                              f"{len(lines)} lines (expected 31 102 verses): {done.stderr.strip()[:200]}")
    return lines


def load_corpus(root: str | Path | None = None, *, vocab_size: int = 10_000,
                bible_program: str | None = None) -> Corpus:
    """The PTB files in ``root`` if all three are there, else the King James Bible (see the module).

    Args:
        root: folder with ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` (or ``None``).
        vocab_size: size of the vocabulary including ``<unk>`` and ``<eos>`` (PTB's own files
            have 10 000 words; a smaller value maps the rarer ones to ``<unk>``).
        bible_program: the ``bible`` executable (default: found on ``PATH``).
    """
    if root:
        folder = Path(root)
        have = [f for f in PTB_FILES if (folder / f).is_file()]
        if len(have) == len(PTB_FILES):
            splits = [[tokenize(ln) for ln in (folder / f).read_text(encoding="utf-8").splitlines()
                       if ln.strip()] for f in PTB_FILES]
            if not splits[0] or not splits[1] or not splits[2]:
                raise DataFormatError(f"a PTB file in {str(folder)!r} is empty")
            return _corpus("ptb", splits, vocab_size, f"Penn Treebank ({folder})")
        if have:
            missing = [f for f in PTB_FILES if f not in have]
            raise DataUnavailableError(f"{str(folder)!r} has {', '.join(have)} but not {', '.join(missing)}: "
                                       "put all three PTB files there")
    try:
        verses = kjv_lines(bible_program)
    except DataUnavailableError:
        where = f"in {str(root)!r}" if root else "(data.root is empty)"
        raise DataUnavailableError(
            f"no text corpus: no PTB files ({', '.join(PTB_FILES)}) {where}, and Debian's bible-kjv is "
            "not installed. Either put the PTB files in a folder and set data.root to it, or run "
            "`apt-get install bible-kjv` (the King James Bible, read through its `bible` program)") from None
    lines = [tokenize(v) for v in verses]
    a, b = int(0.9 * len(lines)), int(0.95 * len(lines))
    return _corpus("kjv", [lines[:a], lines[a:b], lines[b:]], vocab_size,
                   f"King James Bible (Debian bible-kjv, {len(lines):,} verses; 90/5/5 by position)")


def _corpus(name: str, splits: list[list[list[str]]], vocab_size: int, source: str) -> Corpus:
    vocab = build_vocab(splits[0], vocab_size)
    index = {w: i for i, w in enumerate(vocab)}
    train, valid, test = (_ids(s, index) for s in splits)
    return Corpus(name, train, valid, test, vocab, source)


def batchify(ids: Tensor, seq_len: int, *, max_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """Cut a token stream into ``(N, seq_len)`` inputs and the next-token targets (the input shifted
    by one): ``y[n, t] = ids[n·seq_len + t + 1]``. Only the first ``max_tokens`` (0: all) are used;
    the ragged end is dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_tokens:
        ids = ids[:max_tokens + 1]
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} tokens make no sequence of {seq_len} (+1 target): lower seq_len")
    x = ids[:n * seq_len].reshape(n, seq_len)
    y = ids[1:n * seq_len + 1].reshape(n, seq_len)
    return x, y
