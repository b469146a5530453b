"""Attention inside each sample of a row that holds several, without building a mask.

A padding-free batch (chatft.data.datasets.PaddingFreeCollator) or a packed row puts several samples in one row, with
position_ids restarting at 0 for each. transformers' sdpa path turns that into a block-diagonal mask and computes
attention over the whole row, (sum of lengths)^2, most of it masked out. `per_sample_sdpa` finds the samples from
the position_ids restarts and runs sdpa on each one alone (causal, no mask), sum of length^2. It is registered
through transformers' AttentionInterface (and AttentionMaskInterface, so that no mask is built for such rows) under
PER_SAMPLE_SDPA; a batch that is not a multi-sample row (a padded batch with its mask, one sample a row) goes to
transformers' own sdpa unchanged. On CUDA with flash-attn installed, flash_attention_2's variable-length kernel
reads the same position_ids instead (chatft.plan.resolve_attn_implementation).

Branches: a preference row holds a prompt once and then each reply, every reply's positions continuing from the
prompt's end ([0..P-1, P..P+C-1, P..P+R-1]). A span whose positions restart at p > 0 inside a sample that started
at 0 and has at least p tokens is a branch of that sample: it attends to the sample's first p tokens (the shared
prompt) and causally to itself, not to the replies between (`branch_context`). Only PER_SAMPLE_SDPA reads
branches; flash-attention's variable-length path would take each branch for a sample of its own.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PER_SAMPLE_SDPA = "chatft_per_sample_sdpa"


def sample_spans(position_ids: torch.Tensor | None, rows: int) -> list[list[tuple[int, int]]] | None:
    """For each of `rows` rows, the [start, end) of every sample (a new one starts wherever a position does not
    follow the previous one); None when no row holds more than one sample."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    row_index, column = torch.nonzero(restarts, as_tuple=True)
    if row_index.numel() == 0:
        return None
    length = position_ids.shape[1]
    starts: list[list[int]] = [[0] for _ in range(position_ids.shape[0])]
    for row, col in zip(row_index.tolist(), column.tolist()):
        starts[row].append(col + 1)
    spans = [list(zip(s, s[1:] + [length])) for s in starts]
    return spans * rows if len(spans) == 1 and rows > 1 else spans


def branch_context(positions: list[int], spans: list[tuple[int, int]]) -> list[int | None]:
    """For each span of a row (`positions`: the row's position ids), the index of the first token of the sample it
    branches from (it attends to that sample's first positions[start] tokens), or None for a sample of its own."""
    contexts, sample_start = [], None
    for start, end in spans:
        first = positions[start]
        if first == 0:
            sample_start = start
            contexts.append(None)
        elif sample_start is not None and start - sample_start >= first:
            contexts.append(sample_start)
        else:
            sample_start = None  # a sample that starts mid-sequence: nothing to branch from
            contexts.append(None)
    return contexts


def per_sample_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, run on each sample of a multi-sample row alone (a branch with its shared prefix).
    query/key/value: [batch, heads, length, head_dim]; returns [batch, length, heads, head_dim] as every attention
    function does."""
    spans = None
    if attention_mask is None and query.shape[2] == key.shape[2]:  # training and prefill, not decoding with a cache
        position_ids = kwargs.get("position_ids")
        spans = sample_spans(position_ids, query.shape[0])
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    positions = position_ids.tolist()
    rows = []
    for row, row_spans in enumerate(spans):
        contexts = branch_context(positions[row if len(positions) > 1 else 0], row_spans)
        outputs = []
        for (start, end), context in zip(row_spans, contexts):
            q, k, v = (t[row : row + 1, :, start:end] for t in (query, key, value))
            mask = None
            if context is not None:  # a branch: the shared prefix, then itself causally
                prefix, length = positions[row if len(positions) > 1 else 0][start], end - start
                k = torch.cat([key[row : row + 1, :, context : context + prefix], k], dim=2)
                v = torch.cat([value[row : row + 1, :, context : context + prefix], v], dim=2)
                mask = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device)
                mask[:, prefix:] = mask[:, prefix:].tril()
                mask = mask[None, None]
            outputs.append(sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0])
        rows.append(torch.cat(outputs, dim=1))
    return torch.cat(rows, dim=0), None


def per_sample_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask where the attention function splits the row itself (no padding mask given); sdpa's mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PER_SAMPLE_SDPA, per_sample_sdpa)
AttentionMaskInterface.register(PER_SAMPLE_SDPA, per_sample_mask)


def supports_per_sample_sdpa(model) -> bool:
    """Whether `model` can use PER_SAMPLE_SDPA: its attention goes through transformers' AttentionInterface (so
    position_ids reach it) and is plain causal attention over the whole sample (no sliding window, no soft-capping;
    those keep transformers' masks)."""
    config = model.config
    plain = not any(getattr(config, name, None) for name in ("sliding_window", "attn_logit_softcapping"))
    layer_types = getattr(config, "layer_types", None) or []
    return (rows_keep_samples_apart(model) and getattr(model, "_supports_sdpa", False)
            and plain and all(kind == "full_attention" for kind in layer_types))


def rows_keep_samples_apart(model) -> bool:
    """Whether a row of several samples (restarting position_ids, no attention_mask) keeps each sample's attention
    to itself in `model`: true of models whose attention goes through transformers' attention and mask interfaces
    (sdpa, eager and flash-attention all read the restarts); a model with its own attention code (trust_remote_code)
    would let samples attend to each other, so it gets padded batches instead."""
    return bool(getattr(model, "_supports_attention_backend", False))
