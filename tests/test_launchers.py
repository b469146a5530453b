"""The shell launchers: options, pass-through flags, and refusing a missing data file before Python starts."""

import os
import subprocess

from conftest import ROOT, write_json
from test_finetune import CONVERSATIONS

LAUNCHER = str(ROOT / "finetune" / "finetune_lora_single_gpu.sh")


def test_lora_single_gpu_with_options_and_extra_flags(tiny_qwen_dir, tmp_path):
    data = write_json(tmp_path / "train.json", CONVERSATIONS)
    # relative paths resolve against the caller's directory, not the repository
    result = subprocess.run(
        ["bash", LAUNCHER, "-m", str(tiny_qwen_dir), "-d", "train.json", "-o", "out", "--max_steps", "2",
         "--lora_r", "4", "--save_strategy", "no"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "out"))
    assert "--use_lora" in result.stderr and "--lora_r 4" in result.stderr  # set -x shows the command


def test_missing_data_file_fails_fast(tmp_path):
    result = subprocess.run(["bash", LAUNCHER, "-d", "nope.json", "-o", "out"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "data file not found: nope.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_help():
    result = subprocess.run(["bash", LAUNCHER, "-h"], capture_output=True, text=True)
    assert result.returncode == 0 and "-m MODEL" in result.stdout


def test_qlora_single_gpu(tmp_path):
    from conftest import _tiny_model_dir

    model = _tiny_model_dir(tmp_path, "qwen2", hidden_size=64, intermediate_size=128)
    data = write_json(tmp_path / "train.json", CONVERSATIONS)
    result = subprocess.run(
        ["bash", str(ROOT / "finetune" / "finetune_qlora_single_gpu.sh"), "-m", str(model), "-d", str(data),
         "-o", str(tmp_path / "out"), "--max_steps", "2", "--lora_r", "4", "--save_strategy", "no"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--q_lora" in result.stderr and "4-bit" in result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
