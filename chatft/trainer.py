"""The HF Trainer, with the loss computed only where it is learned.

In SFT most positions carry no label (prompts, system turns, padding), yet a causal LM computes a
vocabulary-wide row of logits for every position (151k wide for Qwen) and the loss upcasts them
all to fp32. `ChatTrainer` instead runs the model with its output layer passing the final hidden
states through, gathers the positions whose next token is labelled, and applies the output layer
and cross-entropy to them in chunks that are recomputed in the backward pass, so a logits tensor for
the whole batch never exists. Loss and gradients equal the plain path's (tests/test_trainer.py).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import transformers
from torch.utils.checkpoint import checkpoint

from chatft.chat_format import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Config attributes of models that transform the logits after the output layer (soft-capping, scaling):
# computing the head ourselves would skip that, so those models keep the plain path.
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
LOGITS_PER_CHUNK = 1 << 26  # elements of one chunk's logits: 256 MiB in fp32, whatever the vocabulary


def supports_labelled_logits(model) -> bool:
    """Whether the output layer can be applied outside the model's forward without changing the result."""
    head = model.get_output_embeddings()
    config = model.config
    return head is not None and not any(getattr(config, name, None) for name in POST_HEAD_TRANSFORMS)


@contextlib.contextmanager
def passthrough(module: torch.nn.Module):
    """Within the block, `module` returns its input: the model's "logits" are then its final hidden states.
    (An instance attribute shadows the class's forward; hooks such as ZeRO-3's still run around it.)"""
    module.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        yield
    finally:
        del module.forward


def labelled_cross_entropy(hidden_states: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                           chunk_size: int) -> tuple[torch.Tensor, int]:
    """(sum of the token losses, number of labelled tokens) for a causal LM: position t predicts labels[t + 1].

    Only positions with a label go through `head`, `chunk_size` rows at a time; each chunk's logits are
    freed after its loss and recomputed in the backward pass.
    """
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][labelled]  # [K, H]
    targets = targets[labelled]  # [K]

    def chunk_loss(hidden_chunk, target_chunk):
        return torch.nn.functional.cross_entropy(head(hidden_chunk).float(), target_chunk, reduction="sum")

    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + checkpoint(chunk_loss, hidden[start : start + chunk_size], targets[start : start + chunk_size],
                                   use_reentrant=False)
    if hidden.shape[0] == 0:  # keep the graph connected so every rank runs the same backward
        total = total + 0.0 * hidden_states.sum()
    return total, int(targets.numel())


class ChatTrainer(transformers.Trainer):
    """transformers.Trainer whose training loss computes logits only at labelled positions (`labelled_logits`)."""

    def __init__(self, *args, labelled_logits: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        self.labelled_logits = labelled_logits and supports_labelled_logits(model)
        if labelled_logits and not self.labelled_logits:
            logger.info("%s transforms its logits after the output layer; computing the loss on full logits.",
                        type(model).__name__)
        # DDP and FSDP count on every parameter being used inside the wrapped forward, once; the output layer
        # applied after it breaks that when it trains (full-parameter). Verified: one process, DeepSpeed ZeRO-2/3.
        wrapped_elsewhere = self.is_fsdp_enabled or (self.args.world_size > 1 and not self.is_deepspeed_enabled)
        if self.labelled_logits and wrapped_elsewhere and any(p.requires_grad for p in model.get_output_embeddings().parameters()):
            logger.info("The output layer trains under DDP/FSDP: computing the loss on full logits.")
            self.labelled_logits = False
        self.label_smoothing_active = self.label_smoother is not None or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.labelled_logits or return_outputs or self.label_smoothing_active or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with passthrough(head):
            hidden_states = model(**inputs).logits
        # num_embeddings, not weight.shape: under ZeRO-3 the weight is a partitioned placeholder
        vocab_size = self.accelerator.unwrap_model(model).get_input_embeddings().num_embeddings
        chunk_size = max(64, LOGITS_PER_CHUNK // vocab_size)
        with self.accelerator.autocast():  # the dtype the output layer computes in on the plain path
            loss_sum, count = labelled_cross_entropy(hidden_states, labels, head, chunk_size)
        # the same normalization as the model's own loss and Trainer.compute_loss
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = loss_sum / max(count, 1)
        return loss
