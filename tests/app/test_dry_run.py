"""``hypergradients run --dry-run``: the paper's hyperparameter counts of the full configurations, printed
from the families the experiments build, with nothing trained or written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cifar_folder import write_cifar_folder

from hypergradients.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on the mat and the dog ran to the cat while a bird sang in the tree".split()


def _ptb(tmp: Path) -> Path:
    """PTB's three files, of random sentences long enough for the full configuration's 70-token sequences."""
    g = torch.Generator().manual_seed(0)
    root = tmp / "data"
    root.mkdir()
    for name in ("train", "valid", "test"):
        lines = [
            " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (10,), generator=g)) for _ in range(20)
        ]
        (root / f"ptb.{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def _cifar(tmp: Path) -> Path:
    """CIFAR-10's batch files (torchvision's layout) holding 20 random images each."""
    root = tmp / "data"
    write_cifar_folder(root, per_batch=20)
    return root


def _totals(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"total: ([\d,]+) hyperparameters", text)]


# The paper's counts (Lorraine, Vicol & Duvenaud 2020), each from its experiment's full configuration:
# (experiment, settings, the tuned arm's total).
COUNTS = [
    # LSTM: 650 per-unit rates at each of 3 dropout sites + 1 word-dropout rate + one 2,600 × 650 DropConnect tensor
    ("lstm-dropout", ["config=full", "arms=['ours_many']"], 1_691_951),
    # dataset distillation: one 28 × 28 image per MNIST class (the bundled subset has the same images' shape)
    ("distill", ["config=full", "data.dataset='mnist-5k'"], 7_840),
    # augment: the authors' U-Net (depth 2, wf 3, one noise channel) on CIFAR-10's 3 channels
    ("augment", ["config=full", "arms=['augnet+hand']"], 6_659),
]


@pytest.mark.parametrize("name,sets,total", COUNTS, ids=[c[0] for c in COUNTS])
def test_full_configurations_have_the_papers_counts(
    name: str,
    sets: list[str],
    total: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = (
        [f"data.root='{_ptb(tmp_path)}'"]
        if name == "lstm-dropout"
        else [f"data.root='{_cifar(tmp_path)}'"]
        if name == "augment"
        else []
    )
    args = ["run", name, "--dry-run"] + [a for s in [*sets, *extra] for a in ("--set", s)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert total in _totals(out), out
    assert sorted(p.name for p in tmp_path.iterdir()) == (["data"] if extra else [])  # nothing written


def test_lstm_dry_run_describes_every_arm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = _ptb(tmp_path)
    assert (
        main(
            [
                "run",
                "lstm-dropout",
                "--dry-run",
                "--set",
                "config=full",
                "--set",
                f"data.root='{root}'",
                "--set",
                "dropout.dropconnect='each'",
                "--set",
                "dropout.embedding=false",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # none, fixed (0 tuned), ours (5 → 4 scalars without dropoute, one DropConnect rate per layer: 5),
    # ours_many with DropConnect on both layers and no word dropout: 3 × 650 + 2 × 2,600 × 650
    assert _totals(out) == [0, 5, 3 * 650 + 2 * 2600 * 650]
    assert "ours_many" in out and "rnn0.weight_hh_l0: 1,690,000, rnn1.weight_hh_l0: 1,690,000" in out


def test_dry_run_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "weight-decay", "--dry-run"]) == 2
    assert "has no dry run" in capsys.readouterr().err
    assert main(["run", "lstm-dropout", "--dry-run", "--set", "hyper.method='newton'"]) == 2
    assert "hyper.method" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
