"""Data files -> validated samples -> datasets -> padded batches.

A sample is Qwen's `{"id": ..., "conversations": [{"from": "user"|"assistant"|"system", "value": str}]}`, optionally
with tool use (`function_call`/`observation` turns and `tools`, see chatft.formats).
`load_samples` reads JSON (a list) or JSONL (one sample a line) and checks every sample,
reporting all problems at once (file, index, id, what is wrong) before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from chatft import chat_format as chat_format_code  # its source is part of the tokenized cache key
from chatft.errors import DataError
from chatft.formats import file_format, format_mismatch, ignored_keys, sample_name, to_sample, where
from chatft.chat_format import (DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, ROLES, Conversation, TokenizedSample,
                                parse_tool_calls, parse_tools, to_conversation, to_turns, tokenize_conversation,
                                tokenize_conversations, training_conversations)

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 20


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


def sample_problems(sample, index: int, path: str, names: tuple[str, str, str] = ("conversations", "from", "value"),
                    turn_sources: list[str] | None = None) -> list[str]:
    """Everything wrong with one sample (in the seed's format), each message naming file, index and id; `names`
    are the list, role and text fields to name in messages and `turn_sources` where each turn came from (a
    converted sample's original ones). Checked in stages, each only once the one before found nothing: the
    sample's shape, its tools and every turn, the order of tool calls and results, the conversation as trained."""
    turns_name, _, value_name = names
    at = where(path, index, sample)
    if not isinstance(sample, dict):
        return [f"{at}: expected an object with 'conversations', found a {type(sample).__name__}"]
    conversation = sample.get("conversations")
    if conversation is None:
        return [f"{at}: missing 'conversations'"]
    if not isinstance(conversation, list) or not conversation:
        return [f"{at}: '{turns_name}' must be a non-empty list of turns"]
    turn_at = [f"{at}: {turn_sources[j] if turn_sources else f'{turns_name}[{j}]'}" for j in range(len(conversation))]
    problems = _tools_problems(sample, at)
    for turn, turn_where in zip(conversation, turn_at):
        problems += _turn_problems(turn, turn_where, value_name)
    return problems or _tool_order_problems([turn["from"] for turn in conversation], turn_at) or \
        _trained_conversation_problems(conversation, at)


def _tools_problems(sample: dict, at: str) -> list[str]:
    """The sample's tool definitions, when it has them, must parse (chat_format.parse_tools)."""
    if "tools" not in sample:
        return []
    try:
        parse_tools(sample["tools"])
    except ValueError as error:
        return [f"{at}: 'tools': {error}"]
    return []


def _turn_problems(turn, at: str, value_name: str) -> list[str]:
    """One turn's types, role, text, reasoning and (for a tool call) JSON."""
    if not isinstance(turn, dict):
        return [f"{at}: expected an object with 'from' and 'value', found a {type(turn).__name__}"]
    missing = [key for key in ("from", "value") if key not in turn]
    if missing:
        return [f"{at}: missing {' and '.join(repr(k) for k in missing)}"]
    problems = []
    role, value, reasoning = turn["from"], turn["value"], turn.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        problems.append(f"{at}: 'reasoning_content' must be a string, found a {type(reasoning).__name__}")
    elif reasoning and role not in ("assistant", "function_call"):
        problems.append(f"{at}: 'reasoning_content' on a {role} turn (only an assistant's reasoning is read)")
    if role not in ROLES:
        problems.append(f"{at}: unknown role {role!r} in 'from' (expected one of {', '.join(ROLES)})")
    if not isinstance(value, str):
        problems.append(f"{at}: '{value_name}' must be a string, found a {type(value).__name__}")
    elif role in ("user", "assistant") and not value.strip() and not (role == "assistant" and reasoning):
        problems.append(f"{at}: empty {role} '{value_name}'")
    elif role == "function_call":
        try:
            parse_tool_calls(value)
        except ValueError as error:
            problems.append(f"{at}: {error}")
    return problems


def _tool_order_problems(roles: list[str], turn_at: list[str]) -> list[str]:
    """A tool call is answered by its results; results answer a call."""
    problems = []
    for j, role in enumerate(roles):
        before, after = roles[j - 1] if j else None, roles[j + 1] if j + 1 < len(roles) else None
        if role == "function_call" and after not in (None, "observation"):
            problems.append(f"{turn_at[j]}: tool call out of order: it must be followed by its result (a tool "
                            f"result turn), found a {after} turn")
        if role == "observation" and before not in ("function_call", "observation"):
            problems.append(f"{turn_at[j]}: tool result out of order: it must follow a tool call (or another "
                            f"result), found after {f'a {before} turn' if before else 'nothing'}")
    return problems


def _trained_conversation_problems(conversation: list[dict], at: str) -> list[str]:
    """After conversion (chat_format.to_turns drops a leading assistant turn) something must be left to learn."""
    turns = to_turns(conversation)
    opening = turns[1:] if turns and turns[0].role == "system" else turns
    if opening and opening[0].role == "tool":
        return [f"{at}: the conversation opens with a tool call and its result (a leading assistant turn is dropped, "
                "since no user message precedes it)"]
    if not any(t.role == "assistant" for t in turns):
        return [f"{at}: no assistant turn to learn from (a leading assistant turn is dropped, since no user message "
                "precedes it)"]
    return []


def data_files(spec: str) -> tuple[list[str], list[str]]:
    """(files, problems) for a --data_path: files and directories (their .json/.jsonl files), comma-separated."""
    files, problems = [], []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(os.path.join(part, n) for n in os.listdir(part) if n.endswith((".json", ".jsonl")))
            files += found
            if not found:
                problems.append(f"{part}: a directory with no .json or .jsonl file")
        elif os.path.isfile(part):
            files.append(part)
        else:
            problems.append(f"{part}: no such data file")
    return files, problems


def load_samples(spec: str, data_format: str = "auto") -> list[dict]:
    """Read, convert (chatft.formats) and validate the data of a --data_path (files and directories,
    comma-separated); raise `DataError` listing every problem found."""
    files, problems = data_files(spec)
    samples = []
    for path in [] if problems else files:
        records, file_problems = _read_json_or_jsonl(path)
        found_format = file_format(records, data_format)
        names = ("messages", "role", "content") if found_format == "messages" else ("conversations", "from", "value")
        for index, record in enumerate(records):
            mismatch = format_mismatch(record, found_format, index, path) if data_format == "auto" else None
            if mismatch:
                file_problems.append(mismatch)
                samples.append(None)
                continue
            sample, record_problems, turn_sources = to_sample(record, found_format, index, path)
            if sample is not None:
                record_problems += sample_problems(sample, index, path, names, turn_sources)
            file_problems += record_problems
            samples.append(sample)
        if not file_problems and not records:
            file_problems.append(f"{path}: contains no samples")
        unused = ignored_keys(records, found_format)
        if unused and not file_problems:
            logger.warning("%s: keys not read, ignored: %s", path, "; ".join(unused))
        problems += file_problems
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more problems")
        raise DataError(f"{len(problems)} problem(s) in {spec}:\n  " + "\n  ".join(shown))
    return samples


def split_off_eval(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded random `fraction` of the samples (at least one) held out for evaluation."""
    count = max(1, round(fraction * len(samples)))
    if count >= len(samples):
        raise DataError(f"--eval_data_path {fraction}: {len(samples)} sample(s) are too few to hold out {count} and "
                        "still train on some.")
    held_out = set(random.Random(seed).sample(range(len(samples)), count))
    return ([s for i, s in enumerate(samples) if i not in held_out],
            [s for i, s in enumerate(samples) if i in held_out])


TOKENIZED_FORMAT = "chatft-tokenized-2"  # the cache file's layout
TOKENIZE_BATCH = 512  # conversations per batched tokenizer call (and per progress step, per worker task)


def tokenized_cache_key(raw_data: list[dict], tokenizer, max_len: int, system_message: str, chat_format: str = "chatml",
                        reasoning_turns: str = "all") -> str:
    """A digest of everything the tokenized samples depend on: data content, tokenizer, template, length, and
    the code that renders and labels (chat_format.py's source), so an upgrade never reads a stale cache."""
    digest = hashlib.sha256()
    code = Path(chat_format_code.__file__).read_text(encoding="utf-8")
    for part in (TOKENIZED_FORMAT, code, type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), system_message,
                 chat_format, reasoning_turns, str(max_len), json.dumps(raw_data, sort_keys=True, ensure_ascii=False)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:40]


def _save_tokenized(samples: list[TokenizedSample], path: Path) -> None:
    """safetensors (no pickle), written to a scratch name and renamed: readers never see half a file."""
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    input_ids = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in samples] or [np.zeros(0, np.int64)])
    labelled = np.concatenate([np.asarray(s.labels) != IGNORE_INDEX for s in samples] or [np.zeros(0, bool)])
    labelled = labelled.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    origins = np.array([s.origin for s in samples], dtype=np.int64)
    safetensors.numpy.save_file({"input_ids": input_ids, "labelled": labelled, "lengths": lengths, "origins": origins},
                                str(scratch))
    os.replace(scratch, path)


def _load_tokenized(path: Path) -> list[TokenizedSample]:
    arrays = safetensors.numpy.load_file(str(path))
    bounds = np.cumsum(arrays["lengths"])[:-1]
    input_ids = np.split(arrays["input_ids"], bounds)
    labels = np.split(np.where(arrays["labelled"].astype(bool), arrays["input_ids"], IGNORE_INDEX), bounds)
    return [TokenizedSample(ids.tolist(), lab.tolist(), int(origin))
            for ids, lab, origin in zip(input_ids, labels, arrays["origins"])]


_worker_job: dict = {}  # set once in each preprocessing worker process (inherited by fork, not pickled)


def _init_worker(tokenizer, max_len, system_message, chat_format):
    _worker_job.update(tokenizer=tokenizer, max_len=max_len, system_message=system_message, chat_format=chat_format)


def _tokenize_in_worker(conversations):
    return tokenize_conversations(conversations, **_worker_job)


def training_conversations_of(raw_data: list[dict], chat_format: str = "chatml", reasoning_turns: str = "all"
                              ) -> tuple[list[Conversation], list[int]]:
    """The conversations to train on, in order, and the index in `raw_data` each comes from: one per sample, or
    several for a conversation split so that each reasoning turn is trained in its own context (qwen3 format)."""
    conversations, origins = [], []
    for index, raw in enumerate(raw_data):
        parts = training_conversations(to_conversation(raw), chat_format, reasoning_turns)
        conversations += parts
        origins += [index] * len(parts)
    return conversations, origins


def tokenize_training_samples(raw_data: list[dict], tokenizer, max_len: int,
                              system_message: str = DEFAULT_SYSTEM_MESSAGE, num_workers: int = 1,
                              cache_dir: str | os.PathLike | None = None, desc: str = "Tokenizing",
                              chat_format: str = "chatml", reasoning_turns: str = "all") -> list[TokenizedSample]:
    """Every training sample tokenized, in order, in batched calls (in `num_workers` processes when > 1); a sample split into
    several (training_conversations_of) gives several, each with its `origin`.

    With `cache_dir` (--preprocessing_cache_dir), the result is stored there under `tokenized_cache_key` and a later call with the same
    data, tokenizer, template and length reads it back instead (the other ranks of a distributed run, the
    next run).
    """
    cache_path = None
    if cache_dir:
        key = tokenized_cache_key(raw_data, tokenizer, max_len, system_message, chat_format, reasoning_turns)
        cache_path = Path(cache_dir) / f"{key}.safetensors"
        if cache_path.is_file():
            logger.info("%s: reusing %d tokenized samples from %s", desc, len(raw_data), cache_path)
            return _load_tokenized(cache_path)
    conversations, origins = training_conversations_of(raw_data, chat_format, reasoning_turns)
    batches = [conversations[i : i + TOKENIZE_BATCH] for i in range(0, len(conversations), TOKENIZE_BATCH)]
    progress = tqdm(total=len(conversations), desc=desc, unit=" samples", disable=len(batches) < 4)
    samples = []
    if num_workers > 1 and len(batches) > 1:
        # fork: the workers inherit the tokenizer instead of unpickling it for every batch
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                                 initargs=(tokenizer, max_len, system_message, chat_format)) as pool:
            for result in pool.map(_tokenize_in_worker, batches):
                samples += result
                progress.update(len(result))
    else:
        for batch in batches:
            samples += tokenize_conversations(batch, tokenizer, max_len, system_message, chat_format)
            progress.update(len(batch))
    progress.close()
    for sample, origin in zip(samples, origins):
        sample.origin = origin
    if cache_path is not None:
        try:
            _save_tokenized(samples, cache_path)
        except OSError as error:  # a read-only or full cache costs the next run time, not this one its data
            logger.warning("Could not cache the tokenized data in %s: %s", cache_dir, error)
    return samples


def split_summary(samples: list[TokenizedSample], num_raw: int) -> str:
    """How many conversations were split into how many samples (qwen3 format, reasoning in earlier turns)."""
    parts = Counter(sample.origin for sample in samples)
    split = sum(count > 1 for count in parts.values())
    return (f"split {split} conversation(s) with reasoning in earlier turns into one sample per user query: "
            f"{len(samples)} samples from {num_raw} (each reasoning turn trained in the context it is generated in)")


def split_trainable(samples: list[TokenizedSample], raw_data: list[dict]) -> tuple[list[TokenizedSample], list[str]]:
    """(the samples that keep a trainable token, the names of those that do not, e.g. "sample 3 (id='x')"). The rule
    every dataset (and the dry run) drops samples by: a sample without a labelled token has no loss."""
    kept = [sample for sample in samples if sample.num_trainable]
    dropped = [sample_name(s.origin, raw_data[s.origin]) for s in samples if not s.num_trainable]
    return kept, dropped


def untrainable_reason(max_len: int) -> str:
    """Why a sample is dropped, said the same way by training, --lazy_preprocess and --dry_run."""
    return f"no assistant token within model_max_length={max_len} (truncation cut every reply: raise --model_max_length to train on them)"


def name_list(names: list[str], shown: int = 10) -> str:
    """The first `shown` names, comma-separated, then "..." if there are more."""
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def nothing_to_train(max_len: int) -> DataError:
    return DataError(f"No sample has an assistant token within model_max_length={max_len}; raise it.")


class SupervisedDataset(Dataset):
    """Tokenizes every sample up front (Qwen's default); drops samples left with no trainable token."""

    def __init__(self, raw_data: list[dict], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                 num_workers: int = 1, cache_dir: str | os.PathLike | None = None, chat_format: str = "chatml",
                 reasoning_turns: str = "all"):
        tokenized = tokenize_training_samples(raw_data, tokenizer, max_len, system_message, num_workers, cache_dir,
                                              chat_format=chat_format, reasoning_turns=reasoning_turns)
        if len(tokenized) > len(raw_data):
            logger.info(split_summary(tokenized, len(raw_data)))
        self.samples, dropped = split_trainable(tokenized, raw_data)
        if dropped:
            logger.warning("Dropped %d of %d samples with %s: %s", len(dropped), len(tokenized),
                           untrainable_reason(max_len), name_list(dropped))
        if not self.samples:
            raise nothing_to_train(max_len)

    def __len__(self):
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(len(sample.input_ids) for sample in self.samples)

    def __getitem__(self, i) -> dict:
        return {"input_ids": self.samples[i].input_ids, "labels": self.samples[i].labels}


class LazySupervisedDataset(Dataset):
    """Tokenizes each sample on first access (`--lazy_preprocess`), for quick starts on big files.

    Whether a sample keeps a trainable token after truncation is only known once it is
    tokenized, so an untrainable sample is replaced by the next trainable one (and reported)
    rather than yielding a batch with no loss, which would be NaN.
    """

    def __init__(self, raw_data: list[dict], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                 chat_format: str = "chatml", reasoning_turns: str = "all"):
        self.raw_data = raw_data
        # converting is cheap; tokenizing is what waits for first use
        self.conversations, self.origins = training_conversations_of(raw_data, chat_format, reasoning_turns)
        self.tokenizer, self.max_len, self.system_message, self.chat_format = tokenizer, max_len, system_message, chat_format
        self.cache = {}

    def __len__(self):
        return len(self.conversations)

    def _tokenized(self, i):
        if i not in self.cache:
            self.cache[i] = tokenize_conversation(self.conversations[i], self.tokenizer, self.max_len,
                                                  self.system_message, self.chat_format)
            if not self.cache[i].num_trainable:
                origin = self.origins[i]
                logger.warning("%s has %s; using the next sample instead.",
                               sample_name(origin, self.raw_data[origin]), untrainable_reason(self.max_len))
        return self.cache[i]

    def __getitem__(self, i) -> dict:
        for offset in range(len(self)):
            sample = self._tokenized((i + offset) % len(self))
            if sample.num_trainable:
                return {"input_ids": sample.input_ids, "labels": sample.labels}
        raise nothing_to_train(self.max_len)


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
        return pad_rows(features, max(length, self.pad_to_length or 0), self.pad_token_id)


def pad_rows(features: list[dict], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Samples as rows of `length` tokens, padded on the right: input_ids with `pad_token_id`, labels with
    IGNORE_INDEX, attention_mask 1 on each sample's own tokens and 0 on padding (int64 tensors).
    The one padding loop: ChatCollator pads each batch with it, chat_format.preprocess pads to max_len."""
    batch = {
        "input_ids": torch.full((len(features), length), pad_token_id, dtype=torch.long),
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


def concatenate_samples(features: list[dict]) -> dict[str, list[int]]:
    """Samples (or packed rows) end to end in one row: input_ids, labels and position_ids, which restart at 0 for
    each sample (a packed row keeps its own). Each sample's (or row's) first label becomes IGNORE_INDEX: after the
    model's one-token shift it would be predicted from the previous sample's last token.
    The one filling loop: PackedDataset builds its rows with it, PaddingFreeCollator its batches.

    >>> concatenate_samples([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}])
    {'input_ids': [5, 6, 7, 8, 9], 'labels': [-100, 6, -100, 8, 9], 'position_ids': [0, 1, 0, 1, 2]}
    """
    input_ids, labels, position_ids = [], [], []
    for f in features:
        input_ids += f["input_ids"]
        labels += [IGNORE_INDEX] + list(f["labels"][1:])
        position_ids += f.get("position_ids") or list(range(len(f["input_ids"])))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class PackedDataset(Dataset):
    """Whole tokenized samples concatenated into rows of at most `max_len` tokens (`--packing True`).

    A row is then what the Trainer batches: `per_device_train_batch_size` counts rows, each of several samples,
    so an optimizer step sees more samples than the flags say (finetune.py says how many at the start).
    Each row carries `position_ids` that restart at 0 for every sample, so no attention crosses a sample
    boundary (chatft.attention), and the first label of every sample is IGNORE_INDEX: after the model's
    one-token shift it would be predicted from the previous sample's last token.
    Rows are filled first-fit decreasing; the Trainer's sampler shuffles the rows every epoch.
    """

    def __init__(self, samples: Dataset, max_len: int):
        features = [samples[i] for i in range(len(samples))]
        self.rows = [concatenate_samples([features[index] for index in members])
                     for members in first_fit_decreasing([len(f["input_ids"]) for f in features], max_len)]
        self.num_samples = len(features)
        self.max_len = max_len

    @property
    def fill(self) -> float:
        """The fraction of the rows' max_len tokens that hold sample tokens."""
        return self.num_tokens / (len(self.rows) * self.max_len)

    def __len__(self):
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(row["input_ids"]) for row in self.rows)

    def __getitem__(self, i) -> dict:
        return self.rows[i]


@dataclass
class PaddingFreeCollator:
    """A batch as one row with no padding (the default; what TRL calls padding-free): the batch's samples (or
    packed rows) concatenated, `position_ids` restarting at 0 for each sample, and no attention_mask.

    Attention stays inside each sample (chatft.attention's per-sample sdpa, flash-attention's variable-length
    kernel, or transformers' block-diagonal mask for eager), so every sample gets the loss and gradients it gets
    in a padded batch, with no padding computed. The first label of every sample is IGNORE_INDEX: after the
    model's one-token shift it would be predicted from the previous sample's last token (in a padded batch it is
    never predicted either), so the loss sums and normalises over the same tokens as the padded batch.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        row = concatenate_samples(features)
        return {name: torch.tensor([values]) for name, values in row.items()}


def make_datasets(train_samples, eval_samples, tokenizer, max_len: int, lazy: bool, system_message: str,
                  packing: bool = False, num_workers: int = 1, cache_dir: str | os.PathLike | None = None,
                  chat_format: str = "chatml", reasoning_turns: str = "all"):
    """Build (train_dataset, eval_dataset or None) from validated samples; packed rows with `packing`;
    tokenized in `num_workers` processes and cached in `cache_dir` (unless `lazy`)."""
    rendering = {"chat_format": chat_format, "reasoning_turns": reasoning_turns}
    if lazy:
        train = LazySupervisedDataset(train_samples, tokenizer, max_len, system_message, **rendering)
        evaluation = (LazySupervisedDataset(eval_samples, tokenizer, max_len, system_message, **rendering)
                      if eval_samples else None)
    else:
        train = SupervisedDataset(train_samples, tokenizer, max_len, system_message, num_workers, cache_dir, **rendering)
        evaluation = (SupervisedDataset(eval_samples, tokenizer, max_len, system_message, num_workers, cache_dir,
                                        **rendering) if eval_samples else None)
    if packing:
        train = PackedDataset(train, max_len)
        evaluation = PackedDataset(evaluation, max_len) if evaluation is not None else None
    return train, evaluation


def make_collator(tokenizer, padding_free: bool, pad_to_length: int | None = None):
    """The default: one row per batch, no padding (PaddingFreeCollator; also for packed rows). Otherwise batches
    padded to their longest sample, or to `pad_to_length` (the seed's way)."""
    if padding_free and not pad_to_length:
        return PaddingFreeCollator()
    return ChatCollator(pad_token_id=tokenizer.pad_token_id, pad_to_length=pad_to_length)

