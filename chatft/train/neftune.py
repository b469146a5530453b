"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training, each sample's noise bounded
by alpha / sqrt(length · hidden size), its own length, as the paper's code computes it from the attention mask.

transformers' hook (Trainer with --neftune_noise_alpha) divides by the length of the whole row: right for a
padded batch of one sample, but a padding-free row holds a whole batch, so every sample would get the row's,
much weaker, noise. `SampleScaledNoise` gives each sample of any row (padded, padding-free or packed) its own
scale and none to padding; ChatTrainer registers it instead of transformers' hook.
"""

from __future__ import annotations

import torch


def token_sample_lengths(batch: dict) -> torch.Tensor | None:
    """For each token of a batch, the length of the sample it belongs to (0 on padding), shape (rows, tokens).

    Samples are told apart by `position_ids` restarting at 0 (padding-free and packed rows) and by
    `attention_mask` (padding); None when the batch has neither.

    >>> token_sample_lengths({"position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    tensor([[3, 3, 3, 2, 2]])
    """
    positions, mask = batch.get("position_ids"), batch.get("attention_mask")
    if positions is None and mask is None:
        return None
    if positions is None:
        lengths = mask.sum(dim=1, keepdim=True).expand_as(mask)
    else:
        sample = ((positions == 0).long().cumsum(dim=1) - 1).clamp(min=0)  # index of each token's sample in its row
        counts = torch.zeros_like(sample).scatter_add_(1, sample, torch.ones_like(sample))
        lengths = counts.gather(1, sample)
    if mask is not None and mask.dim() == 2:
        lengths = lengths * (mask > 0)
    return lengths


class SampleScaledNoise:
    """A forward hook for the input embeddings adding NEFTune noise scaled per sample. `set_batch(inputs)` before
    each training forward tells it where the samples are; in eval mode it adds nothing."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None

    def set_batch(self, batch: dict) -> None:
        self.lengths = token_sample_lengths(batch)

    def attach(self, embeddings: torch.nn.Module):
        """Register on `embeddings` (the model's input embedding layer); returns the handle that removes it."""
        return embeddings.register_forward_hook(self)

    def bound(self, output: torch.Tensor) -> torch.Tensor:
        """The noise bound of each position of `output` (rows, tokens, hidden): alpha / sqrt(length · hidden)."""
        rows, tokens, hidden = output.shape
        lengths = self.lengths
        if lengths is None or tuple(lengths.shape) != (rows, tokens):  # no batch told: each row is one sample
            lengths = torch.full((rows, tokens), tokens, device=output.device)
        lengths = lengths.to(device=output.device, dtype=torch.float32)
        bound = self.alpha / torch.sqrt(lengths.clamp(min=1) * hidden)
        return torch.where(lengths > 0, bound, torch.zeros_like(bound)).to(output.dtype).unsqueeze(-1)

    def __call__(self, module, args, output):
        if not module.training:
            return output
        return output + torch.empty_like(output).uniform_(-1, 1) * self.bound(output)
