"""One rank of ``test_exp_lm_reweight.py``'s data-parallel check (started by torchrun).

``python -m torch.distributed.run --nproc-per-node 2 tests/app/lm_reweight_worker.py OUT_DIR``

Each rank takes the ``lm-reweight`` experiment's hyper step (its model, families, method, loss and
finite-difference products, in float64) on its half of one training batch and one validation batch,
inside ``HyperOptimizer(data_parallel=True)``, for every tuned arm (two steps), and saves the second
step's hypergradients and the hyperparameters after it to ``OUT_DIR/rank{r}.pt``. :func:`hyper_steps` with ``world=1`` is the
single-process reference on the union of the halves.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

import hypergradients as hg
from hypergradients import distributed
from hypergradients.app.config import resolve
from hypergradients.app.experiments import lm_reweight as E
from hypergradients.hparams.objective import on_targets

TEXT = (
    b"In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    b"and darkness was upon the face of the deep. "
) * 8
N_TRAIN, N_VAL = 8, 4  # the union's batches; each rank holds half


def config() -> dict[str, Any]:
    return resolve(E.SCHEMA, smoke=E.SMOKE)


def hyper_steps(rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Every tuned arm's hyper step on this rank's shard (``world=1``: the whole batches)."""
    cfg = config()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the families' tensors and the model in float64
    try:
        w, _ = E.corrupt(E.sequences(TEXT, cfg["data.seq_len"], 16), 0.5, E.KINDS, seed=0)
        v = E.sequences(TEXT[500:], cfg["data.seq_len"], N_VAL)
        n, m = N_TRAIN // world, N_VAL // world
        idx = torch.arange(rank * n, (rank + 1) * n)
        train = (w[idx, :-1], w[idx, 1:], idx)
        val = (v[rank * m : (rank + 1) * m, :-1], v[rank * m : (rank + 1) * m, 1:])
        out: dict[str, Any] = {}
        for arm in ("neumann", "cg", "first-order", "net"):
            net = E.model(cfg, 0, torch.device("cpu"))
            fams = E.families(cfg, arm, len(w), torch.device("cpu"))
            method = E.method(cfg, arm)
            assert method is not None
            hyper = hg.HyperOptimizer(
                net,
                fams,
                method=method,
                hvp_mode=cfg["hyper.hvp_mode"],
                loss_fn=on_targets(E.sequence_loss),
                warm_start=False,
                optimizer=lambda ps: torch.optim.Adam(ps, lr=cfg["hyper.lr"]),
                data_parallel=world > 1,
            )
            hyper.step(train, val)
            st = hyper.step(train, val)  # the second: the net's first layer gets a gradient once a2 ≠ 0
            assert st.applied and st.hypergradient is not None and st.info is not None
            out[arm] = {
                "g": {k: t.detach().clone() for k, t in st.hypergradient.items()},
                "hparams": {k: t.detach().clone() for k, t in hyper.hparams.items()},
                "hvps": st.info.hvps,
                "iterations": st.info.iterations,
            }
        return out
    finally:
        torch.set_default_dtype(before)


def main() -> None:
    out_dir = sys.argv[1]
    distributed.init_process_group("gloo", timeout_s=60)
    rank, world = distributed.rank(), distributed.world_size()
    torch.set_num_threads(1)
    res = hyper_steps(rank, world)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
