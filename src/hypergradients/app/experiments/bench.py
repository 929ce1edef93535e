"""What a hypergradient costs where it runs: time, peak memory and accuracy, each case isolated.

Used by ``hypergradients bench`` and ``benchmarks/run.py``. Every case runs in its own
subprocess (``python -m hypergradients.app.experiments.bench CASE_JSON``) so that its peak memory is its own.

Timing: one untimed warm-up call, then ``repeats`` timed calls (``time.perf_counter``); the
median is reported. Peak memory (CPU): before each timed call the kernel's resident-set
high-water mark is reset (``/proc/self/clear_refs`` ← 5) and ``VmHWM − VmRSS_before`` read
after it, the exact extra resident memory of one call (the same method as
``benchmarks/peers/_common.py``; ``MALLOC_MMAP_THRESHOLD_=4096``, as in ``run_peers.py``, makes
freed buffers go back to the OS, so buffers of a few pages and more are counted exactly).
Where ``/proc`` cannot be used the memory is reported as ``None``. On CUDA,
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` is used instead.

Problems (all float64 on CPU unless ``dtype`` says otherwise):

* ``logistic`` — per-feature-L2 binary logistic regression, ``d`` weights and ``d``
  hyperparameters ``log λ``: ``L_T = mean BCE(X_T w, y_T) + ½ Σ e^{λ_i} w_i²``,
  ``L_V = mean BCE(X_V w, y_V)``; ``w*`` by Newton to ``‖∇L_T‖ < 1e-10``; the exact
  hypergradient by a dense solve. Cases compare our methods with a plain autograd loop that
  builds the ``∂L_T/∂w`` graph once (the same loop as ``benchmarks/peers/plain_peer.py``).
* ``mlp`` — an MLP (default 784-1024-1024-10, 1.86M weights, float32) with one log weight decay
  per weight (1.86M hyperparameters) on one batch; Neumann-20 against the 22 plain autograd
  evaluations it needs (the ``∂L_T/∂w`` graph, ``∂L_V/∂w``, 19 HVPs, one mixed VJP), and one
  training step (forward + backward) for the memory reference.
* ``unrolled`` — reverse mode through K steps, plain and checkpointed, and forward mode, on the
  logistic problem (memory against K).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import hypergradients as hg

from ...core.derivatives import LossFn
from ...core.tree import Tree
from ...training.files import load_checkpoint
from ..config import Config, ConfigError, Option, resolve, setting, settings
from .base import Experiment, ExperimentResult, RunContext
from .problems import cosine, newton, rel_dist


# ---------------------------------------------------------------------------------------- problems
def make_logistic(
    d: int = 1000, n_train: int = 3000, n_val: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float64
) -> dict[str, Tensor]:
    """The logistic problem's data, ``w*`` (Newton) and the exact hypergradient (dense solve)."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w_true = torch.zeros(d, dtype=torch.float64)
    k = max(1, d // 10)
    idx = torch.randperm(d, generator=gen)[:k]
    w_true[idx] = torch.randn(k, generator=gen, dtype=torch.float64) * (3.0 / math.sqrt(k))
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(X @ w_true)).to(torch.float64)
    log_lam = math.log(1e-2) + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    Xt, yt, Xv, yv = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    lam = log_lam.exp()

    def hessian(w: Tensor) -> Tensor:
        s = torch.sigmoid(Xt @ w)
        return (Xt * (s * (1 - s))[:, None]).T @ Xt / n_train + torch.diag(lam)

    # Newton: quadratic convergence from 0 in ~10 steps on this problem
    w = newton(
        lambda w: Xt.T @ (torch.sigmoid(Xt @ w) - yt) / n_train + lam * w,
        hessian,
        torch.zeros(d, dtype=torch.float64),
        tol=1e-10,
        max_iter=50,
    ).x
    H = hessian(w)
    v = Xv.T @ (torch.sigmoid(Xv @ w) - yv) / n_val
    exact = -(lam * w) * torch.linalg.solve(H, v)
    evals = torch.linalg.eigvalsh(H)
    out = {
        "X_train": Xt,
        "y_train": yt,
        "X_val": Xv,
        "y_val": yv,
        "w_star": w,
        "log_lam": log_lam,
        "exact": exact,
        "alpha": 1.0 / evals[-1],
        "lambda_min": evals[0],
        "lambda_max": evals[-1],
    }
    return {k: t.to(dtype) for k, t in out.items()}


def logistic_losses(p: dict[str, Tensor]) -> tuple[LossFn, LossFn]:
    Xt, yt, Xv, yv = p["X_train"], p["y_train"], p["X_val"], p["y_val"]

    def inner(w: Tree, h: Tree) -> Tensor:
        return F.binary_cross_entropy_with_logits(Xt @ w["w"], yt) + 0.5 * torch.sum(
            h["log_lam"].exp() * w["w"] ** 2
        )

    def outer(w: Tree, h: Tree) -> Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ w["w"], yv)

    return inner, outer


def make_mlp(
    sizes: tuple[int, ...] = (784, 1024, 1024, 10),
    batch: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Weights (He init), per-weight log decays and a training and a validation batch (random data)."""
    gen = torch.Generator().manual_seed(seed)
    params: Tree = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"W{i}"] = torch.randn(a, b, generator=gen, dtype=dtype) * math.sqrt(2.0 / a)
        params[f"b{i}"] = torch.zeros(b, dtype=dtype)
    hparams = {f"log_wd.{k}": torch.full_like(v, math.log(1e-4)) for k, v in params.items()}
    x = torch.randn(2 * batch, sizes[0], generator=gen, dtype=dtype)
    y = torch.randint(0, sizes[-1], (2 * batch,), generator=gen)
    return {
        "params": params,
        "hparams": hparams,
        "x": x[:batch],
        "y": y[:batch],
        "xv": x[batch:],
        "yv": y[batch:],
        "n_layers": len(sizes) - 1,
    }


def mlp_losses(m: dict[str, Any]) -> tuple[LossFn, LossFn]:
    L = m["n_layers"]

    def f(w: Tree, x: Tensor) -> Tensor:
        for i in range(L):
            x = x @ w[f"W{i}"] + w[f"b{i}"]
            if i < L - 1:
                x = torch.relu(x)
        return x

    def inner(w: Tree, h: Tree) -> Tensor:
        decay = sum(
            (torch.sum(h[f"log_wd.{k}"].exp() * v * v) for k, v in w.items()),
            torch.zeros((), dtype=m["x"].dtype),
        )
        return F.cross_entropy(f(w, m["x"]), m["y"]) + 0.5 * decay

    def outer(w: Tree, h: Tree) -> Tensor:
        return F.cross_entropy(f(w, m["xv"]), m["yv"])

    return inner, outer


# ------------------------------------------------------------------------------- plain baselines
def plain_implicit(
    inner: LossFn, outer: LossFn, params: Tree, hparams: Tree, *, method: str, iters: int, alpha: float
) -> Tree:
    """The reference loop: ``∂L_T/∂w`` graph built once, textbook CG (``iters`` HVPs, no early stop) or
    Neumann (``iters`` terms, ``iters − 1`` HVPs), one mixed VJP. No checks, no bookkeeping."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    lam = {k: v.detach().clone().requires_grad_(True) for k, v in hparams.items()}
    wl, ll = list(w.values()), list(lam.values())
    g = torch.autograd.grad(inner(w, lam), wl, create_graph=True)
    v = torch.autograd.grad(outer(w, lam), wl, allow_unused=True)
    v = tuple(torch.zeros_like(x) if t is None else t for x, t in zip(wl, v, strict=True))

    def hvp(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return torch.autograd.grad(g, wl, u, retain_graph=True)

    def dot(a: Iterable[Tensor], b: Iterable[Tensor]) -> Tensor:
        return sum(
            (torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)),
            torch.zeros((), dtype=wl[0].dtype),
        )

    with torch.no_grad():
        if method == "cg":
            p = [torch.zeros_like(t) for t in v]
            r = [t.clone() for t in v]
            d = [t.clone() for t in v]
            rs = dot(r, r)
            for _ in range(iters):
                hd = hvp(tuple(d))
                a = rs / dot(d, hd)
                for pi, di, ri, hi in zip(p, d, r, hd, strict=True):
                    pi.add_(a * di)
                    ri.sub_(a * hi)
                rs_new = dot(r, r)
                d = [ri + (rs_new / rs) * di for ri, di in zip(r, d, strict=True)]
                rs = rs_new
        else:
            term = [t.clone() for t in v]
            acc = [t.clone() for t in v]
            for _ in range(iters - 1):
                hv = hvp(tuple(term))
                term = [t - alpha * h for t, h in zip(term, hv, strict=True)]
                for a_, t in zip(acc, term, strict=True):
                    a_.add_(t)
            p = [alpha * a_ for a_ in acc]
    mixed = torch.autograd.grad(g, ll, p, allow_unused=True)
    return {
        k: (torch.zeros_like(x) if m is None else -m) for (k, x), m in zip(lam.items(), mixed, strict=True)
    }


def plain_unrolled(
    inner: LossFn, outer: LossFn, params: Tree, hparams: Tree, *, steps: int, alpha: float
) -> Tree:
    lam = {k: v.detach().clone().requires_grad_(True) for k, v in hparams.items()}
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(steps):
        g = torch.autograd.grad(inner(w, lam), list(w.values()), create_graph=True)
        w = {k: x - alpha * gk for (k, x), gk in zip(w.items(), g, strict=True)}
    out = torch.autograd.grad(outer(w, lam), list(lam.values()))
    return dict(zip(lam, out, strict=True))


def train_step(inner: LossFn, params: Tree, hparams: Tree) -> Tree:
    """One training step's derivative work: forward and backward of ``L_T`` (the memory reference)."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    g = torch.autograd.grad(inner(w, hparams), list(w.values()))
    return dict(zip(w, g, strict=True))


# ------------------------------------------------------------------------------------ measurement
@dataclass
class Result:
    """One measured case. ``peak_mem_bytes`` is the extra resident (or CUDA) memory of one call."""

    problem: str
    case: str
    median_s: float | None
    times_s: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    cosine: float | None = None
    rel_err: float | None = None
    hvps: int | None = None
    status: str = "ok"
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def measure(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> tuple[Any, list[float], int | None]:
    """Warm up once, then time ``repeats`` calls; returns (last result, times, peak extra memory)."""
    cuda = device.startswith("cuda")
    result = fn()
    times: list[float] = []
    peak: int | None = None
    for _ in range(repeats):
        base: int | None = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                base = _status_kib("VmRSS") * 1024
            except (OSError, KeyError):
                base = None
        t0 = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if base is not None:
            now = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
            peak = max(peak or 0, now - base)
    return result, times, peak


def run_case(spec: dict[str, Any]) -> Result:
    """Run one case in this process (the subprocess entry point). ``spec`` names problem and case."""
    torch.set_num_threads(int(spec.get("threads", 2)))
    device = spec.get("device", "cpu")
    repeats = int(spec.get("repeats", 5))
    problem, case = spec["problem"], spec["case"]
    # weights_only: a problem file holds tensors and plain values only, so loading it runs no code
    data: dict[str, Any] = load_checkpoint(
        spec["data"],
        what="bench problem file",
        fix="write it again with make_logistic / make_mlp and torch.save",
    )
    hvps: int | None = None

    def to_dev(t: Tree) -> Tree:
        return {k: v.to(device) for k, v in t.items()}

    if problem in ("logistic", "unrolled"):
        data = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in data.items()}
        inner, outer = logistic_losses(data)
        params, hparams = {"w": data["w_star"]}, {"log_lam": data["log_lam"]}
        alpha = float(data["alpha"])
        exact: Tree | None = {"log_lam": data["exact"]}
    else:
        data["params"], data["hparams"] = to_dev(data["params"]), to_dev(data["hparams"])
        for k in ("x", "y", "xv", "yv"):
            data[k] = data[k].to(device)
        inner, outer = mlp_losses(data)
        params, hparams = data["params"], data["hparams"]
        alpha = float(spec.get("alpha", 1e-2))
        exact = None
    iters = int(spec.get("iters", 20))
    steps = int(spec.get("steps", 100))
    start = params
    if problem == "unrolled":
        start = {"w": torch.zeros_like(params["w"])}  # a cold start: the path matters

    def ours(method: hg.Method, **kw: Any) -> Callable[[], Tree]:
        def call() -> Tree:
            nonlocal hvps
            g, info = hg.hypergradient(
                outer, inner, start, hparams, method=method, return_info=True, residual=False, **kw
            )
            hvps = info.hvps
            return g

        return call

    fns: dict[str, Callable[[], Tree]] = {
        "plain-cg": lambda: plain_implicit(
            inner, outer, params, hparams, method="cg", iters=iters, alpha=alpha
        ),
        "plain-neumann": lambda: plain_implicit(
            inner, outer, params, hparams, method="neumann", iters=iters, alpha=alpha
        ),
        "cg": ours(hg.CG(iters=iters, tol=0.0)),
        "neumann": ours(hg.Neumann(iters=iters, alpha=alpha)),
        "auto": ours(hg.Auto()),
        "plain-unrolled": lambda: plain_unrolled(inner, outer, start, hparams, steps=steps, alpha=alpha),
        "unrolled": ours(hg.Unrolled(steps=steps, lr=alpha)),
        "unrolled-checkpoint": ours(hg.Unrolled(steps=steps, lr=alpha, checkpoint=True)),
        "train-step": lambda: train_step(inner, params, hparams),
    }
    if case not in fns:
        raise ValueError(f"unknown case {case!r}; one of {sorted(fns)}")
    g, times, peak = measure(fns[case], repeats, device)
    cos = err = None
    if exact is not None and case != "train-step" and problem == "logistic":
        cos, err = cosine(g, exact), rel_dist(g, exact)
    return Result(
        problem,
        case,
        statistics.median(times),
        times,
        peak,
        cos,
        err,
        hvps,
        params={k: v for k, v in spec.items() if k not in ("data",)},
    )


def run_isolated(spec: dict[str, Any], *, timeout: float = 1800.0) -> Result:
    """:func:`run_case` in a fresh interpreter, so its peak memory is its own."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096", "OMP_NUM_THREADS": str(spec.get("threads", 2))}
    module = "hypergradients.app.experiments.bench"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Result(
            spec["problem"], spec["case"], None, status="timeout", note=f"over {timeout:.0f} s", params=spec
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(spec["problem"], spec["case"], None, status="error", note=tail, params=spec)
    return Result(**json.loads(lines[-1]))


# ------------------------------------------------------------------------------- the settings
SCHEMA: dict[str, Option] = {
    "logistic.d": Option(1000, "logistic problem: weights (= hyperparameters)", int, low=1),
    "logistic.n_train": Option(3000, "logistic problem: training examples", int, low=1),
    "logistic.n_val": Option(1000, "logistic problem: validation examples", int, low=1),
    "mlp.sizes": Option([784, 1024, 1024, 10], "MLP layer sizes, input to output", list, item=int, low=1),
    "mlp.batch": Option(256, "MLP batch (training and validation)", int, low=1),
    "mlp.dtype": Option(
        "float32",
        "MLP dtype (float64 doubles time and memory; the ratios do not depend on it)",
        str,
        choices=("float32", "float64"),
    ),
    "iters": Option(20, "CG iterations / Neumann terms", int, low=1),
    "unrolled.steps": Option([100], "unrolled steps K (one case each)", list, item=int, low=1, nonempty=True),
    "repeats": Option(5, "timed runs per case (after one warm-up)", int, low=1),
    "threads": Option(2, "CPU threads per case", int, low=1),
    "device": Option("cpu", "torch device: cpu, cuda, cuda:1, ...", str),
}
# Tiny problems: a test of the set-up, mostly interpreter start-up (--smoke; Suite.smoke()).
SMOKE: dict[str, Any] = {
    "logistic.d": 50,
    "logistic.n_train": 200,
    "logistic.n_val": 100,
    "mlp.sizes": [20, 32, 32, 3],
    "mlp.batch": 32,
    "iters": 5,
    "unrolled.steps": [10],
    "repeats": 2,
}


@dataclass
class Suite:
    """Settings of ``hypergradients bench``, each read from :data:`SCHEMA`; :meth:`smoke` is small enough
    for tests."""

    d: int = setting(SCHEMA, "logistic.d")
    n_train: int = setting(SCHEMA, "logistic.n_train")
    n_val: int = setting(SCHEMA, "logistic.n_val")
    mlp_sizes: tuple[int, ...] = setting(SCHEMA, "mlp.sizes")
    mlp_batch: int = setting(SCHEMA, "mlp.batch")
    mlp_dtype: str = setting(SCHEMA, "mlp.dtype")
    iters: int = setting(SCHEMA, "iters")
    unrolled_steps: tuple[int, ...] = setting(SCHEMA, "unrolled.steps")
    repeats: int = setting(SCHEMA, "repeats")
    threads: int = setting(SCHEMA, "threads")
    device: str = setting(SCHEMA, "device")

    @classmethod
    def smoke(cls, **overrides: Any) -> Suite:
        """The ``--smoke`` suite (:data:`SMOKE`), with ``overrides``."""
        return settings(cls, SCHEMA, resolve(SCHEMA, smoke=SMOKE), **overrides)

    def cases(self) -> list[tuple[str, str, dict[str, Any]]]:
        out: list[tuple[str, str, dict[str, Any]]] = []
        for c in ("plain-cg", "cg", "plain-neumann", "neumann", "auto"):
            out.append(("logistic", c, {"iters": self.iters}))
        for c in ("train-step", "plain-neumann", "neumann"):
            out.append(("mlp", c, {"iters": self.iters}))
        for K in self.unrolled_steps:
            for c in ("plain-unrolled", "unrolled", "unrolled-checkpoint"):
                out.append(("unrolled", c, {"steps": K}))
        return out


def run_suite(
    suite: Suite,
    *,
    workdir: str | None = None,
    progress: Callable[[Sequence[Any]], Iterable[Any]] | None = None,
) -> list[Result]:
    """Build the problems once, then every case of ``suite`` in its own subprocess."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        lp = Path(tmp) / "logistic.pt"
        mp = Path(tmp) / "mlp.pt"
        torch.save(make_logistic(suite.d, suite.n_train, suite.n_val), lp)
        torch.save(make_mlp(suite.mlp_sizes, suite.mlp_batch, dtype=getattr(torch, suite.mlp_dtype)), mp)
        cases = suite.cases()
        it: Iterable[Any] = progress(cases) if progress else cases
        results = []
        for problem, case, extra in it:
            spec = {
                "problem": problem,
                "case": case,
                "data": str(mp if problem == "mlp" else lp),
                "repeats": suite.repeats,
                "threads": suite.threads,
                "device": suite.device,
                **extra,
            }
            results.append(run_isolated(spec))
    return results


def ratios(results: list[Result]) -> dict[str, float]:
    """Our time (and memory) over the plain loop's, per comparable pair, from one run."""
    by = {(r.problem, r.case, r.params.get("steps")): r for r in results}
    out: dict[str, float] = {}
    pairs = [
        ("logistic", "cg", "plain-cg", None),
        ("logistic", "neumann", "plain-neumann", None),
        ("mlp", "neumann", "plain-neumann", None),
    ]
    pairs += [
        ("unrolled", c, "plain-unrolled", r.params.get("steps"))
        for r in results
        if r.problem == "unrolled" and r.case in ("unrolled", "unrolled-checkpoint")
        for c in [r.case]
    ]
    for problem, ours_c, base_c, steps in pairs:
        a, b = by.get((problem, ours_c, steps)), by.get((problem, base_c, steps))
        if a and b and a.median_s and b.median_s:
            tag = f"{problem}/{ours_c}" + (f"@{steps}" if steps else "")
            out[f"time {tag}"] = a.median_s / b.median_s
            if a.peak_mem_bytes and b.peak_mem_bytes:
                out[f"mem {tag}"] = a.peak_mem_bytes / b.peak_mem_bytes
    step = by.get(("mlp", "train-step", None))
    neu = by.get(("mlp", "neumann", None))
    if step and neu and step.peak_mem_bytes and neu.peak_mem_bytes:
        out["mem mlp/neumann vs one training step"] = neu.peak_mem_bytes / step.peak_mem_bytes
    return out


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def suite_of(cfg: Config) -> Suite:
    """The :class:`Suite` of a resolved configuration (dotted keys of :data:`SCHEMA`)."""
    return settings(Suite, SCHEMA, cfg)


def check(cfg: Config) -> Suite:
    """The device exists and the MLP has layers, before any work."""
    if len(cfg["mlp.sizes"]) < 2:
        raise ConfigError(
            f"config key 'mlp.sizes': got {cfg['mlp.sizes']!r}; give at least an input and an "
            "output size, e.g. [784, 1024, 1024, 10]"
        )
    try:
        dev = torch.device(cfg["device"])
    except RuntimeError:
        raise ConfigError(
            f"config key 'device': got {cfg['device']!r}; expected a torch device such as cpu, cuda or cuda:1"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {cfg['device']!r} asked for, but torch sees no CUDA device; use device cpu"
        )
    return suite_of(cfg)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(x) < 1024:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.2f} GiB"


def _table(results: list[Any]) -> str:
    head = (
        f"{'problem':9s} {'case':20s} {'K':>5s} {'median ms':>10s} {'peak mem':>10s} {'cosine':>9s} "
        f"{'HVPs':>5s}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        # Auto chooses its own iterations; a training step has none.
        k = "-" if r.case in ("auto", "train-step") else r.params.get("steps", r.params.get("iters", ""))
        if r.status != "ok":
            lines.append(f"{r.problem:9s} {r.case:20s} {k!s:>5s} {r.status}: {r.note}")
            continue
        cos = "-" if r.cosine is None else f"{r.cosine:.6f}"
        hv = "-" if r.hvps is None else str(r.hvps)
        lines.append(
            f"{r.problem:9s} {r.case:20s} {k!s:>5s} {r.median_s * 1e3:10.2f} "
            f"{_fmt_bytes(r.peak_mem_bytes):>10s} {cos:>9s} {hv:>5s}"
        )
    return "\n".join(lines)


def run(ctx: RunContext) -> ExperimentResult:
    """Every case of the suite, each in its own subprocess (with the ``threads`` setting); writes
    ``bench.json`` and ``report.md``."""
    from ..progress import Progress  # the case runner's subprocess imports this module: kept light
    from .shared import begin, finish

    t0 = time.perf_counter()
    suite: Suite = begin(ctx, check)

    def progress(cases: Sequence[Any]) -> Iterable[Any]:
        with Progress(len(cases), desc="bench", unit="case", enabled=ctx.progress) as bar:
            for case in cases:
                yield case
                bar.update()

    results = run_suite(suite, progress=progress)
    found = ratios(results)
    text = _table(results)
    if found:
        text += "\n\nratios from this run (ours / plain autograd loop; < 1 is better):\n" + "\n".join(
            f"  {k:45s} {v:6.3f}" for k, v in found.items()
        )
    failed = [f"{r.problem}/{r.case}: {r.status} ({r.note})" for r in results if r.status != "ok"]
    columns = ["problem", "case", "median_s", "peak_mem_bytes", "cosine", "hvps", "status"]
    body = [
        f"Median of {suite.repeats} timed runs after a warm-up, each case in its own subprocess; peak "
        "extra memory of one call; cosine to the exact hypergradient. All numbers in `bench.json`.",
        "",
        "```",
        text,
        "```",
    ]
    rows = [{c: getattr(r, c) for c in columns} for r in results]
    return finish(
        ctx,
        t0,
        title=f"bench: what a hypergradient costs on {suite.device} ({suite.threads} threads per case)",
        columns=columns,
        rows=rows,
        notes=[f"failed: {f}" for f in failed],
        result={"suite": asdict(suite), "results": as_json(results), "ratios": found},
        result_name="bench.json",
        body=body,
        text=text,
        exit_code=1 if failed else 0,
    )


EXPERIMENT = Experiment(
    name="bench",
    summary="time, memory and accuracy of our hypergradient methods against a plain autograd loop (each "
    "case in its own subprocess)",
    schema=SCHEMA,
    smoke=SMOKE,
    run=run,
    check=check,
    resumable=False,
)


if __name__ == "__main__":  # the subprocess entry point of run_isolated
    res = run_case(json.loads(sys.argv[1]))
    print(json.dumps(asdict(res)))
