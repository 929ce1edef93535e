"""Word-level text corpora for language models, offline (torch only).

:func:`load_corpus` returns a :class:`Corpus`: train / validation / test streams of token ids
over one vocabulary built on the training text. Sources:

``ptb``    The Penn Treebank language-model files (Mikolov's preprocessing: ``ptb.train.txt``,
           ``ptb.valid.txt``, ``ptb.test.txt``, 10 000 words, ``<unk>`` already in the text)
           in ``root``. The official splits. Used whenever ``root`` is given.
``kjv``    The King James Bible, shipped with this package (``corpora/kjv.txt.gz``, 1.2 MB;
           public domain, its source in ``corpora/README.md``): the 31 102 verses, one a line
           (4.1 MB of ASCII text, 789 634 words), in the order Genesis 1:1 to Revelation 22:21.
           The default (``root`` empty): nothing to install, nothing downloaded. The same lines
           can be read from Debian's ``bible-kjv`` package (``bible_program="bible"``), whose
           ``/usr/lib/bible.data`` is a compressed binary format read through its program
           ``bible -f Gen1:1-Rev22:21``; the shipped file is that program's output with the
           verse references removed, so both give the same tokens.

The King James Bible is lower-cased, punctuation split off as tokens, one ``<eos>`` per verse
(as PTB has one per sentence), and split by position, no shuffling (a language model's test text
must not be interleaved with its training text): the first 90% of the verses train (27 991
verses, Genesis 1:1 to Romans 2:28), the next 5% validate (1 555, Romans 2:29 to Colossians 4:3),
the last 5% test (1 556, Colossians 4:4 to Revelation 22:21): 859 618 / 40 502 / 44 690 tokens
(``<eos>`` included; 11 966 distinct training tokens).

Words outside the ``vocab_size − 2`` most frequent training words (ties broken by first
occurrence) become ``<unk>``; ``<eos>`` ends each line.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .datasets import DataFormatError, DataUnavailableError

__all__ = [
    "KJV_FILE",
    "KJV_VERSES",
    "PTB_FILES",
    "Corpus",
    "batchify",
    "build_vocab",
    "kjv_lines",
    "load_corpus",
    "tokenize",
]

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
EOS, UNK = "<eos>", "<unk>"
BIBLE_RANGE = "Gen1:1-Rev22:21"
#: The King James Bible shipped with the package, relative to ``hypergradients.app`` (package data).
KJV_FILE = "corpora/kjv.txt.gz"
#: Its verses, one a line (Genesis 1:1 to Revelation 22:21).
KJV_VERSES = 31_102
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
    """The verses of the King James Bible, one a line, without their references.

    Args:
        program: ``None`` (default) reads the text shipped with the package (:data:`KJV_FILE`);
            a name or path of Debian's ``bible`` program (``"bible"``) reads it through that
            program instead. Both give the same lines.

    Raises :class:`DataUnavailableError` when the shipped file or the program is missing,
    :class:`DataFormatError` when either gives something else than the expected verses.
    """
    if program is None:
        return _shipped_kjv()
    exe = shutil.which(program)
    if exe is None:
        raise DataUnavailableError(
            f"no program {program!r} found: the `bible` program comes with Debian's "
            "bible-kjv package (apt-get install bible-kjv); without bible_program, "
            "the King James Bible shipped with hypergradients is read"
        )
    # A fixed installed program with fixed arguments; nothing of the user's runs here.
    done = subprocess.run(
        [exe, "-f", BIBLE_RANGE],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [_VERSE_REF.sub("", ln) for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or len(lines) < 1000:
        raise DataFormatError(
            f"`{exe} -f {BIBLE_RANGE}` exited with {done.returncode} and printed "
            f"{len(lines)} lines (expected {KJV_VERSES:,} verses): "
            f"{done.stderr.strip()[:200]}"
        )
    return lines


def _shipped_kjv() -> list[str]:
    where = resources.files("hypergradients.app").joinpath(KJV_FILE)
    try:
        raw = where.read_bytes()
    except OSError:
        raise DataUnavailableError(
            f"the King James Bible shipped with hypergradients ({where}) is missing from this installation: "
            "reinstall the package (pip install --force-reinstall hypergradients), or give PTB files in a "
            "folder (data.root on the command line)"
        ) from None
    try:
        text = gzip.decompress(raw).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataFormatError(
            f"{where}: corrupt ({type(e).__name__}: {e}); reinstall the package "
            "(pip install --force-reinstall hypergradients)"
        ) from e
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != KJV_VERSES:
        raise DataFormatError(
            f"{where}: {len(lines):,} verses, expected {KJV_VERSES:,}; reinstall the "
            "package (pip install --force-reinstall hypergradients)"
        )
    return lines


def load_corpus(
    root: str | Path | None = None, *, vocab_size: int = 10_000, bible_program: str | None = None
) -> Corpus:
    """The PTB files in ``root`` when ``root`` is given, else the King James Bible (see the module).

    Args:
        root: folder with ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``; ``None`` or
            ``""``: the King James Bible.
        vocab_size: size of the vocabulary including ``<unk>`` and ``<eos>`` (PTB's own files
            have 10 000 words; a smaller value maps the rarer ones to ``<unk>``).
        bible_program: ``None`` (default): the King James Bible shipped with the package;
            ``"bible"`` (or a path to it): the same text read through Debian's ``bible-kjv``.

    Raises:
        DataUnavailableError: ``root`` lacks some or all of the PTB files (the message names
            them), or the King James Bible's source is missing.
        DataFormatError: a file or the program's output is not what it should be.
    """
    if root:
        folder = Path(root)
        have = [f for f in PTB_FILES if (folder / f).is_file()]
        if len(have) == len(PTB_FILES):
            splits = [
                [tokenize(ln) for ln in (folder / f).read_text(encoding="utf-8").splitlines() if ln.strip()]
                for f in PTB_FILES
            ]
            if not splits[0] or not splits[1] or not splits[2]:
                raise DataFormatError(f"a PTB file in {str(folder)!r} is empty")
            return _corpus("ptb", splits, vocab_size, f"Penn Treebank ({folder})")
        missing = [f for f in PTB_FILES if f not in have]
        # A folder the user named is never silently replaced by the default text.
        raise DataUnavailableError(
            f"{str(folder)!r} has {', '.join(have) if have else 'none of the PTB files'} but not "
            f"{', '.join(missing)}: put all three PTB files there, or give no folder (data.root='' on "
            "the command line) for the King James Bible shipped with hypergradients"
        )
    verses = kjv_lines(bible_program)
    lines = [tokenize(v) for v in verses]
    a, b = int(0.9 * len(lines)), int(0.95 * len(lines))
    where = "shipped with hypergradients" if bible_program is None else "Debian bible-kjv"
    return _corpus(
        "kjv",
        [lines[:a], lines[a:b], lines[b:]],
        vocab_size,
        f"King James Bible ({where}, {len(lines):,} verses; 90/5/5 by position)",
    )


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
        ids = ids[: max_tokens + 1]
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} tokens make no sequence of {seq_len} (+1 target): lower seq_len")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y
