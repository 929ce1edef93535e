"""One application layer: explain, compare and bench are registered experiments like weight-decay.

What is checked: ``hypergradients run NAME --set ...`` and the sub-command ``hypergradients NAME
[flags]`` give the same numbers (the flags are only another spelling of the settings); each run
writes the one run folder (``config.toml`` that resolves back to the same configuration, the
result JSON, ``report.md``, figures); the settings objects of explain, compare and bench read their
defaults from the schema and ``smoke()`` from the ``--smoke`` table; what the schema cannot judge is
refused before any file is written; ``--resume`` is refused for experiments without checkpoints, and rerunning them
into the same folder replaces their files; the core does not import the application layer.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hypergradients.app import cli
from hypergradients.app.config import read_toml, resolve
from hypergradients.app.experiments import REGISTRY, bench, get
from hypergradients.app.experiments.compare import CompareConfig, compare_config
from hypergradients.app.experiments.explain import ExplainConfig, explain_config

# settings small enough for a test (well under a second of compute each), in both spellings
EXPLAIN_FLAGS = [
    "--steps",
    "1,3",
    "--cold-steps",
    "1,3",
    "--truncate",
    "2",
    "--lr-steps",
    "3",
    "--momentum-beta",
    "0.5",
    "--momentum-steps",
    "1,3",
    "--adam-lr",
    "0.05",
    "--adam-steps",
    "1,3",
    "--noise-orders",
    "2",
    "--noise-batch-sizes",
    "50",
    "--noise-steps",
    "2",
]
EXPLAIN_SETS = [
    "theorem.steps=[1,3]",
    "cold.steps=[1,3]",
    "cold.truncate=2",
    "lr.steps=3",
    "momentum.beta=0.5",
    "momentum.steps=[1,3]",
    "adam.lr=0.05",
    "adam.steps=[1,3]",
    "noise.orders=2",
    "noise.batch_sizes=[50]",
    "noise.steps=[2]",
]
COMPARE_FLAGS = ["--problems", "diabetes", "--budgets", "0,1,3", "--methods", "Neumann,CG,Unrolled"]
COMPARE_SETS = ['problems=["diabetes"]', "budgets=[0,1,3]", 'methods=["Neumann","CG","Unrolled"]']


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _numbers(obj: Any) -> Any:
    """The JSON without wall-clock timings (which differ between any two runs)."""
    if isinstance(obj, dict):
        return {
            k: _numbers(v)
            for k, v in obj.items()
            if k not in ("timings_s", "unrolled_s", "neumann_s", "time_s")
        }
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


def test_the_registry_holds_every_runnable_thing() -> None:
    assert list(REGISTRY) == [
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
    assert [n for n, e in REGISTRY.items() if not e.resumable] == ["explain", "compare", "bench"]


@pytest.mark.parametrize(
    ("name", "flags", "sets"),
    [("explain", EXPLAIN_FLAGS, EXPLAIN_SETS), ("compare", COMPARE_FLAGS, COMPARE_SETS)],
)
def test_run_and_the_subcommand_give_the_same_numbers(
    name: str, flags: list[str], sets: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([name, *flags, "--out", str(tmp_path / "alias"), "--json"]) == 0
    alias = json.loads(capsys.readouterr().out)
    assert cli.main(["run", name, *_sets(sets), "--out", str(tmp_path / "run"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["experiment"] == name and doc["result_file"] == str(tmp_path / "run" / f"{name}.json")
    # float64 and the same operations in the same order: equal, not merely close
    assert _numbers(doc["result"]) == _numbers(alias)
    assert _numbers(json.loads((tmp_path / "run" / f"{name}.json").read_text())) == _numbers(alias)
    # and the same resolved configuration on disk
    assert read_toml(tmp_path / "run" / "config.toml") == read_toml(tmp_path / "alias" / "config.toml")


def test_bench_run_and_subcommand_resolve_the_same_suite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[bench.Suite] = []

    def fake(suite: bench.Suite, **_: object) -> list[bench.Result]:  # timings would differ: fixed ones
        seen.append(suite)
        return [
            bench.Result("logistic", c, 1e-3, [1e-3], 2048, 1.0, 0.0, 3, params={"iters": suite.iters})
            for c in ("plain-cg", "cg")
        ]

    monkeypatch.setattr(bench, "run_suite", fake)
    assert (
        cli.main(
            [
                "bench",
                "--smoke",
                "--iters",
                "4",
                "--steps",
                "3,7",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "alias"),
                "--json",
            ]
        )
        == 0
    )
    alias = json.loads(capsys.readouterr().out)
    assert (
        cli.main(
            [
                "run",
                "bench",
                "--smoke",
                "--set",
                "iters=4",
                "--set",
                "unrolled.steps=[3,7]",
                "--threads",
                "1",
                "--out",
                str(tmp_path / "run"),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert seen[0] == seen[1] == bench.Suite.smoke(iters=4, unrolled_steps=(3, 7), threads=1)
    assert doc["result"] == alias and {"suite", "results", "ratios"} <= set(alias)
    assert [r["case"] for r in doc["rows"]] == ["plain-cg", "cg"]


@pytest.mark.parametrize(
    ("name", "cls", "read", "run_only"),
    [
        ("explain", ExplainConfig, explain_config, {"threads", "figures"}),
        ("compare", CompareConfig, compare_config, {"threads", "figures"}),
        ("bench", bench.Suite, bench.suite_of, set()),
    ],
)
def test_the_settings_objects_are_read_from_the_schema(
    name: str, cls: Any, read: Any, run_only: set[str]
) -> None:
    exp = get(name)
    keys = [k for f in dataclasses.fields(cls) for k in f.metadata["keys"]]
    # every setting reaches the settings object once, or is the run's own (its threads, its figures)
    assert sorted(keys) == sorted(set(exp.schema) - run_only)
    # ... each field from the key of its name (``truncate`` from ``cold.truncate``, ``decay`` from
    # ``decay.low`` and ``decay.high``)
    for f in dataclasses.fields(cls):
        assert all(
            k.replace(".", "_").endswith(f.name) or k.split(".")[0] == f.name for k in f.metadata["keys"]
        )
    # the object's defaults and its smoke() are the schema's defaults and its --smoke table
    assert read(resolve(exp.schema)) == cls()
    assert read(resolve(exp.schema, smoke=exp.smoke)) == cls.smoke() != cls()


@pytest.mark.parametrize(
    ("name", "sets", "files"),
    [
        (
            "explain",
            EXPLAIN_SETS,
            [
                "explain.json",
                "explain_cosine.png",
                "explain_theorem.png",
                "explain_optimizers.png",
                "explain_noise.png",
                "report.md",
            ],
        ),
        ("compare", COMPARE_SETS, ["compare.json", "compare.md", "compare.png", "report.md"]),
    ],
)
def test_run_writes_the_one_run_folder(
    name: str, sets: list[str], files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main(["run", name, *_sets(sets), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{name}: ") and f"report: {out / 'report.md'}" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.toml", *files])
    exp = get(name)
    assert resolve(exp.schema, file=read_toml(out / "config.toml")) == resolve(exp.schema, sets=sets)
    report = (out / "report.md").read_text()
    assert report.startswith(f"# {name}: ") and f"![{files[-2].removesuffix('.png')}]" in report
    # no checkpoints: running again into the same folder replaces its files (as the sub-commands did)
    before = (out / f"{name}.json").stat().st_mtime_ns
    assert cli.main(["run", name, *_sets(sets), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{out / 'report.md'}\n"
    assert (out / f"{name}.json").stat().st_mtime_ns >= before


@pytest.mark.parametrize("name", ["explain", "compare", "bench"])
def test_resume_is_refused_with_the_reason(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main(["run", name, "--smoke", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"experiment {name!r} keeps no checkpoints to resume" in err and "drop --resume" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["explain", "compare", "bench"])
def test_tensorboard_is_refused_where_nothing_is_logged(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", name, "--smoke", "--out", str(tmp_path / "r"), "--tensorboard"]) == 2
    assert f"experiment {name!r} logs no per-round metrics" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "explain", "--set", "alpha_scale=3"], "alpha_scale=3"),
        (["run", "explain", "--set", "decay.low=0.5"], "low must not exceed high"),
        (["run", "compare", "--set", 'methods=["LBFGS"]'], "config key 'methods'"),
        (["run", "compare", "--set", "budget=[1]"], "Did you mean 'budgets'?"),
        (["run", "bench", "--set", "mlp.sizes=[5]"], "give at least an input and an output size"),
        (["run", "bench", "--set", "device=no-such-device"], "expected a torch device"),
        (["explain", "--alpha-scale", "0"], "config key 'alpha_scale'"),
    ],
)
def test_what_the_schema_refuses_writes_nothing(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_bench_device_without_cuda_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["run", "bench", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_the_core_does_not_import_the_application_layer() -> None:
    # In a fresh interpreter: the library, its trainer and methods load neither the experiments nor
    # the command line, nor matplotlib/sklearn (tqdm is not checked: torch itself imports it).
    code = (
        "import sys, hypergradients, hypergradients.training.fit, hypergradients.core.hypergradient, hypergradients.hparams; "
        "print([m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn', 'tomli_w') or "
        "m.startswith(('hypergradients.app.experiments', 'hypergradients.app.commands', 'hypergradients.app.cli'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_experiment_imports_another() -> None:
    # What two experiments share lives in the shared modules (shared, base, problems, optuna_arm, figures),
    # so that an experiment's module can change without changing another's.
    import ast
    import importlib

    from hypergradients.app.experiments import MODULES

    package = importlib.import_module("hypergradients.app.experiments")
    folder = Path(package.__file__).parent
    experiments = set(MODULES.values())
    found = []
    for module in sorted(experiments):
        tree = ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                found += [f"{module} imports {n}" for n in names if n in experiments and n != module]
    assert found == []
