"""The Hugging Face callback on a real transformers.Trainer (CPU, tiny randomly initialised models
built from a config, nothing fetched from a hub): the hyperparameters move, and the Trainer's
checkpoint/resume restores them (a run interrupted at a checkpoint and resumed ends bit for bit where
an uninterrupted one does: hyperparameters and weights)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"   # a test must never reach a hub: tiny models are built from configs

import logging  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import hypergradients as hg  # noqa: E402

transformers = pytest.importorskip("transformers")   # a guard only: the dev extra installs it
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from hypergradients.hf import (  # noqa: E402
    STATE_FILE,
    HyperCallback,
    HyperTrainer,
    causal_lm_loss,
    model_loss,
    sequence_classification_loss,
)
from hypergradients.training.hyper import as_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)
transformers.logging.set_verbosity_error()   # the Trainer's info lines are noise here
V, T = 64, 8                                 # vocabulary, sequence length


def _gpt2(*, attn: str = "sdpa", dropout: float = 0.1, attn_dropout: float = 0.0,
          dtype: torch.dtype = torch.float32) -> Any:
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=dropout,
                                  embd_pdrop=dropout, attn_pdrop=attn_dropout, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def _bert(n_labels: int = 2) -> Any:
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=n_labels,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg)


def _lm_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences that mostly count up by one (learnable), as examples with an index."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % V
    noise = torch.rand(n, T, generator=g) < 0.2
    ids = torch.where(noise, torch.randint(0, V, (n, T), generator=g), ids)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": ids[i],
             "index": torch.tensor(i)} for i in range(n)]


def _cls_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Label 1 when token 5 appears; a quarter of the training labels flipped."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    y = (ids == 5).any(dim=1).long() | (torch.rand(n, generator=g) < 0.5).long() * 0
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": y[i],
             "index": torch.tensor(i)} for i in range(n)]


def _stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0] if k != "index"}


class _StopAt(TrainerCallback):
    """Ends training after step ``at`` (its checkpoint is written first): an interrupted run."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            control.should_training_stop = True


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=8,
                                learning_rate=3e-3, save_strategy="steps", save_steps=4, report_to="none",
                                logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                                remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


def _train(trainer: Any, **kw: Any) -> None:
    with warnings.catch_warnings():
        # the Trainer's advice for real runs (workers, tokenizers) is noise here
        warnings.simplefilter("ignore")
        trainer.train(**kw)


def _lm_run(out: Path, *, stop: int | None = None, resume: str | None = None, seed: int = 0
            ) -> tuple[Any, hg.HyperOptimizer, HyperCallback]:
    torch.manual_seed(seed)
    model = _gpt2()   # sdpa without attention dropout: the fused CPU kernel, no double backward
    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model, granularity="layer", init=1e-2)],
                              loss_fn=causal_lm_loss, method=hg.Neumann(iters=4, alpha=0.05),
                              hvp_mode="finite-difference",
                              optimizer=lambda ps: torch.optim.Adam(ps, lr=0.2))
    data = _lm_data(9, seed=1)
    val = [_stack(data[i:i + 3]) for i in (0, 3, 6)]   # three batches: a resume must continue at the third
    cb = HyperCallback(hyper, val, every_n_steps=2)
    extra = [_StopAt(stop)] if stop is not None else []
    trainer = HyperTrainer(model=model, args=_args(out), train_dataset=_lm_data(16, seed=0),
                           callbacks=[cb, *extra])
    _train(trainer, resume_from_checkpoint=resume)
    return model, hyper, cb


def _assert_same_run(a: tuple[Any, hg.HyperOptimizer, HyperCallback],
                     b: tuple[Any, hg.HyperOptimizer, HyperCallback]) -> None:
    (ma, ha, ca), (mb, hb, cb) = a, b
    assert ha.steps == hb.steps and ca.val_drawn == cb.val_drawn
    for k, t in ha.hparams.items():
        assert torch.equal(hb.hparams[k], t), k
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_weight_decay_per_layer_tunes_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    straight = _lm_run(tmp_path / "a")
    model, hyper, cb = straight
    assert hyper.steps == 4 and cb.last is not None and cb.last.applied
    # one decay per weight matrix (ndim >= 2): wte, wpe, attention and MLP projections of the block
    assert len(hyper.hparams) == 6
    moved = [abs(math.log(float(d) / 1e-2)) for d in hyper.natural().values()]
    assert max(moved) > 0.3   # 4 Adam steps of lr 0.2 on log d: the decays moved (observed ~0.8)

    interrupted = _lm_run(tmp_path / "b", stop=4)
    assert interrupted[1].steps == 2
    ckpt = tmp_path / "b" / "checkpoint-4"
    st = torch.load(ckpt / STATE_FILE, weights_only=True)   # tensors and plain values only
    assert st["global_step"] == 4 and st["hyper"]["steps"] == 2 and st["val_drawn"] == 2
    assert not (tmp_path / "b" / "checkpoint-8").exists()
    # a fresh process's view: another seed for everything built before the resume
    resumed = _lm_run(tmp_path / "b", resume=str(ckpt), seed=7)
    _assert_same_run(straight, resumed)
