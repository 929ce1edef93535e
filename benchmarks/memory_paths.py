"""Peak memory and time of one path hypergradient through T steps of Adam on minibatches.

    .venv/bin/python benchmarks/memory_paths.py              # writes benchmarks/results/memory_paths.json
    .venv/bin/python benchmarks/memory_paths.py --ts 10 100 --threads 2

Three evaluations of the same derivative (``hg.Unrolled``/``hg.Forward`` with
``optimizer=hg.optim.adam(lr="lr", b1="b1")`` and ``batches=`` one batch per step; hyperparameters:
Adam's learning rate and β₁ and a global log-L2 in the loss, 3 scalars):

* reverse mode (``hg.Unrolled``): the graph of all T steps, memory O(T);
* checkpointed reverse (``hg.Unrolled(checkpoint=True)``): ⌈√T⌉ stored ``(w, m, v)`` and one
  segment's graph, memory O(√T), one extra forward sweep;
* forward mode (``hg.Forward``): one tangent of ``(w, m, v)`` per hyperparameter scalar, memory
  independent of T, cost ∝ the number of hyperparameters.

Adam carries two moments per weight, so each stored point is 3× the weights. Problem: an MLP
64→128→10 (9,610 weights, float64: 75 KiB per copy), batches of 64 random inputs with random
labels, a fresh batch per step. Every case runs in its own interpreter (``--case``), warmed up by a
2-step call; the peak is the first T-step call's extra resident memory (VmHWM after a reset, read as
``hypergradients.app.experiments.bench`` does), the time the second call's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = ("reverse", "checkpoint", "forward")


def _case(mode: str, T: int, threads: int) -> dict[str, object]:
    import hypergradients as hg
    from hypergradients.app.experiments import bench

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    w0 = {
        "w1": torch.randn(64, 128, generator=g, dtype=dt) / 8,
        "b1": torch.zeros(128, dtype=dt),
        "w2": torch.randn(128, 10, generator=g, dtype=dt) / 11,
        "b2": torch.zeros(10, dtype=dt),
    }
    batches = [
        (torch.randn(64, 64, generator=g, dtype=dt), torch.randint(0, 10, (64,), generator=g))
        for _ in range(T)
    ]
    xv, yv = torch.randn(256, 64, generator=g, dtype=dt), torch.randint(0, 10, (256,), generator=g)
    h = {
        "lr": torch.tensor(1e-3, dtype=dt),
        "b1": torch.tensor(0.9, dtype=dt),
        "logwd": torch.tensor(-6.0, dtype=dt),
    }

    def net(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    def inner(
        w: dict[str, torch.Tensor], hp: dict[str, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        l2 = w["w1"].pow(2).sum() + w["w2"].pow(2).sum()
        return torch.nn.functional.cross_entropy(net(w, b[0]), b[1]) + 0.5 * torch.exp(hp["logwd"]) * l2

    def outer(w: dict[str, torch.Tensor], hp: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(net(w, xv), yv)

    opt = hg.optim.adam(lr="lr", b1="b1")

    def make(steps: int) -> hg.Method:
        return {
            "reverse": hg.Unrolled(steps=steps, optimizer=opt, batches=batches),
            "checkpoint": hg.Unrolled(steps=steps, optimizer=opt, batches=batches, checkpoint=True),
            "forward": hg.Forward(steps=steps, optimizer=opt, batches=batches),
        }[mode]

    method = make(T)
    # The peak is the first T-step call's: memory that a T-step warm-up freed would stay in the
    # allocator's free lists and be reused unseen. A 2-step warm-up pays the one-off lazy
    # initialisations (functorch, thread pools) instead and leaves little behind. The time is the
    # second T-step call's.
    hg.hypergradient(outer, inner, w0, h, method=make(2))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = bench._status_kib("VmRSS") * 1024
    hg.hypergradient(outer, inner, w0, h, method=method)
    peak = bench._status_kib("VmHWM") * 1024 - base
    t0 = time.perf_counter()
    result = hg.hypergradient(outer, inner, w0, h, method=method)
    return {
        "mode": mode,
        "T": T,
        "peak_mem_bytes": peak,
        "time_s": time.perf_counter() - t0,
        "hypergradient": {k: float(v) for k, v in result.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_paths.json"))
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(_case(args.case[0], int(args.case[1]), args.threads)))
        return 0
    rows = []
    for T in args.ts:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--case", mode, str(T), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:9.2f} MiB"
            print(f"T={T:5d} {mode:11s} {mem:>14s} {r['time_s']:9.2f} s", flush=True)
    # The three modes are one derivative: report how far apart they are at each T.
    for T in args.ts:
        ref = next(r for r in rows if r["T"] == T and r["mode"] == "reverse")["hypergradient"]
        for r in rows:
            if r["T"] == T:
                num = sum((r["hypergradient"][k] - ref[k]) ** 2 for k in ref) ** 0.5
                den = sum(v**2 for v in ref.values()) ** 0.5
                r["rel_diff_to_reverse"] = num / den
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "problem": "MLP 64-128-10, float64, Adam(lr, b1), batch 64",
                "threads": args.threads,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
