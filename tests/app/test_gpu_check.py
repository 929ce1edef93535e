"""``benchmarks/gpu_check.py`` (``make gpu-check``) on the CPU at its tiny size: every part's code runs
(the GPU run itself needs CUDA), a wrong answer fails its row, and without CUDA it skips."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hypergradients.app.corpus import load_corpus
from hypergradients.app.experiments import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
METHODS = {
    "Exact",
    "CG",
    "Neumann",
    "Identity",
    "Nystrom",
    "Auto",
    "Unrolled",
    "Forward",
    "root_hypergradient GMRES",
}


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_on_the_cpu_runs_every_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gc = _script()
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--device", "cpu", "--size", "tiny", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        printed.startswith("| part | case | dtype | status | rel. error vs CPU |")
        and f"wrote {out}" in printed
    )
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    methods = [r for r in rows if r["part"] == "method"]
    assert {(r["case"], r["dtype"]) for r in methods} == {
        (m, d) for m in METHODS for d in ("float64", "float32")
    }
    # On the CPU "device" and reference are the same computation: bit for bit equal.
    assert all(r["error"] == 0.0 for r in methods)
    lstm = {(r["case"], r["dtype"]): r for r in rows if r["part"] == "lstm"}
    fd = lstm[("LSTM native, hvp_mode=finite-difference", "float64")]
    assert 0 < fd["error"] <= fd["tol"]  # central differences: close to the reverse mode, not equal
    # The main job and every experiment that has a config=full preset (and families, which has none).
    with_full = {n for n, e in REGISTRY.items() if "config" in e.schema}
    assert {r["case"] for r in rows if r["part"] == "experiment"} == with_full | {"weight-decay", "families"}
    assert doc["tolerances"] == {
        "method": {"float64": 1e-9, "float32": 1e-3},
        "lstm": {"float64": 1e-6, "float32": 2e-2},
    }


def test_a_wrong_answer_fails_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gc = _script()
    monkeypatch.setattr(gc, "rel_err", lambda a, b: 1.0)  # as if the device's hypergradient were off
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--device", "cpu", "--size", "tiny", "--parts", "method", "--json", str(out)]) == 1
    assert {r["status"] for r in json.loads(out.read_text())["rows"]} == {"FAIL"}
    assert "18 FAIL" in capsys.readouterr().out


def test_without_cuda_it_says_so_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gc = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert gc.main([]) == 0
    assert capsys.readouterr().out.startswith("gpu_check: skipped: torch sees no CUDA device")
    assert list(tmp_path.iterdir()) == []


def test_synthetic_text_reads_as_a_ptb_corpus(tmp_path: Path) -> None:
    gc = _script()
    corpus = load_corpus(gc.synthetic_ptb(tmp_path, 2000), vocab_size=100)
    assert corpus.name == "ptb" and corpus.vocab_size == 100
    assert len(corpus.train) > 1900  # 2000 words plus an end-of-line mark per line of 20
