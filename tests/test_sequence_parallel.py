"""--sequence_parallel_size: DeepSpeed's Ulysses sequence parallelism (through accelerate and the Trainer) on one long
row split across processes. The proof: 2 processes with the row split in two take the step 1 process takes on the
whole row (same loss, same gradients), under ZeRO-2 and ZeRO-3, on a packed row of two samples (per-sample
attention inside the engine). gloo runs the engine's collectives (all-to-all included) on the CPU."""

import json
import os
import types

import pytest
import safetensors.torch
import torch

from chatft.data.chat_format import IGNORE_INDEX, LOSS_WEIGHTS
from chatft.train.losses import LossScale, labelled_cross_entropy, shifted_cross_entropy
from chatft.train.sequence_parallel import SequenceParallelCollator, head_problem, sequence_parallel_problems
from support import ROOT, unloadable_copy, write_json


# --- the flag's checks: one line each, exit 2, before any model loads ----------------------------------------------

@pytest.fixture(scope="module")
def unloadable_model(tiny_qwen2_arch_dir, tmp_path_factory):
    return str(unloadable_copy(tiny_qwen2_arch_dir, tmp_path_factory.mktemp("unloadable")))


ZERO2 = ["--deepspeed", str(ROOT / "ds_config_zero2.json")]


ALONE = ("--sequence_parallel_size 2 must divide the number of processes (1): launch a multiple of 2 processes "
         "(torchrun --nproc_per_node 2).")


@pytest.mark.parametrize("flags, expected", [
    (["--sequence_parallel_size", "2", *ZERO2], [ALONE]),
    (["--sequence_parallel_size", "2"], [
        ALONE, "--sequence_parallel_size needs DeepSpeed (its Ulysses sequence parallelism): add --deepspeed "
        "ds_config_zero2.json (or ds_config_zero3.json)."]),
    (["--sequence_parallel_size", "2", "--padding_free", "False", *ZERO2], [
        ALONE,
        "--sequence_parallel_size splits padding-free rows: drop --padding_free False and --pad_to_max_length."]),
    (["--sequence_parallel_size", "2", "--per_device_train_batch_size", "4", *ZERO2], [
        ALONE, "--sequence_parallel_size trains one row at a time (DeepSpeed's Ulysses attention is built for the "
        "micro-batch DeepSpeed is given, one padding-free row): use --per_device_train_batch_size 1 (not 4), --packing "
        "to put several samples in a row, and --gradient_accumulation_steps for more rows a step."]),
    (["--sequence_parallel_size", "2", "--attn_implementation", "sdpa", *ZERO2], [
        ALONE, "--sequence_parallel_size with --attn_implementation sdpa: DeepSpeed drops the attention mask, so the "
        "samples of a row would attend to each other; use auto (chatft's per-sample sdpa, or flash-attention where "
        "installed) or flash_attention_2."]),
    (["--sequence_parallel_size", "0"], ["--sequence_parallel_size must be at least 1, not 0."]),
])
def test_flag_problems_are_one_line_each_before_the_model_loads(unloadable_model, tmp_path, capsys, flags, expected):
    import finetune

    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", unloadable_model, "--data_path", str(ROOT / "data" / "identity_demo.json"),
            "--output_dir", str(output_dir), "--use_cpu", "True", "--per_device_train_batch_size", "1", *flags]
    capsys.readouterr()
    assert finetune.main(argv) == 2
    assert not output_dir.exists()
    assert capsys.readouterr().err.splitlines() == [f"error: {line}" for line in expected]


def test_the_group_must_divide_the_processes():
    assert sequence_parallel_problems(2, 3, 2, True, False, None, 1) == [
        "--sequence_parallel_size 2 must divide the number of processes (3): launch a multiple of 2 processes "
        "(torchrun --nproc_per_node 2)."]
    assert "not FSDP" in sequence_parallel_problems(2, 2, None, True, False, "full_shard", 1)[0]
    assert sequence_parallel_problems(2, 2, 3, True, False, None, 1, "flash_attention_2") == []
    assert "attend to each other" in sequence_parallel_problems(2, 2, 3, True, False, None, 1, "paged|sdpa")[0]


def test_accepted_with_deepspeed_one_row_and_a_divisor_of_the_processes():
    assert sequence_parallel_problems(2, 4, 2, True, False, None, 1) == []
    assert sequence_parallel_problems(4, 4, 3, True, False, None, 1) == []
    assert sequence_parallel_problems(1, 3, None, False, True, None, 8) == []  # off: nothing to check


def test_heads_must_split_over_the_processes():
    config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
    assert head_problem(2, config) is None
    assert head_problem(4, config) is None  # 2 key/value heads, each replicated on 2 processes
    assert "4 attention heads are not divisible by 3" in head_problem(3, config)
    assert "4 key/value heads and 8" not in (head_problem(8, types.SimpleNamespace(num_attention_heads=8,
                                                                                    num_key_value_heads=4)) or "")
    assert "6 key/value heads and 4" in head_problem(4, types.SimpleNamespace(num_attention_heads=8,
                                                                             num_key_value_heads=6))


# --- the row: padded to a multiple of the group (DeepSpeed's adapter splits it in equal shards) -------------------

def row(lengths):
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    tokens = torch.arange(1, positions.shape[1] + 1)[None]
    return {"input_ids": tokens, "labels": tokens.clone(), "position_ids": positions,
            LOSS_WEIGHTS: torch.ones_like(tokens, dtype=torch.float32)}


def test_the_row_is_padded_to_a_multiple_of_the_group_with_unlabelled_tokens_of_their_own():
    batch = SequenceParallelCollator(lambda features: row([3, 4]), 4, pad_token_id=0)([])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5, 6, 7, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]  # a sample of padding after the last
    assert batch[LOSS_WEIGHTS].tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]
    assert SequenceParallelCollator(lambda features: row([4, 4]), 4)([])["input_ids"].shape == (1, 8)  # already
    # on the CPU (gloo) every row takes the longest length, rounded up to the group
    fixed = SequenceParallelCollator(lambda features: row([3, 4]), 4, length=10)([])
    assert fixed["input_ids"].shape == (1, 12) and fixed["position_ids"][0, 7:].tolist() == [0, 1, 2, 3, 4]


# --- the loss over the shards ----------------------------------------------------------------------------------------

def test_shifted_targets_give_the_causal_loss_of_the_whole_row():
    """The kernel for a shard's shift_labels (position t predicts shift_labels[t]) is the usual causal-LM kernel on
    the unshifted labels."""
    torch.manual_seed(0)
    hidden, head = torch.randn(1, 9, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (1, 9))
    labels[0, :3] = IGNORE_INDEX
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # DeepSpeed's adapter's shift
    expected = labelled_cross_entropy(hidden, labels, head, 4)
    torch.testing.assert_close(shifted_cross_entropy(hidden, shift_labels, head, 4), expected)


@pytest.mark.parametrize("engine_sums", [True, False])
def test_each_shard_gives_the_row_mean_and_back_propagates_its_share(monkeypatch, engine_sums):
    """Two shards, the other's sums added by a stand-in all_reduce: every shard's value is the mean over the row's
    labelled tokens, and its gradient is 1/count of its own sum (size/count where the engine averages the group's
    gradients: ZeRO-3 before deepspeed 0.20.2)."""
    other = torch.tensor([30.0, 6.0])  # the other shard: token-loss sum 30 over 6 labelled tokens

    def all_reduce(tensor, group=None):
        tensor += other

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    token_sum = torch.tensor(12.0, requires_grad=True)
    shift_labels = torch.tensor([[5, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9]])  # 4 labelled tokens
    value = LossScale(sequence_group=(None, 2, engine_sums)).sequence_mean(token_sum, shift_labels)
    assert value.item() == pytest.approx((12 + 30) / (4 + 6))
    value.backward()
    assert token_sum.grad.item() == pytest.approx((1 if engine_sums else 2) / 10)


# --- 2 processes with the row split ≡ 1 process with the whole row ------------------------------------------------

def sequence_data(tmp_path):
    conversations = []
    for i in range(2):
        conversations.append({"id": f"s{i}", "conversations": [
            {"from": "user", "value": f"Tell me story {i} about " + " ".join(f"topic{(k + i) % 31}"
                                                                               for k in range(20))},
            {"from": "assistant", "value": " ".join(f"story{(k * 7 + i) % 97} line{k % 13}"
                                                    for k in range(40 + 20 * i))},
        ]})
    return str(write_json(tmp_path / "long.json", conversations))


def sgd_zero_config(tmp_path, stage):
    """ZeRO without an optimizer of DeepSpeed's own, so that --optim sgd steps: its step is the gradient times the
    learning rate, so the weights after one step compare the gradients (Adam's would not)."""
    return str(write_json(tmp_path / f"zero{stage}.json", {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_splitting_the_row_equal_one_process(tiny_qwen2_arch_dir, tmp_path, stage):
    from test_distributed import torchrun

    data, config = sequence_data(tmp_path), sgd_zero_config(tmp_path, stage)
    flags = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data, "--max_steps", "1",
             "--learning_rate", "0.5", "--optim", "sgd", "--logging_steps", "1", "--report_to", "none",
             "--save_strategy", "no", "--use_cpu", "True", "--seed", "11", "--model_max_length", "1024",
             "--per_device_train_batch_size", "1", "--packing", "True", "--deepspeed", config]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "finetune.py", *flags, "--output_dir", str(one))
    result = torchrun(2, "finetune.py", *flags, "--output_dir", str(two), "--sequence_parallel_size", "2")
    assert "packing: 2 samples in 1 row" in result.stderr  # a row of two samples: per-sample attention in the engine
    (loss_one, norm_one), (loss_two, norm_two) = (first_step(path) for path in (one, two))
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    assert norm_two == pytest.approx(norm_one, rel=1e-5)
    base = safetensors.torch.load_file(os.path.join(tiny_qwen2_arch_dir, "model.safetensors"))
    final_one, final_two = (safetensors.torch.load_file(path / "model.safetensors") for path in (one, two))
    assert final_one.keys() == final_two.keys()
    for name in final_one:
        step_one, step_two = final_one[name] - base[name], final_two[name] - base[name]  # -0.5 x gradient
        assert (step_two - step_one).norm() <= 1e-4 * step_one.norm() + 1e-7, name
    assert any(step.abs().max() > 1e-3 for step in (final_one[name] - base[name] for name in final_one))


def first_step(output_dir):
    history = json.load(open(output_dir / "trainer_state.json"))["log_history"]
    entry = next(entry for entry in history if "loss" in entry)
    return entry["loss"], entry["grad_norm"]


# --- the memory estimate ---------------------------------------------------------------------------------------------

def test_each_process_holds_the_activations_of_its_share_of_the_row(tiny_qwen2_arch_dir):
    import dataclasses

    import transformers

    from chatft.memory import estimate_training_memory
    from chatft.plan import RunPlan

    config = transformers.AutoConfig.from_pretrained(tiny_qwen2_arch_dir)
    plan = RunPlan(config=config, mode="full", compute_dtype=torch.float32, shard="zero2", world_size=2)
    whole = estimate_training_memory(plan, 8192)
    split = estimate_training_memory(dataclasses.replace(plan, sequence_parallel_size=2), 8192)
    assert split.activations == estimate_training_memory(plan, 4096).activations < whole.activations
    assert (split.weights, split.gradients, split.optimizer) == (whole.weights, whole.gradients, whole.optimizer)
    assert split.text().endswith("at the longest batch of 8,192 tokens, 1/2 of it a process with sequence parallelism)")
