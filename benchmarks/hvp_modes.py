"""Which Hessian-vector product is fastest, and does ``torch.compile`` pay off? (measured)

    .venv/bin/python benchmarks/hvp_modes.py [--problem benchmarks/results/problem.npz]

On the benchmark's logistic problem, 20 chained HVPs ``u ← Hu/‖Hu‖`` three ways, in one process,
one warm-up then the median of 5:

* reverse: the ``∂L_T/∂w`` graph built once (``create_graph=True``), then ``autograd.grad(g, w, u)``
  per product — the library's default (``hvp_mode="reverse"``);
* forward-over-reverse, eager: ``torch.func.jvp`` of ``torch.func.grad`` (``hvp_mode="forward"``);
* forward-over-reverse under ``torch.compile``.

It also reports whether ``torch.compile`` accepts the double backward of the default path.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default=str(HERE / "results" / "problem.npz"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    z = np.load(args.problem)
    Xt, yt = torch.from_numpy(z["X_train"]), torch.from_numpy(z["y_train"])
    w0, ll0 = torch.from_numpy(z["w_star"]), torch.from_numpy(z["log_lam"])

    def inner(w: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(Xt @ w, yt) + 0.5 * torch.sum(ll.exp() * w**2)

    def hvp_fwd(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.jvp(lambda x: torch.func.grad(inner)(x, ll0), (w,), (u,))[1]
        return out

    def chain(h: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        u = torch.ones_like(w0)
        for _ in range(20):
            u = h(w0, u)
            u = u / u.norm()
        return u

    def reverse(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = inner) -> torch.Tensor:
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(w, ll0), w, create_graph=True)
        u = torch.ones_like(w0)
        for _ in range(20):
            u = torch.autograd.grad(g, w, u, retain_graph=True)[0]
            u = u / u.norm()
        return u

    try:
        reverse(torch.compile(inner))
        print("torch.compile + double backward: runs")
    except RuntimeError as e:
        print(f"torch.compile + double backward: fails ({str(e).splitlines()[0]})")
    compiled = torch.compile(hvp_fwd)
    t0 = time.perf_counter()
    chain(compiled)
    print(f"compile time of the forward-over-reverse HVP: {time.perf_counter() - t0:.1f} s")
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "reverse, graph built once": reverse,
        "forward-over-reverse, eager": lambda: chain(hvp_fwd),
        "forward-over-reverse, torch.compile": lambda: chain(compiled),
    }
    for name, f in cases.items():
        f()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        print(f"{name:38s} {statistics.median(ts) * 1e3:8.1f} ms / 20 HVPs")


if __name__ == "__main__":
    main()
