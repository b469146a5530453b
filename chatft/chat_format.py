"""Conversation -> ChatML text -> (input_ids, labels).

One sample goes through three separate steps:

1. `to_turns` turns a sample's `conversations` list into `Turn`s (roles checked by
   `chatft.data` beforehand), dropping a leading assistant turn as Qwen's script did.
2. `render_chatml` builds the exact text the model sees, and the character spans of
   what the model must generate: each assistant reply and its closing `<|im_end|>`.
3. `tokenize_conversations` tokenizes the texts of many samples in one batched call, with
   offsets, and labels every token that carries a character of a trainable span.

Because the whole text is tokenized in one call, `input_ids` are exactly what
`tokenizer(text)` and `tokenizer.apply_chat_template` (with `chatml_template`) give
at inference: no per-turn tokenization whose joins differ from the real text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken; aligned with input_ids (the model shifts)

    @property
    def num_trainable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def to_turns(conversation: list[dict]) -> list[Turn]:
    """Qwen-format turns (`{"from", "value"}`) -> `Turn`s.

    A conversation that opens with an assistant turn (after an optional system turn)
    loses that turn: there is no user message for it to answer.
    """
    turns = [Turn(t["from"], t["value"]) for t in conversation]
    first = 1 if turns and turns[0].role == "system" else 0
    if len(turns) > first and turns[first].role == "assistant":
        turns = turns[:first] + turns[first + 1 :]
    return turns


def render_chatml(turns: list[Turn], system_message: str = DEFAULT_SYSTEM_MESSAGE) -> tuple[str, list[tuple[int, int]]]:
    """Render turns as ChatML; return the text and the trainable character spans.

    A leading system turn replaces `system_message`. Every assistant turn contributes
    one span covering its content and its `<|im_end|>`.

    >>> render_chatml([Turn("user", "Hi"), Turn("assistant", "Hello!")], "Be brief.")
    ('<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n', [(91, 107)])
    """
    if turns and turns[0].role == "system":
        system_message, turns = turns[0].content, turns[1:]
    text = f"{IM_START}system\n{system_message}{IM_END}\n"
    spans = []
    for turn in turns:
        text += f"{IM_START}{turn.role}\n"
        start = len(text)
        text += f"{turn.content}{IM_END}"
        if turn.role == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def trainable_tokens(offsets: np.ndarray, span_starts: np.ndarray, span_ends: np.ndarray) -> np.ndarray:
    """Which tokens (character `offsets`, [N, 2]) carry a character of a trainable span (sorted, disjoint).

    A token that carries any character of a reply is one the model must generate. Tokens only straddle
    a span's start when a reply begins with a newline that merges with the one after the role name
    ("assistant\\n" + "\\nText" -> "\\n\\n"); such a token is trained. A zero-width token (some byte-level
    pieces) counts as sitting at its start. Vectorized: for each token, the first span ending after its
    start is the only one it can overlap.
    """
    if len(span_ends) == 0:
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    candidate = np.searchsorted(span_ends, starts, side="right")  # first span with end > token start
    in_range = candidate < len(span_ends)
    candidate = np.minimum(candidate, len(span_ends) - 1)
    return in_range & (span_starts[candidate] < np.maximum(ends, starts + 1))


def tokenize_conversations(conversations: list[list[Turn]], tokenizer, max_len: int,
                           system_message: str = DEFAULT_SYSTEM_MESSAGE) -> list[TokenizedSample]:
    """Tokenize many conversations with one batched fast-tokenizer call; truncate each to `max_len` tokens.

    Invariants: `input_ids == tokenizer(render_chatml(...)[0], add_special_tokens=False).input_ids[:max_len]`;
    decoding the labelled tokens gives each assistant reply followed by `<|im_end|>`.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; labels are placed with character offsets, "
            "which only fast (Rust) tokenizers return. Load the tokenizer with use_fast=True."
        )
    if not conversations:
        return []
    rendered = [render_chatml(turns, system_message) for turns in conversations]
    encoding = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    # All samples at once: shift each sample's offsets and spans by its place in one long string (plus a
    # gap of one character, so no token of one sample can reach a span of the next).
    bases = np.cumsum([0] + [len(text) + 1 for text, _ in rendered[:-1]])
    lengths = [len(ids) for ids in encoding["input_ids"]]
    offsets = np.array([pair for sample in encoding["offset_mapping"] for pair in sample], dtype=np.int64)
    offsets = offsets.reshape(-1, 2) + np.repeat(bases, lengths)[:, None]
    spans = np.array([(a + base, b + base) for (_, sample_spans), base in zip(rendered, bases)
                      for a, b in sample_spans], dtype=np.int64).reshape(-1, 2)
    trainable = trainable_tokens(offsets, spans[:, 0], spans[:, 1])
    samples, start = [], 0
    for ids, length in zip(encoding["input_ids"], lengths):
        ids = ids[:max_len]
        mask = trainable[start : start + len(ids)]
        samples.append(TokenizedSample(input_ids=ids, labels=np.where(mask, ids, IGNORE_INDEX).tolist()))
        start += length
    return samples


def tokenize_conversation(
    turns: list[Turn], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE
) -> TokenizedSample:
    """Tokenize one conversation (see `tokenize_conversations`)."""
    return tokenize_conversations([turns], tokenizer, max_len, system_message)[0]


def preprocess(sources, tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE) -> dict:
    """Qwen-compatible batch preprocessing: `sources` is a list of `conversations` lists (or of whole samples).

    Returns `{"input_ids", "labels", "attention_mask"}`, each a list with one unpadded list of
    ints per kept sample (no padding, so every attention_mask is all ones; the collator pads).
    Samples with no trainable token left after truncation are dropped, with a warning.
    """
    conversations = [c["conversations"] if isinstance(c, dict) else c for c in sources]  # whole samples or turns
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    dropped = 0
    for sample in tokenize_conversations([to_turns(c) for c in conversations], tokenizer, max_len, system_message):
        if sample.num_trainable == 0:
            dropped += 1
            continue
        batch["input_ids"].append(sample.input_ids)
        batch["labels"].append(sample.labels)
        batch["attention_mask"].append([1] * len(sample.input_ids))
    if dropped:
        logger.warning(
            "Dropped %d of %d samples with no assistant token left within max_len=%d tokens.",
            dropped, len(sources), max_len,
        )
    return batch


def chatml_template(system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """A Jinja chat template that renders exactly like `render_chatml`.

    Saved with every fine-tuned tokenizer so that `apply_chat_template` reproduces the
    training format token for token, including the run's default system message.
    """
    # json.dumps gives a Jinja string literal; ensure_ascii=False keeps emoji out of \\u surrogate pairs.
    default_system = json.dumps(system_message, ensure_ascii=False)
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        "{%- set system_message = " + default_system + " %}{%- set loop_messages = messages %}"
        "{%- endif %}"
        "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
        "{%- for message in loop_messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def describe_sample(sample: TokenizedSample, tokenizer) -> str:
    """The sample's text with the trained spans shown in [[...]], for eyeballing a mask."""
    runs: list[tuple[bool, list[int]]] = []  # (trained, token ids), decoded per run so UTF-8 stays whole
    for token_id, label in zip(sample.input_ids, sample.labels):
        trained = label != IGNORE_INDEX
        if not runs or runs[-1][0] != trained:
            runs.append((trained, []))
        runs[-1][1].append(token_id)
    return "".join(
        f"[[{tokenizer.decode(ids)}]]" if trained else tokenizer.decode(ids) for trained, ids in runs
    )
