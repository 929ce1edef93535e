"""Our library as a runner of ``benchmarks/peers/run_peers.py``: the same command line and JSON.

    .venv/bin/python benchmarks/hypergradients_runner.py --problem p.npz --method cg --iters 20 --out r.json

Methods (the peers' three, plus two for time to accuracy):

* ``cg``        ``hg.CG(iters=K, tol=0)``: exactly K HVPs, like the peers' textbook CG;
* ``neumann``   ``hg.Neumann(iters=K, alpha=npz alpha)``: K terms, K−1 HVPs;
* ``unrolled``  ``hg.Unrolled(steps=K, lr=alpha)`` from ``w_star``;
* ``auto``      ``hg.Auto()``: method and stopping chosen by the library (one cold hypergradient);
* ``hyperloop`` 20 consecutive hyper steps of Algorithm 1 (``--iters`` is the number of hyper steps):
  at each, ``hg.Auto()`` with a shared ``hg.SolverState`` (warm start), then
  ``log λ ← log λ − 0.1·g/‖g‖_∞`` and 5 gradient steps on ``w`` (step ``alpha``). Only the hypergradient
  calls are timed; ``times_s`` holds the total of the 20 per repetition. ``min_cos`` is the smallest
  cosine over the steps to the dense-solve hypergradient at that step's ``(w, λ)``, and ``kstar`` the
  per-step CG iterations a cold textbook CG needs to reach cosine 0.999 there (what a peer would need).

``residual=False`` everywhere: the peers do not compute a residual either. Timing and memory: see
``benchmarks/peers/_common.py`` (imported from there, so the protocol is identical).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import _common
import _torch_common

import hypergradients as hg
from hypergradients.app.experiments import bench

PEER = "hypergradients"
HYPER_STEP = 0.1  # max |Δ log λ| per hyper step
INNER_STEPS = 5


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", required=True)
    ap.add_argument("--method", required=True, choices=(*_common.METHODS, "auto", "hyperloop"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    _common.configure_threads(args.threads)
    return args


def main() -> None:
    args = parse()
    prob, t = _torch_common.load(args)
    Xt, yt, Xv, yv = t["X_train"], t["y_train"], t["X_val"], t["y_val"]
    alpha, K = float(prob["alpha"]), args.iters

    inner, outer = bench.logistic_losses(t)  # the same losses as `hypergradients bench`

    params, hparams = {"w": t["w_star"]}, {"log_lam": t["log_lam"]}
    extra: dict[str, object] = {"alpha": alpha}
    if args.method == "hyperloop":
        fn, extra = hyperloop(inner, outer, params, hparams, K, alpha, Xt, yt, Xv, yv)
    else:
        method = {
            "cg": hg.CG(iters=K, tol=0.0),
            "neumann": hg.Neumann(iters=K, alpha=alpha),
            "unrolled": hg.Unrolled(steps=K, lr=alpha),
            "auto": hg.Auto(),
        }[args.method]
        info_box: list[hg.Info] = []

        def fn() -> np.ndarray:
            g, info = hg.hypergradient(
                outer, inner, params, hparams, method=method, return_info=True, residual=False
            )
            info_box[:] = [info]
            return g["log_lam"].numpy()

    h, times, peak, mem_method = _common.measure(fn, args.repeats)
    if args.method != "hyperloop":
        extra["hvps"] = info_box[0].hvps  # type: ignore[possibly-undefined]
    _common.write_result(
        args,
        PEER,
        version=f"hypergradients {hg.__version__}, torch {torch.__version__}",
        hypergradient=h,
        times=times,
        peak=peak,
        mem_method=mem_method,
        notes=f"hg.{args.method}",
        **extra,
    )


def _dense_exact(
    w: torch.Tensor, log_lam: torch.Tensor, Xt: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exact hypergradient, H, v) at the current (w, λ) by a dense solve (untimed)."""
    s = torch.sigmoid(Xt @ w)
    lam = log_lam.exp()
    H = (Xt * (s * (1 - s))[:, None]).T @ Xt / Xt.shape[0] + torch.diag(lam)
    v = Xv.T @ (torch.sigmoid(Xv @ w) - yv) / Xv.shape[0]
    return -(lam * w) * torch.linalg.solve(H, v), H, v


def _kstar(H: torch.Tensor, v: torch.Tensor, mixed: torch.Tensor, exact: torch.Tensor, cap: int = 200) -> int:
    """Textbook-CG iterations from 0 until the hypergradient ``−mixed·p`` has cosine ≥ 0.999 with exact."""
    x = torch.zeros_like(v)
    r = v.clone()
    d = r.clone()
    rs = r @ r
    for k in range(1, cap + 1):
        hd = H @ d
        a = rs / (d @ hd)
        x = x + a * d
        r = r - a * hd
        rs_new = r @ r
        d = r + (rs_new / rs) * d
        rs = rs_new
        g = -mixed * x
        if float(g @ exact / (g.norm() * exact.norm())) >= 0.999:
            return k
    return cap


def hyperloop(inner, outer, params, hparams, steps, alpha, Xt, yt, Xv, yv):  # type: ignore[no-untyped-def]
    """Algorithm 1 for ``steps`` hyper steps; returns the timed closure and facts about the run."""
    facts: dict[str, object] = {"hyper_steps": steps, "hyper_step": HYPER_STEP, "inner_steps": INNER_STEPS}

    def run(check: bool = False) -> tuple[np.ndarray, float, list[float], list[int], list[int]]:
        import time

        state: hg.SolverState | None = hg.SolverState()
        w, lam = params["w"].clone(), hparams["log_lam"].clone()
        total, coss, kst, hvps = 0.0, [], [], []
        g = None
        for _ in range(steps):
            t0 = time.perf_counter()
            g, info = hg.hypergradient(
                outer,
                inner,
                {"w": w},
                {"log_lam": lam},
                method=hg.Auto(),
                state=state,
                return_info=True,
                residual=False,
            )
            total += time.perf_counter() - t0
            state = info.state
            hvps.append(info.hvps)
            gl = g["log_lam"]
            if check:
                ex, H, v = _dense_exact(w, lam, Xt, Xv, yv)
                coss.append(float(gl @ ex / (gl.norm() * ex.norm())))
                kst.append(_kstar(H, v, lam.exp() * w, ex))
            lam = lam - HYPER_STEP * gl / gl.abs().max()
            for _ in range(INNER_STEPS):
                wr = w.clone().requires_grad_(True)
                (gw,) = torch.autograd.grad(inner({"w": wr}, {"log_lam": lam}), wr)
                w = w - alpha * gw
        assert g is not None
        return g["log_lam"].numpy(), total, coss, kst, hvps

    _, _, coss, kst, hvps = run(check=True)
    facts.update(min_cos=min(coss), kstar=kst, hvps_per_step=hvps)
    box: dict[str, float] = {}

    def fn() -> np.ndarray:
        h, total, *_ = run()
        box["total"] = total
        return h

    def timed() -> np.ndarray:
        # _common.measure times the whole call (inner steps included); the hypergradient-only total
        # goes into "hyper_times_s" below via the box, and run.py uses that.
        h = fn()
        facts.setdefault("hyper_times_s", []).append(box["total"])  # type: ignore[union-attr]
        return h

    return timed, facts


if __name__ == "__main__":
    main()
