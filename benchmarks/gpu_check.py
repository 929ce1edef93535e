"""GPU check: does what runs on the CPU also run, and agree, on CUDA?

    python benchmarks/gpu_check.py                             # `make gpu-check`: one GPU, < 10 minutes
    python benchmarks/gpu_check.py --device cpu --size tiny    # the same code paths on the CPU, seconds

Three parts, one row per case in a markdown table on stdout and in ``--json`` (default
``runs/gpu_check.json``):

* ``method``: every hypergradient method (Exact, CG, Neumann, Identity, Nystrom, Auto, Unrolled,
  Forward, and ``root_hypergradient`` with GMRES) on a logistic regression with one log-L2 decay per
  feature at its optimum (Newton, float64), computed on the device and on the CPU in the same dtype.
  The two run the same algorithm with the same iteration counts (tolerances 0, so no stopping rule
  can stop them at different iterations) and differ only by the order of floating-point operations:
  a perturbation of a few machine epsilons per operation, amplified by the conditioning of H and by
  the iterations. The row passes when ``‖g_device − g_cpu‖ / ‖g_cpu‖ ≤ TOL[dtype]``, float64 1e-9
  and float32 1e-3 (about 5e6 and 8e3 epsilons). Beside it, for scale, how far the CPU's own answer
  moves when the data and weights move by one unit in the last place: far below the tolerance for
  every method, so a row over it is a device's error, not rounding. Time: median of 3 calls after a
  warm-up; peak memory: ``torch.cuda.max_memory_allocated`` over those calls (the problem's data
  included).
* ``lstm``: an LSTM language model with a log-L2 decay per weight tensor. cuDNN's LSTM has no double
  backward, so on CUDA the default ``hvp_mode="reverse"`` must either raise the library's error (which
  names ``hvp_mode="finite-difference"``; status ``refused``) or agree; ``hvp_mode="finite-difference"``
  must agree with the CPU float64 reverse-mode hypergradient within LSTM_TOL[dtype] (float64 1e-6:
  central differences err by about ε² ≈ eps^(2/3) ≈ 4e-11 relative, and the solve amplifies it;
  float32 2e-2: eps^(2/3) ≈ 2e-5, amplified, and cuDNN may compute float32 in TF32).
* ``experiment``: ``hypergradients run weight-decay`` (the main job, default configuration), one
  round of ``families`` (it has no ``config=full``), and one round of each experiment's
  ``config=full`` on the device, through the command line. Where the full data is absent (MNIST,
  CIFAR-10 or PTB in ``data.root``) the run is shrunk with ``--set`` and the row says so. Time: the
  whole run; peak memory as above.

Status: ``ok``; ``FAIL`` (a wrong answer, or an error other than the library's refusal);
``refused`` (the library declined with its documented error: a limitation to decide on, not a
wrong answer); ``skipped`` (the time budget ran out). Exit status 1 when a row FAILs, else 0; with
``--device cuda`` on a machine without CUDA it prints that it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOL = {torch.float64: 1e-9, torch.float32: 1e-3}
LSTM_TOL = {torch.float64: 1e-6, torch.float32: 2e-2}
DTYPES = (torch.float64, torch.float32)


@dataclass(frozen=True)
class Size:
    """Problem sizes: the logistic regression (``n`` training rows, ``n_val`` validation rows, ``d``
    features and decays), the path methods' ``steps``, the LSTM (vocabulary, embedding, hidden
    units, batch, sequence length) and whether the experiments run ``--smoke`` (tiny: code paths only)."""

    n: int
    n_val: int
    d: int
    steps: int
    iters: int
    vocab: int
    embed: int
    hidden: int
    batch: int
    seq: int
    smoke: bool
    repeats: int


SIZES = {
    "full": Size(
        n=4000,
        n_val=1000,
        d=400,
        steps=20,
        iters=50,
        vocab=200,
        embed=32,
        hidden=64,
        batch=32,
        seq=20,
        smoke=False,
        repeats=3,
    ),
    "tiny": Size(
        n=40,
        n_val=20,
        d=6,
        steps=3,
        iters=4,
        vocab=12,
        embed=4,
        hidden=5,
        batch=3,
        seq=4,
        smoke=True,
        repeats=1,
    ),
}


@dataclass
class Row:
    part: str
    case: str
    dtype: str = "-"
    status: str = "ok"
    error: float | None = None  # relative error against the CPU
    tol: float | None = None
    ms: float | None = None  # per hypergradient (method, lstm) or per run (experiment)
    peak_mb: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _flat(g: dict[str, Tensor]) -> Tensor:
    return torch.cat([g[k].detach().double().cpu().reshape(-1) for k in sorted(g)])


def rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """``‖a − b‖ / ‖b‖`` over all entries, in float64 on the CPU."""
    fa, fb = _flat(a), _flat(b)
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-300))


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float, float | None]:
    """``fn()`` once to warm up, then ``repeats`` times: its last value, the median ms and the peak MB."""
    fn()
    _reset_peak(device)
    times = []
    out = None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times), _peak_mb(device)


# ---- part 1: the methods on a logistic regression --------------------------------------------------


@dataclass
class Logistic:
    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    w: Tensor
    log_decay: Tensor
    lam_max: float

    def to(self, device: torch.device, dtype: torch.dtype) -> Logistic:
        X, y, Xv, yv, w, log_decay = (
            t.to(device, dtype) for t in (self.X, self.y, self.Xv, self.yv, self.w, self.log_decay)
        )
        return Logistic(X, y, Xv, yv, w, log_decay, self.lam_max)


def logistic(size: Size, seed: int = 0) -> Logistic:
    """Binary logistic regression, decay ``exp(log_decay_j)`` per feature; weights at the optimum
    (Newton in float64 to ``‖∇L_T‖ < 1e-12``) and ``λ_max(H)`` there."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    w_true = torch.randn(size.d, generator=g, dtype=dt) * 2
    X = torch.randn(size.n, size.d, generator=g, dtype=dt) / math.sqrt(size.d)
    Xv = torch.randn(size.n_val, size.d, generator=g, dtype=dt) / math.sqrt(size.d)
    y = (torch.rand(size.n, generator=g, dtype=dt) < torch.sigmoid(X @ w_true)).to(dt)
    yv = (torch.rand(size.n_val, generator=g, dtype=dt) < torch.sigmoid(Xv @ w_true)).to(dt)
    log_decay = torch.empty(size.d, dtype=dt).uniform_(-5.0, -2.0, generator=g)
    w = torch.zeros(size.d, dtype=dt)
    for _ in range(100):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (p - y) / size.n + log_decay.exp() * w
        if float(grad.norm()) < 1e-12:
            break
        H = (X.T * (p * (1 - p))) @ X / size.n + torch.diag(log_decay.exp())
        w = w - torch.linalg.solve(H, grad)
    p = torch.sigmoid(X @ w)
    H = (X.T * (p * (1 - p))) @ X / size.n + torch.diag(log_decay.exp())
    return Logistic(X, y, Xv, yv, w, log_decay, float(torch.linalg.eigvalsh(H)[-1]))


def method_cases(size: Size, lam_max: float) -> list[tuple[str, Any]]:
    """Every method with fixed iteration counts (tolerance 0): the device and the CPU iterate alike."""
    import hypergradients as hg

    lr = 1.0 / lam_max  # inside 0 < lr < 2/λ_max: the path converges
    k = size.iters
    return [
        ("Exact", hg.Exact()),
        ("CG", hg.CG(iters=k, tol=0.0)),
        ("Neumann", hg.Neumann(iters=k, alpha="auto", power_iters=k)),
        ("Identity", hg.Identity()),
        ("Nystrom", hg.Nystrom(rank=min(20, size.d))),
        ("Auto", hg.Auto(tol=0.0, max_iters=k, error_tol=None)),
        ("Unrolled", hg.Unrolled(steps=size.steps, lr=lr)),
        ("Forward", hg.Forward(steps=size.steps, lr=lr)),
        ("root_hypergradient GMRES", hg.GMRES(iters=k, tol=0.0, restart=min(30, k))),
    ]


def hypergradient_fn(prob: Logistic, method: Any) -> Callable[[], dict[str, Tensor]]:
    import hypergradients as hg

    X, y, Xv, yv = prob.X, prob.y, prob.Xv, prob.yv

    def inner(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        penalty = 0.5 * (h["log_decay"].exp() * p["w"] ** 2).sum()
        return F.binary_cross_entropy_with_logits(X @ p["w"], y) + penalty

    def outer(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        return F.binary_cross_entropy_with_logits(Xv @ p["w"], yv)

    def condition(p: dict[str, Tensor], h: dict[str, Tensor]) -> dict[str, Tensor]:
        # F = ∂L_T/∂w written out: the root solver differentiates it once.
        return {"w": X.T @ (torch.sigmoid(X @ p["w"]) - y) / len(y) + h["log_decay"].exp() * p["w"]}

    params, hparams = {"w": prob.w}, {"log_decay": prob.log_decay}
    if isinstance(method, hg.GMRES):
        return lambda: hg.root_hypergradient(outer, condition, params, hparams, method=method)
    return lambda: hg.hypergradient(outer, inner, params, hparams, method=method)


def perturbed(prob: Logistic, seed: int = 1) -> Logistic:
    """``prob`` with its data and weights moved by about one unit in the last place (relative eps
    noise): the size of perturbation that a different order of floating-point operations makes."""
    g = torch.Generator().manual_seed(seed)

    def ulp(t: Tensor) -> Tensor:
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
        return t * (1 + torch.finfo(t.dtype).eps * noise)

    return Logistic(ulp(prob.X), prob.y, ulp(prob.Xv), prob.yv, ulp(prob.w), prob.log_decay, prob.lam_max)


def check_methods(device: torch.device, size: Size) -> list[Row]:
    base = logistic(size)
    rows = []
    for dtype in DTYPES:
        cpu, dev = base.to(torch.device("cpu"), dtype), base.to(device, dtype)
        for name, method in method_cases(size, base.lam_max):
            row = Row("method", name, str(dtype).removeprefix("torch."), tol=TOL[dtype])
            try:
                want = hypergradient_fn(cpu, method)()
                # For scale: how far the CPU's own answer moves when the data move by one ulp.
                row.extra["ulp_sensitivity"] = rel_err(hypergradient_fn(perturbed(cpu), method)(), want)
                row.note = f"CPU, data moved by 1 ulp: {row.extra['ulp_sensitivity']:.0e}"
                got, row.ms, row.peak_mb = timed(hypergradient_fn(dev, method), device, size.repeats)
                row.error = rel_err(got, want)
                row.status = "ok" if row.error <= TOL[dtype] else "FAIL"
            except Exception as e:  # a crash on the device is a finding, not the end of the check
                row.status, row.note = "FAIL", _why(e)
            rows.append(row)
    return rows


# ---- part 2: an LSTM through cuDNN ------------------------------------------------------------------


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(self.embed(x))
        out: Tensor = self.decoder(h)
        return out


def lstm_problem(
    size: Size, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any, dict[str, Tensor], dict[str, Tensor]]:
    """``(inner, outer, params, hparams)`` of the LSTM: the same weights and tokens on every device."""
    import hypergradients as hg

    torch.manual_seed(0)
    model = LanguageModel(size.vocab, size.embed, size.hidden).to(device, dtype)
    # cuDNN computes an LSTM's backward only in training mode; this model has no dropout, so training
    # mode is the same function for both losses.
    model.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, size.vocab, (2, size.batch, size.seq + 1), generator=g).to(device)
    train, val = ((t[:, :-1], t[:, 1:]) for t in tokens)

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def penalty(p: dict[str, Tensor], h: dict[str, Tensor]) -> Tensor:
        return 0.5 * sum(
            (h[k.replace(".", "_")].exp() * (w * w).sum() for k, w in p.items()),
            torch.zeros((), dtype=dtype, device=device),
        )

    inner, outer = hg.make_losses(model, loss, train, val, penalty=penalty, modes=("train", "train"))
    params = hg.module_params(model)
    hparams = {k.replace(".", "_"): torch.tensor(-3.0, dtype=dtype, device=device) for k in params}
    return inner, outer, params, hparams


def check_lstm(device: torch.device, size: Size) -> list[Row]:
    import hypergradients as hg

    method = hg.CG(iters=size.iters, tol=0.0, damping=1.0)  # damped: these weights are not a minimum
    inner, outer, params, hparams = lstm_problem(size, torch.device("cpu"), torch.float64)
    want = hg.hypergradient(outer, inner, params, hparams, method=method)
    rows = []
    for dtype in DTYPES:
        # Whether torch's LSTM takes cuDNN's kernels for this device and dtype (else its own, which
        # have a double backward).
        cudnn = (
            device.type == "cuda"
            and torch.backends.cudnn.enabled
            and torch.backends.cudnn.is_acceptable(torch.zeros(1, device=device, dtype=dtype))
        )
        problem = lstm_problem(size, device, dtype)
        for mode in ("reverse", "finite-difference"):
            row = Row(
                "lstm",
                f"LSTM {'cuDNN' if cudnn else 'native'}, hvp_mode={mode}",
                str(dtype).removeprefix("torch."),
                tol=LSTM_TOL[dtype],
            )

            def call(mode: Any = mode, problem: Any = problem) -> dict[str, Tensor]:
                inner, outer, params, hparams = problem
                return hg.hypergradient(outer, inner, params, hparams, method=method, hvp_mode=mode)

            try:
                got, row.ms, row.peak_mb = timed(call, device, size.repeats)
            except hg.HypergradientError as e:
                refused = mode == "reverse" and "finite-difference" in str(e)
                row.status = "refused" if refused else "FAIL"
                row.note = (
                    "the library's error: no double backward (use hvp_mode='finite-difference')"
                    if refused
                    else _why(e)
                )
            except Exception as e:
                row.status, row.note = "FAIL", _why(e)
            else:
                row.error = rel_err(got, want)
                row.status = "ok" if row.error <= LSTM_TOL[dtype] else "FAIL"
                row.note = "against the CPU float64 reverse-mode hypergradient"
            rows.append(row)
    return rows


# ---- part 3: the command line's experiments ---------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One ``hypergradients run`` on the device: ``sets`` as asked, ``fallback`` where ``check`` finds
    the data absent (``None``: no fallback), ``tiny`` extra settings for ``--size tiny``."""

    name: str
    what: str
    sets: tuple[str, ...] = ()
    fallback: tuple[str, ...] | None = None
    tiny: tuple[str, ...] = ("train.rounds=1",)


ONE = "train.rounds=1"
CASES = (
    Case("weight-decay", "the main job, default configuration"),
    Case("families", "default configuration (it has no config=full), one round", (ONE,)),
    Case("overfit-validation", "config=full, one round", ("config=full", ONE), ("config=cpu", ONE)),
    Case(
        "distill",
        "config=full, one round",
        ("config=full", ONE),
        ("config=full", "data.dataset=mnist-5k", ONE),
    ),
    Case("data-cleaning", "config=full, one round", ("config=full", ONE), ("config=cpu", ONE)),
    Case(
        "lstm-dropout",
        "config=full, one training step and a hyper step, then an evaluation",
        ("config=full", "train.steps=1", "eval_every=1"),
        ("config=full", "data.root={synthetic}", "train.steps=1", "eval_every=1"),
        tiny=("train.steps=2", "eval_every=2"),
    ),  # --smoke's hyper step comes every 2 steps
    # the King James Bible ships with the package: never shrunk; one seed keeps it to 7 arms
    Case(
        "lm-reweight",
        "config=full, one seed, one round",
        ("config=full", "seeds=[0]", ONE),
        tiny=("train.rounds=1", "seeds=[0]"),
    ),
    # Not config=full with data.dataset=mnist-5k: the preset replaces a key left at its default value
    # (mnist-5k is augment's), so that would still ask for CIFAR-10.
    # augment counts inner steps (a round is train.inner_steps of them: 9, the smoke's 2)
    Case(
        "augment",
        "config=full, one round",
        ("config=full", "train.steps=9"),
        ("config=cpu", "model.name=resnet18", "train.steps=9"),
        tiny=("train.steps=2", "model.name=cnn", "seeds=[0]"),
    ),
)


def synthetic_ptb(folder: Path, tokens: int, seed: int = 0) -> Path:
    """``ptb.train.txt``/``ptb.valid.txt``/``ptb.test.txt`` of Zipf-distributed words (10,000 kinds),
    20 per line: text in PTB's format where PTB is absent, to run the full model on the device."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, 10_001, dtype=torch.float64)
    for name, n in (
        ("ptb.train.txt", tokens),
        ("ptb.valid.txt", tokens // 10),
        ("ptb.test.txt", tokens // 10),
    ):
        ids = torch.multinomial(probs, n, replacement=True, generator=g).tolist()
        lines = [" ".join(f"w{i}" for i in ids[s : s + 20]) for s in range(0, n, 20)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _settings(case: Case, size: Size, work: Path) -> tuple[list[str], str]:
    """The ``--set`` values to run, and a note when the full data is absent (then the fallback's)."""
    from hypergradients.app.config import ConfigError, resolve
    from hypergradients.app.datasets import DataFormatError, DataUnavailableError
    from hypergradients.app.experiments import get

    exp = get(case.name)
    smoke = exp.smoke if size.smoke else None
    sets = [*case.sets, *(case.tiny if size.smoke else ())]
    if case.fallback is None:
        return sets, ""
    try:
        exp.check(resolve(exp.schema, smoke=smoke, sets=sets))
        return sets, ""
    except (ConfigError, DataUnavailableError, DataFormatError) as e:
        why = str(e) if len(str(e)) <= 120 else str(e)[:120] + "…"
    folder = work / f"{case.name}-data"
    folder.mkdir(exist_ok=True)
    fallback = [s.replace("{synthetic}", str(folder)) for s in case.fallback]
    if any("{synthetic}" in s for s in case.fallback):
        synthetic_ptb(folder, 2_000 if size.smoke else 200_000)
    return [*fallback, *(case.tiny if size.smoke else ())], f"shrunk to {' '.join(fallback)}: {why}"


def check_experiments(device: torch.device, size: Size, deadline: float) -> list[Row]:
    from hypergradients.app.cli import main as cli
    from hypergradients.app.config import read_toml

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for case in CASES:
            row = Row("experiment", case.name, note=case.what)
            if time.perf_counter() > deadline:
                row.status, row.note = "skipped", "the time budget ran out"
                rows.append(row)
                continue
            try:
                sets, shrunk = _settings(case, size, work)
            except Exception as e:
                row.status, row.note = "FAIL", _why(e)
                rows.append(row)
                continue
            out = work / case.name
            argv = [
                "run",
                case.name,
                "--device",
                device.type,
                "--out",
                str(out),
                "--json",
                "--quiet",
                *(["--smoke"] if size.smoke else []),
                *[a for s in sets for a in ("--set", s)],
            ]
            stdout, stderr = io.StringIO(), io.StringIO()
            _reset_peak(device)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = cli(argv)
                except Exception:  # the command line should turn every error into a status: say so
                    traceback.print_exc()
                    code = -1
            _sync(device)
            row.ms, row.peak_mb = (time.perf_counter() - t0) * 1e3, _peak_mb(device)
            row.extra["argv"] = ["hypergradients", *argv]
            notes = [case.what, shrunk] if shrunk else [case.what]
            if code == 0:
                doc = json.loads(stdout.getvalue())
                row.extra["rows"] = doc["rows"]
                rounds = read_toml(out / "config.toml").get("train.rounds")
                per = [
                    f"{r.get('method', r.get('arm', '?'))} {1e3 * r['wall_s'] / rounds:.0f} ms"
                    for r in doc["rows"]
                    if isinstance(r.get("wall_s"), float) and isinstance(rounds, int)
                ]
                if per and rounds and rounds > 1:
                    notes.append(f"per round ({rounds} rounds): " + ", ".join(per))
            else:
                err = stderr.getvalue().strip().splitlines()
                last = err[-1] if err else f"exit status {code}"
                refused = code == 1 and "finite-difference" in last
                row.status = "refused" if refused else "FAIL"
                notes.append(f"exit {code}: {last[:300]}")
            row.note = "; ".join(notes)
            rows.append(row)
    return rows


# ---- the report -------------------------------------------------------------------------------------


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def _cell(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(rows: Sequence[Row]) -> str:
    head = "| part | case | dtype | status | rel. error vs CPU | tolerance | ms | peak MB | note |"
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        status = f"**{r.status}**" if r.status != "ok" else r.status
        lines.append(
            f"| {r.part} | {r.case} | {r.dtype} | {status} | {_cell(r.error, '.1e')} | "
            f"{_cell(r.tol, '.0e')} | {_cell(r.ms, '.1f')} | {_cell(r.peak_mb, '.1f')} | "
            f"{r.note.replace('|', '/')} |"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import hypergradients as hg

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "hypergradients": hg.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env.update(
            name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        )
    return env


def main(argv: list[str] | None = None) -> int:
    from hypergradients.training.files import json_dumps  # JSON without NaN: a failed row may hold one

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="where to run the cases (cpu: a dry run of the same code, for the tests)",
    )
    ap.add_argument("--size", choices=tuple(SIZES), default="full", help="tiny: seconds, code paths only")
    ap.add_argument(
        "--parts", default="method,lstm,experiment", help="comma-separated parts to run (default: all three)"
    )
    ap.add_argument("--json", default="runs/gpu_check.json", metavar="FILE", help="where the JSON goes")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="experiments not started by then are skipped (default 540: the check < 10 min)",
    )
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"method", "lstm", "experiment"}
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from method, lstm, experiment")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: skipped: torch sees no CUDA device here (run it on a machine with one, or "
            "--device cpu --size tiny for a dry run)"
        )
        return 0
    device = torch.device(args.device)
    size = SIZES[args.size]
    t0 = time.perf_counter()
    rows: list[Row] = []
    if "method" in parts:
        rows += check_methods(device, size)
    if "lstm" in parts:
        rows += check_lstm(device, size)
    if "experiment" in parts:
        rows += check_experiments(device, size, t0 + args.budget_s)
    wall = time.perf_counter() - t0
    table = markdown(rows)
    print(table)
    failed = [r for r in rows if r.status == "FAIL"]
    print(f"\n{len(rows)} rows: {len(rows) - len(failed)} without failure, {len(failed)} FAIL; {wall:.0f} s")
    doc = {
        "environment": environment(device),
        "size": args.size,
        "wall_s": wall,
        "tolerances": {
            "method": {str(k).removeprefix("torch."): v for k, v in TOL.items()},
            "lstm": {str(k).removeprefix("torch."): v for k, v in LSTM_TOL.items()},
        },
        "rows": [asdict(r) for r in rows],
        "markdown": table,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
