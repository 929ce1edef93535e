"""The text-corpus loader: PTB files from a folder (a tiny corpus written here); the King James Bible
shipped with the package, its splits and tokens pinned (counts and hashes), read without Debian's
`bible` program, identical to that program's text where it is installed; the errors."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import shutil
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from hypergradients.app.corpus import (
    EOS,
    KJV_FILE,
    UNK,
    batchify,
    build_vocab,
    kjv_lines,
    load_corpus,
    tokenize,
)
from hypergradients.app.datasets import DataFormatError, DataUnavailableError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _write_ptb(tmp_path, train="a b c a\nb a <unk>\n", valid="a c\n", test="d a\n"):
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (tmp_path / f"ptb.{name}.txt").write_text(text)
    return tmp_path


def test_tokenize_splits_punctuation_and_ends_the_line():
    assert tokenize("And God said, Let there be light: the LORD's.") == [
        "and",
        "god",
        "said",
        ",",
        "let",
        "there",
        "be",
        "light",
        ":",
        "the",
        "lord's",
        ".",
        EOS,
    ]


def test_ptb_folder_gives_ids_over_the_training_vocabulary(tmp_path):
    c = load_corpus(_write_ptb(tmp_path), vocab_size=10, bible_program="/nonexistent/bible")
    assert c.name == "ptb"
    # frequency order on train: a (3), b (2), c (1); <unk> and <eos> first
    assert c.vocab == [UNK, EOS, "a", "b", "c"]
    assert c.train.tolist() == [2, 3, 4, 2, 1, 3, 2, 0, 1]
    assert c.valid.tolist() == [2, 4, 1]
    assert c.test.tolist() == [0, 2, 1]  # "d" never seen in training: <unk>


def test_small_vocabulary_maps_rare_words_to_unk(tmp_path):
    c = load_corpus(_write_ptb(tmp_path), vocab_size=3, bible_program="/nonexistent/bible")
    assert c.vocab == [UNK, EOS, "a"]
    assert c.train.tolist() == [2, 0, 0, 2, 1, 0, 2, 0, 1]


def test_partial_ptb_folder_is_refused_naming_the_missing_file(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a b\n")
    with pytest.raises(DataUnavailableError, match=r"ptb\.valid\.txt, ptb\.test\.txt"):
        load_corpus(tmp_path)


def test_folder_without_ptb_files_is_refused_not_replaced_by_the_default(tmp_path):
    # a folder the user named holds no PTB: an error naming the files and the default, never the Bible
    with pytest.raises(
        DataUnavailableError, match=r"(?s)none of the PTB files.*ptb\.train\.txt.*data\.root=''"
    ):
        load_corpus(tmp_path)


def test_batchify_targets_are_the_next_tokens():
    ids = torch.arange(11)
    x, y = batchify(ids, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, y = batchify(ids, 3, max_tokens=6)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]] and y[-1].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="lower seq_len"):
        batchify(ids, 20)


def test_build_vocab_refuses_a_vocabulary_without_words():
    with pytest.raises(ValueError, match="vocab_size must be >= 3"):
        build_vocab([["a", EOS]], 2)


# The shipped text (kjv.txt.gz): 31 102 verses, ASCII; its SHA-256 is stated in corpora/README.md.
KJV_TEXT_SHA256 = "b5c4940bcfeee072c0935b5200d0f9d88a00a0199cb0961d16133458fcdfae5d"
# What load_corpus() gives (90/5/5 by position): verses and tokens per split (<eos> included), and
# the SHA-256 of each split's token ids (int64, little-endian) at a vocabulary of 2000.
KJV_VERSES = (27_991, 1_555, 1_556)
KJV_TOKENS = (859_618, 40_502, 44_690)
KJV_IDS_2000 = ("d16f57667839c831", "ae24051263986d07", "773663976ae706dc")


def _sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()[:16]


def test_shipped_kjv_is_the_declared_text():
    raw = resources.files("hypergradients.app").joinpath(KJV_FILE).read_bytes()
    text = gzip.decompress(raw).decode("ascii")
    assert hashlib.sha256(text.encode("ascii")).hexdigest() == KJV_TEXT_SHA256
    assert KJV_TEXT_SHA256 in (ROOT / "src/hypergradients/app/corpora/README.md").read_text()
    lines = kjv_lines()
    assert len(lines) == sum(KJV_VERSES) and len(text.split()) == 789_634
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert lines[-1] == "The grace of our Lord Jesus Christ be with you all. Amen."


def test_default_corpus_is_the_shipped_kjv_without_the_bible_program(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `bible` (nor anything else) on PATH
    assert shutil.which("bible") is None
    c = load_corpus(None, vocab_size=2000)
    assert c.name == "kjv" and c.vocab_size == 2000 and "shipped with hypergradients" in c.source
    splits = (c.train, c.valid, c.test)
    assert tuple(len(s) for s in splits) == KJV_TOKENS
    assert tuple(int((s == 1).sum()) for s in splits) == KJV_VERSES  # one <eos> per verse
    assert tuple(_sha(s) for s in splits) == KJV_IDS_2000
    assert c.vocab[:6] == [UNK, EOS, ",", "the", "and", "of"]  # the most frequent tokens of the KJV
    assert c.train.dtype == torch.int64 and int(c.train.max()) == 1999
    # "" (the command line's empty data.root) is the default too
    assert torch.equal(load_corpus("", vocab_size=2000).test, c.test)


def test_shipped_kjv_missing_or_corrupt_says_reinstall(monkeypatch):
    monkeypatch.setattr("hypergradients.app.corpus.KJV_FILE", "corpora/no-such-file.txt.gz")
    with pytest.raises(DataUnavailableError, match=r"(?s)missing from this installation.*force-reinstall"):
        load_corpus()
    monkeypatch.setattr("hypergradients.app.corpus.KJV_FILE", "corpora/README.md")  # not gzip
    with pytest.raises(DataFormatError, match=r"(?s)corrupt.*force-reinstall"):
        load_corpus()


def test_a_missing_bible_program_names_its_package():
    with pytest.raises(DataUnavailableError, match=r"(?s)'/nonexistent/bible'.*apt-get install bible-kjv"):
        load_corpus(None, bible_program="/nonexistent/bible")


def test_package_data_declares_the_shipped_files():
    # `pip install .` (not only an editable install) must carry the text and its notice
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = cfg["tool"]["setuptools"]["package-data"]["hypergradients.app"]
    for name in (KJV_FILE, "corpora/README.md"):
        assert (ROOT / "src/hypergradients/app" / name).is_file(), name
        assert any(fnmatch.fnmatch(name, g) for g in globs), (name, globs)


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_debian_bible_program_gives_the_same_tokens():
    assert kjv_lines("bible") == kjv_lines()
    c = load_corpus(None, vocab_size=2000, bible_program="bible")
    assert c.name == "kjv" and "Debian bible-kjv" in c.source
    assert tuple(_sha(s) for s in (c.train, c.valid, c.test)) == KJV_IDS_2000
