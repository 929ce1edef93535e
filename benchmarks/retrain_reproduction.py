"""Does a fresh model trained with the tuned values fixed reproduce the tuned run? (measured)

    .venv/bin/python benchmarks/retrain_reproduction.py   # one thread, ~1 min; writes
                                                          # benchmarks/results/retrain_reproduction.json

``hg.fit`` tunes one global weight decay (init 1e-3) of a ``20 → 64 → 3`` ReLU MLP on three classes
of a random linear rule with 20 % of the labels flipped (200 training, 200 validation, 2000 test
rows; Adam lr 1e-2 inner steps, batch 32, rounds of 10 inner steps, the default Neumann hyper step,
the hyper optimizer Adam). ``hg.retrain`` then trains the same initial weights on the same batches
for as many steps with the final decay fixed from the first step ("the same way"), and, as a
control, with the initial decay fixed. Two settings: the decay settled by the end (100 rounds, hyper
lr 0.05) and still rising at the end (50 rounds, hyper lr 0.1). Reported per seed: the final decay,
the test loss of the tuned run, of the retrain and of the control, and the differences in units of
the tuned run's standard error over the test examples (within 2: reproduced within its noise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import hypergradients as hg

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2, 3, 4)
SETTINGS = {
    "settled (100 rounds, hyper lr 0.05)": (100, 0.05),
    "still moving (50 rounds, hyper lr 0.1)": (50, 0.1),
}


def data(seed: int) -> tuple[tuple[Tensor, Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 3, generator=g)

    def make(m: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(m, 20, generator=g)
        y = (x @ w).argmax(1)
        flip = torch.rand(m, generator=g) < 0.2
        return x, torch.where(flip, torch.randint(0, 3, (m,), generator=g), y)

    return make(200), make(200), make(2000)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))


def one(seed: int, rounds: int, hyper_lr: float) -> dict[str, Any]:
    train, val, test = data(seed)
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    tuned = model(seed)
    wd = hg.WeightDecay(tuned, init=1e-3)
    res = hg.fit(
        tuned,
        [wd],
        train,
        val,
        rounds=rounds,
        inner_steps=10,
        batch_size=32,
        seed=seed,
        inner_optimizer=adam,
        hyper=hg.HyperSettings(optimizer=lambda ps: torch.optim.Adam(ps, lr=hyper_lr)),
    )
    steps = rounds * 10
    again = hg.retrain(
        lambda: model(seed), [wd], train, steps=steps, batch_size=32, seed=seed, optimizer=adam
    )
    control = hg.retrain(
        lambda: model(seed),
        [wd],
        train,
        values={"weight_decay": 1e-3},
        steps=steps,
        batch_size=32,
        seed=seed,
        optimizer=adam,
    )
    with torch.no_grad():
        losses = [
            nn.functional.cross_entropy(m(test[0]), test[1], reduction="none").double()
            for m in (tuned, again.model, control.model)
        ]
    se = float(losses[0].std() / math.sqrt(losses[0].numel()))
    mean = [float(x.mean()) for x in losses]
    return {
        "seed": seed,
        "decay": float(res.natural["weight_decay"]),
        "decay_10_rounds_before": float(res.metrics[-11]["weight_decay"]),
        "tuned": mean[0],
        "retrain": mean[1],
        "control": mean[2],
        "se": se,
        "retrain_in_se": (mean[1] - mean[0]) / se,
        "control_in_se": (mean[2] - mean[0]) / se,
    }


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (rounds, lr) in SETTINGS.items():
        out[name] = [one(s, rounds, lr) for s in SEEDS]
        print(f"\n{name}\n")
        print(
            "| seed | decay (10 rounds before) | test loss: tuned | retrain (final decay) | control (1e-3) "
            "| retrain − tuned, in SE | control − tuned, in SE |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in out[name]:
            print(
                f"| {r['seed']} | {r['decay']:.3g} ({r['decay_10_rounds_before']:.3g}) | {r['tuned']:.4f} | "
                f"{r['retrain']:.4f} | {r['control']:.4f} | {r['retrain_in_se']:+.2f} | "
                f"{r['control_in_se']:+.1f} |"
            )
    path = ROOT / "benchmarks" / "results" / "retrain_reproduction.json"
    path.write_text(json.dumps({"torch": torch.__version__, "settings": out}, indent=1) + "\n")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
