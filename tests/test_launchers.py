"""The five shell launchers: one option parser, one recipe, finetune.py flags passed through in both forms.

Most tests replace python and torchrun with a fake that answers the launchers' questions (`-m chatft.device`,
`-m chatft.bundled`, the CUDA device count) and records the command it was asked to run instead of training."""

import os
import stat
import subprocess

import pytest

from support import CONVERSATIONS, ROOT, write_json

SINGLE = ["finetune_lora_single_gpu.sh", "finetune_qlora_single_gpu.sh"]
TORCHRUN = ["finetune_ds.sh", "finetune_lora_ds.sh", "finetune_qlora_ds.sh"]
LAUNCHERS = SINGLE + TORCHRUN
LORA = {"finetune_lora_single_gpu.sh", "finetune_qlora_single_gpu.sh", "finetune_lora_ds.sh", "finetune_qlora_ds.sh"}

FAKE = """#!/usr/bin/env bash
case "$*" in
  "-m chatft.device") echo "--use_cpu True" ;;
  "-m chatft.bundled") echo /bundled/model ;;
  "-c "*) echo 0 ;;  # torch.cuda.device_count()
  *) { echo "${CUDA_VISIBLE_DEVICES-unset}"; basename "$0"; printf '%s\\n' "$@"; } > "$LAUNCHED" ;;
esac
"""


def launch(tmp_path, name, *args, env=None):
    """Run finetune/<name> from tmp_path with fake python and torchrun.

    Returns (result, command): command is None when nothing was launched, else a dict with the program run
    ("fake-python" or "torchrun"), finetune.py's arguments, and CUDA_VISIBLE_DEVICES as the program saw it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for fake in ("fake-python", "torchrun"):
        (bin_dir / fake).write_text(FAKE)
        (bin_dir / fake).chmod(stat.S_IRWXU)
    launched = tmp_path / "launched"
    launched.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env = {**base, "PYTHON": str(bin_dir / "fake-python"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "LAUNCHED": str(launched), **(env or {})}
    result = subprocess.run(["bash", str(ROOT / "finetune" / name), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    if not launched.exists():
        return result, None
    cuda, program, *argv = launched.read_text().splitlines()
    return result, {"program": program, "cuda": cuda, "args": argv[argv.index("finetune.py") + 1:]}


def values(args, flag):
    """Every value given to `flag` in an argument list, in order."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]


@pytest.mark.parametrize("form", ["bare", "after --"])
@pytest.mark.parametrize("name", LAUNCHERS)
def test_finetune_flags_pass_through_in_both_forms_and_override_the_recipe(name, form, tmp_path):
    flags = ["--num_train_epochs", "1", "--lora_r", "4"]
    # bare flags may come between the options; after `--` everything goes through as it is
    args = [*flags[:2], "-o", "out", *flags[2:]] if form == "bare" else ["-o", "out", "--", *flags]
    result, command = launch(tmp_path, name, *args)
    assert result.returncode == 0, result.stderr
    assert command["program"] == ("fake-python" if name in SINGLE else "torchrun")
    # the recipe's value comes first, the caller's last: finetune.py keeps the last (test_the_last_value_wins)
    assert values(command["args"], "--num_train_epochs") == ["5", "1"]
    assert values(command["args"], "--lora_r") == ["4"]
    assert values(command["args"], "--output_dir") == [str(tmp_path / "out")]
    assert ("--use_lora" in command["args"]) == (name in LORA)
    assert ("--q_lora" in command["args"]) == ("qlora" in name)
    assert "finetune.py --model_name_or_path" in result.stderr  # set -x shows the command


@pytest.mark.parametrize("option", ["-m", "--data", "-o"])
@pytest.mark.parametrize("name", LAUNCHERS)
def test_an_option_without_a_value_fails_with_one_error_line(name, option, tmp_path):
    for args in ([option], [option, "--lora_r", "4"]):  # last, or followed by a flag
        result, command = launch(tmp_path, name, *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and errors == [f"error: {option} needs a value"], result.stderr
        assert f"Usage: bash finetune/{name}" in result.stderr and command is None


@pytest.mark.parametrize("name", LAUNCHERS)
def test_one_parser_for_all(name, tmp_path):
    """Relative paths resolve against the caller's directory; without -m, the bundled model."""
    data = write_json(tmp_path / "train.json", CONVERSATIONS)
    result, command = launch(tmp_path, name, "-d", "train.json", "--output", "out")
    assert result.returncode == 0, result.stderr
    args = command["args"]
    assert values(args, "--data_path") == [str(data)] and values(args, "--output_dir") == [str(tmp_path / "out")]
    assert values(args, "--model_name_or_path") == ["/bundled/model"] and values(args, "--use_cpu") == ["True"]
    (tmp_path / "model").mkdir()
    _, command = launch(tmp_path, name, "-m", "model")
    assert values(command["args"], "--model_name_or_path") == [str(tmp_path / "model")]
    _, command = launch(tmp_path, name, "--model", "Qwen/Qwen2.5-0.5B")  # not a path here: a hub id, as it is
    assert values(command["args"], "--model_name_or_path") == ["Qwen/Qwen2.5-0.5B"]


@pytest.mark.parametrize("name", SINGLE)
def test_single_process_on_gpu_0_and_no_deepspeed(name, tmp_path):
    _, command = launch(tmp_path, name)
    assert command["cuda"] == "0" and "--deepspeed" not in command["args"]
    _, command = launch(tmp_path, name, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert command["cuda"] == "3"
    result, command = launch(tmp_path, name, "--deepspeed", "ds_config_zero2.json")
    assert result.returncode == 2 and command is None
    assert result.stderr.startswith("error: --deepspeed needs several processes: use a *_ds.sh launcher")


@pytest.mark.parametrize("name", TORCHRUN)
def test_torchrun_topology_and_deepspeed_config(name, tmp_path):
    result, command = launch(tmp_path, name, env={"NPROC_PER_NODE": "3"})
    assert "+ torchrun --nproc_per_node 3 --nnodes 1 --node_rank 0" in result.stderr
    expected = "ds_config_zero3.json" if name == "finetune_ds.sh" else "ds_config_zero2.json"
    assert values(command["args"], "--deepspeed") == [str(ROOT / expected)]
    _, command = launch(tmp_path, name, "--deepspeed", "ds_config_zero3_offload.json")
    assert values(command["args"], "--deepspeed") == [str(ROOT / "ds_config_zero3_offload.json")]


def test_full_parameter_recipe_differs_from_lora_in_batch_accumulation_and_learning_rate(tmp_path):
    _, full = launch(tmp_path, "finetune_ds.sh")
    _, lora = launch(tmp_path, "finetune_lora_ds.sh")
    changes = {"--per_device_train_batch_size": ("1", "2"), "--gradient_accumulation_steps": ("16", "8"),
               "--learning_rate": ("1e-5", "3e-4"),
               "--deepspeed": (str(ROOT / "ds_config_zero3.json"), str(ROOT / "ds_config_zero2.json"))}
    expected = list(full["args"])
    for flag, (full_value, lora_value) in changes.items():
        assert values(expected, flag) == [full_value]
        expected[expected.index(flag) + 1] = lora_value
    assert lora["args"] == expected + ["--use_lora"]


@pytest.mark.parametrize("name", SINGLE)
def test_the_last_value_wins(name, tmp_path):
    """finetune.py's parser keeps a flag's last value, so a caller's flag overrides the recipe's."""
    from chatft.args import ARGUMENT_CLASSES, FlagParser

    _, command = launch(tmp_path, name, "--num_train_epochs", "1", "--", "--activation_checkpointing", "False",
                        "--learning_rate", "1e-3")
    _, _, training, lora = FlagParser(ARGUMENT_CLASSES).parse_args_into_dataclasses(args=command["args"])
    assert training.num_train_epochs == 1 and training.learning_rate == 1e-3
    assert training.activation_checkpointing is False and lora.use_lora and lora.q_lora == ("qlora" in name)
    assert training.per_device_train_batch_size == 2 and training.gradient_accumulation_steps == 8  # the recipe's


@pytest.mark.parametrize("name", LAUNCHERS)
def test_help_says_what_it_runs(name, tmp_path):
    result, command = launch(tmp_path, name, "-h")
    assert result.returncode == 0 and command is None
    runs = "python" if name in SINGLE else "torchrun"
    assert result.stdout.startswith(f"Usage: bash finetune/{name} [-m MODEL]") and f"Runs {runs} finetune.py" in result.stdout
    assert ("--deepspeed CONFIG" in result.stdout) == (name in TORCHRUN)
    assert ("--use_lora" in result.stdout) == (name in LORA)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_missing_data_file_fails_fast(name, tmp_path):
    result, command = launch(tmp_path, name, "-d", "nope.json", "-o", "out")
    assert result.returncode == 2 and result.stderr.startswith("error: data file not found: nope.json")
    assert command is None and not (tmp_path / "out").exists()


# Real runs on a tiny model, one process each.

@pytest.mark.slow
def test_lora_single_gpu_with_options_and_extra_flags(tiny_qwen_arch_dir, tmp_path):
    write_json(tmp_path / "train.json", CONVERSATIONS)
    # relative paths resolve against the caller's directory, not the repository
    result = subprocess.run(
        ["bash", str(ROOT / "finetune" / "finetune_lora_single_gpu.sh"), "-m", str(tiny_qwen_arch_dir), "-d", "train.json",
         "-o", "out", "--max_steps", "2", "--lora_r", "4", "--save_strategy", "no"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "out"))
    assert "--use_lora" in result.stderr and "--lora_r 4" in result.stderr  # set -x shows the command


@pytest.mark.slow
def test_qlora_single_gpu(tiny_qwen2_arch_64_dir, tmp_path):
    data = write_json(tmp_path / "train.json", CONVERSATIONS)
    result = subprocess.run(
        ["bash", str(ROOT / "finetune" / "finetune_qlora_single_gpu.sh"), "-m", str(tiny_qwen2_arch_64_dir), "-d", str(data),
         "-o", str(tmp_path / "out"), "--", "--max_steps", "2", "--lora_r", "4", "--save_strategy", "no"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--q_lora" in result.stderr and "4-bit" in result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
