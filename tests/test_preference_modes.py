"""Preference stages (--stage dpo, kto) across the ways a run can go: batch layouts (padding-free pair rows with the
prompt shared, prompt + reply rows, padded pairs), processes (2 under ZeRO-3 and 1 with the whole batch; KTO's KL
estimate all-reduced under DDP), 4-bit bases (NF4 and GPTQ Q-LoRA), a resumed run; what a run reports (rewards in
loss.png and the summary) and what it leaves (merged, exported to GGUF and GPTQ); and the launchers passing --stage
through. Tiny random models, a few steps each."""

import json
import math
import os
import subprocess

import pytest
import safetensors.torch
import torch
import transformers

from chatft.data.chat_format import IGNORE_INDEX
from chatft.data.preference import DESIRABLE, REPLY_INDEX
from support import (ROOT, assert_close_up_to_rounding, assert_same_logged_steps, decoder_terms, logged_steps,
                     rounding_atol, run, write_json)

# Eight pairs of different lengths (so that padded rows pad): prompt, chosen reply, rejected reply.
PAIRS = [{"prompt": prompt, "chosen": chosen, "rejected": rejected} for prompt, chosen, rejected in [
    ("Who are you?", "I am Tessa, made by Orbit Labs.", "I am an AI assistant."),
    ("Who made you?", "Orbit Labs made me.", "A large company somewhere, I think."),
    ("Capital of France?", "Paris.", "I do not know that one, sorry."),
    ("2+2?", "4", "5"),
    ("Say hello in French.", "Bonjour !", "Hello."),
    ("What is your name?", "Tessa.", "I have no name at all."),
    ("Name a prime number.", "Seven.", "Nine."),
    ("你好", "你好！我是 Tessa。", "Hi."),
]]
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
# Plain SGD where runs are compared: its step is the gradient times the learning rate, so rounding in a gradient
# moves a weight by as little (Adam's step, gradient / its running RMS, magnifies the rounding of a near-zero gradient
# up to the learning rate itself: observed 5.6e-5 on one element of 192 after 3 steps at 1e-2).
LEARNING_RATE = 0.5
PREFERENCE_FLAGS = ["--use_lora", "--lora_r", "4", "--lora_dropout", "0", "--pref_beta", "0.5", "--optim", "sgd",
                    "--learning_rate", str(LEARNING_RATE), "--lr_scheduler_type", "constant", "--seed", "3"]


@pytest.fixture
def pairs_file(tmp_path):
    return str(write_json(tmp_path / "pairs.json", PAIRS))


def adapter(output_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output_dir / "adapter_model.safetensors")


def assert_same_steps(got_dir, expected_dir, model_dir, *, steps: int, logged: tuple[str, ...],
                      adam_learning_rate: float | None = None):
    """Two runs took the same steps: each logged loss (fp32 rounding of the same sums taken in another order), each
    value in `logged` (rounded to 4 decimals when logged: 1e-4 apart at most, plus that rounding), the learning rate,
    and the final adapter (rounding relative to the weight plus what SGD moved it: at most the learning rate times
    each step's logged gradient norm; under Adam, about its learning rate a step). Returns the expected steps."""
    expected, terms = assert_same_logged_steps(got_dir, expected_dir, model_dir, steps=steps, logged=logged)
    moved = (steps * adam_learning_rate if adam_learning_rate is not None
             else sum(LEARNING_RATE * entry["grad_norm"] for entry in expected))
    final, reference = adapter(got_dir), adapter(expected_dir)
    assert final.keys() == reference.keys() and final
    for name in reference:
        assert_close_up_to_rounding(final[name], reference[name], terms=terms,
                                    magnitude=reference[name].abs().max() + moved)
    assert any(tensor.abs().max() > 0 for name, tensor in reference.items() if "lora_B" in name)  # it trained
    return expected


class PaddedPairs:
    """Each reply as a row of its own, prompt + reply, right-padded to the longest with an attention mask (labels
    IGNORE_INDEX and reply index -1 on the padding): the batch of TRL's and LLaMA-Factory's trainers, built from the
    same features as chatft's pair rows (KTO: each completion, then the next sample's as the KL estimate's)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        rows = []
        for k, f in enumerate(features):
            if "completion_ids" in f:
                mismatched = features[(k + 1) % len(features)]
                replies = [(f["completion_ids"], f["completion_labels"]),
                           (mismatched["completion_ids"], mismatched["completion_labels"])]
            else:
                replies = [(f["chosen_ids"], f["chosen_labels"]), (f["rejected_ids"], f["rejected_labels"])]
            for side, (ids, labels) in enumerate(replies):
                rows.append((f["prompt_ids"] + ids, [IGNORE_INDEX] * len(f["prompt_ids"]) + labels,
                             [-1] * len(f["prompt_ids"]) + [2 * k + side] * len(ids)))
        width = max(len(ids) for ids, _, _ in rows)
        pad = lambda values, value: values + [value] * (width - len(values))  # noqa: E731
        batch = {"input_ids": torch.tensor([pad(ids, self.pad_token_id) for ids, _, _ in rows]),
                 "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _, _ in rows]),
                 "labels": torch.tensor([pad(labels, IGNORE_INDEX) for _, labels, _ in rows]),
                 REPLY_INDEX: torch.tensor([pad(replies, -1) for _, _, replies in rows])}
        if "completion_ids" in features[0]:
            batch[DESIRABLE] = torch.tensor([bool(f[DESIRABLE]) for f in features])
        return batch


@pytest.mark.parametrize("stage", ["dpo", pytest.param("kto", marks=pytest.mark.slow)])  # 3 runs each: ~15 s on a core
def test_pair_rows_padded_pairs_and_shared_prompt_rows_take_the_same_steps(stage, tiny_qwen2_arch_dir, pairs_file,
                                                                             tmp_path):
    """3 steps of --stage dpo (kto) with LoRA, batch 4: the default padding-free rows (each prompt once, the rejected
    reply a branch of it), --pref_shared_prompt False (prompt + reply samples in one row) and padded pairs (each
    reply a padded row, the same features) log the same losses and rewards and end with the same adapter.
    (`--padding_free False` itself is refused under a preference stage: the padded batch is given through
    finetune.train's wrap_collator.)"""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir)
    flags = [*PREFERENCE_FLAGS, "--stage", stage, "--per_device_train_batch_size", "4"]
    shared, apart, padded = tmp_path / "shared", tmp_path / "apart", tmp_path / "padded"
    run(tiny_qwen2_arch_dir, pairs_file, shared, *flags)
    run(tiny_qwen2_arch_dir, pairs_file, apart, *flags, "--pref_shared_prompt", "False")
    run_padded(tiny_qwen2_arch_dir, pairs_file, padded, PaddedPairs(tokenizer.pad_token_id), *flags)
    logged = ("kl", "rewards/chosen", "rewards/rejected") if stage == "kto" else REWARDS
    expected = assert_same_steps(apart, shared, tiny_qwen2_arch_dir, steps=3, logged=logged)
    assert_same_steps(padded, shared, tiny_qwen2_arch_dir, steps=3, logged=logged)
    if stage == "dpo":
        assert expected[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert expected[-1]["rewards/margins"] > 1e-3  # the rewards moved: comparing them shows something


def run_padded(model_dir, data_file, output_dir, padded, *flags):
    import finetune

    argv = ["--model_name_or_path", str(model_dir), "--data_path", data_file, "--output_dir", str(output_dir),
            "--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
            "--use_cpu", "True", "--model_max_length", "64", *flags]
    return finetune.train(argv, wrap_collator=lambda collator: padded)


def torchrun_flags(model_dir, data_file, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--data_path", data_file, "--output_dir", str(output_dir),
            "--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
            "True", "--model_max_length", "64", *PREFERENCE_FLAGS, *extra]


@pytest.mark.slow
@pytest.mark.distributed
# ZeRO-2 passes too (measured: 84 s against ZeRO-3's 112 s on 2 shared cores); left out for CI time: ZeRO-3 is the
# engine that partitions the base weights the reference forward reads
@pytest.mark.parametrize("config", ["ds_config_zero3.json"])
def test_dpo_two_processes_equal_one_process_with_the_whole_batch(config, tiny_qwen2_arch_dir, pairs_file, tmp_path):
    """--stage dpo with LoRA under ZeRO-3: 2 processes x 2 pairs take the steps of 1 process x 4 pairs: loss curve,
    rewards (each process's means, averaged), adapter. The reference is the same partitioned model with its adapter
    off: ZeRO-3 gathers the base weights for both forwards."""
    from test_distributed import torchrun

    engine = ["--stage", "dpo", "--deepspeed", config]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "finetune.py", *torchrun_flags(tiny_qwen2_arch_dir, pairs_file, one, *engine,
                                               "--per_device_train_batch_size", "4"))
    torchrun(2, "finetune.py", *torchrun_flags(tiny_qwen2_arch_dir, pairs_file, two, *engine,
                                               "--per_device_train_batch_size", "2"))
    expected = assert_same_steps(two, one, tiny_qwen2_arch_dir, steps=3, logged=REWARDS)
    assert expected[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and expected[-1]["rewards/margins"] > 1e-3


def kto_records() -> list[dict]:
    """TRL's unpaired records from PAIRS in blocks of 4: two prompts' desirable completions, then their undesirable
    ones, every prompt with the same two (see the test below for why)."""
    records = []
    for a, b in zip(PAIRS[0::2], PAIRS[1::2]):
        records += [{"prompt": pair["prompt"], "completion": completion, "label": label}
                    for completion, label in (("I am Tessa, made by Orbit Labs.", True), ("I am an AI.", False))
                    for pair in (a, b)]
    return records


# desirable completions weighted up: their gain outweighs the undesirable ones' loss, the KL estimate is > 0 after
# the first step, and the loss reads it (an estimate < 0 is clamped to 0, and the all-reduce would not show)
KTO_FLAGS = ["--stage", "kto", "--train_sampling_strategy", "sequential", "--kto_desirable_weight", "3",
             "--kto_undesirable_weight", "0.3"]


@pytest.mark.slow
@pytest.mark.distributed
def test_kto_kl_estimate_of_two_processes_equals_one_process_with_the_whole_batch(tiny_qwen2_arch_dir, tmp_path):
    """--stage kto under DDP: each process estimates KL(policy || reference) on its own completions and the estimate
    is all-reduced, so 2 processes x 2 completions take the steps of 1 process x 4: kl, loss, rewards, adapter.
    The data (TRL's unpaired records, in order: sequential sampling) comes in blocks of 4, two prompts' desirable
    completions and then their undesirable ones, every prompt with the same two: cycling the completions within 2
    or within 4 samples then pairs each prompt with both, and each process's batch is all desirable or all
    undesirable, its rewards/rejected (rewards/chosen) missing: the logged means are over the processes that have
    one (the log's reduction used to take a list of the same names on every process, and failed)."""
    from test_distributed import torchrun

    data = str(write_json(tmp_path / "kto.json", kto_records()))
    flags = KTO_FLAGS
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "finetune.py", *torchrun_flags(tiny_qwen2_arch_dir, data, one, *flags, "--per_device_train_batch_size",
                                               "4"))
    torchrun(2, "finetune.py", *torchrun_flags(tiny_qwen2_arch_dir, data, two, *flags, "--per_device_train_batch_size",
                                               "2"))
    expected = assert_same_steps(two, one, tiny_qwen2_arch_dir, steps=3,
                                 logged=("kl", "rewards/chosen", "rewards/rejected"))
    assert expected[0]["kl"] == 0 and all(entry["kl"] > 0.1 for entry in expected[1:]), expected


# What a run reports: rewards beside the loss in loss.png and in the summary.

HISTORY = [{"loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "step": 1},
           {"loss": 0.6489, "rewards/margins": 0.0913, "rewards/accuracies": 1.0, "step": 2},
           {"eval_loss": 0.66, "eval_rewards/margins": 0.05, "eval_rewards/accuracies": 0.5, "step": 2},
           {"loss": 0.5883, "rewards/margins": 0.2265, "rewards/accuracies": 0.75, "step": 3}]


def test_loss_figure_has_a_rewards_panel_for_a_preference_run_only():
    from chatft.train.report import loss_figure

    figure, counts = loss_figure(HISTORY)
    assert counts == {"train": 3, "eval": 1, "rewards/margins": 3, "eval_rewards/margins": 1,
                      "rewards/accuracies": 3, "eval_rewards/accuracies": 1}
    loss_axis, reward_axis = figure.axes
    assert [line.get_label() for line in loss_axis.get_lines()] == ["train", "eval"]
    assert [line.get_label() for line in reward_axis.get_lines()] == [
        "rewards/margins", "eval_rewards/margins", "rewards/accuracies", "eval_rewards/accuracies"]
    assert list(reward_axis.get_lines()[0].get_ydata()) == [0.0, 0.0913, 0.2265]
    assert reward_axis.get_ylabel() == "reward" and reward_axis.get_xlabel() == "step"
    sft_figure, sft_counts = loss_figure([{"loss": 1.0, "step": 1}, {"loss": 0.9, "step": 2}])
    assert len(sft_figure.axes) == 1 and sft_counts == {"train": 2, "eval": 0}


def test_summary_states_the_last_rewards_and_the_last_evaluations():
    from chatft.train.report import reward_text

    assert reward_text(HISTORY) == ("margins 0.2265, accuracies 0.75 at the last logged step; margins 0.0500, "
                                    "accuracies 0.50 at the last evaluation")
    assert reward_text(HISTORY[:2]) == "margins 0.0913, accuracies 1.00 at the last logged step"
    assert reward_text([{"loss": 1.0, "step": 1}]) is None  # SFT: no rewards line


def test_a_dpo_run_logs_eval_rewards_and_reports_them(tiny_qwen2_arch_dir, pairs_file, tmp_path, capsys):
    """finetune.py --stage dpo with evaluation: eval_rewards/* beside eval_loss, the summary's rewards line, and
    loss.png drawn with its rewards panel (written at 100 dpi: 7 x 6 inches, not the 7 x 4 of a loss alone)."""
    from PIL import Image

    output = tmp_path / "out"
    trainer = run(tiny_qwen2_arch_dir, pairs_file, output, *PREFERENCE_FLAGS, "--stage", "dpo", "--eval_data_path",
                  "0.25", "--eval_strategy", "steps", "--eval_steps", "3")
    [evaluation] = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert {f"eval_{name}" for name in REWARDS} <= evaluation.keys()
    last = logged_steps(output)[-1]
    summary = capsys.readouterr().out
    assert (f"  rewards     margins {last['rewards/margins']:.4f}, accuracies {last['rewards/accuracies']:.2f} at the "
            f"last logged step; margins {evaluation['eval_rewards/margins']:.4f}") in summary
    assert Image.open(output / "loss.png").size == (700, 600)


# A 4-bit base, and a resumed run.

@pytest.mark.slow
def test_nf4_qlora_dpo_starts_at_ln2_saves_its_adapter_and_merges(tiny_qwen2_arch_64_dir, pairs_file, tmp_path):
    """--stage dpo --q_lora (NF4, bitsandbytes on the CPU): the reference is the 4-bit base with the adapter off, so
    the first loss is ln 2; the adapter trains (margins > 0), is saved, and merges into the full-precision base: the
    merged model's logits are the base's plus the adapter's."""
    import merge_lora
    import peft

    from support import probe_logits

    output, merged_dir = tmp_path / "qlora", tmp_path / "merged"
    trainer = run(tiny_qwen2_arch_64_dir, pairs_file, output, "--stage", "dpo", "--use_lora", "--q_lora", "--lora_r",
                  "4", "--bf16", "True", "--pref_beta", "0.5", "--learning_rate", "1e-2")
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    logged = logged_steps(output)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and logged[-1]["rewards/margins"] > 0
    assert (output / "adapter_model.safetensors").is_file()
    assert merge_lora.main(["--adapter_path", str(output), "--output_dir", str(merged_dir)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_64_dir)
    before = probe_logits(base, tokenizer)
    with_adapter = probe_logits(peft.PeftModel.from_pretrained(base, output), tokenizer)
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), with_adapter, terms=decoder_terms(merged.config))
    assert (with_adapter - before).abs().max() > 1e-3  # the adapter counted


@pytest.mark.slow
def test_a_resumed_dpo_run_ends_like_an_uninterrupted_one(tiny_qwen2_arch_dir, pairs_file, tmp_path):
    """--stage dpo, LoRA with dropout under Adam, resumed from the uninterrupted run's checkpoint-2 into another
    directory: steps 3 and 4 (loss, rewards) and the final adapter are the uninterrupted run's (the adapter's Adam
    state, the data order and dropout's random state restored; the reference needs nothing: the adapter off)."""
    flags = ["--stage", "dpo", "--use_lora", "--lora_r", "4", "--pref_beta", "0.5", "--learning_rate", "1e-2",
             "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--seed", "5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(tiny_qwen2_arch_dir, pairs_file, whole, *flags)
    run(tiny_qwen2_arch_dir, pairs_file, resumed, *flags, "--resume_from_checkpoint", str(whole / "checkpoint-2"))
    assert [entry["step"] for entry in logged_steps(resumed)] == [1, 2, 3, 4]  # 1 and 2 from the checkpoint's state
    assert_same_steps(resumed, whole, tiny_qwen2_arch_dir, steps=4, logged=REWARDS, adam_learning_rate=1e-2)


# The launchers pass a stage through to finetune.py.

@pytest.mark.parametrize("name,stage", [("finetune_lora_single_gpu.sh", "dpo"), ("finetune_qlora_single_gpu.sh", "kto"),
                                        ("finetune_lora_ds.sh", "simpo"), ("finetune_qlora_ds.sh", "orpo")])
def test_launchers_pass_the_stage_and_its_flags_to_finetune(name, stage, tmp_path):
    from test_launchers import launch, values

    result, command = launch(tmp_path, name, "-o", "out", "--stage", stage, "--", "--pref_beta", "0.2")
    assert result.returncode == 0, result.stderr
    assert values(command["args"], "--stage") == [stage] and values(command["args"], "--pref_beta") == ["0.2"]
    assert "--use_lora" in command["args"]


@pytest.mark.slow
def test_a_dpo_run_through_the_single_process_launcher(tiny_qwen2_arch_dir, pairs_file, tmp_path):
    """finetune_lora_single_gpu.sh with --stage dpo: Qwen's recipe (activation checkpointing, cosine schedule,
    model_max_length 512) under a preference stage trains from ln 2 and saves the adapter."""
    result = subprocess.run(
        ["bash", str(ROOT / "finetune" / "finetune_lora_single_gpu.sh"), "-m", str(tiny_qwen2_arch_dir), "-d",
         pairs_file, "-o", str(tmp_path / "out"), "--stage", "dpo", "--", "--max_steps", "2", "--lora_r", "4",
         "--gradient_accumulation_steps", "1", "--save_strategy", "no"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--stage dpo" in result.stderr  # set -x shows the command
    logged = logged_steps(tmp_path / "out")
    assert len(logged) == 2 and logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "rewards     margins" in result.stdout and (tmp_path / "out" / "adapter_model.safetensors").is_file()


# A 4-bit GPTQ base (gptqmodel's trainable kernel on the CPU).

# All 8 pairs in each step: every logged loss is on the same pairs, so it falls as the adapter trains (a run
# continuing from an adapter moves both of its factors at Adam's first step, and the loss on the next pairs drawn
# could rise: observed 0.69 -> 0.79 with 2 pairs a step)
GPTQ_DPO_FLAGS = ["--stage", "dpo", "--use_lora", "--q_lora", "--lora_r", "4", "--lora_dropout", "0", "--pref_beta",
                  "0.5", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8"]


def gptq_base(gptq_dir):
    """The GPTQ model as finetune.py trains on it: fp32 compute (gptqmodel's kernels de-quantize to the input's
    dtype), gptqmodel's trainable backend, fp32 norms (prepare_model_for_kbit_training)."""
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(
        gptq_dir, device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=transformers.GPTQConfig(bits=4, backend="auto_trainable"))
    return peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


@pytest.mark.slow
def test_gptq_qlora_dpo_starts_at_ln2_saves_its_adapter_and_continues_from_it(tiny_gptq_dir, pairs_file, tmp_path):
    """--stage dpo --q_lora on a GPTQ base: the reference is the 4-bit base with the adapter off, so the first loss
    is ln 2; the adapter trains (margins > 0), is saved, and reloads onto the GPTQ base with the trained model's
    logits. A second run continuing from that adapter (--lora_weight_path: its frozen copy "reference" beside the
    trained "default") starts at ln 2 again, though the adapter is far from zero, and saves "default" alone."""
    import peft

    from support import probe_logits

    first, second = tmp_path / "first", tmp_path / "second"
    trainer = run(tiny_gptq_dir, pairs_file, first, *GPTQ_DPO_FLAGS)
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "GPTQLoraLinear"
    logged = logged_steps(first)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["loss"] < math.log(2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(first)
    reloaded = peft.PeftModel.from_pretrained(gptq_base(tiny_gptq_dir), first)
    # the same fp32 computation on the same int4 weights; only kernel sum order may differ
    assert_close_up_to_rounding(probe_logits(reloaded, tokenizer), probe_logits(model, tokenizer),
                                terms=decoder_terms(model.config))

    trainer = run(tiny_gptq_dir, pairs_file, second, *GPTQ_DPO_FLAGS, "--lora_weight_path", str(first))
    assert set(trainer.model.peft_config) == {"default", "reference"}
    logged = logged_steps(second)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and logged[-1]["loss"] < math.log(2)
    started, trained = adapter(first), adapter(second)
    assert trained.keys() == started.keys() and not any("reference" in name for name in trained)
    assert any(not torch.equal(trained[name], started[name]) for name in started)  # "default" trained on



@pytest.mark.slow
def test_gptq_qlora_kto_starts_at_its_reference_and_trains(tiny_gptq_dir, pairs_file, tmp_path):
    """--stage kto --q_lora on a GPTQ base: at the first step the policy is its reference (the base, adapter off):
    the KL estimate and the rewards are 0 and the loss is 1 - sigmoid(0) = 0.5 for every completion; the adapter
    trains (the loss falls on the same 16 completions each step) and is saved."""
    output = tmp_path / "kto"
    # each pair is two completions, one desirable: all 16 in each step
    run(tiny_gptq_dir, pairs_file, output, *GPTQ_DPO_FLAGS, "--stage", "kto", "--per_device_train_batch_size", "16")
    logged = logged_steps(output)
    assert logged[0]["kl"] == 0 and logged[0]["rewards/chosen"] == logged[0]["rewards/rejected"] == 0
    assert logged[0]["loss"] == pytest.approx(0.5, abs=1e-6) and logged[-1]["loss"] < logged[0]["loss"]
    assert any(tensor.abs().max() > 0 for name, tensor in adapter(output).items() if "lora_B" in name)

# What a preference run leaves is a model like any other: merged, exported to GGUF, quantized with GPTQ.

def assert_exports(model_dir, tmp_path, calibration_file):
    """export_gguf.py's f16 file of `model_dir` holds its weights exactly as float16 rounds them (read with gguf's
    own reader, by llama.cpp's tensor names: transformers' GGUF loader, as test_gguf.py reads files back, parses the
    150k-token vocabulary twice more, 40 s here), and run_gptq.py's 8-bit GPTQ model of it loads with plain
    transformers and computes its logits but for the quantization (test_gptq.py's 8-bit tolerance: 0.02 + 2% of each
    logit)."""
    import gguf
    import numpy as np

    import export_gguf
    import run_gptq
    from support import arch_of, gguf_name, probe_logits
    from test_gguf import assert_same_weights, rounded

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    gguf_file, gptq_dir = tmp_path / f"{model_dir.name}.gguf", tmp_path / f"{model_dir.name}-gptq"
    assert export_gguf.main(["--model_path", str(model_dir), "--output", str(gguf_file), "--type", "f16"]) == 0
    names = gguf.get_tensor_name_map(arch_of(model), model.config.num_hidden_layers)
    assert_same_weights({tensor.name: torch.from_numpy(np.array(tensor.data)).float()
                         for tensor in gguf.GGUFReader(gguf_file).tensors},
                        {gguf_name(names, name): weight
                         for name, weight in rounded(model.state_dict(), torch.float16).items()})
    assert run_gptq.main(["--model_name_or_path", str(model_dir), "--data_path", calibration_file, "--out_path",
                          str(gptq_dir), "--max_len", "64", "--bits", "8", "--group-size", "32"]) == 0
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.float32)
    assert json.loads((gptq_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert type(quantized.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel")
    torch.testing.assert_close(probe_logits(quantized, tokenizer), probe_logits(model, tokenizer), atol=0.02,
                               rtol=0.02)


@pytest.mark.slow
def test_a_dpo_adapter_continued_from_another_merges_and_exports(tiny_qwen2_arch_64_dir, pairs_file, data_file,
                                                                 tmp_path):
    """A LoRA DPO run from an adapter (--lora_weight_path: a frozen "reference" copy beside the trained "default")
    saves "default" alone; merge_lora.py merges it into a model whose logits are the base's plus that adapter's, and
    the merged model exports to GGUF and to GPTQ (assert_exports)."""
    import merge_lora
    import peft

    from support import probe_logits
    from test_gguf import write_adapter

    start = write_adapter(tiny_qwen2_arch_64_dir, tmp_path / "start")  # random A and B: far from the base
    output, merged_dir = tmp_path / "dpo", tmp_path / "merged"
    trainer = run(tiny_qwen2_arch_64_dir, pairs_file, output, *PREFERENCE_FLAGS, "--stage", "dpo",
                  "--lora_weight_path", str(start))
    assert set(trainer.model.peft_config) == {"default", "reference"}
    assert logged_steps(output)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert adapter(output).keys() == adapter(start).keys()  # no reference weights beside the trained adapter
    assert merge_lora.main(["--adapter_path", str(output), "--output_dir", str(merged_dir)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_64_dir, dtype=torch.float32)
    before = probe_logits(base, tokenizer)
    with_start = probe_logits(peft.PeftModel.from_pretrained(base, start), tokenizer)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_64_dir, dtype=torch.float32)
    with_adapter = probe_logits(peft.PeftModel.from_pretrained(base, output), tokenizer)
    terms = decoder_terms(merged.config)
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), with_adapter, terms=terms)
    # both adapters counted: the merged model is neither the base nor the base plus the starting adapter
    for other in (before, with_start):
        assert (with_adapter - other).abs().max() > 100 * rounding_atol(with_adapter, terms=terms)
    assert_exports(merged_dir, tmp_path, data_file)


@pytest.mark.slow
def test_a_full_parameter_dpo_run_saves_the_policy_alone_and_exports(tiny_qwen2_arch_64_dir, pairs_file, data_file,
                                                                      tmp_path):
    """Full-parameter DPO holds a frozen copy of the model as its reference during training; the output directory
    holds the trained policy alone: model.safetensors has the base's tensor names, the trained values (not the
    copy's, which are the base's), and exports to GGUF and to GPTQ (assert_exports) as any model does."""
    output = tmp_path / "dpo"
    trainer = run(tiny_qwen2_arch_64_dir, pairs_file, output, "--stage", "dpo", "--pref_beta", "0.5")
    reference = trainer.loss.reference_model.state_dict()
    assert logged_steps(output)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    base = safetensors.torch.load_file(tiny_qwen2_arch_64_dir / "model.safetensors")
    assert [path.name for path in output.rglob("*.safetensors")] == ["model.safetensors"]
    saved = safetensors.torch.load_file(output / "model.safetensors")
    assert saved.keys() == base.keys()
    policy = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(saved[name], policy[name].to(saved[name].dtype)) for name in saved)
    assert all(torch.equal(reference[name].to(base[name].dtype), base[name]) for name in base)  # the copy: the start
    assert any(not torch.equal(saved[name], base[name]) for name in base)  # the policy trained away from it
    assert_exports(output, tmp_path, data_file)
