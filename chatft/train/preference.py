"""Preference objectives on per-sequence log-probabilities: DPO (sigmoid, ipo, hinge), SimPO, ORPO and KTO.

Every function here takes what a batch's forward passes give per reply (the sum of its labelled tokens'
log-probabilities and their number) and returns per-sample losses and the rewards that are logged; how the
log-probabilities are computed (padding-free pair rows, the reference with the adapter off) is the trainer's
business. Formulas, as the papers give them and TRL computes them (tests/test_preference_losses.py checks each
against TRL's trainers' own code):

- DPO: margin m = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)); sigmoid: -log sigmoid(beta m); hinge:
  relu(1 - beta m); ipo: (m' - 1 / (2 beta))^2 with m' the same margin of per-token means (IPO's authors' form).
- SimPO (no reference): -log sigmoid(beta (mean log pi(c) - mean log pi(r)) - gamma), means per reply token.
- ORPO (no reference): -beta log sigmoid(log odds(c) - log odds(r)), odds(y) = p / (1 - p) on per-token mean
  log-probabilities, added to the SFT loss of the chosen reply.
- KTO: desirable y: w_d (1 - sigmoid(beta (log pi(y) - log ref(y) - z))), undesirable: w_u (1 - sigmoid(beta (z -
  log pi(y) + log ref(y)))), z the batch's estimate of KL(pi || ref) from mismatched prompt/completion pairs,
  clamped at 0 and not differentiated.

Rewards (logged): beta x (policy - reference) log-probability for DPO and KTO, beta x mean log-probability for SimPO
and ORPO (their implicit rewards).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

from chatft.data.chat_format import IGNORE_INDEX
from chatft.data.preference import DESIRABLE, REFERENCE_LOG_PROBS, REPLY_INDEX
from chatft.train.losses import (LossTerms, chunk_rows, head_linears, labelled_token_log_probs, model_loss_terms,
                                 output_layer_computes)

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
STAGES = ("sft", "dpo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass(frozen=True)
class ReplyLogProbs:
    """Per reply: the sum of its labelled tokens' log-probabilities and how many there are."""
    total: torch.Tensor
    tokens: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1)


@dataclass(frozen=True)
class PreferenceTerms:
    losses: torch.Tensor  # per pair (per sample for KTO)
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached

    def metrics(self) -> dict[str, float]:
        """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies: means over this batch's pairs."""
        chosen, rejected = self.chosen_rewards.float(), self.rejected_rewards.float()
        metrics = {}  # a KTO batch may hold no desirable (or no undesirable) completion: no value, not NaN
        if chosen.numel():
            metrics["rewards/chosen"] = chosen.mean().item()
        if rejected.numel():
            metrics["rewards/rejected"] = rejected.mean().item()
        if chosen.shape == rejected.shape and chosen.numel():
            metrics["rewards/margins"] = (chosen - rejected).mean().item()
            metrics["rewards/accuracies"] = (chosen > rejected).float().mean().item()
        return metrics


def dpo(chosen: ReplyLogProbs, rejected: ReplyLogProbs, ref_chosen: ReplyLogProbs, ref_rejected: ReplyLogProbs,
        beta: float, loss: str = "sigmoid") -> PreferenceTerms:
    chosen_ratio, rejected_ratio = chosen.total - ref_chosen.total, rejected.total - ref_rejected.total
    margin = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss == "ipo":
        per_token = chosen_ratio / chosen.tokens.clamp(min=1) - rejected_ratio / rejected.tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} (expected one of {', '.join(DPO_LOSSES)})")
    return PreferenceTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo(chosen: ReplyLogProbs, rejected: ReplyLogProbs, beta: float, gamma: float) -> PreferenceTerms:
    chosen_mean, rejected_mean = chosen.mean, rejected.mean
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return PreferenceTerms(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(chosen: ReplyLogProbs, rejected: ReplyLogProbs, beta: float) -> PreferenceTerms:
    """The odds-ratio term only (its weight `beta` included); the SFT term on the chosen reply is added apart."""
    chosen_mean, rejected_mean = chosen.mean.float(), rejected.mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceTerms(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def kto(completion: ReplyLogProbs, ref_completion: ReplyLogProbs, desirable: torch.Tensor, kl: torch.Tensor,
        beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceTerms:
    """Per completion; `desirable` a bool per completion, `kl` the batch's KL estimate (clamped and detached here)."""
    ratio = completion.total - ref_completion.total
    kl = kl.detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return PreferenceTerms(losses, rewards[desirable], rewards[~desirable])


class PreferenceLoss:
    """The loss seam's object for preference stages (chatft.train.losses: `loss(model, inputs, scale) -> LossTerms`)
    on chatft.data.preference.PreferenceCollator's rows.

    Per reply, the sum of its tokens' log-probabilities, with the output layer run at labelled positions only
    (chatft.train.losses.labelled_token_log_probs), or from full logits. The reference (dpo, kto), first found of:
    the batch's precomputed values (`REFERENCE_LOG_PROBS`, --precompute_ref_log_probs; `precomputed` says they must
    be there), `reference_model` (a frozen copy, full-parameter; under ZeRO-3 partitioned, in its own DeepSpeed
    engine), a LoRA model's frozen "reference" adapter (the adapter the run started from,
    chatft.model.load.REFERENCE_ADAPTER), else the LoRA model with its adapter switched off. `sft_weight`: an SFT
    term, the token mean of the chosen replies' cross-entropy, added with this weight (ORPO's own, weight 1, unless
    given). Logged: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies beside the loss, and the
    model's own extra terms (a MoE router's aux loss) added as SFT adds them."""

    def __init__(self, stage: str, beta: float, dpo_loss: str = "sigmoid", simpo_gamma: float = 0.5,
                 sft_weight: float | None = None, labelled_logits: bool = True, reference_model=None,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0, precomputed: bool = False):
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        if stage not in ("dpo", "simpo", "orpo", "kto"):
            raise ValueError(f"PreferenceLoss: unknown stage {stage!r}")
        self.stage, self.beta, self.dpo_loss, self.simpo_gamma = stage, beta, dpo_loss, simpo_gamma
        self.sft_weight = (1.0 if stage == "orpo" else 0.0) if sft_weight is None else sft_weight
        self.requested_labelled_logits = labelled_logits
        self.reference_model = reference_model
        self.precomputed = precomputed
        self.head_linears = self.reference_heads = None
        self.chunk_size = 0
        self.model_config = None
        self.adapter_model = None  # the LoRA model whose adapter is switched off for the reference
        self.reference_adapter_model = None  # the LoRA model whose "reference" adapter is the reference
        # the policy's autocast (accelerate patches the policy's forward, not the reference copy's): ChatTrainer sets it
        self.autocast = contextlib.nullcontext

    # the batch fields its rows are built from (kept by the Trainer, which drops fields the model does not name),
    # and evaluation computes this objective too (not the model's own loss)
    feature_columns = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels",
                       "completion_ids", "completion_labels", DESIRABLE, REPLY_INDEX, REFERENCE_LOG_PROBS,
                       "mismatched_ids", "mismatched_labels")
    evaluates = True

    @property
    def labelled_logits(self) -> bool:
        return self.head_linears is not None

    def prepare(self, model) -> None:
        from chatft.model.load import REFERENCE_ADAPTER

        self.head_linears = head_linears(model) if self.requested_labelled_logits else None
        self.chunk_size = chunk_rows(model)
        self.model_config = model.config
        if self.stage not in ("dpo", "kto") or self.precomputed:
            return
        if self.reference_model is not None:
            from accelerate.utils import extract_model_from_parallel

            # the model's own output layers, inside a DeepSpeed engine (ZeRO-3's sharded reference); the forward hooks
            # on them run while the engine holds the layer's weight gathered (output_layer_computes), as the policy's
            reference = extract_model_from_parallel(self.reference_model)
            self.reference_heads = head_linears(reference) if self.requested_labelled_logits else None
        elif REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            self.reference_adapter_model = model
        elif hasattr(model, "disable_adapter"):
            self.adapter_model = model
        else:
            raise ValueError(f"{self.stage}: needs a reference: a LoRA model (its adapter switched off, or a "
                             f"{REFERENCE_ADAPTER!r} adapter), reference_model, or precomputed log-probabilities")

    def reply_log_probs(self, model, inputs: dict, labels: torch.Tensor, replies: torch.Tensor, count: int,
                        heads: list | None | str = "policy"):
        """(ReplyLogProbs of `count` replies, the model's outputs); `heads`: the output layers of `model` when it is
        not the policy (None: full logits)."""
        heads = self.head_linears if heads == "policy" else heads
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        if heads is not None:
            with output_layer_computes(heads, labels, self.chunk_size, labelled_token_log_probs) as head:
                outputs = model(**inputs)
            log_probs = head.of(outputs, (int(labelled.sum()),))
        else:
            outputs = model(**inputs)
            logits = outputs.logits[:, :-1][labelled].float()
            log_probs = torch.log_softmax(logits, -1).gather(-1, targets[labelled][:, None])[:, 0]
        index = replies[:, 1:][labelled]
        total = torch.zeros(count, dtype=log_probs.dtype, device=log_probs.device).index_add(0, index, log_probs)
        tokens = torch.zeros(count, device=log_probs.device).index_add(0, index, torch.ones_like(log_probs))
        return ReplyLogProbs(total, tokens), outputs

    def reference_log_probs(self, model, inputs, labels, replies, count) -> ReplyLogProbs:
        with torch.no_grad():
            if self.adapter_model is not None:
                with self.adapter_model.disable_adapter():
                    return self.reply_log_probs(model, inputs, labels, replies, count)[0]
            if self.reference_adapter_model is not None:
                with reference_adapter_active(self.reference_adapter_model):
                    return self.reply_log_probs(model, inputs, labels, replies, count)[0]
            policy_weight = next(model.parameters())
            reference_weight = next(self.reference_model.parameters())
            placed = (reference_weight.device, reference_weight.dtype) == (policy_weight.device, policy_weight.dtype)
            if not placed and not hasattr(reference_weight, "ds_id"):  # ZeRO-3's partitions: their engine placed them
                # once: where the Trainer (or DeepSpeed, in bf16) put the policy
                self.reference_model.to(device=policy_weight.device, dtype=policy_weight.dtype)
            with self.autocast():
                return self.reply_log_probs(self.reference_model, inputs, labels, replies, count,
                                            heads=self.reference_heads)[0]

    def __call__(self, model, inputs: dict, scale) -> LossTerms:
        inputs = dict(inputs)
        labels, replies = inputs.pop("labels"), inputs.pop(REPLY_INDEX)
        count = 2 * (int(replies.max()) // 2 + 1)
        desirable = inputs.pop(DESIRABLE, None)
        given = inputs.pop(REFERENCE_LOG_PROBS, None)
        reference = None
        if self.stage in ("dpo", "kto"):
            if given is None and self.precomputed:
                raise RuntimeError(f"{self.stage}: --precompute_ref_log_probs, but this batch carries no reference "
                                   "log-probabilities (chatft.train.preference.ReferenceLogProbs computes them when "
                                   "training begins)")
            # before the policy's forward: a reference adapter switched on and off again with no graph alive
            reference = given if given is not None else self.reference_log_probs(model, inputs, labels, replies,
                                                                                 count).total
        policy, outputs = self.reply_log_probs(model, inputs, labels, replies, count)
        chosen, rejected = split_pairs(policy)
        if reference is not None:
            reference = ReplyLogProbs(reference.to(policy.total.device, policy.total.dtype), policy.tokens)
        if self.stage == "kto":  # chosen: each sample's own completion; rejected: the mismatched one (KL estimate)
            reference, mismatched_reference = split_pairs(reference)
            kl = (rejected.total - mismatched_reference.total).detach().mean()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                kl = kl.clone()
                torch.distributed.all_reduce(kl)  # the batch's estimate over every process, as TRL gathers it
                kl = kl / torch.distributed.get_world_size()
            terms = kto(chosen, reference, desirable.to(chosen.total.device), kl, self.beta, self.desirable_weight,
                        self.undesirable_weight)
        elif self.stage == "dpo":
            ref_chosen, ref_rejected = split_pairs(reference)
            terms = dpo(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.dpo_loss)
        elif self.stage == "simpo":
            terms = simpo(chosen, rejected, self.beta, self.simpo_gamma)
        else:
            terms = orpo(chosen, rejected, self.beta)
        loss = terms.losses.mean()
        logs = {name: torch.tensor(value) for name, value in terms.metrics().items()}
        if self.stage == "kto":
            logs["kl"] = kl.detach()
        if self.sft_weight:
            if self.stage == "kto":  # KTO's own completions: the SFT term learns the desirable ones only
                chosen = ReplyLogProbs(chosen.total[desirable], chosen.tokens[desirable])
            sft = -chosen.total.sum() / chosen.tokens.sum().clamp(min=1)
            loss = loss + self.sft_weight * sft
            logs["sft_loss"] = sft.detach()
        loss = scale.batch_mean(loss)
        extra, extra_logs = model_loss_terms(self.model_config, outputs, scale)
        if extra is not None:
            loss = loss + extra
            logs.update(extra_logs)
        return LossTerms(loss, logs)


@contextlib.contextmanager
def reference_adapter_active(model):
    """Within the block, `model` (a peft model holding a frozen "reference" adapter beside the trained one) computes
    with the reference adapter, in eval mode (no dropout: the reference is a fixed function). peft's set_adapter
    also sets requires_grad (the adapter made active trainable, the others frozen), so the set of trainable
    parameters is put back exactly afterwards, as are the active adapter and the training mode."""
    from chatft.model.load import REFERENCE_ADAPTER

    trained, was_training = model.active_adapter, model.training
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    model.eval()
    try:
        yield
    finally:
        model.set_adapter(trained)
        model.train(was_training)
        for parameter in model.parameters():
            if parameter.requires_grad != (id(parameter) in trainable):
                parameter.requires_grad_(id(parameter) in trainable)


class PrecomputedReference(transformers.TrainerCallback):
    """--precompute_ref_log_probs: when training begins, one pass without gradients of the model as it starts (the
    policy at step 0 is its own reference) over every training and evaluation item gives each its reference
    log-probability sums, kept on the dataset (`reference_values`), which its items then carry. At that point the
    Trainer has prepared the model: under ZeRO-3 its hooks gather the weights, and accelerate's autocast is on its
    forward, as in training. Each process computes a contiguous share of the items and all gather them. The values
    are written to output_dir/reference_log_probs.pt: a resumed run (whose model is no longer the starting one)
    reads them from there."""

    FILE = "reference_log_probs.pt"

    def __init__(self, loss: PreferenceLoss, collator, datasets: dict, batch_size: int):
        self.loss, self.collator, self.batch_size = loss, collator, batch_size
        self.datasets = {name: dataset for name, dataset in datasets.items() if dataset is not None}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from chatft.errors import ChatftError

        path = os.path.join(args.output_dir, self.FILE)
        if state.global_step > 0:  # resumed: the model has trained; the values of its first run hold
            if not os.path.isfile(path):
                raise ChatftError(f"--precompute_ref_log_probs: resuming, but {path} (written when the run began) is "
                                  "missing; start the run again.")
            saved = torch.load(path)
            for name, dataset in self.datasets.items():
                dataset.reference_values = saved[name]
            return
        for name, dataset in self.datasets.items():
            dataset.reference_values = self.compute(model, dataset, args.device)
        if args.should_save:
            torch.save({name: dataset.reference_values for name, dataset in self.datasets.items()}, path)

    def compute(self, model, dataset, device) -> torch.Tensor:
        """[items, 2]: each item's reference log-probability sums (pair: chosen, rejected; KTO: its completion, its
        mismatched one)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
        share = -(-len(dataset) // world)
        mine = range(rank * share, min(len(dataset), (rank + 1) * share))
        values = torch.zeros(share, 2, device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, share, self.batch_size):  # as many batches on every process (ZeRO-3 gathers)
                indices = list(mine[start:start + self.batch_size])
                batch = self.collator([dataset[i] for i in indices or [0]])  # no item left: a forward all the same
                batch = {name: value.to(device) for name, value in batch.items() if name != DESIRABLE}
                labels, replies = batch.pop("labels"), batch.pop(REPLY_INDEX)
                count = 2 * len(indices or [0])
                totals = self.loss.reply_log_probs(model, batch, labels, replies, count)[0].total.view(-1, 2)
                values[start:start + len(indices)] = totals[:len(indices)]
        model.train(was_training)
        if world > 1:
            shares = [torch.empty_like(values) for _ in range(world)]
            torch.distributed.all_gather(shares, values)
            values = torch.cat(shares)
        return values[:len(dataset)].float().cpu()


def split_pairs(log_probs: ReplyLogProbs) -> tuple[ReplyLogProbs, ReplyLogProbs]:
    """(chosen, rejected) of replies in pair order (2k chosen, 2k + 1 rejected)."""
    return (ReplyLogProbs(log_probs.total[0::2], log_probs.tokens[0::2]),
            ReplyLogProbs(log_probs.total[1::2], log_probs.tokens[1::2]))


def preference_collator_and_loss(stage: str, training_args, model, labelled_logits: bool, reference_model=None):
    """The collator and loss of a preference stage's run. The prompt is computed once per pair where the model's
    attention reads branches (chatft.model.attention's per-sample sdpa); otherwise each reply is its own sample.
    `reference_model`: a full-parameter run's frozen copy (chatft.model.load.frozen_reference)."""
    from chatft.data.preference import KTOCollator, PreferenceCollator
    from chatft.errors import ArgumentError
    from chatft.model.attention import PER_SAMPLE_SDPA, rows_keep_samples_apart

    if not rows_keep_samples_apart(model):
        raise ArgumentError(f"--stage {stage}: {type(model).__name__} has its own attention code, which would let the "
                            "replies of a pair row attend to each other; preference stages need transformers' attention.")
    shared = training_args.pref_shared_prompt and getattr(model.config, "_attn_implementation", None) == PER_SAMPLE_SDPA
    collator = KTOCollator(shared) if stage == "kto" else PreferenceCollator(shared)
    loss = PreferenceLoss(stage, training_args.pref_beta, training_args.pref_loss, training_args.simpo_gamma,
                          training_args.pref_ftx, labelled_logits, desirable_weight=training_args.kto_desirable_weight,
                          undesirable_weight=training_args.kto_undesirable_weight, reference_model=reference_model,
                          precomputed=training_args.precompute_ref_log_probs)
    return collator, loss


def disable_dropout(model) -> int:
    """Every dropout of the model and its adapters off (p = 0), as TRL's disable_dropout does; how many there were
    with p > 0. With dropout the policy's log-probabilities are noisy samples and a continued adapter's first loss is
    not ln 2 against its own frozen copy."""
    switched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            switched += 1
    return switched
