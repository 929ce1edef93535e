"""The words of the reports' notes follow the numbers and their standard error: an arm "beats" or "is
worse than" another only beyond two standard errors (and by more than a negligible fraction), is
"within noise" inside them, and no difference is called either without a standard error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hypergradients.app.config import resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments.augment_mnist import interpret as augment_notes
from hypergradients.app.experiments.families import _notes as families_notes
from hypergradients.app.experiments.lstm_dropout import interpret as lstm_notes
from hypergradients.app.experiments.shared import NEGLIGIBLE, paired_se, versus
from hypergradients.app.experiments.weight_decay import interpret as weight_decay_notes
from hypergradients.app.report import fmt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

KW = {
    "metric": "test loss",
    "higher_is_better": False,
    "se_what": "paired",
    "no_se": "one seed: no noise estimate",
}


def test_versus_says_beats_or_worse_only_beyond_two_standard_errors() -> None:
    assert (
        versus("A", "B", 0.20, 0.25, 0.01, **KW).text
        == "A beats B on test loss: 0.2 vs 0.25 (difference -0.05 ± 0.01, paired)"
    )
    assert versus("A", "B", 0.30, 0.25, 0.01, **KW).kind == "worse"
    assert versus("A", "B", 0.30, 0.25, 0.01, **KW).text.startswith("A is worse than B on test loss")
    # higher is better (an accuracy): the same difference turns round
    assert versus("A", "B", 0.30, 0.25, 0.01, **{**KW, "higher_is_better": True}).kind == "beats"
    # exactly two standard errors (in binary fractions, so exactly) is still noise
    within = versus("A", "B", 0.75, 0.25, 0.25, **KW)
    assert within.kind == "within noise"
    assert within.text == "A is within noise of B on test loss: 0.75 vs 0.25 (difference +0.5 ± 0.25, paired)"


def test_versus_never_judges_without_a_standard_error() -> None:
    for se in (None, float("nan")):
        v = versus("A", "B", 0.121, 0.199, se, **KW)
        assert v.kind == "unmeasured"
        assert (
            v.text == "A vs B on test loss: 0.121 vs 0.199 (difference -0.078; one seed: no noise estimate)"
        )
        assert not any(w in v.text for w in ("beats", "worse", "within noise"))


def test_versus_calls_a_tiny_difference_beyond_the_noise_immaterial() -> None:
    # The smoke run's numbers: per-weight and global decay barely moved from the same start, so the
    # paired standard error is tiny and 3e-6 nats exceed it 3.7 times.
    v = versus("A", "B", 2.1836664, 2.1836700, 9.1e-7, **KW)
    assert v.kind == "negligible" and "beats" not in v.text
    assert "does not differ materially from B" in v.text and "under 0.1% of the values" in v.text
    assert versus("A", "B", 2.0 * (1 + 2 * NEGLIGIBLE), 2.0, 1e-9, **KW).kind == "worse"


def test_versus_calls_the_same_numbers_on_every_pair_a_tie() -> None:
    same = torch.tensor([1.0, 0.0, 1.0])
    v = versus("A", "B", 0.667, 0.667, paired_se(same, same), **KW)
    assert v.kind == "within noise" and v.text.startswith("A ties with B") and "± 0," not in v.text


def _wd_row(test: float) -> dict[str, float]:
    return {
        "test_loss": test,
        "val_loss": test,
        "test_acc": 0.35,
        "train_loss": 2.1,
        "hyperparameters": 1,
        "skipped": 0,
    }


def test_weight_decay_notes_do_not_say_beats_for_three_millionths() -> None:
    notes = weight_decay_notes(
        {"global": _wd_row(2.1836700), "weight": _wd_row(2.1836664)}, n_val=50, se=9.1e-7
    )
    assert "beats" not in notes[0] and notes[0].startswith(
        "Per-weight decay does not differ materially from the tuned global decay on test loss"
    )


def _fam_row(acc: float) -> dict[str, float]:
    return {"test_acc": acc}


def test_families_notes_call_a_measured_drop_worse_and_never_unmeasured_noise() -> None:
    results = {"tuned": _fam_row(0.121), "baseline": _fam_row(0.199), "real-k": _fam_row(0.110)}
    notes = families_notes("distill", results, 0, se={"baseline": 0.013, "real-k": 0.012}, n_test=1000)
    assert notes[0] == (
        "The model with the tuned distilled data is worse than the one without it on test "
        "accuracy: 0.121 vs 0.199 (difference -0.078 ± 0.013, paired standard error over the "
        "1,000 test examples, one training seed)."
    )
    assert "is within noise of training on the real examples" in notes[1]  # +0.011 <= 2 · 0.012
    bare = " ".join(families_notes("distill", results, 0))
    assert "noise estimate" in bare and "within noise" not in bare and "is noise" not in bare


def _lstm_unit(arm: str, seed: int, test: float, *, keep: float = 0.7) -> dict[str, object]:
    ev = {"step": 100, "val_loss": test, "test_loss": test, "time_s": 1.0, "cpu_s": 1.0}
    return {
        "kind": arm,
        "arm": arm,
        "seed": seed,
        "best": ev,
        "last": ev,
        "evals": [ev],
        "keep": [{"step": 100, "dropouto": {"mean": keep, "q": [keep] * 5}}]
        if arm.startswith("ours")
        else [],
        "windows": [],
        "counts": {"steps": 10, "applied": 10, "changed": 10},
        "hyper_cpu_s": 1.0,
        "cpu_s": 2.0,
    }


def test_lstm_notes_judge_the_test_perplexity_by_the_paired_standard_error_over_seeds() -> None:
    from hypergradients.app.config import resolve
    from hypergradients.app.experiments.lstm_dropout import SCHEMA, report_verdicts

    cfg = resolve(SCHEMA)
    # seeds differ by 10 perplexity points; the tuned arm is 1.0, 1.2 and 0.8 points worse: the paired
    # standard error over seeds (0.2/√3) shows it, where the seeds' spread (10) would not
    by = {
        "ours": [
            _lstm_unit("ours", s, math.log(100 + 10 * s + d), keep=0.8) for s, d in enumerate((1.0, 1.2, 0.8))
        ],
        "fixed": [_lstm_unit("fixed", s, math.log(100 + 10 * s)) for s in range(3)],
    }
    verdicts = report_verdicts(by)
    text = " ".join(lstm_notes(cfg, by, verdicts))
    assert (
        "Ours: IFT on the scalar rates is worse than fixed dropout on test perplexity at the best "
        "validation evaluation: 111.00 vs 110.00 (difference +1 ± 0.12, paired standard error over 3 "
        "seeds)" in text
    )
    assert "short-horizon bias" in text  # the keep probabilities rose (0.7 → 0.8) and it lost: why
    one = {k: v[:1] for k, v in by.items()}
    text = " ".join(lstm_notes(cfg, one, report_verdicts(one)))
    assert "one seed: no noise estimate" in text and " beats " not in text and " worse " not in text


def _aug_row(arm: str, accs: list[float]) -> dict[str, object]:
    mean = sum(accs) / len(accs)
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    return {
        "arm": arm,
        "seeds": len(accs),
        "test_acc_mean": mean,
        "test_acc_std": sd,
        "runs": [{"seed": s, "test_acc": a, "inner_loss": 1.0 + s} for s, a in enumerate(accs)],
    }


def test_augment_notes_pair_the_seeds() -> None:
    # Seeds differ a lot from each other (sd 0.05), the learned augmentation gains 0.010-0.012 on each:
    # the paired standard error over seeds (0.0006) shows it; the seeds' spread would not.
    rows = {
        "augnet": _aug_row("learned", [0.910, 0.812, 0.861]),
        "none": _aug_row("no augmentation", [0.900, 0.800, 0.850]),
    }
    text = " ".join(augment_notes(rows))
    assert (
        "The learned augmentation beats no augmentation on test accuracy: 0.8610 vs 0.8500 (difference "
        "+0.011 ± 0.00058, standard error of the mean paired difference over 3 seeds)" in text
    )
    one = " ".join(augment_notes({"augnet": _aug_row("learned", [0.91]), "none": _aug_row("none", [0.90])}))
    assert "one seed: no noise estimate" in one and "beats" not in one


def test_a_missing_table_value_is_n_a() -> None:
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a" and fmt(True) == "True"


# The smoke configuration of every experiment whose notes compare arms: each sentence that calls a
# side better, worse or noise carries its standard error, and none calls unmeasured differences noise.
@pytest.mark.parametrize(
    "name,sets",
    [
        ("weight-decay", ['arms=["none","global"]', "train.rounds=2"]),
        ("families", ["family=distill"]),
        ("lstm-dropout", []),
        ("augment", ["seeds=[0, 1]"]),
    ],
    ids=lambda v: str(v),
)
def test_smoke_reports_carry_the_standard_error_of_every_verdict(
    name: str, sets: list[str], tmp_path: Path
) -> None:
    exp = get(name)
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=sets)
    res = exp.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    verdicts = [
        n
        for n in res.notes
        if any(
            w in n
            for w in (" beats ", " is worse than ", " within noise", " ties with ", " differ materially")
        )
    ]
    assert verdicts, res.notes
    for n in verdicts:
        assert "standard error" in n, n
    text = res.report.read_text()
    assert "is noise" not in text and "run-to-run spread" not in text and "seeds' spread" not in text
