"""Continued pre-training on raw text (--stage pt): documents -> token samples with the loss on every token.

Documents, read streaming: each non-empty line of a `.txt` file (as HF datasets' `text` loader and LLaMA-Factory
read one), each `{"text": ...}` record of a JSON list or JSONL file. Every document is tokenized without special
tokens and ends with the tokenizer's EOS token, then:

- default: each document is its own sample (one longer than `max_len` tokens is cut into consecutive pieces of
  `max_len`), batched padding-free with per-sample attention, so no document sees another;
- `packing` (--packing): the documents joined into one token stream, cut into blocks of `max_len` (the last block
  may be shorter), as Hugging Face's run_clm.py groups texts; a block's documents attend to each other.

Labels are the input ids: every token but a sample's first is predicted (the padding-free collator leaves each
sample's first label out, as it has no context). The tokens live in one flat int32 array with sample offsets, so a
large corpus costs 4 bytes a token, not a Python list per sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset

from chatft.errors import DataError

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
TOKENIZE_BATCH = 1000


def text_files(spec: str) -> tuple[list[str], list[str]]:
    """(files, problems) of a --data_path for raw text: files and directories (their .txt/.json/.jsonl files),
    comma-separated."""
    files, problems = [], []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(os.path.join(part, n) for n in os.listdir(part) if n.endswith(TEXT_SUFFIXES))
            files += found
            if not found:
                problems.append(f"{part}: a directory with no .txt, .json or .jsonl file")
        elif os.path.isfile(part):
            if part.endswith(TEXT_SUFFIXES):
                files.append(part)
            else:
                problems.append(f"{part}: --stage pt reads .txt (a document a line), .json or .jsonl "
                                "({\"text\": ...} records) files")
        else:
            problems.append(f"{part}: no such data file")
    return files, problems


def documents(path: str, problems: list[str]) -> Iterator[str]:
    """The documents of one file, in order; what is wrong with a record is appended to `problems`."""
    if path.endswith(".txt"):
        try:
            with open(path, encoding="utf-8-sig") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        except UnicodeDecodeError as e:
            problems.append(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})")
        return
    from chatft.data.datasets import stream_records

    try:
        for index, record in enumerate(stream_records(path)):
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = (f"no 'text' (keys: {', '.join(sorted(record)) or 'none'})" if isinstance(record, dict)
                        else f"a {type(record).__name__}, not an object with 'text'")
                problems.append(f"{path}: record {index}: {what}")
            elif text.strip():
                yield text
    except (ValueError, UnicodeDecodeError) as e:  # a file that is not JSON at all
        problems.append(f"{path}: not a JSON list or JSONL file ({e})")


def read_sources(spec: str) -> list[list[str]]:
    """Every document of a --data_path, one list per comma-separated source (what --data_mix counts), all checked
    before any is used: DataError listing every problem."""
    from chatft.data.mixing import data_sources

    problems, source_files = [], []
    for source in data_sources(spec):
        files, found = text_files(source)
        problems += found
        source_files.append(files)
    sources: list[list[str]] = []
    for files in [] if problems else source_files:
        texts: list[str] = []
        for path in files:
            before = len(texts)
            texts.extend(documents(path, problems))
            if len(texts) == before and not problems:
                problems.append(f"{path}: contains no text")
        sources.append(texts)
    if problems:
        from chatft.data.datasets import data_problems

        raise data_problems(spec, problems)
    return sources


def read_documents(spec: str) -> list[str]:
    """Every document of a --data_path, in order (read_sources, joined)."""
    return [text for texts in read_sources(spec) for text in texts]


def tokenize_documents(texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document ends): every document's tokens followed by EOS, in one int32 array."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("--stage pt: the tokenizer has no EOS token to end each document with")
    pieces, ends, total = [], [], 0
    for start in range(0, len(texts), TOKENIZE_BATCH):
        for ids in tokenizer(texts[start : start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=np.int32))
            total += len(ids) + 1
            ends.append(total)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return tokens, np.asarray(ends, dtype=np.int64)


def sample_bounds(document_ends: np.ndarray, max_len: int, packing: bool) -> np.ndarray:
    """[N, 2] (start, end) of every sample: blocks of `max_len` over the stream (packing), else each document in
    pieces of at most `max_len`."""
    total = int(document_ends[-1]) if len(document_ends) else 0
    if packing:
        starts = np.arange(0, total, max_len)
        return np.stack([starts, np.minimum(starts + max_len, total)], axis=1)
    bounds, start = [], 0
    for end in document_ends.tolist():
        for piece in range(start, end, max_len):
            bounds.append((piece, min(piece + max_len, end)))
        start = end
    return np.asarray(bounds, dtype=np.int64).reshape(-1, 2)


class PretrainDataset(Dataset):
    """Raw-text samples (module docstring): items are {"input_ids", "labels"}, labels equal to the ids."""

    def __init__(self, texts: list[str], tokenizer, max_len: int, packing: bool = False):
        self.tokens, self.document_ends = tokenize_documents(texts, tokenizer)
        self.bounds = sample_bounds(self.document_ends, max_len, packing)
        self.packing = packing

    def __len__(self) -> int:
        return len(self.bounds)

    @property
    def lengths(self) -> np.ndarray:
        return self.bounds[:, 1] - self.bounds[:, 0]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    has_loss_weights = False

    def __getitem__(self, i: int) -> dict:
        start, end = self.bounds[i]
        ids = self.tokens[start:end].tolist()
        return {"input_ids": ids, "labels": list(ids)}

    def summary(self) -> str:
        lengths = self.lengths
        return (f"{len(self.document_ends):,} documents, {self.num_tokens:,} tokens (each document + EOS) -> "
                f"{len(self)} {'blocks' if self.packing else 'samples'} of {int(lengths.min())}-{int(lengths.max())} "
                f"tokens (mean {lengths.mean():.0f})")
