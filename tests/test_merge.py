"""merge_lora.py on tiny models: the merged model is standalone (plain transformers, safetensors,
tokenizer with chat template) and computes what base + adapter computed; added tokens, trainable and tied
embeddings, Q-LoRA adapters; output directories are never half-written or silently replaced."""

import json
import os

import peft
import pytest
import torch
import transformers

import merge_lora
from chatft.export import merge as merging
from chatft.data.chat_format import IM_END
from support import assert_close_up_to_rounding, decoder_terms, make_non_chatml_model, probe_logits, rounding_atol, run


def merge(adapter_dir, output_dir, *extra):
    return merge_lora.main(["--adapter_path", str(adapter_dir), "--output_dir", str(output_dir), *extra])


def assert_standalone(merged_dir):
    files = set(os.listdir(merged_dir))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) or name.startswith("adapter_") for name in files)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    assert not any("lora_" in name or "modules_to_save" in name for name in model.state_dict())
    assert tokenizer.convert_tokens_to_ids(IM_END) in (
        model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id])
    return model, tokenizer


def test_merged_model_equals_base_plus_adapter(tiny_qwen_arch_dir, data_file, tmp_path):
    run(tiny_qwen_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4", "--learning_rate", "1e-2")
    assert merge(tmp_path / "lora", tmp_path / "merged") == 0
    merged, tokenizer = assert_standalone(tmp_path / "merged")
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), probe_logits(adapter, tokenizer),
                                terms=decoder_terms(merged.config))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    assert (probe_logits(base, tokenizer) - probe_logits(merged, tokenizer)).abs().max() > 1e-3  # the adapter counted
    info = json.load(open(tmp_path / "merged" / "merge_info.json"))
    assert info["base_model_path"] == str(tiny_qwen_arch_dir) and info["dtype"] == "float32"


@pytest.mark.parametrize("tie", [True, False])
def test_added_tokens_and_trainable_embeddings_merge(tmp_path, data_file, tie):
    """A base without ChatML tokens: training added them and trained the embeddings (modules_to_save)."""
    base_dir = make_non_chatml_model(tmp_path, tie)
    run(base_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4", "--learning_rate", "1e-2")
    assert merge(tmp_path / "lora", tmp_path / "merged") == 0
    merged, tokenizer = assert_standalone(tmp_path / "merged")
    base_vocab = len(transformers.AutoTokenizer.from_pretrained(base_dir))
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == base_vocab + 2
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), probe_logits(adapter, tokenizer),
                                terms=decoder_terms(merged.config))
    torch.testing.assert_close(merged.get_input_embeddings().weight, adapter.get_input_embeddings().weight)
    if tie:
        assert merged.config.tie_word_embeddings
        torch.testing.assert_close(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    # the new tokens' rows are the trained ones, not a fresh initialisation
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    old_rows = base.get_input_embeddings().weight
    assert (merged.get_input_embeddings().weight[:base_vocab] - old_rows).abs().max() > rounding_atol(old_rows, terms=1)


def test_dtype_and_shards(tiny_qwen_arch_dir, data_file, tmp_path):
    run(tiny_qwen_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4")
    assert merge(tmp_path / "lora", tmp_path / "merged", "--dtype", "bfloat16", "--max_shard_size", "5MB") == 0
    shards = [name for name in os.listdir(tmp_path / "merged") if name.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert merged.dtype == torch.bfloat16


def test_non_empty_output_dir_refused_then_replaced_with_overwrite(tiny_qwen_arch_dir, data_file, tmp_path, capsys):
    run(tiny_qwen_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")
    assert merge(tmp_path / "lora", output) == 2
    assert "--overwrite" in capsys.readouterr().err and os.listdir(output) == ["keep.txt"]
    assert merge(tmp_path / "lora", output, "--overwrite") == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert merge(tmp_path / "lora", tmp_path / "lora", "--overwrite") == 2  # never over its own input
    assert "also an input" in capsys.readouterr().err


def test_failed_save_leaves_previous_output_intact(tiny_qwen_arch_dir, data_file, tmp_path, monkeypatch, capsys):
    run(tiny_qwen_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")

    def save_then_crash(model, tokenizer, directory, *args, **kwargs):
        (open(os.path.join(directory, "model.safetensors"), "w")).write("half a model")
        raise OSError("disk full")

    monkeypatch.setattr(merging, "save_standalone", save_then_crash)
    assert merge(tmp_path / "lora", output, "--overwrite") == 2
    assert "disk full" in capsys.readouterr().err
    assert os.listdir(output) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["lora", "merged", "train.json"]  # no scratch directory left behind


def test_gptq_base_needs_the_full_precision_model(tiny_gptq_dir, tiny_qwen2_arch_64_dir, data_file, tmp_path, capsys):
    """Q-LoRA on a GPTQ model: refused into the int4 weights, merged into the full-precision original."""
    run(tiny_gptq_dir, data_file, tmp_path / "qlora", "--use_lora", "--q_lora", "--lora_r", "4", "--learning_rate", "1e-2",
        "--lora_dropout", "0")
    assert merge(tmp_path / "qlora", tmp_path / "merged") == 2
    assert "--base_model_path" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    original = tiny_qwen2_arch_64_dir  # what tiny_gptq_dir was quantized from
    assert merge(tmp_path / "qlora", tmp_path / "merged", "--base_model_path", str(original)) == 0
    merged, tokenizer = assert_standalone(tmp_path / "merged")
    adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(original), tmp_path / "qlora")
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), probe_logits(adapter, tokenizer),
                                terms=decoder_terms(merged.config))


def test_nf4_qlora_adapter_merges_into_its_full_precision_base(tiny_qwen2_arch_64_dir, tmp_path, data_file, caplog):
    run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "qlora", "--use_lora", "--q_lora", "--lora_r", "4",
        "--learning_rate", "1e-2", "--bf16", "True")
    assert merge(tmp_path / "qlora", tmp_path / "merged") == 0
    assert "Q-LoRA adapter" in caplog.text and "NF4" in caplog.text
    merged, tokenizer = assert_standalone(tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_64_dir)
    adapter = peft.PeftModel.from_pretrained(base, tmp_path / "qlora")
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), probe_logits(adapter, tokenizer),
                                terms=decoder_terms(merged.config))


def test_not_an_adapter_dir(tiny_qwen_arch_dir, tmp_path, capsys):
    assert merge(tiny_qwen_arch_dir, tmp_path / "merged") == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_bad_flags_are_listed_at_once_before_loading(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')  # no weights beside it
    capsys.readouterr()
    assert merge(adapter, tmp_path / "merged", "--base_model_path", str(tmp_path / "base"), "--max_shard_size",
                 "2048") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --adapter_path {adapter}: no adapter weights (adapter_model.safetensors) in it",
        f"error: --adapter_path {adapter}: no tokenizer files (tokenizer.json or tokenizer_config.json) in it",
        f"error: --base_model_path {tmp_path / 'base'}: no such file or directory",
        "error: --max_shard_size 2048: must be a positive size with its unit, e.g. 2048MB or 5GB (units: KB, MB, GB, "
        "TB).",
    ]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
