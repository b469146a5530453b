"""Data files -> `Conversation`s -> datasets -> padded batches.

`load_samples` reads JSON (a list) or JSONL (one record a line) in any of chatft.data.formats' formats, and gives each
record's `Conversation` (chatft.data.chat_format), reporting all problems at once (file, index, id, what is wrong) before
any model is loaded. The datasets tokenize conversations, and drop those left with nothing to train by one rule
(`keep_trainable`), which the dry run (chatft.train.report) and run_gptq's calibration (chatft.export.gptq) use too.
`preprocess` is Qwen's function, in Qwen's shapes.

Per-turn loss weights (chatft.data.formats) reach the batch as `loss_weights` (LOSS_WEIGHTS), float weights aligned
with `labels`, only when some sample has a turn of weight other than 1: unweighted data keeps its batches, cache
files and loss path as they were. The collators pad them with 0 and give an unweighted sample in a weighted batch
weight 1 on its labelled tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from chatft.data import chat_format as chat_format_code  # its source is part of the tokenized cache key
from chatft.errors import DataError
from chatft.data.formats import file_format, format_mismatch, ignored_keys, read_record, sample_name
from chatft.data.chat_format import (DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, IM_END, IM_START, LOSS_WEIGHTS, Conversation, TokenizedSample, render,
                                span_weights, to_conversation, to_turns, tokenize_conversation, tokenize_conversations,
                                training_conversations)

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 20


def read_json_or_jsonl(path: str) -> tuple[list, list[str]]:
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


def load_samples(spec: str, data_format: str = "auto") -> list[Conversation]:
    """The conversations of a --data_path (files and directories, comma-separated), in order, each record read and
    checked by chatft.data.formats.read_record; raise `DataError` listing every problem found."""
    files, problems = data_files(spec)
    samples = []
    for path in [] if problems else files:
        records, file_problems = read_json_or_jsonl(path)
        found_format = file_format(records, data_format)
        for index, record in enumerate(records):
            mismatch = format_mismatch(record, found_format, index, path) if data_format == "auto" else None
            if mismatch:
                file_problems.append(mismatch)
                samples.append(None)
                continue
            sample, record_problems = read_record(record, found_format, index, path)
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


def split_off_eval(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the samples (at least one) held out for evaluation."""
    count = max(1, round(fraction * len(samples)))
    if count >= len(samples):
        raise DataError(f"--eval_data_path {fraction}: {len(samples)} sample(s) are too few to hold out {count} and "
                        "still train on some.")
    held_out = set(random.Random(seed).sample(range(len(samples)), count))
    return ([s for i, s in enumerate(samples) if i not in held_out],
            [s for i, s in enumerate(samples) if i in held_out])


TOKENIZED_FORMAT = "chatft-tokenized-2"  # the cache file's layout (plus a "weights" array when any sample has them)
TOKENIZE_BATCH = 512  # conversations per batched tokenizer call (and per progress step, per worker task)


def _conversations_text(conversations: list[Conversation]) -> str:
    """Everything of the conversations that their tokens depend on, as JSON text (ids are not)."""
    return json.dumps([[[[t.role, t.content, [[c.name, c.arguments] for c in t.tool_calls], t.reasoning]
                         + ([t.weight] if t.weight != 1 else []) for t in c.turns],
                        c.tools, c.trained] for c in conversations], ensure_ascii=False)


def tokenized_cache_key(conversations: list[Conversation], tokenizer, max_len: int, system_message: str,
                        chat_format: str = "chatml", reasoning_turns: str = "all", ignore_empty_think: bool = False) -> str:
    """A digest of everything the tokenized samples depend on: the conversations, tokenizer, template, length, and
    the code that renders and labels (chat_format.py's source), so an upgrade never reads a stale cache."""
    digest = hashlib.sha256()
    code = Path(chat_format_code.__file__).read_text(encoding="utf-8")
    for part in (TOKENIZED_FORMAT, code, type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), system_message,
                 chat_format, reasoning_turns, str(max_len), _conversations_text(conversations),
                 *(["ignore_empty_think"] if ignore_empty_think else [])):
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
    arrays = {"input_ids": input_ids, "labelled": labelled, "lengths": lengths, "origins": origins}
    if any(s.weights is not None for s in samples):
        arrays["weights"] = np.concatenate([np.asarray(s.weights if s.weights is not None else
                                                       np.asarray(s.labels) != IGNORE_INDEX, dtype=np.float32)
                                            for s in samples])
    safetensors.numpy.save_file(arrays, str(scratch))
    os.replace(scratch, path)


def _load_tokenized(path: Path) -> list[TokenizedSample]:
    arrays = safetensors.numpy.load_file(str(path))
    bounds = np.cumsum(arrays["lengths"])[:-1]
    input_ids = np.split(arrays["input_ids"], bounds)
    labelled = np.split(arrays["labelled"].astype(bool), bounds)
    labels = np.split(np.where(arrays["labelled"].astype(bool), arrays["input_ids"], IGNORE_INDEX), bounds)
    weights = np.split(arrays["weights"], bounds) if "weights" in arrays else [None] * len(input_ids)
    return [TokenizedSample(ids.tolist(), lab.tolist(), int(origin),
                            w.tolist() if w is not None and (w[mask] != 1).any() else None)
            for ids, lab, origin, w, mask in zip(input_ids, labels, arrays["origins"], weights, labelled)]


_worker_job: dict = {}  # set once in each preprocessing worker process (inherited by fork, not pickled)


def as_features(sample: TokenizedSample) -> dict:
    """What a dataset gives the collator for a sample: input_ids, labels, and its loss weights when it has any."""
    features = {"input_ids": sample.input_ids, "labels": sample.labels}
    return features if sample.weights is None else {**features, LOSS_WEIGHTS: sample.weights}


def _init_worker(tokenizer, max_len, system_message, chat_format):
    _worker_job.update(tokenizer=tokenizer, max_len=max_len, system_message=system_message, chat_format=chat_format)


def _tokenize_in_worker(conversations):
    return tokenize_conversations(conversations, **_worker_job)


def training_conversations_of(samples: list[Conversation], chat_format: str = "chatml", reasoning_turns: str = "all",
                              ignore_empty_think: bool = False) -> tuple[list[Conversation], list[int]]:
    """The conversations to train on, in order, and the index in `samples` each comes from: one per sample, or
    several for a conversation split so that each reply is trained as Qwen3 generates it (qwen3 format).
    `ignore_empty_think` (qwen3 format): empty think blocks are rendered, not trained."""
    conversations, origins = [], []
    for index, sample in enumerate(samples):
        parts = training_conversations(sample, chat_format, reasoning_turns, ignore_empty_think)
        conversations += parts
        origins += [index] * len(parts)
    return conversations, origins


def as_conversations(samples: list) -> list[Conversation]:
    """`Conversation`s (load_samples') as they are; Qwen's sample dicts, as Qwen's scripts pass them, read into them
    (chat_format.to_conversation): what the datasets and `tokenize_training_samples` take."""
    return [to_conversation(sample) for sample in samples]


def tokenize_training_samples(samples: list[Conversation], tokenizer, max_len: int,
                              system_message: str = DEFAULT_SYSTEM_MESSAGE, num_workers: int = 1,
                              cache_dir: str | os.PathLike | None = None, desc: str = "Tokenizing",
                              chat_format: str = "chatml", reasoning_turns: str = "all",
                              ignore_empty_think: bool = False) -> list[TokenizedSample]:
    """Every training sample tokenized, in order, in batched calls (in `num_workers` processes when > 1); a sample split into
    several (training_conversations_of) gives several, each with its `origin`.

    With `cache_dir` (--preprocessing_cache_dir), the result is stored there under `tokenized_cache_key` and a later call with the same
    data, tokenizer, template and length reads it back instead (the other ranks of a distributed run, the
    next run).
    """
    samples = as_conversations(samples)
    cache_path = None
    if cache_dir:
        key = tokenized_cache_key(samples, tokenizer, max_len, system_message, chat_format, reasoning_turns,
                                  ignore_empty_think)
        cache_path = Path(cache_dir) / f"{key}.safetensors"
        if cache_path.is_file():
            logger.info("%s: reusing %d tokenized samples from %s", desc, len(samples), cache_path)
            return _load_tokenized(cache_path)
    conversations, origins = training_conversations_of(samples, chat_format, reasoning_turns, ignore_empty_think)
    batches = [conversations[i : i + TOKENIZE_BATCH] for i in range(0, len(conversations), TOKENIZE_BATCH)]
    progress = tqdm(total=len(conversations), desc=desc, unit=" samples", disable=len(batches) < 4)
    tokenized = []
    if num_workers > 1 and len(batches) > 1:
        # fork: the workers inherit the tokenizer instead of unpickling it for every batch
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                                 initargs=(tokenizer, max_len, system_message, chat_format)) as pool:
            for result in pool.map(_tokenize_in_worker, batches):
                tokenized += result
                progress.update(len(result))
    else:
        for batch in batches:
            tokenized += tokenize_conversations(batch, tokenizer, max_len, system_message, chat_format)
            progress.update(len(batch))
    progress.close()
    for sample, origin in zip(tokenized, origins):
        sample.origin = origin
    if cache_path is not None:
        try:
            _save_tokenized(tokenized, cache_path)
        except OSError as error:  # a read-only or full cache costs the next run time, not this one its data
            logger.warning("Could not cache the tokenized data in %s: %s", cache_dir, error)
    return tokenized


def split_summary(samples: list[TokenizedSample], num_raw: int) -> str:
    """How many conversations were split into how many samples (qwen3 format: each reply trained as Qwen3 generates
    it, training_conversations), and the tokens that costs: every sample of a split conversation but its longest
    repeats context that one holds."""
    lengths: dict[int, list[int]] = {}
    for sample in samples:
        lengths.setdefault(sample.origin, []).append(len(sample.input_ids))
    split = [parts for parts in lengths.values() if len(parts) > 1]
    extra = sum(sum(parts) - max(parts) for parts in split)
    return (f"qwen3 turns: {len(split)} conversation(s) split into {sum(map(len, split))} samples, one per user query "
            f"(and per tool step without reasoning), so each reply is trained as Qwen3 generates it: {len(samples)} "
            f"samples from {num_raw}, +{extra:,} tokens of repeated context")


def untrainable_reason(max_len: int, flag: str = "--model_max_length") -> str:
    """Why a sample is dropped (`keep_trainable`); `flag` is the option that sets `max_len`."""
    return (f"no assistant token within {flag.lstrip('-')}={max_len} (truncation cut every reply: raise {flag} to keep "
            "them)")


def keep_trainable(samples: list[TokenizedSample], sources: list[Conversation], max_len: int,
                   flag: str = "--model_max_length", total: int | None = None) -> tuple[list[TokenizedSample], str | None]:
    """The one rule by which samples are dropped, in training (both datasets), --dry_run (chatft.train.report) and run_gptq's
    calibration and perplexity (chatft.export.gptq): a sample with no labelled token (truncation to `max_len` cut every
    reply) has no loss to learn or measure, and a batch of only such samples would make the loss NaN.

    Returns (the samples that keep a labelled token, in order; the one message that names those dropped, e.g.
    "Dropped 1 of 3 samples with no assistant token within model_max_length=64 (...): sample 1 (id='x')", or None
    when none is). `sources` are the conversations the samples' `origin`s index; `total`, the number of samples the
    message counts them among, when `samples` are only some of them (LazySupervisedDataset's)."""
    kept = [sample for sample in samples if sample.num_trainable]
    if len(kept) == len(samples):
        return kept, None
    dropped = [sample_name(s.origin, sources[s.origin]) for s in samples if not s.num_trainable]
    total = len(samples) if total is None else total
    return kept, f"Dropped {len(dropped)} of {total} samples with {untrainable_reason(max_len, flag)}: {name_list(dropped)}"


def name_list(names: list[str], shown: int = 10) -> str:
    """The first `shown` names, comma-separated, then "..." if there are more."""
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def nothing_to_train(max_len: int, flag: str = "--model_max_length") -> DataError:
    return DataError(f"No sample has an assistant token within {flag.lstrip('-')}={max_len}; raise it.")


class SupervisedDataset(Dataset):
    """Tokenizes every sample up front (Qwen's default); drops samples left with no trainable token (`keep_trainable`).
    Takes `Conversation`s (load_samples') or Qwen's sample dicts (`as_conversations`)."""

    def __init__(self, samples: list[Conversation], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                 num_workers: int = 1, cache_dir: str | os.PathLike | None = None, chat_format: str = "chatml",
                 reasoning_turns: str = "all", ignore_empty_think: bool = False):
        conversations = as_conversations(samples)
        tokenized = tokenize_training_samples(conversations, tokenizer, max_len, system_message, num_workers, cache_dir,
                                              chat_format=chat_format, reasoning_turns=reasoning_turns,
                                              ignore_empty_think=ignore_empty_think)
        if len(tokenized) > len(conversations):
            logger.info(split_summary(tokenized, len(conversations)))
        self.samples, dropped = keep_trainable(tokenized, conversations, max_len)
        if dropped:
            logger.warning(dropped)
        if not self.samples:
            raise nothing_to_train(max_len)

    def __len__(self):
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(len(sample.input_ids) for sample in self.samples)

    @property
    def has_loss_weights(self) -> bool:
        """Whether its batches may carry `loss_weights` (some turn of weight other than 1)."""
        return any(sample.weights is not None for sample in self.samples)

    def __getitem__(self, i) -> dict:
        return as_features(self.samples[i])


def tokens_before_first_reply_bound(conversation: Conversation, system_message: str, chat_format: str) -> int | None:
    """An upper bound on the tokens before a conversation's first trained token, from its text alone (None: it has
    no trained span): the UTF-8 bytes of the text before that reply, since a token of a byte-level or byte-fallback
    tokenizer carries at least one byte, plus one per special token, where a sentencepiece tokenizer may prepend a
    word marker to the text that follows."""
    text, spans = render(conversation, system_message, chat_format)
    if not spans:
        return None
    before = text[: spans[0][0]]
    return len(before.encode("utf-8", "surrogatepass")) + before.count(IM_START) + before.count(IM_END) + 1


class LazySupervisedDataset(Dataset):
    """Tokenizes each sample on first access (`--lazy_preprocess`), for quick starts on big files.

    It holds the very samples SupervisedDataset keeps, dropped up front by the same rule and message
    (`keep_trainable`): substituting another sample when an untrainable one is read would train that one twice an
    epoch, and dropping on first read would change the length the sampler already drew from. Deciding needs no
    tokenizing of most samples: one whose text before its first reply is shorter than max_len tokens by
    `tokens_before_first_reply_bound` keeps a trained token; only the others (the long ones) are tokenized up front,
    in one batched call, and kept for their first access.
    """

    def __init__(self, samples: list[Conversation], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                 chat_format: str = "chatml", reasoning_turns: str = "all", ignore_empty_think: bool = False):
        self.sources = as_conversations(samples)
        self.conversations, self.origins = training_conversations_of(self.sources, chat_format, reasoning_turns,
                                                                     ignore_empty_think)
        self.tokenizer, self.max_len, self.system_message, self.chat_format = tokenizer, max_len, system_message, chat_format
        doubtful = [i for i, conversation in enumerate(self.conversations)
                    if (tokens_before_first_reply_bound(conversation, system_message, chat_format) or max_len) >= max_len]
        tokenized = tokenize_conversations([self.conversations[i] for i in doubtful], tokenizer, max_len, system_message,
                                           chat_format)
        for i, sample in zip(doubtful, tokenized):
            sample.origin = self.origins[i]
        self.cache = dict(zip(doubtful, tokenized))
        _, dropped = keep_trainable(tokenized, self.sources, max_len, total=len(self.conversations))
        if dropped:
            logger.warning(dropped)
        self.kept = [i for i in range(len(self.conversations)) if i not in self.cache or self.cache[i].num_trainable]
        if not self.kept:
            raise nothing_to_train(max_len)

    def __len__(self):
        return len(self.kept)

    @property
    def has_loss_weights(self) -> bool:
        """Whether its batches may carry `loss_weights` (some trained turn of weight other than 1)."""
        return any(w != 1 for conversation in self.conversations for w in span_weights(conversation))

    def __getitem__(self, k) -> dict:
        i = self.kept[k]
        if i not in self.cache:
            self.cache[i] = tokenize_conversation(self.conversations[i], self.tokenizer, self.max_len,
                                                  self.system_message, self.chat_format)
        sample = self.cache[i]
        if not sample.num_trainable:  # the bound held for every tokenizer it was tried on; say so if one breaks it
            origin = self.origins[i]
            raise DataError(f"{sample_name(origin, self.sources[origin])} has {untrainable_reason(self.max_len)}, which "
                            f"--lazy_preprocess did not foresee for {type(self.tokenizer).__name__} (its text before "
                            "the first reply has more tokens than bytes); train without --lazy_preprocess.")
        return as_features(sample)


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
    When a sample has loss weights, `loss_weights` too (float32, 0 on padding; `feature_weights`).
    The one padding loop: ChatCollator pads each batch with it, `preprocess` pads to max_len."""
    batch = {
        "input_ids": torch.full((len(features), length), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
    }
    weighted = any(LOSS_WEIGHTS in f for f in features)
    if weighted:
        batch[LOSS_WEIGHTS] = torch.zeros((len(features), length), dtype=torch.float32)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
        batch["labels"][row, :n] = torch.tensor(f["labels"])
        batch["attention_mask"][row, :n] = 1
        if weighted:
            batch[LOSS_WEIGHTS][row, :n] = torch.tensor(feature_weights(f), dtype=torch.float32)
    return batch


def feature_weights(feature: dict) -> list[float]:
    """A sample's loss weights: its own, else 1 on each labelled token (0 elsewhere)."""
    if LOSS_WEIGHTS in feature:
        return list(feature[LOSS_WEIGHTS])
    return [float(label != IGNORE_INDEX) for label in feature["labels"]]


def preprocess(sources, tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE) -> dict:
    """Qwen's `preprocess`, in Qwen's shape: `sources` is a list of `conversations` lists (or of whole samples).

    Returns `{"input_ids", "labels", "attention_mask"}`, tensors with one row per source, in order, each padded
    (with the tokenizer's pad token, labels with IGNORE_INDEX) or truncated to `max_len`; attention_mask is True on
    the sample's own tokens. A source left with no trainable token after truncation keeps its row, with every
    label IGNORE_INDEX: Qwen's callers count on one row per source (training drops such samples when it builds the
    dataset, by `keep_trainable`, and says so). input_ids and labels are int64 (Qwen's were int32), what embeddings
    and the loss take.
    """
    conversations = [to_conversation(c) if isinstance(c, dict) else to_turns(c) for c in sources]  # samples or turns
    samples = tokenize_conversations(conversations, tokenizer, max_len, system_message)
    batch = pad_rows([{"input_ids": s.input_ids, "labels": s.labels} for s in samples], max_len, tokenizer.pad_token_id)
    return batch | {"attention_mask": batch["attention_mask"].bool()}


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
    model's one-token shift it would be predicted from the previous sample's last token. When any sample has loss
    weights the row has `loss_weights` too (`feature_weights`; 0 at each first label).
    The one filling loop: PackedDataset builds its rows with it, PaddingFreeCollator its batches.

    >>> concatenate_samples([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}])
    {'input_ids': [5, 6, 7, 8, 9], 'labels': [-100, 6, -100, 8, 9], 'position_ids': [0, 1, 0, 1, 2]}
    """
    input_ids, labels, position_ids, weights = [], [], [], []
    weighted = any(LOSS_WEIGHTS in f for f in features)
    for f in features:
        input_ids += f["input_ids"]
        labels += [IGNORE_INDEX] + list(f["labels"][1:])
        position_ids += f.get("position_ids") or list(range(len(f["input_ids"])))
        if weighted:
            weights += [0.0] + feature_weights(f)[1:]
    row = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return row if not weighted else {**row, LOSS_WEIGHTS: weights}


class PackedDataset(Dataset):
    """Whole tokenized samples concatenated into rows of at most `max_len` tokens (`--packing True`).

    A row is then what the Trainer batches: `per_device_train_batch_size` counts rows, each of several samples,
    so an optimizer step sees more samples than the flags say (finetune.py says how many at the start).
    Each row carries `position_ids` that restart at 0 for every sample (and `loss_weights` when a sample has them), so no attention crosses a sample
    boundary (chatft.model.attention), and the first label of every sample is IGNORE_INDEX: after the model's
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

    @property
    def has_loss_weights(self) -> bool:
        return any(LOSS_WEIGHTS in row for row in self.rows)

    def __getitem__(self, i) -> dict:
        return self.rows[i]


@dataclass
class PaddingFreeCollator:
    """A batch as one row with no padding (the default; what TRL calls padding-free): the batch's samples (or
    packed rows) concatenated, `position_ids` restarting at 0 for each sample, and no attention_mask.

    Attention stays inside each sample (chatft.model.attention's per-sample sdpa, flash-attention's variable-length
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
                  chat_format: str = "chatml", reasoning_turns: str = "all", ignore_empty_think: bool = False):
    """Build (train_dataset, eval_dataset or None) from conversations (load_samples'); packed rows with `packing`;
    tokenized in `num_workers` processes and cached in `cache_dir` (unless `lazy`)."""
    rendering = {"chat_format": chat_format, "reasoning_turns": reasoning_turns, "ignore_empty_think": ignore_empty_think}
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

