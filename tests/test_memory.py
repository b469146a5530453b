"""chatft.memory: the estimate's parts, its parameter counts against real models loaded as finetune.py loads them,
sharding, the --dry_run line, that the estimator imports nothing from chatft, and (slow) the estimate finetune.py logs
against the peak bench.profile_table measures."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import torch
import transformers

import finetune
from bench import harness
from chatft.args import parse_args
from chatft.memory import GIB, MemoryEstimate, ModelShape, estimate_training_memory, longest_batch_tokens
from chatft.model.load import load_model
from chatft.plan import RunPlan, plan_run
from support import ROOT, make_non_chatml_model, write_json

MODE_FLAGS = {
    "full": [],
    "full_frozen_embeddings": ["--train_embeddings", "false"],
    "lora": ["--use_lora", "--lora_r", "8"],
    "lora_emb": ["--use_lora", "--lora_r", "8", "--train_embeddings", "true"],
    "lora_two_targets": ["--use_lora", "--lora_r", "4", "--lora_target_modules", "q_proj", "down_proj"],
}


def loaded_as_finetune_loads(model_dir, flags):
    """(model, estimate at 64 tokens) for finetune.py's `flags`: one plan (chatft.plan.plan_run), the model
    chatft.model.load.load_model loads from it and the estimate chatft.memory makes from it."""
    model_args, data_args, training_args, lora_args = parse_args(
        ["--model_name_or_path", str(model_dir), "--data_path", "unused.json", "--output_dir", "unused", "--bf16", "True",
         "--use_cpu", "True", "--model_max_length", "64", *flags])
    plan, _ = plan_run(model_args, data_args, training_args, lora_args)
    return load_model(plan, lora_args), estimate_training_memory(plan, 64)


@pytest.mark.parametrize("mode", MODE_FLAGS)
def test_trainable_parameters_and_weight_bytes_equal_the_loaded_model(tiny_qwen2_arch_dir, mode):
    model, estimate = loaded_as_finetune_loads(tiny_qwen2_arch_dir, MODE_FLAGS[mode])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert estimate.trainable_params == sum(p.numel() for p in trainable)
    assert estimate.gradients == 4 * estimate.trainable_params and estimate.optimizer == 8 * estimate.trainable_params
    assert estimate.weights == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_counts_follow_added_tokens_and_tied_embeddings(tmp_path, tie):
    """A tokenizer without ChatML tokens: load_model resizes the embeddings and LoRA trains them (modules_to_save,
    tied copies kept tied)."""
    model, estimate = loaded_as_finetune_loads(make_non_chatml_model(tmp_path, tie), ["--use_lora", "--lora_r", "4"])
    assert estimate.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.weights == sum(p.numel() * p.element_size() for p in model.parameters())


def test_lora_parameters_from_shapes(tiny_qwen2_arch_dir):
    """r * (in + out) per targeted layer: q_proj 32 -> 32 and down_proj 48 -> 32, in 2 layers, r 4."""
    shape = ModelShape.of(transformers.AutoConfig.from_pretrained(tiny_qwen2_arch_dir))
    assert shape.lora_params(RunPlan(lora_r=4, lora_targets=("q_proj", "down_proj"))) == 2 * 4 * (64 + 80)


# A Qwen2 small enough to count by hand: vocabulary 128, hidden 16, intermediate 24, 2 layers, 4 heads of 4, 2 key/value
# heads, untied output layer. Parameters: embeddings 128 * 16 = 2048 and the output layer 2048; per layer q_proj
# 16 * 16 + 16 (bias) = 272, k_proj and v_proj 16 * 8 + 8 = 136 each, o_proj 256, gate/up/down 16 * 24 = 384 each,
# 2 norms of 16: 1984; the final norm 16. In all 2048 + 2 * 1984 + 16 + 2048 = 8080.
SMALL = dict(vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
SMALL_PARAMS = 8080
# Full-parameter training in fp32 (a = s = 4 bytes), every parameter trained, checkpointing, 64 tokens:
SMALL_WEIGHTS = 4 * SMALL_PARAMS  # fp32 master weights
SMALL_GRADIENTS = 4 * SMALL_PARAMS
SMALL_OPTIMIZER = 8 * SMALL_PARAMS  # AdamW's two fp32 states
# per token and layer: norms 2 * 16 * (8 + 4) = 384; attention 16 * 4 (input) + 2 * (16 + 8) * 4 (q, k, v, rotary)
# + (2 * 16 + 2 * 8) * 4 (rotate_half, sdpa's q/k/v) + 4 * 4 (log-sum-exp) + 16 * 4 (o_proj's input) = 528;
# MLP 16 * 4 + 4 * 24 * 4 = 448: 1360 for the one layer recomputed, 2 * 16 * 4 = 128 for the checkpointed inputs,
# 16 * (4 + 8 + 4) = 256 for the embedding output and final norm: 64 tokens * (1360 + 128 + 256) = 111,616.
# The loss: one chunk of 64 x 128 logits * (2 * 4 + 4) = 98,304, hidden states and their gradient 2 * 64 * 16 * 4 = 8,192,
# the output layer's gradient 4 * 2048 = 8,192. No autocast copies in fp32.
SMALL_ACTIVATIONS = 111_616 + 98_304 + 8_192 + 8_192


def small_plan(**changes) -> RunPlan:
    config = transformers.Qwen2Config(**SMALL)
    return dataclasses.replace(RunPlan(config=config, mode="full", compute_dtype=torch.float32, train_embeddings=True),
                               **changes)


def test_parts_of_a_model_counted_by_hand():
    plan = small_plan()
    with torch.device("meta"):
        assert sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(plan.config).parameters()) == SMALL_PARAMS
    estimate = estimate_training_memory(plan, 64)
    assert (estimate.weights, estimate.gradients, estimate.optimizer, estimate.activations) == (
        SMALL_WEIGHTS, SMALL_GRADIENTS, SMALL_OPTIMIZER, SMALL_ACTIVATIONS)
    assert estimate.total == 355_584 and estimate.trainable_params == SMALL_PARAMS


def test_the_text_names_the_parts_in_gib():
    estimate = MemoryEstimate(weights=3 * GIB // 2, gradients=GIB // 4, optimizer=GIB // 2, activations=GIB // 8,
                              tokens=4096)
    assert estimate.total == 19 * GIB // 8
    assert estimate.text() == ("memory estimate: ~2.38 GiB peak (weights 1.50 GiB, gradients 0.25 GiB, optimizer 0.50 "
                               "GiB, activations 0.12 GiB at the longest batch of 4,096 tokens)")


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing(tiny_qwen2_arch_dir):
    config = transformers.AutoConfig.from_pretrained(tiny_qwen2_arch_dir)
    act = lambda tokens, **kw: estimate_training_memory(RunPlan(config=config, **kw), tokens).activations  # noqa: E731
    assert act(2048) > act(1024) > act(512)
    assert act(1024, activation_checkpointing=False) > act(1024)
    # full logits: tokens x vocab x (compute dtype + 2 fp32 copies); the labelled path stops at one chunk
    assert act(1024, labelled_logits_only=False) - act(1024) > 1024 * config.vocab_size * 8
    assert act(8192) - act(4096) < act(8192, labelled_logits_only=False) - act(4096, labelled_logits_only=False)


@pytest.mark.parametrize("shard, expected", [
    ("none", (SMALL_WEIGHTS, SMALL_GRADIENTS, SMALL_OPTIMIZER)),
    ("zero1", (32_320, 32_320, 64_640 // 4)),
    ("zero2", (32_320, 32_320 // 4, 64_640 // 4)),
    ("fsdp_grad", (32_320, 8_080, 16_160)),
    ("zero3", (8_080, 8_080, 16_160)),
    ("fsdp_full", (8_080, 8_080, 16_160)),
])
def test_sharding_divides_by_the_world_size(shard, expected):
    """The small model's fp32 weights (32,320 bytes), gradients (32,320) and AdamW states (64,640) over 4 processes."""
    estimate = estimate_training_memory(small_plan(shard=shard, world_size=4), 64)
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == expected
    assert estimate.activations == SMALL_ACTIVATIONS  # each process holds its own batch's


@pytest.mark.parametrize("shard", ["zero1", "zero2", "zero3"])
def test_deepspeed_bf16_holds_the_model_in_bf16_and_the_fp32_master_with_the_optimizer(shard):
    """DeepSpeed's bf16 casts the module (the small model's 8,080 parameters: 16,160 bytes) and keeps the fp32 master
    weights (32,320 bytes) partitioned with the AdamW states; an fp32 run is the Trainer's fp32 weights."""
    n = 4
    bf16 = estimate_training_memory(small_plan(shard=shard, world_size=n, compute_dtype=torch.bfloat16), 64)
    fp32 = estimate_training_memory(small_plan(shard=shard, world_size=n), 64)
    assert bf16.weights == (16_160 // n if shard == "zero3" else 16_160)
    assert bf16.optimizer == (64_640 + 32_320) // n and bf16.gradients == fp32.gradients
    assert fp32.weights == (32_320 // n if shard == "zero3" else 32_320) and fp32.optimizer == 64_640 // n
    fsdp = estimate_training_memory(small_plan(shard="fsdp_full", world_size=n, compute_dtype=torch.bfloat16), 64)
    assert (fsdp.weights, fsdp.optimizer) == (32_320 // n, 64_640 // n)  # FSDP keeps fp32 shards and autocasts


def test_longest_batch_tokens():
    class Samples:
        samples = [type("S", (), {"input_ids": [0] * n})() for n in (5, 40, 12)]

    class Rows:
        rows = [{"input_ids": [0] * 60}, {"input_ids": [0] * 64}]

    assert longest_batch_tokens(Samples(), 4, 64) == 160
    assert longest_batch_tokens(Rows(), 2, 64) == 128
    assert longest_batch_tokens(object(), 2, 64) == 128  # lazy: lengths unknown, model_max_length


def test_dry_run_prints_the_estimate(tiny_qwen2_arch_dir, tmp_path, capsys):
    """The line is the plan's estimate (chatft.plan, chatft.memory) at the longest sample times the batch of 2."""
    data = write_json(tmp_path / "train.json", [{"id": "a", "conversations": [
        {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello there, how can I help?"}]}])
    flags = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "o"),
             "--dry_run", "True", "--use_cpu", "True", "--use_lora", "--per_device_train_batch_size", "2",
             "--chat_format", "chatml"]
    assert finetune.main(flags) == 0
    report = capsys.readouterr().out.splitlines()
    line = next(line for line in report if line.startswith("memory estimate: ~"))
    rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello there, how can I help?<|im_end|>\n")
    tokens = len(transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir)(rendered).input_ids)
    assert tokens == 30 and f"longest {tokens}," in next(line for line in report if line.startswith("sample lengths"))
    plan, _ = plan_run(*parse_args(flags))
    assert line == estimate_training_memory(plan, 2 * tokens).text()
    assert line.endswith("at the longest batch of 60 tokens)")


def test_the_estimator_imports_nothing_from_chatft():
    """chatft.memory is a pure estimator over a plan: it may not reach up into the modules that decide."""
    tree = ast.parse((ROOT / "chatft" / "memory.py").read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += ["." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "torch" in imported  # the walk finds imports
    assert [name for name in imported if name.split(".")[0] in ("chatft", "")] == []  # "": a relative import


@pytest.mark.slow
@pytest.mark.parametrize("length", [1024])  # activations weigh here (at 256 weights dominate: within 25% too, measured)
@pytest.mark.parametrize("mode", ["lora", "lora_emb", "qlora", "full"])
def test_estimate_within_25_percent_of_the_measured_peak(smollm2_dir, mode, length, monkeypatch):
    """A cell of Qwen's profiling table (bench.profile_table's worker: finetune.py in a fresh process, batch 1, 2 steps,
    the launchers' device flags, activation checkpointing): the estimate finetune.py logs before training (for the same flags) against the
    peak measured (CUDA: max allocated; CPU: resident memory above what the process held before the model loaded).

    On the CPU the worker runs with glibc's mmap threshold fixed at 128 KiB, so that every tensor larger than that is
    returned to the system when freed and the resident set follows the live tensors. With glibc's default (a threshold
    that rises to 32 MiB as large blocks are freed) activations of a few MiB land in the heap, whose freed chunks stay
    resident: LoRA at 1024 tokens then measured 1.41 GiB against 1.00 GiB with the fixed threshold, and an estimate
    of 0.93 GiB."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # inherited by the worker; no effect on CUDA memory
    run = harness.run_worker("bench.profile_table", {"model": str(smollm2_dir), "mode": mode, "length": length,
                                                     "steps": 2, "gradient_accumulation_steps": 1,
                                                     "activation_checkpointing": "True"})
    assert run.failure is None, run.stderr[-3000:]
    # the worker's own estimate: chatft.memory for its flags, what finetune.py logs before training
    estimate_gib, measured_gib = run.result["estimated_memory_mib"] / 1024, run.result["peak_memory_mib"] / 1024
    assert abs(estimate_gib - measured_gib) <= 0.25 * measured_gib, (mode, length, estimate_gib, measured_gib)


def test_moe_activations_follow_the_routed_experts_not_the_dense_width():
    """A qwen3_moe layer's activations: top_k routed copies through the experts' width and the router's, whatever the
    config's (unused) dense intermediate_size says; a dense model of the same active width is close to it."""
    def activations(model_type, **sizes):
        config = transformers.AutoConfig.for_model(model_type, vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, **sizes)
        plan = RunPlan(config=config, mode="lora", compute_dtype=torch.float32)
        shape = ModelShape.of(config)
        return shape, estimate_training_memory(plan, 1024, shape=shape).activations

    shape, moe = activations("qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                             intermediate_size=6144)
    assert (shape.moe_layers, shape.experts, shape.top_k, shape.expert_intermediate) == (2, 8, 2, 32)
    assert activations("qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       intermediate_size=64)[1] == moe
    assert activations("qwen3_moe", num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                       intermediate_size=6144)[1] > moe
    dense_shape, dense = activations("qwen3", intermediate_size=64)
    # the attention's LoRA inputs aside (qwen3_moe has no MLP linear layers to adapt), of the same order
    assert dense_shape.moe_layers == 0 and 0.5 * dense < moe < 1.5 * dense
