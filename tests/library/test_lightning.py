"""The Lightning callback on a real lightning.Trainer (CPU, a tiny model, a few steps): the
hyperparameters move, and Lightning's checkpoint/resume restores them, their optimizer's state and
the solver state (a resumed run ends bit for bit where an uninterrupted one does)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hypergradients as hg

lightning = pytest.importorskip("lightning")  # a guard only: the dev extra installs it
from hypergradients.lightning import HyperCallback  # noqa: E402

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, generator=g, dtype=DT)

    def draw(n: int) -> TensorDataset:
        X = torch.randn(n, 12, generator=g, dtype=DT)
        return TensorDataset(
            X, (X @ w / math.sqrt(12) + 0.8 * torch.randn(n, generator=g, dtype=DT) > 0).long()
        )

    return draw(16), draw(64)


class _Lit(lightning.LightningModule):
    def __init__(self, net: nn.Module, hyper: hg.HyperOptimizer) -> None:
        super().__init__()
        self.net = net
        self.hyper = hyper

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.hyper.train_loss(batch)  # L_T: cross-entropy plus the weight-decay penalty, λ fixed

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.5, momentum=0.5)


def _linear() -> tuple[nn.Module, list[hg.hparams.Family]]:
    net = nn.Linear(12, 2).to(DT)
    return net, [hg.WeightDecay(net, init=1e-3)]


def _run(
    train: TensorDataset,
    val: TensorDataset,
    epochs: int,
    *,
    ckpt: Path | None = None,
    save: Path | None = None,
    make: Any = _linear,
    seed: int = 0,
) -> tuple[hg.HyperOptimizer, HyperCallback]:
    torch.manual_seed(seed)
    net, families = make()
    hyper = hg.HyperOptimizer(
        net, families, method=hg.CG(iters=4), optimizer=lambda ps: torch.optim.Adam(ps, lr=0.2)
    )
    cb = HyperCallback(hyper, DataLoader(val, batch_size=len(val)), every_n_steps=2)
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        deterministic=True,
    )
    with warnings.catch_warnings():
        # Lightning's advice for real runs (more DataLoader workers, a logger for self.log) is noise here.
        warnings.simplefilter("ignore")
        trainer.fit(_Lit(net, hyper), DataLoader(train, batch_size=4), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return hyper, cb


def test_callback_tunes_and_lightning_resume_restores_the_hyperparameters(tmp_path: Path) -> None:
    train, val = _data()
    straight, cb = _run(train, val, epochs=6)  # 4 batches per epoch: 24 steps, 12 hyper steps
    assert straight.steps == 12 and cb.last is not None and cb.last.applied
    # The hyperparameter moves: 12 Adam steps of lr 0.2 on log d, from 1e-3 to 2.6e-4 (observed; after
    # only 24 SGD steps the weights are far from fitting these 16 examples, and less decay helps L_V).
    assert abs(math.log(float(straight.natural()["weight_decay"]) / 1e-3)) > 1.0

    _run(train, val, epochs=3, save=tmp_path / "a.ckpt")
    st = torch.load(tmp_path / "a.ckpt", weights_only=True)  # tensors and plain values only
    saved = next(v for k, v in st["callbacks"].items() if k.startswith("HyperCallback"))
    assert saved["steps"] == 6 and saved["solver"]["p"] is not None
    resumed, _ = _run(train, val, epochs=6, ckpt=tmp_path / "a.ckpt")
    assert resumed.steps == 12
    # CG with 4 iterations warm-started from the saved p, Adam from its saved moments: any state not
    # restored changes the result, so bitwise equality says all of it came back.
    assert torch.equal(resumed.hparams["weight_decay"], straight.hparams["weight_decay"])
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 12


def _mlp_with_dropout() -> tuple[nn.Module, list[hg.hparams.Family]]:
    net = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    return net, [hg.Dropout(net, ["0", "2:input"], init=0.8, temperature=0.3), hg.WeightDecay(net, init=1e-3)]


def test_lightning_resume_with_dropout_is_bit_for_bit(tmp_path: Path) -> None:
    # The noise of the inner steps (hyper.train_loss) and of the hyper steps comes from the
    # HyperOptimizer's own generator, whose state the callback saves: the resumed run draws the
    # numbers the uninterrupted one drew, whatever state torch's global generator is in.
    train, val = _data()
    straight, _ = _run(train, val, epochs=6, make=_mlp_with_dropout)
    _run(train, val, epochs=3, save=tmp_path / "d.ckpt", make=_mlp_with_dropout)
    resumed, _ = _run(train, val, epochs=6, ckpt=tmp_path / "d.ckpt", make=_mlp_with_dropout, seed=99)
    assert resumed.steps == straight.steps == 12
    for k, t in straight.hparams.items():
        assert torch.equal(resumed.hparams[k], t), k
    for (k, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    moved = float(straight.natural()["dropout.0.output"].mean())
    assert moved != pytest.approx(0.8, abs=1e-6)  # the keep probabilities moved: the check has teeth


def test_callback_load_of_another_setups_state_raises_and_changes_nothing() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    hyper = hg.HyperOptimizer(net, [hg.WeightDecay(net, granularity="weight")])
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)  # another head
    foreign = hg.HyperOptimizer(other, [hg.WeightDecay(other, granularity="weight", init=0.5)]).state_dict()
    cb = HyperCallback(hyper, [])
    before = {k: t.clone() for k, t in hyper.hparams.items()}
    with pytest.raises(ValueError, match=r"'weight_decay.2.weight': saved shape \(3, 4\), this one \(2, 4\)"):
        cb.load_state_dict(foreign)
    # the first key fitted, yet nothing was copied
    assert all(torch.equal(hyper.hparams[k], t) for k, t in before.items())


def test_callback_arguments_are_checked() -> None:
    net = nn.Linear(3, 2)
    hyper = hg.HyperOptimizer(net, [hg.WeightDecay(net)])
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1, got 0"):
        HyperCallback(hyper, [], every_n_steps=0)


def test_hyperparameters_on_another_device_than_the_model_are_refused_at_fit_start() -> None:
    net = nn.Linear(3, 2)
    elsewhere = hg.WeightDecay(
        nn.Linear(3, 2, device="meta")
    )  # its tensors are on 'meta', the net's on the CPU
    cb = HyperCallback(hg.HyperOptimizer(net, [elsewhere]), [])
    with pytest.raises(
        ValueError, match=r"\['weight_decay'\] are on meta but the model trains on cpu: build the model"
    ):
        cb.on_fit_start(None, None)  # type: ignore[arg-type]  # neither is read


def test_the_preconditioned_identity_reads_the_trainers_adam() -> None:
    """configure_optimizers returns an Adam: the callback gives it to the HyperOptimizer, whose hyper
    steps then precondition with its diagonal, the one hg.adam_diagonal reads (checked at each step)."""
    train, val = _data()
    torch.manual_seed(0)
    net, families = _linear()
    hyper = hg.HyperOptimizer(net, families, method=hg.Identity(precondition="inner_optimizer"))
    checked: list[bool] = []

    def after(h: hg.HyperOptimizer, res: hg.HyperStep) -> None:
        assert isinstance(h.inner_optimizer, torch.optim.Adam) and res.info is not None
        D = hg.adam_diagonal(h.inner_optimizer, net)
        st = h.inner_optimizer.state[net.weight]
        lr, eps = h.inner_optimizer.param_groups[0]["lr"], h.inner_optimizer.param_groups[0]["eps"]
        b2 = h.inner_optimizer.param_groups[0]["betas"][1]
        assert torch.equal(
            D["weight"], (st["exp_avg_sq"].sqrt() / (1 - b2 ** float(st["step"])) ** 0.5 + eps) / lr
        )
        assert res.info.extra["preconditioned"] == 1.0 and res.info.extra["precondition_fallbacks"] == 0
        checked.append(True)

    hyper.after_step.append(after)

    class Lit(_Lit):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.net.parameters(), lr=0.05)

    cb = HyperCallback(hyper, DataLoader(val, batch_size=len(val)), every_n_steps=2)
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        deterministic=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lit(net, hyper), DataLoader(train, batch_size=4))
    assert hyper.steps == 2 and len(checked) == 2
