"""Data files -> validated samples -> datasets -> padded batches.

A sample is Qwen's `{"id": ..., "conversations": [{"from": "user"|"assistant"|"system", "value": str}]}`.
`load_samples` reads JSON (a list) or JSONL (one sample a line) and checks every sample,
reporting all problems at once (file, index, id, what is wrong) before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from chatft.chat_format import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, ROLES, to_turns, tokenize_conversation

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 20


class DataError(ValueError):
    """A data file cannot be used; the message lists every problem found (up to a cap)."""


def _read_json_or_jsonl(path: str) -> tuple[list, list[str]]:
    """Return (records, problems). JSONL is one JSON value a line; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate the BOM some editors write
            text = f.read()
    except UnicodeDecodeError as e:
        return [], [f"{path}: not UTF-8 text (byte {e.start}: {e.reason})"]
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A .json file holding several top-level values is most often JSONL under another name.
            if e.msg != "Extra data":
                return [], [f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]
        else:
            if not isinstance(data, list):
                return [], [f"{path}: expected a JSON list of samples, found a {type(data).__name__}"]
            return data, []
    records, problems = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            problems.append(f"{path}: line {line_number}: invalid JSON at column {e.colno}: {e.msg}")
    return records, problems


def sample_problems(sample, index: int, path: str) -> list[str]:
    """Everything wrong with one sample, each message naming file, index and id."""
    where = f"{path}: sample {index}"
    if not isinstance(sample, dict):
        return [f"{where}: expected an object with 'conversations', found a {type(sample).__name__}"]
    if "id" in sample:
        where += f" (id={sample['id']!r})"
    conversation = sample.get("conversations")
    if conversation is None:
        return [f"{where}: missing 'conversations'"]
    if not isinstance(conversation, list) or not conversation:
        return [f"{where}: 'conversations' must be a non-empty list of turns"]
    problems = []
    for j, turn in enumerate(conversation):
        at = f"{where}: conversations[{j}]"
        if not isinstance(turn, dict):
            problems.append(f"{at}: expected an object with 'from' and 'value', found a {type(turn).__name__}")
            continue
        missing = [key for key in ("from", "value") if key not in turn]
        if missing:
            problems.append(f"{at}: missing {' and '.join(repr(k) for k in missing)}")
            continue
        role, value = turn["from"], turn["value"]
        if role not in ROLES:
            problems.append(f"{at}: unknown role {role!r} in 'from' (expected one of {', '.join(ROLES)})")
        if not isinstance(value, str):
            problems.append(f"{at}: 'value' must be a string, found a {type(value).__name__}")
        elif role in ("user", "assistant") and not value.strip():
            problems.append(f"{at}: empty {role} 'value'")
    if not problems and not any(t.role == "assistant" for t in to_turns(conversation)):
        problems.append(
            f"{where}: no assistant turn to learn from (a leading assistant turn is dropped, "
            "since no user message precedes it)"
        )
    return problems


def load_samples(path: str) -> list[dict]:
    """Read and validate one data file; raise `DataError` listing every problem found."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    records, problems = _read_json_or_jsonl(path)
    for index, sample in enumerate(records):
        problems += sample_problems(sample, index, path)
    if not problems and not records:
        problems.append(f"{path}: contains no samples")
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more problems")
        raise DataError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(shown))
    return records


def _sample_name(raw: dict, index: int) -> str:
    return f"sample {index} (id={raw['id']!r})" if "id" in raw else f"sample {index}"


class SupervisedDataset(Dataset):
    """Tokenizes every sample up front (Qwen's default); drops samples left with no trainable token."""

    def __init__(self, raw_data: list[dict], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE):
        self.samples = []
        dropped = []
        for index, raw in enumerate(raw_data):
            sample = tokenize_conversation(to_turns(raw["conversations"]), tokenizer, max_len, system_message)
            if sample.num_trainable:
                self.samples.append(sample)
            else:
                dropped.append(_sample_name(raw, index))
        if dropped:
            logger.warning(
                "Dropped %d of %d samples with no assistant token within model_max_length=%d: %s",
                len(dropped), len(raw_data), max_len, ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""),
            )
        if not self.samples:
            raise DataError(f"No sample has an assistant token within model_max_length={max_len}; raise it.")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> dict:
        return {"input_ids": self.samples[i].input_ids, "labels": self.samples[i].labels}


class LazySupervisedDataset(Dataset):
    """Tokenizes each sample on first access (`--lazy_preprocess`), for quick starts on big files.

    Whether a sample keeps a trainable token after truncation is only known once it is
    tokenized, so an untrainable sample is replaced by the next trainable one (and reported)
    rather than yielding a batch with no loss, which would be NaN.
    """

    def __init__(self, raw_data: list[dict], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE):
        self.raw_data = raw_data
        self.tokenizer, self.max_len, self.system_message = tokenizer, max_len, system_message
        self.cache = {}

    def __len__(self):
        return len(self.raw_data)

    def _tokenized(self, i):
        if i not in self.cache:
            turns = to_turns(self.raw_data[i]["conversations"])
            self.cache[i] = tokenize_conversation(turns, self.tokenizer, self.max_len, self.system_message)
            if not self.cache[i].num_trainable:
                logger.warning(
                    "%s has no assistant token within model_max_length=%d; using the next sample instead.",
                    _sample_name(self.raw_data[i], i), self.max_len,
                )
        return self.cache[i]

    def __getitem__(self, i) -> dict:
        for offset in range(len(self)):
            sample = self._tokenized((i + offset) % len(self))
            if sample.num_trainable:
                return {"input_ids": sample.input_ids, "labels": sample.labels}
        raise DataError(f"No sample has an assistant token within model_max_length={self.max_len}; raise it.")


@dataclass
class ChatCollator:
    """Pads a batch to its longest sample, rounded up to a multiple of `pad_to_multiple_of`.

    input_ids are padded with `pad_token_id`, labels with IGNORE_INDEX, attention_mask with 0;
    padding goes on the right.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 8
    pad_to_length: int | None = None  # the seed's way (every batch this long); only for the benchmark's comparison

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        length = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        length = max(length, self.pad_to_length or 0)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
        }
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            batch["labels"][row, :n] = torch.tensor(f["labels"])
            batch["attention_mask"][row, :n] = 1
        return batch


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity, first-fit decreasing.

    Items go longest first into the first bin with room, found in O(log bins) with a max-tree over the
    bins' free space. Example: lengths [5, 3, 4, 2], capacity 7 -> [[0, 3], [2, 1]].
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"an item of length {max(lengths)} does not fit a bin of {capacity}")
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [0] * (2 * size)  # leaves: the free space of bins 0..size-1 (unopened bins have `capacity`)
    for leaf in range(size):
        free[size + leaf] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        node = 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if free[2 * node] >= lengths[index] else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(index)
        free[node] -= lengths[index]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


class PackedDataset(Dataset):
    """Whole tokenized samples concatenated into rows of at most `max_len` tokens (`--packing`).

    Each row carries `position_ids` that restart at 0 for every sample; with no attention_mask, transformers
    turns them into a block-diagonal causal mask (flash-attention: its variable-length kernel), so no token
    attends across a sample boundary. The first label of every sample is IGNORE_INDEX: after the model's
    one-token shift it would be predicted from the previous sample's last token.
    Rows are filled first-fit decreasing; the Trainer's sampler shuffles the rows every epoch.
    """

    def __init__(self, samples: Dataset, max_len: int):
        features = [samples[i] for i in range(len(samples))]
        self.rows = []
        for members in first_fit_decreasing([len(f["input_ids"]) for f in features], max_len):
            input_ids, labels, position_ids = [], [], []
            for index in members:
                feature = features[index]
                input_ids += feature["input_ids"]
                labels += [IGNORE_INDEX] + feature["labels"][1:]
                position_ids += list(range(len(feature["input_ids"])))
            self.rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
        self.num_samples = len(features)
        logger.info("Packed %d samples into %d rows of at most %d tokens (%.1f%% filled)", len(features),
                    len(self.rows), max_len, 100 * sum(len(r["input_ids"]) for r in self.rows) / (len(self.rows) * max_len))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        return self.rows[i]


@dataclass
class PackedCollator:
    """Batches packed rows: input_ids, labels and position_ids, and no attention_mask (the position_ids say
    where samples start). Rows are padded to the longest; the padding is a sample of its own (positions from
    0, labels IGNORE_INDEX), so real tokens never attend to it. `flatten=True` puts the whole batch in one
    row instead, with no padding at all: what flash-attention's variable-length path wants."""

    pad_token_id: int
    pad_to_multiple_of: int = 8
    flatten: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.flatten:
            return {name: torch.tensor([sum((f[name] for f in features), [])])
                    for name in ("input_ids", "labels", "position_ids")}
        longest = max(len(f["input_ids"]) for f in features)
        length = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((len(features), length), dtype=torch.long),
        }
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            batch["labels"][row, :n] = torch.tensor(f["labels"])
            batch["position_ids"][row] = torch.tensor(f["position_ids"] + list(range(length - n)))
        return batch


def make_datasets(train_samples, eval_samples, tokenizer, max_len: int, lazy: bool, system_message: str,
                  packing: bool = False):
    """Build (train_dataset, eval_dataset or None) from validated samples; packed rows with `packing`."""
    dataset_class = LazySupervisedDataset if lazy else SupervisedDataset
    train = dataset_class(train_samples, tokenizer, max_len, system_message)
    evaluation = dataset_class(eval_samples, tokenizer, max_len, system_message) if eval_samples else None
    if packing:
        train = PackedDataset(train, max_len)
        evaluation = PackedDataset(evaluation, max_len) if evaluation is not None else None
    return train, evaluation


def make_collator(tokenizer, packing: bool, attn_implementation: str | None, pad_to_length: int | None = None):
    if packing:  # flash-attention reads sample boundaries from position_ids only in a single flattened row
        return PackedCollator(tokenizer.pad_token_id, flatten="flash" in (attn_implementation or ""))
    return ChatCollator(pad_token_id=tokenizer.pad_token_id, pad_to_length=pad_to_length)

