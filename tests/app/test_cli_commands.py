"""What ``explain``, ``compare``, ``bench`` and ``list`` share on the command line.

One behaviour each, the same in every command: ``--out`` is checked before any work; JSON has
``null`` where a number is not finite; ``--smoke`` is the tiny configuration (``--quick`` still
works, hidden, with a deprecation note); ``--quiet`` leaves only the main result file's path on
stdout; progress off a terminal is a bounded number of plain lines; ``list`` shows every
runnable thing. The heavy computations are replaced by fakes where only the command is tested.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from hypergradients import HypergradientError
from hypergradients.app import cli
from hypergradients.app.experiments import bench
from hypergradients.app.experiments.compare import CompareConfig
from hypergradients.app.experiments.explain import ExplainConfig

# the modules (whose functions explain and compare the experiments call)
explain_mod = importlib.import_module("hypergradients.app.experiments.explain")
compare_mod = importlib.import_module("hypergradients.app.experiments.compare")

# explain and compare on settings small enough for a test (well under a second of compute)
EXPLAIN_TINY = [
    "--steps",
    "1,3",
    "--cold-steps",
    "1,3",
    "--truncate",
    "2",
    "--lr-steps",
    "3",
    "--no-figures",
    "--momentum-steps",
    "1,3",
    "--adam-steps",
    "1,3",
    "--noise-orders",
    "2",
    "--noise-batch-sizes",
    "50",
    "--noise-steps",
    "2",
]
COMPARE_TINY = ["--problems", "diabetes", "--budgets", "0,1,2", "--no-figures"]


def _strict_json(text: str) -> Any:
    """``json.loads`` that fails on NaN/Infinity (which Python's reader accepts, JSON does not)."""

    def refuse(c: str) -> None:
        raise AssertionError(f"non-JSON constant {c} in the output")

    return json.loads(text, parse_constant=refuse)


def _no_work(*_: object, **__: object) -> None:
    raise AssertionError("the computation ran although --out cannot be written")


def _fake_suite(suite: bench.Suite, *, progress: Any = None, **_: object) -> list[bench.Result]:
    """Walks the suite's cases through the command's progress display without running any."""
    cases = suite.cases()
    out = []
    for problem, case, extra in progress(cases) if progress else cases:
        out.append(
            bench.Result(
                problem, case, 1e-3, [1e-3], 1024, float("nan") if case == "cg" else None, params=dict(extra)
            )
        )
    return out


# ----------------------------------------------------------------------------------- --out checks
@pytest.mark.parametrize("command", ["explain", "compare", "bench"])
@pytest.mark.parametrize(
    "where", ["/proc/hypergradients-test", "/sys/hypergradients-test", "a file", "under a file"]
)
def test_unusable_out_is_refused_before_any_work(
    command: str,
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(explain_mod, "explain", _no_work)
    monkeypatch.setattr(compare_mod, "compare", _no_work)
    monkeypatch.setattr(bench, "run_suite", _no_work)
    blocker = tmp_path / "results.json"
    blocker.write_text("{}")
    out = {"a file": str(blocker), "under a file": str(blocker / "sub")}.get(where, where)
    assert cli.main([command, "--smoke", "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hypergradients {command}: error: --out {out!r}")
    assert "give" in err  # ... says what to give instead
    assert blocker.read_text() == "{}"


# ------------------------------------------------------------------------------- flags from the schema
@pytest.mark.parametrize("command", ["explain", "compare", "bench"])
def test_each_flag_is_one_setting_described_by_the_schema(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hypergradients.app.commands._flags import shown
    from hypergradients.app.experiments import get

    flags = importlib.import_module(f"hypergradients.app.commands.{command}").FLAGS
    exp = get(command)
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help: compare it unwrapped
    for flag, (key, _) in flags.items():
        opt = exp.schema[key]
        name = flag if opt.kind is not bool else f"--no-{flag[2:]}"
        assert name in text and f"{key}: {' '.join(opt.help.split())}" in text, flag
        if opt.kind is not bool:
            smoke = f"; --smoke {shown(exp.smoke[key])}" if key in exp.smoke else ""
            assert f"(default {shown(opt.default)}{smoke})" in text, flag
    # a flag sets its setting and nothing else
    parser = cli.build_parser()
    for flag, (key, _) in flags.items():
        if exp.schema[key].kind is not bool:
            continue
        args = parser.parse_args([command, f"--no-{flag[2:]}"])
        assert {k: getattr(args, k) for _, (k, _) in flags.items() if getattr(args, k) is not None} == {
            key: False
        }


# ------------------------------------------------------------------------------- JSON: null, not "nan"
def test_explain_and_compare_write_null_for_non_finite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for mod, cls_name in ((explain_mod, "ExplainResult"), (compare_mod, "CompareResult")):
        cls = getattr(mod, cls_name)
        real = cls.to_json
        monkeypatch.setattr(
            cls, "to_json", lambda self, real=real: {**real(self), "probe": [float("nan"), float("inf"), 1.5]}
        )
    for command, tiny in (("explain", EXPLAIN_TINY), ("compare", COMPARE_TINY)):
        out = tmp_path / command
        assert cli.main([command, *tiny, "--out", str(out), "--json"]) == 0
        printed = _strict_json(capsys.readouterr().out)
        on_disk = _strict_json((out / f"{command}.json").read_text())
        assert printed["probe"] == on_disk["probe"] == [None, None, 1.5]


def test_bench_json_has_null_for_non_finite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "run_suite", _fake_suite)
    assert cli.main(["bench", "--smoke", "--out", str(tmp_path), "--json"]) == 0
    printed = _strict_json(capsys.readouterr().out)
    cg = next(r for r in printed["results"] if r["case"] == "cg")
    assert cg["cosine"] is None
    assert _strict_json((tmp_path / "bench.json").read_text()) == printed


# ------------------------------------------------------------------------------ --smoke and --quick
@pytest.mark.parametrize("command", ["explain", "compare", "bench"])
def test_smoke_is_documented_and_quick_is_a_hidden_alias(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "--smoke" in text and "--quick" not in text


@pytest.mark.parametrize("flag", ["--smoke", "--quick"])
def test_quick_still_selects_the_smoke_settings(
    flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_explain(cfg: ExplainConfig, **_: object) -> None:
        seen["explain"] = cfg
        raise HypergradientError("stop here")

    def fake_compare(cfg: CompareConfig, **_: object) -> None:
        seen["compare"] = cfg
        raise HypergradientError("stop here")

    def fake_suite(suite: bench.Suite, **kw: Any) -> list[bench.Result]:
        seen["bench"] = suite
        return _fake_suite(suite, **kw)

    monkeypatch.setattr(explain_mod, "explain", fake_explain)
    monkeypatch.setattr(compare_mod, "compare", fake_compare)
    monkeypatch.setattr(bench, "run_suite", fake_suite)
    for command in ("explain", "compare", "bench"):
        cli.main([command, flag, "--out", str(tmp_path / command), "--quiet"])
    err = capsys.readouterr().err
    assert seen["explain"] == ExplainConfig.smoke()
    assert seen["compare"] == CompareConfig.smoke()
    assert seen["bench"] == bench.Suite.smoke()
    notes = [ln for ln in err.splitlines() if "deprecated" in ln]
    if flag == "--quick":
        assert notes == [
            f"hypergradients {c}: --quick is deprecated; use --smoke (the same settings)"
            for c in ("explain", "compare", "bench")
        ]
    else:
        assert notes == []


# -------------------------------------------------------------------------------------------- --quiet
def test_quiet_prints_only_the_result_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "run_suite", _fake_suite)
    for command, tiny, name in (
        ("explain", EXPLAIN_TINY, "explain.json"),
        ("compare", COMPARE_TINY, "compare.json"),
        ("bench", ["--smoke"], "bench.json"),
    ):
        out = tmp_path / command
        assert cli.main([command, *tiny, "--out", str(out), "--quiet"]) == 0
        captured = capsys.readouterr()
        assert captured.out == f"{out / name}\n"
        assert captured.err == ""  # no progress display either
        _strict_json((out / name).read_text())


def test_bench_writes_bench_json_and_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "run_suite", _fake_suite)
    assert cli.main(["bench", "--smoke", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "plain-cg" in text and f"Wrote {tmp_path / 'bench.json'}" in text
    data = _strict_json((tmp_path / "bench.json").read_text())
    assert {"suite", "results", "ratios"} <= set(data)


# -------------------------------------------------------------------------------------- bench --steps
@pytest.mark.parametrize(("given", "steps"), [(["5,10"], (5, 10)), (["7"], (7,))])
def test_bench_steps_take_a_comma_separated_list(
    given: list[str], steps: tuple[int, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bench.Suite] = []

    def fake(suite: bench.Suite, **kw: Any) -> list[bench.Result]:
        seen.append(suite)
        return _fake_suite(suite, **kw)

    monkeypatch.setattr(bench, "run_suite", fake)
    assert cli.main(["bench", "--smoke", "--steps", *given, "--out", str(tmp_path), "--quiet"]) == 0
    assert seen[0].unrolled_steps == steps


def test_bench_steps_reject_a_bad_item(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--steps", "5,x"])
    assert e.value.code == 2 and "'5,x' is not a comma-separated list of integers" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- progress
@pytest.mark.parametrize("command", ["explain", "compare", "bench"])
def test_progress_off_a_terminal_is_a_few_plain_lines(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "run_suite", _fake_suite)
    tiny = {
        "explain": [
            "--steps",
            "1,10,100",
            "--cold-steps",
            "1,10,100",
            "--truncate",
            "5",
            "--lr-steps",
            "10",
            "--no-figures",
        ],
        "compare": ["--problems", "diabetes", "--budgets", "0,1,2,5,10,20", "--no-figures"],
        "bench": ["--smoke"],
    }[command]
    assert cli.main([command, *tiny, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{command}:")]
    assert 1 <= len(lines) <= 21  # one per 5 % at most
    assert lines[-1].startswith(f"{command}: 100%")


# --------------------------------------------------------------------------------------------- list
def test_list_shows_every_experiment_with_its_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    # explain, compare and bench are experiments like the others: each line says
    # what it does, its --smoke run, where its settings are, and the sub-command of its own name.
    assert cli.main(["list"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("weight-decay  ")
    for name in ("explain", "compare", "bench"):
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert len(line.split()) > 3  # says what it does
        assert f"hypergradients run {name} --smoke" in text and f"hypergradients list {name}" in text
        assert f"also hypergradients {name} [flags]" in text
    assert "hypergradients run weight-decay --smoke" in text
    assert cli.main(["list", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in items] == [
        "weight-decay",
        "explain",
        "compare",
        "bench",
        "families",
        "overfit-validation",
        "distill",
        "data-cleaning",
        "lstm-dropout",
        "augment",
        "lm-reweight",
    ]
    by = {i["name"]: i for i in items}
    for name in ("explain", "compare", "bench"):
        assert by[name]["kind"] == "experiment" and by[name]["smoke"] == f"hypergradients run {name} --smoke"
        assert by[name]["command"] == f"hypergradients {name}" and by[name]["summary"]
        assert by[name]["resumable"] is False
    assert by["weight-decay"]["resumable"] is True and "command" not in by["weight-decay"]
    assert by["families"]["resumable"] is True and "hypergradients run families --smoke" in text


def test_list_one_experiment_shows_its_settings_and_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "explain"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("explain: ") and "hypergradients explain --help" in text
    assert "theorem.steps" in text and "[--smoke: [1, 10, 100]]" in text
    assert cli.main(["list", "bench", "--json"]) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["name"] == "bench"
    iters = next(s for s in item["settings"] if s["key"] == "iters")
    assert iters["default"] == 20 and iters["smoke"] == 5
    assert cli.main(["list", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and "explain" in err and "weight-decay" in err
