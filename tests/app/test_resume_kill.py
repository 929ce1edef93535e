"""``hypergradients run`` killed with SIGKILL in the middle of an arm, then ``--resume``: the same
table and the same top ``metrics.jsonl`` as a run never interrupted, and no temp file left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ARGS = [
    "weight-decay",
    "--smoke",
    "--set",
    "train.rounds=6",
    "--set",
    "checkpoint_every=2",
    "--json",
    "--quiet",
]

_WORKER = textwrap.dedent("""
    import sys, time
    from hypergradients.app.cli import main
    from hypergradients.app.experiments import shared

    pause = float(sys.argv[1])
    real_fit = shared.fit

    def slow_fit(*args, **kw):
        def tick(rec):
            print(kw["checkpoint_dir"].name, rec["round"], flush=True)
            time.sleep(pause)
        kw["callbacks"] = [*kw["callbacks"], tick]
        return real_fit(*args, **kw)

    shared.fit = slow_fit
    sys.exit(main(["run", *sys.argv[2:]]))
""")


def _run(tmp_path: Path, out: Path, pause: float, *extra: str) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(pause), *ARGS, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _rows(stdout: str) -> list[dict[str, Any]]:
    last = stdout.strip().splitlines()[-1]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")} for r in json.loads(last)["rows"]]


def _top(out: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in json.loads(s).items() if k != "time_s"}
        for s in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_killed_run_resumes_to_the_same_table_and_metrics(tmp_path: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = _run(tmp_path, ref, 0.0)
    ref_out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    killed = _run(tmp_path, run, 0.3)
    assert killed.stdout is not None
    deadline = time.monotonic() + 120
    for line in killed.stdout:  # kill in the middle of the second arm, after its round-2 checkpoint
        arm, rnd = line.split()
        if arm == "global" and int(rnd) >= 3:
            break
        assert time.monotonic() < deadline, "worker too slow"
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL and not (run / "report.md").exists()
    p = _run(tmp_path, run, 0.0, "--resume")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert _rows(out) == _rows(ref_out)
    assert _top(run) == _top(ref)
    assert not [f for f in run.rglob("*") if ".tmp-" in f.name]
