"""Peak memory of full-parameter, LoRA and Q-LoRA training on the same model, batch and sequence length.

    python -m bench.memory                      # the bundled SmolLM2-135M-Instruct
    python -m bench.memory -m MODEL --seq-len 512 --batch-size 4 --steps 3 --json out.json

Each mode runs in a fresh process (so one mode's peak does not hide another's), plans the run and loads
the model exactly as finetune.py does (chatft.plan.plan_run, chatft.model.load.load_model), and takes
`--steps` optimizer steps on random tokens.
Printed per mode: weight memory (parameters and buffers), peak memory (CUDA: max allocated; CPU: the
process's peak resident set above what it held before loading), and tokens per second.
"""

import argparse
import json
import sys
import time

from chatft import console

if __name__ == "__main__":  # before the libraries are imported (as finetune.py): their noise filtered
    console.start(uses=tuple(console.OPTIONAL_PACKAGES))

from bench import harness
from bench.models import MODEL_HELP, resolve_model

MODES = {
    "full": [],
    "lora": ["--use_lora", "--lora_dropout", "0"],
    "qlora": ["--use_lora", "--lora_dropout", "0", "--q_lora"],
}


def measure(config: dict) -> dict:
    """Run one mode in this (fresh) process and return its numbers."""
    import torch

    from chatft.args import parse_args
    from chatft.model.load import join_process_group, load_model
    from chatft.plan import plan_run

    mode, model_path, seq_len, batch_size, steps = (config[k] for k in ("mode", "model", "seq_len", "batch_size", "steps"))
    on_cuda = torch.cuda.is_available()
    flags = ["--model_name_or_path", model_path, "--data_path", "unused.json", "--output_dir", "unused",
             "--bf16", "True", "--activation_checkpointing", "--model_max_length", str(seq_len),
             *MODES[mode]]
    model_args, data_args, training_args, lora_args = parse_args(flags + ([] if on_cuda else ["--use_cpu", "True"]))
    join_process_group(training_args)
    baseline_mib = harness.current_resident_mib()
    plan, tokenizer = plan_run(model_args, data_args, training_args, lora_args)
    model = load_model(plan, lora_args, device=training_args.device)
    if mode != "qlora":  # 4-bit weights were placed by their device map
        model.to(training_args.device)
    model.train()
    if plan.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(100, len(tokenizer) - 100, (batch_size, seq_len), device=training_args.device)
    start = None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            start = time.perf_counter()
        with torch.autocast(training_args.device.type, dtype=plan.compute_dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if on_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "mode": mode,
        "device": str(training_args.device),
        "weights_mib": round(weight_bytes / 2**20, 1),
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_mib": round(harness.peak_above_mib(on_cuda, baseline_mib), 1),
        "tokens_per_s": round(steps * batch_size * seq_len / elapsed, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="full,lora,qlora")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        harness.report(measure(json.loads(args.worker)))
        return 0

    model_path = resolve_model(args.model)
    results = []
    for mode in args.modes.split(","):
        run = harness.run_worker("bench.memory", {"mode": mode, "model": model_path, "seq_len": args.seq_len,
                                                  "batch_size": args.batch_size, "steps": args.steps})
        if run.failure:
            print(f"{mode}: failed ({run.failure})\n{run.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(run.result)
    lora = next((r for r in results if r["mode"] == "lora"), None)
    print(f"model {model_path}, batch {args.batch_size} x {args.seq_len} tokens, bf16, activation checkpointing")
    print(f"{'mode':6} {'device':6} {'weights MiB':>12} {'trainable':>11} {'peak MiB':>9} {'tokens/s':>9} {'peak vs LoRA':>13}")
    for r in results:
        ratio = f"{r['peak_mib'] / lora['peak_mib']:.2f}x" if lora else "-"
        print(f"{r['mode']:6} {r['device']:6} {r['weights_mib']:12.1f} {r['trainable_params']:11,d} "
              f"{r['peak_mib']:9.1f} {r['tokens_per_s']:9.1f} {ratio:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(console.run_entry_point(main))
