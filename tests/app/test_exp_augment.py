"""The ``augment`` experiment: the hand-made augmentation is a rotation + shift (checked against a
closed form) drawn from the hyper step's noise, the --smoke run writes its folder with mean ± std rows,
paired differences and diagnostics, the schedules and α follow the authors' code, a collapse is
reported, the figure draws an offset as one, ``config=full`` is the authors' recipe, ResNet-18 has
its known size, and bad settings name their key before any file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import hypergradients as hg
from hypergradients.app.config import ConfigError, resolve
from hypergradients.app.experiments import RunContext
from hypergradients.app.experiments.augment_mnist import (
    EXPERIMENT,
    FULL,
    SCHEMA,
    SMOKE,
    HandMade,
    RandomShiftRotate,
    _Schedules,
    interpret,
    mean_std,
    overfitting,
    resnet18,
)
from hypergradients.hparams import Batch, Noise
from hypergradients.hparams.augment import AugmentNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_handmade_shift_moves_a_pixel_by_the_drawn_amount(monkeypatch):
    # With rotation 0 and torch.rand forced to 1, the warp shifts by exactly +shift pixels along
    # both axes (affine_grid's [-1, 1] coordinates: 2·shift/size), so an integer shift moves a
    # single bright pixel exactly, to float64 rounding.
    aug = RandomShiftRotate(shift=2.0, degrees=0.0).train()
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[0, 0, 3, 3] = 1.0
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, **kw))
    y = aug(x)
    # sampling at (i + 2, j + 2): the bright pixel appears at (1, 1)
    assert y[0, 0, 1, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_handmade_rotation_by_90_degrees_is_a_transpose_flip(monkeypatch):
    aug = RandomShiftRotate(shift=0.0, degrees=90.0).train()
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, **kw))
    y = aug(x)
    # a 90° rotation of the sampling grid: output (i, j) samples input (j, 3 − i) up to orientation
    assert torch.allclose(y[0, 0], torch.rot90(x[0, 0], k=1, dims=(0, 1)), atol=1e-12) or torch.allclose(
        y[0, 0], torch.rot90(x[0, 0], k=-1, dims=(0, 1)), atol=1e-12
    )


def test_handmade_is_the_identity_in_evaluation_mode():
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(RandomShiftRotate(2.0, 10.0).eval()(x), x)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_smoke_writes_the_run_folder(tmp_path: Path) -> None:
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["seeds=[0,1]"])
    ds = EXPERIMENT.check(cfg) if EXPERIMENT.check else None
    res = EXPERIMENT.run(
        RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False, data=ds)
    )
    assert [r["arm"] for r in res.rows] == [
        "no augmentation",
        "hand-made",
        "augmentation network (IFT)",
        "augmentation network on hand-made (IFT)",
    ]
    for r in res.rows:
        accs = [x["test_acc"] for x in r["runs"]]
        assert r["seeds"] == 2 and (r["test_acc_mean"], r["test_acc_std"]) == mean_std(accs)
        # every arm takes the same inner steps: 6 = 3 rounds of 2
        assert all(x["inner_steps"] == 6 and x["cpu_s"] > 0 for x in r["runs"])
        assert all(x["extra_acc"] is not None for x in r["runs"])  # the 3000 − 64 images left out
    for learned in res.rows[2:]:
        assert learned["hyperparameters"] == 449
        for x in learned["runs"]:
            assert x["hyper_steps"] == 3 and x["hyper_steps_seen"] == 3
            assert 0 <= x["changed_fraction"] <= 1 and 0 <= x["bias_share"] <= 1
            assert len(x["snr_windows"]) == 1 and x["aug_dist"] >= 0  # one window of 2 hyper steps
    assert all("hyper_steps_seen" not in x for r in res.rows[:2] for x in r["runs"])
    for name in (
        "config.toml",
        "augment.json",
        "metrics.jsonl",
        "report.md",
        "curves.png",
        "augmented-augnet.png",
        "augmented-augnet+hand.png",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "augment.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res.rows))
    assert [p["comparison"] for p in saved["paired"]][:2] == [
        "augmentation network (IFT) − no augmentation",
        "augmentation network (IFT) − hand-made",
    ]
    report = (tmp_path / "report.md").read_text()
    assert "Paired differences" in report and "signal-to-noise ratio over windows" in report
    assert "Validation loss of no augmentation" in report and "Cost of augmentation network" in report
    # the distance from the identity is recorded at every evaluation of a learned arm
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("aug_dist" in x for x in lines if x["arm"] == "augnet" and "val_loss" in x)


def test_handmade_family_draws_from_the_hypergradients_noise() -> None:
    # Inside one hypergradient every evaluation of L_T must see the same warp: the same Noise gives the
    # same images, another Noise other ones; with flip, half the images are mirrored on average.
    hand = HandMade(2.0, 10.0, flip=True)
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    b = Batch(x, torch.zeros(64, dtype=torch.long), torch.arange(64))
    one = hand.batch(b, {}, noise=Noise(3).sampler()).x
    assert torch.equal(one, hand.batch(b, {}, noise=Noise(3).sampler()).x)
    assert not torch.equal(one, hand.batch(b, {}, noise=Noise(4).sampler()).x)
    flip = HandMade(0.0, 0.0, flip=True).batch(b, {}, noise=Noise(5).sampler()).x
    # a pure mirror (no shift, no rotation) reflects the sampling grid exactly: each image is either
    # itself or its left-right mirror, to bilinear interpolation's rounding at pixel centres
    mirrored = [bool(torch.allclose(flip[i], x[i].flip(-1), atol=1e-12)) for i in range(64)]
    kept = [bool(torch.allclose(flip[i], x[i], atol=1e-12)) for i in range(64)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and 16 < sum(mirrored) < 48
    assert HandMade(0.0, 0.0, flip=False).batch(b, {}, noise=Noise(5).sampler()) is b


def test_schedules_follow_the_authors_milestones_and_alpha_is_the_inner_lr() -> None:
    # train.steps 100, milestones at 30/60/80 steps; 10 hyper steps, milestones at 2/5/7.
    cfg = resolve(SCHEMA, sets=["train.steps=100", "train.lr=0.1", "hyper.lr=1.0", "hyper.optimizer=sgd"])
    sched = _Schedules(cfg, rounds=10)
    model = torch.nn.Linear(2, 2)
    opt = sched.make_inner(list(model.parameters()))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 5e-4
    lrs = []
    for done in (0, 29, 30, 59, 60, 80, 100):
        sched.on_round_end({"inner_steps": done})
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008], rel=1e-12)
    fam = AugmentNet(1, wf=1)
    hyper = hg.HyperOptimizer(model, [fam], method=hg.Identity(), optimizer=sched.make_hyper)
    got = []
    for k in (0, 1, 2, 5, 7):
        hyper.steps = k
        sched.on_before_hyper_step(hyper)
        got.append(hyper.optimizer.param_groups[0]["lr"])
    assert got == pytest.approx([1.0, 1.0, 0.2, 0.04, 0.008], rel=1e-12)
    # α of the identity approximation is the current inner learning rate (0.0008 after step 80)
    assert isinstance(hyper.method, hg.Identity) and hyper.method.scale == pytest.approx(0.0008)
    neu = hg.HyperOptimizer(model, [fam], method=hg.Neumann(iters=2, alpha=0.5), optimizer=sched.make_hyper)
    sched.on_before_hyper_step(neu)
    assert isinstance(neu.method, hg.Neumann) and neu.method.alpha == pytest.approx(0.0008)
    # a resumed run restores the inner rate from its history
    fresh = _Schedules(cfg, rounds=10)
    opt2 = fresh.make_inner(list(model.parameters()))
    fresh.on_fit_start([{"inner_steps": 65}])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.004)


def test_a_collapsed_run_is_reported_not_finished_quietly() -> None:
    runs = [
        {
            "seed": 0,
            "test_acc": 0.1,
            "inner_loss": 2.3,
            "collapsed": "classifier at chance (test accuracy 0.100)",
        },
        {"seed": 1, "test_acc": 0.9, "inner_loss": 0.1, "collapsed": ""},
    ]
    rows = {"augnet": {"arm": "augmentation network (IFT)", "test_acc_mean": 0.5, "runs": runs}}
    text = " ".join(interpret(rows))
    assert (
        "COLLAPSED: 1 of 2 runs of the augmentation network (IFT) arm: seed 0: classifier at chance" in text
    )
    from hypergradients.app.experiments.augment_mnist import _collapse

    assert (
        _collapse("augnet", 0.95, 10, {"zero_run_at_end": 20, "hyper_steps_seen": 88}, 20)
        == "hypergradient exactly 0 for the last 20 hyper steps"
    )
    assert _collapse("augnet", 0.95, 10, {"zero_run_at_end": 3, "hyper_steps_seen": 88}, 20) == ""
    assert _collapse("none", 0.95, 10, None, 20) == ""


def test_the_paired_difference_without_the_collapsed_seeds_is_reported_beside_the_verdict() -> None:
    learned = [0.94, 0.95, 0.10, 0.93]
    none = [0.93, 0.94, 0.92, 0.94]
    rows = {
        "augnet": {
            "arm": "augmentation network (IFT)",
            "test_acc_mean": sum(learned) / 4,
            "runs": [
                {
                    "seed": s,
                    "test_acc": v,
                    "inner_loss": 0.2,
                    "collapsed": "classifier at chance" if v < 0.15 else "",
                }
                for s, v in enumerate(learned)
            ],
        },
        "none": {
            "arm": "no augmentation",
            "test_acc_mean": sum(none) / 4,
            "runs": [
                {"seed": s, "test_acc": v, "inner_loss": 0.1, "collapsed": ""} for s, v in enumerate(none)
            ],
        },
    }
    text = " ".join(interpret(rows))
    # seeds 0, 1, 3: differences +0.01, +0.01, −0.01: mean +0.0033, sd 0.01155, SE 0.0067
    assert (
        "Without the collapsed seed(s) 2 (3 seeds left): augmentation network (IFT) − no augmentation on "
        "test accuracy +0.0033 ± 0.0067"
    ) in text
    rows["augnet"]["runs"][2]["collapsed"] = ""
    assert "Without the collapsed" not in " ".join(interpret(rows))


def test_overfitting_note_reads_the_validation_curve() -> None:
    up = [[{"inner_steps": s, "val_loss": v} for s, v in ((100, 0.30), (200, 0.27), (300, 0.33))]] * 2
    flat = [[{"inner_steps": s, "val_loss": v} for s, v in ((100, 0.30), (200, 0.27), (300, 0.27))]]
    notes = overfitting({"none": up, "handmade": flat})
    assert notes[0] == (
        "Validation loss of no augmentation (mean over seeds) turns up: lowest 0.2700 at step "
        "200, 0.3300 at the end (step 300, +22%)."
    )
    assert "hand-made (mean over seeds) does not turn up" in notes[1]


def test_the_augmented_figure_shows_a_brightness_offset(tmp_path: Path, monkeypatch) -> None:
    # A network that adds 0.3 to every pixel (last layer: weight 0, bias 0.3): the figure must draw
    # the augmented images brighter than the originals, not rescale each to its own range (which
    # would draw x + 0.3 exactly as x).
    import matplotlib.pyplot as plt

    from hypergradients.app import report

    fam = AugmentNet(1, wf=1)
    with torch.no_grad():
        fam.tensors()["augment.last.bias"].fill_(0.3)
    x = torch.rand(4, 1, 8, 8) * 0.7
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    report.plot_augmented(fam, x, tmp_path / "a.png")
    (fig,) = figs
    # the axes in row order: the first image of row 0 (originals) and of row 1 (augmented); the
    # colours seen are the image's norm applied to its data
    original, augmented = fig.axes[0].get_images()[0], fig.axes[len(x)].get_images()[0]
    seen_o = original.norm(original.get_array())
    seen_a = augmented.norm(augmented.get_array())
    assert float((seen_a - seen_o).mean()) > 0.2  # drawn brighter by about the offset
    plt.close(fig)


def test_too_deep_unet_is_refused_naming_the_key() -> None:
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["augment.depth=4"])  # 28 is not divisible by 8
    with pytest.raises(ConfigError, match=r"augment\.depth"):
        EXPERIMENT.check(cfg) if EXPERIMENT.check else None


def test_full_is_resnet18_on_cifar10():
    from hypergradients.app.experiments.augment_mnist import with_preset

    cfg = with_preset(resolve(SCHEMA, sets=["config=full", "seeds=[4]"]))
    assert cfg["model.name"] == "resnet18" and cfg["data.dataset"] == "cifar10" and cfg["seeds"] == [4]
    assert all(cfg[k] == v for k, v in FULL.items() if k != "seeds")  # the user's seeds stay
    assert with_preset(resolve(SCHEMA, sets=["config=full"]))["seeds"] == [0, 1, 2]
    # the authors' recipe: 200 epochs of 352 batches of 128, SGD-Nesterov lr 0.1, a hyper step every 9
    # minibatches by 0 Neumann terms, SGD-Nesterov hyper optimizer at lr 0.1 on α = the inner lr, crop
    # (±4 px) + flip in every arm, their U-Net
    assert (cfg["train.steps"], cfg["train.batch_size"], cfg["train.lr"], cfg["train.optimizer"]) == (
        70_400,
        128,
        0.1,
        "nesterov",
    )
    assert cfg["train.milestones"] == [0.3, 0.6, 0.8] and cfg["hyper.milestones"] == [0.2, 0.5, 0.7]
    assert (
        cfg["train.inner_steps"],
        cfg["hyper.method"],
        cfg["hyper.optimizer"],
        cfg["hyper.lr"],
        cfg["hyper.alpha"],
    ) == (9, "identity", "sgd", 0.1, 0.0)
    assert cfg["arms"] == ["handmade", "augnet+hand"] and cfg["augment.network"] == "paper"
    assert (cfg["handmade.shift"], cfg["handmade.degrees"], cfg["handmade.flip"]) == (4.0, 0.0, True)
    assert AugmentNet.paper(3).count() == 6659
    # without data.root, CIFAR-10 is refused naming the key, before any file
    with pytest.raises(ConfigError, match=r"data\.root"):
        EXPERIMENT.check(resolve(SCHEMA, sets=["config=full"])) if EXPERIMENT.check else None
    net = resnet18(3, 10)
    # ResNet-18 for CIFAR (3×3 stem): 11,173,962 weights
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_the_approximation_is_chosen_by_key() -> None:
    from hypergradients.app.experiments.augment_mnist import _method

    def pick(*sets: str) -> object:
        return _method(resolve(SCHEMA, sets=list(sets)))

    # identity: p = α·v with α the inner learning rate (hyper.alpha = 0); Neumann K terms: the
    # library's iters counts v itself, so K + 1; CG: hyper.iters iterations
    assert pick() == hg.Identity(scale=0.05)
    assert pick("hyper.method=neumann", "hyper.iters=1") == hg.Neumann(iters=2, alpha=0.05)
    assert pick("hyper.method=neumann", "hyper.iters=3", "hyper.alpha=0.01") == hg.Neumann(
        iters=4, alpha=0.01
    )
    assert pick("hyper.method=cg", "hyper.iters=5") == hg.CG(iters=5, tol=1e-6, damping=1e-3)


@pytest.mark.parametrize(
    "sets",
    [
        ["hyper.method=cg", "hyper.iters=2", "hyper.optimizer=adam"],
        ["hyper.method=neumann", "hyper.optimizer=sgd", "augment.network=paper"],
    ],
)
def test_the_learned_arm_runs_with_every_approximation(sets: list[str], tmp_path: Path) -> None:
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=['arms=["augnet"]', *sets])
    res = EXPERIMENT.run(RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False))
    (row,) = res.rows
    assert row["runs"][0]["hyper_steps"] == 3 and row["runs"][0]["hyper_steps_seen"] == 3


def test_an_optuna_trial_is_the_hand_made_arm_with_the_proposed_magnitudes(
    tmp_path: Path, monkeypatch
) -> None:
    # A tuner that proposes the default magnitudes (2 px, 10°) once: the trial must train exactly the
    # hand-made arm (same initial weights, batches and warps), so its test accuracy and loss equal
    # that arm's to the bit, and the arm's row, search.json and figure follow from that one trial.
    from hypergradients.app.experiments import augment_mnist
    from hypergradients.app.experiments.optuna_arm import Trial, TunerResult

    proposed: list[dict[str, float]] = []

    def one_trial(objective, space, *, budget_steps, steps_per_trial, seed):
        assert set(space) == {"shift", "degrees"} and budget_steps == 2 * steps_per_trial == 12
        p = {"shift": 2.0, "degrees": 10.0}
        proposed.append(p)
        val, test = objective(p)
        t = Trial(0, p, val, test, 0.5, steps_per_trial)
        return TunerResult([t], t, 0.5, None, budget_steps)

    monkeypatch.setattr(augment_mnist, "tpe", one_trial)
    monkeypatch.setattr(augment_mnist, "require_optuna", lambda: None)
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["arms=['handmade','augnet','optuna']"])
    res = EXPERIMENT.run(
        RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False, data=None)
    )
    by = {r["key"]: r for r in res.rows}
    hand, opt = by["handmade"]["runs"][0], by["optuna"]["runs"][0]
    assert proposed == [{"shift": 2.0, "degrees": 10.0}]
    assert (opt["test_acc"], opt["test_loss"], opt["extra_acc"]) == (
        hand["test_acc"],
        hand["test_loss"],
        hand["extra_acc"],
    )
    assert opt["trials"][0]["test"] == pytest.approx(1 - hand["test_acc"], abs=1e-15)
    assert by["optuna"]["hyperparameters"] == 2 and (opt["shift"], opt["degrees"]) == (2.0, 10.0)
    assert (tmp_path / "optuna-seed0" / "search.json").is_file()
    assert (tmp_path / "optuna_vs_ift.png").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "hand-made tuned by Optuna − hand-made" in report
    assert "Optuna's incumbent reached the test accuracy of augmentation network (IFT)" in report

    # --resume reads the finished search back instead of searching again
    def no_search(*a, **k):
        raise AssertionError("a finished search was run again on --resume")

    monkeypatch.setattr(augment_mnist, "tpe", no_search)
    again = EXPERIMENT.run(
        RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False, resume=True)
    )
    assert {r["key"]: r for r in again.rows}["optuna"]["runs"][0]["test_acc"] == opt["test_acc"]


def test_the_optuna_arm_with_optuna(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["arms=['none','optuna']"])
    res = EXPERIMENT.run(
        RunContext(config=cfg, out=tmp_path, device=torch.device("cpu"), progress=False, data=None)
    )
    opt = {r["key"]: r for r in res.rows}["optuna"]["runs"][0]
    # 2 trials of the 6 smoke steps each, within the search intervals; the arm's numbers are those
    # of the trial with the lowest validation loss
    assert [t["steps"] for t in opt["trials"]] == [6, 12]
    assert all(0 <= t["shift"] <= 4 and 0 <= t["degrees"] <= 30 for t in opt["trials"])
    best = min(opt["trials"], key=lambda t: t["val"])
    assert opt["test_acc"] == pytest.approx(1 - best["test"], abs=1e-15) and opt["val_loss"] == best["val"]


def test_the_optuna_arm_without_optuna_names_the_extra(monkeypatch) -> None:
    from hypergradients.app.experiments import augment_mnist

    def missing():
        raise ImportError("the optuna arm needs Optuna, an optional extra")

    monkeypatch.setattr(augment_mnist, "require_optuna", missing)
    cfg = resolve(SCHEMA, smoke=SMOKE, sets=["arms=['optuna']"])
    with pytest.raises(ConfigError, match=r"'arms'.*optional extra"):
        EXPERIMENT.check(cfg)
