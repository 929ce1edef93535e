"""Hugging Face ``transformers``: the hyper step of Algorithm 1 inside a ``Trainer`` (the ``hf`` extra).

:class:`HyperCallback` calls :meth:`HyperOptimizer.step <hypergradients.HyperOptimizer.step>`
every ``every_n_steps`` optimizer steps of a ``transformers.Trainer``, on the training batch of
that step for ``L_T`` and the next validation batch (cycled) for ``L_V``. :class:`HyperTrainer` is
a ``Trainer`` whose training loss is ``L_T`` (the model's loss plus the families' terms, the
hyperparameters fixed)::

    hyper = hg.HyperOptimizer(model, [hg.WeightDecay(model, granularity="layer")], loss_fn=causal_lm_loss)
    trainer = HyperTrainer(model=model, args=TrainingArguments("out"), train_dataset=train,
                           callbacks=[HyperCallback(hyper, val_batches, every_n_steps=10)])
    trainer.train()                      # resume_from_checkpoint=... restores the hyper state too

The Trainer's model, batches, optimizer and learning-rate schedule are its own: the hyper step
works on copies of the weights and changes only the hyperparameters (its forwards in training mode
draw the model's dropout masks from torch's global generator, as the Trainer's do). A
``HyperOptimizer`` built without ``inner_optimizer=`` is given the Trainer's optimizer, to read
only, for ``hg.Identity(precondition="inner_optimizer")`` (AdamW's diagonal at the scheduled
learning rate; :func:`~hypergradients.adam_diagonal`). With a Trainer subclass of
your own, return ``callback.train_loss(inputs)`` from its ``compute_loss`` in training (what
:class:`HyperTrainer` does); the callback refuses to step if the Trainer's loss did not go
through it, since the weights would then be trained on another objective than ``L_T``.

Batches are the Trainer's dicts (``input_ids``, ``attention_mask``, ``labels``, ...): the model is
called as ``model(**batch)`` and ``loss_fn(outputs, batch)`` reads the ``ModelOutput``:
:func:`causal_lm_loss` (one loss per sequence, for per-example families), :func:`sequence_classification_loss`
(one per example) or :func:`model_loss` (the model's own scalar ``outputs.loss``: penalty-only
families such as weight decay). The validation batches are dicts too, from any iterable (a
``DataLoader`` with a collator, a list). :class:`~hypergradients.ExampleWeights` reads each
example's position in the training set from the batch's ``"index"`` entry: give the dataset an
``index`` column and set ``TrainingArguments(remove_unused_columns=False)`` (the Trainer drops
columns the model does not take); the model never sees ``"index"``.

Attention kernels: ``scaled_dot_product_attention`` on the CPU has no double backward whenever it
runs its fused kernel (no attention dropout, e.g. in a config with ``attn_pdrop=0``), and the
default ``hvp_mode="reverse"`` then refuses with an error naming the fix. Either build the model
with ``attn_implementation="eager"`` (plain matrix products: the exact double backward), or pass
``HyperOptimizer(..., hvp_mode="finite-difference")`` (first-order gradients only; each
Hessian-vector product is a central difference with the model's dropout masks replayed, accurate
to about ``eps^(2/3)`` relative, 2e-5 in float32: ``docs/finite-difference-hvp.md``). The model's
own dropout is active in ``L_T`` (training mode), drawn from torch's global generator, which the
Trainer saves in its checkpoints.

Checkpoints: at every save the callback writes ``hypergradients.pt`` into the Trainer's
checkpoint folder (the :class:`~hypergradients.HyperOptimizer`'s state: hyperparameters, their
optimizer, the solver state, the noise generator; the number of validation batches drawn; the
global step; tensors and plain values only, read back with ``torch.load(weights_only=True)``), and
``trainer.train(resume_from_checkpoint=...)`` reads it back, so a resumed run ends bit for bit where
an uninterrupted one does (the validation batches continue where they were: it reads and drops
those already used, so a list, an unshuffled ``DataLoader`` or one with its own seeded generator
repeats exactly). :class:`HyperTrainer` knows the folder it resumes from; under a plain
``Trainer`` the callback looks in ``<output_dir>/checkpoint-<global step>`` (the Trainer's own
layout) unless :meth:`HyperCallback.resume_from` named the folder.

One process on one device: under ``torchrun`` or with several GPUs in one process the Trainer
wraps the model, which the hyper step's forward would bypass; the callback refuses both. The
hyperparameters live where the families created them: put the model on the Trainer's device
(``model.to(args.device)``) before building them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # an optional extra
    raise ImportError(
        "hypergradients.hf needs Hugging Face transformers: pip install 'hypergradients[hf]'"
    ) from e

from ..hparams.base import Batch
from ..hparams.example_weights import ExampleWeights
from .files import load_checkpoint, save_atomic
from .hyper import HyperOptimizer, HyperStep, classification_loss

__all__ = [
    "STATE_FILE",
    "HyperCallback",
    "HyperTrainer",
    "causal_lm_loss",
    "model_loss",
    "sequence_classification_loss",
]

STATE_FILE = "hypergradients.pt"
_VERSION = 1


# ---------------------------------------------------------------------- losses of a ModelOutput
def model_loss(outputs: Any, batch: Batch) -> Tensor:
    """The model's own loss ``outputs.loss`` (a scalar, from the batch's ``labels``): for families
    that only add a penalty (weight decay); a family that weights examples needs per-example losses."""
    loss = getattr(outputs, "loss", None)
    if not isinstance(loss, Tensor):
        raise ValueError(
            "the model returned no loss (outputs.loss is None): the batch needs 'labels', and "
            "the model must compute a loss from them (a ...ForCausalLM or "
            "...ForSequenceClassification head)"
        )
    return loss


def _logits(outputs: Any) -> Tensor:
    """``outputs.logits``, half precision (float16, bfloat16) upcast to float32 for the softmax."""
    logits = getattr(outputs, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"the model's output ({type(outputs).__name__}) has no tensor 'logits': pass "
            "loss_fn=hypergradients.hf.model_loss to use the model's own loss"
        )
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def causal_lm_loss(outputs: Any, batch: Batch) -> Tensor:
    """Per-sequence next-token cross-entropy ``(B,)``: the mean over each sequence's predicted tokens.

    Token ``t + 1``'s label is predicted from the logits at ``t``; labels ``-100`` (padding) are
    left out, as by the models' own loss. With equally many labelled tokens in every sequence the
    batch mean equals ``outputs.loss``. A sequence with no labelled token gets 0.
    """
    logits, labels = _logits(outputs)[:, :-1], batch.y[:, 1:]
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    count = (labels != -100).sum(dim=1).clamp(min=1)
    return tok.sum(dim=1) / count


def sequence_classification_loss(outputs: Any, batch: Batch) -> Tensor:
    """Per-example cross-entropy ``(B,)`` of ``outputs.logits`` ``(B, C)`` against ``labels`` ``(B,)``
    (single-label classification)."""
    return F.cross_entropy(_logits(outputs), batch.y, reduction="none")


# ---------------------------------------------------------------------- the callback
def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches again and again (each pass calls ``iter`` anew, as a DataLoader's epochs do)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("the validation batches are empty: pass a non-empty DataLoader or list")


class HyperCallback(TrainerCallback):
    """A hyper step every ``every_n_steps`` optimizer steps of a ``transformers.Trainer``.

    Args:
        hyper: the :class:`~hypergradients.HyperOptimizer` of the model the Trainer trains, with a
            ``loss_fn`` for the model's output (:func:`causal_lm_loss`, :func:`sequence_classification_loss`
            or :func:`model_loss`); the hyper step's settings (``method``, ``hvp_mode``, the
            hyperparameters' optimizer, ``on_solver_error``) are its own.
        val_batches: an iterable of validation batches (dicts), cycled; each defines ``L_V``.
        every_n_steps: optimizer steps between hyper steps (``state.global_step`` multiples).

    ``last`` is the last :class:`~hypergradients.HyperStep`; ``val_drawn`` counts the validation
    batches used. See the module docstring for the loss, the checkpoints and the resume.
    """

    def __init__(self, hyper: HyperOptimizer, val_batches: Iterable[Any], *, every_n_steps: int = 10) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not isinstance(hyper, HyperOptimizer):
            raise TypeError(f"hyper must be a hypergradients.HyperOptimizer, got {type(hyper).__name__}")
        if hyper.objective.loss_fn is classification_loss:
            raise ValueError(
                "the HyperOptimizer's loss_fn is the default cross-entropy of a logits tensor, "
                "but a transformers model returns a ModelOutput: build it with loss_fn="
                "hypergradients.hf.causal_lm_loss, sequence_classification_loss or model_loss"
            )
        self.hyper = hyper
        self.every_n_steps = every_n_steps
        self._val_batches = val_batches
        self._val = _cycle(val_batches)
        self.val_drawn = 0
        self.last: HyperStep | None = None
        self._batch: Any = None  # the training batch of the current optimizer step
        self._resume: str | None = None
        self._needs_index = [f.name for f in hyper.families if isinstance(f, ExampleWeights)]

    # ------------------------------------------------------------------ the training loss
    def train_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """``L_T`` on the Trainer's batch with the live weights and the hyperparameters fixed (what the
        Trainer should minimise); the batch is also the hyper step's training batch for this step."""
        if self._needs_index and isinstance(batch, Mapping) and "index" not in batch:
            raise ValueError(
                f"the family {self._needs_index[0]!r} weights examples by batch['index'], which "
                f"this batch lacks (it has {sorted(batch)}): give the training set an 'index' "
                "column (each example's position) and set TrainingArguments("
                "remove_unused_columns=False), which keeps it"
            )
        self._batch = batch
        return self.hyper.train_loss(batch)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "world_size", 1) > 1 or getattr(args, "n_gpu", 1) > 1:
            raise ValueError(
                f"HyperCallback runs in one process on one device (world_size "
                f"{args.world_size}, n_gpu {args.n_gpu}): the Trainer wraps the model "
                "for data parallelism, which the hyper step's forward would bypass; train on "
                "one device (CUDA_VISIBLE_DEVICES=0, no torchrun)"
            )
        weights = list(self.hyper.model.parameters())
        if weights:
            device = weights[0].device
            wrong = [k for k, t in self.hyper.hparams.items() if t.device != device]
            if wrong:
                raise ValueError(
                    f"the hyperparameters {wrong} are on {self.hyper.hparams[wrong[0]].device} "
                    f"but the Trainer put the model on {device}: move the model there first "
                    "(model.to(args.device)), then build the families"
                )
        folder, self._resume = self._resume, None
        if state.global_step == 0:
            if folder is not None:
                raise ValueError(
                    f"resume_from({folder!r}) was called, but the Trainer starts from step 0: "
                    "pass the same folder to trainer.train(resume_from_checkpoint=...)"
                )
            return
        if folder is None:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._load_folder(folder, state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._batch = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._batch is None:
            raise RuntimeError(
                f"step {state.global_step}: the Trainer's loss did not go through "
                "HyperCallback.train_loss, so the weights are not trained on L_T (the loss "
                "plus the families' terms): use hypergradients.hf.HyperTrainer, or return "
                "callback.train_loss(inputs) from your Trainer's compute_loss"
            )
        if state.global_step % self.every_n_steps != 0:
            return
        if self.hyper.inner_optimizer is None:  # for hg.Identity(precondition="inner_optimizer")
            self.hyper.inner_optimizer = kwargs.get("optimizer")
        device = next(iter(self.hyper.hparams.values())).device
        bv = next(self._val)
        self.val_drawn += 1
        self.last = self.hyper.step(self._batch, _to_device(bv, device))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"the Trainer's checkpoint folder {folder} does not exist (a "
                "hyperparameter search saves elsewhere, which HyperCallback does not "
                "support)"
            )
        save_atomic(
            {**self.state_dict(), "global_step": int(state.global_step)}, os.path.join(folder, STATE_FILE)
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The :class:`~hypergradients.HyperOptimizer`'s state and the validation batches drawn."""
        return {"version": _VERSION, "hyper": self.hyper.state_dict(), "val_drawn": self.val_drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, all or nothing (as :meth:`HyperOptimizer.load_state_dict
        <hypergradients.HyperOptimizer.load_state_dict>`); the validation batches continue after the
        ``val_drawn`` already used (read again from the start of ``val_batches`` and dropped)."""
        if not isinstance(state, Mapping) or state.get("version") != _VERSION or "hyper" not in state:
            found = (
                f"version {state.get('version')!r}, keys {sorted(map(str, state))}"
                if isinstance(state, Mapping)
                else f"a {type(state).__name__}"
            )
            raise ValueError(
                f"not a HyperCallback state ({found}; expected version {_VERSION} with 'hyper' "
                "and 'val_drawn'): pass the dict that HyperCallback.state_dict() returned (a "
                "HyperOptimizer's own state goes to hyper.load_state_dict)"
            )
        drawn = state.get("val_drawn")
        if isinstance(drawn, bool) or not isinstance(drawn, int) or drawn < 0:
            raise ValueError(f"the HyperCallback state's val_drawn is {drawn!r}, not a count")
        before = self.hyper.state_dict()
        with torch.no_grad():
            self.hyper.load_state_dict(state["hyper"])  # all or nothing by itself
        val = _cycle(self._val_batches)
        try:
            for _ in range(drawn):
                next(val)
        except BaseException:
            with torch.no_grad():
                self.hyper.load_state_dict(before)
            raise
        self._val, self.val_drawn = val, drawn

    def resume_from(self, folder: str | os.PathLike[str]) -> None:
        """Name the checkpoint folder the next ``trainer.train(resume_from_checkpoint=folder)`` resumes
        from (:class:`HyperTrainer` does this itself; a plain Trainer's callback otherwise looks in
        ``<output_dir>/checkpoint-<step>``). The state is read when training begins."""
        self._resume = os.fspath(folder)

    def _load_folder(self, folder: str, global_step: int) -> None:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the Trainer resumes at step {global_step}, but {path} does not exist: "
                "resume from a checkpoint that a run with HyperCallback saved; for a "
                "folder outside output_dir, use hypergradients.hf.HyperTrainer or call "
                "callback.resume_from(folder) first"
            )
        state = load_checkpoint(
            path,
            what="HyperCallback state",
            fix="resume from an intact checkpoint that a run with HyperCallback saved",
        )
        saved = state.get("global_step") if isinstance(state, Mapping) else None
        if saved != global_step:
            raise ValueError(
                f"{path} was written at step {saved!r}, but the Trainer resumes at step "
                f"{global_step}: it belongs to another checkpoint"
            )
        # read onto the CPU; the warm-start vector belongs beside the weights (the optimizer's state is
        # placed by torch.optim, the noise generator's stays on the CPU)
        hyper = state.get("hyper")
        if isinstance(hyper, dict) and hyper.get("solver") is not None:
            hyper["solver"] = _to_device(hyper["solver"], next(iter(self.hyper.hparams.values())).device)
        self.load_state_dict(state)


class HyperTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on ``L_T`` of the :class:`HyperCallback` in its ``callbacks``.

    In training, ``compute_loss`` returns ``callback.train_loss(inputs)`` (the model's loss plus the
    families' terms); in evaluation it is the Trainer's own (without the ``"index"`` entry). The loss
    is a per-batch mean, so the Trainer divides it by the gradient accumulation steps.
    ``train(resume_from_checkpoint=...)`` tells the callback which folder to read its state from.
    Everything else is the Trainer's.
    """

    # L_T is a mean over the micro-batch: the Trainer must divide it by the accumulation steps. It reads
    # the first flag (transformers 5), or else divides when the second is False (transformers 4.52-4.57).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        found = [c for c in self.callback_handler.callbacks if isinstance(c, HyperCallback)]
        if len(found) != 1:
            raise ValueError(
                f"HyperTrainer needs exactly one hypergradients.hf.HyperCallback in "
                f"callbacks=[...], got {len(found)}"
            )
        self.hyper_callback: HyperCallback = found[0]
        if self.hyper_callback.hyper.model is not self.model:
            raise ValueError(
                "the HyperCallback's HyperOptimizer was built on another model than the "
                "Trainer's model=: build both on the same module"
            )

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if model.training and not return_outputs:
            return self.hyper_callback.train_loss(inputs)
        inputs = {k: v for k, v in inputs.items() if k != "index"}
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)  # as the Trainer resolves it
        if isinstance(folder, (str, os.PathLike)):
            self.hyper_callback.resume_from(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)
