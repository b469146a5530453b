"""The HF Trainer, with the loss computed only where it is learned, and checkpoints that appear only when whole.

In SFT most positions carry no label (prompts, system turns, padding), yet a causal LM computes a
vocabulary-wide row of logits for every position (151k wide for Qwen) and the loss upcasts them
all to fp32. `ChatTrainer.compute_loss` instead has the output layer itself compute the loss, through
PyTorch's public module hooks (`output_layer_returns_loss_sum`): for one forward call a pre-hook keeps the
final hidden states and hands the layer an empty slice of them, and a forward hook returns, in place of the
logits, `labelled_cross_entropy`: the positions whose next token is labelled go through the output layer and
cross-entropy a chunk of rows at a time, the gradients computed as it goes (one matmul fewer than autograd
with recomputation, and no logits tensor for the whole batch ever exists). Because the output layer still
runs inside the model's forward, DDP, FSDP and DeepSpeed see every parameter used exactly once, where they
expect it, and their hooks wrap its result. The model hands back what its output layer returned in the
`logits` field of its output; `LossSum.of(outputs)` takes the summed loss from there under its own name, and
checks that the output layer ran once. Loss and gradients equal the plain path's (tests/test_trainer.py,
tests/test_distributed.py).

Checkpoints: while `ChatTrainer` trains, transformers writes each checkpoint as `tmp-checkpoint-N`
(chatft.transformers_patch, the one patch of transformers), and `AtomicCheckpoints.on_save` renames it to
`checkpoint-N` once every process has finished writing, so a crash mid-save never leaves a partial
`checkpoint-N` for `--resume_from_checkpoint True` to pick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from chatft.chat_format import IGNORE_INDEX
from chatft.patches import checkpoints_written_as

logger = logging.getLogger(__name__)

# Config attributes of models that transform the logits after the output layer (soft-capping, scaling):
# computing the head ourselves would skip that, so those models keep the plain path.
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
LOGITS_PER_CHUNK = 1 << 25  # elements of one chunk's logits: 128 MiB in fp32, whatever the vocabulary


def head_linears(model) -> list[torch.nn.Linear] | None:
    """The plain nn.Linear modules that may compute the model's logits (the output layer, or the copies peft's
    modules_to_save keeps of it); None when the output layer is something else (LoRA on it, quantized)."""
    head = model.get_output_embeddings()
    if head is None or any(getattr(model.config, name, None) for name in POST_HEAD_TRANSFORMS):
        return None
    if type(head) is torch.nn.Linear:
        return [head]
    if type(head).__name__ == "ModulesToSaveWrapper":  # peft: the original layer and one trainable copy per adapter
        inner = [m for m in head.modules() if m is not head and not isinstance(m, torch.nn.ModuleDict)]
        if inner and all(type(m) is torch.nn.Linear for m in inner):
            return inner
    return None


def supports_labelled_logits(model) -> bool:
    return head_linears(model) is not None


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i cross_entropy(hidden[i] @ weight.T + bias, targets[i]), with the gradients computed in the forward
    pass one chunk of rows at a time, so each chunk's logits live only while it is processed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype):
        need_weight, need_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)
            t = targets[start : start + chunk_size]
            logits = torch.nn.functional.linear(h, w, b).float()
            log_norm = logits.logsumexp(-1, keepdim=True)
            total += (log_norm.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d loss / d logits = softmax - one_hot(target), in place over the logits
            grad_logits = logits.sub_(log_norm).exp_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start : start + chunk_size] = grad_logits @ w
            if need_weight and compute_dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)
            elif need_weight:  # a half-precision product, accumulated in fp32
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_output,
                (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None else None,
                None, None, None)


def labelled_cross_entropy(hidden_states: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear,
                           chunk_size: int) -> torch.Tensor:
    """The sum of the token losses of a causal LM (position t predicts labels[t + 1]) with `head` applied only at
    labelled positions, `chunk_size` rows at a time, in the autocast dtype when autocast is on (as the plain path)."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][labelled]  # [K, H]; an empty K still connects the graph (zero gradients)
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else head.weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets[labelled], chunk_size, compute_dtype)


class LossSum:
    """What `output_layer_returns_loss_sum` yields. `of(outputs)`, after the model's forward: the summed token loss.

    A causal LM returns its output layer's result as the `logits` of its output, so that is where the loss comes
    back; taking it from there (rather than from the hook) keeps whatever DDP, FSDP or DeepSpeed attached to it for
    the backward pass."""

    def __init__(self):
        self.calls = 0  # forward calls of the output layer within the block

    def of(self, outputs) -> torch.Tensor:
        loss_sum = outputs.logits
        if self.calls != 1 or loss_sum.dim() != 0:
            raise RuntimeError(
                f"The labelled-positions loss expects the model to call its output layer once and return its result "
                f"as logits; the layer ran {self.calls} times and logits has shape {tuple(loss_sum.shape)}. This "
                "transformers version computes logits differently: train with --labelled_logits_only False.")
        return loss_sum


@contextlib.contextmanager
def output_layer_returns_loss_sum(linears: list[torch.nn.Linear], labels: torch.Tensor, chunk_size: int):
    """Within the block, a forward call of any of `linears` returns the summed token loss over `labels` (a 0-dim
    tensor, `labelled_cross_entropy`) instead of logits; yields a `LossSum` to read it from the model's output.

    Public PyTorch hooks only: a forward pre-hook keeps the hidden states and passes the layer an empty slice of
    them (no logits computed), and a forward hook, put first so that it runs while ZeRO-3 and FSDP still hold the
    gathered weight, returns the loss in place of the empty logits; their own hooks then wrap the loss."""
    returned, kept = LossSum(), {}

    def keep_hidden_states(linear, args):
        hidden_states = args[0]
        if hidden_states.shape[:-1] != labels.shape:
            raise RuntimeError(f"The output layer got hidden states of shape {tuple(hidden_states.shape)} for labels of "
                               f"shape {tuple(labels.shape)}: this model does not apply it at every position. Train "
                               "with --labelled_logits_only False.")
        kept[linear] = hidden_states
        return (hidden_states[..., :0, :], *args[1:])

    def loss_instead_of_logits(linear, args, output):
        returned.calls += 1
        return labelled_cross_entropy(kept.pop(linear), labels, linear, chunk_size)

    handles = []
    for linear in linears:
        handles.append(linear.register_forward_pre_hook(keep_hidden_states))
        handles.append(linear.register_forward_hook(loss_instead_of_logits, prepend=True))
    try:
        yield returned
    finally:
        for handle in handles:
            handle.remove()


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


class ChatTrainer(transformers.Trainer):
    """transformers.Trainer whose training loss computes logits only at labelled positions (`labelled_logits`)."""

    def __init__(self, *args, labelled_logits: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        self.head_linears = head_linears(model) if labelled_logits else None
        self.labelled_logits = self.head_linears is not None
        if labelled_logits and not self.labelled_logits:
            logger.info("%s's output layer is not a plain linear layer or transforms its logits; computing the loss "
                        "on full logits.", type(model).__name__)
        # num_embeddings, not weight.shape: under ZeRO-3 the weight is a partitioned placeholder
        vocab_size = model.get_input_embeddings().num_embeddings
        self.chunk_size = max(64, LOGITS_PER_CHUNK // vocab_size)
        self.label_smoothing_active = self.label_smoother is not None or self.compute_loss_func is not None
        self.run_start = RunStart()
        self.add_callback(self.run_start)
        self.add_callback(AtomicCheckpoints(self.accelerator.wait_for_everyone))

    def train(self, *args, **kwargs):
        """transformers.Trainer.train, each checkpoint written as tmp-checkpoint-N until it is whole (AtomicCheckpoints)."""
        with checkpoints_written_as(SCRATCH_CHECKPOINT_PREFIX):
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.labelled_logits or return_outputs or self.label_smoothing_active or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with output_layer_returns_loss_sum(self.head_linears, labels, self.chunk_size) as returned:
            outputs = model(**inputs)
        loss_sum = returned.of(outputs)
        # the same normalization as the model's own loss and Trainer.compute_loss
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = loss_sum / max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
        return loss
