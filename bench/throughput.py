"""Training throughput and memory of this toolkit against the seed's padding and TRL's SFTTrainer, in one run.

    $ python -m bench.throughput --data ../shared/data/alpaca_en_demo.json       # bundled SmolLM2-135M
    $ python -m bench.throughput -m qwen2.5-0.5b --data ../shared/data/alpaca_en_demo.json --precisions bf16
                                                      # Qwen2.5-0.5B's shape, random weights (bench.models)
    $ python -m bench.throughput -m MODEL --data FILE --num_samples 64 --max_length 512 --batch_size 4 \
        --modes lora,full --precisions fp32,bf16 --json benchmark.json
    $ python -m bench.throughput --preprocess_only --data ../shared/data/alpaca_en_demo.json --num_samples 0

Every variant trains one epoch over the same first `--num_samples` samples of the data file (any format
finetune.py reads, converted by chatft's own readers), rendered as ChatML with the default system message
(--chat_format chatml, whatever the model's own template), with the same model, sequence length, batch size,
optimizer (AdamW), learning rate and loss (every assistant turn, nothing else), each in a fresh process.
Reported per variant:
- real tokens/s: non-padding tokens trained on, over the Trainer's train_runtime (model loading excluded);
- padded: the fraction of positions that were padding;
- peak RSS (CPU: the process's peak resident memory, model included) or peak CUDA memory;
- MFU: the training's matmul FLOPs per second over this device's measured matmul rate (bench.throughput.matmul_flops):
  for every linear layer of the model as trained, LoRA's own A and B matrices included, 2 x its weights per
  token forward, 2 x backward to its input, and 2 x more for its weight's gradient where it trains; the output
  layer counted only at labelled positions (the loss needs no other logits), the embedding lookup and the
  attention scores not at all. The same count for every variant, so MFU ratios are speed ratios;
- the ratio of this toolkit's default to every other variant.
With --repeats N every variant runs N times, interleaved (round-robin over the variants, so a slow spell of the
machine hits all of them), and the table shows the median with the spread (min-max); ratios are of medians.
Variants: chatft (the toolkit's defaults: padding-free batches of --batch_size samples, attention per sample,
loss on labelled positions only), chatft_packing (--packing True: rows of --max_length, so fewer, larger steps),
chatft_masked_attention, chatft_padded and chatft_full_logits (one default turned off each: transformers' sdpa
with its block-diagonal mask, batches padded to their longest sample, the loss on full logits),
chatft_checkpointing (--activation_checkpointing True, as Qwen's launchers pass it: less memory, more compute),
chatft_adamw_torch (--optim adamw_torch, Qwen's setting: the same AdamW update, one tensor at a time, unfused),
seed (every batch padded to --max_length, full-logits loss), and, when TRL is installed, trl (SFTTrainer, padded batches) and
trl_padding_free (its packed, padding-free rows). TRL gets the same conversations as OpenAI-style messages (its
conversational format, every turn) and a ChatML template that renders them as the toolkit does, so it trains on
the same tokens; this needs text conversations (no tool calls or reasoning traces) and a tokenizer that has the
ChatML tokens (<|im_start|>, <|im_end|>).
Peak memory is also given above the process's resident memory before the model was loaded (the libraries).
`--stage dpo` gives the DPO rows instead: chatft's --stage dpo against TRL's DPOTrainer on the same pairs (bench.dpo).
"""

import argparse
import json
import os
import sys
import tempfile
import time

from chatft import console

if __name__ == "__main__":  # before the libraries are imported (as finetune.py): their noise filtered
    console.start(uses=tuple(console.OPTIONAL_PACKAGES))

from bench import harness
from bench.models import MODEL_HELP, resolve_model
from chatft.data.chat_format import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, IM_END, IM_START, render_chatml, to_conversation
from chatft.errors import ArgumentError

CHATFT_VARIANTS = {
    "chatft": [],  # the defaults: padding-free batches, per-sample attention, loss at labelled positions only
    "chatft_packing": ["--packing", "True"],  # the opt-in: fixed rows of max_length (fewer, larger steps)
    "chatft_masked_attention": ["--attn_implementation", "sdpa"],  # ablations: what each default is worth
    "chatft_padded": ["--padding_free", "False"],
    "chatft_full_logits": ["--labelled_logits_only", "False"],
    "chatft_checkpointing": ["--activation_checkpointing", "True"],  # the launchers' recipe: memory for speed
    "chatft_adamw_torch": ["--optim", "adamw_torch"],  # Qwen's optimizer setting: AdamW one tensor at a time
    "seed": ["--pad_to_max_length", "True", "--labelled_logits_only", "False"],
}
TRL_VARIANTS = {"trl": False, "trl_padding_free": True}  # the latter: TRL's packed, padding-free rows


def trl_chat_template(system_message: str, newline_after_last_reply: bool = True) -> str:
    """ChatML as chatft.data.chat_format.render_chatml writes a text conversation, with TRL's `{% generation %}` marks
    around what the toolkit trains on: each assistant reply and its `<|im_end|>`. Without `newline_after_last_reply`
    a conversation that ends with a reply ends at its `<|im_end|>`, as chatft's preference pairs do (bench.dpo)."""
    newline = ("{{- '\\n' }}" if newline_after_last_reply
               else "{%- if not (loop.last and message['role'] == 'assistant') %}{{- '\\n' }}{%- endif %}")
    return (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        "{%- set system_message = " + json.dumps(system_message, ensure_ascii=False) + " %}"
        "{%- set loop_messages = messages %}"
        "{%- endif %}"
        "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
        "{%- for message in loop_messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
        "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
        + newline +
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def trl_messages(sample: dict) -> list[dict]:
    """A validated sample (chatft.data.datasets.load_samples) -> TRL's conversational format, every turn kept.

    >>> trl_messages({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"},
    ...                                 {"from": "user", "value": "Bye"}, {"from": "assistant", "value": "Bye!"}]})
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'Bye!'}]
    """
    conversation = to_conversation(sample)
    if conversation.tools or any(t.tool_calls or t.reasoning or t.role == "tool" for t in conversation.turns):
        raise ArgumentError(f"sample {conversation.id if conversation.id is not None else '?'!r} has tool calls or a reasoning trace, which the TRL "
                            "variants do not render like the toolkit; use text conversations, or --variants without "
                            "trl and trl_padding_free.")
    return [{"role": turn.role, "content": turn.content} for turn in conversation.turns]


def matmul_flops_per_second(dtype_name: str, size: int | None = None, seconds: float = 2.0) -> float:
    """This device's sustained dense matmul rate (FLOP/s) in fp32, or in bf16 where autocast would use it. Products of
    2048 x 2048 on a CPU; 8192 x 8192 on a GPU, where smaller ones leave it idle between launches (the peak would be
    underestimated, the MFU overstated)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or (8192 if device == "cuda" else 2048)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()  # the timer starts when the warm-up has run, not when it was queued
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


class CountingCollator:
    """Wraps a collator; counts the real (non-padding), labelled (trained on) and total positions of every batch."""

    def __init__(self, collator):
        self.collator = collator
        self.real_tokens = self.labelled_tokens = self.positions = 0

    def __call__(self, features):
        batch = self.collator(features)
        if "attention_mask" in batch:
            self.real_tokens += int(batch["attention_mask"].sum())
        elif "position_ids" in batch:  # padding-free rows: every position is a sample's token
            self.real_tokens += sum(len(f["input_ids"]) for f in features)
        else:
            raise ValueError(f"{type(self.collator).__name__} made a batch with neither attention_mask nor "
                             "position_ids: its padding cannot be told from its tokens.")
        self.labelled_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        self.positions += batch["input_ids"].numel()
        return batch


def matmul_flops(model) -> dict:
    """Training FLOPs of the model's linear layers (LoRA's A and B included; the embedding lookup and attention scores
    not counted): per token for every layer but the output layer, and per labelled token for the output layer.

    Each linear layer costs 2 x weights per token forward, 2 x backward to its input, and 2 x more for its weight's
    gradient when that weight trains. Of the output layer's copies (peft's modules_to_save keeps the frozen original
    beside the trained one) the one that runs counts: the trained one when there is one."""
    import torch

    head = model.get_output_embeddings()
    head_ids = {id(module) for module in head.modules()} if head is not None else set()
    per_token, head_costs = 0, [0]
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        cost = 2 * module.in_features * module.out_features * (3 if module.weight.requires_grad else 2)
        if id(module) in head_ids:
            head_costs.append(cost)
        else:
            per_token += cost
    return {"flops_per_token": per_token, "flops_per_labelled_token": max(head_costs)}


def measured(trainer, runtime: float, counter: CountingCollator, baseline_mib: float) -> dict:
    """A worker's numbers, from its trained Trainer and the counts of its collator."""
    return {"train_runtime": runtime, "real_tokens": counter.real_tokens, "labelled_tokens": counter.labelled_tokens,
            "positions": counter.positions,
            "num_parameters": sum(p.numel() for p in trainer.model.parameters() if p.dim() > 0),
            **matmul_flops(trainer.model), "baseline_mib": baseline_mib}


def run_chatft(config: dict, samples: list[dict], scratch: str) -> dict:
    """One chatft variant: finetune.train with the variant's flags, its collator wrapped in a CountingCollator."""
    import finetune

    from chatft.args import parse_args as parse_finetune_flags
    from chatft.data.datasets import read_json_or_jsonl
    from chatft.memory import longest_batch_tokens, run_estimator
    from chatft.plan import plan_run

    data_file = os.path.join(scratch, "train.json")
    with open(data_file, "w", encoding="utf-8") as f:  # the records of the same samples, in the file's own format
        json.dump(read_json_or_jsonl(config["data"])[0][: len(samples)], f, ensure_ascii=False)
    argv = ["--model_name_or_path", config["model"], "--data_path", data_file,
            "--output_dir", os.path.join(scratch, "out"),
            "--num_train_epochs", "1", "--per_device_train_batch_size", str(config["batch_size"]),
            "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--model_max_length", str(config["max_length"]),
            "--logging_steps", "1000", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--chat_format", "chatml"]
    argv += ["--use_lora", "--lora_dropout", "0"] if config["mode"] == "lora" else []
    argv += ["--bf16", "True"] if config["precision"] == "bf16" else []
    argv += [] if config["cuda"] else ["--use_cpu", "True"]
    argv += CHATFT_VARIANTS[config["variant"]]
    # what finetune.py logs before training: the plan's estimate (chatft.memory), taken before the baseline
    estimate_memory = run_estimator(plan_run(*parse_finetune_flags(argv))[0])
    baseline_mib = harness.current_resident_mib()
    trainer = finetune.train(argv, wrap_collator=CountingCollator)
    result = measured(trainer, trainer.state.log_history[-1]["train_runtime"], trainer.data_collator, baseline_mib)
    tokens = longest_batch_tokens(trainer.train_dataset, config["batch_size"], config["max_length"])
    result["estimated_memory_mib"] = estimate_memory(tokens).total / 2**20 if estimate_memory is not None else None
    return result


def run_trl(config: dict, samples: list[dict], scratch: str) -> dict:
    """One TRL variant: SFTTrainer on the samples as messages, loss on every assistant turn."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from chatft.model.load import expert_parameter_names

    baseline_mib = harness.current_resident_mib()
    rows = [{"messages": trl_messages(sample)} for sample in samples]
    tokenizer = transformers.AutoTokenizer.from_pretrained(config["model"])
    if not {IM_START, IM_END} <= tokenizer.get_vocab().keys():  # chatft adds them (and trains their embeddings)
        raise ArgumentError(f"{config['model']}: the tokenizer lacks {IM_START} or {IM_END}, which the TRL variants do "
                            "not add; benchmark a ChatML model, or --variants without trl and trl_padding_free.")
    tokenizer.chat_template = trl_chat_template(DEFAULT_SYSTEM_MESSAGE)
    model = transformers.AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    args = trl.SFTConfig(
        output_dir=os.path.join(scratch, "out"), num_train_epochs=1, per_device_train_batch_size=config["batch_size"],
        learning_rate=1e-4, lr_scheduler_type="constant", max_length=config["max_length"], logging_steps=1000,
        save_strategy="no", report_to="none", seed=0, bf16=config["precision"] == "bf16",
        use_cpu=not config["cuda"], gradient_checkpointing=False, assistant_only_loss=True,
        # TRL enforces max_length in padding-free mode only through its best-fit-decreasing packing
        padding_free=TRL_VARIANTS[config["variant"]], packing=TRL_VARIANTS[config["variant"]], packing_strategy="bfd",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    # a mixture-of-experts model: its routed experts adapted too (peft's target_parameters), as chatft's LoRA does
    experts = expert_parameter_names(model) or None
    lora = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM",
                           target_parameters=experts)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora if config["mode"] == "lora" else None)
    counter = CountingCollator(trainer.data_collator)  # the collator SFTTrainer built from args, counted
    trainer.data_collator = counter
    result = trainer.train()
    return measured(trainer, result.metrics["train_runtime"], counter, baseline_mib)


def worker(config: dict) -> dict:
    """One variant in this (fresh) process."""
    from chatft.data.datasets import load_samples

    with tempfile.TemporaryDirectory() as scratch:
        if config.get("stage") == "dpo":  # a pair file (bench.dpo)
            from bench import dpo

            result = dpo.worker(config, scratch)
        else:
            samples = load_samples(config["data"])[: config["num_samples"]]
            runner = run_trl if config["variant"] in TRL_VARIANTS else run_chatft
            result = runner(config, samples, scratch)
    result["peak_memory_mib"] = harness.peak_memory_mib(config["cuda"])
    result["peak_above_baseline_mib"] = harness.peak_above_mib(config["cuda"], result["baseline_mib"])
    return result


def seed_preprocess(sources, tokenizer, max_len: int, system_message: str) -> dict:
    """The seed's (Qwen's finetune.py) preprocessing, for the timing comparison: every turn tokenized by its own
    tokenizer calls, every sample padded to max_len."""
    import torch

    ignore = -100
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    im_start, im_end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    input_ids, targets = [], []
    for source in sources:
        if roles[source[0]["from"]] != roles["user"]:
            source = source[1:]
        system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
        input_id, target = list(system), [im_start] + [ignore] * (len(system) - 3) + [im_end] + nl_tokens
        for sentence in source:
            role = roles[sentence["from"]]
            _input_id = tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["value"]).input_ids + [im_end] + nl_tokens
            input_id += _input_id
            if role == "<|im_start|>user":
                _target = [im_start] + [ignore] * (len(_input_id) - 3) + [im_end] + nl_tokens
            else:
                _target = ([im_start] + [ignore] * len(tokenizer(role).input_ids)
                           + _input_id[len(tokenizer(role).input_ids) + 1 : -2] + [im_end] + nl_tokens)
            target += _target
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [ignore] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    input_ids = torch.tensor(input_ids, dtype=torch.int)
    return {"input_ids": input_ids, "labels": torch.tensor(targets, dtype=torch.int),
            "attention_mask": input_ids.ne(tokenizer.pad_token_id)}


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def benchmark_preprocessing(model: str, data: str, num_samples: int | None, max_length: int, workers: int,
                            repeats: int) -> dict:
    """Conversations per second: this toolkit's preprocessing (cold, with workers, from its cache), the seed's
    per-turn tokenization, and one batched fast-tokenizer call over the same rendered texts (the floor)."""
    import transformers

    from chatft.data.datasets import SupervisedDataset, load_samples

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    samples = load_samples(data)[:num_samples]
    texts = [render_chatml(to_conversation(s), DEFAULT_SYSTEM_MESSAGE)[0] for s in samples]
    timings = {}
    with tempfile.TemporaryDirectory() as cache:
        timings["chatft"] = best_time(lambda: SupervisedDataset(samples, tokenizer, max_length), repeats)
        if workers > 1:
            timings[f"chatft_{workers}_workers"] = best_time(
                lambda: SupervisedDataset(samples, tokenizer, max_length, num_workers=workers), repeats)
        SupervisedDataset(samples, tokenizer, max_length, cache_dir=cache)  # fills the cache
        timings["chatft_cached"] = best_time(lambda: SupervisedDataset(samples, tokenizer, max_length, cache_dir=cache),
                                             repeats)
    timings["seed_per_turn"] = best_time(
        lambda: seed_preprocess([[{"from": t.role, "value": t.content} for t in s.turns] for s in samples], tokenizer,
                                max_length, DEFAULT_SYSTEM_MESSAGE),
        repeats)
    timings["batched_call_floor"] = best_time(lambda: tokenizer(texts, add_special_tokens=False), repeats)
    print(f"\n{len(samples)} conversations, {sum(map(len, texts))} characters, max_length {max_length}, "
          f"best of {repeats}\n")
    print("| preprocessing | conversations/s | seconds | vs seed per-turn | vs batched call |")
    print("|---|---|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {len(samples) / seconds:,.0f} | {seconds:.3f} | {timings['seed_per_turn'] / seconds:.1f}x | "
              f"{timings['batched_call_floor'] / seconds:.2f}x |")
    return {"num_conversations": len(samples), "seconds": timings}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    parser.add_argument("--data", default=os.path.join(harness.ROOT, "data", "identity_demo.json"),
                        help="A data file in any format finetune.py reads (conversations, sharegpt, messages, alpaca).")
    parser.add_argument("--stage", default="sft", choices=["sft", "dpo"],
                        help="sft: the table above. dpo: chatft's --stage dpo against TRL's DPOTrainer on pairs built "
                        "from --data's conversations (bench.dpo; LoRA only).")
    parser.add_argument("--num_samples", type=int, default=32, help="Conversations (--stage dpo: pairs).")
    parser.add_argument("--max_length", type=int, default=None, help="Default 512 (--stage dpo: 1024).")
    parser.add_argument("--long_prompts", default="128,512",
                        help="--stage dpo: the prompt lengths (tokens) of the long-prompt pair sets, comma-separated.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--modes", default=None, help="Default lora,full (--stage dpo: lora).")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variants", default=None, help="Comma-separated (default: all available).")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    parser.add_argument("--preprocess_only", action="store_true",
                        help="Time preprocessing only (no training): this toolkit vs the seed's per-turn tokenization "
                        "vs one batched tokenizer call. --num_samples 0: the whole file.")
    parser.add_argument("--preprocessing_num_workers", type=int, default=2, help="With --preprocess_only.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Runs per variant, interleaved: the table shows medians and their spread (min-max). With "
                        "--preprocess_only: the best of this many.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.max_length = args.max_length or (1024 if args.stage == "dpo" else 512)
    args.modes = args.modes or ("lora" if args.stage == "dpo" else "lora,full")
    return args


def measure_variant(config: dict, matmul_rate: float) -> dict:
    """Train one variant in a fresh process; its numbers, or its config with an `error`."""
    result = harness.trained_run("bench.throughput", config)
    if "error" in result:
        return result
    result["padded_fraction"] = 1 - result["real_tokens"] / result["positions"]
    flops = result["flops_per_token"] * result["real_tokens"] + result["flops_per_labelled_token"] * result["labelled_tokens"]
    result["mfu"] = flops / result["train_runtime"] / matmul_rate
    print(f"    {result['tokens_per_second']:.1f} real tokens/s, {100 * result['padded_fraction']:.0f}% "
          f"padding, peak {result['peak_memory_mib']:.0f} MiB ({result['peak_above_baseline_mib']:.0f} "
          f"above the libraries), MFU {100 * result['mfu']:.1f}%", flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        harness.report(worker(json.loads(args.worker)))
        return 0
    import importlib.util

    import torch

    from chatft.data.datasets import load_samples

    if args.repeats < 1:
        raise ArgumentError(f"--repeats {args.repeats}: give 1 or more.")
    model = resolve_model(args.model)
    if args.preprocess_only:
        result = benchmark_preprocessing(model, args.data, args.num_samples or None, args.max_length,
                                         args.preprocessing_num_workers, args.repeats)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        return 0
    if args.stage == "dpo":
        from bench import dpo

        return dpo.main(args, model, torch.cuda.is_available())
    variants = args.variants.split(",") if args.variants else [
        *CHATFT_VARIANTS, *(TRL_VARIANTS if importlib.util.find_spec("trl") else [])]
    unknown = [name for name in variants if name not in CHATFT_VARIANTS and name not in TRL_VARIANTS]
    if unknown:
        raise ArgumentError(f"--variants: unknown {', '.join(unknown)}; choose from "
                            f"{', '.join([*CHATFT_VARIANTS, *TRL_VARIANTS])}.")
    samples = load_samples(args.data)[: args.num_samples]  # the data's problems, once here rather than per worker
    if any(name in TRL_VARIANTS for name in variants):
        for sample in samples:
            trl_messages(sample)
    cuda = torch.cuda.is_available()
    gemm = {precision: matmul_flops_per_second(precision) for precision in args.precisions.split(",")}
    print("matmul rate: " + ", ".join(f"{p} {rate / 1e9:.0f} GFLOP/s" for p, rate in gemm.items()), flush=True)
    runs = []
    for repeat in range(args.repeats):  # round-robin: a slow spell of the machine hits every variant alike
        for mode in args.modes.split(","):
            for precision in args.precisions.split(","):
                for variant in variants:
                    config = {"model": model, "data": os.path.abspath(args.data), "num_samples": args.num_samples,
                              "max_length": args.max_length, "batch_size": args.batch_size, "mode": mode,
                              "precision": precision, "variant": variant, "cuda": cuda}
                    print(f"--- {mode} {precision} {variant} (run {repeat + 1} of {args.repeats})", flush=True)
                    runs.append({**measure_variant(config, gemm[precision]), "repeat": repeat})
    results = summarize(runs)
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"matmul_flops_per_second": gemm, "repeats": args.repeats, "results": results, "runs": runs},
                      f, indent=2)
    return 0


SUMMARIZED = ("tokens_per_second", "mfu", "peak_memory_mib", "peak_above_baseline_mib", "train_runtime")


def summarize(runs: list[dict]) -> list[dict]:
    """One result per (mode, precision, variant): medians and spread over its runs (bench.harness.medians)."""
    return harness.medians(runs, ("mode", "precision", "variant"), SUMMARIZED)


def with_spread(result: dict, name: str, scale: float = 1.0, digits: int = 1) -> str:
    """`median` alone for one run, `median (min-max)` for several."""
    value = f"{scale * result[name]:.{digits}f}"
    if result["runs"] == 1:
        return value
    return f"{value} ({scale * result[name + '_min']:.{digits}f}-{scale * result[name + '_max']:.{digits}f})"


def print_table(results: list[dict]) -> None:
    """Markdown, with the ratio of this toolkit's default to each variant: speed (x faster) and memory. With several
    runs per variant: medians, with the spread in brackets, and ratios of medians."""
    print("\n| mode | precision | variant | real tokens/s | padding | peak memory MiB | above libraries | MFU "
          "| chatft speed / this | chatft memory / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        if "error" in result:
            print(f"| {result['mode']} | {result['precision']} | {result['variant']} | failed: {result['error']} "
                  "|||||||")
            continue
        speed, memory = harness.against_chatft(results, result, same=("mode", "precision"))
        print(f"| {result['mode']} | {result['precision']} | {result['variant']} | "
              f"{with_spread(result, 'tokens_per_second')} | {100 * result['padded_fraction']:.0f}% | "
              f"{with_spread(result, 'peak_memory_mib', digits=0)} | "
              f"{with_spread(result, 'peak_above_baseline_mib', digits=0)} | {with_spread(result, 'mfu', 100)}% | "
              f"{speed} | {memory} |")


if __name__ == "__main__":
    sys.exit(console.run_entry_point(main))
