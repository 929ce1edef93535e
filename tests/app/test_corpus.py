"""The text-corpus loader: PTB files from a folder (a tiny corpus written here), the King James Bible
through Debian's `bible` program when installed, and the error naming both options."""

from __future__ import annotations

import shutil

import pytest
import torch

from hypergradients.app.corpus import EOS, UNK, batchify, build_vocab, load_corpus, tokenize
from hypergradients.app.datasets import DataUnavailableError


def _write_ptb(tmp_path, train="a b c a\nb a <unk>\n", valid="a c\n", test="d a\n"):
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (tmp_path / f"ptb.{name}.txt").write_text(text)
    return tmp_path


def test_tokenize_splits_punctuation_and_ends_the_line():
    assert tokenize("And God said, Let there be light: the LORD's.") == [
        "and", "god", "said", ",", "let", "there", "be", "light", ":", "the", "lord's", ".", EOS]


def test_ptb_folder_gives_ids_over_the_training_vocabulary(tmp_path):
    c = load_corpus(_write_ptb(tmp_path), vocab_size=10, bible_program="/nonexistent/bible")
    assert c.name == "ptb"
    # frequency order on train: a (3), b (2), c (1); <unk> and <eos> first
    assert c.vocab == [UNK, EOS, "a", "b", "c"]
    assert c.train.tolist() == [2, 3, 4, 2, 1, 3, 2, 0, 1]
    assert c.valid.tolist() == [2, 4, 1]
    assert c.test.tolist() == [0, 2, 1]   # "d" never seen in training: <unk>


def test_small_vocabulary_maps_rare_words_to_unk(tmp_path):
    c = load_corpus(_write_ptb(tmp_path), vocab_size=3, bible_program="/nonexistent/bible")
    assert c.vocab == [UNK, EOS, "a"]
    assert c.train.tolist() == [2, 0, 0, 2, 1, 0, 2, 0, 1]


def test_partial_ptb_folder_is_refused_naming_the_missing_file(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a b\n")
    with pytest.raises(DataUnavailableError, match=r"ptb\.valid\.txt, ptb\.test\.txt"):
        load_corpus(tmp_path)


def test_nothing_found_names_both_options(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"(?s)PTB files.*apt-get install bible-kjv"):
        load_corpus(tmp_path, bible_program="/nonexistent/bible")


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


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_kjv_through_the_bible_program():
    c = load_corpus(None, vocab_size=2000)
    assert c.name == "kjv" and c.vocab_size == 2000
    # 31 102 verses, about 820 000 words plus punctuation and one <eos> a verse; 90/5/5 by position
    total = len(c.train) + len(c.valid) + len(c.test)
    assert 900_000 < total < 1_200_000
    assert abs(len(c.train) / total - 0.9) < 0.02
    assert c.vocab[2:5] == [",", "the", "and"]   # the most frequent tokens of the KJV
    assert int((c.train == 1).sum()) == int(0.9 * 31102)   # one <eos> per training verse
