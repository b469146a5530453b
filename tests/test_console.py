"""chatft.console on a machine's first day: captured commands print only their value, runs print no library
noise (CHATFT_VERBOSE=1 shows it), and a bad model path is one `error:` line with exit status 2 from every
entry point, with nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import cli_demo
import export_gguf
import finetune
import merge_lora
import run_gptq
from console_noise import library_noise
from support import ROOT, write_json


def fresh_machine_env(tmp_path) -> dict:
    """As on a machine that never ran the project: empty toolkit cache and home (no ~/.cache at all)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    cache = tmp_path / "chatft-cache"
    return {**os.environ, "HOME": str(home), "CHATFT_CACHE": str(cache), "CHATFT_VERBOSE": ""}


def run(command, env=None, check=True):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_bundled_prints_only_its_directory_from_an_empty_cache(tmp_path):
    """The demo's first step converts the GGUF file (DeepSpeed gets imported on the way): stdout must still be
    exactly the directory, as `MODEL="$(python -m chatft.bundled)"` captures it."""
    env = fresh_machine_env(tmp_path)
    result = run([sys.executable, "-m", "chatft.bundled"], env)
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and os.path.isfile(os.path.join(lines[0], "config.json")), result.stdout
    assert lines[0].startswith(env["CHATFT_CACHE"]) and "Converting" in result.stderr  # it converted, here
    assert library_noise(result.stderr) == []


def test_device_flags_are_the_only_output():
    """stdout is the one line of flags the launchers pass on, e.g. "--bf16 True" on a recent GPU, "--use_cpu True"
    (after "--bf16 True " where the CPU computes bf16 natively) without CUDA: nothing else, and never empty."""
    result = run([sys.executable, "-m", "chatft.device"])
    flags = r"--(bf16|fp16) True" if torch.cuda.is_available() else r"(--bf16 True )?--use_cpu True"
    assert re.fullmatch(flags + r"\n", result.stdout), result.stdout
    assert library_noise(result.stderr) == []


@pytest.mark.slow
def test_a_gguf_chat_without_llama_cpp_prints_no_library_noise(tmp_path):
    """README's first command installs requirements.txt only: without llama-cpp-python a .gguf file is chatted with
    through transformers' de-quantised copy, converted here from an empty cache. transformers' tensor progress bar
    must not show (the toolkit's one "Converting ... (once)" line says what happens)."""
    from chatft.bundled import bundled_gguf_path

    without_llama_cpp = ("import runpy, sys; sys.modules['llama_cpp'] = None; sys.argv[0] = 'cli_demo.py'; "
                         "runpy.run_path('cli_demo.py', run_name='__main__')")
    chat = run([sys.executable, "-c", without_llama_cpp, "-c", str(bundled_gguf_path()), "--query", "Who are you?",
                "--max-new-tokens", "4"], fresh_machine_env(tmp_path))
    assert "Converting" in chat.stderr  # it converted, here: the de-quantising ran
    assert chat.stdout.startswith("User: Who are you?\nAssistant: ")
    assert "de-quantizing" not in chat.stderr
    assert library_noise(chat.stdout + chat.stderr) == []


@pytest.mark.slow
def test_launcher_without_a_model_from_an_empty_cache(tmp_path):
    """finetune_lora_single_gpu.sh with no -m captures the bundled model's directory: one existing directory."""
    env = fresh_machine_env(tmp_path)
    result = run(["bash", "finetune/finetune_lora_single_gpu.sh", "-o", str(tmp_path / "out"), "--dry_run", "True"],
                 env)
    model = re.search(r"^\+ \S+ finetune\.py --model_name_or_path (.*?) --data_path ", result.stderr, re.MULTILINE)
    assert model and os.path.isfile(os.path.join(model.group(1), "config.json")), result.stderr[-3000:]
    assert model.group(1).startswith(env["CHATFT_CACHE"])
    assert "samples" in result.stdout  # the dry-run report: the run went through with that model
    assert library_noise(result.stderr) == []


@pytest.mark.slow
def test_a_lora_run_and_a_chat_print_no_library_noise(tiny_qwen_arch_dir, data_file, tmp_path):
    """No banner, deprecation warning or "Failed to load" line from a library; the switch shows them again."""
    output_dir = tmp_path / "lora"
    train = [sys.executable, "finetune.py", "--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data_file,
             "--output_dir", str(output_dir), "--use_lora", "--max_steps", "2", "--per_device_train_batch_size", "2",
             "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "True",
             "--model_max_length", "64", "--activation_checkpointing"]
    env = fresh_machine_env(tmp_path)
    trained = run(train, env)
    assert library_noise(trained.stdout + trained.stderr) == []
    assert "Training finished" in trained.stdout
    # one token: a random model's longer reply may hold a blank line, which would end it for library_noise
    chat = run([sys.executable, "cli_demo.py", "-c", str(output_dir), "--query", "Who are you?",
                "--max-new-tokens", "1"], env)
    assert library_noise(chat.stdout + chat.stderr) == []
    assert chat.stdout.startswith("User: Who are you?\nAssistant: ")

    verbose = run(train + ["--overwrite_output_dir", "True"], {**env, "CHATFT_VERBOSE": "1"})
    assert library_noise(verbose.stdout + verbose.stderr) != []  # the libraries' lines are still there to see


@pytest.mark.slow
def test_a_qlora_run_on_a_gptq_model_prints_no_library_noise(tiny_gptq_dir, data_file, tmp_path):
    """Q-LoRA on a GPTQ base imports gptqmodel (banner, kernel probes) and passes transformers a GPTQConfig for its
    trainable backend (which transformers warns about): none of it reaches the console."""
    train = [sys.executable, "finetune.py", "--model_name_or_path", str(tiny_gptq_dir), "--data_path", data_file,
             "--output_dir", str(tmp_path / "qlora"), "--use_lora", "--q_lora", "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
             "--use_cpu", "True", "--model_max_length", "64"]
    trained = run(train, fresh_machine_env(tmp_path))
    assert library_noise(trained.stdout + trained.stderr) == [], trained.stdout + trained.stderr
    assert "Training finished" in trained.stdout


# Bad model paths: one line, exit status 2, nothing written, from every entry point.

def model_like(root, name, files):
    directory = root / name
    directory.mkdir()
    for file in files:
        (directory / file).write_text("{}" if file.endswith(".json") else "x")
    return directory


@pytest.fixture
def bad_models(tmp_path):
    return {
        "missing": (str(tmp_path / "no" / "such" / "model"), "no such file or directory"),
        "not a model": (str(model_like(tmp_path, "notes", ["readme.txt"])), "not a model directory (no config.json)"),
        "no weights": (str(model_like(tmp_path, "empty", ["config.json", "tokenizer.json"])), "no model weights"),
        "pickled weights": (str(model_like(tmp_path, "pickled", ["config.json", "tokenizer.json", "pytorch_model.bin"])),
                            "only in pickle files (pytorch_model.bin)"),
        "no tokenizer": (str(model_like(tmp_path, "untokenized", ["config.json", "model.safetensors"])),
                         "no tokenizer files"),
        "hub id": ("someone/not-downloaded-model", "is not in the local hub cache"),
    }


CASES = ["missing", "not a model", "no weights", "pickled weights", "no tokenizer", "hub id"]


def assert_one_error_line(capsys, flag, path, problem):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} {path}: ") and problem in err, err


@pytest.mark.parametrize("case", CASES)
def test_finetune_refuses_a_bad_model_path(case, bad_models, data_file, tmp_path, capsys):
    path, problem = bad_models[case]
    output_dir = tmp_path / "out"
    code = finetune.main(["--model_name_or_path", path, "--data_path", data_file, "--output_dir", str(output_dir),
                          "--use_cpu", "True"])
    assert code == 2 and not output_dir.exists()
    assert_one_error_line(capsys, "--model_name_or_path", path, problem)


@pytest.mark.parametrize("case", CASES)
def test_cli_demo_refuses_a_bad_checkpoint(case, bad_models, capsys):
    path, problem = bad_models[case]
    assert cli_demo.main(["-c", path, "--query", "hi"]) == 2
    assert_one_error_line(capsys, "--model_name_or_path", path, problem)


@pytest.mark.parametrize("case", CASES)
def test_run_gptq_refuses_a_bad_model(case, bad_models, data_file, tmp_path, capsys):
    path, problem = bad_models[case]
    out = tmp_path / "int4"
    assert run_gptq.main(["--model_name_or_path", path, "--data_path", data_file, "--out_path", str(out)]) == 2
    assert not out.exists()
    assert_one_error_line(capsys, "--model_name_or_path", path, problem)


@pytest.mark.parametrize("case", CASES)
def test_merge_lora_refuses_a_bad_base_model(case, bad_models, tmp_path, capsys):
    path, problem = bad_models[case]
    adapter = model_like(tmp_path, "adapter", ["adapter_model.safetensors", "tokenizer.json"])
    write_json(adapter / "adapter_config.json", {"base_model_name_or_path": "/elsewhere/base", "peft_type": "LORA"})
    out = tmp_path / "merged"
    assert merge_lora.main(["--adapter_path", str(adapter), "--output_dir", str(out), "--base_model_path", path]) == 2
    assert not out.exists()
    assert_one_error_line(capsys, "--base_model_path", path, problem)


def test_merge_lora_refuses_a_missing_adapter_and_a_moved_base(tmp_path, capsys):
    missing = tmp_path / "no-adapter"
    assert merge_lora.main(["--adapter_path", str(missing), "--output_dir", str(tmp_path / "m")]) == 2
    assert_one_error_line(capsys, "--adapter_path", missing, "no such file or directory")
    adapter = model_like(tmp_path, "adapter", ["adapter_model.safetensors", "tokenizer.json"])
    write_json(adapter / "adapter_config.json", {"base_model_name_or_path": "/elsewhere/base", "peft_type": "LORA"})
    assert merge_lora.main(["--adapter_path", str(adapter), "--output_dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/elsewhere/base: no such file or directory" in err
    assert "--base_model_path" in err and not (tmp_path / "m").exists()


def test_unknown_lora_target_lists_the_linear_layers(tiny_qwen_arch_dir, data_file, tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data_file, "--output_dir",
                          str(output_dir), "--use_lora", "--lora_target_modules", "q_proj", "c_attn", "--use_cpu", "True"])
    assert code == 2 and not output_dir.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.match(r"error: --lora_target_modules: c_attn is not a module of this Qwen[23]ForCausalLM; its linear "
                    r"layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj$", err), err


@pytest.mark.parametrize("target, names", [("mlp", "Qwen[23]MLP"), ("", "Qwen[23]ForCausalLM")])
def test_a_lora_target_that_names_a_block_is_refused_before_loading(tiny_qwen_arch_dir, data_file, tmp_path, capsys,
                                                                    target, names):
    """peft refuses a target naming a module it has no LoRA layer for (a traceback with the module's dump, after the
    model loaded); the block `mlp`, or an empty name (the model), is one line before."""
    output_dir = tmp_path / "out"
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data_file, "--output_dir",
                          str(output_dir), "--use_lora", "--lora_target_modules", target, "--use_cpu", "True"])
    assert code == 2 and not output_dir.exists()
    err = capsys.readouterr().err
    assert re.match(rf"error: --lora_target_modules: {target or repr(target)} names {names}, not a layer LoRA adapts "
                    r"\(a linear layer or an embedding\); this model's linear layers are down_proj, gate_proj, k_proj, "
                    r"o_proj, q_proj, up_proj, v_proj\n$", err), err


def test_flag_and_model_problems_are_listed_together(data_file, tmp_path, capsys):
    code = finetune.main(["--model_name_or_path", str(tmp_path / "nothing"), "--data_path", data_file,
                          "--output_dir", str(tmp_path / "out"), "--lora_bias", "some", "--q_lora", "--use_cpu", "True"])
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines), lines
    assert any("--lora_bias must be" in line for line in lines) and any("--q_lora needs --use_lora" in line for line in lines)
    assert any(line.startswith("error: --lora_bias: the shape of a LoRA adapter") for line in lines)
    assert any("no such file or directory" in line for line in lines)


def test_a_quantized_model_without_q_lora_is_refused_before_tokenizing(tiny_gptq_dir, tmp_path, capsys):
    # a data file that reading would refuse: the flags' refusal alone shows the data was never read, let alone tokenized
    data = tmp_path / "broken.json"
    data.write_text('[{"conversations": [')
    code = finetune.main(["--model_name_or_path", str(tiny_gptq_dir), "--data_path", str(data), "--output_dir",
                          str(tmp_path / "out"), "--use_lora", "--use_cpu", "True"])
    assert code == 2
    err = capsys.readouterr().err
    assert "gptq-quantized model cannot be trained itself" in err and "--q_lora" in err, err
    assert str(data) not in err and not (tmp_path / "out").exists(), err


def test_cli_error_is_one_line_without_traceback(data_file, tmp_path):
    result = run([sys.executable, "finetune.py", "--model_name_or_path", "/path/that/does/not/exist", "--data_path",
                  data_file, "--output_dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr == "error: --model_name_or_path /path/that/does/not/exist: no such file or directory\n"
    assert "Traceback" not in result.stdout + result.stderr


def test_good_models_and_adapters_pass_the_checks(tiny_qwen_arch_dir, tmp_path):
    """No false alarms: a model directory, a GGUF file and an adapter directory are accepted."""
    from chatft.bundled import bundled_gguf_path
    from chatft.model.sources import model_source_problems

    assert model_source_problems(str(tiny_qwen_arch_dir), "--model_name_or_path") == []
    assert model_source_problems(str(bundled_gguf_path()), "--model_name_or_path") == []
    adapter = model_like(tmp_path, "adapter", ["adapter_model.safetensors", "tokenizer.json"])
    write_json(adapter / "adapter_config.json", {"base_model_name_or_path": str(tiny_qwen_arch_dir)})
    assert model_source_problems(str(adapter), "-c", allow_adapter=True) == []
    assert "is a LoRA adapter directory" in model_source_problems(str(adapter), "--model_name_or_path")[0]


def test_a_malformed_flag_is_one_line_not_the_whole_usage(tiny_qwen_arch_dir, data_file, tmp_path, capsys):
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data_file, "--output_dir",
                          str(tmp_path / "out"), "--learning_rate", "abc"])
    assert code == 2 and not (tmp_path / "out").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "error: argument --learning_rate/--learning-rate: invalid float value: 'abc' "
        "(python finetune.py --help lists every flag)\n")


@pytest.mark.parametrize("script, argv, expected", [
    (run_gptq, ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", "--bits", "5"],
     "argument --bits: invalid choice: 5 (choose from 2, 3, 4, 8) (python run_gptq.py --help lists every flag)"),
    (export_gguf, ["--model_name_or_path", "m"],
     "the following arguments are required: --output_file/--output (python export_gguf.py --help lists every flag)"),
    (merge_lora, ["--adapter_path", "a", "--output_dir", "o", "--max_shards", "2"],
     "unrecognized arguments: --max_shards 2 (python merge_lora.py --help lists every flag)"),
    (cli_demo, ["-c", "m", "--max-new-tokens", "many"],
     "argument --max-new-tokens/--max_new_tokens: invalid int value: 'many' (python cli_demo.py --help lists every "
     "flag)"),
])
def test_every_script_s_parse_error_is_one_line(script, argv, expected, tmp_path, capsys, monkeypatch):
    """A bad choice, a missing flag, an unknown one, a malformed value: one `error:` line, exit 2, not argparse's
    usage block."""
    monkeypatch.chdir(tmp_path)
    assert script.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {expected}\n"
    assert list(tmp_path.iterdir()) == []
