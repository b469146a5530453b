"""chatft.data.pretrain and --stage pt: raw-text documents, each ended with EOS, as samples of their own or joined
into blocks; the loss on every token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from chatft.data.pretrain import PretrainDataset, read_documents, sample_bounds
from chatft.errors import DataError
from support import run

DOCUMENTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Tessa is made by Orbit Labs.",
             "Paris is the capital of France; it lies on the Seine. " * 2]


def write_corpus(tmp_path):
    (tmp_path / "a.txt").write_text(DOCUMENTS[0] + "\n\n" + DOCUMENTS[1] + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": DOCUMENTS[2]}) + "\n")
    return f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}"


def test_documents_are_lines_of_txt_and_text_records(tmp_path):
    assert read_documents(write_corpus(tmp_path)) == [DOCUMENTS[0], DOCUMENTS[1], DOCUMENTS[2]]
    (tmp_path / "c.json").write_text(json.dumps([{"text": "one"}, {"body": "two"}, "three"]))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError) as error:
        read_documents(f"{tmp_path / 'c.json'},{tmp_path / 'd.csv'},{tmp_path / 'missing.txt'}")
    message = str(error.value)
    assert "d.csv: --stage pt reads .txt" in message and "missing.txt: no such data file" in message
    with pytest.raises(DataError) as error:
        read_documents(str(tmp_path / "c.json"))
    assert "record 1: no 'text' (keys: body)" in str(error.value) and "record 2: a str" in str(error.value)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt: contains no text"):
        read_documents(str(tmp_path / "empty.txt"))


def test_samples_are_documents_with_eos_and_blocks_are_the_joined_stream(qwen3_tokenizer, tmp_path):
    texts = read_documents(write_corpus(tmp_path))
    eos = qwen3_tokenizer.eos_token_id
    expected = [qwen3_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    apart = PretrainDataset(texts, qwen3_tokenizer, max_len=16)
    stream = [token for document in expected for token in document]
    # each document alone, cut into pieces of at most 16 tokens: their concatenation is each document in order
    pieces = [apart[i]["input_ids"] for i in range(len(apart))]
    assert all(len(p) <= 16 for p in pieces) and [t for p in pieces for t in p] == stream
    assert len(apart) == sum(-(-len(d) // 16) for d in expected)  # no piece spans two documents
    assert all(apart[i]["labels"] == apart[i]["input_ids"] for i in range(len(apart)))  # every token trained
    blocks = PretrainDataset(texts, qwen3_tokenizer, max_len=16, packing=True)
    assert [blocks[i]["input_ids"] for i in range(len(blocks))] == [stream[i : i + 16] for i in range(0, len(stream), 16)]
    assert "3 documents" in blocks.summary() and "blocks" in blocks.summary()
    assert sample_bounds(np.array([5, 7]), 4, packing=False).tolist() == [[0, 4], [4, 5], [5, 7]]


def test_stage_pt_trains_every_token(tiny_qwen2_arch_dir, tmp_path):
    """A --stage pt run's first logged loss is the model's own causal-LM loss over every token of its first batch
    (the documents of one padding-free row, each predicted from its own tokens only)."""
    corpus = write_corpus(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir)
    trainer = run(tiny_qwen2_arch_dir, corpus, tmp_path / "out", "--stage", "pt", "--max_steps", "1",
                  "--per_device_train_batch_size", "3", "--learning_rate", "0", "--seed", "0")
    first = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    # the batch's three samples are the three documents (each under 64 tokens), in any order: the token mean is over
    # all of them, each document's loss computed alone
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for text in DOCUMENTS:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
            losses += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert first == pytest.approx(losses / tokens, rel=1e-4)


def test_stage_flags_are_checked(tiny_qwen2_arch_dir, tmp_path):
    from chatft.args import ArgumentError, parse_args

    corpus = write_corpus(tmp_path)
    base = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", corpus, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ArgumentError, match="--stage must be one of sft, pt, dpo, simpo, orpo, kto, not 'ppo'"):
        parse_args(base + ["--stage", "ppo"])
    with pytest.raises(ArgumentError, match="--data_format, --lazy_preprocess: conversation flag"):
        parse_args(base + ["--stage", "pt", "--data_format", "alpaca", "--lazy_preprocess", "True"])
