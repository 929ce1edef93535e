"""Run every peer adapter on the benchmark problem and tabulate time, memory and accuracy.

Standard library only: run it with any Python 3.10+. Each (runner, method, iters) case runs in its own
subprocess with that runner's interpreter (its own venv, made by benchmarks/envs.sh), sequentially, with the
same thread settings (``--threads``, default 2) and ``MALLOC_MMAP_THRESHOLD_=4096`` for all (see the peak
memory notes in _common.py).

    bash benchmarks/envs.sh                                   # once: one venv per peer
    python3 benchmarks/peers/run_peers.py --json out.json     # generate problem if needed, run, print
    python3 benchmarks/peers/run_peers.py --cases cg:20 --only torchopt,jaxopt

Columns: median / min of the timed repeats; peak MB = extra peak RSS of one hypergradient (see _common.py);
compile s = JIT compile time (JAX only, excluded from the timings); load = 1-minute load average when the
case started (a value above --threads means other processes competed for the cores: prefer min ms then).

Scoring (against the npz written by make_problem.py):
  cos      cosine similarity to the exact (dense-solve) hypergradient
  relerr   ||h - exact|| / ||exact||
  alg.err  ||h - ref|| / ||ref|| against a numpy run of the SAME algorithm with the same K
           (``cg{K}_hypergradient`` / ``neumann{K}_hypergradient``; unrolled K steps from w_star equal the
           K-term Neumann sum). A large alg.err means the library computes something other than the
           method it claims (a bug), not merely an unconverged approximation. Rows are flagged WRONG when
           alg.err > 1e-6.

Adding a runner (e.g. our own library): append to ``default_runners()``::

    Runner("hypergradients", python=ROOT / ".venv/bin/python", script=PEERS / "hypergradients_peer.py")

or pass ``--runner hypergradients=.venv/bin/python:benchmarks/peers/hypergradients_peer.py`` (repeatable).
The script must accept the adapters' command line (see _common.parse_args) and write the same JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEERS = Path(__file__).resolve().parent
ROOT = PEERS.parent.parent
ENVS = ROOT / "benchmarks" / ".envs"
DEFAULT_CASES = "cg:20,neumann:20,unrolled:100"
WRONG_TOL = 1e-6


@dataclass
class Runner:
    """One peer: the interpreter (a venv's python) that runs its adapter script."""

    name: str
    python: Path | None
    script: Path
    unavailable: str | None = None  # reason the runner cannot run at all (then python may be None)
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables


def _env_runner(name: str, peer: str, script: str) -> Runner:
    py = ENVS / peer / "bin" / "python"
    if (ENVS / peer / ".installed").exists() and py.exists():
        return Runner(name, py, PEERS / script)
    failed = ENVS / f"{peer}.failed"
    if failed.exists():
        lines = [ln for ln in failed.read_text().splitlines() if ln.strip()]
        tail = " | ".join(lines[:1] + lines[-3:])
        return Runner(name, None, PEERS / script, unavailable=f"install failed ({failed}): {tail}")
    return Runner(
        name, None, PEERS / script, unavailable=f"not installed: run `bash benchmarks/envs.sh {peer}`"
    )


def default_runners() -> list[Runner]:
    main_py = ROOT / ".venv" / "bin" / "python"
    if (ROOT / ".venv" / ".installed").exists() and main_py.exists():
        plain = Runner("plain-autograd", main_py, PEERS / "plain_peer.py")
    else:
        plain = _env_runner("plain-autograd", "plain", "plain_peer.py")
    return [
        plain,
        _env_runner("torchopt", "torchopt", "torchopt_peer.py"),
        _env_runner("higher", "higher", "higher_peer.py"),
        _env_runner("betty", "betty", "betty_peer.py"),
        _env_runner("jaxopt", "jaxopt", "jaxopt_peer.py"),
        Runner(
            "hypertorch",
            None,
            PEERS / "hypertorch_peer.py",
            unavailable="not on PyPI (PyPI's 'hypertorch' is an unrelated hypergraph library); not installed",
        ),
    ]


# --- minimal .npz reader (1-D/0-D float64 arrays only), so this driver needs no numpy ----------------
def read_npz_vectors(path: Path, keys: list[str]) -> dict[str, list[float]]:
    import struct

    out: dict[str, list[float]] = {}
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        for key in keys:
            if f"{key}.npy" not in names:
                continue
            raw = z.read(f"{key}.npy")
            major = raw[6]
            hlen_size = 2 if major == 1 else 4
            hlen = int.from_bytes(raw[8 : 8 + hlen_size], "little")
            header = ast.literal_eval(raw[8 + hlen_size : 8 + hlen_size + hlen].decode("latin1"))
            if header["descr"] not in ("<f8", "=f8") or len(header["shape"]) > 1:
                raise ValueError(f"{key}: expected a 0-D/1-D float64 array, got {header}")
            body = raw[8 + hlen_size + hlen :]
            out[key] = list(struct.unpack(f"<{len(body) // 8}d", body))
    return out


def _norm(a: list[float]) -> float:
    return math.sqrt(sum(x * x for x in a))


def score(h: list[float], ref: list[float]) -> tuple[float, float]:
    """(cosine, relative L2 error) of h against ref."""
    nh, nr = _norm(h), _norm(ref)
    cos = sum(x * y for x, y in zip(h, ref, strict=True)) / (nh * nr) if nh > 0 and nr > 0 else float("nan")
    rel = _norm([x - y for x, y in zip(h, ref, strict=True)]) / nr if nr > 0 else float("nan")
    return cos, rel


def ensure_problem(args: argparse.Namespace, runners: list[Runner]) -> Path:
    problem = Path(args.problem)
    if problem.exists() and not args.regen:
        return problem
    problem.parent.mkdir(parents=True, exist_ok=True)
    candidates = [Path(sys.executable)] + [r.python for r in runners if r.python is not None]
    for py in candidates:
        if subprocess.run([str(py), "-c", "import numpy"], capture_output=True).returncode == 0:
            cmd = [str(py), str(PEERS / "make_problem.py"), "--out", str(problem), *args.make_args.split()]
            print("+", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            return problem
    raise SystemExit("no interpreter with numpy found to run make_problem.py: run benchmarks/envs.sh first")


def run_case(
    runner: Runner, method: str, iters: int, args: argparse.Namespace, outdir: Path
) -> dict[str, Any]:
    row: dict[str, Any] = {"peer": runner.name, "method": method, "iters": iters}
    if runner.unavailable is not None or runner.python is None:
        return {**row, "status": "unavailable", "reason": runner.unavailable}
    out = outdir / f"{runner.name}_{method}_{iters}.json"
    out.unlink(missing_ok=True)
    cmd = [
        str(runner.python),
        str(runner.script),
        "--problem",
        str(args.problem),
        "--method",
        method,
        "--iters",
        str(iters),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--out",
        str(out),
    ]
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "OPENBLAS_NUM_THREADS": str(args.threads),
            "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
            "MALLOC_MMAP_THRESHOLD_": "4096",
            "PYTHONWARNINGS": "ignore::FutureWarning",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.update(runner.env)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = -1, f"timed out after {args.timeout} s: {exc.stderr or ''}"
    row["wall_s"] = time.perf_counter() - t0
    row["loadavg_1min_before"] = load_before
    row["cmd"] = " ".join(cmd)
    if rc != 0 or not out.exists():
        tail = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()][-3:]
        return {**row, "status": "error", "reason": f"exit {rc}: " + " | ".join(tail)}
    res = json.loads(out.read_text())
    res["peer_reported"] = res.get("peer")
    res.update(row)  # the runner's name (not the script's self-reported one) labels the row
    res["result_json"] = str(out)
    if res.get("status") != "ok":
        res["reason"] = res.get("notes", "")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default=str(ENVS / "results" / "problem.npz"), help="npz (made if missing)")
    ap.add_argument("--regen", action="store_true", help="regenerate the problem even if it exists")
    ap.add_argument(
        "--make-args", default="", help="extra make_problem.py flags, e.g. '--d 200 --n-train 600'"
    )
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"method:iters list (default {DEFAULT_CASES})")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per (peer, case) subprocess")
    ap.add_argument("--only", default="", help="comma list of runner names to run")
    ap.add_argument("--runner", action="append", default=[], help="extra runner NAME=PYTHON:SCRIPT")
    ap.add_argument("--outdir", default=str(ENVS / "results"), help="per-run JSON files go here")
    ap.add_argument("--json", default=None, help="write the summary (all rows) to this JSON file")
    args = ap.parse_args(argv)

    runners = default_runners()
    for spec in args.runner:
        name, _, rest = spec.partition("=")
        py, _, script = rest.partition(":")
        if not (name and py and script):
            ap.error(f"--runner expects NAME=PYTHON:SCRIPT, got {spec!r}")
        runners.append(Runner(name, Path(py).absolute(), Path(script).absolute()))
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        runners = [r for r in runners if r.name in wanted]
    cases = []
    for c in args.cases.split(","):
        m, _, k = c.partition(":")
        cases.append((m.strip(), int(k)))

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    args.problem = str(ensure_problem(args, runners))
    keys = ["exact_hypergradient"] + [f"{m}{k}_hypergradient" for m in ("cg", "neumann") for _, k in cases]
    refs = read_npz_vectors(Path(args.problem), keys)
    exact = refs["exact_hypergradient"]

    rows: list[dict[str, Any]] = []
    for runner in runners:
        for method, iters in cases:
            print(f"running {runner.name} {method} {iters} ...", file=sys.stderr, flush=True)
            row = run_case(runner, method, iters, args, outdir)
            h = row.get("hypergradient")
            if row.get("status") == "ok" and h:
                row["cos_exact"], row["relerr_exact"] = score(h, exact)
                ref_key = f"{'cg' if method == 'cg' else 'neumann'}{iters}_hypergradient"
                if ref_key in refs:
                    row["alg_ref"] = ref_key
                    _, row["relerr_alg"] = score(h, refs[ref_key])
                    row["wrong"] = row["relerr_alg"] > WRONG_TOL
            rows.append(row)

    print_table(rows)
    if args.json:
        summary = {
            "problem": args.problem,
            "cases": cases,
            "repeats": args.repeats,
            "threads": args.threads,
            "wrong_tol": WRONG_TOL,
            "rows": [{k: v for k, v in r.items() if k != "hypergradient"} for r in rows],
        }
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"summary written to {args.json}", file=sys.stderr)
    return 0


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'peer':<15} {'method':<9} {'iters':>5} {'median ms':>10} {'min ms':>9} {'peak MB':>8} "
    head += f"{'compile s':>9} {'cos exact':>10} {'relerr':>9} {'alg.err':>9} {'load':>5}  flag"
    print(head)
    print("-" * len(head))
    reasons = []
    for r in rows:
        if r.get("status") != "ok":
            status = str(r.get("status"))
            print(f"{r['peer']:<15} {r['method']:<9} {r['iters']:>5} {status:>10}")
            reasons.append(f"{r['peer']} {r['method']}: {status}: {r.get('reason', '')}")
            continue
        med, mn = r.get("median_s"), r.get("min_s")
        peak = r.get("peak_mem_bytes")
        flag = "WRONG" if r.get("wrong") else ""
        print(
            f"{r['peer']:<15} {r['method']:<9} {r['iters']:>5} {_fmt(med and med * 1e3, '10.2f')} "
            f"{_fmt(mn and mn * 1e3, '9.2f')} {_fmt(peak and peak / 2**20, '8.2f')} "
            f"{_fmt(r.get('compile_s'), '9.2f')} {_fmt(r.get('cos_exact'), '10.6f')} "
            f"{_fmt(r.get('relerr_exact'), '9.2e')} {_fmt(r.get('relerr_alg'), '9.2e')} "
            f"{_fmt(r.get('loadavg_1min_before'), '5.1f')}  {flag}"
        )
    if reasons:
        print("\nnot run / failed:")
        for line in reasons:
            print("  " + line)
    notes = [
        f"{r['peer']} {r['method']}: {r['notes']}" for r in rows if r.get("status") == "ok" and r.get("notes")
    ]
    if notes:
        print("\nnotes:")
        for line in notes:
            print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
