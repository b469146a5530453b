"""Data at scale (issue 28, item 1): the streaming reader, the file-identity cache key, the memory-mapped tokenized
cache (whole or rebuilt, never half read), ranks waiting on the cache file, the chunked dry run."""

import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
import pytest

import chatft.data.datasets as datasets
from chatft.data.chat_format import tokenize_conversation, training_conversations
from chatft.data.datasets import (DataSamples, PackedDataset, PaddingFreeCollator, SupervisedDataset, as_features,
                                  load_samples, read_json_or_jsonl, split_off_eval, stream_records,
                                  tokenize_training_samples, tokenized_cache_key)
from chatft.data.formats import file_format, read_record
from chatft.train.report import dry_run_report

SYSTEM = "s"


def records(n: int, weighted: bool = False) -> list[dict]:
    """Multi-turn records with unicode, varied lengths, every few a weighted turn, one too long for 64 tokens."""
    out = []
    for i in range(n):
        turns = [{"from": "user", "value": f"Frage {i} — ünïcødé ✓ " + "why? " * (i % 9)},
                 {"from": "assistant", "value": f"Answer {i}." + " Because." * (i % 6)}]
        if i % 3 == 0:
            turns += [{"from": "user", "value": "And then?"}, {"from": "assistant", "value": f"Then {i}."}]
        if weighted and i % 4 == 1:
            turns[1]["weight"] = 2
        if i == 5:
            turns[0]["value"] = "long " * 200  # no reply within 64 tokens: dropped
        out.append({"id": f"r{i}", "conversations": turns})
    return out


def write(path, data, jsonl: bool, bom: bool = False):
    text = ("\n".join(json.dumps(r, ensure_ascii=False) for r in data) + "\n\n" if jsonl
            else json.dumps(data, ensure_ascii=False, indent=1))
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def whole_file_conversations(path: str) -> list:
    found, problems = read_json_or_jsonl(path)
    assert not problems
    fmt = file_format(found)
    return [read_record(r, fmt, i, path)[0] for i, r in enumerate(found)]


@pytest.mark.parametrize("jsonl", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])  # windows smaller than a record, a few records, the whole file
def test_the_streaming_reader_reads_what_the_whole_file_reader_reads(tmp_path, monkeypatch, jsonl, chunk, qwen3_tokenizer):
    path = str(write(tmp_path / ("d.jsonl" if jsonl else "d.json"), records(40, weighted=True), jsonl, bom=True))
    expected_records, _ = read_json_or_jsonl(path)
    expected = whole_file_conversations(path)
    keys = set()
    for read_chunk in (chunk, 1 << 20):
        monkeypatch.setattr(datasets, "READ_CHUNK", read_chunk)
        assert list(stream_records(path)) == expected_records
        samples = load_samples(path)
        assert isinstance(samples, DataSamples) and samples == expected and list(samples) == expected
        assert samples[7] == expected[7] and samples[-1] == expected[-1] and samples[3:6] == expected[3:6]
        keys.add(tokenized_cache_key(samples, qwen3_tokenizer, 64, SYSTEM))
    assert len(keys) == 1  # the same file read in any window: the same key


def test_files_not_streamed_are_read_whole_with_the_same_problems(tmp_path):
    several = tmp_path / "several.json"  # JSONL under a .json name
    several.write_text("\n".join(json.dumps(r) for r in records(3)))
    assert load_samples(str(several)) == whole_file_conversations(str(several))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records(3))[:-30])
    with pytest.raises(datasets.DataError, match="invalid JSON at line 1"):
        load_samples(str(bad))


def test_the_cache_key_follows_the_file_not_its_text(tmp_path, qwen3_tokenizer):
    """Keyed by each file's identity (path, size, mtime, first and last MB) without reading the data: an edited
    file changes the key, even one edited in place with its size and mtime restored."""
    path = write(tmp_path / "d.jsonl", records(20), jsonl=True)
    key = lambda: tokenized_cache_key(load_samples(str(path)), qwen3_tokenizer, 64, SYSTEM)  # noqa: E731
    first = key()
    assert key() == first
    stat = os.stat(path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("Answer 3.", "Answor 3."), encoding="utf-8")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and key() != first
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key() == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: keyed anew (cheap; never stale)
    assert key() != first
    train, evaluation = split_off_eval(load_samples(str(path)), 0.25, seed=1)
    again = split_off_eval(load_samples(str(path)), 0.25, seed=1)
    assert len({train.fingerprint, evaluation.fingerprint, again[0].fingerprint}) == 2
    assert list(train) + list(evaluation) != [] and sorted(c.id for c in list(train) + list(evaluation)) == \
        sorted(f"r{i}" for i in range(20))


def test_a_file_read_before_without_problems_is_not_read_again(tmp_path, monkeypatch, caplog):
    """load_samples' index (finetune.py keeps it in --preprocessing_cache_dir): a relaunch takes each record's place
    from it instead of reading and checking the whole file again; an edited file is read and checked anew."""
    data = records(12)
    data[2]["note"] = "x"  # an ignored key: warned about on every launch
    path = write(tmp_path / "d.jsonl", data, jsonl=True)
    first = load_samples(str(path), index_dir=tmp_path / "index")
    assert len(list((tmp_path / "index").glob("data-*.index.npz"))) == 1
    caplog.clear()
    monkeypatch.setattr(datasets, "_stream_jsonl", lambda *a: pytest.fail("read again"))
    again = load_samples(str(path), index_dir=tmp_path / "index")
    assert again == first and again.fingerprint == first.fingerprint and "'note' in 1 records" in caplog.text
    monkeypatch.undo()
    data[3]["conversations"][1]["value"] = ""  # now a problem: found, since the file is read again
    write(tmp_path / "d.jsonl", data, jsonl=True)
    with pytest.raises(datasets.DataError, match="sample 3 .*empty assistant"):
        load_samples(str(path), index_dir=tmp_path / "index")


def expected_items(conversations, tokenizer, max_len, chat_format="chatml"):
    """Each conversation tokenized alone (chat_format.tokenize_conversation), untrainable ones left out."""
    items = []
    for conversation in conversations:
        for part in training_conversations(conversation, chat_format):
            sample = tokenize_conversation(part, tokenizer, max_len, SYSTEM, chat_format)
            if sample.num_trainable:
                items.append(as_features(sample))
    return items


@pytest.mark.parametrize("chat_format", ["chatml", "qwen3"])
def test_dataset_items_from_the_memory_mapped_cache_equal_the_tokenization(tmp_path, qwen3_tokenizer, chat_format,
                                                                          monkeypatch):
    monkeypatch.setattr(datasets, "TOKENIZE_BATCH", 6)  # many chunks; weights appear only after the first
    data = records(30, weighted=True)
    data[0]["conversations"][1].pop("weight", None)
    samples = load_samples(str(write(tmp_path / "d.jsonl", data, jsonl=True)))
    expected = expected_items(whole_file_conversations(str(tmp_path / "d.jsonl")), qwen3_tokenizer, 64, chat_format)
    built = SupervisedDataset(samples, qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache", chat_format=chat_format)
    [cache] = (tmp_path / "cache").iterdir()
    assert cache.suffix == ".tokens" and isinstance(built.tokens.input_ids, np.memmap)
    read = SupervisedDataset(samples, qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache", chat_format=chat_format)
    in_memory = SupervisedDataset(list(samples), qwen3_tokenizer, 64, SYSTEM, chat_format=chat_format)
    for dataset in (built, read, in_memory):
        assert [dataset[i] for i in range(len(dataset))] == expected
        assert dataset.has_loss_weights and dataset.num_tokens == sum(len(f["input_ids"]) for f in expected)
        assert max(len(s.input_ids) for s in dataset.samples) == max(len(f["input_ids"]) for f in expected)
    packed, packed_in_memory = PackedDataset(read, 64), PackedDataset(in_memory, 64)
    assert [packed[i] for i in range(len(packed))] == [packed_in_memory[i] for i in range(len(packed_in_memory))]
    batch, batch_in_memory = PaddingFreeCollator()([read[0], read[1]]), PaddingFreeCollator()(expected[:2])
    assert all((batch[k] == batch_in_memory[k]).all() for k in batch_in_memory)


def cache_of(tmp_path):
    [cache] = (tmp_path / "cache").iterdir()
    return cache


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no manifest", "manifest of another format"])
def test_a_damaged_cache_is_rebuilt_never_read(tmp_path, qwen3_tokenizer, monkeypatch, damage, caplog):
    samples = load_samples(str(write(tmp_path / "d.json", records(20, weighted=True), jsonl=False)))
    first = tokenize_training_samples(samples, qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache")
    cache = cache_of(tmp_path)
    ids = cache / "input_ids.bin"
    if damage == "truncated":
        ids.write_bytes(ids.read_bytes()[:-4])
    elif damage == "flipped byte":
        data = bytearray(ids.read_bytes())
        data[len(data) // 2] ^= 0x01
        ids.write_bytes(bytes(data))
    elif damage == "no manifest":
        (cache / "manifest.json").unlink()
    else:
        manifest = json.loads((cache / "manifest.json").read_text())
        (cache / "manifest.json").write_text(json.dumps({**manifest, "format": "chatft-tokenized-0"}))
    calls = []
    real = datasets.tokenize_conversations
    monkeypatch.setattr(datasets, "tokenize_conversations", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert tokenize_training_samples(samples, qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache") == first
    assert calls and "incomplete or damaged; tokenizing again" in caplog.text
    calls.clear()
    assert tokenize_training_samples(samples, qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache") == first
    assert not calls and [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]


def _tokenize_slowly(data_path, cache_dir, tokenizer_dir):
    import transformers

    datasets.TOKENIZE_BATCH = 2
    real = datasets.tokenize_conversations
    datasets.tokenize_conversations = lambda *a, **k: time.sleep(0.2) or real(*a, **k)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenize_training_samples(load_samples(data_path), tokenizer, 64, SYSTEM, cache_dir=cache_dir)


def test_a_run_killed_while_tokenizing_leaves_no_cache_to_read(tmp_path, qwen3_tokenizer):
    from support import qwen3_tokenizer_dir

    path = str(write(tmp_path / "d.jsonl", records(40), jsonl=True))
    child = multiprocessing.get_context("fork").Process(target=_tokenize_slowly,
                                                        args=(path, tmp_path / "cache", str(qwen3_tokenizer_dir())))
    child.start()
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache").glob(".*.progress")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tokens"] == []  # only scratch left
    samples = load_samples(path)
    expected = tokenize_training_samples(samples, qwen3_tokenizer, 64, SYSTEM)
    assert tokenize_training_samples(samples, qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache") == expected
    assert len([p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tokens"]) == 1


def _build_as_local_rank_0(data_path, cache_dir, tokenizer_dir, delay):
    time.sleep(delay)
    _tokenize_slowly(data_path, cache_dir, tokenizer_dir)


def test_other_ranks_wait_for_the_cache_file_and_map_it(tmp_path, qwen3_tokenizer, monkeypatch, caplog):
    """torchrun's LOCAL_RANK 1 neither tokenizes nor enters a collective: it polls for local rank 0's cache."""
    import logging

    from support import qwen3_tokenizer_dir

    caplog.set_level(logging.INFO, logger="chatft.data.datasets")
    path = str(write(tmp_path / "d.jsonl", records(20), jsonl=True))
    (tmp_path / "cache").mkdir()
    rank_0 = multiprocessing.get_context("fork").Process(target=_build_as_local_rank_0, args=(
        path, tmp_path / "cache", str(qwen3_tokenizer_dir()), 1.0))
    rank_0.start()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(datasets, "WAIT_REPORT_S", 0.5)
    calls = []
    monkeypatch.setattr(datasets, "tokenize_conversations", lambda *a, **k: calls.append(1))
    try:
        dataset = SupervisedDataset(load_samples(path), qwen3_tokenizer, 64, SYSTEM, cache_dir=tmp_path / "cache")
    finally:
        rank_0.join()
    assert rank_0.exitcode == 0 and calls == []
    assert "local rank 1 waiting for local rank 0's tokenized cache" in caplog.text
    assert [dataset[i] for i in range(len(dataset))] == expected_items(whole_file_conversations(path), qwen3_tokenizer, 64)


def test_the_dry_run_of_streamed_data_is_the_dry_run_of_the_list(tmp_path, qwen3_tokenizer, monkeypatch):
    monkeypatch.setattr(datasets, "TOKENIZE_BATCH", 4)  # counted chunk by chunk
    samples = load_samples(str(write(tmp_path / "d.jsonl", records(30, weighted=True), jsonl=True)))
    common = dict(tokenizer=qwen3_tokenizer, max_len=64, system_message=SYSTEM, packing=True, padding_free=True,
                  batch_size=2, accumulation=1, processes=1, seed=0, chat_format="qwen3")
    streamed = dry_run_report("training data", samples, **common)
    assert streamed == dry_run_report("training data", list(samples), **common)
    assert "Dropped 1 of " in streamed and "sample 5 (id='r5')" in streamed and "qwen3 turns: 10 conversation(s)" in streamed
    if sys.platform.startswith("linux"):
        assert dry_run_report("training data", samples, **common, num_workers=2) == streamed


@pytest.mark.slow
def test_the_data_scale_bench_runs_and_compares(tmp_path):
    """bench/data_scale.py on 600 conversations: every run reports, the cached restart reads the same samples, and
    with HF datasets installed its run tokenizes as many samples. (Its numbers at scale are in README.)"""
    from bench import data_scale

    results = data_scale.run(600, 2, str(tmp_path), max_len=512, with_hf=True)
    for kind in ("chatft", "cached", "small", "dry_run"):
        assert "failure" not in results[kind], results[kind]
    assert results["cached"]["samples"] == results["chatft"]["samples"] and results["small"]["samples"] <= 64
    assert results["chatft"]["tokens"] == results["cached"]["tokens"] > 0
    assert "cached_restart_minus_small_s" in results and (tmp_path / "data_scale_600.json").is_file()
    if data_scale.hf_installed():
        assert results["hf"]["samples"] == 600 and results["tokenize_speed_vs_hf"] > 0
    assert "conversations" in data_scale.table(results)
