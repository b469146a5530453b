"""Qwen's profiling table, for any model: peak memory and seconds per iteration of each training mode at each
sequence length (batch 1, gradient accumulation 8, as the seed's README measured them).

    $ python -m bench.profile_table                             # bundled SmolLM2-135M, everything
    $ python -m bench.profile_table -m MODEL --modes lora,full --lengths 256,512,1024 -o output_profile
    $ python -m bench.profile_table -m qwen-1.8b --modes lora,qlora   # Qwen-1.8B's shape, beside Qwen's numbers
    $ bash finetune/profile.sh ...                               # the same, from any directory

Each cell is a fresh process running finetune.py for `--steps` optimizer steps on synthetic conversations whose
reply fills the sequence length exactly; the first step is a warm-up, the median of the others is reported.
Memory: peak CUDA memory allocated on a GPU; on the CPU, the process's peak resident memory minus what it held
before the model was loaded (the libraries), so the two read the same way. A cell that runs out of memory (or
past `--cell_timeout`) is skipped and marked. Precision and device follow the launchers' defaults
(`python -m chatft.device`); the flags of finetune/finetune_*.sh apply (activation checkpointing on).
Writes profile.md (the table), profile.json and profile.png (both curves) into the output directory.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from chatft import console

if __name__ == "__main__":  # before the libraries are imported (as finetune.py): their noise filtered
    console.start(uses=tuple(console.OPTIONAL_PACKAGES))

import transformers

from bench import harness, qwen_published
from bench.models import MODEL_HELP, resolve_model, shape_name

MODES = {
    "lora": ["--use_lora"],
    "lora_emb": ["--use_lora", "--train_embeddings", "true"],
    "qlora": ["--use_lora", "--q_lora"],
    "full": [],
}


def synthetic_samples(count: int, length: int, seed: int = 0) -> list[dict]:
    """Conversations with a short question and a reply longer than `length` tokens (truncated to it)."""
    rng = random.Random(seed)
    words = ["model", "token", "layer", "train", "data", "value", "the", "of", "and", "a", "with", "fine", "tune"]
    return [{"id": f"profile_{i}", "conversations": [
        {"from": "user", "value": "Write a long text."},
        {"from": "assistant", "value": " ".join(rng.choice(words) for _ in range(length + 64))}]}
        for i in range(count)]


class StepTimer(transformers.TrainerCallback):
    """The wall-clock seconds of every optimizer step (all its gradient accumulation micro-batches)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def run_cell(cell: dict) -> dict:
    """One mode at one length, in this (fresh) process."""
    import torch

    import finetune
    from chatft.args import parse_args as parse_finetune_flags
    from chatft.device import device_flags
    from chatft.memory import run_estimator
    from chatft.plan import plan_run

    cuda = torch.cuda.is_available()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as scratch:
        data = os.path.join(scratch, "train.json")
        with open(data, "w", encoding="utf-8") as f:
            json.dump(synthetic_samples(cell["steps"] * cell["gradient_accumulation_steps"], cell["length"]), f)
        argv = ["--model_name_or_path", cell["model"], "--data_path", data, "--output_dir", os.path.join(scratch, "out"),
                "--model_max_length", str(cell["length"]), "--max_steps", str(cell["steps"]),
                "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                str(cell["gradient_accumulation_steps"]), "--learning_rate", "1e-5", "--save_strategy", "no",
                "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True",
                "--activation_checkpointing", str(cell["activation_checkpointing"]),
                "--preprocessing_cache_dir", "none", *device_flags().split(), *MODES[cell["mode"]]]
        # what finetune.py says before it starts: the same plan (chatft.plan), its estimate (chatft.memory)
        estimate_memory = run_estimator(plan_run(*parse_finetune_flags(argv))[0])
        estimate = estimate_memory(cell["length"]) if estimate_memory is not None else None
        baseline_mib = harness.current_resident_mib()
        try:
            finetune.train(argv, callbacks=[timer])
        except torch.OutOfMemoryError:
            sys.exit(harness.OUT_OF_MEMORY)
    measured = timer.seconds[1:] or timer.seconds  # the first step warms up
    return {"seconds_per_iteration": statistics.median(measured),
            "peak_memory_mib": harness.peak_above_mib(cuda, baseline_mib),
            "estimated_memory_mib": estimate.total / 2**20 if estimate is not None else None,
            "device": "cuda" if cuda else "cpu", "flags": device_flags()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    parser.add_argument("-o", "--output_dir", default="output_profile")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated, of {', '.join(MODES)}.")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps per cell; the first is a warm-up.")
    parser.add_argument("--activation_checkpointing", default="True", choices=["True", "False"],
                        help="Recompute activations in the backward pass (finetune.py's flag; the launchers' default).")
    parser.add_argument("--cell_timeout", type=float, default=3600, help="Seconds before a cell is given up.")
    parser.add_argument("--overwrite", action="store_true", help="Replace the files of an earlier profile.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def markdown_table(results: list[dict], modes: list[str], lengths: list[int], header: str,
                   shape: str | None = None) -> str:
    """One row per mode, one column per length. For a bench.models shape with a published counterpart
    (qwen-1.8b, qwen-7b), Qwen's own number follows ours in each cell, in brackets."""
    counterpart = qwen_published.COUNTERPART.get(shape or "")
    if counterpart:
        header += (f"; [in brackets: Qwen's published {counterpart} ({qwen_published.HARDWARE}, flash attention 2, "
                   f"Qwen-1's own model code), another GPU and code than ours: {qwen_published.SOURCE}]")
    lines = [header, "", "| mode | " + " | ".join(f"{n}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for mode in modes:
        cells = []
        for length in lengths:
            r = next(r for r in results if r["mode"] == mode and r["length"] == length)
            estimated = f" (est. {r['estimated_memory_mib'] / 1024:.2f})" if r.get("estimated_memory_mib") else ""
            ours = (r["status"] if "seconds_per_iteration" not in r else
                    f"{r['peak_memory_mib'] / 1024:.2f} GiB{estimated}, {r['seconds_per_iteration']:.2f} s/it")
            theirs = qwen_published.published(shape, mode, length)
            cells.append(f"{ours} [Qwen: {theirs}]" if theirs else ours)
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], modes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        done = [r for r in results if r["mode"] == mode and "seconds_per_iteration" in r]
        lengths = [r["length"] for r in done]
        memory_axis.plot(lengths, [r["peak_memory_mib"] / 1024 for r in done], marker="o", label=mode)
        time_axis.plot(lengths, [r["seconds_per_iteration"] for r in done], marker="o", label=mode)
    for axis, label in ((memory_axis, "peak memory (GiB)"), (time_axis, "seconds per iteration")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    time_axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def profile_cell(cell: dict, timeout: float) -> dict:
    """Run one cell in a fresh process; the cell with its numbers and `status` ok, or with why it has none."""
    print(f"--- {cell['mode']} at {cell['length']} tokens", flush=True)
    try:
        run = harness.run_worker("bench.profile_table", cell, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"    skipped: over {timeout:.0f} s", flush=True)
        return {**cell, "status": f"over {timeout:.0f} s"}
    if run.out_of_memory:
        print("    skipped: out of memory", flush=True)
        return {**cell, "status": "OOM"}
    if run.failure:
        print(run.stderr[-3000:], file=sys.stderr)
        return {**cell, "status": f"failed ({run.failure})"}
    print(f"    {run.result['peak_memory_mib'] / 1024:.2f} GiB, {run.result['seconds_per_iteration']:.2f} s/it",
          flush=True)
    return {**cell, **run.result, "status": "ok"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        harness.report(run_cell(json.loads(args.worker)))
        return 0
    from chatft.errors import ArgumentError
    from chatft.output_dir import check_new_output_dir

    modes, lengths = args.modes.split(","), [int(n) for n in args.lengths.split(",")]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ArgumentError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.steps < 1:
        raise ArgumentError("--steps must be at least 1")
    check_new_output_dir(args.output_dir, args.overwrite)
    model = resolve_model(args.model)
    results = [profile_cell({"model": model, "mode": mode, "length": length, "steps": args.steps,
                             "gradient_accumulation_steps": args.gradient_accumulation_steps,
                             "activation_checkpointing": args.activation_checkpointing}, args.cell_timeout)
               for mode in modes for length in lengths]
    measured = next((r for r in results if r["status"] == "ok"), {})
    header = (f"{os.path.basename(model.rstrip('/'))}, {measured.get('device', '?')} ({measured.get('flags', '?')}), "
              f"batch 1, gradient accumulation {args.gradient_accumulation_steps}, activation checkpointing "
              f"{args.activation_checkpointing}: peak memory (the estimate finetune.py prints before training), "
              "seconds per iteration")
    table = markdown_table(results, modes, lengths, header, shape_name(args.model))
    print("\n" + table)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "profile.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "profile.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if not measured:  # nothing to draw: every cell failed, ran out of memory or out of time (the table says which)
        print(f"Wrote profile.md and profile.json to {args.output_dir}; no cell was measured, so no profile.png")
        return 1
    plot(results, modes, os.path.join(args.output_dir, "profile.png"))
    print(f"Wrote profile.md, profile.json and profile.png to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(console.run_entry_point(main))
