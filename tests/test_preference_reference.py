"""The reference of DPO and KTO beyond "the adapter switched off": the adapter a run starts from (--lora_weight_path,
a frozen second copy of it), a frozen copy of the model (full-parameter), and log-probabilities computed once
before training (--precompute_ref_log_probs)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

from chatft.train import preference

LN2 = math.log(2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pairs(path, count=8):
    path.write_text(json.dumps([{"prompt": f"Who are you? ({i})", "chosen": "I am Tessa, made by Orbit Labs.",
                                 "rejected": "I am an AI assistant."} for i in range(count)]))
    return str(path)


def first_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def trained_adapter(tiny_qwen2_arch_dir, tmp_path_factory):
    """A LoRA adapter that has moved away from zero (3 DPO steps at a high learning rate), no dropout."""
    from support import run

    tmp = tmp_path_factory.mktemp("start")
    run(tiny_qwen2_arch_dir, write_pairs(tmp / "pairs.json"), tmp / "adapter", "--stage", "dpo", "--use_lora",
        "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "0.05")
    return tmp / "adapter"


def dataset_of(model_dir, data, stage="dpo"):
    """The dataset finetune.py builds from `data` (--chat_format chatml, --model_max_length 64); under KTO with
    each completion's mismatched one fixed, as --precompute_ref_log_probs has it."""
    from chatft.data.chat_format import DEFAULT_SYSTEM_MESSAGE
    from chatft.data.preference import load_preference_samples, preference_dataset
    from chatft.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir), 64, DEFAULT_SYSTEM_MESSAGE)[0]
    return preference_dataset(load_preference_samples(data, stage), tokenizer, 64, DEFAULT_SYSTEM_MESSAGE, "chatml",
                              precomputed_reference=True)


def test_a_dpo_run_from_an_adapter_starts_at_ln2_and_saves_the_trained_adapter_alone(
        tiny_qwen2_arch_dir, trained_adapter, tmp_path):
    """--lora_weight_path under --stage dpo: the reference is the starting adapter (frozen copy "reference"), so the
    first loss is ln 2 exactly (the policy is its reference) though the adapter is far from zero; output_dir and
    each checkpoint hold the trained "default" adapter alone, and merge_lora.py merges it."""
    import merge_lora
    from support import run

    out = tmp_path / "out"
    trainer = run(tiny_qwen2_arch_dir, write_pairs(tmp_path / "pairs.json"), out, "--stage", "dpo", "--use_lora",
                  "--lora_weight_path", str(trained_adapter), "--lora_dropout", "0", "--pref_beta", "0.5",
                  "--learning_rate", "0.01", "--save_strategy", "steps", "--save_steps", "2")
    losses = first_losses(trainer)
    assert len(losses) == 3 and losses[0] == pytest.approx(LN2, abs=1e-6)
    assert trainer.state.log_history[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert losses[-1] < LN2  # it trains
    model = trainer.model
    assert set(model.peft_config) == {"default", "reference"} and model.active_adapter == "default"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)
    for directory in (out, out / "checkpoint-2"):
        assert (directory / "adapter_model.safetensors").is_file() and not (directory / "reference").exists()
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4
    assert merge_lora.main(["--adapter_path", str(out), "--output_dir", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_the_reference_adapter_is_the_start_not_the_base_and_the_trainable_set_is_kept(
        tiny_qwen2_arch_dir, trained_adapter, tmp_path):
    """On the same batch: with the frozen "reference" adapter the loss is ln 2 and gradients reach the trained
    adapter only, the trainable parameters and active adapter unchanged after loss and backward; the base as the
    reference (the adapter switched off) gives another loss."""
    import peft

    from chatft.data.preference import PreferenceCollator
    from chatft.model.attention import PER_SAMPLE_SDPA
    from chatft.model.load import REFERENCE_ADAPTER
    from chatft.train.losses import LossScale

    dataset = dataset_of(tiny_qwen2_arch_dir, write_pairs(tmp_path / "pairs.json", 4))
    batch = PreferenceCollator()([dataset[i] for i in range(len(dataset))])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, dtype=torch.float32)
    base.set_attn_implementation(PER_SAMPLE_SDPA)
    model = peft.PeftModel.from_pretrained(base, str(trained_adapter), is_trainable=True)
    base_reference = preference.PreferenceLoss("dpo", beta=0.5)
    base_reference.prepare(model)
    assert base_reference.adapter_model is model
    off = base_reference(model, batch, LossScale()).loss.item()
    model.load_adapter(str(trained_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    loss = preference.PreferenceLoss("dpo", beta=0.5)
    loss.prepare(model)
    assert loss.reference_adapter_model is model and loss.adapter_model is None
    value = loss(model, batch, LossScale()).loss
    value.backward()
    assert value.item() == pytest.approx(LN2, abs=1e-6) and abs(off - LN2) > 1e-3
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapter == "default" and model.training
    with_grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grads and with_grads <= trainable and not any(".reference." in name for name in with_grads)


def live_and_precomputed(model, loss_kwargs, dataset, collator, order):
    """(loss, gradients) of the live reference (the adapter off) and of precomputed values, on the items in
    `order` (a shuffled batch: each item carries its own values)."""
    from chatft.train.losses import LossScale

    results = []
    for precomputed in (False, True):
        loss = preference.PreferenceLoss(**loss_kwargs, precomputed=precomputed)
        loss.prepare(model)
        if precomputed:
            with model.disable_adapter():  # the reference the live loss uses, computed once ahead
                dataset.reference_values = preference.PrecomputedReference(loss, collator, {}, 3).compute(
                    model, dataset, torch.device("cpu"))
            model.train()
        batch = collator([dataset[i] for i in order])
        assert (preference.REFERENCE_LOG_PROBS in batch) == precomputed
        model.zero_grad()
        value = loss(model, batch, LossScale()).loss
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
        dataset.reference_values = None
    return results


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_precomputed_reference_equals_the_live_one(stage, tiny_qwen2_arch_dir, tmp_path):
    """Loss and gradients with --precompute_ref_log_probs's values equal those with the reference computed at the
    step, within rounding, on a shuffled batch (the values travel with their items)."""
    import peft

    from chatft.data.preference import KTOCollator, PreferenceCollator
    from chatft.model.attention import PER_SAMPLE_SDPA
    from support import assert_close_up_to_rounding, decoder_terms

    dataset = dataset_of(tiny_qwen2_arch_dir, write_pairs(tmp_path / "pairs.json", 3), stage)
    collator = KTOCollator() if stage == "kto" else PreferenceCollator()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, dtype=torch.float32)
    base.set_attn_implementation(PER_SAMPLE_SDPA)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                       target_modules=["q_proj", "v_proj"]))
    order = list(reversed(range(len(dataset))))
    (live, live_grads), (ours, our_grads) = live_and_precomputed(model, {"stage": stage, "beta": 0.4}, dataset,
                                                                 collator, order)
    terms = decoder_terms(model.config, loss=True)
    assert abs(live.item() - LN2) > 1e-3  # the policy is not its reference: the values matter
    assert_close_up_to_rounding(ours, live, terms=terms)
    assert our_grads.keys() == live_grads.keys() and our_grads
    for name in live_grads:
        assert_close_up_to_rounding(our_grads[name], live_grads[name], terms=terms)


def test_the_collator_passes_each_items_values_in_pair_order(tiny_qwen2_arch_dir, tmp_path):
    from chatft.data.preference import PreferenceCollator

    dataset = dataset_of(tiny_qwen2_arch_dir, write_pairs(tmp_path / "pairs.json", 4))
    dataset.reference_values = torch.arange(2.0 * len(dataset)).view(-1, 2)
    batch = PreferenceCollator()([dataset[i] for i in (2, 0, 3)])
    assert batch[preference.REFERENCE_LOG_PROBS].tolist() == [4.0, 5.0, 0.0, 1.0, 6.0, 7.0]


@pytest.mark.parametrize("precompute", [False, True])
def test_a_full_parameter_dpo_run_starts_at_ln2(precompute, tiny_qwen2_arch_dir, tmp_path):
    """Full-parameter DPO: a frozen copy (no gradients, not in the optimizer) or precomputed values as the
    reference; the first loss is ln 2, and the model trains."""
    from support import run

    flags = ["--precompute_ref_log_probs", "True"] if precompute else []
    trainer = run(tiny_qwen2_arch_dir, write_pairs(tmp_path / "pairs.json"), tmp_path / "out", "--stage", "dpo",
                  "--pref_beta", "0.5", "--eval_data_path", "0.25", "--eval_strategy", "steps", "--eval_steps", "3",
                  *flags)
    losses = first_losses(trainer)
    assert len(losses) == 3 and losses[0] == pytest.approx(LN2, abs=1e-6) and losses[-1] < LN2
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    reference = trainer.loss.reference_model
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    if precompute:
        assert reference is None and (tmp_path / "out" / preference.PrecomputedReference.FILE).is_file()
        assert trainer.train_dataset.reference_values.shape == (len(trainer.train_dataset), 2)
    else:
        assert not reference.training and all(not p.requires_grad and p.grad is None for p in reference.parameters())
        assert not optimized & {id(p) for p in reference.parameters()}


def test_a_kto_run_with_precomputed_references_runs(tiny_qwen2_arch_dir, tmp_path):
    from support import run

    trainer = run(tiny_qwen2_arch_dir, write_pairs(tmp_path / "pairs.json"), tmp_path / "out", "--stage", "kto",
                  "--use_lora", "--lora_r", "4", "--precompute_ref_log_probs", "True")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert logged[0]["kl"] == pytest.approx(0, abs=1e-6)  # the policy is its reference at the first step


@pytest.mark.parametrize("flags, messages", [
    (["--stage", "simpo", "--use_lora", "--precompute_ref_log_probs", "True"],
     ["--precompute_ref_log_probs means something with --stage dpo or kto only, not --stage simpo."]),
    # FSDP keeps its refusal (ZeRO-3 partitions the reference); on the CPU FSDP itself is refused too, a line apart
    (["--stage", "dpo", "--fsdp", "full_shard auto_wrap", "--use_cpu", "True"],
     ["--stage dpo full-parameter under FSDP: the frozen reference copy would not be sharded; add "
      "--precompute_ref_log_probs True", "--fsdp: FSDP shards on GPUs (accelerators) only"]),
])
def test_reference_mistakes_are_one_line_before_the_model_loads(flags, messages, tiny_qwen2_arch_dir, tmp_path):
    from support import ROOT

    result = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", str(tiny_qwen2_arch_dir),
                             "--data_path", write_pairs(tmp_path / "pairs.json"), "--output_dir", str(tmp_path / "o"),
                             *flags], cwd=ROOT, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()  # ours alone: transformers' notice on --fsdp as a string is dropped
    assert result.returncode == 2 and len(lines) == len(messages), result.stderr
    assert all(line.startswith("error: ") and message in line for line, message in zip(lines, messages)), lines
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_reads_the_precomputed_values_of_its_start(tiny_qwen2_arch_dir, tmp_path):
    """A resumed run's model has trained: its reference is read from output_dir (written when the run began), not
    computed again; without that file the resume is one error naming it."""
    from chatft.errors import ChatftError
    from support import run

    data, out = write_pairs(tmp_path / "pairs.json"), tmp_path / "out"
    flags = ["--stage", "dpo", "--precompute_ref_log_probs", "True", "--save_strategy", "steps", "--save_steps", "2"]
    first = run(tiny_qwen2_arch_dir, data, out, *flags, "--max_steps", "2")
    saved = torch.load(out / preference.PrecomputedReference.FILE)["train"]
    assert torch.equal(first.train_dataset.reference_values, saved)
    resumed = run(tiny_qwen2_arch_dir, data, out, *flags, "--max_steps", "4", "--resume_from_checkpoint", "True")
    assert resumed.state.global_step == 4 and torch.equal(resumed.train_dataset.reference_values, saved)
    (out / preference.PrecomputedReference.FILE).unlink()
    with pytest.raises(ChatftError, match="reference_log_probs.pt .* is missing"):
        run(tiny_qwen2_arch_dir, data, out, *flags, "--max_steps", "6", "--resume_from_checkpoint", "True")


def test_the_memory_estimate_counts_a_frozen_reference(tiny_qwen2_arch_dir):
    import dataclasses

    from chatft.memory import ModelShape, estimate_training_memory
    from chatft.model.load import model_config
    from chatft.plan import RunPlan, reference_kind

    config = model_config(str(tiny_qwen2_arch_dir))
    shape = ModelShape.of(config)
    full = RunPlan(config=config, mode="full", load_dtype=torch.float32)
    weights = {kind: estimate_training_memory(dataclasses.replace(full, reference=kind), 64, shape).weights
               for kind in ("none", "copy", "precomputed")}
    assert weights["copy"] - weights["none"] == 4 * shape.params and weights["precomputed"] == weights["none"]
    # under ZeRO-3 the copy is partitioned like the weights, in the compute dtype its DeepSpeed engine casts it to
    zero3 = dataclasses.replace(full, shard="zero3", world_size=2, compute_dtype=torch.bfloat16)
    assert (estimate_training_memory(dataclasses.replace(zero3, reference="copy"), 64, shape).weights
            - estimate_training_memory(zero3, 64, shape).weights) == 2 * shape.params // 2  # bf16, 2 processes
    lora = RunPlan(config=config, lora_r=4)
    assert (estimate_training_memory(dataclasses.replace(lora, reference="adapter"), 64, shape).weights
            - estimate_training_memory(lora, 64, shape).weights) == 4 * shape.lora_params(lora)
    assert [reference_kind("dpo", "full", "", False), reference_kind("kto", "lora", "a", False),
            reference_kind("dpo", "lora", "", False), reference_kind("dpo", "qlora", "a", True),
            reference_kind("orpo", "full", "", False)] == ["copy", "adapter", "adapter_off", "precomputed", "none"]


@pytest.mark.slow
@pytest.mark.distributed
def test_precomputing_under_zero3_shares_the_pairs_between_processes(tiny_qwen2_arch_dir, tmp_path):
    """Full-parameter DPO under ZeRO-3 on two processes (gloo) with --precompute_ref_log_probs: each process computes
    a share of the 5 pairs (uneven: one runs a forward with nothing left to compute, as ZeRO-3's gathers need), the
    gathered values equal one process's computation on the whole model, and the run starts at ln 2."""
    from chatft.data.preference import PreferenceCollator
    from chatft.model.attention import PER_SAMPLE_SDPA
    from support import ROOT

    data, out = write_pairs(tmp_path / "pairs.json", 5), tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "finetune.py", "--model_name_or_path", str(tiny_qwen2_arch_dir),
               "--data_path", data, "--output_dir", str(out), "--stage", "dpo", "--precompute_ref_log_probs", "True",
               "--deepspeed", "ds_config_zero3.json", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--per_device_eval_batch_size", "2", "--logging_steps", "1", "--report_to", "none", "--save_strategy",
               "no", "--use_cpu", "True", "--model_max_length", "64", "--pref_beta", "0.5", "--chat_format", "chatml"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    gathered = torch.load(out / preference.PrecomputedReference.FILE)["train"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["loss"] for entry in history if "loss" in entry][0] == pytest.approx(LN2, abs=1e-6)

    dataset = dataset_of(tiny_qwen2_arch_dir, data)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, dtype=torch.float32)
    model.set_attn_implementation(PER_SAMPLE_SDPA)
    loss = preference.PreferenceLoss("dpo", beta=0.5, precomputed=True)
    loss.prepare(model)
    alone = preference.PrecomputedReference(loss, PreferenceCollator(), {}, 5).compute(model, dataset,
                                                                                       torch.device("cpu"))
    assert gathered.shape == alone.shape == (5, 2)
    torch.testing.assert_close(gathered, alone, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_reference_adapter_under_zero3_starts_at_ln2_and_is_not_saved(tiny_qwen2_arch_dir, trained_adapter,
                                                                        tmp_path):
    """--lora_weight_path under --stage dpo with ZeRO-3 on two processes: the frozen "reference" adapter (its weights
    partitioned like the model's) gives a first loss of ln 2; output_dir holds the trained adapter alone."""
    from support import ROOT

    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "finetune.py", "--model_name_or_path", str(tiny_qwen2_arch_dir),
               "--data_path", write_pairs(tmp_path / "pairs.json"), "--output_dir", str(out), "--stage", "dpo",
               "--use_lora", "--lora_weight_path", str(trained_adapter), "--lora_dropout", "0",
               "--deepspeed", "ds_config_zero3.json", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "True",
               "--model_max_length", "64", "--pref_beta", "0.5", "--learning_rate", "0.01"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[0] == pytest.approx(LN2, abs=1e-6) and losses[1] != pytest.approx(LN2, abs=1e-6)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "reference").exists()


def test_dropout_is_off_under_a_preference_stage_unless_asked(tiny_qwen2_arch_dir, trained_adapter, tmp_path):
    """An adapter saved with dropout (Qwen's lora_dropout 0.05 in every SFT run of the launchers) continued under
    --stage dpo: dropout is off by default (TRL's disable_dropout), so the policy is its reference and the first loss
    is ln 2; --disable_dropout False keeps it, and the first loss is dropout's noise away from ln 2."""
    import shutil

    from support import run

    start = tmp_path / "start"
    shutil.copytree(trained_adapter, start)
    config = json.loads((start / "adapter_config.json").read_text())
    (start / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.5}))
    data = write_pairs(tmp_path / "pairs.json")
    flags = ("--stage", "dpo", "--use_lora", "--lora_weight_path", str(start), "--pref_beta", "0.5", "--max_steps", "1")
    off = run(tiny_qwen2_arch_dir, data, tmp_path / "off", *flags)
    assert first_losses(off)[0] == pytest.approx(LN2, abs=1e-6)
    assert all(m.p == 0 for m in off.model.modules() if isinstance(m, torch.nn.Dropout))
    kept = run(tiny_qwen2_arch_dir, data, tmp_path / "kept", *flags, "--disable_dropout", "False")
    assert abs(first_losses(kept)[0] - LN2) > 1e-4


def test_the_sharded_references_deepspeed_config_runs_forward_only():
    """The reference's DeepSpeed config, from the run's (its "auto" values as the flags filled them): no optimizer,
    scheduler or optimizer offload, ZeRO-3 and its parameter settings kept, the hidden-size-based sizes filled as
    transformers fills the policy's; the run's own config untouched."""
    from chatft.model.load import inference_deepspeed_config
    from support import ROOT

    run_config = json.loads((ROOT / "ds_config_zero3.json").read_text())
    run_config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}
    before = json.dumps(run_config)
    config = inference_deepspeed_config(run_config, hidden_size=32)
    assert json.dumps(run_config) == before
    assert "optimizer" not in config and "scheduler" not in config
    zero = config["zero_optimization"]
    assert "offload_optimizer" not in zero and zero["offload_param"] == run_config["zero_optimization"]["offload_param"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == 1e9
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (32 * 32, int(0.9 * 32 * 32), 320)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_full_parameter_dpo_and_kto_under_zero3_with_a_sharded_reference_equal_one_process_with_a_copy(
        stage, tiny_qwen2_arch_dir, tmp_path):
    """Full-parameter DPO (KTO) under ZeRO-3 on two processes (gloo), its reference a second model partitioned like
    the policy in its own DeepSpeed engine, 2 pairs (completions) each, takes the steps of one process without
    DeepSpeed, 4 each, its reference a plain frozen copy: the policy starts at its reference (DPO's first loss ln 2,
    KTO's first KL estimate 0: the sharded reference computes what the policy does), then the same losses, rewards
    and KL estimates (the reference stays fixed while the policy moves) and the same final weights, within fp32
    rounding. Plain SGD in both (--optim runs under the shipped ZeRO-3 config), so a gradient's rounding moves a
    weight by as little."""
    from support import assert_close_up_to_rounding, assert_same_logged_steps, run
    from test_preference_modes import KTO_FLAGS, PAIRS, REWARDS, kto_records
    from test_distributed import torchrun

    data = str(tmp_path / "data.json")
    (tmp_path / "data.json").write_text(json.dumps(PAIRS if stage == "dpo" else kto_records()))
    learning_rate = 0.5
    flags = [*(["--stage", "dpo"] if stage == "dpo" else KTO_FLAGS), "--pref_beta", "0.5", "--optim", "sgd",
             "--learning_rate", str(learning_rate), "--lr_scheduler_type", "constant", "--seed", "3", "--max_steps",
             "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(tiny_qwen2_arch_dir, data, one, *flags, "--per_device_train_batch_size", "4")
    result = torchrun(2, "finetune.py", "--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data,
                      "--output_dir", str(two), "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
                      "--use_cpu", "True", "--model_max_length", "64", *flags, "--per_device_train_batch_size", "2",
                      "--deepspeed", "ds_config_zero3.json")
    assert "partitioned by ZeRO-3" in result.stderr  # the sharded reference, not a copy

    logged = REWARDS if stage == "dpo" else ("kl", "rewards/chosen", "rewards/rejected")
    expected, terms = assert_same_logged_steps(two, one, tiny_qwen2_arch_dir, steps=2, logged=logged)
    if stage == "dpo":
        assert expected[0]["loss"] == pytest.approx(LN2, abs=1e-6)
        assert expected[-1]["rewards/margins"] > 1e-3  # the policy moved from its reference: comparing rewards shows it
    else:
        assert expected[0]["kl"] == 0 and expected[-1]["kl"] > 0, expected
    moved = sum(learning_rate * entry["grad_norm"] for entry in expected)  # SGD's steps bound what rounding moved
    final = safetensors.torch.load_file(two / "model.safetensors")
    reference = safetensors.torch.load_file(one / "model.safetensors")
    assert final.keys() == reference.keys()
    for name in reference:
        assert_close_up_to_rounding(final[name], reference[name], terms=terms,
                                    magnitude=reference[name].abs().max() + moved)
