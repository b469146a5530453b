"""Training losses: what `ChatTrainer` asks for the loss of a batch (the loss seam), and the output-layer kernels they
compute it with.

The seam: a loss object is called as `loss(model, inputs, scale) -> LossTerms` for every training micro-batch.
`SupervisedLoss` (SFT cross-entropy) is the one in use today; another objective (a preference loss, pre-training on
raw text) is another class with the same call, handed to `ChatTrainer(loss=...)`, and the trainer does not change.
Whatever the model adds to its own loss when it is given labels (`model_loss_terms`: a mixture-of-experts router's
load-balancing loss) is added by every loss here, as the model adds it, and logged under its own name.

The output layer at labelled positions only. In SFT most positions carry no label (prompts, system turns,
padding), yet a causal LM computes a vocabulary-wide row of logits for every position (151k wide for Qwen) and its
loss upcasts them all to fp32. Instead, through PyTorch's public module hooks (`output_layer_computes`), the output
layer itself computes what the loss needs: for one forward call a pre-hook keeps the final hidden states and hands
the layer an empty slice of them, and a forward hook returns, in place of the logits, a function of the hidden
states at the positions whose next token is labelled, computed a chunk of rows at a time so that no logits tensor
for the whole batch ever exists. Because the output layer still runs inside the model's forward, DDP, FSDP and
DeepSpeed see every parameter used exactly once, where they expect it, and their hooks wrap its result. A causal LM
returns its output layer's result as the `logits` field of its output, so that is where the value comes back
(`HeadOutput.of`). Two kernels:

- `labelled_cross_entropy`: the summed token loss, its gradients computed in the forward pass (one matmul fewer
  than autograd with recomputation). The fast path, used where the loss is exactly a sum of token losses.
- `labelled_token_log_probs`: the log-probability of every labelled token, with a backward pass, so that per-token
  weights and per-sequence losses (log-probability differences) compose with it. A frozen output layer (LoRA) costs
  no more than the sum kernel: the gradient with respect to the hidden states is prepared in the forward pass.

Per-turn loss weights (a batch's `loss_weights`, aligned with its labels: chatft.data.datasets) make the loss a
weighted token mean, sum(w * ce) / sum(w) over the optimizer step's labelled tokens: a token of weight 2 counts as
that token twice, weight 1 everywhere is the plain token mean. `SupervisedLoss` computes it from the per-token
log-probabilities, and the trainer counts sum(w) where it counts the tokens (`loss_weight_total`). Batches without
weights (all data without a weight other than 1) keep the sum kernel, exactly as before.

Both equal the full-logits computation up to rounding (tests/test_losses.py, tests/test_trainer.py,
tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from chatft.data.chat_format import IGNORE_INDEX, LOSS_WEIGHTS

logger = logging.getLogger(__name__)

# Config attributes of models that transform the logits after the output layer (soft-capping, scaling):
# computing the head ourselves would skip that, so those models keep the full-logits path.
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
LOGITS_PER_CHUNK = 1 << 25  # elements of one chunk's logits: 128 MiB in fp32, whatever the vocabulary


# --- the seam ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossScale:
    """How the sums of one micro-batch become its share of the optimizer step's loss, as transformers' Trainer
    normalizes a model's own loss.

    `tokens`: labelled tokens in the whole accumulated batch (the Trainer's num_items_in_batch), or None when the
    Trainer does not count them; a summed token loss is then divided by this micro-batch's own count, and the Trainer
    divides the result by the accumulation steps. `processes`: the factor the Trainer applies when tokens are
    counted across devices (average_tokens_across_devices), undone by the gradient average of DDP/DeepSpeed.
    `accumulation_steps`: micro-batches per optimizer step."""

    tokens: int | torch.Tensor | None = None
    processes: int = 1
    accumulation_steps: int = 1
    # sequence parallelism (chatft.train.sequence_parallel): (process group, size, whether the engine sums the
    # group's gradients); the micro-batch is one row split across the group
    sequence_group: tuple | None = None

    def sequence_mean(self, token_sum: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """The token mean over the whole row when this process holds one shard of it (`token_sum` over its labelled
        tokens, `shift_labels` its targets): the value of every process is the whole row's mean, and each
        back-propagates its own share, sum / the row's token count, so that the gradients the engine sums over
        the group are one process's on the whole row. (The Trainer then divides by the accumulation steps.)"""
        group, size, sums = self.sequence_group
        count = (shift_labels != IGNORE_INDEX).sum().float()
        totals = torch.stack((token_sum.detach().float(), count))
        torch.distributed.all_reduce(totals, group=group)
        own = token_sum if sums else token_sum * size  # an engine that averages over the group: undo its division
        return (own + (totals[0] - own.detach())) / totals[1].clamp(min=1)

    def token_mean(self, token_sum: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A sum over labelled tokens as the model's own loss reduces it (sum / num_items_in_batch)."""
        if self.tokens is None:
            return token_sum / max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
        return token_sum / self.tokens * self.processes

    def weighted_token_mean(self, weighted_sum: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor
                            ) -> torch.Tensor:
        """sum(w * ce) as the weighted token mean, sum(w * ce) / sum(w): `tokens` is then the accumulated batch's
        sum(w) (what the trainer counts for weighted data: `loss_weight_total`), else this micro-batch's is used."""
        if self.tokens is None:
            return weighted_sum / loss_weight_total({"labels": labels, LOSS_WEIGHTS: weights}).clamp_min(1e-8)
        return weighted_sum / self.tokens * self.processes

    def batch_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A term that is already a mean over this micro-batch (a router's load-balancing loss), weighted so that
        the optimizer step sees its mean over the micro-batches and processes, whatever the accumulation. (The
        Trainer divides by the accumulation steps itself only when it does not count tokens.)"""
        return value if self.tokens is None else value / self.accumulation_steps

    def logged(self, share: torch.Tensor) -> torch.Tensor:
        """A token mean's value to log for this micro-batch, such that its mean over the step's micro-batches and
        the processes is the step's (what `loss` logs): with tokens counted `share` is this micro-batch's part of
        the step's mean (times `processes`), so it is scaled by the accumulation steps."""
        return share if self.tokens is None else share * self.accumulation_steps


@dataclass
class LossTerms:
    """`loss`: the value to back-propagate; `logs`: detached scalars logged beside the Trainer's `loss` (averaged
    over the logging interval), e.g. lm_loss and aux_loss for a mixture-of-experts model."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def model_loss_terms(config, outputs, scale: LossScale) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """What the model adds to its own loss when given labels, from an output computed without them: a
    mixture-of-experts model with output_router_logits returns `aux_loss`, and adds router_aux_loss_coef x aux_loss
    (transformers' qwen2_moe, qwen3_moe, mixtral). `config`: the model's own, read from the unwrapped model (the
    model the loss is called with may be a DeepSpeed or DDP wrapper, whose `config` is not the model's).
    (term to add to the loss or None, its logs)."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None, {}
    coefficient = getattr(config, "router_aux_loss_coef", None)
    if coefficient is None:
        raise RuntimeError(f"{type(config).__name__}: the model returned an aux_loss but its config has no "
                           "router_aux_loss_coef; train with --labelled_logits_only False so that the model computes "
                           "its own loss.")
    aux = aux.float()
    return scale.batch_mean(coefficient * aux), {"aux_loss": aux.detach()}


class SupervisedLoss:
    """SFT: cross-entropy over the labelled tokens, normalized as the model's own loss, plus the model's own extra
    terms (`model_loss_terms`). With `labelled_logits` the output layer runs only at labelled positions (the fused
    sum kernel); otherwise, or for a model whose output layer cannot be computed that way (`head_linears`), the model
    computes its logits and its own loss.

    `prepare(model)` once, with the unwrapped model, before the first call."""

    def __init__(self, labelled_logits: bool = True):
        self.requested_labelled_logits = labelled_logits
        self.head_linears: list[torch.nn.Linear] | None = None
        self.chunk_size = 0
        self.model_config = None

    @property
    def labelled_logits(self) -> bool:
        return self.head_linears is not None

    def prepare(self, model) -> None:
        self.head_linears = head_linears(model) if self.requested_labelled_logits else None
        if self.requested_labelled_logits and not self.labelled_logits:
            logger.info("%s's output layer is not a plain linear layer or transforms its logits; computing the loss "
                        "on full logits.", type(model).__name__)
        self.chunk_size = chunk_rows(model)
        self.model_config = model.config

    def __call__(self, model, inputs: dict, scale: LossScale) -> LossTerms:
        inputs = dict(inputs)
        if "shift_labels" in inputs:  # one shard of a row under sequence parallelism: its targets come shifted
            return self.sequence_shard(model, inputs, inputs.pop("shift_labels"), scale)
        labels = inputs.pop("labels")
        weights = inputs.pop(LOSS_WEIGHTS, None)
        if weights is not None:
            return self.weighted(model, inputs, labels, weights, scale)
        if self.labelled_logits:
            with output_layer_computes(self.head_linears, labels, self.chunk_size, labelled_cross_entropy) as head:
                outputs = model(**inputs)
            lm_loss = scale.token_mean(head.of(outputs, ()), labels)
        else:
            outputs = model(**inputs)
            lm_loss = scale.token_mean(token_cross_entropy_sum(outputs.logits, labels), labels)
        return with_model_terms(self.model_config, outputs, lm_loss, scale)

    def weighted(self, model, inputs: dict, labels: torch.Tensor, weights: torch.Tensor, scale: LossScale
                 ) -> LossTerms:
        """The weighted token mean (module docstring) from the per-token log-probabilities: computed at labelled
        positions only (labelled_token_log_probs), or from the model's full logits."""
        targets = labels[:, 1:]
        if self.labelled_logits:
            with output_layer_computes(self.head_linears, labels, self.chunk_size, labelled_token_log_probs) as head:
                outputs = model(**inputs)
            log_probs = head.of(outputs, (int((targets != IGNORE_INDEX).sum()),))
            weighted_sum = -(weights[:, 1:][targets != IGNORE_INDEX].float() * log_probs).sum()
        else:
            outputs = model(**inputs)
            weighted_sum = (weights[:, 1:].float() * token_cross_entropies(outputs.logits, labels)).sum()
        return with_model_terms(self.model_config, outputs, scale.weighted_token_mean(weighted_sum, weights, labels),
                                scale)


    def sequence_shard(self, model, inputs: dict, shift_labels: torch.Tensor, scale: LossScale) -> LossTerms:
        """Sequence parallelism: this process's shard of the row, whose targets the engine shifted across the
        shards (`shift_labels[t]` is the token after position t, the last position's taken from the next shard):
        the token mean over the whole row (`LossScale.sequence_mean`). Per-turn loss weights are refused by the
        trainer under sequence parallelism."""
        inputs.pop("labels", None)
        if inputs.pop(LOSS_WEIGHTS, None) is not None:
            raise RuntimeError("Per-turn loss weights are not supported with sequence parallelism.")
        if self.labelled_logits:
            with output_layer_computes(self.head_linears, shift_labels, self.chunk_size, shifted_cross_entropy) as head:
                outputs = model(**inputs)
            token_sum = head.of(outputs, ())
        else:
            outputs = model(**inputs)
            token_sum = torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1).float(), shift_labels.flatten(),
                                                          ignore_index=IGNORE_INDEX, reduction="sum")
        return with_model_terms(self.model_config, outputs, scale.sequence_mean(token_sum, shift_labels), scale)


def loss_weight_total(batch: dict) -> torch.Tensor:
    """sum(w) over a batch's labelled tokens (position t predicts labels[t + 1]): its `loss_weights` there, or 1 each
    when it has none (the token count). What a weighted loss is normalized by (`LossScale.weighted_token_mean`)."""
    labelled = batch["labels"][:, 1:] != IGNORE_INDEX
    if LOSS_WEIGHTS not in batch:
        return labelled.sum().float()
    return (batch[LOSS_WEIGHTS][:, 1:].float() * labelled).sum()


def with_model_terms(config, outputs, lm_loss: torch.Tensor, scale: LossScale) -> LossTerms:
    """`lm_loss` plus the model's own extra terms (`config`: the unwrapped model's); lm_loss is logged apart only when
    there are any."""
    extra, logs = model_loss_terms(config, outputs, scale)
    if extra is None:
        return LossTerms(lm_loss)
    return LossTerms(lm_loss + extra, {"lm_loss": scale.logged(lm_loss.detach()), **logs})


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over labelled positions of cross_entropy(logits[t], labels[t + 1]), in fp32: transformers' causal-LM loss
    before its division by num_items_in_batch."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def token_cross_entropies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cross_entropy(logits[t], labels[t + 1]) for every position t ([batch, length - 1], fp32; 0 where unlabelled)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="none").view(labels[:, 1:].shape)


# --- the output layer at labelled positions ------------------------------------------------------------------------

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


def chunk_rows(model) -> int:
    """Rows of hidden states per chunk, so that one chunk's logits hold about LOGITS_PER_CHUNK values."""
    # num_embeddings, not weight.shape: under ZeRO-3 the weight is a partitioned placeholder
    vocab_size = model.get_input_embeddings().num_embeddings
    return max(64, LOGITS_PER_CHUNK // vocab_size)


def compute_dtype_of(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.dtype:
    """The autocast dtype when autocast is on (as the output layer would compute), else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return head.weight.dtype


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


class LinearTokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden[i] @ weight.T + bias)[targets[i]] for every row i, in fp32, one chunk of rows at a time.

    d logp_i / d logits_i = one_hot(targets[i]) - softmax(logits_i). When only the hidden states need a gradient
    (a frozen output layer: LoRA), that row's gradient is a fixed vector times the incoming grad_i, so the vectors
    are computed in the forward pass and the backward pass is a product; when the layer trains, each chunk's logits
    are recomputed in the backward pass (the weight gradient needs grad_i inside the sum over rows)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype):
        frozen = not ctx.needs_input_grad[1] and not (bias is not None and ctx.needs_input_grad[2])
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        log_probs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        row_grads = torch.empty_like(hidden) if frozen and ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)
            t = targets[start : start + chunk_size]
            logits = torch.nn.functional.linear(h, w, b).float()
            log_norm = logits.logsumexp(-1, keepdim=True)
            log_probs[start : start + chunk_size] = logits.gather(1, t[:, None]).squeeze(1) - log_norm.squeeze(1)
            if row_grads is not None:
                grad_logits = logits.sub_(log_norm).exp_().neg_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1
                row_grads[start : start + chunk_size] = grad_logits.to(compute_dtype) @ w
        ctx.frozen, ctx.chunk_size, ctx.compute_dtype = frozen, chunk_size, compute_dtype
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        if frozen:
            ctx.save_for_backward(row_grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        return log_probs

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.frozen:
            (row_grads,) = ctx.saved_tensors
            grad_hidden = row_grads * grad_output[:, None].to(row_grads.dtype) if row_grads is not None else None
            return grad_hidden, None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        compute_dtype, chunk_size = ctx.compute_dtype, ctx.chunk_size
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)
            t = targets[start : start + chunk_size]
            g = grad_output[start : start + chunk_size].float()
            logits = torch.nn.functional.linear(h, w, b).float()
            # g_i * (one_hot(t_i) - softmax(logits_i)), in place over the logits
            grad_logits = logits.softmax(-1).mul_(-g[:, None])
            grad_logits[torch.arange(t.shape[0], device=t.device), t] += g
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start : start + chunk_size] = grad_logits @ w
            if grad_weight is not None and compute_dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)
            elif grad_weight is not None:  # a half-precision product, accumulated in fp32
                grad_weight += grad_logits.t() @ h
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden,
                grad_weight.to(weight_dtype) if grad_weight is not None else None,
                grad_bias.to(bias_dtype) if grad_bias is not None else None,
                None, None, None)


def labelled_rows(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [K, H], targets [K]) of the K positions whose next token is labelled (position t predicts
    labels[t + 1]), in row-major order; an empty K still connects the graph (zero gradients)."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    return hidden_states[:, :-1][labelled], targets[labelled]


def labelled_cross_entropy(hidden_states: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear,
                           chunk_size: int) -> torch.Tensor:
    """The sum of the token losses of a causal LM (position t predicts labels[t + 1]) with `head` applied only at
    labelled positions, `chunk_size` rows at a time, in the autocast dtype when autocast is on (as the plain path)."""
    hidden, targets = labelled_rows(hidden_states, labels)
    compute_dtype = compute_dtype_of(hidden, head)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets, chunk_size, compute_dtype)


def shifted_cross_entropy(hidden_states: torch.Tensor, shift_labels: torch.Tensor, head: torch.nn.Linear,
                          chunk_size: int) -> torch.Tensor:
    """`labelled_cross_entropy` for targets already shifted (position t predicts shift_labels[t], every position
    included): a shard of a row under sequence parallelism."""
    labelled = shift_labels != IGNORE_INDEX
    hidden, targets = hidden_states[labelled], shift_labels[labelled]
    compute_dtype = compute_dtype_of(hidden, head)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets, chunk_size, compute_dtype)


def labelled_token_log_probs(hidden_states: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear,
                             chunk_size: int) -> torch.Tensor:
    """log p(labels[t + 1] | tokens up to t) for every position t whose next token is labelled, in row-major order
    ([K] fp32), with `head` applied only there; differentiable. `labels[:, 1:] != IGNORE_INDEX` selects them, so
    `-(weights[labels[:, 1:] != IGNORE_INDEX] * log_probs).sum()` is a weighted token loss."""
    hidden, targets = labelled_rows(hidden_states, labels)
    compute_dtype = compute_dtype_of(hidden, head)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearTokenLogProbs.apply(hidden, head.weight, head.bias, targets, chunk_size, compute_dtype)


class HeadOutput:
    """What `output_layer_computes` yields. `of(outputs, shape)`, after the model's forward: the value the output
    layer computed in place of the logits, which the model returns in the `logits` field of its output (taking it
    from there, rather than from the hook, keeps whatever DDP, FSDP or DeepSpeed attached to it for the backward
    pass); checks that the output layer ran once and returned a value of `shape`."""

    def __init__(self):
        self.calls = 0  # forward calls of the output layer within the block

    def of(self, outputs, shape: tuple[int, ...]) -> torch.Tensor:
        value = outputs.logits
        if self.calls != 1 or tuple(value.shape) != tuple(shape):
            raise RuntimeError(
                f"The labelled-positions loss expects the model to call its output layer once and return its result "
                f"as logits; the layer ran {self.calls} times and logits has shape {tuple(value.shape)}. This "
                "transformers version computes logits differently: train with --labelled_logits_only False.")
        return value


HeadKernel = Callable[[torch.Tensor, torch.Tensor, torch.nn.Linear, int], torch.Tensor]


@contextlib.contextmanager
def output_layer_computes(linears: list[torch.nn.Linear], labels: torch.Tensor, chunk_size: int, kernel: HeadKernel):
    """Within the block, a forward call of any of `linears` returns kernel(hidden_states, labels, layer, chunk_size)
    (labelled_cross_entropy or labelled_token_log_probs) instead of logits; yields a `HeadOutput` to read it from the
    model's output.

    Public PyTorch hooks only: a forward pre-hook keeps the hidden states and passes the layer an empty slice of
    them (no logits computed), and a forward hook, put first so that it runs while ZeRO-3 and FSDP still hold the
    gathered weight, returns the kernel's value in place of the empty logits; their own hooks then wrap it."""
    returned, kept = HeadOutput(), {}

    def keep_hidden_states(linear, args):
        hidden_states = args[0]
        if hidden_states.shape[:-1] != labels.shape:
            raise RuntimeError(f"The output layer got hidden states of shape {tuple(hidden_states.shape)} for labels of "
                               f"shape {tuple(labels.shape)}: this model does not apply it at every position. Train "
                               "with --labelled_logits_only False.")
        kept[linear] = hidden_states
        return (hidden_states[..., :0, :], *args[1:])

    def kernel_instead_of_logits(linear, args, output):
        returned.calls += 1
        return kernel(kept.pop(linear), labels, linear, chunk_size)

    handles = []
    for linear in linears:
        handles.append(linear.register_forward_pre_hook(keep_hidden_states))
        handles.append(linear.register_forward_hook(kernel_instead_of_logits, prepend=True))
    try:
        yield returned
    finally:
        for handle in handles:
            handle.remove()
