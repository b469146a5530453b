"""bench/ on a tiny model: the throughput, memory and profile tools run, compare like with like, write their
reports, and patch nothing. (What they measure on the real model is quoted in README, not asserted here.)"""

import ast
import importlib.util
import json
import subprocess
import sys

import pytest

from bench import harness
from support import CONVERSATIONS, ROOT, write_json

# alpaca records, read by chatft's own alpaca reader; every third has two earlier exchanges (`history`)
ALPACA = [{"instruction": f"Question {i}?", "input": "Some context." if i % 2 else "", "output": f"Answer {i}.",
           "history": [["Hi", "Hello!"], ["How are you?", "Fine, thanks."]] if i % 3 == 0 else []} for i in range(12)]


def run_module(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_throughput_compares_the_same_tokens(tiny_qwen2_64_dir, tmp_path):
    data = write_json(tmp_path / "train.json", ALPACA)
    variants = ["chatft", "chatft_packing", "chatft_padded", "seed"] + (["trl"] if importlib.util.find_spec("trl") else [])
    result = run_module("bench.throughput", "-m", str(tiny_qwen2_64_dir), "--data", str(data), "--num_samples", "12",
                        "--max_length", "64", "--batch_size", "2", "--modes", "lora", "--precisions", "fp32",
                        "--variants", ",".join(variants), "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["variant"]: r for r in json.load(open(tmp_path / "bench.json"))["results"]}
    assert set(runs) == set(variants) and not any("error" in r for r in runs.values())
    # every variant, TRL's included, trained on the same real tokens (all turns of every conversation) with the loss
    # on the same ones; they differ only in the padding around them
    assert len({runs[name]["real_tokens"] for name in runs}) == 1
    assert len({runs[name]["labelled_tokens"] for name in runs}) == 1
    assert runs["chatft"]["padded_fraction"] == runs["chatft_packing"]["padded_fraction"] == 0
    assert runs["seed"]["positions"] == 12 * 64  # every sample padded to --max_length
    assert runs["chatft"]["padded_fraction"] < runs["chatft_padded"]["padded_fraction"] < runs["seed"]["padded_fraction"]
    # (MFU is not bounded by 1 on a model this tiny: its embedding rows count in N but cost no matmul)
    assert all(r["tokens_per_second"] > 0 and r["mfu"] > 0 for r in runs.values())
    assert "| lora | fp32 | seed |" in result.stdout


def test_trl_messages_keep_every_turn(qwen_tokenizer):
    from bench.throughput import trl_chat_template, trl_messages
    from chatft.chat_format import DEFAULT_SYSTEM_MESSAGE, render_chatml, to_conversation
    from chatft.formats import from_alpaca

    sample, problems, _ = from_alpaca(ALPACA[0], "train.json, sample 0")
    assert not problems
    messages = trl_messages(sample)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[-1] == {"role": "assistant", "content": "Answer 0."}
    # TRL's template renders the messages as the toolkit renders the sample, and marks its trained spans
    text, spans = render_chatml(to_conversation(sample), DEFAULT_SYSTEM_MESSAGE)
    rendered = qwen_tokenizer.apply_chat_template(messages, chat_template=trl_chat_template(DEFAULT_SYSTEM_MESSAGE),
                                                  tokenize=False)
    assert rendered == text
    marked = qwen_tokenizer.apply_chat_template(messages, chat_template=trl_chat_template(DEFAULT_SYSTEM_MESSAGE),
                                                return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]
    assert qwen_tokenizer.decode(trained) == "".join(text[a:b] for a, b in spans)


def test_preprocessing_benchmark(tiny_qwen2_64_dir, tmp_path):
    data = write_json(tmp_path / "train.json", CONVERSATIONS * 5)
    result = run_module("bench.throughput", "-m", str(tiny_qwen2_64_dir), "--data", str(data), "--preprocess_only",
                        "--num_samples", "0", "--repeats", "1", "--json", str(tmp_path / "pre.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "pre.json"))
    assert report["num_conversations"] == len(CONVERSATIONS) * 5
    assert set(report["seconds"]) == {"chatft", "chatft_2_workers", "chatft_cached", "seed_per_turn",
                                      "batched_call_floor"}
    assert "| seed_per_turn |" in result.stdout


@pytest.mark.slow
def test_memory_benchmark(tiny_qwen2_64_dir, tmp_path):
    result = run_module("bench.memory", "-m", str(tiny_qwen2_64_dir), "--modes", "full,lora", "--seq-len", "32",
                        "--batch-size", "2", "--steps", "1", "--json", str(tmp_path / "memory.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    full, lora = json.load(open(tmp_path / "memory.json"))
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert all(r["peak_mib"] > 0 and r["tokens_per_s"] > 0 for r in (full, lora))


@pytest.mark.slow
def test_profile_table(tiny_qwen2_64_dir, tmp_path):
    # the launcher runs from anywhere; relative paths resolve against the caller's directory
    result = subprocess.run(["bash", str(ROOT / "finetune" / "profile.sh"), "-m", str(tiny_qwen2_64_dir), "-o", "profile",
                             "--modes", "lora,full", "--lengths", "32,64", "--steps", "2",
                             "--gradient_accumulation_steps", "2"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "profile"
    cells = json.load(open(output / "profile.json"))
    assert [(c["mode"], c["length"], c["status"]) for c in cells] == [
        (mode, length, "ok") for mode in ("lora", "full") for length in (32, 64)]
    assert all(c["seconds_per_iteration"] > 0 and c["peak_memory_mib"] > 0 for c in cells)
    table = (output / "profile.md").read_text()
    assert "| mode | 32 | 64 |" in table and table.count(" s/it") == 4 and "activation checkpointing True" in table
    assert (output / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_module("bench.profile_table", "-m", str(tiny_qwen2_64_dir), "-o", str(output))
    assert again.returncode == 2 and "not empty" in again.stderr  # an earlier profile is not overwritten


def test_worker_that_reports_nothing_is_a_failure():
    run = harness.run_worker("bench.no_such_tool", {"x": 1})
    assert run.result is None and run.failure == "exit 1" and "No module named bench.no_such_tool" in run.stderr


def test_resident_memory_names_say_what_they_return():
    # In a fresh process: in this one, memory freed by earlier tests stays resident and a new block may reuse it
    check = """
from bench import harness
before = harness.current_resident_mib()
block = b"\\x01" * (64 * 2**20)  # 64 MiB, every page written
assert harness.current_resident_mib() > before + 48, "current_resident_mib missed a 64 MiB block"
del block
assert harness.current_resident_mib() < before + 16, "current_resident_mib still counts a freed 64 MiB block"
assert harness.peak_resident_mib() >= before + 48, "peak_resident_mib forgot the block"
assert harness.peak_above_mib(False, before) >= 48
"""
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bench_patches_nothing():
    """The tools reach the toolkit through its doors (finetune.train's hooks), never by assigning to a module."""
    modules = {"finetune", "transformers", "trl", "chatft"}
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                while isinstance(target, ast.Attribute):
                    target = target.value
                    assert not (isinstance(target, ast.Name) and target.id in modules), \
                        f"{path.name}:{node.lineno} assigns to an attribute of {target.id}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                assert not (isinstance(node.args[0], ast.Name) and node.args[0].id in modules), \
                    f"{path.name}:{node.lineno} setattr on {node.args[0].id}"
