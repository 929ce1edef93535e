"""Data-parallel hypergradients (``hg.distributed``): two CPU processes on gloo over loopback.

Each check starts two ranks of ``tests/library/dist_worker.py`` (torchrun, or two plain processes with
torchrun's environment) and compares what they saved with the same computation in this process
on the union of their shards. Equal-size shards and mean-reduced losses make the group-mean loss
the loss on the union, so the results agree up to the rounding of a different summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dist_worker as W
import hypergradients as hg
from hypergradients import distributed

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def _torchrun(mode: str, out: Path) -> list[dict[str, Any]]:
    """The launch of docs/distributed.md (there with the example script), on gloo over loopback."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(HERE / "dist_worker.py"),
        mode,
        str(out),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def dp_hypergradients(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _torchrun("hypergradients", tmp_path_factory.mktemp("hg"))


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("train")
    res = _torchrun("train", out)
    for r in res:
        r["out_dir"] = str(out)
    return res


@pytest.fixture(scope="module")
def single_hypergradients() -> dict[str, Any]:
    return W.hypergradients(0, 1)


@pytest.mark.parametrize("name", list(W.methods()))
def test_each_method_equals_single_process_on_the_union(
    name: str, dp_hypergradients: list[dict[str, Any]], single_hypergradients: dict[str, Any]
) -> None:
    r0, r1 = (r[name] for r in dp_hypergradients)
    ref = single_hypergradients[name]
    # Both ranks hold the same result bit for bit: every vector a solver decides on was all-reduced.
    assert torch.equal(r0["g"]["l2"], r1["g"]["l2"])
    # ... and took the same decisions as the single process on the union (same iterations/HVPs).
    assert (r0["iterations"], r0["hvps"]) == (ref["iterations"], ref["hvps"])
    a, b = r0["g"]["l2"], ref["g"]["l2"]
    # float64 with a different summation order (two half-means averaged vs one mean): rounding
    # ~1e-16 per product, amplified by the solver's conditioning and Adam's √v to ≲1e-13 measured.
    # The finite-difference mode divides the rank-local rounding of ∇L_T by 2ε ≈ 1e-5, so its
    # difference is ~eps/ε ≈ 2e-11 (measured 2.6e-11), and FirstOrder's by ~eps·σ·‖w‖/‖p‖ (σ = 100):
    # 1e-10 bounds them all.
    assert float((a - b).norm() / b.norm()) <= 1e-10
    # info.grad_norm is ‖∂L_T/∂w‖ of the group-mean gradient, the single process's (same rounding as above)
    assert r0["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-10)


def test_one_all_reduce_per_hvp(dp_hypergradients: list[dict[str, Any]]) -> None:
    """Implicit methods: ∂L_V/∂w, ∂L_V/∂λ and ∂L_T/∂w (for info.grad_norm) in one all-reduce, one per HVP (a batch of HVPs, as
    Exact's dense build and Nyström's sketch, in one), one for the mixed product. Path methods:
    each differentiated step's gradient all-reduced forward and its adjoint backward, each
    undifferentiated step's gradient once, and the final λ-gradient once."""
    r = dp_hypergradients[0]
    n_w, n_l = W.D * W.C + W.C, W.D * W.C
    for name in ("CG", "CG-forward-hvp", "CG-finite-difference", "Neumann", "Neumann-auto", "Auto"):
        assert r[name]["all_reduces"] == r[name]["hvps"] + 2, name
    assert r["Exact"]["all_reduces"] == 3  # v, direct & ∇L_T, the batched dense build, mixed
    assert r["Nystrom"]["all_reduces"] == 4  # v, direct & ∇L_T, the sketch (batched), residual, mixed
    assert r["Unrolled"]["all_reduces"] == 2 * 6 + 1
    assert r["Unrolled-truncated"]["all_reduces"] == 3 + 2 * 3 + 1
    assert r["Unrolled-checkpointed"]["all_reduces"] == 6 + 2 * 6 + 1  # sweep, recompute, backward
    # FirstOrder: one all-reduce per gradient evaluation (∇_w, ∇_λ or both of one loss at one point)
    for name in ("FirstOrder", "FirstOrder-forward"):
        assert r[name]["all_reduces"] == r[name]["gradient_evals"] and r[name]["hvps"] == 0, name
    assert (
        r["FirstOrder"]["gradient_evals"] == 4 * 5 + 2
        and r["FirstOrder-forward"]["gradient_evals"] == 2 * 5 + 2
    )
    # Bytes: float64, (2·n_w + n_l) once, n_w per HVP, n_l for the mixed product.
    assert r["CG"]["bytes"] == 8 * ((2 * n_w + n_l) + n_w * r["CG"]["hvps"] + n_l)


def test_forward_mode_is_refused_inside_data_parallel(dp_hypergradients: list[dict[str, Any]]) -> None:
    for r in dp_hypergradients:
        assert "hg.Unrolled" in r["forward_error"] and "data_parallel" in r["forward_error"]


@pytest.mark.parametrize("name", list(W.root_methods()))
def test_each_root_method_equals_single_process_on_the_union(
    name: str, dp_hypergradients: list[dict[str, Any]]
) -> None:
    """root_hypergradient inside data_parallel: every product of the condition is the group mean, so
    both ranks agree bit for bit and equal one process on the union, with the same decisions; the
    collectives are those of hypergradient: v, direct and F in one, one per product (a batch in
    one), one for the mixed product (the finite-difference mode's n_λ columns included)."""
    r0, r1 = (r["roots"][name] for r in dp_hypergradients)
    ref = W.roots(0, 1)[name]
    assert torch.equal(r0["g"]["l2"], r1["g"]["l2"])
    assert (r0["iterations"], r0["hvps"]) == (ref["iterations"], ref["hvps"])
    a, b = r0["g"]["l2"], ref["g"]["l2"]
    # float64, another summation order, as for hypergradient above (finite differences: ~eps/ε).
    assert float((a - b).norm() / b.norm()) <= 1e-10
    assert r0["condition_norm"] == pytest.approx(ref["condition_norm"], rel=1e-10)
    assert r0["all_reduces"] == (3 if name == "Exact" else r0["hvps"] + 2)


def test_training_under_torchrun_matches_one_process(train_runs: list[dict[str, Any]]) -> None:
    """DDP inner steps + HyperOptimizer(data_parallel=True): rank 1 starts from other weights and other
    hyperparameters; DDP and the broadcast make them rank 0's, the all-reduced hypergradients keep
    them identical bit for bit after every hyper step, and the run equals one process on the union."""
    r0, r1 = train_runs
    ref = W.train(0, 1)
    assert len(r0["history"]) == len(ref["history"]) == 3
    for a, b, c in zip(r0["history"], r1["history"], ref["history"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])
            # DDP averages the weight gradients in its own buckets: rounding ~1e-16 per step.
            assert float((a[k] - c[k]).norm() / c[k].norm()) <= 1e-10
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])
        assert torch.allclose(r0["weights"][k], ref["weights"][k], rtol=0, atol=1e-12)
    # The hyper step's collectives: v & direct, one per HVP (CG's), the mixed product.
    assert r0["all_reduces_last_step"] == r0["hvps_last_step"] + 2


def test_fit_under_torchrun_resumes_and_matches_one_process(
    train_runs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """``hg.fit(data_parallel=True)``: both ranks end with the same weights and hyperparameters
    (rank 1 started from other weights), only rank 0 wrote the run folder (one metrics line per
    round, not two), 2 rounds + a resume to 3 equal 3 rounds bit for bit, and the run equals one
    process on the union of the shards."""
    r0, r1 = train_runs
    run_dir = r0["out_dir"]
    f0, f1 = r0["fit"], r1["fit"]
    ref = W.fit_runs(str(tmp_path / "single"), 0, 1)["a"]
    for k in f0["a"]["hparams"]:
        a = f0["a"]["hparams"][k]
        assert torch.equal(a, f1["a"]["hparams"][k])
        assert torch.equal(a, f0["b"]["hparams"][k])  # resumed with the same N: bit for bit
        c = ref["hparams"][k]
        assert float((a - c).norm() / c.norm()) <= 1e-10  # summation order only, as above
    for k in f0["a"]["weights"]:
        assert torch.equal(f0["a"]["weights"][k], f1["a"]["weights"][k])
        assert torch.equal(f0["a"]["weights"][k], f0["b"]["weights"][k])
        assert torch.allclose(f0["a"]["weights"][k], ref["weights"][k], rtol=0, atol=1e-12)
    assert (f0["b"]["resumed_from"], f1["b"]["resumed_from"]) == (2, 2)
    lines = (Path(run_dir) / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    lines = (Path(run_dir) / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]


def test_the_docs_single_machine_command_runs_as_printed(tmp_path: Path) -> None:
    """docs/distributed.md's example, saved as dp_example.py, under its torchrun command (gloo on CPU):
    the table it prints has every method and the collectives the doc states for it."""
    doc = (ROOT / "docs" / "distributed.md").read_text()
    code = doc.split("save it as `dp_example.py`", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "dp_example.py").write_text(code)
    command = "torchrun --standalone --nproc-per-node 2 dp_example.py"
    assert f"\n{command}\n" in doc
    env = _env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(command.split(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout.strip()
    assert printed.startswith("2 ranks, backend gloo")
    for line in printed.splitlines()[2:]:  # the doc's table holds these lines, as measured
        assert line in doc, line
    assert len(printed.splitlines()) == 2 + 9


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_rank_ends_the_other_with_an_error_within_the_timeout(mode: str, tmp_path: Path) -> None:
    """Two plain processes (torchrun's agent would kill the survivor itself): rank 1 exits after the
    rendezvous (``die``: its socket closes, gloo raises at once) or stays alive and silent (``hang``:
    only the timeout helps); rank 0 waits in an all-reduce and must raise, not hang, within its 5 s
    timeout."""
    port = str(_free_port())
    logs = [open(tmp_path / f"log{r}.txt", "w") for r in range(2)]  # closed in the finally below
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "dist_worker.py"), mode, str(tmp_path)],
            env=_env(
                {
                    "RANK": str(r),
                    "LOCAL_RANK": str(r),
                    "WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "HG_TEST_TIMEOUT": "5",
                }
            ),
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    t0 = time.monotonic()
    try:
        procs[0].wait(timeout=60)
        procs[1].kill()  # the silent rank would sleep on
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    assert time.monotonic() - t0 < 60
    res = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert res["error"], "rank 0's all-reduce returned although rank 1 was gone"
    assert res["error"].startswith(
        "HypergradientError: rank 0: a data-parallel all-reduce of 3 values failed"
    )
    assert "timeout_s" in res["error"] and "resume=True" in res["error"]
    assert res["seconds"] < 5 + 10  # the timeout, plus slack for a busy machine
    if mode == "hang":
        assert res["seconds"] >= 4.5 and "timed out" in res["error"].lower(), res


def test_data_parallel_needs_a_process_group() -> None:
    with pytest.raises(hg.HypergradientError, match="init_process_group"):
        with distributed.data_parallel():
            pass


def test_no_collectives_outside_data_parallel() -> None:
    inner, outer, params, hparams = W.problem()
    with distributed.counting() as c:
        hg.hypergradient(outer, inner, params, hparams, method=hg.CG(iters=5))
    assert (c.all_reduces, c.broadcasts) == (0, 0)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)


def test_hyperoptimizer_and_fit_refuse_data_parallel_without_a_process_group() -> None:
    xt, yt, xv, yv = W.data()
    model = torch.nn.Linear(W.D, W.C).to(W.DT)
    wd = hg.WeightDecay(model)
    with pytest.raises(hg.HypergradientError, match="init_process_group"):
        hg.HyperOptimizer(model, [wd], data_parallel=True)
    with pytest.raises(hg.HypergradientError, match="init_process_group"):
        hg.fit(model, [wd], (xt, yt), (xv, yv), rounds=1, inner_steps=1, data_parallel=True)
    path = hg.PathHyperparameters({"lr": torch.tensor(0.1, dtype=W.DT)}, hg.optim.sgd(lr="lr"), steps=1)
    with pytest.raises(ValueError, match="path_hparams"):
        hg.fit(
            model, [wd], (xt, yt), (xv, yv), rounds=1, inner_steps=1, data_parallel=True, path_hparams=path
        )
