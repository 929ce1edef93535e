"""Shared, framework-free helpers for the peer adapter scripts (stdlib + numpy only).

Every ``<peer>_peer.py`` script in this folder imports this module (the script's own folder is on
``sys.path`` when it is run as ``python benchmarks/peers/<peer>_peer.py``), so the command line, the
timing protocol, the memory measurement and the JSON output are identical for all peers.

Timing protocol
    One untimed warm-up call, then ``--repeats`` timed calls, each timed with ``time.perf_counter``
    around the full hypergradient computation (from ``w_star``/``log_lam`` already in the framework's
    own arrays to the finished hypergradient; JAX results are ``block_until_ready()``-ed inside the
    timed call). JIT compile time is excluded and reported separately by the JAX peer as ``compile_s``.

Peak memory (method chosen: resettable kernel high-water mark)
    Before each timed call the process's peak-RSS counter is reset by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0), the current RSS is read from ``/proc/self/status`` (VmRSS),
    and after the call VmHWM (the kernel's exact, non-sampled peak RSS since the reset) is read.
    ``peak_mem_bytes`` is the largest ``VmHWM - VmRSS_before`` over the timed calls, i.e. the extra
    resident memory one hypergradient needed on top of what the process already held. The kernel
    tracks the high-water mark on every page fault, so short spikes are not missed (a sampling thread
    would need the GIL and could miss them). Where clear_refs cannot be written, a fallback thread
    samples ``/proc/self/statm`` every 1 ms instead; ``mem_method`` in the JSON says which was used.
    Freed memory that the allocator keeps (glibc arenas) would already be part of the baseline after the
    warm-up and hide the real working set, so run_peers.py sets ``MALLOC_MMAP_THRESHOLD_=4096`` for every
    peer: every buffer of >= 4 KiB (a d=1000 float64 vector is 8 KiB) then comes from mmap and goes back to
    the OS when freed, so RSS follows the live tensors at page granularity. (With glibc's default dynamic
    threshold the measured peak of e.g. a 100-step unrolled run drops ~10x, to a meaningless ~0.3 MB.)
    The data (X_train, X_val) and the framework itself are loaded before the baseline and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("cg", "neumann", "unrolled")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def configure_threads(n: int) -> None:
    """Ask every runtime for ``n`` compute threads (call before the framework creates its pools)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = flags.strip()


def parse_args(peer: str, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"{peer}: hypergradient of the logistic-regression benchmark")
    ap.add_argument("--problem", required=True, help="npz written by make_problem.py")
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--iters", type=int, default=20, help="CG iterations / Neumann terms / unrolled steps")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    ap.add_argument("--alpha", type=float, default=None, help="Neumann / unrolled step (default: npz alpha)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads for the framework")
    ap.add_argument("--out", required=True, help="result JSON path")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        ap.error("--iters and --repeats must be >= 1")
    configure_threads(args.threads)
    return args


def load_problem(path: str, alpha: float | None) -> dict[str, Any]:
    with np.load(path) as z:
        prob: dict[str, Any] = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
    prob["alpha"] = float(prob["alpha"]) if alpha is None else float(alpha)
    return prob


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class _Sampler:
    """Fallback: a thread that samples RSS every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _Sampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(
    fn: Callable[..., Any], repeats: int, setup: Callable[[], Any] | None = None
) -> tuple[Any, list[float], int, str]:
    """Warm up once, then time ``repeats`` calls; return (last result, times, peak bytes, mem method).

    With ``setup``, each call (warm-up included) is ``fn(setup())`` and only ``fn`` is timed/measured:
    for peers whose objects are single-use (e.g. Betty's Engine), built fresh before every call.
    """

    def call() -> Any:
        return fn() if setup is None else fn(state)

    state = None if setup is None else setup()
    use_hwm = _can_reset_hwm()
    result = call()
    times: list[float] = []
    peak = 0
    for _ in range(repeats):
        state = None if setup is None else setup()
        if use_hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_kib("VmRSS") * 1024
            t0 = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - t0)
            peak = max(peak, _status_kib("VmHWM") * 1024 - base)
        else:
            base = _rss_bytes()
            with _Sampler() as s:
                t0 = time.perf_counter()
                result = call()
                times.append(time.perf_counter() - t0)
            peak = max(peak, s.peak - base)
    method = "VmHWM after /proc/self/clear_refs reset" if use_hwm else "1 ms /proc/self/statm sampler thread"
    return result, times, peak, method


def write_result(
    args: argparse.Namespace,
    peer: str,
    *,
    version: str,
    hypergradient: np.ndarray | None = None,
    times: list[float] | None = None,
    peak: int | None = None,
    mem_method: str | None = None,
    status: str = "ok",
    notes: str = "",
    **extra: Any,
) -> None:
    """Write the result JSON. ``status`` is "ok", "not_offered" or "error"."""
    out: dict[str, Any] = {
        "peer": peer,
        "method": args.method,
        "iters": args.iters,
        "status": status,
        "times_s": times or [],
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "peak_mem_bytes": peak,
        "mem_method": mem_method,
        "hypergradient": None if hypergradient is None else [float(x) for x in np.ravel(hypergradient)],
        "version": version,
        "threads": args.threads,
        "python": platform.python_version(),
        "notes": notes,
    }
    out.update(extra)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if status == "ok":
        print(
            f"{peer} {args.method} iters={args.iters}: median {out['median_s'] * 1e3:.2f} ms", file=sys.stderr
        )
    else:
        print(f"{peer} {args.method}: {status}: {notes}", file=sys.stderr)
