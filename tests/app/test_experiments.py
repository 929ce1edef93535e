"""The experiments registry: every experiment's --smoke configuration runs and writes its folder;
the weight-decay notes say what the numbers show either way; the configuration layer's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hypergradients.app.config import (
    ConfigError,
    Option,
    flatten,
    nest,
    parse_set,
    read_toml,
    resolve,
    write_toml,
)
from hypergradients.app.experiments import REGISTRY, RunContext, get
from hypergradients.app.experiments.shared import paired_se
from hypergradients.app.experiments.weight_decay import SCHEMA, interpret
from hypergradients.app.report import markdown_table, text_table

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


# The experiments that train (metrics.jsonl, checkpoints); explain, compare and bench are tested in
# test_registry.py, test_explain.py, test_compare.py and test_bench.py.
@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.resumable))
def test_smoke_runs(name: str, tmp_path: Path) -> None:
    exp = get(name)
    cfg = resolve(exp.schema, smoke=exp.smoke)
    res = exp.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    assert res.report == tmp_path / "report.md" and res.report.read_text().startswith("# ")
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert list(tmp_path.glob("*.png"))
    assert res.rows and all(set(res.columns) <= set(r) for r in res.rows)
    for r in res.rows:
        for c in res.columns:
            if isinstance(r[c], float) and c != "decay":
                assert math.isfinite(r[c]), (c, r)
    assert (
        resolve(exp.schema, file=read_toml(tmp_path / "config.toml")) == cfg
    )  # the resolved config round-trips
    # every run ends the same way: its result file (the rows and the notes) beside report.md
    assert res.result_file is not None and res.result_file.parent == tmp_path and res.result_file in res.files
    assert json.loads(res.result_file.read_text())["notes"] == res.notes


def test_weight_decay_smoke_counts_and_arms(tmp_path: Path) -> None:
    exp = get("weight-decay")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=['arms=["none","layer","weight"]', "train.rounds=2"])
    res = exp.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    counts = {r["method"]: r["hyperparameters"] for r in res.rows}
    # smoke MLP 784 -> 16 -> 10: per-layer decay has one per weight matrix, per-weight one per entry.
    assert counts == {
        "no weight decay": 0,
        "per-layer decay (tuned)": 2,
        "per-weight decay (tuned)": 784 * 16 + 16 * 10,
    }
    assert "learned weight decay" in res.report.read_text()


def _row(test: float, val: float, n: int = 1, train: float = 0.1) -> dict:
    return {
        "test_loss": test,
        "val_loss": val,
        "test_acc": 0.9,
        "train_loss": train,
        "hyperparameters": n,
        "skipped": 0,
    }


def test_notes_say_when_per_weight_loses_and_show_the_validation_overfit() -> None:
    notes = interpret(
        {"none": _row(0.5, 0.5), "global": _row(0.25, 0.24), "weight": _row(0.27, 0.05, n=118016)},
        n_val=1000,
        se=0.005,
        se_global=0.01,
    )
    text = " ".join(notes)
    assert (
        "Per-weight decay is worse than the tuned global decay on test loss: 0.27 vs 0.25 (difference +0.02"
        in text
    )
    assert "test−validation loss gap is 0.22 against 0.01" in text and "118,016 hyperparameters" in text
    assert "the test loss shows none" in text
    assert "A tuned global decay beats no weight decay on test loss: 0.25 vs 0.5" in text


def test_notes_say_when_per_weight_wins_without_overfitting() -> None:
    notes = interpret(
        {"global": _row(0.25, 0.24), "weight": _row(0.22, 0.215, n=10)},
        n_val=1000,
        se=0.01,
        moved=(0.25, 0.125),
    )
    assert notes[0].startswith(
        "Per-weight decay beats the tuned global decay on test loss: 0.22 vs 0.25 "
        "(difference -0.03 ± 0.01, paired standard error"
    )
    assert "no sign here that the per-weight decays overfit" in notes[1]
    assert "25.0% rose and 12.5% fell" in notes[2]
    within = interpret({"global": _row(0.25, 0.24), "weight": _row(0.26, 0.255)}, n_val=1000, se=0.01)
    assert within[0].startswith(
        "Per-weight decay is within noise of the tuned global decay on test loss: "
        "0.26 vs 0.25 (difference +0.01 ± 0.01"
    )


def test_paired_standard_error() -> None:
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    # differences 0,1,2,3: sample std sqrt(5/3), over sqrt(4)
    assert paired_se(a, b) == pytest.approx(math.sqrt(5 / 3) / 2)


def test_resolve_order_and_parsing() -> None:
    schema = {
        "a.n": Option(1, "n", int, low=0),
        "a.x": Option(0.5, "x", float, auto=True, positive=True),
        "b": Option("p", "b", str, choices=("p", "q")),
        "l": Option([1], "l", list, item=int, unique=True),
    }
    cfg = resolve(
        schema, smoke={"a.n": 2}, file={"a.n": 3, "b": "q"}, sets=["a.n=4", "a.x=auto"], extra={"l": [2, 3]}
    )
    assert cfg == {"a.n": 4, "a.x": "auto", "b": "q", "l": [2, 3]}
    assert resolve(schema, sets=["a.x=2"])["a.x"] == 2.0 and isinstance(
        resolve(schema, sets=["a.x=2"])["a.x"], float
    )
    assert parse_set("b = q", schema) == ("b", "q")
    assert parse_set("l=[4, 5]", schema) == ("l", [4, 5])
    with pytest.raises(ConfigError, match=r"config key 'l': got \[1, 1\] \(repeated items\)"):
        resolve(schema, sets=["l=[1, 1]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'c' \(--smoke\)"):
        resolve(schema, smoke={"c": 1})
    assert flatten({"a": {"n": 1, "x": {"y": 2}}, "b": 3}) == {"a.n": 1, "a.x.y": 2, "b": 3}
    assert nest({"a.n": 1, "a.x.y": 2, "b": 3}) == {"a": {"n": 1, "x": {"y": 2}}, "b": 3}


def test_toml_round_trip_of_the_weight_decay_defaults(tmp_path: Path) -> None:
    cfg = resolve(SCHEMA)
    write_toml(cfg, tmp_path / "c.toml")
    assert read_toml(tmp_path / "c.toml") == cfg


def test_tables() -> None:
    rows = [{"m": "a", "n": 118016, "x": 0.123456, "y": float("nan")}]
    assert markdown_table(["m", "n", "x", "y"], rows).splitlines() == [
        "| m | n | x | y |",
        "|---|---|---|---|",
        "| a | 118,016 | 0.1235 | n/a |",
    ]
    assert text_table(["m", "x"], rows).splitlines()[2] == "a  0.1235"


@pytest.mark.parametrize("method", ["cg", "identity", "auto", "nystrom"])
def test_weight_decay_smoke_with_every_method(method: str, tmp_path: Path) -> None:
    # Every hyper.method choice builds a working method and tunes the decay (the decays move).
    exp = get("weight-decay")
    cfg = resolve(
        exp.schema,
        smoke=exp.smoke,
        sets=['arms=["global"]', "train.rounds=2", f"hyper.method={method!r}".replace("'", '"')],
    )
    res = exp.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    (row,) = res.rows
    assert math.isfinite(row["test_loss"])
    assert row["decay"] != pytest.approx(cfg["hyper.init"], rel=1e-9)


def test_list_items_repeat_unless_the_option_says_unique() -> None:
    sizes = Option([128, 128], "widths", list, item=int, low=1)
    assert sizes.check("model.hidden", [128, 128]) == [128, 128]
    arms = Option(["a"], "arms", list, choices=("a", "b"), unique=True)
    with pytest.raises(ConfigError, match=r"config key 'arms': got \['a', 'a'\] \(repeated items\)"):
        arms.check("arms", ["a", "a"])
    assert SCHEMA["arms"].unique and not SCHEMA["model.hidden"].unique
    assert resolve(SCHEMA, file={"model.hidden": [64, 64, 64]})["model.hidden"] == [64, 64, 64]


def test_notes_follow_the_numbers_for_global_vs_none() -> None:
    better = interpret({"none": _row(0.5, 0.5), "global": _row(0.25, 0.24)}, n_val=1000, se_global=0.01)
    assert (
        "A tuned global decay beats no weight decay on test loss: 0.25 vs 0.5 (difference -0.25 ± 0.01"
        in " ".join(better)
    )
    worse = " ".join(
        interpret({"none": _row(0.25, 0.25), "global": _row(0.5, 0.24)}, n_val=1000, se_global=0.01)
    )
    assert (
        "beats" not in worse
        and "A tuned global decay is worse than no weight decay on test loss: 0.5" in worse
    )
    noise = " ".join(
        interpret({"none": _row(0.26, 0.25), "global": _row(0.25, 0.24)}, n_val=1000, se_global=0.02)
    )
    assert (
        "beats" not in noise
        and "is within noise of no weight decay on test loss: 0.25 vs 0.26 (difference -0.01 ± 0.02" in noise
    )
    unknown = " ".join(interpret({"none": _row(0.26, 0.25), "global": _row(0.25, 0.24)}, n_val=1000))
    assert (
        "beats" not in unknown
        and "noise of" not in unknown
        and "no standard error: no noise estimate" in unknown
    )


def test_each_comparison_names_its_own_standard_error() -> None:
    # Per-weight − global and global − none have different standard errors over seeds: each sentence
    # says where its own came from, not where the other's did.
    rows = {"none": _row(0.5, 0.5), "global": _row(0.25, 0.24), "weight": _row(0.22, 0.215)}
    notes = interpret(
        rows,
        n_val=1000,
        se=0.006,
        se_global=0.026,
        se_what="SE-OF-WEIGHT-VS-GLOBAL",
        se_global_what="SE-OF-GLOBAL-VS-NONE",
    )
    (pw,) = [n for n in notes if n.startswith("Per-weight decay")][:1]
    (gl,) = [n for n in notes if n.startswith("A tuned global decay")]
    assert "± 0.006, SE-OF-WEIGHT-VS-GLOBAL)" in pw and "GLOBAL-VS-NONE" not in pw
    assert "± 0.026, SE-OF-GLOBAL-VS-NONE)" in gl and "WEIGHT-VS-GLOBAL" not in gl


def test_notes_never_say_beats_without_a_noise_estimate() -> None:
    notes = interpret({"global": _row(0.25, 0.24), "weight": _row(0.22, 0.215, n=10)}, n_val=1000)
    assert "beats" not in notes[0] and notes[0].startswith(
        "Per-weight decay vs the tuned global decay on test loss: 0.22 vs 0.25 (difference -0.03; no standard "
        "error: no noise estimate)"
    )
    assert "worse" not in " ".join(
        interpret({"global": _row(0.25, 0.24), "weight": _row(0.26, 0.25)}, n_val=1000, se=0.01)
    )


def test_notes_say_which_arms_were_not_tuned() -> None:
    rows = {
        "global": {
            **_row(0.25, 0.24),
            "hyper_steps_applied": 3,
            "hyper_steps_planned": 30,
            "skipped": 27,
            "skip_reasons": {"CG met negative curvature": 27},
        },
        "weight": {**_row(0.25, 0.24), "hyper_steps_applied": 30, "hyper_steps_planned": 30, "retried": 30},
    }
    text = " ".join(interpret(rows, n_val=1000, se=0.01))
    assert (
        "Not tuned: global decay took effect in 3 of 30 hyper steps (27 skipped: CG met negative "
        "curvature 27)" in text
    )
    assert "30 of 30 hyper steps of per-weight decay were retried" in text


def test_every_arm_has_one_colour_in_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.colors as mcolors
    from matplotlib.figure import Figure

    from hypergradients.app.experiments import weight_decay as wd

    figs: list[Figure] = []
    real = Figure.savefig

    def keep(self: Figure, *a: object, **kw: object) -> None:
        figs.append(self)
        real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "savefig", keep)
    exp = get("weight-decay")
    cfg = resolve(
        exp.schema, smoke=exp.smoke, sets=['arms=["none","layer","weight","global"]', "train.rounds=2"]
    )
    exp.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    seen: dict[str, set[str]] = {}
    for fig in figs:
        for ax in fig.axes:
            handles, labels = ax.get_legend_handles_labels()
            for h, lab in zip(handles, labels, strict=True):
                arm = next((a for a, name in wd.ARM_NAMES.items() if lab.startswith(name)), None)
                if arm is None:
                    continue
                c = h.get_color() if hasattr(h, "get_color") else h.get_facecolor()
                if not isinstance(c, str) and len(c) and not isinstance(c[0], float):
                    c = c[0]
                seen.setdefault(arm, set()).add(mcolors.to_hex(c))
    assert set(seen) == {"none", "global", "layer", "weight"}
    assert all(len(c) == 1 for c in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == 4, seen


def test_arm_wall_time_excludes_start_up(tmp_path: Path) -> None:
    # A fresh process: the first optimizer step imports much of torch (~1.5 s), which belongs to no arm.
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypergradients",
            "run",
            "weight-decay",
            "--smoke",
            "--set",
            'arms=["none","global"]',
            "--out",
            str(tmp_path / "o"),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    none, glob = json.loads(out)["rows"]
    # 'none' does strictly less work than 'global' (no hyper steps) on the same batches.
    assert none["wall_s"] <= 1.5 * glob["wall_s"] + 0.2, (none["wall_s"], glob["wall_s"])


def test_cg_report_names_the_method_used_and_counts_hyper_steps(tmp_path: Path) -> None:
    # The default MLP (not the smoke one) away from a minimum: CG meets negative curvature.
    exp = get("weight-decay")
    base = [
        'arms=["global"]',
        "seeds=1",
        "retrain=false",
        "train.rounds=3",
        "hyper.method=cg",
        "data.n_train=500",
        "eval_every=3",
    ]
    cfg = resolve(exp.schema, sets=[*base, "hyper.on_solver_error=skip"])
    # Warnings are errors in the tests: the trainer's SkippedHyperStepsWarning must become a note.
    res = exp.run(RunContext(config=cfg, out=tmp_path / "skip", device=torch.device("cpu"), progress=False))
    (row,) = res.rows
    assert row["hyper_steps"] == "0/3" and row["method"] == "global decay (not tuned)"
    assert res.title == "weight decay on mnist-5k: global (IFT-CG)"
    text = res.report.read_text()
    assert "CG (iters 10, damping 0.001" in text and "alpha" not in text and "Neumann" not in text
    assert (
        "Not tuned: global decay took effect in 0 of 3 hyper steps (3 skipped: CG met negative curvature 3)"
        in text
    )
    cfg = resolve(exp.schema, sets=base)
    res = exp.run(RunContext(config=cfg, out=tmp_path / "damp", device=torch.device("cpu"), progress=False))
    (row,) = res.rows
    assert row["hyper_steps"] == "3/3" and row["method"] == "global decay (tuned)"
    assert "3 of 3 hyper steps of global decay were retried with damping" in res.report.read_text()
