"""Interruption: a run killed with SIGKILL and resumed ends where an uninterrupted run ends; SIGTERM saves a
checkpoint and exits cleanly; a crash while saving never leaves a partial checkpoint for a resume to pick."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import safetensors.torch
import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

from chatft.train.trainer import SCRATCH_CHECKPOINT_PREFIX
from support import ROOT, assert_close_up_to_rounding, decoder_terms, run


def command(model, data, output, *extra):
    # LoRA with dropout: resuming must also restore the random state, not only weights and optimizer
    return [sys.executable, "finetune.py", "--model_name_or_path", str(model), "--data_path", data,
            "--output_dir", str(output), "--use_lora", "--lora_r", "4", "--lora_dropout", "0.1",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "True", "--model_max_length", "64", "--seed", "5",
            "--packing", "False", "--save_steps", "5", *extra]


def final_losses(output):
    history = json.load(open(os.path.join(output, "trainer_state.json")))["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tiny_qwen2_arch_dir, data_file, tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    steps = ["--max_steps", "30"]  # 4 batches an epoch: several epochs, so the data order must resume too
    subprocess.run(command(tiny_qwen2_arch_dir, data_file, whole, *steps), cwd=ROOT, check=True, capture_output=True)

    process = subprocess.Popen(command(tiny_qwen2_arch_dir, data_file, interrupted, *steps), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (interrupted / "checkpoint-10").is_dir() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not (interrupted / "adapter_model.safetensors").exists()

    resumed = subprocess.run(command(tiny_qwen2_arch_dir, data_file, interrupted, *steps, "--resume_from_checkpoint", "True"),
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "min for 20 steps, " in resumed.stdout and "(resumed at step 10, 30 in all)" in resumed.stdout  # its speed too
    # the same computation, step for step (weights, optimizer, data order and dropout's random state restored); only
    # the kernels of two processes may order a sum differently (observed: bit-identical here)
    config = transformers.AutoConfig.from_pretrained(tiny_qwen2_arch_dir)
    terms = decoder_terms(config, loss=True)
    assert_close_up_to_rounding(torch.tensor(final_losses(interrupted)[-1]), torch.tensor(final_losses(whole)[-1]),
                                terms=terms)
    expected = safetensors.torch.load_file(whole / "adapter_model.safetensors")
    got = safetensors.torch.load_file(interrupted / "adapter_model.safetensors")
    for name, tensor in expected.items():  # Adam moves each weight by about lr a step: 30 steps of lr 1e-3
        assert_close_up_to_rounding(got[name], tensor, terms=terms, magnitude=tensor.abs().max() + 30 * 1e-3)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_qwen2_arch_dir, data_file, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen(command(tiny_qwen2_arch_dir, data_file, output, "--max_steps", "100000", "--save_strategy",
                                       "no"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def read():
        for line in process.stdout:
            lines.append(line)
            if "'loss'" in line and "SENT" not in lines:  # the first logged step: training has begun
                lines.append("SENT")
                process.send_signal(signal.SIGTERM)

    reader = threading.Thread(target=read)
    reader.start()
    assert process.wait(timeout=600) == 0
    reader.join()
    log = "".join(lines)
    assert "Stopped by SIGTERM at step" in log, log[-3000:]
    checkpoint = get_last_checkpoint(str(output))
    assert checkpoint and os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
    assert os.path.isfile(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert not (output / "adapter_model.safetensors").exists()  # an interrupted run is not saved as finished


def test_a_crash_while_saving_leaves_the_previous_checkpoint_the_latest(tiny_qwen2_arch_dir, data_file, tmp_path):
    output = tmp_path / "out"
    # a directory where step 4's optimizer state goes: that save fails after the model weights are written
    (output / f"{SCRATCH_CHECKPOINT_PREFIX}-4" / "optimizer.pt").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="Is a directory"):
        run(tiny_qwen2_arch_dir, data_file, output, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
            "--overwrite_output_dir")
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    assert (output / "tmp-checkpoint-4" / "model.safetensors").is_file()  # the save did begin
    assert not (output / "checkpoint-4").exists()
    assert get_last_checkpoint(str(output)) == str(output / "checkpoint-2")


def test_checkpoint_names_rotation_and_the_best_checkpoint(tiny_qwen2_arch_dir, data_file, tmp_path):
    """Checkpoints keep transformers' names; --save_total_limit counts the one just written; the best checkpoint is
    kept, found by load_best_model_at_end and named by its final name in the state saved with it (where a resume
    reads it)."""
    output = tmp_path / "out"
    trainer = run(tiny_qwen2_arch_dir, data_file, output, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                  "--eval_data_path", "0.25", "--eval_strategy", "steps", "--eval_steps", "2", "--save_total_limit", "2",
                  "--load_best_model_at_end", "True", "--metric_for_best_model", "eval_loss")
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(output) and os.path.basename(best).startswith("checkpoint-")
    folders = sorted(p.name for p in output.iterdir() if "checkpoint" in p.name)
    assert folders == sorted({os.path.basename(best), "checkpoint-6"}) or folders == ["checkpoint-4", "checkpoint-6"]
    saved = json.load(open(os.path.join(best, "trainer_state.json")))
    assert saved["best_model_checkpoint"] == best and saved["global_step"] == trainer.state.best_global_step
