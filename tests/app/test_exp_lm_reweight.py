"""The ``lm-reweight`` experiment: the byte windows and the four corruptions do what the docstring says,
the AUC by hand, the transformer's hyper step needs (and gets right) finite-difference products, the
--smoke run writes its folder and its table, the notes follow the numbers, what the configuration
cannot have names its key, and under torchrun the hyper step on two halves equals one process on the
union."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lm_reweight_worker as W
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergradients as hg
from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext, get
from hypergradients.app.experiments import lm_reweight as E
from hypergradients.app.experiments.shared import flipped_auc
from hypergradients.hparams.objective import on_targets

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
ENGLISH = (
    b"And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    b"and God divided the light from the darkness. "
) * 40


# ------------------------------------------------------------------------------------------ data
def test_sequences_are_windows_of_seq_len_plus_one_bytes() -> None:
    w = E.sequences(b"abcdefghijk", 3)
    assert [bytes(r.tolist()) for r in w] == [b"abcd", b"defg", b"ghij"]  # 11 bytes: 3 windows, 'k' dropped
    assert len(E.sequences(b"abcdefghijk", 3, 2)) == 2
    with pytest.raises(ValueError, match="fewer than the 4"):
        E.sequences(b"abcdefghijk", 3, 4)
    with pytest.raises(ValueError, match="no sequence"):
        E.sequences(b"abc", 3)


def _rows(t: torch.Tensor) -> list[bytes]:
    return [bytes(r.tolist()) for r in t]


def test_corrupt_changes_exactly_p_n_rows_in_equal_shares_each_as_stated() -> None:
    w = E.sequences(ENGLISH, 40)
    n = len(w)
    out, kind = E.corrupt(w, 0.5, E.KINDS, seed=3)
    assert out.shape == w.shape and out.dtype == torch.long
    assert int((kind != 0).sum()) == round(0.5 * n)
    shares = torch.bincount(kind[kind != 0], minlength=len(E.KINDS) + 1)[1:]
    assert int(shares.max() - shares.min()) <= 1  # round robin: equal shares
    assert torch.equal(out[kind == 0], w[kind == 0])  # clean rows untouched
    clean, bad = _rows(w), _rows(out)
    rows = {k: (kind == j).nonzero().flatten().tolist() for j, k in enumerate(E.KINDS, start=1)}
    for r in rows["shuffled"]:  # the same words, the same length
        assert sorted(bad[r].split(b" ")) == sorted(clean[r].split(b" ")) and len(bad[r]) == len(clean[r])
    assert any(bad[r] != clean[r] for r in rows["shuffled"])
    mapping: dict[int, int] = {}
    for r in rows["foreign"]:  # one letter substitution for every row; everything else kept
        for a, b in zip(clean[r], bad[r], strict=True):
            if chr(a).isalpha():
                assert chr(b).isalpha() and chr(a).isupper() == chr(b).isupper()
                assert mapping.setdefault(a, b) == b
            else:
                assert a == b
    lower = {a: b for a, b in mapping.items() if chr(a).islower()}
    assert len(set(lower.values())) == len(lower) and any(a != b for a, b in lower.items())  # a permutation
    for r in rows["random"]:
        assert all(32 <= c <= 126 for c in bad[r])
    footers = [t.encode() * 10 for t in E.BOILERPLATE]
    for r in rows["boilerplate"]:
        assert any(bad[r] in f for f in footers)
    assert len({bad[r] for r in rows["boilerplate"]}) <= len(E.BOILERPLATE) * 8  # duplicates
    again, kind2 = E.corrupt(w, 0.5, E.KINDS, seed=3)
    assert torch.equal(again, out) and torch.equal(kind2, kind)  # the seed decides
    assert not torch.equal(E.corrupt(w, 0.5, E.KINDS, seed=4)[1], kind)
    none, k0 = E.corrupt(w, 0.0, E.KINDS, seed=3)
    assert torch.equal(none, w) and not k0.any()
    _, k1 = E.corrupt(w, 0.25, ["random"], seed=3)
    assert set(k1.tolist()) == {0, 1} and int((k1 == 1).sum()) == round(0.25 * n)
    with pytest.raises(ValueError, match="unknown corruption 'typos'"):
        E.corrupt(w, 0.5, ["typos"], seed=0)


def test_the_auc_by_hand() -> None:
    # clean weights 1, 1, 0.5 against corrupted 1, 0.2: of the 6 pairs the clean one is higher in
    # (1,0.2) twice and (0.5,0.2), tied in (1,1) twice, lower in (0.5,1): (3 + 2·½)/6.
    w = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.2])
    kind = torch.tensor([0, 0, 0, 1, 2])
    assert flipped_auc(w, kind != 0) == pytest.approx(4 / 6)
    aucs = E.kind_aucs(w, kind, ["random", "foreign"])
    # against kind 1 (weight 1): 2 ties, one lower: 1/3; against kind 2 (weight 0.2): every clean one higher
    assert aucs == {"all": pytest.approx(4 / 6), "random": pytest.approx(1 / 3), "foreign": 1.0}
    assert flipped_auc(w[:3], torch.zeros(3, dtype=torch.bool)) != flipped_auc(
        w[:3], torch.zeros(3, dtype=torch.bool)
    )


# ------------------------------------------------------------------------- the hyper step itself
def _step(arm: str, mode: str) -> dict[str, torch.Tensor]:
    cfg = resolve(E.SCHEMA, smoke=E.SMOKE)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = E.sequences(ENGLISH, cfg["data.seq_len"], 16)
        net = E.model(cfg, 0, torch.device("cpu"))
        hyper = hg.HyperOptimizer(
            net,
            E.families(cfg, arm, 16, torch.device("cpu")),
            method=E.method(cfg, arm),
            hvp_mode=mode,
            loss_fn=on_targets(E.sequence_loss),
            warm_start=False,
        )
        st = hyper.step((w[:8, :-1], w[:8, 1:], torch.arange(8)), (w[8:, :-1], w[8:, 1:]))
        assert st.hypergradient is not None
        return st.hypergradient
    finally:
        torch.set_default_dtype(before)


def test_the_attention_kernel_needs_finite_differences_and_they_give_the_exact_hyper_step() -> None:
    """The fused CPU attention kernel has no double backward: the default products refuse, naming the
    finite-difference mode; the finite-difference hyper step equals the reverse-mode one computed
    through the math attention kernel (which has a double backward), in float64."""
    with pytest.raises(hg.HypergradientError, match="finite-difference"):
        _step("neumann", "reverse")
    for arm in ("neumann", "cg", "net"):
        fd = _step(arm, "finite-difference")
        with sdpa_kernel(SDPBackend.MATH):
            exact = _step(arm, "reverse")
        a, b = (torch.cat([g[k].reshape(-1) for k in sorted(exact)]) for g in (fd, exact))
        # float64 central differences with the step ∛eps·(1 + ‖w‖) (the layer norms' unit weights make
        # ‖w‖ ≈ 6): the truncation error of one product on this model is ~1e-6 relative (measured: the
        # mixed product alone 6e-7, Neumann 3e-7, the net 2.5e-7), and damped CG, conditioned by
        # λ_max/δ, amplifies it to 5e-6. 1e-4 leaves room and still fails on a wrong product: a
        # Hessian that lost the attention's curvature, or none at all (Identity), is O(1) off.
        assert float((a - b).norm() / b.norm()) < 1e-4, arm


# ------------------------------------------------------------------------------------------ runs
def test_smoke_run_writes_every_arm_and_the_measurements(tmp_path: Path) -> None:
    exp = get("lm-reweight")
    cfg = resolve(exp.schema, smoke=exp.smoke, sets=["seeds=[0,1]"])
    res = exp.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    assert res.result is not None
    rows = {r["key"]: r for r in res.rows}
    assert list(rows) == list(E.ARMS) and all(r["seeds"] == 2 for r in rows.values())
    n = cfg["data.n_train"]
    assert rows["neumann"]["hyperparameters"] == n and rows["plain"]["hyperparameters"] == 0
    assert rows["net"]["hyperparameters"] == 3 * cfg["net.hidden"] + 1
    runs = res.result["runs"]
    clean = sum(1 for r in runs["clean-only"] if r["train_sequences"] < n)
    assert clean == 2  # the oracle trains on fewer
    for arm in E.WEIGHTED:
        for r in runs[arm]:
            # every hyper step moves the weights of its batch only: at most rounds × batch of them
            assert 0 < r["moved"] <= cfg["train.rounds"] * cfg["hyper.batch_size"]
            assert set(r["auc"]) == {"all", *E.KINDS} and 0 <= r["auc"]["all"] <= 1
            assert r["hyper_step_s"] > 0 and r["train_step_s"] > 0
    assert len(res.result["loss_auc"]) == 2
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    hyper = [r for r in recs if "hvps" in r]
    sama = [r for r in hyper if r["arm"] == "sama"]
    first = [r for r in hyper if r["arm"] == "first-order"]
    # the SAMA-style step: no product with H, the model's Adam as the preconditioner at every step
    assert sama and all(r["hvps"] == 0 and r["solver_preconditioned"] == 1 for r in sama)
    # the first-order step: no product at all, 4K + 2 gradients for K = hyper.iters steps (central)
    assert first and all(
        r["hvps"] == 0 and r["solver_gradient_evals"] == 4 * cfg["hyper.iters"] + 2 for r in first
    )
    assert all(r["hvps"] > 0 for r in hyper if r["arm"] in ("neumann", "cg", "net"))
    text = (tmp_path / "report.md").read_text()
    assert "AUC" in text and "lm_reweight.png" in text and (tmp_path / "lm_reweight.png").is_file()
    assert json.loads((tmp_path / "lm_reweight.json").read_text())["notes"] == res.notes
    # d_test_loss is paired with plain training over the seeds
    assert rows["plain"]["d_test_loss"] == "-" and "±" in rows["neumann"]["d_test_loss"]


def _table(plain: float, oracle: float, tuned: float, se: float) -> list[dict[str, Any]]:
    def row(key: str, loss: float, d_se: float) -> dict[str, Any]:
        return {
            "key": key,
            "arm": E.ARM_NAMES[key],
            "test_loss": loss,
            "test_ppl": 2.718281828**loss,
            "d_se": d_se,
            "hyper_over_train": "-",
        }

    return [row("plain", plain, float("nan")), row("clean-only", oracle, se), row("neumann", tuned, se)]


def test_notes_follow_the_numbers() -> None:
    per: dict[str, list[dict[str, Any]]] = {"plain": [{}] * 3, "clean-only": [{}] * 3, "neumann": [{}] * 3}
    win = " ".join(E.interpret(_table(2.2, 2.0, 2.1, 0.01), per, loss_auc=[], kinds=E.KINDS, steps=800))
    assert "per-sequence weights, IFT Neumann beats plain training on clean test loss" in win
    assert "recovers 50% of the gap" in win and "over 3 seeds" in win
    tie = " ".join(E.interpret(_table(2.2, 2.0, 2.19, 0.02), per, loss_auc=[], kinds=E.KINDS, steps=800))
    assert "per-sequence weights, IFT Neumann is within noise of plain training" in tie


def test_ift_against_the_cheaper_steps_is_paired_over_the_seeds() -> None:
    def runs(losses: list[float], aucs: list[float]) -> list[dict[str, Any]]:
        return [
            {"seed": s, "test_loss": x, "auc_moved": y}
            for s, (x, y) in enumerate(zip(losses, aucs, strict=True))
        ]

    per = {
        "neumann": runs([2.0, 2.1, 2.2], [0.70, 0.72, 0.71]),
        "sama": runs([2.1, 2.2, 2.3], [0.6, 0.6, 0.6]),
        "first-order": runs([2.01, 2.08, 2.21], [0.70, 0.72, 0.71]),
    }
    # differences -0.1 on every seed: mean -0.1, standard error 0
    a, b, d, se = E.paired(per, "neumann", "sama") or (0.0, 0.0, 0.0, 1.0)
    assert (a, b, d) == (pytest.approx(2.1), pytest.approx(2.2), pytest.approx(-0.1))
    assert se == pytest.approx(0, abs=1e-12)
    # differences -0.01, +0.02, -0.01: mean 0, sd √(0.0006/2), se sd/√3 = 0.01
    assert E.paired(per, "neumann", "first-order")[2:] == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.01))
    assert E.paired(per, "neumann", "cg") is None
    notes = " ".join(E.ift_versus_cheaper(per))
    sama = "IFT Neumann beats per-sequence weights, Adam-preconditioned identity (SAMA-style) on"
    assert f"{sama} clean test loss" in notes and f"{sama} AUC among the moved weights" in notes
    assert (
        "IFT Neumann is within noise of per-sequence weights, first-order penalty (F2SA-style) on clean"
        in notes
    )
    assert "over 3 seeds" in notes


def test_what_the_configuration_cannot_have_names_its_key(tmp_path: Path) -> None:
    exp = get("lm-reweight")

    def cfg(*sets: str) -> dict[str, Any]:
        return resolve(exp.schema, smoke=exp.smoke, sets=list(sets))

    with pytest.raises(ConfigError, match=r"'model.heads'"):
        E.check(cfg("model.heads=3"))
    with pytest.raises(ConfigError, match=r"'data.n_train'"):
        E.check(cfg("data.n_train=10000000"))
    with pytest.raises(ConfigError, match=r"'data.root'.*train.txt"):
        E.check(cfg(f"data.root={str(tmp_path)!r}".replace("'", '"')))
    with pytest.raises(ConfigError, match=r"'model.init'"):
        E.check(cfg('model.init="no-such-file.pt"'))
    for name, text in (("train.txt", ENGLISH), ("valid.txt", ENGLISH[:400]), ("test.txt", ENGLISH[:400])):
        (tmp_path / name).write_bytes(text)
    tr, va, te, source = E.check(cfg(f'data.root="{tmp_path}"'))
    assert (tr, va, te) == (ENGLISH, ENGLISH[:400], ENGLISH[:400]) and "train.txt" in source


def test_model_init_loads_the_weights_it_names(tmp_path: Path) -> None:
    exp = get("lm-reweight")
    c = resolve(exp.schema, smoke=exp.smoke)
    net = E.model(c, 5, torch.device("cpu"))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    c2 = resolve(exp.schema, smoke=exp.smoke, sets=[f'model.init="{tmp_path / "w.pt"}"'])
    again = E.model(c2, 0, torch.device("cpu"))
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    )
    wrong = resolve(exp.schema, smoke=exp.smoke, sets=[f'model.init="{tmp_path / "w.pt"}"', "model.width=12"])
    with pytest.raises(ConfigError, match=r"'model.init'"):
        E.model(wrong, 0, torch.device("cpu"))


# -------------------------------------------------------------------------------- data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_hyper_step_under_torchrun_equals_one_process_on_the_union(tmp_path: Path) -> None:
    """Two gloo ranks, each with half of the hyper step's training and validation batches, inside
    HyperOptimizer(data_parallel=True): every tuned arm's hypergradient and stepped hyperparameters
    equal one process's on the union (and the two ranks agree bit for bit)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
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
        str(HERE / "lm_reweight_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    ref = W.hyper_steps(0, 1)
    for arm, one in ref.items():
        assert (r0[arm]["hvps"], r0[arm]["iterations"]) == (one["hvps"], one["iterations"]), arm
        for k in one["g"]:
            assert torch.equal(r0[arm]["g"][k], r1[arm]["g"][k]), (arm, k)
            # after two Adam steps (a step ≈ lr·sign for a first gradient): measured ≤ 2e-13 apart
            assert torch.allclose(r0[arm]["hparams"][k], one["hparams"][k], rtol=0, atol=1e-10), (arm, k)
        a, b = (torch.cat([g[k].reshape(-1) for k in sorted(g)]) for g in (r0[arm]["g"], one["g"]))
        # float64, two half-means averaged against one mean: rounding ~1e-16 per gradient, divided by
        # the finite-difference step (2ε ≈ 1e-5) to ~1e-11 (measured 3e-13 to 6e-12): 1e-10 bounds it.
        assert float((a - b).norm() / b.norm()) < 1e-10, arm
