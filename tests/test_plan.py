"""chatft.plan: every decision the flags and the model's config make, taken once (mode, dtype, quantization,
sharding, world size, chat format, attention, trainable embeddings), and read by chatft.model.load.load_model."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers

from chatft.args import parse_args
from chatft.data.chat_format import qwen3_template
from chatft.errors import ArgumentError
from chatft.data.chat_format import resolve_chat_format
from chatft.model.load import load_model
from chatft.plan import plan_run, resolve_attn_implementation, sharding, trainable_embeddings, world_size
from support import make_non_chatml_model, write_json


def planned(model_dir, *flags):
    model_args, data_args, training_args, lora_args = parse_args(
        ["--model_name_or_path", str(model_dir), "--data_path", "unused.json", "--output_dir", "unused",
         "--use_cpu", "True", *flags])
    plan, tokenizer = plan_run(model_args, data_args, training_args, lora_args)
    return plan, tokenizer, lora_args


@pytest.mark.parametrize("flags, expected", [
    ([], dict(mode="full", compute_dtype=torch.float32, load_dtype=torch.float32, quantization="none",
              train_embeddings=True)),
    (["--bf16", "True", "--train_embeddings", "false"],
     dict(mode="full", compute_dtype=torch.bfloat16, load_dtype=torch.float32, train_embeddings=False)),
    (["--bf16", "True", "--use_lora", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj"],
     dict(mode="lora", compute_dtype=torch.bfloat16, load_dtype=torch.bfloat16, quantization="none", lora_r=8,
          lora_targets=("q_proj", "v_proj"), train_embeddings=False, lora_dropout=0.05)),
    (["--fp16", "True", "--use_lora", "--q_lora"],
     dict(mode="qlora", compute_dtype=torch.float16, load_dtype=torch.float16, quantization="nf4")),
    (["--use_lora", "--activation_checkpointing", "--labelled_logits_only", "False", "--chat_format", "qwen3"],
     dict(activation_checkpointing=True, labelled_logits_only=False, chat_format="qwen3")),
])
def test_flags_decide_the_plan(tiny_qwen2_arch_dir, flags, expected):
    plan, tokenizer, _ = planned(tiny_qwen2_arch_dir, *flags)
    assert {name: getattr(plan, name) for name in expected} == expected
    assert plan.model_path == str(tiny_qwen2_arch_dir) and plan.vocab_size == len(tokenizer) and plan.added_tokens == ()
    assert plan.config.hidden_size == 32 and plan.shard == "none" and plan.world_size == 1
    assert (plan.attn_implementation, plan.per_sample_attention) == ("sdpa", True)  # auto, on the CPU


def test_gptq_settings_come_from_the_model_config(tiny_qwen2_arch_dir, tmp_path):
    model_dir = shutil.copytree(tiny_qwen2_arch_dir, tmp_path / "gptq")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 3, "group_size": 32}
    write_json(model_dir / "config.json", config)
    plan, _, _ = planned(model_dir, "--use_lora", "--q_lora")
    assert (plan.mode, plan.quantization, plan.gptq_bits, plan.gptq_group_size) == ("qlora", "gptq", 3, 32)


def test_added_chatml_tokens_train_the_embeddings_under_lora(tmp_path):
    plan, tokenizer, _ = planned(make_non_chatml_model(tmp_path, tie=False), "--use_lora")
    assert plan.added_tokens == ("<|im_start|>", "<|im_end|>") and plan.train_embeddings
    assert plan.vocab_size == len(tokenizer) > plan.config.vocab_size


def test_trainable_embeddings_refuses_what_cannot_work():
    assert trainable_embeddings("auto", "full", [], "zero3") is True  # full-parameter: trained unless false
    assert trainable_embeddings("false", "full", ["<|im_start|>"], "none") is False
    assert trainable_embeddings("auto", "lora", [], "none") is False
    assert trainable_embeddings("auto", "lora", ["<|im_start|>"], "zero2") is True
    assert trainable_embeddings("false", "lora", ["<|im_start|>"], "zero3") is False
    with pytest.raises(ArgumentError, match="use --deepspeed ds_config_zero2.json"):
        trainable_embeddings("true", "lora", [], "zero3")
    with pytest.raises(ArgumentError, match=re.escape("--q_lora: the tokenizer lacks <|im_start|>")):
        trainable_embeddings("auto", "qlora", ["<|im_start|>"], "none")


def test_sharding_read_from_the_flags(tmp_path):
    zero3 = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"})
    assert sharding(SimpleNamespace(deepspeed=str(zero3), fsdp=[])) == "zero3"
    assert sharding(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, fsdp=[])) == "zero2"
    assert sharding(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 0}}, fsdp=[])) == "none"
    assert sharding(SimpleNamespace(deepspeed=None, fsdp=[])) == "none"
    assert sharding(SimpleNamespace(deepspeed=None, fsdp=["full_shard", "auto_wrap"])) == "fsdp_full"
    assert sharding(SimpleNamespace(deepspeed=None, fsdp=["shard_grad_op"])) == "fsdp_grad"
    # accelerate launch --use_deepspeed: no --deepspeed, the stage in accelerate's plugin
    assert sharding(SimpleNamespace(deepspeed=None, deepspeed_plugin=SimpleNamespace(zero_stage=3), fsdp=[])) == "zero3"
    # what transformers' own TrainingArguments make of --fsdp (5.x: fsdp=True, the strategy in fsdp_config)
    for flag, expected in (("full_shard auto_wrap", "fsdp_full"), ("shard_grad_op auto_wrap", "fsdp_grad")):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), fsdp=flag, use_cpu=True)
        assert sharding(args) == expected, (flag, args.fsdp, args.fsdp_config)


def test_world_size_is_the_launchers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size() == 4


def test_a_sequence_parallel_group_counts_as_one_data_parallel_process():
    """--sequence_parallel_size N: the N processes of a group train on one row, so the step takes world / N batches
    (what the packing line and the dry run count steps with)."""
    from chatft.plan import RunPlan

    assert RunPlan(model_path="m", world_size=4).data_parallel_size == 4
    assert RunPlan(model_path="m", world_size=4, sequence_parallel_size=2).data_parallel_size == 2
    assert RunPlan(model_path="m", world_size=2, sequence_parallel_size=2).data_parallel_size == 1


def test_chat_format_resolved_from_the_models_template():
    assert resolve_chat_format("auto", None) == "chatml"
    assert resolve_chat_format("auto", "{{ messages }}") == "chatml"
    assert resolve_chat_format("auto", qwen3_template()) == "qwen3"
    assert resolve_chat_format("chatml", qwen3_template()) == "chatml"
    assert resolve_chat_format("qwen3", None) == "qwen3"


def test_attention_resolved_from_the_request():
    assert resolve_attn_implementation("eager", torch.bfloat16, use_cpu=False) == "eager"
    assert resolve_attn_implementation("auto", torch.bfloat16, use_cpu=True) == "sdpa"  # flash-attn: CUDA only


def test_load_model_reads_the_plan(tiny_qwen2_arch_dir):
    """Embeddings frozen or trained as the plan says, in the plan's load dtype, per-sample sdpa where planned."""
    plan, _, lora_args = planned(tiny_qwen2_arch_dir, "--bf16", "True")
    frozen = load_model(dataclasses.replace(plan, train_embeddings=False), lora_args)
    assert not frozen.get_input_embeddings().weight.requires_grad and frozen.dtype == torch.float32
    assert frozen.config._attn_implementation != "sdpa"  # made per-sample
    as_loaded = load_model(dataclasses.replace(plan, load_dtype=torch.bfloat16, per_sample_attention=False), lora_args)
    assert as_loaded.get_input_embeddings().weight.requires_grad and as_loaded.dtype == torch.bfloat16
    assert as_loaded.config._attn_implementation == "sdpa"
