"""One rank of the data-parallel checks of ``test_distributed.py`` (started by torchrun).

``python -m torch.distributed.run --nproc-per-node 2 tests/library/dist_worker.py MODE OUT_DIR``

* ``hypergradients``: every method's hypergradient on this rank's shard inside
  ``hg.distributed.data_parallel()``, with its collective counts, and every root method's
  (``root_hypergradient`` on the same problem's conditions); saved to ``OUT_DIR/rank{r}.pt``.
* ``train``: a tiny training run (DDP model, SGD inner steps, ``HyperOptimizer(data_parallel=True)``
  hyper steps), then ``hg.fit(data_parallel=True)`` in one go and with a resume (run folders
  ``OUT_DIR/a``, ``OUT_DIR/b``); the results saved to ``OUT_DIR/rank{r}.pt``.
* ``die``: rank 1 exits at once (``hang``: sleeps); rank 0 waits in an all-reduce and must fail
  within the timeout (``HG_TEST_TIMEOUT`` seconds).

The problem and the single-process references come from the same functions (:func:`problem`,
:func:`methods`, :func:`roots`, :func:`train`), which the test calls on the union of the shards.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergradients as hg
from hypergradients import distributed

DT = torch.float64
N_TRAIN, N_VAL, D, C = 48, 32, 5, 3  # shards must be equal: divisible by the number of ranks


def data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(D, C, generator=g, dtype=DT)
    x = torch.randn(N_TRAIN + N_VAL, D, generator=g, dtype=DT)
    y = (x @ w_true + 0.5 * torch.randn(N_TRAIN + N_VAL, C, generator=g, dtype=DT)).argmax(1)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def shard(t: Tensor, rank: int, world: int) -> Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


Loss = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


def problem(rank: int = 0, world: int = 1) -> tuple[Loss, Loss, dict[str, Tensor], dict[str, Tensor]]:
    """Logistic regression, one log-L2 per weight; this rank's shard of the training and validation
    data (``world=1``: all of it). The weights are a few gradient steps from zero, not an optimum:
    the implicit formula is evaluated at the given weights whatever they are."""
    xt, yt, xv, yv = data()
    xt, yt, xv, yv = (shard(t, rank, world) for t in (xt, yt, xv, yv))

    def inner(w: dict[str, Tensor], lam: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(xt @ w["W"] + w["b"], yt) + 0.5 * (lam["l2"].exp() * w["W"] ** 2).sum()

    def outer(w: dict[str, Tensor], lam: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(xv @ w["W"] + w["b"], yv)

    g = torch.Generator().manual_seed(1)
    params = {"W": 0.3 * torch.randn(D, C, generator=g, dtype=DT), "b": torch.zeros(C, dtype=DT)}
    hparams = {"l2": torch.full((D, C), -1.0, dtype=DT)}
    return inner, outer, params, hparams


def methods() -> dict[str, tuple[hg.Method, str]]:
    """name → (method, hvp_mode)."""
    return {
        "Exact": (hg.Exact(), "reverse"),
        "CG": (hg.CG(iters=30, tol=1e-12), "reverse"),
        "CG-forward-hvp": (hg.CG(iters=30, tol=1e-12), "forward"),
        "CG-finite-difference": (hg.CG(iters=30, tol=1e-12), "finite-difference"),
        "Auto": (hg.Auto(), "reverse"),
        "Neumann": (hg.Neumann(iters=15, alpha=0.5), "reverse"),
        "Neumann-auto": (hg.Neumann(iters=15, alpha="auto"), "reverse"),
        "Identity": (hg.Identity(), "reverse"),
        "Nystrom": (hg.Nystrom(rank=5, rho=0.1), "reverse"),
        "Unrolled": (hg.Unrolled(steps=6, lr=0.5), "reverse"),
        "Unrolled-truncated": (hg.Unrolled(steps=6, lr=0.5, truncate=3), "reverse"),
        "Unrolled-checkpointed": (hg.Unrolled(steps=6, lr=0.5, checkpoint=2), "reverse"),
        "Unrolled-adam": (hg.Unrolled(steps=6, optimizer=hg.optim.adam(lr=0.05)), "reverse"),
        "FirstOrder": (hg.FirstOrder(sigma=100.0, steps=5, lr=0.5), "reverse"),
        "FirstOrder-forward": (hg.FirstOrder(sigma=100.0, steps=5, lr=0.5, central=False), "reverse"),
    }


def root_methods() -> dict[str, tuple[hg.ImplicitMethod, dict[str, Any]]]:
    """name → (method, root_hypergradient's keywords), on the conditions of :func:`roots`."""
    return {
        "GMRES": (hg.GMRES(tol=1e-12), {}),
        "Exact": (hg.Exact(), {}),
        "NormalCG": (hg.NormalCG(tol=1e-12, iters=300), {}),
        "Neumann": (hg.Neumann(iters=15, alpha=0.5), {}),
        "MINRES-symmetric": (hg.MINRES(tol=1e-12), {"symmetric": True}),
        "CG-finite-difference": (
            hg.CG(iters=30, tol=1e-12),
            {"symmetric": True, "hvp_mode": "finite-difference"},
        ),
        "fixed-point-GMRES": (hg.GMRES(tol=1e-12), {"fixed_point": True}),
    }


def roots(rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Every root method's hypergradient on this rank's shard: the stationarity condition
    ``F = ∂L_T/∂w`` as a function, or the fixed point of a gradient step ``T = w − ½∂L_T/∂w``."""
    inner, outer, params, hparams = problem(rank, world)

    def F(p: dict[str, Tensor], h: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(
            zip(p, torch.autograd.grad(inner(p, h), list(p.values()), create_graph=True), strict=True)
        )

    def T(p: dict[str, Tensor], h: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: p[k] - 0.5 * g for k, g in F(p, h).items()}

    out: dict[str, Any] = {}
    for name, (m, kw) in root_methods().items():
        with distributed.counting() as c:
            g, info = hg.root_hypergradient(
                outer,
                T if kw.get("fixed_point") else F,
                params,
                hparams,  # type: ignore[call-overload]
                method=m,
                return_info=True,
                **kw,
            )
        out[name] = {
            "g": g,
            "hvps": info.hvps,
            "iterations": info.iterations,
            "condition_norm": info.condition_norm,
            "all_reduces": c.all_reduces,
        }
    return out


def hypergradients(rank: int = 0, world: int = 1) -> dict[str, Any]:
    inner, outer, params, hparams = problem(rank, world)
    out: dict[str, Any] = {}
    for name, (m, mode) in methods().items():
        with distributed.counting() as c:
            g, info = hg.hypergradient(
                outer,
                inner,
                params,
                hparams,
                method=m,
                hvp_mode=mode,  # type: ignore[call-overload]
                return_info=True,
            )
        out[name] = {
            "g": g,
            "hvps": info.hvps,
            "iterations": info.iterations,
            "grad_norm": info.grad_norm,
            "all_reduces": c.all_reduces,
            "bytes": c.all_reduce_bytes,
            "gradient_evals": info.extra.get("gradient_evals"),
        }
    return out


def train(rank: int = 0, world: int = 1, *, rounds: int = 3, inner_steps: int = 4) -> dict[str, Any]:
    """Algorithm 1 by hand: full-batch SGD on the (DDP) model, a CG hyper step per round."""
    xt, yt, xv, yv = data()
    xt, yt, xv, yv = (shard(t, rank, world) for t in (xt, yt, xv, yv))
    torch.manual_seed(0)
    model = nn.Linear(D, C).to(DT)
    if rank != 0:  # a different start on the other ranks: DDP and the broadcast must fix it
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    wd = hg.WeightDecay(model, granularity="weight", init=0.05)
    if world > 1:
        if rank != 0:
            with torch.no_grad():
                for t in wd.tensors().values():
                    t.add_(3.0)  # must be overwritten by HyperOptimizer's broadcast from rank 0
        net: nn.Module = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    else:
        net = model
    hyper = hg.HyperOptimizer(
        model,
        [wd],
        method=hg.CG(iters=20, tol=1e-12),
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        data_parallel=world > 1,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(rounds):
        for _ in range(inner_steps):
            opt.zero_grad()
            loss = F.cross_entropy(net(xt), yt) + hyper.penalty()
            loss.backward()
            opt.step()
        with distributed.counting() as c:
            st = hyper.step((xt, yt), (xv, yv))
        assert st.info is not None
        history.append({k: v.detach().clone() for k, v in hyper.hparams.items()})
    return {
        "history": history,
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "all_reduces_last_step": c.all_reduces,
        "hvps_last_step": st.info.hvps,
    }


def fit_runs(out_dir: str, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """``hg.fit(data_parallel=...)`` full-batch: 3 rounds in one go (folder ``a``), and 2 rounds then a
    resume to 3 (folder ``b``); the final hyperparameters and weights of both."""
    xt, yt, xv, yv = data()
    xt, yt, xv, yv = (shard(t, rank, world) for t in (xt, yt, xv, yv))
    res: dict[str, Any] = {}
    for tag, plan in (("a", ((3, False),)), ("b", ((2, False), (3, True)))):
        for rounds, resume in plan:
            torch.manual_seed(rank)  # different initial weights per rank: fit broadcasts rank 0's
            model = nn.Linear(D, C).to(DT)
            wd = hg.WeightDecay(model, granularity="weight", init=0.05)
            out = hg.fit(
                model,
                [wd],
                (xt, yt),
                (xv, yv),
                rounds=rounds,
                inner_steps=3,
                batch_size=len(yt),
                method=hg.CG(iters=20, tol=1e-12),
                inner_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
                checkpoint_dir=os.path.join(out_dir, tag),
                checkpoint_every=1,
                resume=resume,
                data_parallel=world > 1,
            )
        res[tag] = {
            "hparams": {k: v.detach().clone() for k, v in wd.tensors().items()},
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "resumed_from": out.resumed_from,
        }
    return res


def main() -> None:
    mode, out_dir = sys.argv[1], sys.argv[2]
    timeout = float(os.environ.get("HG_TEST_TIMEOUT", "60"))
    distributed.init_process_group("gloo", timeout_s=timeout)
    rank, world = distributed.rank(), distributed.world_size()
    torch.set_num_threads(1)
    if mode == "hypergradients":
        with distributed.data_parallel():
            res = hypergradients(rank, world)
            inner, outer, params, hparams = problem(rank, world)
            try:
                hg.hypergradient(outer, inner, params, hparams, method=hg.Forward(steps=3, lr=0.5))
                res["forward_error"] = ""
            except hg.HypergradientError as e:
                res["forward_error"] = str(e)
            res["roots"] = roots(rank, world)
    elif mode == "train":
        res = train(rank, world)
        res["fit"] = fit_runs(out_dir, rank, world)
    elif mode in ("die", "hang"):
        if rank == 1:
            if mode == "hang":
                time.sleep(60)  # alive but silent (a stuck rank): only the timeout can end the wait
            os._exit(3)  # dies without a word to the others
        t0 = time.monotonic()
        try:
            with distributed.data_parallel():
                distributed.average([{"x": torch.ones(3)}])
            res = {"error": "", "seconds": time.monotonic() - t0}
        except hg.HypergradientError as e:  # what the survivor sees: the point of this mode
            res = {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        os._exit(0)  # the group is broken: no barrier, no destroy
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.barrier()  # neither rank tears the group down while the other still uses it
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
