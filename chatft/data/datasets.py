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

import codecs
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import time
import zipfile
import zlib
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from chatft.data import chat_format as chat_format_code  # its source is part of the tokenized cache key
from chatft.errors import DataError
from chatft.data import formats as formats_code  # its source is part of a data file's identity (the reading rules)
from chatft.data.formats import (count_ignored_keys, detect_format, file_format, format_mismatch, ignored_key_lines,
                                 read_record, sample_name)
from chatft.data.chat_format import (DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, IM_END, IM_START, LOSS_WEIGHTS, Conversation, TokenizedSample, render,
                                span_weights, to_conversation, to_turns, tokenize_conversation, tokenize_conversations,
                                training_conversations)

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 20


def read_json_or_jsonl(path: str) -> tuple[list, list[str]]:
    """Return (records, problems), the whole file at once. JSONL is one JSON value a line; blank lines are skipped.
    The reference for the streaming reader (`stream_records`), and what it falls back on for the files it does not
    stream (not UTF-8, a .json that is not one list, invalid JSON), so their problems are said in one way."""
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


READ_CHUNK = 1 << 20  # bytes read at a time by the streaming reader
FINGERPRINT_BYTES = 1 << 20  # a data file's first and last this many bytes are hashed into its identity
BOM = b"\xef\xbb\xbf"
INDEX_FORMAT = "chatft-data-index-1"  # a checked file's record offsets (load_samples' index_dir)


class _NotStreamable(Exception):
    """The file is read whole instead (read_json_or_jsonl), which also words its problems."""


def _stream_jsonl(path: str, problems: list[str]) -> Iterator[tuple[int, int, object]]:
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if number == 1 and line.startswith(BOM):
                line, start = line[len(BOM):], start + len(BOM)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _NotStreamable from e
            try:
                yield start, len(line), json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"{path}: line {number}: invalid JSON at column {e.colno}: {e.msg}")


def _stream_json_list(path: str) -> Iterator[tuple[int, int, object]]:
    """A .json file's list, one element at a time with its byte offset and length (json.JSONDecoder.raw_decode on a
    window of READ_CHUNK bytes that moves along the file); anything else raises _NotStreamable."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        head = f.read(READ_CHUNK)
        start = len(BOM) if head.startswith(BOM) else 0
        state = {"eof": not head}

        def more(text: str) -> str:
            chunk = f.read(READ_CHUNK)
            state["eof"] = not chunk
            try:
                return text + utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise _NotStreamable from e

        try:
            text = utf8.decode(head[start:], final=not head)
        except UnicodeDecodeError as e:
            raise _NotStreamable from e
        pos, offset = 0, start  # text[pos] is at byte `offset` of the file
        expect = "["
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos, offset = pos + 1, offset + 1
            if pos == len(text):
                if state["eof"]:
                    if expect == "end":
                        return
                    raise _NotStreamable
                text, pos = more(text[pos:]), 0
                continue
            if expect == "end":
                raise _NotStreamable  # something after the list
            if expect == "[":
                if text[pos] != "[":
                    raise _NotStreamable
                pos, offset, expect = pos + 1, offset + 1, "first"
                continue
            if expect in ("first", "next") and text[pos] == "]":
                pos, offset, expect = pos + 1, offset + 1, "end"
                continue
            if expect == "next":
                if text[pos] != ",":
                    raise _NotStreamable
                pos, offset, expect = pos + 1, offset + 1, "value"
                continue
            try:
                record, end = decoder.raw_decode(text, pos)
                if end == len(text) and not state["eof"]:  # a value may go on past the window (a number)
                    raise json.JSONDecodeError("window", text, end)
            except json.JSONDecodeError:
                if state["eof"]:
                    raise _NotStreamable from None
                text, pos = more(text[pos:]), 0
                continue
            size = len(text[pos:end].encode("utf-8", "surrogatepass"))
            yield offset, size, record
            pos, offset, expect = end, offset + size, "next"
            if pos > READ_CHUNK:
                text, pos = text[pos:], 0


@dataclass
class DataFile:
    """One data file as read: its format, where each record is (byte offset and length), and its identity; the
    records themselves only for a file read whole (not streamed)."""

    path: str
    format: str
    offsets: np.ndarray
    sizes: np.ndarray
    fingerprint: str
    records: list | None = None

    def __len__(self):
        return len(self.offsets) if self.records is None else len(self.records)

    def read(self, indices) -> list:
        """The records at `indices` (ascending order reads the file front to back)."""
        if self.records is not None:
            return [self.records[i] for i in indices]
        records = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(int(self.offsets[i]))
                records.append(json.loads(f.read(int(self.sizes[i])).decode("utf-8")))
        return records


def file_fingerprint(path: str) -> str:
    """A data file's identity, cheap at any size: its resolved path, size, modification time (ns) and a hash of its
    first and last FINGERPRINT_BYTES. An edited file changes it (size or mtime; an edit that keeps both, e.g. a
    copy with its mtime restored, in its first or last MB)."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode("utf-8",
                                                                                                  "surrogatepass"))
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if stat.st_size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, stat.st_size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


class _Problems:
    """Problems found, counted; the first MAX_REPORTED_PROBLEMS kept (a file of a million bad records is one message)."""

    def __init__(self):
        self.count, self.shown = 0, []

    def add(self, found: list[str]) -> None:
        self.count += len(found)
        self.shown += found[: max(0, MAX_REPORTED_PROBLEMS - len(self.shown))]


def _reading_rules() -> str:
    """formats.py's source: how records are read and checked (part of a file's index key and of the data's key)."""
    return Path(formats_code.__file__).read_text(encoding="utf-8")


def _index_path(index_dir, fingerprint: str, data_format: str) -> Path:
    digest = hashlib.sha256(f"{INDEX_FORMAT}\0{fingerprint}\0{data_format}\0".encode() + _reading_rules().encode())
    return Path(index_dir) / f"data-{digest.hexdigest()[:40]}.index.npz"


def _load_index(index_path: Path, path: str, fingerprint: str) -> DataFile | None:
    """A file's index, written when it was last read and found without problems; None when there is none whole."""
    try:
        with np.load(index_path, allow_pickle=False) as saved:
            fmt, unused = str(saved["format"]), [str(line) for line in saved["ignored"]]
            data_file = DataFile(path, fmt, saved["offsets"], saved["sizes"], fingerprint)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if len(data_file.offsets) != len(data_file.sizes) or not len(data_file):
        return None
    if unused:
        logger.warning("%s: keys not read, ignored: %s", path, "; ".join(unused))
    return data_file


def _save_index(index_path: Path, data_file: DataFile, unused: list[str]) -> None:
    scratch = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp.npz")
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(scratch, offsets=data_file.offsets, sizes=data_file.sizes, format=np.array(data_file.format),
                 ignored=np.array(unused, dtype=str))
        os.replace(scratch, index_path)
    except OSError as error:
        logger.debug("No index of %s kept: %s", data_file.path, error)
        with contextlib.suppress(OSError):
            scratch.unlink()


def _read_file(path: str, data_format: str, problems: _Problems, forced: str | None = None,
               index_dir: str | os.PathLike | None = None) -> DataFile | None:
    """Read and check one file streaming (one record in memory at a time), as load_samples describes. With
    `index_dir`, a file read before without problems (the same identity, `file_fingerprint`, and reading rules)
    is not read again: where its records are comes from the index kept then."""
    fingerprint = file_fingerprint(path)
    index_path = _index_path(index_dir, fingerprint, data_format) if index_dir else None
    if index_path is not None and forced is None and index_path.is_file():
        indexed = _load_index(index_path, path, fingerprint)
        if indexed is not None:
            return indexed
    found: list[str] = []
    offsets, sizes = array("q"), array("q")
    counts: dict = {}
    fmt = data_format if data_format != "auto" else forced
    waiting: list = []  # records before the first of a known format (auto): checked once the format is known
    records = None

    def check(index: int, record) -> None:
        mismatch = format_mismatch(record, fmt, index, path) if data_format == "auto" else None
        if mismatch:
            found.append(mismatch)
        else:
            found.extend(read_record(record, fmt, index, path)[1])
        count_ignored_keys(record, fmt, counts)

    try:
        stream_problems: list[str] = []
        stream = _stream_jsonl(path, stream_problems) if path.endswith(".jsonl") else _stream_json_list(path)
        items = ((offset, size, record) for offset, size, record in stream)
        index = 0
        for offset, size, record in items:
            offsets.append(offset)
            sizes.append(size)
            if fmt is None:
                fmt = detect_format(record)
                if fmt is None:
                    waiting.append(record)
                    index += 1
                    continue
                for k, earlier in enumerate(waiting):
                    check(k, earlier)
                waiting = []
            elif fmt == "conversations" and data_format == "auto" and forced is None and detect_format(record) == "sharegpt":
                return _read_file(path, data_format, problems, "sharegpt", index_dir)  # file_format's rule: read again
            check(index, record)
            index += 1
        found = stream_problems + found  # (a JSONL line's problem comes in file order in practice; kept first)
    except _NotStreamable:
        records, file_problems = read_json_or_jsonl(path)
        fmt = file_format(records, data_format)
        found, counts, waiting = list(file_problems), {}, []
        for index, record in enumerate(records):
            check(index, record)
        offsets, sizes = array("q"), array("q")
    if fmt is None:  # no record of a known format: the seed's, whose checks say what is missing
        fmt = "conversations"
    for k, earlier in enumerate(waiting):
        check(k, earlier)
    total = len(offsets) if records is None else len(records)
    if not found and not total:
        found.append(f"{path}: contains no samples")
    unused = ignored_key_lines(counts, fmt)
    if unused and not found:
        logger.warning("%s: keys not read, ignored: %s", path, "; ".join(unused))
    problems.add(found)
    data_file = DataFile(path, fmt, np.frombuffer(offsets, dtype=np.int64), np.frombuffer(sizes, dtype=np.int64),
                         fingerprint, records)
    if index_path is not None and records is None and not found:
        _save_index(index_path, data_file, unused)
    return data_file


def stream_records(path: str) -> Iterator:
    """A data file's records in order, read streaming (the whole-file reader for files it cannot stream)."""
    try:
        stream = _stream_jsonl(path, []) if path.endswith(".jsonl") else _stream_json_list(path)
        yield from (record for _, _, record in stream)
    except _NotStreamable:
        yield from read_json_or_jsonl(path)[0]


class DataSamples(Sequence):
    """The conversations of a --data_path, as `load_samples` read them, without holding them: each file's record
    offsets, read again (and made `Conversation`s) when indexed or iterated. A sequence of `Conversation`s that
    compares equal to a list of the same. `fingerprint` identifies the data (the files' identities, the format
    rules, and for a split, which part): the tokenized cache is keyed by it, not by the data's text."""

    def __init__(self, files: list[DataFile], fingerprint: str, positions: np.ndarray | None = None):
        self.files, self.fingerprint = files, fingerprint
        self.starts = np.cumsum([0] + [len(f) for f in files])
        self.positions = positions  # for a part (split_off_eval): the whole's samples it holds, ascending

    def __len__(self):
        return int(self.starts[-1]) if self.positions is None else len(self.positions)

    def conversations(self, indices) -> list[Conversation]:
        """The conversations at `indices` (ascending reads each file front to back)."""
        where_ = np.asarray(indices, dtype=np.int64)
        if self.positions is not None:
            where_ = self.positions[where_]
        found = np.searchsorted(self.starts, where_, side="right") - 1
        conversations = []
        for k in np.unique(found) if len(where_) else []:
            data_file = self.files[k]
            local = where_[found == k] - self.starts[k]
            for i, record in zip(local, data_file.read(local)):
                conversation, problems = read_record(record, data_file.format, int(i), data_file.path)
                if problems:
                    raise DataError(f"{data_file.path} changed since it was read: {problems[0]}")
                conversations.append(conversation)
        if len(np.unique(found)) > 1 and np.any(np.diff(found) < 0):  # not in file order: put back in asked order
            order = np.argsort(found, kind="stable")
            back = [None] * len(conversations)
            for slot, conversation in zip(order, conversations):
                back[slot] = conversation
            conversations = back
        return conversations

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.conversations(range(len(self))[k])
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self.conversations([k % len(self)])[0]

    def __iter__(self):
        for start in range(0, len(self), TOKENIZE_BATCH):
            yield from self.conversations(range(start, min(len(self), start + TOKENIZE_BATCH)))

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def part(self, held: np.ndarray, name: str) -> "DataSamples":
        """The samples at `held` (ascending positions in this one), as a DataSamples named `name` in the key."""
        whole = np.arange(len(self)) if self.positions is None else self.positions
        digest = hashlib.sha256(f"{self.fingerprint}\0{name}\0".encode() + np.asarray(held, np.int64).tobytes())
        return DataSamples(self.files, digest.hexdigest(), whole[np.asarray(held, dtype=np.int64)])


def data_problems(spec: str, problems: list[str], count: int | None = None) -> DataError:
    """The one error for what is wrong with a data path: `count` problems (default: all of `problems`), the first
    MAX_REPORTED_PROBLEMS of them listed."""
    count = len(problems) if count is None else count
    shown = list(problems[:MAX_REPORTED_PROBLEMS])
    if count > len(shown):
        shown.append(f"... and {count - len(shown)} more problems")
    return DataError(f"{count} problem(s) in {spec}:\n  " + "\n  ".join(shown))


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


def load_samples(spec: str, data_format: str = "auto", index_dir: str | os.PathLike | None = None) -> DataSamples:
    """The conversations of a --data_path (files and directories, comma-separated), in order, each record read and
    checked by chatft.data.formats.read_record, streaming: a file is never in memory whole (a .json that is not one
    list, or not UTF-8, excepted). Raise `DataError` listing every problem found (the first MAX_REPORTED_PROBLEMS).
    The result holds where each record is, not the records (`DataSamples`). With `index_dir` (finetune.py: the
    --preprocessing_cache_dir), a file read before without problems is not read again (`_read_file`)."""
    files, missing = data_files(spec)
    problems = _Problems()
    problems.add(missing)
    read = [] if missing else [_read_file(path, data_format, problems, index_dir=index_dir) for path in files]
    if problems.count:
        raise data_problems(spec, problems.shown, problems.count)
    digest = hashlib.sha256(f"{data_format}\0".encode() + _reading_rules().encode("utf-8"))
    for data_file in read:
        digest.update(f"\0{data_file.format}\0{data_file.fingerprint}".encode())
    return DataSamples(read, digest.hexdigest())


def split_off_eval(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the samples (at least one) held out for evaluation."""
    count = max(1, round(fraction * len(samples)))
    if count >= len(samples):
        raise DataError(f"--eval_data_path {fraction}: {len(samples)} sample(s) are too few to hold out {count} and "
                        "still train on some.")
    held_out = set(random.Random(seed).sample(range(len(samples)), count))
    if isinstance(samples, DataSamples):
        held = np.zeros(len(samples), dtype=bool)
        held[list(held_out)] = True
        tag = f"{fraction}\0{seed}"
        return samples.part(np.flatnonzero(~held), f"train {tag}"), samples.part(np.flatnonzero(held), f"eval {tag}")
    return ([s for i, s in enumerate(samples) if i not in held_out],
            [s for i, s in enumerate(samples) if i in held_out])


TOKENIZED_FORMAT = "chatft-tokenized-3"  # the cache's layout (CACHE_ARRAYS, manifest.json)
TOKENIZE_BATCH = 512  # conversations per batched tokenizer call (and per progress step, per worker task)
CACHE_SUFFIX = ".tokens"
# name -> dtype: per token (input_ids, labelled, weights: only when a sample has loss weights), per sample (the rest)
CACHE_ARRAYS = {"input_ids": np.int32, "labelled": np.uint8, "weights": np.float32, "lengths": np.int32,
                "origins": np.int64, "trainable": np.int32, "weighted": np.uint8}
WAIT_STALLED_S = 600  # a rank waiting for local rank 0's cache tokenizes itself when it shows no progress this long
WAIT_REPORT_S = 30


def _conversations_text(conversations: list[Conversation]) -> str:
    """Everything of the conversations that their tokens depend on, as JSON text (ids are not)."""
    return json.dumps([[[[t.role, t.content, [[c.name, c.arguments] for c in t.tool_calls], t.reasoning]
                         + ([t.weight] if t.weight != 1 else []) for t in c.turns],
                        c.tools, c.trained] for c in conversations], ensure_ascii=False)


def tokenized_cache_key(conversations, tokenizer, max_len: int, system_message: str,
                        chat_format: str = "chatml", reasoning_turns: str = "all", ignore_empty_think: bool = False) -> str:
    """A digest of everything the tokenized samples depend on: the data, tokenizer, template, length, and the code
    that renders and labels (chat_format.py's source), so an upgrade never reads a stale cache. The data is
    `DataSamples.fingerprint` for what load_samples read (its files' identities: cheap at any size), else the
    conversations' text."""
    digest = hashlib.sha256()
    code = Path(chat_format_code.__file__).read_text(encoding="utf-8")
    data = getattr(conversations, "fingerprint", None)
    if data is None:
        data = _conversations_text(as_conversations(conversations))
    for part in (TOKENIZED_FORMAT, code, type(tokenizer).__name__, tokenizer.backend_tokenizer.to_str(), system_message,
                 chat_format, reasoning_turns, str(max_len), data,
                 *(["ignore_empty_think"] if ignore_empty_think else [])):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:40]


class TokenizedArrays:
    """Tokenized samples as flat arrays (CACHE_ARRAYS; memory-mapped from a cache, or held): sample i's tokens are
    input_ids[offsets[i]:offsets[i + 1]]. Nothing per sample is a Python object until it is asked for."""

    def __init__(self, arrays: dict[str, np.ndarray], manifest: dict | None = None):
        self.arrays, self.manifest = arrays, manifest or {}
        self.input_ids, self.labelled, self.weights = arrays["input_ids"], arrays["labelled"], arrays.get("weights")
        self.lengths, self.origins = arrays["lengths"], arrays["origins"]
        self.trainable, self.weighted = arrays["trainable"], arrays["weighted"]
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])

    def __len__(self):
        return len(self.lengths)

    def sample(self, i: int) -> TokenizedSample:
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.input_ids[a:b]
        labels = np.where(self.labelled[a:b].astype(bool), ids, IGNORE_INDEX)
        weights = self.weights[a:b].tolist() if self.weighted[i] else None
        return TokenizedSample(ids.tolist(), labels.tolist(), int(self.origins[i]), weights)

    def features(self, i: int) -> dict:
        return as_features(self.sample(i))


class StoredSample:
    """A sample of TokenizedArrays as TokenizedSample's attributes, made on access (`SupervisedDataset.samples`)."""

    __slots__ = ("tokens", "i")

    def __init__(self, tokens: TokenizedArrays, i: int):
        self.tokens, self.i = tokens, i

    @property
    def input_ids(self) -> np.ndarray:  # a view: len() costs nothing
        return self.tokens.input_ids[self.tokens.offsets[self.i]: self.tokens.offsets[self.i + 1]]

    @property
    def labels(self) -> list[int]:
        return self.tokens.sample(self.i).labels

    @property
    def weights(self):
        return self.tokens.sample(self.i).weights

    @property
    def origin(self) -> int:
        return int(self.tokens.origins[self.i])

    @property
    def num_trainable(self) -> int:
        return int(self.tokens.trainable[self.i])


class SampleView(Sequence):
    """The kept samples of a SupervisedDataset, each a StoredSample made when read."""

    def __init__(self, tokens: TokenizedArrays, kept: np.ndarray):
        self.tokens, self.kept = tokens, kept

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [StoredSample(self.tokens, int(i)) for i in self.kept[k]]
        return StoredSample(self.tokens, int(self.kept[k]))


def _pack(samples: list[TokenizedSample], origins: list[int]) -> dict[str, np.ndarray]:
    """Tokenized samples as one chunk of CACHE_ARRAYS."""
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int32)
    chunk = {"input_ids": np.fromiter((t for s in samples for t in s.input_ids), np.int32, int(lengths.sum())),
             "labelled": np.fromiter((label != IGNORE_INDEX for s in samples for label in s.labels), np.uint8,
                                     int(lengths.sum())),
             "lengths": lengths, "origins": np.asarray(origins, dtype=np.int64),
             "trainable": np.array([s.num_trainable for s in samples], dtype=np.int32),
             "weighted": np.array([s.weights is not None for s in samples], dtype=np.uint8)}
    if chunk["weighted"].any():
        chunk["weights"] = np.concatenate([np.asarray(s.weights, np.float32) if s.weights is not None else
                                           np.asarray([label != IGNORE_INDEX for label in s.labels], np.float32)
                                           for s in samples])
    return chunk


_worker_job: dict = {}  # set in the parent just before the workers fork (inherited, never pickled)


def _tokenize_task(task) -> tuple[dict, int, dict | None]:
    """One chunk: (its CACHE_ARRAYS, the sources it covered, the dry run's conversation counts or None).
    `task` is (first source position, the conversations) or, for DataSamples, (first, stop): read here."""
    job = _worker_job
    first, conversations = task
    if isinstance(conversations, int):
        conversations = job["sources"].conversations(range(first, conversations))
    parts, origins = training_conversations_of(conversations, job["chat_format"], job["reasoning_turns"],
                                               job["ignore_empty_think"])
    tokenized = tokenize_conversations(parts, job["tokenizer"], job["max_len"], job["system_message"],
                                       job["chat_format"])
    stats = conversation_stats(conversations) if job.get("stats") else None
    return _pack(tokenized, [first + o for o in origins]), len(conversations), stats


def conversation_stats(conversations: list[Conversation]) -> dict:
    """What the dry run counts of the conversations themselves."""
    weights = [t.weight for c in conversations for t in c.turns if t.role == "assistant" and t.weight != 1]
    return {"turns": sum(len(c.turns) for c in conversations),
            "tool_calls": sum(len(t.tool_calls) for c in conversations for t in c.turns),
            "with_tools": sum(bool(c.tools) for c in conversations),
            "with_reasoning": sum(any(t.reasoning for t in c.turns) for c in conversations),
            "weighted_turns": len(weights), "weight_0": weights.count(0)}


def tokenized_chunks(samples, tokenizer, max_len: int, system_message: str, num_workers: int = 1,
                     chat_format: str = "chatml", reasoning_turns: str = "all", ignore_empty_think: bool = False,
                     desc: str = "Tokenizing", stats: bool = False) -> Iterator[tuple[dict, int, dict | None]]:
    """`_tokenize_task`'s results in order, TOKENIZE_BATCH sources a chunk: in `num_workers` forked processes (at
    most two chunks each in flight, so memory stays bounded), and a DataSamples is read by the workers themselves.
    A progress bar (samples/s, ETA) on a terminal for big data."""
    if not isinstance(samples, DataSamples):
        samples = as_conversations(samples)
    count = len(samples)
    job = dict(tokenizer=tokenizer, max_len=max_len, system_message=system_message, chat_format=chat_format,
               reasoning_turns=reasoning_turns, ignore_empty_think=ignore_empty_think, stats=stats,
               sources=samples if isinstance(samples, DataSamples) else None)
    starts = range(0, count, TOKENIZE_BATCH)
    tasks = ((s, min(count, s + TOKENIZE_BATCH)) if isinstance(samples, DataSamples) else
             (s, samples[s: s + TOKENIZE_BATCH]) for s in starts)
    progress = tqdm(total=count, desc=desc, unit=" samples", disable=None if len(starts) >= 4 else True,
                    smoothing=0.1, dynamic_ncols=True)
    _worker_job.clear()
    _worker_job.update(job)
    try:
        if num_workers > 1 and len(starts) > 1:
            context = multiprocessing.get_context("fork")  # the workers inherit the tokenizer and the sources
            with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
                pending: deque = deque()
                for task in tasks:
                    pending.append(pool.submit(_tokenize_task, task))
                    if len(pending) >= 2 * num_workers:
                        result = pending.popleft().result()
                        progress.update(result[1])
                        yield result
                while pending:
                    result = pending.popleft().result()
                    progress.update(result[1])
                    yield result
        else:
            for task in tasks:
                result = _tokenize_task(task)
                progress.update(result[1])
                yield result
    finally:
        progress.close()
        _worker_job.clear()


class _TokenWriter:
    """Appends chunks of CACHE_ARRAYS to one file per array in `directory`, with a CRC32 of each; `finish` writes
    manifest.json last, which a reader requires (`open_tokenized`)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True)
        self.directory = directory
        self.files = {name: open(directory / f"{name}.bin", "wb") for name in CACHE_ARRAYS if name != "weights"}
        self.crc = dict.fromkeys(CACHE_ARRAYS, 0)
        self.count = dict.fromkeys(CACHE_ARRAYS, 0)

    def _write(self, name: str, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=CACHE_ARRAYS[name]).tobytes()
        self.files[name].write(data)
        self.crc[name] = zlib.crc32(data, self.crc[name])
        self.count[name] += len(values)

    def add(self, chunk: dict) -> None:
        if "weights" in chunk and "weights" not in self.files:  # the first weighted sample: weights for all so far
            self.files["labelled"].flush()
            self.files["weights"] = open(self.directory / "weights.bin", "wb")
            with open(self.directory / "labelled.bin", "rb") as f:
                while block := f.read(READ_CHUNK * 16):
                    self._write("weights", np.frombuffer(block, np.uint8).astype(np.float32))
        for name in CACHE_ARRAYS:
            if name == "weights":
                if "weights" in self.files:
                    self._write(name, chunk["weights"] if "weights" in chunk else chunk["labelled"].astype(np.float32))
            else:
                self._write(name, chunk[name])

    def finish(self, extra: dict) -> dict:
        for f in self.files.values():
            f.close()
        manifest = {"format": TOKENIZED_FORMAT, **extra,
                    "arrays": {name: {"dtype": np.dtype(CACHE_ARRAYS[name]).str, "count": self.count[name],
                                      "crc32": self.crc[name]} for name in self.files}}
        with open(self.directory / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        return manifest

    def abandon(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def open_tokenized(directory: Path, verify: bool = True) -> TokenizedArrays | None:
    """The cache in `directory` memory-mapped, or None when it is not a whole one: no manifest (never finished),
    another format, an array of the wrong size, or (`verify`) of the wrong CRC32."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != TOKENIZED_FORMAT:
            return None
        arrays = {}
        for name, entry in manifest["arrays"].items():
            path, dtype = directory / f"{name}.bin", np.dtype(entry["dtype"])
            if path.stat().st_size != entry["count"] * dtype.itemsize:
                return None
            if verify:
                crc = 0
                with open(path, "rb") as f:
                    while block := f.read(READ_CHUNK * 16):
                        crc = zlib.crc32(block, crc)
                if crc != entry["crc32"]:
                    return None
            arrays[name] = (np.memmap(path, dtype=dtype, mode="r", shape=(entry["count"],)) if entry["count"]
                            else np.zeros(0, dtype))
        return TokenizedArrays(arrays, manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build(samples, tokenizer, max_len, system_message, num_workers, rendering, desc, directory: Path,
           progress_file: Path | None = None) -> dict:
    """Tokenize into a _TokenWriter at `directory`; return its manifest."""
    writer = _TokenWriter(directory)
    try:
        done = 0
        for chunk, covered, _ in tokenized_chunks(samples, tokenizer, max_len, system_message, num_workers,
                                                  desc=desc, **rendering):
            writer.add(chunk)
            done += covered
            if progress_file is not None:
                progress_file.write_text(f"{done} {len(samples)}")
        return writer.finish({"sources": len(samples)})
    except BaseException:
        writer.abandon()
        raise


def _waits_for_local_rank_0() -> bool:
    """Whether this process is another than the first of its machine in a torchrun launch."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0")) > 0 and int(os.environ.get("LOCAL_WORLD_SIZE", "2")) > 1
    except ValueError:
        return False


def _wait_for_cache(final: Path, progress_file: Path, desc: str) -> TokenizedArrays | None:
    """Wait (polling, not in a collective: no timeout to hit) for local rank 0 to finish the cache at `final`,
    saying how far it is; None when it shows no progress for WAIT_STALLED_S (then this rank tokenizes itself)."""
    rank = os.environ.get("LOCAL_RANK")
    last_change, last_seen, last_report = time.monotonic(), None, 0.0
    while True:
        tokens = open_tokenized(final, verify=False) if (final / "manifest.json").is_file() else None
        if tokens is not None:
            return open_tokenized(final)
        try:
            seen = progress_file.read_text()
        except OSError:
            seen = None
        now = time.monotonic()
        if seen != last_seen:
            last_seen, last_change = seen, now
        if now - last_change > WAIT_STALLED_S:
            logger.warning("%s: local rank %s: no progress from local rank 0 in %d s; tokenizing here", desc, rank,
                           WAIT_STALLED_S)
            return None
        if now - last_report >= WAIT_REPORT_S:
            done = f" ({seen.split()[0]} of {seen.split()[1]} samples)" if seen and len(seen.split()) == 2 else ""
            logger.info("%s: local rank %s waiting for local rank 0's tokenized cache%s", desc, rank, done)
            last_report = now
        time.sleep(0.5)


def tokenized_arrays(samples, tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                     num_workers: int = 1, cache_dir: str | os.PathLike | None = None, desc: str = "Tokenizing",
                     chat_format: str = "chatml", reasoning_turns: str = "all",
                     ignore_empty_think: bool = False) -> TokenizedArrays:
    """Every training sample tokenized, in order, as TokenizedArrays memory-mapped from disk (a sample split into
    several, training_conversations_of, gives several, each with its `origin`).

    With `cache_dir` (--preprocessing_cache_dir) the arrays are kept there under `tokenized_cache_key`: built in
    a scratch directory and renamed into place whole, so a cache that exists is complete; it is checked (sizes,
    CRC32) before use and rebuilt when it is not whole. In a torchrun launch the first process of a machine builds
    it and the others wait for it to appear (`_wait_for_cache`), then map the same files. Without `cache_dir`
    they go to a temporary directory that is removed at once (the mapping keeps the data while it is used)."""
    rendering = dict(chat_format=chat_format, reasoning_turns=reasoning_turns, ignore_empty_think=ignore_empty_think)
    if cache_dir:
        key = tokenized_cache_key(samples, tokenizer, max_len, system_message, **rendering)
        final = Path(cache_dir) / f"{key}{CACHE_SUFFIX}"
        progress_file = Path(cache_dir) / f".{key}.progress"
        reused = open_tokenized(final) if final.exists() else None
        if final.exists() and reused is None:
            logger.warning("%s: the tokenized cache %s is incomplete or damaged; tokenizing again", desc, final)
            shutil.rmtree(final, ignore_errors=True)
        if reused is None and _waits_for_local_rank_0() and os.access(cache_dir, os.W_OK):
            reused = _wait_for_cache(final, progress_file, desc)
        if reused is not None:  # found, or written meanwhile by local rank 0: said alike either way
            logger.info("%s: reusing %d tokenized samples from %s", desc, reused.manifest.get("sources", len(reused)),
                        final)
            return reused
        scratch = Path(cache_dir) / f".{final.name}.{os.getpid()}.tmp"
        try:
            _build(samples, tokenizer, max_len, system_message, num_workers, rendering, desc, scratch, progress_file)
        except OSError as error:  # a read-only or full cache costs the next run time, not this one its data
            logger.warning("Could not cache the tokenized data in %s: %s", cache_dir, error)
        else:
            try:
                os.replace(scratch, final)
            except OSError:  # another run (or rank) put a whole one there first
                shutil.rmtree(scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                progress_file.unlink()
            tokens = open_tokenized(final, verify=False)
            if tokens is not None:
                return tokens
    scratch = Path(tempfile.mkdtemp(prefix="chatft-tokens-")) / "tokens"
    try:
        _build(samples, tokenizer, max_len, system_message, num_workers, rendering, desc, scratch)
        return open_tokenized(scratch, verify=False)
    finally:  # mapped files stay readable after they are removed
        shutil.rmtree(scratch.parent, ignore_errors=True)


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


def as_conversations(samples) -> list[Conversation]:
    """`Conversation`s (load_samples') as they are; Qwen's sample dicts, as Qwen's scripts pass them, read into them
    (chat_format.to_conversation): what the datasets and `tokenize_training_samples` take."""
    return [to_conversation(sample) for sample in samples]


def as_features(sample: TokenizedSample) -> dict:
    """What a dataset gives the collator for a sample: input_ids, labels, and its loss weights when it has any."""
    features = {"input_ids": sample.input_ids, "labels": sample.labels}
    return features if sample.weights is None else {**features, LOSS_WEIGHTS: sample.weights}


def tokenize_training_samples(samples, tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                              num_workers: int = 1, cache_dir: str | os.PathLike | None = None, desc: str = "Tokenizing",
                              chat_format: str = "chatml", reasoning_turns: str = "all",
                              ignore_empty_think: bool = False) -> list[TokenizedSample]:
    """`tokenized_arrays`' samples as a list of TokenizedSample (for small data: every sample a Python list; the
    datasets index the arrays instead)."""
    tokens = tokenized_arrays(samples, tokenizer, max_len, system_message, num_workers, cache_dir, desc, chat_format,
                              reasoning_turns, ignore_empty_think)
    return [tokens.sample(i) for i in range(len(tokens))]


def split_summary(samples: list[TokenizedSample], num_raw: int) -> str:
    """How many conversations were split into how many samples (qwen3 format: each reply trained as Qwen3 generates
    it, training_conversations), and the tokens that costs: every sample of a split conversation but its longest
    repeats context that one holds."""
    return split_summary_of(np.array([s.origin for s in samples], dtype=np.int64),
                            np.array([len(s.input_ids) for s in samples], dtype=np.int64), num_raw)


def split_summary_of(origins: np.ndarray, lengths: np.ndarray, num_raw: int) -> str:
    """`split_summary` from the samples' origins (ascending) and lengths."""
    origins, lengths = np.asarray(origins), np.asarray(lengths, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, origins[1:] != origins[:-1]]) if len(origins) else np.zeros(0, np.int64)
    parts = np.diff(np.r_[starts, len(origins)])
    split = parts > 1
    if len(origins):
        extra = int((np.add.reduceat(lengths, starts) - np.maximum.reduceat(lengths, starts))[split].sum())
    else:
        extra = 0
    return (f"qwen3 turns: {int(split.sum())} conversation(s) split into {int(parts[split].sum())} samples, one per "
            f"user query (and per tool step without reasoning), so each reply is trained as Qwen3 generates it: "
            f"{len(origins)} samples from {num_raw}, +{extra:,} tokens of repeated context")


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
    dropped = [s.origin for s in samples if not s.num_trainable]
    return kept, dropped_message(dropped, sources, len(samples) if total is None else total, max_len, flag)


def dropped_message(dropped_origins, sources, total: int, max_len: int, flag: str = "--model_max_length") -> str:
    """`keep_trainable`'s message for the samples of `dropped_origins` (indices into `sources`), `total` in all;
    only the first names shown are read from `sources`."""
    names = [sample_name(int(o), sources[int(o)]) for o in list(dropped_origins[:11])]
    return (f"Dropped {len(dropped_origins)} of {total} samples with {untrainable_reason(max_len, flag)}: "
            + ", ".join(names[:10]) + (" ..." if len(dropped_origins) > 10 else ""))


def name_list(names: list[str], shown: int = 10) -> str:
    """The first `shown` names, comma-separated, then "..." if there are more."""
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def nothing_to_train(max_len: int, flag: str = "--model_max_length") -> DataError:
    return DataError(f"No sample has an assistant token within {flag.lstrip('-')}={max_len}; raise it.")


class SupervisedDataset(Dataset):
    """Tokenizes every sample up front (Qwen's default) into TokenizedArrays (memory-mapped: nothing per sample is
    held as a Python object); drops samples left with no trainable token (`keep_trainable`'s rule and message).
    Takes `Conversation`s (load_samples' DataSamples, or a list) or Qwen's sample dicts (`as_conversations`)."""

    def __init__(self, samples, tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
                 num_workers: int = 1, cache_dir: str | os.PathLike | None = None, chat_format: str = "chatml",
                 reasoning_turns: str = "all", ignore_empty_think: bool = False):
        sources = samples if isinstance(samples, DataSamples) else as_conversations(samples)
        self.tokens = tokenized_arrays(sources, tokenizer, max_len, system_message, num_workers, cache_dir,
                                       chat_format=chat_format, reasoning_turns=reasoning_turns,
                                       ignore_empty_think=ignore_empty_think)
        if len(self.tokens) > len(sources):
            logger.info(split_summary_of(self.tokens.origins, self.tokens.lengths, len(sources)))
        untrainable = self.tokens.trainable == 0
        self.kept = np.flatnonzero(~untrainable)
        if untrainable.any():
            logger.warning(dropped_message(self.tokens.origins[np.flatnonzero(untrainable)], sources, len(self.tokens),
                                           max_len))
        if not len(self.kept):
            raise nothing_to_train(max_len)

    def __len__(self):
        return len(self.kept)

    @property
    def samples(self) -> SampleView:
        """The kept samples, each read when asked for (chatft.memory reads their lengths)."""
        return SampleView(self.tokens, self.kept)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.lengths[self.kept]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    @property
    def has_loss_weights(self) -> bool:
        """Whether its batches may carry `loss_weights` (some turn of weight other than 1)."""
        return bool(self.tokens.weighted[self.kept].any())

    def __getitem__(self, i) -> dict:
        return self.tokens.features(int(self.kept[i]))


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
        lengths = getattr(samples, "lengths", None)  # SupervisedDataset's, without reading its samples
        if lengths is None:
            lengths = [len(samples[i]["input_ids"]) for i in range(len(samples))]
        self.samples, self.lengths = samples, np.asarray(lengths, dtype=np.int64)
        self.bins = first_fit_decreasing([int(n) for n in self.lengths], max_len)
        self.num_samples = len(samples)
        self.max_len = max_len

    @property
    def rows(self) -> "PackedRows":
        """Every row, each built when read."""
        return PackedRows(self)

    @property
    def fill(self) -> float:
        """The fraction of the rows' max_len tokens that hold sample tokens."""
        return self.num_tokens / (len(self.bins) * self.max_len)

    def __len__(self):
        return len(self.bins)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def has_loss_weights(self) -> bool:
        weighted = getattr(self.samples, "has_loss_weights", None)
        return bool(weighted) if weighted is not None else any(LOSS_WEIGHTS in row for row in self.rows)

    def __getitem__(self, i) -> dict:
        return concatenate_samples([self.samples[index] for index in self.bins[i]])


class PackedRows(Sequence):
    """A PackedDataset's rows as a sequence, each row built when read."""

    def __init__(self, packed: PackedDataset):
        self.packed = packed

    def __len__(self):
        return len(self.packed)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.packed[k] for k in range(len(self))[i]]
        return self.packed[i]


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

