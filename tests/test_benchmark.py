"""finetune/benchmark.py and finetune/profile.sh on a tiny model: they run, compare like with like, and write
their reports. (What they measure on the real model is quoted in README, not asserted here.)"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, _tiny_model_dir, write_json, CONVERSATIONS


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("bench-model"), "qwen2", hidden_size=64, intermediate_size=128)


def run_script(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    return result


def test_training_benchmark_compares_the_same_tokens(tiny_model, tmp_path):
    data = write_json(tmp_path / "train.json", CONVERSATIONS * 2)
    result = run_script("finetune/benchmark.py", "-m", str(tiny_model), "--data", str(data), "--num_samples", "12",
                        "--max_length", "64", "--batch_size", "2", "--modes", "lora", "--precisions", "fp32",
                        "--variants", "chatft,chatft_packing,chatft_padded,seed", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["variant"]: r for r in json.load(open(tmp_path / "bench.json"))["results"]}
    assert set(runs) == {"chatft", "chatft_packing", "chatft_padded", "seed"} and not any("error" in r for r in runs.values())
    # every variant trained on the same real tokens; they differ only in the padding around them
    assert len({runs[name]["real_tokens"] for name in runs}) == 1
    assert runs["chatft"]["padded_fraction"] == runs["chatft_packing"]["padded_fraction"] == 0
    assert runs["seed"]["positions"] == 12 * 64  # every sample padded to --max_length
    assert runs["chatft"]["padded_fraction"] < runs["chatft_padded"]["padded_fraction"] < runs["seed"]["padded_fraction"]
    # (MFU is not bounded by 1 on a model this tiny: its embedding rows count in N but cost no matmul)
    assert all(r["tokens_per_second"] > 0 and r["mfu"] > 0 for r in runs.values())
    assert "| lora | fp32 | seed |" in result.stdout


def test_preprocessing_benchmark(tiny_model, tmp_path):
    data = write_json(tmp_path / "train.json", CONVERSATIONS * 5)
    result = run_script("finetune/benchmark.py", "-m", str(tiny_model), "--data", str(data), "--preprocess_only",
                        "--num_samples", "0", "--repeats", "1", "--json", str(tmp_path / "pre.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "pre.json"))
    assert report["num_conversations"] == len(CONVERSATIONS) * 5
    assert set(report["seconds"]) == {"chatft", "chatft_2_workers", "chatft_cached", "seed_per_turn",
                                      "batched_call_floor"}
    assert "| seed_per_turn |" in result.stdout


def test_profile_table(tiny_model, tmp_path):
    output = tmp_path / "profile"
    result = subprocess.run(["bash", "finetune/profile.sh", "-m", str(tiny_model), "-o", str(output), "--modes",
                             "lora,full", "--lengths", "32,64", "--steps", "2",
                             "--gradient_accumulation_steps", "2"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    cells = json.load(open(output / "profile.json"))
    assert [(c["mode"], c["length"], c["status"]) for c in cells] == [
        (mode, length, "ok") for mode in ("lora", "full") for length in (32, 64)]
    assert all(c["seconds_per_iteration"] > 0 and c["peak_memory_mib"] > 0 for c in cells)
    table = (output / "profile.md").read_text()
    assert "| mode | 32 | 64 |" in table and table.count(" s/it") == 4
    assert (output / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(["bash", "finetune/profile.sh", "-m", str(tiny_model), "-o", str(output)], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr  # an earlier profile is not overwritten
