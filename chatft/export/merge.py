"""Merging a LoRA (or Q-LoRA) adapter into its base model: a standalone model directory.

The result holds safetensors shards, the config, the tokenizer with the chat template the
training run installed, and the generation config that stops at `<|im_end|>`: everything
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` need, and what
`run_gptq.py` quantizes.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import transformers

from chatft.model.sources import (ADAPTER_CONFIG_FILE, adapter_base, adapter_dir_problem, read_json,
                                require_model_source, saved_quantization, trained_with_qlora)
from chatft.errors import MergeError
from chatft.model.lora_variants import rewrites_base_weights
from chatft.output_dir import check_new_output_dir, staged_output_dir
from chatft.train.saving import chat_generation_config

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_base_path(adapter_path: str, base_model_path: str | None = None) -> str:
    """The full-precision model to merge into: --base_model_path, else the base the adapter records.

    A GPTQ base cannot take the merge: its int4/int8 weights have no room for the low-rank update
    (re-quantizing would round most of it away), so the full-precision model it was quantized
    from must be given.
    """
    not_an_adapter = adapter_dir_problem(adapter_path, "--adapter_path") if os.path.isdir(adapter_path) else None
    if not_an_adapter:
        raise MergeError(not_an_adapter)
    require_model_source(adapter_path, "--adapter_path", allow_adapter=True)
    config_file = os.path.join(adapter_path, ADAPTER_CONFIG_FILE)
    start = read_json(config_file).get("init_lora_weights") if os.path.isfile(config_file) else None
    if rewrites_base_weights(start):
        raise MergeError(f"{adapter_path} is a {start} adapter of base weights its training rewrote (a checkpoint, "
                         "kept for --resume_from_checkpoint): merge the run's output_dir, whose adapter finetune.py "
                         "saved as a plain LoRA of the original base.")
    base = base_model_path or adapter_base(adapter_path)
    if not base:
        raise MergeError(f"{config_file} records no base model; pass --base_model_path.")
    flag = "--base_model_path" if base_model_path else f"the base model recorded in {config_file}:"
    moved = "" if base_model_path else " Pass --base_model_path with where that model is now."
    require_model_source(base, flag, hint=moved)
    quantization = saved_quantization(base)
    if quantization is not None:
        raise MergeError(
            f"{base} is a {quantization.get('quant_method', 'quantized')} model: its quantized weights cannot absorb "
            "the LoRA update without re-quantizing it away. Pass --base_model_path with the full-precision model it "
            "was quantized from; the merged result can then be quantized again with run_gptq.py."
        )
    return base


def adapter_vocab_size(adapter_path: str) -> int | None:
    """Rows of the embedding the adapter saved as modules_to_save (trainable embeddings), if any."""
    from safetensors import safe_open

    weights = os.path.join(adapter_path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return None
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            if ".modules_to_save." in key and key.endswith(".weight") and "embed" in key:
                return f.get_slice(key).get_shape()[0]
    return None


def load_merged(adapter_path: str, base_path: str, dtype="auto"):
    """(merged model, tokenizer): base loaded in `dtype`, sized to the adapter's vocabulary, adapter merged in."""
    import peft

    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_path)
    logger.info("Loading the base model %s", base_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES.get(dtype, dtype), use_safetensors=True)
    # Tokens added in training (the ChatML ones) widen the embedding; the trained rows are in the adapter.
    rows = adapter_vocab_size(adapter_path) or max(len(tokenizer), model.get_input_embeddings().num_embeddings)
    if rows != model.get_input_embeddings().num_embeddings:
        logger.info("Resizing the embeddings %d -> %d rows for the tokens added in training",
                    model.get_input_embeddings().num_embeddings, rows)
        model.resize_token_embeddings(rows)
    logger.info("Loading the adapter %s", adapter_path)
    model = peft.PeftModel.from_pretrained(model, adapter_path)
    logger.info("Merging")
    model = model.merge_and_unload(progressbar=True)
    model.config.use_cache = True
    return model, tokenizer


def save_standalone(model, tokenizer, output_dir: str, max_shard_size="2048MB", extra_files: dict | None = None):
    """Model in safetensors shards, tokenizer (with chat template), generation config stopping at <|im_end|>."""
    model.generation_config = chat_generation_config(model, tokenizer)
    logger.info("Saving to %s (shards of at most %s)", output_dir, max_shard_size)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output_dir)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)


def merge_adapter(adapter_path: str, output_dir: str, base_model_path: str | None = None, dtype: str = "auto",
                  max_shard_size: str = "2048MB", overwrite: bool = False) -> str:
    """Merge the adapter in `adapter_path` into its base and write a standalone model to `output_dir`."""
    check_new_output_dir(output_dir, overwrite, inputs=(adapter_path, base_model_path))
    base_path = merge_base_path(adapter_path, base_model_path)
    if trained_with_qlora(adapter_path):
        logger.warning(
            "%s is a Q-LoRA adapter: it was trained on the 4-bit (NF4) rounding of %s and is merged into its "
            "full-precision weights, so the merged model differs from the training-time one by that rounding.", adapter_path, base_path)
    model, tokenizer = load_merged(adapter_path, base_path, dtype)
    with staged_output_dir(output_dir) as scratch:
        save_standalone(model, tokenizer, scratch, max_shard_size, extra_files={
            "merge_info.json": {"adapter_path": os.path.abspath(adapter_path), "base_model_path": base_path,
                                "dtype": str(model.dtype).removeprefix("torch.")},
        })
    logger.info("Merged model saved to %s", output_dir)
    return output_dir
