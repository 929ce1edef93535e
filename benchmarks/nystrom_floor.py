"""Floor-aware Nyström against plain Nyström, CG and Neumann at equal HVP counts.

Four symmetric positive definite spectra, n = 400 weights, float64, each ``H`` dense (HVPs are
matrix products, counted the same way as the library counts them):

* ``logistic+wd``: the Hessian of a binary logistic regression with 40 rows and 400 weights
  plus weight decay 2, ``XᵀDX/40 + 2I``: rank 40 plus a floor of 2 (the over-parameterised case);
* ``rank20+floor``: 20 eigenvalues from 10 to 1e3, the other 380 equal to 2;
* ``decaying``: ``λ_i = 1e3·i^-1.5`` (no floor; cond ≈ 8e3);
* ``well-cond``: eigenvalues uniform in [1, 10].

For each budget k (HVPs): ``Nystrom(rank=k)`` (plain, ``rho=None``), ``floor="auto"``,
``floor=λ_min(H)`` (known), ``CG(iters=k)``, ``Neumann(iters=k+1, alpha=1/λ_max)`` (k HVPs),
and ``Identity(scale=1/λ_min)`` (0 HVPs). Reported: the relative error ``‖p − H⁻¹v‖/‖H⁻¹v‖``
for a Gaussian ``v``, the median over 3 draws of ``v`` and of the sketch's seed.

    .venv/bin/python benchmarks/nystrom_floor.py   # about 10 s; writes benchmarks/results/nystrom_floor.json
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from hypergradients.core.kernels import krylov, nystrom, series
from hypergradients.core.kernels.solve import Solve
from hypergradients.core.operators import HessianOperator

DT = torch.float64
N = 400
BUDGETS = (10, 25, 50)
METHODS = ("Nyström", "Nyström floor=auto", "Nyström floor=λ_min", "CG", "Neumann", "Identity")


def with_spectrum(ev: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=DT))
    H = (Q * ev) @ Q.T
    return 0.5 * (H + H.T)


def spectra() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = 4.0 * torch.randn(40, N, generator=gen, dtype=DT)
    s = torch.sigmoid(X @ torch.randn(N, generator=gen, dtype=DT) / (4.0 * math.sqrt(N)))
    logistic = (X * (s * (1 - s))[:, None]).T @ X / 40 + 2.0 * torch.eye(N, dtype=DT)
    floor = torch.full((N,), 2.0, dtype=DT)
    floor[:20] = torch.logspace(1, 3, 20, dtype=DT)
    return {
        "logistic+wd": 0.5 * (logistic + logistic.T),
        "rank20+floor": with_spectrum(floor, gen),
        "decaying": with_spectrum(1e3 * torch.arange(1, N + 1, dtype=DT) ** -1.5, gen),
        "well-cond": with_spectrum(1.0 + 9.0 * torch.rand(N, generator=gen, dtype=DT), gen),
    }


def solve(
    name: str, H: torch.Tensor, v: dict[str, torch.Tensor], k: int, seed: int, lam: tuple[float, float]
) -> dict[str, torch.Tensor]:
    def mv(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"w": H @ x["w"]}

    def batched(xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"w": xs["w"] @ H}  # rows are the vectors; H is symmetric

    lo, hi = lam
    op = HessianOperator(mv, batched)
    run: dict[str, Callable[[], Solve]] = {
        "Nyström": lambda: nystrom.nystrom(op, v, rank=k, seed=seed),
        "Nyström floor=auto": lambda: nystrom.nystrom(op, v, rank=k, seed=seed, floor="auto"),
        "Nyström floor=λ_min": lambda: nystrom.nystrom(op, v, rank=k, seed=seed, floor=lo),
        "CG": lambda: krylov.cg(op, v, iters=k, tol=0.0),
        "Neumann": lambda: series.neumann(op, v, iters=k + 1, alpha=1.0 / hi, residual=False),
        "Identity": lambda: series.identity(op, v, scale=1.0 / lo),
    }
    return run[name]().p


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for sname, H in spectra().items():
        ev = torch.linalg.eigvalsh(H)
        lam = (float(ev[0]), float(ev[-1]))
        for k in BUDGETS:
            errs: dict[str, list[float]] = {m: [] for m in METHODS}
            for rep in range(3):
                b = torch.randn(N, generator=torch.Generator().manual_seed(100 + rep), dtype=DT)
                exact = torch.linalg.solve(H, b)
                for m in METHODS:
                    p = solve(m, H, {"w": b}, k, rep, lam)["w"]
                    errs[m].append(float((p - exact).norm() / exact.norm()))
            rows.append(
                {
                    "spectrum": sname,
                    "cond": lam[1] / lam[0],
                    "hvps": k,
                    **{m: statistics.median(e) for m, e in errs.items()},
                }
            )
    print("| spectrum | cond(H) | HVPs | " + " | ".join(METHODS) + " |")
    print("|---|---:|---:|" + "---:|" * len(METHODS))
    for r in rows:
        best = min(r[m] for m in METHODS if m != "Nyström floor=λ_min")
        cells = [(f"**{r[m]:.1e}**" if r[m] == best else f"{r[m]:.1e}") for m in METHODS]
        print(f"| {r['spectrum']} | {r['cond']:.3g} | {r['hvps']} | " + " | ".join(cells) + " |")
    out = Path(__file__).resolve().parent / "results" / "nystrom_floor.json"
    out.write_text(json.dumps({"n": N, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"\n(bold: the best method that needs no knowledge of λ_min; written {out.name})")


if __name__ == "__main__":
    main()
