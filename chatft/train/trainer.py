"""The HF Trainer, asking a loss object for the loss of each batch, with checkpoints that appear only when whole.

The loss: `ChatTrainer(loss=...)` takes any object of chatft.train.losses' seam (`loss(model, inputs, scale) ->
LossTerms`); SFT's `SupervisedLoss` by default. The trainer hands it the batch and how transformers normalizes a
model's own loss (`LossScale`), back-propagates what it returns, and logs its extra values (e.g. lm_loss and
aux_loss of a mixture-of-experts model) beside `loss`, averaged as `loss` is, over the logging interval and the
processes. Evaluation, label smoothing and a `compute_loss_func` given to the Trainer keep transformers' own loss
(unweighted).

Per-turn loss weights: batches of weighted data carry `loss_weights`, which the trainer keeps from the model's
forward (transformers drops the columns the forward does not name) and hands the loss; for such data the
accumulated batch's item count becomes sum(w) over its labelled tokens (`get_batch_samples`, transformers' public
hook where it counts them), the denominator of the weighted token mean.

The optimizer and the embeddings: `--loraplus_lr_ratio` gives LoRA's B matrices their own parameter groups
(chatft.train.optim); `--neftune_noise_alpha` adds noise scaled per sample (chatft.train.neftune) instead of
transformers' hook.

Checkpoints: while `ChatTrainer` trains, transformers writes each checkpoint as `tmp-checkpoint-N`
(chatft.patches, the one module of library patches), and `AtomicCheckpoints.on_save` renames it to
`checkpoint-N` once every process has finished writing, so a crash mid-save never leaves a partial
`checkpoint-N` for `--resume_from_checkpoint True` to pick.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from chatft.data.chat_format import LOSS_WEIGHTS
from chatft.train.losses import LossScale, SupervisedLoss, loss_weight_total
from chatft.train.neftune import SampleScaledNoise
from chatft.train.optim import raise_lora_b_learning_rate
from chatft.train.sequence_parallel import (SequenceParallelCollator, head_problem, parallelism_config,
                                            sequence_parallel_group, sums_gradients_over_the_group)
from chatft.errors import ArgumentError
from chatft.patches import checkpoints_written_as

logger = logging.getLogger(__name__)


SCRATCH_CHECKPOINT_PREFIX = "tmp-" + PREFIX_CHECKPOINT_DIR  # not matched by --resume_from_checkpoint True


class AtomicCheckpoints(transformers.TrainerCallback):
    """Renames the checkpoint transformers has just written as tmp-checkpoint-N (`ChatTrainer.train` has it written
    there) to checkpoint-N once every process has finished writing, then applies --save_total_limit counting it
    (transformers rotated before the rename)."""

    def __init__(self, wait_for_everyone):
        self.wait_for_everyone = wait_for_everyone

    def on_save(self, args, state, control, **kwargs):
        self.wait_for_everyone()
        scratch, final = (os.path.join(args.output_dir, f"{prefix}-{state.global_step}")
                          for prefix in (SCRATCH_CHECKPOINT_PREFIX, PREFIX_CHECKPOINT_DIR))
        renaming = args.should_save and os.path.isdir(scratch)
        if state.best_model_checkpoint == scratch:  # this step is the best: transformers found it under its scratch name
            state.best_model_checkpoint = final
            if renaming:  # and saved that name in the checkpoint's state, where a resume reads it
                state.save_to_json(os.path.join(scratch, TRAINER_STATE_NAME))
        if renaming:
            if os.path.isdir(final):  # the same step saved again (e.g. resumed from an earlier checkpoint)
                shutil.rmtree(final)
            os.rename(scratch, final)
            rotate_checkpoints(output_dir=args.output_dir, save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
        self.wait_for_everyone()


class StopOnSigterm(transformers.TrainerCallback):
    """SIGTERM (what schedulers send before pre-empting a job): finish the current optimizer step, save a
    checkpoint and stop. Every rank stops at the same step: the flag is combined across processes each step."""

    def __init__(self):
        self.received = False
        self.previous_handler = None

    def install(self):
        self.previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self):
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)

    def _on_signal(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if stop else 0.0], device=args.device)
            torch.distributed.all_reduce(flag)
            stop = bool(flag.item())
        if stop:
            self.received = True
            control.should_save = True
            control.should_training_stop = True
        return control


class RunStart(transformers.TrainerCallback):
    """Where this process's training began: a resumed run starts at its checkpoint's step and epoch, and its
    runtime covers only what it trained, so speeds are computed from here."""

    epoch: float = 0.0
    step: int = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.epoch, self.step = state.epoch or 0.0, state.global_step


class LoggedMeans:
    """The loss's extra values (LossTerms.logs) summed per name over the micro-batches since the last log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self, accelerator=None) -> dict[str, float]:
        """The means since the last log, and start again. With an `accelerator` of several processes, the means over
        all of them (every process must call this): a name some processes did not log since (a KTO batch with no
        undesirable completion has no rewards/rejected) is the mean over those that did."""
        sums, counts = self.sums, self.counts
        self.sums, self.counts = {}, {}
        if accelerator is None or accelerator.num_processes == 1:
            return {name: total / counts[name] for name, total in sums.items()}
        from accelerate.utils import gather_object

        names = sorted(set(gather_object(list(sums))))
        if not names:
            return {}
        totals = torch.tensor([[sums.get(name, 0.0), counts.get(name, 0)] for name in names], dtype=torch.float64,
                              device=accelerator.device)
        totals = accelerator.reduce(totals, "sum").tolist()
        return {name: total / count for name, (total, count) in zip(names, totals)}


class ChatTrainer(transformers.Trainer):
    """transformers.Trainer whose training loss comes from `loss` (chatft.train.losses; default: SupervisedLoss, the
    output layer at labelled positions only)."""

    def __init__(self, *args, loss=None, loraplus_lr_ratio: float | None = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        sequence_parallel_size = getattr(training_args, "sequence_parallel_size", 1)
        if sequence_parallel_size > 1:  # DeepSpeed's Ulysses through accelerate (chatft.train.sequence_parallel)
            model = kwargs.get("model", args[0] if args else None)
            problem = head_problem(sequence_parallel_size, model.config)
            if problem:
                raise ArgumentError(problem)
            training_args.parallelism_config = parallelism_config(
                sequence_parallel_size, model.config._attn_implementation)
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        # --neftune_noise_alpha: noise scaled per sample (chatft.train.neftune) in place of transformers' hook, which
        # scales by the row's length; transformers attaches its own only while this attribute is set
        self.neftune = SampleScaledNoise(self.neftune_noise_alpha) if self.neftune_noise_alpha is not None else None
        self.neftune_noise_alpha = None
        self.loss = loss if loss is not None else SupervisedLoss()
        self.loss.prepare(self.accelerator.unwrap_model(self.model))
        if hasattr(self.loss, "autocast"):  # a model the loss runs beside the policy (a DPO reference copy)
            self.loss.autocast = self.accelerator.autocast
        self.logged_means = LoggedMeans()
        self.eval_means = LoggedMeans()
        self.run_start = RunStart()
        self.add_callback(self.run_start)
        self.add_callback(AtomicCheckpoints(self.accelerator.wait_for_everyone))
        self.weighted_data = bool(getattr(self.train_dataset, "has_loss_weights", False))
        if sequence_parallel_size > 1:
            if self.weighted_data:
                raise ArgumentError("--sequence_parallel_size: per-turn loss weights (a \"weight\" in the data) are "
                                    "not supported with sequence parallelism; train without one of them.")
            pad_token_id = getattr(self.processing_class, "pad_token_id", None) or 0
            row_length = (self.args.per_device_train_batch_size * self.args.model_max_length
                          if self.args.device.type == "cpu" else None)  # gloo: rows of one length (the collator)
            self.data_collator = SequenceParallelCollator(self.data_collator, sequence_parallel_size, pad_token_id,
                                                          row_length)

    def _set_signature_columns_if_needed(self):
        """transformers' columns to keep (those the model's forward names), and the loss's `loss_weights`. (No public
        door: tests/test_losses.py fails if transformers stops calling this.)"""
        super()._set_signature_columns_if_needed()
        for column in (LOSS_WEIGHTS, *getattr(self.loss, "feature_columns", ())):  # a preference loss's pair fields
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """transformers' batches of one optimizer step and their item count; for weighted data the count is sum(w)
        over the labelled tokens (gathered across processes as transformers gathers the count)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is None or not self.weighted_data:
            return batch_samples, num_items
        total = sum(loss_weight_total(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return batch_samples, total / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())

    @property
    def labelled_logits(self) -> bool:
        """Whether the loss runs the output layer at labelled positions only."""
        return bool(getattr(self.loss, "labelled_logits", False))

    def train(self, *args, **kwargs):
        """transformers.Trainer.train, each checkpoint written as tmp-checkpoint-N until it is whole (AtomicCheckpoints);
        with NEFTune's per-sample noise on the input embeddings while it trains."""
        noise = self.neftune.attach(self.model.get_input_embeddings()) if self.neftune is not None else None
        try:
            with checkpoints_written_as(SCRATCH_CHECKPOINT_PREFIX):
                return super().train(*args, **kwargs)
        finally:
            if noise is not None:
                noise.remove()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.neftune is not None:  # where each sample of the batch lies, for its noise scale
            self.neftune.set_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        """transformers' optimizer; with --loraplus_lr_ratio, LoRA's B matrices in groups of their own at
        learning_rate × ratio (chatft.train.optim)."""
        optimizer = super().create_optimizer(model)
        if self.loraplus_lr_ratio is not None:
            moved = raise_lora_b_learning_rate(self.optimizer, self.model if model is None else model,
                                               self.loraplus_lr_ratio)
            logger.info("LoRA+: %d B matrices at learning rate x %g", moved, self.loraplus_lr_ratio)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if getattr(self.loss, "evaluates", False) and not model.training:  # a preference objective's own eval loss
            terms = self.loss(model, inputs, LossScale())
            self.eval_means.add(terms.logs)  # its rewards, logged as eval_rewards/... beside eval_loss
            return (terms.loss, {}) if return_outputs else terms.loss
        library_loss = self.label_smoother is not None or self.compute_loss_func is not None
        sharded = "shift_labels" in inputs and model.training  # a shard of a row (sequence parallelism)
        # evaluation's predictions, the library's options
        if return_outputs or library_loss or ("labels" not in inputs and not sharded):
            inputs = {name: value for name, value in inputs.items() if name != LOSS_WEIGHTS}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        processes = self.accelerator.num_processes // self.get_tp_size() if self.args.average_tokens_across_devices else 1
        group = sequence_parallel_group(self) if sharded else None
        scale = LossScale(tokens=num_items_in_batch, processes=processes,
                          accumulation_steps=self.current_gradient_accumulation_steps,
                          sequence_group=(*group, sums_gradients_over_the_group()) if group else None)
        terms = self.loss(model, inputs, scale)
        if terms.logs and model.training:
            self.logged_means.add(terms.logs)
        return terms.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """transformers.Trainer.log, with the loss's extra values beside the training loss (and beside eval_loss, those
        of a loss that evaluates its own objective, prefixed eval_)."""
        for key, means, prefix in (("loss", self.logged_means, ""), ("eval_loss", self.eval_means, "eval_")):
            if key in logs:  # every process logs (transformers gathers `loss` here too)
                values = means.pop(self.accelerator if self.args.world_size > 1 else None)
                logs = {**logs, **{prefix + name: round(value, 4) for name, value in values.items()}}
        super().log(logs, *args, **kwargs)
