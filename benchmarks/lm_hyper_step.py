"""What a hyper step costs against a training step, as the model and the number of hyperparameters grow
(measured): the ``lm-reweight`` experiment's byte-level transformer and its data weights.

    .venv/bin/python benchmarks/lm_hyper_step.py [--quick] [--repeats 3] [--iters 3]

Two sweeps, each case in a fresh subprocess (one thread):

* **model size**: the experiment's :class:`~hypergradients.app.experiments.lm_reweight.TransformerLM`
  from 0.1M to 10M weights (width × blocks), 16 sequences of 32 bytes per batch, one weight per
  training sequence (16,384 hyperparameters);
* **hyperparameters**: the experiment's default model (0.14M weights, batches of 32 sequences of 32
  bytes) with one weight per training sequence (1,024 and 16,384) or per training token (131,072 and
  1,048,576: :class:`~hypergradients.ExampleWeights` indexed by token, the loss per token).

In each case the steps alternate, one warm-up round then ``--repeats`` timed rounds: a training step
(``L_T`` with the weights fixed, backward, an Adam step: the experiment's inner step) and each
method's hyper step (:class:`~hypergradients.HyperOptimizer` with finite-difference products, as the
experiment takes it), so that load drifts on a shared machine hit every method alike. The methods:
Neumann with ``--iters`` terms (a fixed ``α``: the series alone; the experiment's ``α = 1/λ_max`` adds
power iterations when it refreshes), CG with ``--iters`` iterations, the identity preconditioned by the
training step's Adam (``Identity(precondition="inner_optimizer")``, SAMA-style: no HVP) and
:class:`~hypergradients.FirstOrder` with ``--iters`` steps (central, warm-started as
``HyperOptimizer`` does by default: ``4·iters + 5`` gradients, no HVP).
Reported per case and method: the median wall and CPU seconds of a hyper step, their ratio to the
training step's median, its Hessian-vector products (and, for the first-order step, gradient
evaluations), and the peak memory above the start of the step, measured in a second process (the
kernel's resident high-water mark reset before each step, ``VmHWM − VmRSS``, with
``MALLOC_MMAP_THRESHOLD_=4096`` so that freed buffers leave the process, as
``benchmarks/peers/_common.py`` measures; that allocator setting slows every step, so the times come
from the first process). Writes ``benchmarks/results/lm_hyper_step.json`` and
``docs/figures/lm_hyper_step.png`` and prints the markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (width, blocks, heads): about 0.14M, 0.66M, 1.9M, 4.9M and 10.8M weights
SIZES = [(64, 2, 4), (128, 3, 4), (192, 4, 6), (256, 6, 8), (384, 6, 6)]
# (kind, sequences): one weight per sequence, or per token (sequences × 32)
HPARAMS = [("sequence", 1024), ("sequence", 16384), ("token", 4096), ("token", 32768)]
SEQ_LEN = 32


def _weights(size: tuple[int, int, int]) -> int:
    """The weights of the experiment's transformer of this (width, blocks, heads) at ``SEQ_LEN``."""
    width, blocks, _ = size
    block = 12 * width * width + 13 * width  # qkv, proj, fc, out (+ biases), two layer norms
    return 256 * width + SEQ_LEN * width + blocks * block + 2 * width + 256 * width + 256


def _kb(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m[1]) if m else 0


def _measure(fn: Any) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak MB above the start of one call of ``fn``."""
    Path("/proc/self/clear_refs").write_text("5")
    rss = _kb("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return wall, cpu, (_kb("VmHWM") - rss) / 1024


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case, in this process: the training step and every method's hyper step, interleaved."""
    import torch
    import torch.nn.functional as F

    import hypergradients as hg
    from hypergradients.app.experiments.lm_reweight import TransformerLM, sequence_loss
    from hypergradients.hparams.objective import on_targets

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width, blocks, heads = case["model"]
    kind, n_seq, batch, iters = case["kind"], case["sequences"], case["batch"], case["iters"]
    net = TransformerLM(seq_len=SEQ_LEN, width=width, layers=blocks, heads=heads)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (n_seq, SEQ_LEN + 1), generator=g)
    val = torch.randint(0, 256, (2 * batch, SEQ_LEN + 1), generator=g)
    if kind == "token":  # one weight per training token: the loss per token, indexed by token
        n_hp = n_seq * SEQ_LEN

        def token_loss(out: torch.Tensor, b: Any) -> torch.Tensor:
            return F.cross_entropy(out.transpose(1, 2), b.y, reduction="none").reshape(-1)

        loss_fn: Any = token_loss

        def batch_at(i: torch.Tensor) -> tuple[torch.Tensor, ...]:
            tok = (i[:, None] * SEQ_LEN + torch.arange(SEQ_LEN)[None, :]).reshape(-1)
            return data[i, :-1], data[i, 1:], tok
    else:
        n_hp = n_seq
        loss_fn = on_targets(sequence_loss)

        def batch_at(i: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return data[i, :-1], data[i, 1:], i

    methods: dict[str, Any] = {
        # a fixed α, small enough for these models' λ_max (≈ 50 at the start): the cost of the series
        # alone (the experiment's α = 1/λ_max adds power iterations at every refresh)
        f"Neumann-{iters}": hg.Neumann(iters=iters, alpha=1e-3),
        f"CG-{iters}": hg.CG(iters=iters, tol=1e-12, damping=1e-2),
        "Identity-Adam": hg.Identity(precondition="inner_optimizer"),
        f"FirstOrder-{iters}": hg.FirstOrder(sigma=1e3, steps=iters, lr=1e-3),
    }
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    hypers = {
        name: hg.HyperOptimizer(
            net,
            [hg.ExampleWeights(n_hp)],
            method=m,
            hvp_mode="finite-difference",
            loss_fn=loss_fn,
            inner_optimizer=opt,
        )
        for name, m in methods.items()
    }
    trainer = next(iter(hypers.values()))
    vb = (val[:, :-1], val[:, 1:])

    def train_step(i: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        trainer.train_loss(batch_at(i)).backward()
        opt.step()

    for _ in range(3):  # Adam's moments exist before the first measured step
        train_step(torch.randint(0, n_seq, (batch,), generator=g))
    times: dict[str, list[tuple[float, float, float]]] = {"train": [], **{k: [] for k in hypers}}
    hvps: dict[str, int] = {}
    grads: dict[str, int] = {}
    for rep in range(case["repeats"] + 1):  # round 0 is the warm-up
        i = torch.randint(0, n_seq, (batch,), generator=g)
        t = _measure(lambda i=i: train_step(i))
        if rep:
            times["train"].append(t)
        for name, hyper in hypers.items():
            out: dict[str, Any] = {}
            t = _measure(lambda h=hyper, i=i, o=out: o.update(step=h.step(batch_at(i), vb)))
            if rep:
                times[name].append(t)
                info = out["step"].info
                hvps[name] = info.hvps if info is not None else -1
                grads[name] = int(info.extra.get("gradient_evals", 0)) if info is not None else 0
    med = {
        k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), max(x[2] for x in v))
        for k, v in times.items()
    }
    tw, tc, tm = med["train"]
    rows = []
    for name in hypers:
        w, c, m = med[name]
        rows.append(
            {
                "method": name,
                "hyper_s": w,
                "hyper_cpu_s": c,
                "ratio": w / tw,
                "ratio_cpu": c / tc,
                "peak_mb": m,
                "hvps": hvps[name],
                "gradients": grads[name],
            }
        )
    weights = sum(p.numel() for p in net.parameters())
    return {
        **case,
        "weights": weights,
        "hyperparameters": n_hp,
        "train_s": tw,
        "train_cpu_s": tc,
        "train_peak_mb": tm,
        "methods": rows,
    }


def _run_child(case: dict[str, Any], *, memory: bool) -> dict[str, Any]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    if memory:  # freed buffers go back to the OS: RSS follows the live tensors (slow: timing pass apart)
        env["MALLOC_MMAP_THRESHOLD_"] = "4096"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _child(case: dict[str, Any]) -> dict[str, Any]:
    """The case's times (normal allocator) and its peak memory (a second process, one timed round, every
    buffer of 4 KiB or more mmapped and returned when freed)."""
    timed = _run_child(case, memory=False)
    mem = _run_child({**case, "repeats": 1}, memory=True)
    timed["train_peak_mb"] = mem["train_peak_mb"]
    for row, m in zip(timed["methods"], mem["methods"], strict=True):
        row["peak_mb"] = m["peak_mb"]
    return timed


def _grads(m: dict[str, Any]) -> str:
    return f" ({m['gradients']})" if m.get("gradients") else ""


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| sweep | weights | hyperparameters | method | train step s | hyper step s | × train (wall) "
        "| × train (CPU) | HVPs (gradients) | hyper peak MB | train peak MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for m in r["methods"]:
            lines.append(
                f"| {r['sweep']} | {r['weights']:,} | {r['hyperparameters']:,} ({r['kind']}) | "
                f"{m['method']} | {r['train_s']:.3f} | {m['hyper_s']:.3f} | {m['ratio']:.1f} | "
                f"{m['ratio_cpu']:.1f} | {m['hvps']}{_grads(m)} | {m['peak_mb']:.1f} | "
                f"{r['train_peak_mb']:.1f} |"
            )
    return "\n".join(lines)


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (sweep, xkey, xlabel) in enumerate(
        (("model", "weights", "model weights"), ("hparams", "hyperparameters", "hyperparameters"))
    ):
        rs = [r for r in results if r["sweep"] == sweep]
        names = [m["method"] for m in rs[0]["methods"]] if rs else []
        for name in names:
            xs = [r[xkey] for r in rs]
            ms = [next(m for m in r["methods"] if m["method"] == name) for r in rs]
            axes[0][col].plot(xs, [m["ratio_cpu"] for m in ms], marker="o", label=name)
            axes[1][col].plot(xs, [m["peak_mb"] for m in ms], marker="o", label=name)
        if rs:
            axes[1][col].plot(
                [r[xkey] for r in rs],
                [r["train_peak_mb"] for r in rs],
                "k--",
                marker=".",
                label="training step",
            )
        for row in (0, 1):
            axes[row][col].set_xscale("log")
            axes[row][col].set_xlabel(xlabel)
        axes[0][col].set_ylabel("hyper step / training step (CPU time)")
        axes[0][col].set_ylim(bottom=0)
        axes[1][col].set_ylabel("peak memory above the start (MB)")
        axes[1][col].set_yscale("log")
        axes[0][col].legend(fontsize=8)
    axes[0][0].set_title("model size (16,384 sequence weights)", fontsize=9)
    axes[0][1].set_title("hyperparameters (0.14M-weight model)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="the two smallest cases of each sweep, one repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    ap.add_argument("--iters", type=int, default=3, help="Neumann terms / CG iterations / FirstOrder steps")
    ap.add_argument(
        "--max-weights",
        type=float,
        default=float("inf"),
        help="skip the model sizes above this many weights (the largest take the longest)",
    )
    ap.add_argument("--out", default=str(HERE / "results" / "lm_hyper_step.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "lm_hyper_step.png"))
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    repeats = 1 if args.quick else args.repeats
    sizes, hps = (SIZES[:2], HPARAMS[:2]) if args.quick else (SIZES, HPARAMS)
    # the cheap sweep first, then the models from the smallest: each case is written as it ends
    cases = [
        {"sweep": "hparams", "model": list(SIZES[0]), "kind": k, "sequences": n, "batch": 32} for k, n in hps
    ]
    cases += [
        {"sweep": "model", "model": list(s), "kind": "sequence", "sequences": 16384, "batch": 16}
        for s in sizes
        if _weights(s) <= args.max_weights
    ]
    results = []
    t0 = time.perf_counter()
    for case in cases:
        r = _child({**case, "repeats": repeats, "iters": args.iters})
        results.append(r)
        print(
            f"{case['sweep']} {r['weights']:,} weights, {r['hyperparameters']:,} hyperparameters: train "
            f"{r['train_s']:.3f} s; "
            + "; ".join(f"{m['method']} ×{m['ratio_cpu']:.1f}" for m in r["methods"]),
            file=sys.stderr,
            flush=True,
        )
        load = os.getloadavg()[0]
        out = {
            "cases": results,
            "repeats": repeats,
            "iters": args.iters,
            "seq_len": SEQ_LEN,
            "seconds": time.perf_counter() - t0,
            "load_avg_1min_at_end": load,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        figure(results, Path(args.figure))
    print(table(results))


if __name__ == "__main__":
    main()
