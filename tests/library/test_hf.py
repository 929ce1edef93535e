"""The Hugging Face callback on a real transformers.Trainer (CPU, tiny randomly initialised models
built from a config, nothing fetched from a hub): the hyperparameters move, and the Trainer's
checkpoint/resume restores them (a run interrupted at a checkpoint and resumed ends bit for bit where
an uninterrupted one does: hyperparameters and weights)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a test must never reach a hub: tiny models are built from configs

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import hypergradients as hg

transformers = pytest.importorskip("transformers")  # a guard only: the dev extra installs it
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
transformers.logging.set_verbosity_error()  # the Trainer's info lines are noise here
V, T = 64, 8  # vocabulary, sequence length


def _gpt2(
    *, attn: str = "sdpa", dropout: float = 0.1, attn_dropout: float = 0.0, dtype: torch.dtype = torch.float32
) -> Any:
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=V,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=attn_dropout,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def _bert(n_labels: int = 2) -> Any:
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=n_labels,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg)


def _lm_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences that mostly count up by one (learnable), as examples with an index."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % V
    noise = torch.rand(n, T, generator=g) < 0.2
    ids = torch.where(noise, torch.randint(0, V, (n, T), generator=g), ids)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(T, dtype=torch.long),
            "labels": ids[i],
            "index": torch.tensor(i),
        }
        for i in range(n)
    ]


def _cls_data(n: int, seed: int, *, flip: int = 0) -> list[dict[str, torch.Tensor]]:
    """Label 1 when the first token is below V/2; the first ``flip`` labels flipped (noisy examples)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    y = (ids[:, 0] < V // 2).long()
    y[:flip] = 1 - y[:flip]
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(T, dtype=torch.long),
            "labels": y[i],
            "index": torch.tensor(i),
        }
        for i in range(n)
    ]


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
    base: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train(trainer: Any, **kw: Any) -> None:
    with warnings.catch_warnings():
        # the Trainer's advice for real runs (workers, tokenizers) is noise here
        warnings.simplefilter("ignore")
        trainer.train(**kw)


def _lm_run(
    out: Path, *, stop: int | None = None, resume: str | None = None, seed: int = 0
) -> tuple[Any, hg.HyperOptimizer, HyperCallback]:
    torch.manual_seed(seed)
    model = _gpt2()  # sdpa without attention dropout: the fused CPU kernel, no double backward
    hyper = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, granularity="layer", init=1e-2)],
        loss_fn=causal_lm_loss,
        method=hg.Neumann(iters=4, alpha=0.05),
        hvp_mode="finite-difference",
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.2),
    )
    data = _lm_data(9, seed=1)
    val = [_stack(data[i : i + 3]) for i in (0, 3, 6)]  # three batches: a resume must continue at the third
    cb = HyperCallback(hyper, val, every_n_steps=2)
    extra = [_StopAt(stop)] if stop is not None else []
    trainer = HyperTrainer(
        model=model, args=_args(out), train_dataset=_lm_data(16, seed=0), callbacks=[cb, *extra]
    )
    _train(trainer, resume_from_checkpoint=resume)
    return model, hyper, cb


def _assert_same_run(
    a: tuple[Any, hg.HyperOptimizer, HyperCallback], b: tuple[Any, hg.HyperOptimizer, HyperCallback]
) -> None:
    (ma, ha, ca), (mb, hb, cb) = a, b
    assert ha.steps == hb.steps and ca.val_drawn == cb.val_drawn
    for k, t in ha.hparams.items():
        assert torch.equal(hb.hparams[k], t), k
    for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_weight_decay_per_layer_tunes_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    straight = _lm_run(tmp_path / "a")
    _, hyper, cb = straight
    assert hyper.steps == 4 and cb.last is not None and cb.last.applied
    # one decay per weight matrix (ndim >= 2): wte, wpe, attention and MLP projections of the block
    assert len(hyper.hparams) == 6
    moved = [abs(math.log(float(d) / 1e-2)) for d in hyper.natural().values()]
    assert max(moved) > 0.3  # 4 Adam steps of lr 0.2 on log d: the decays moved (observed ~0.8)

    interrupted = _lm_run(tmp_path / "b", stop=4)
    assert interrupted[1].steps == 2
    ckpt = tmp_path / "b" / "checkpoint-4"
    st = torch.load(ckpt / STATE_FILE, weights_only=True)  # tensors and plain values only
    assert st["global_step"] == 4 and st["hyper"]["steps"] == 2 and st["val_drawn"] == 2
    assert not (tmp_path / "b" / "checkpoint-8").exists()
    # a fresh process's view: another seed for everything built before the resume
    resumed = _lm_run(tmp_path / "b", resume=str(ckpt), seed=7)
    _assert_same_run(straight, resumed)


class _Recording(HyperCallback):
    """Records the dataset indices of every hyper step's training batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every_n_steps == 0:
            self.seen += self._batch["index"].tolist()
        super().on_step_end(args, state, control, **kwargs)


def _cls_run(
    out: Path, *, stop: int | None = None, resume: str | None = None, seed: int = 0
) -> tuple[Any, hg.HyperOptimizer, _Recording]:
    torch.manual_seed(seed)
    model = _bert()  # eager attention: plain matrix products, so the default double backward works
    hyper = hg.HyperOptimizer(
        model,
        [hg.ExampleWeights(16)],
        loss_fn=sequence_classification_loss,
        method=hg.Neumann(iters=4, alpha=0.05),
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.5),
    )
    cb = _Recording(hyper, [_stack(_cls_data(8, seed=1))], every_n_steps=3)
    extra = [_StopAt(stop)] if stop is not None else []
    trainer = HyperTrainer(
        model=model,
        args=_args(out, max_steps=6, save_steps=3),
        train_dataset=_cls_data(16, seed=0, flip=4),
        callbacks=[cb, *extra],
    )
    _train(trainer, resume_from_checkpoint=resume)
    return model, hyper, cb


def test_example_weights_by_the_dataset_index_tune_and_resume_bit_for_bit(tmp_path: Path) -> None:
    straight = _cls_run(tmp_path / "a")
    _, hyper, cb = straight
    assert hyper.steps == 2 and len(cb.seen) == 8
    omega = hyper.natural()["example_weights"]
    # The hypergradient reaches exactly the examples of the hyper steps' batches, found by their
    # "index" entries (Adam leaves an entry with a zero gradient exactly where it was).
    moved = {i for i in range(16) if float(omega[i]) != 1.0}
    assert moved == set(cb.seen)

    _cls_run(tmp_path / "b", stop=3)  # mid-epoch (4 steps per epoch): the Trainer skips batches on resume
    resumed = _cls_run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-3"), seed=7)
    _assert_same_run(straight, resumed)


def test_gradient_accumulation_averages_the_micro_batches(tmp_path: Path) -> None:
    # L_T is a mean over each micro-batch: two micro-batches of 2 must make the step one batch of 4
    # makes. Summed instead (the Trainer does not divide a loss it takes as scaled by num_items_in_batch)
    # the gradient would double.
    def run(batch: int, accumulate: int) -> Any:
        torch.manual_seed(0)
        model = _gpt2(dropout=0.0, dtype=torch.float64)
        hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model, init=1e-2)], loss_fn=causal_lm_loss)
        cb = HyperCallback(hyper, [_stack(_lm_data(4, seed=1))], every_n_steps=100)
        args = _args(
            tmp_path / f"{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            max_steps=3,
            save_strategy="no",
            optim="sgd",
            learning_rate=0.5,
        )
        _train(HyperTrainer(model=model, args=args, train_dataset=_lm_data(12, seed=0), callbacks=[cb]))
        return model

    a, b = run(4, 1), run(2, 2)
    torch.manual_seed(0)
    start = _gpt2(dropout=0.0, dtype=torch.float64)  # the initial weights of both runs
    assert not torch.equal(a.state_dict()["lm_head.weight"], start.state_dict()["lm_head.weight"])
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        # float64: the same sums in another order, ~1e-16 relative per step; doubled gradients would
        # be off by the steps themselves (~1e-2)
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=k)


def test_finite_difference_hvps_through_sdpa_match_the_exact_eager_hypergradient() -> None:
    # The fused CPU attention kernel has no double backward: the default mode refuses, naming the fix;
    # the finite-difference mode agrees with the exact double backward through eager attention.
    batch = _stack(_lm_data(4, seed=0))
    val = _stack(_lm_data(4, seed=1))
    method = hg.Neumann(iters=3, alpha=0.05)

    def hyper(attn: str, mode: str) -> hg.HyperOptimizer:
        torch.manual_seed(0)
        model = _gpt2(attn=attn, dropout=0.0, dtype=torch.float64)
        return hg.HyperOptimizer(
            model,
            [hg.WeightDecay(model, granularity="layer", init=1e-2)],
            loss_fn=causal_lm_loss,
            method=method,
            hvp_mode=mode,
        )  # type: ignore[arg-type]

    with pytest.raises(
        hg.HypergradientError,
        match=r'_scaled_dot_product_flash_attention_for_cpu_backward.*hvp_mode="finite-difference"',
    ):
        hyper("sdpa", "reverse").hypergradient(batch, val)
    exact, _ = hyper("eager", "reverse").hypergradient(batch, val)
    fd_eager, _ = hyper("eager", "finite-difference").hypergradient(batch, val)
    fd, info = hyper("sdpa", "finite-difference").hypergradient(batch, val)
    assert info.hvps == 2  # Neumann(iters=3): two products; the hyper step computes no residual

    def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        num = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in b))
        return num / math.sqrt(sum(float(b[k].pow(2).sum()) for k in b))

    # float64 central differences, eps^(2/3) ≈ 4e-11 relative per product; the hypergradient is a
    # small difference of larger terms (per layer d·Σ w·p), which amplifies it: observed 3e-7.
    assert rel(fd, exact) < 1e-5
    # the fused kernel and the eager attention compute the same function: observed 1e-10 apart
    assert rel(fd, fd_eager) < 1e-8


def test_the_losses_of_a_model_output() -> None:
    torch.manual_seed(0)
    model = _gpt2(dropout=0.0, dtype=torch.float64).eval()
    b = as_batch(_stack(_lm_data(4, seed=0)))
    out = model(**b.x)
    per_seq = causal_lm_loss(out, b)
    # every token labelled: the mean of the per-sequence means is the model's own loss; float64 kept
    assert per_seq.shape == (4,) and per_seq.dtype == torch.float64
    # (the model's own loss is computed in float32 whatever the model's dtype: 1e-6)
    torch.testing.assert_close(per_seq.mean(), out.loss.double(), rtol=1e-6, atol=0)
    assert model_loss(out, b) is out.loss
    # padding (-100) is left out of each sequence's mean
    labels = b.y.clone()
    labels[0, 5:] = -100
    padded = causal_lm_loss(out, hg.hparams.Batch(b.x, labels, b.index))
    logp = torch.log_softmax(out.logits[0, :4], dim=-1)
    torch.testing.assert_close(padded[0], -logp.gather(1, labels[0, 1:5, None]).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(padded[1:], per_seq[1:], rtol=0, atol=0)

    bert = _bert(n_labels=3).eval()
    c = as_batch(_stack(_cls_data(4, seed=0)))
    out_c = bert(**c.x)
    torch.testing.assert_close(sequence_classification_loss(out_c, c).mean(), out_c.loss, rtol=1e-6, atol=0)


class _OwnTrainer(transformers.Trainer):
    """A Trainer subclass of one's own: the recipe of the module docstring."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kw: Any) -> Any:
        cb = next(c for c in self.callback_handler.callbacks if isinstance(c, HyperCallback))
        return cb.train_loss(inputs)


def test_a_plain_trainer_resumes_from_its_output_dir(tmp_path: Path) -> None:
    # Without HyperTrainer the callback finds its state in <output_dir>/checkpoint-<step>.
    def run(
        out: Path, *, stop: int | None = None, resume: bool = False
    ) -> tuple[Any, hg.HyperOptimizer, HyperCallback]:
        torch.manual_seed(0)
        model = _gpt2(attn="eager")
        hyper = hg.HyperOptimizer(
            model,
            [hg.WeightDecay(model, init=1e-2)],
            loss_fn=model_loss,
            method=hg.Neumann(iters=2, alpha=0.05),
            optimizer=lambda ps: torch.optim.Adam(ps, lr=0.2),
        )
        cb = HyperCallback(hyper, [_stack(_lm_data(4, seed=1))], every_n_steps=2)
        extra = [_StopAt(stop)] if stop is not None else []
        trainer = _OwnTrainer(
            model=model,
            args=_args(out, max_steps=6, save_steps=2),
            train_dataset=[{k: v for k, v in e.items() if k != "index"} for e in _lm_data(16, seed=0)],
            callbacks=[*extra, cb],
        )
        _train(trainer, resume_from_checkpoint=resume or None)
        return model, hyper, cb

    straight = run(tmp_path / "a")
    assert straight[1].steps == 3
    run(tmp_path / "b", stop=4)
    _assert_same_run(straight, run(tmp_path / "b", resume=True))  # the Trainer picks checkpoint-4


def _small() -> tuple[Any, hg.HyperOptimizer]:
    torch.manual_seed(0)
    model = _bert()
    return model, hg.HyperOptimizer(model, [hg.ExampleWeights(16)], loss_fn=sequence_classification_loss)


def test_wiring_mistakes_are_refused_with_the_fix(tmp_path: Path) -> None:
    model, hyper = _small()
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1, got 0"):
        HyperCallback(hyper, [], every_n_steps=0)
    with pytest.raises(
        ValueError, match=r"default cross-entropy .* loss_fn=hypergradients.hf.causal_lm_loss"
    ):
        HyperCallback(hg.HyperOptimizer(model, [hg.WeightDecay(model)]), [])
    cb = HyperCallback(hyper, [])
    batch = _stack(_cls_data(4, seed=0))
    with pytest.raises(
        ValueError,
        match=r"'example_weights' weights examples by batch\['index'\].*remove_unused_columns=False",
    ):
        cb.train_loss(batch)
    with pytest.raises(ValueError, match=r"exactly one hypergradients\.hf\.HyperCallback in callbacks"):
        HyperTrainer(model=model, args=_args(tmp_path))
    other, _ = _small()
    with pytest.raises(ValueError, match="built on another model than the Trainer's model="):
        HyperTrainer(model=other, args=_args(tmp_path), callbacks=[cb])
    with pytest.raises(ValueError, match="a dict batch must hold the targets under 'labels'"):
        as_batch({"input_ids": batch["input_ids"]})

    # The plain Trainer's loss leaves out the families' terms: refused at the first step.
    plain = transformers.Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        callbacks=[cb],
        train_dataset=[{k: v for k, v in e.items() if k != "index"} for e in _cls_data(4, seed=0)],
    )
    with pytest.raises(
        RuntimeError, match=r"step 1: the Trainer's loss did not go through HyperCallback\.train_loss"
    ):
        _train(plain)


def test_the_callback_refuses_what_it_cannot_resume_or_run(tmp_path: Path) -> None:
    from types import SimpleNamespace

    _, hyper = _small()
    cb = HyperCallback(hyper, [_stack(_cls_data(4, seed=1))])
    args = SimpleNamespace(output_dir=str(tmp_path), world_size=1, n_gpu=1)
    with pytest.raises(
        FileNotFoundError, match=r"resumes at step 4, but .*checkpoint-4/hypergradients.pt does not exist"
    ):
        cb.on_train_begin(args, SimpleNamespace(global_step=4), None)
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-4").mkdir()
    cb.on_save(args, SimpleNamespace(global_step=2), None)
    (tmp_path / "checkpoint-2" / STATE_FILE).rename(tmp_path / "checkpoint-4" / STATE_FILE)
    with pytest.raises(ValueError, match="written at step 2, but the Trainer resumes at step 4"):
        cb.on_train_begin(args, SimpleNamespace(global_step=4), None)
    cb.resume_from(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="the Trainer starts from step 0"):
        cb.on_train_begin(args, SimpleNamespace(global_step=0), None)
    with pytest.raises(ValueError, match=r"world_size 2, n_gpu 1.*one device"):
        cb.on_train_begin(
            SimpleNamespace(output_dir=str(tmp_path), world_size=2, n_gpu=1),
            SimpleNamespace(global_step=0),
            None,
        )


def test_load_state_dict_is_all_or_nothing() -> None:
    _, hyper = _small()
    cb = HyperCallback(hyper, [])
    before = {k: t.clone() for k, t in hyper.hparams.items()}
    _, other = _small()
    with torch.no_grad():
        other.hparams["example_weights"].fill_(0.5)
    state = HyperCallback(other, [_stack(_cls_data(4, seed=1))]).state_dict()
    # the hyper state fits, but the validation batches to skip are not there: nothing changes
    state["val_drawn"] = 1
    with pytest.raises(ValueError, match="the validation batches are empty"):
        cb.load_state_dict(state)
    assert all(torch.equal(hyper.hparams[k], t) for k, t in before.items()) and cb.val_drawn == 0
    with pytest.raises(ValueError, match=r"the HyperCallback state's val_drawn is -1, not a count"):
        cb.load_state_dict({**state, "val_drawn": -1})
    with pytest.raises(
        ValueError,
        match=r"not a HyperCallback state \(version 1, keys \['hparams', .*goes to hyper\.load_state_dict",
    ):
        cb.load_state_dict(other.state_dict())  # the HyperOptimizer's own state, not the callback's


@pytest.mark.parametrize("method", ["identity", "first-order"])
def test_cheap_methods_through_fused_attention(tmp_path: Path, method: str) -> None:
    """GPT-2 with the fused sdpa kernel (no double backward) and the Trainer's AdamW: the preconditioned
    identity reads the Trainer's optimizer (the callback gives it to the HyperOptimizer; its mixed
    product by finite differences here), FirstOrder needs first-order gradients only, in any mode.
    Every hyper step applies."""
    torch.manual_seed(0)
    model = _gpt2()
    m = (
        hg.Identity(precondition="inner_optimizer")
        if method == "identity"
        else hg.FirstOrder(sigma=100.0, steps=2, lr=0.01)
    )
    hyper = hg.HyperOptimizer(
        model,
        [hg.WeightDecay(model, granularity="layer", init=1e-2)],
        loss_fn=causal_lm_loss,
        method=m,
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.2),
        hvp_mode="finite-difference" if method == "identity" else "reverse",
    )
    data = _lm_data(9, seed=1)
    cb = HyperCallback(hyper, [_stack(data[i : i + 3]) for i in (0, 3, 6)], every_n_steps=2)
    seen: list[dict[str, torch.Tensor]] = []
    hyper.before_step.append(
        lambda h: (
            seen.append(hg.adam_diagonal(h.inner_optimizer, model)) if h.inner_optimizer is not None else None
        )
    )
    trainer = HyperTrainer(
        model=model,
        args=_args(tmp_path, save_strategy="no"),
        train_dataset=_lm_data(16, seed=0),
        callbacks=[cb],
    )
    _train(trainer)
    assert hyper.steps == 4 and hyper.skipped == 0
    assert cb.last is not None and cb.last.info is not None and cb.last.hypergradient is not None
    assert all(math.isfinite(float(t.norm())) for t in cb.last.hypergradient.values())
    if method == "identity":
        assert cb.last.info.extra["preconditioned"] == 1.0 and len(seen) == 4
        assert all(torch.isfinite(d).all() and (d > 0).all() for d in seen[0].values())
        # the linear schedule ends at lr = 0: D = inf there, p = 0 (the hypergradient's direct term, 0)
        assert all(torch.isinf(d).all() for d in seen[-1].values())
        assert all(float(t.abs().max()) == 0.0 for t in cb.last.hypergradient.values())
    else:
        assert cb.last.info.hvps == 0 and cb.last.info.extra["warm_start"] == 1.0
