"""``fit`` with the solver state carried across hyper steps (``warm_start=True``) or not (measured).

    .venv/bin/python benchmarks/fit_warm_start.py   # one thread, ~1 min; writes
                                                    # benchmarks/results/fit_warm_start.json

The default hyper step of ``hg.fit`` and ``hg.HyperOptimizer``, ``Neumann(iters=20, alpha="auto")``,
estimates ``λ_max`` by 20 power iterations; with ``warm_start=True`` the estimate is carried to
the next hyper step and reused (refreshed every 10 steps or when the series grows), and CG starts
from the last ``p``. This runs Algorithm 1 both ways on the same data, weights and batches:
binary classification, 240 training rows of 20 features (labels of a random linear rule with 20 %
flipped), 400 validation and 2000 test rows, a ``20 → 32 → 2`` tanh MLP in float32 with one weight
decay per layer (init 1e-3), Adam (lr 1e-2) inner steps, batch 64, 40 rounds of 10 inner steps,
the hyper optimizer Adam (lr 0.05); 3 seeds (data, initial weights and batch order), for the
default Neumann method and for ``CG(iters=10)``. Reported per arm: HVPs of all hyper steps (the
sum of the rounds' ``hvps``), the wall time of the whole ``fit`` call, the test loss in evaluation
mode per seed, and the largest relative difference of the final decays between the two arms (the
JSON also holds the decays and the counts of skipped and retried hyper steps).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hypergradients as hg

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
METHODS = {"Neumann(iters=20, alpha='auto') (the default)": None, "CG(iters=10)": hg.CG(iters=10)}


def data(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 20, generator=g)
        y = (x @ w > 0).long()
        flip = torch.rand(n, generator=g) < 0.2
        return x, torch.where(flip, 1 - y, y)

    return {"train": draw(240), "val": draw(400), "test": draw(2000)}


def run(seed: int, method: hg.Method | None, warm: bool) -> dict[str, Any]:
    sets = data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 2))
    wd = hg.WeightDecay(model, granularity="layer", init=1e-3)
    t0 = time.perf_counter()
    res = hg.fit(
        model,
        [wd],
        sets["train"],
        sets["val"],
        rounds=40,
        inner_steps=10,
        batch_size=64,
        inner_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
        method=method,
        seed=seed,
        warm_start=warm,
        eval_sets={"test": sets["test"]},
        eval_every=40,
    )
    wall = time.perf_counter() - t0
    return {
        "hvps": sum(int(r.get("hvps", 0)) for r in res.metrics),
        "wall_s": wall,
        "test_loss": res.final["test_loss"],
        "skipped": res.skipped_hyper_steps,
        "retried": res.retried_hyper_steps,
        "decays": {k: float(v) for k, v in res.natural.items()},
    }


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, method in METHODS.items():
        out[name] = {"cold": [], "warm": []}
        for seed in SEEDS:
            for arm in ("cold", "warm"):
                out[name][arm].append(run(seed, method, arm == "warm"))
    print(
        "| method | HVPs, cold | HVPs, warm | wall s, cold | wall s, warm | test loss, cold | test loss, "
        "warm | worst rel. difference of the final decays |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, arms in out.items():
        cold, warm = arms["cold"], arms["warm"]
        diff = max(
            abs(w["decays"][k] / c["decays"][k] - 1)
            for c, w in zip(cold, warm, strict=True)
            for k in c["decays"]
        )
        hvps = [statistics.mean(r["hvps"] for r in rows) for rows in (cold, warm)]
        wall = [statistics.mean(r["wall_s"] for r in rows) for rows in (cold, warm)]
        loss = [", ".join(f"{r['test_loss']:.4f}" for r in rows) for rows in (cold, warm)]
        print(
            f"| `{name}` | {hvps[0]:.0f} | {hvps[1]:.0f} | {wall[0]:.2f} | {wall[1]:.2f} | {loss[0]} | "
            f"{loss[1]} | {diff:.2g} |"
        )
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "fit_warm_start.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
