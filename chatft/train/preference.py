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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
        metrics = {"rewards/chosen": chosen.mean().item() if chosen.numel() else math.nan,
                   "rewards/rejected": rejected.mean().item() if rejected.numel() else math.nan}
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
