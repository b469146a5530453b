"""A mixture-of-experts model against a dense one of the same active parameters, and against TRL, in one run.

    $ python -m bench.moe --data ../shared/data/alpaca_en_demo.json       # the defaults below
    $ python -m bench.moe --hidden 1024 --layers 2 --experts 8 --top_k 2 --expert_width 768 --num_samples 8 \
        --max_length 128 --precision fp32 --json moe.json

Two random-initialised models (bench.models: seed 0, the real Qwen tokenizer, cached under
chatft.cache_root()/bench-models by their shape's name) of the same attention, layers, vocabulary and untied output
layer:
- moe: qwen3_moe, every layer `--experts` routed experts of width `--expert_width`, `--top_k` per token (Qwen3-30B-A3B's
  expert width is 768; it has 128 experts, 8 per token, 48 layers);
- dense: qwen3 whose MLP is top_k x expert_width wide, so that a token passes through as many weights in both.
Active parameters are counted from each model (built on the meta device): every parameter (tied ones once), the
routed experts' fused weights at top_k / experts of their size; the MoE model's router is active and has no dense
counterpart, so the counts differ by it.

Each variant runs one epoch over the same first `--num_samples` conversations, in a fresh process, through
bench.throughput's worker (the same code, flags and token counting as its table): `chatft` (finetune.train, the
toolkit's defaults) on both models and `trl` / `trl_padding_free` (TRL's SFTTrainer, padded and padding-free) on the
MoE model, in `--mode` (LoRA: attention and, on the MoE model, the routed experts, as chatft's and the TRL variants'
LoRA configs adapt them) and `--precision`. Printed: real (non-padding) tokens/s, tokens/s per billion active
parameters, peak memory above the libraries against chatft.memory's estimate (what finetune.py logs before
training), and the targets of issue 27. On the CPU the workers run with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=131072, as tests/test_memory.py measures), so that the resident peak follows live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from chatft import console

if __name__ == "__main__":  # before the libraries are imported (as finetune.py): their noise filtered
    console.start(uses=tuple(console.OPTIONAL_PACKAGES))

from bench import harness
from bench.models import SHAPES, materialize
from chatft.errors import ArgumentError

# the targets of issue 27
TARGET_PER_ACTIVE = 0.6  # MoE tokens/s per active parameter >= 0.6x the dense model's
TARGET_VS_TRL = 2.0  # chatft on the MoE model >= 2x TRL's SFTTrainer (its best variant)
TARGET_MEMORY = 0.25  # peak memory within 25% of chatft.memory's estimate
VARIANTS = (("moe", "chatft"), ("dense", "chatft"), ("moe", "trl"), ("moe", "trl_padding_free"))


def shapes(hidden: int, layers: int, experts: int, top_k: int, expert_width: int, heads: int, kv_heads: int,
           head_dim: int) -> dict[str, dict]:
    """The two shapes, named by their sizes (bench.models caches each under its name): Qwen3's attention and
    vocabulary (qwen2.5-0.5b's entry: the Qwen tokenizer's 151936), an untied output layer as Qwen3-30B-A3B's."""
    common = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": SHAPES["qwen2.5-0.5b"]["vocab_size"],
              "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "tie_word_embeddings": False}
    size = f"h{hidden}-l{layers}-a{heads}x{head_dim}-kv{kv_heads}"
    return {
        f"qwen3-moe-{size}-e{experts}k{top_k}-w{expert_width}": {
            **common, "model_type": "qwen3_moe", "num_experts": experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": expert_width, "intermediate_size": top_k * expert_width, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False},
        f"qwen3-dense-{size}-w{top_k * expert_width}": {
            **common, "model_type": "qwen3", "intermediate_size": top_k * expert_width},
    }


def parameter_counts(model_dir: str) -> dict:
    """Total and active parameters of the model saved in `model_dir` (built on the meta device from its config), and
    its embedding and output layer's."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    top_k, experts = getattr(config, "num_experts_per_tok", 0), getattr(config, "num_experts", 0)
    total = active = 0
    for name, parameter in model.named_parameters():  # tied parameters once
        total += parameter.numel()
        routed = parameter.dim() == 3 and name.split(".")[-2] == "experts"
        active += parameter.numel() * top_k // experts if routed else parameter.numel()
    embeddings = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  for p in m.parameters()}
    return {"total_parameters": total, "active_parameters": active, "embedding_parameters": sum(embeddings.values())}


def loaded_experts_implementation(model_dir: str) -> str:
    """The experts implementation transformers picks when finetune.py loads the model (no `experts_implementation`
    given): read from a model loaded as chatft loads it, on the meta device."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.config._experts_implementation


def measure(config: dict) -> dict:
    result = harness.trained_run("bench.throughput", config)
    if "error" in result:
        return result
    print(f"    {result['tokens_per_second']:.1f} real tokens/s, peak {result['peak_above_baseline_mib']:.0f} MiB above "
          f"the libraries" + (f" (estimate {result['estimated_memory_mib']:.0f})"
                              if result.get("estimated_memory_mib") else ""), flush=True)
    return result


def summarize(runs: list[dict], counts: dict[str, dict]) -> dict:
    """Medians per (model, variant) over the repeats; the ratios against issue 27's targets."""
    rows = {}
    for run in runs:
        rows.setdefault((run["model_kind"], run["variant"]), []).append(run)
    table = []
    for (kind, variant), group in rows.items():
        failed = [run for run in group if "error" in run]
        row = {"model": kind, "variant": variant, "runs": len(group), **counts[kind]}
        if failed:
            table.append({**row, "error": failed[0]["error"]})
            continue
        speeds = [run["tokens_per_second"] for run in group]
        row |= {"tokens_per_second": statistics.median(speeds), "tokens_per_second_min": min(speeds),
                "tokens_per_second_max": max(speeds), "real_tokens": group[0]["real_tokens"],
                "padded_fraction": 1 - group[0]["real_tokens"] / group[0]["positions"],
                "peak_above_baseline_mib": statistics.median(run["peak_above_baseline_mib"] for run in group),
                "estimated_memory_mib": group[0].get("estimated_memory_mib")}
        row["tokens_per_second_per_billion_active"] = row["tokens_per_second"] / (row["active_parameters"] / 1e9)
        table.append(row)
    ok = {(r["model"], r["variant"]): r for r in table if "error" not in r}
    targets = {}
    moe, dense = ok.get(("moe", "chatft")), ok.get(("dense", "chatft"))
    if moe and dense:
        value = moe["tokens_per_second_per_billion_active"] / dense["tokens_per_second_per_billion_active"]
        targets["moe_vs_dense_per_active_parameter"] = {"value": value, "target": TARGET_PER_ACTIVE,
                                                       "met": value >= TARGET_PER_ACTIVE}
    trl = [r for (kind, variant), r in ok.items() if kind == "moe" and variant.startswith("trl")]
    if moe and trl:
        best = max(trl, key=lambda r: r["tokens_per_second"])
        value = moe["tokens_per_second"] / best["tokens_per_second"]
        targets["chatft_vs_trl_best"] = {"value": value, "target": TARGET_VS_TRL, "met": value >= TARGET_VS_TRL,
                                         "trl_variant": best["variant"]}
    for kind, row in (("moe", moe), ("dense", dense)):
        if row and row["estimated_memory_mib"]:
            value = row["estimated_memory_mib"] / row["peak_above_baseline_mib"] - 1
            targets[f"{kind}_memory_estimate_error"] = {"value": value, "target": TARGET_MEMORY,
                                                        "met": abs(value) <= TARGET_MEMORY}
    return {"rows": table, "targets": targets}


def print_report(summary: dict) -> None:
    print("\n| model | variant | active parameters | total parameters | real tokens/s | padding | tokens/s per B active "
          "| peak MiB above libraries | estimate MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        if "error" in r:
            print(f"| {r['model']} | {r['variant']} | {r['active_parameters']:,} | {r['total_parameters']:,} | "
                  f"failed: {r['error']} |||||")
            continue
        spread = (f" ({r['tokens_per_second_min']:.1f}-{r['tokens_per_second_max']:.1f})" if r["runs"] > 1 else "")
        estimate = f"{r['estimated_memory_mib']:.0f}" if r["estimated_memory_mib"] else "-"
        print(f"| {r['model']} | {r['variant']} | {r['active_parameters']:,} | {r['total_parameters']:,} | "
              f"{r['tokens_per_second']:.1f}{spread} | {100 * r['padded_fraction']:.0f}% | "
              f"{r['tokens_per_second_per_billion_active']:.1f} | {r['peak_above_baseline_mib']:.0f} | {estimate} |")
    print()
    for name, t in summary["targets"].items():
        if name.endswith("memory_estimate_error"):
            line = f"{100 * t['value']:+.0f}% (within {100 * t['target']:.0f}%)"
        else:
            line = f"{t['value']:.2f}x (target >= {t['target']}x" + (f", TRL's {t['trl_variant']})" if "trl_variant" in t
                                                                       else ")")
        print(f"target {name}: {line}: {'met' if t['met'] else 'missed'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(harness.ROOT, "data", "identity_demo.json"),
                        help="A data file in any format finetune.py reads (text conversations: TRL renders them too).")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--expert_width", type=int, default=768, help="Each expert's intermediate size.")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="fp32 by default: bf16 matmuls are slow on a CPU without native bf16 (AVX512-BF16, AMX).")
    parser.add_argument("--variants", default=",".join(f"{m}:{v}" for m, v in VARIANTS),
                        help="Comma-separated model:variant pairs (model: moe or dense; variant: bench.throughput's).")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per variant, interleaved; medians are reported.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from bench.throughput import CHATFT_VARIANTS, TRL_VARIANTS, trl_messages
    from chatft.data.datasets import load_samples

    variants = [tuple(item.split(":", 1)) for item in args.variants.split(",")]
    bad = [":".join(v) for v in variants if len(v) != 2 or v[0] not in ("moe", "dense")
           or v[1] not in {*CHATFT_VARIANTS, *TRL_VARIANTS}]
    if bad:
        raise ArgumentError(f"--variants: {', '.join(bad)} is not model:variant (model moe or dense, variant one of "
                            f"{', '.join([*CHATFT_VARIANTS, *TRL_VARIANTS])}).")
    if args.repeats < 1:
        raise ArgumentError(f"--repeats {args.repeats}: give 1 or more.")
    samples = load_samples(args.data)[: args.num_samples]  # the data's problems, once here rather than per worker
    if any(variant in TRL_VARIANTS for _, variant in variants):
        for sample in samples:
            trl_messages(sample)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # inherited by the workers
    named = shapes(args.hidden, args.layers, args.experts, args.top_k, args.expert_width, args.heads, args.kv_heads,
                   args.head_dim)
    models = {kind: str(materialize(name, named)) for kind, name in zip(("moe", "dense"), named)}
    counts = {kind: parameter_counts(path) for kind, path in models.items()}
    implementation = loaded_experts_implementation(models["moe"])
    cuda = torch.cuda.is_available()
    for kind, path in models.items():
        c = counts[kind]
        print(f"{kind}: {os.path.basename(path)}: {c['active_parameters']:,} active of {c['total_parameters']:,} "
              f"parameters ({c['embedding_parameters']:,} in the embedding and output layer)", flush=True)
    print(f"experts implementation (transformers' default, as finetune.py loads the model): {implementation}",
          flush=True)
    runs = []
    for repeat in range(args.repeats):  # round-robin: a slow spell of the machine hits every variant alike
        for kind, variant in variants:
            config = {"model": models[kind], "data": os.path.abspath(args.data), "num_samples": args.num_samples,
                      "max_length": args.max_length, "batch_size": args.batch_size, "mode": args.mode,
                      "precision": args.precision, "variant": variant, "cuda": cuda}
            print(f"--- {kind} {variant} {args.mode} {args.precision} (run {repeat + 1} of {args.repeats})", flush=True)
            runs.append({**measure(config), "model_kind": kind, "repeat": repeat})
    summary = summarize(runs, counts)
    summary |= {"experts_implementation": implementation, "device": "cuda" if cuda else "cpu", "mode": args.mode,
                "precision": args.precision, "shapes": named}
    print_report(summary)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**summary, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(console.run_entry_point(main))
