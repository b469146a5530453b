"""The DPO rows of bench.throughput (`--stage dpo`): chatft's `--stage dpo` against TRL's DPOTrainer, same pairs.

    $ python -m bench.throughput --stage dpo                      # SmolLM2-135M, LoRA, fp32 and bf16, 3 repeats
    $ python -m bench.throughput --stage dpo --num_samples 32 --long_prompts 128,512 --precisions bf16 --repeats 3

Pairs, built deterministically from the conversations of `--data` (default data/identity_demo.json): pair k asks
conversation k's first question, prefers its answer and rejects the next conversation's answer. The pair sets:
- `ordinary`: the question alone (the prompt about as long as a reply, the system message included);
- `long<N>` for each N in `--long_prompts`: earlier exchanges (the first exchange of conversations k+2, k+3, ...)
  before the question until the rendered prompt holds at least N tokens: a prompt several times its replies.
Every variant runs on `ordinary` and on the first long set; the further long sets run chatft and chatft_unshared only,
to show how the shared prompt's saving grows with the prompt's length.

Variants (LoRA r 64, alpha 16, no dropout on every linear layer but the output layer; beta 0.1; AdamW at 1e-4,
constant; the reference is the model with its adapter off, no second model):
- chatft: `finetune.py --stage dpo` with its defaults (a pair's prompt computed once, the rejected reply a branch);
- chatft_unshared: `--pref_shared_prompt False` (prompt + each reply as samples of their own, still padding-free);
- trl: TRL's DPOTrainer(peft_config=..., ref_model=None) on the same pairs as conversational
  prompt/chosen/rejected messages and a ChatML template rendering them token for token as chatft does;
- trl_padding_free: the same with `DPOConfig(padding_free=True)` (TRL 1.16 warns that it is disabled since its DPO
  refactor and pads anyway: the row shows it).

A real token is one of the pair's own tokens: its prompt once, its chosen and its rejected reply (prompt + chosen +
rejected, counted from the features each trainer's collator receives: the same count for both, checked in the
tests), so the speed ratio is the inverse ratio of train_runtime. `positions / pair token` is what the model ran per
such token (TRL: the prompt twice and its padding; chatft: one token more per pair for the branch).
"""

from __future__ import annotations

import json
import os
import statistics

from bench import harness
from chatft.data.chat_format import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, to_conversation
from chatft.errors import ArgumentError

BETA = 0.1  # DPO's temperature, both trainers
CHATFT_DPO_VARIANTS = {"chatft": [], "chatft_unshared": ["--pref_shared_prompt", "False"]}
TRL_DPO_VARIANTS = {"trl": False, "trl_padding_free": True}  # the value: DPOConfig.padding_free
# issue 29's targets (reported, not asserted)
TARGET_VS_TRL = 2.0  # chatft >= 2x TRL's best variant
TARGET_VS_TRL_LONG_PROMPT = 3.0  # on pairs whose prompt is longer than their replies
TARGET_MEMORY = 0.6  # peak memory above the libraries <= 0.6x TRL's


class PairCounter:
    """Wraps a preference collator (chatft's or TRL's: both receive `prompt_ids`, `chosen_ids`, `rejected_ids`);
    counts the pairs' real tokens (prompt once + chosen + rejected), their labelled reply tokens, the positions the
    model ran and the padding among them."""

    def __init__(self, collator):
        self.collator = collator
        self.pairs = self.real_tokens = self.labelled_tokens = self.positions = self.padding = 0

    def __call__(self, features):
        batch = self.collator(features)
        self.pairs += len(features)
        self.real_tokens += sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
        if "completion_mask" in batch:  # TRL: chosen rows, then rejected rows, padded
            self.labelled_tokens += int(batch["completion_mask"].sum())
        else:
            self.labelled_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        self.positions += batch["input_ids"].numel()
        if "attention_mask" in batch:
            self.padding += batch["input_ids"].numel() - int(batch["attention_mask"].sum())
        return batch


def first_exchange(conversation) -> tuple[str, str]:
    turns = [t for t in conversation.turns if t.role in ("user", "assistant")]
    if len(turns) < 2 or (turns[0].role, turns[1].role) != ("user", "assistant"):
        raise ArgumentError(f"conversation {conversation.id!r}: --stage dpo builds pairs from conversations that open "
                            "with a user turn and an assistant reply; use such data (data/identity_demo.json).")
    return turns[0].content, turns[1].content


def build_pairs(samples: list, count: int, prompt_tokens: int, tokenizer) -> list[dict]:
    """`count` pairs in TRL's conversational shape ({"prompt": messages, "chosen": [reply], "rejected": [reply]}),
    which chatft reads too. Pair k: conversation k's first question, its answer chosen, conversation k+1's rejected
    (indices modulo the conversations); with `prompt_tokens`, first exchanges of conversations k+2, k+3, ... before
    the question until the prompt, rendered with the default system message, has at least that many tokens."""
    from bench.throughput import trl_chat_template

    exchanges = [first_exchange(to_conversation(s)) for s in samples]
    if len(exchanges) < 2:
        raise ArgumentError("--stage dpo needs at least 2 conversations in --data (one's answer is the other's "
                            "rejected reply).")
    template = trl_chat_template(DEFAULT_SYSTEM_MESSAGE, newline_after_last_reply=False)
    pairs = []
    for k in range(count):
        question, answer = exchanges[k % len(exchanges)]
        history, j = [], k + 2
        while prompt_tokens and len(tokenizer.apply_chat_template(
                history + [{"role": "user", "content": question}], chat_template=template, tokenize=True,
                add_generation_prompt=True, return_dict=True)["input_ids"]) < prompt_tokens:
            earlier_question, earlier_answer = exchanges[j % len(exchanges)]
            history += [{"role": "user", "content": earlier_question}, {"role": "assistant", "content": earlier_answer}]
            j += 1
        pairs.append({"prompt": history + [{"role": "user", "content": question}],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": exchanges[(k + 1) % len(exchanges)][1]}]})
    return pairs


def write_pair_sets(samples: list, count: int, long_prompts: list[int], tokenizer, directory: str) -> dict[str, str]:
    """{pair set name: its JSON file}: `ordinary`, then `long<N>` for each N of `long_prompts`."""
    files = {}
    for name, tokens in [("ordinary", 0), *((f"long{n}", n) for n in long_prompts)]:
        files[name] = os.path.join(directory, f"pairs_{name}.json")
        with open(files[name], "w", encoding="utf-8") as f:
            json.dump(build_pairs(samples, count, tokens, tokenizer), f, ensure_ascii=False)
    return files


def run_chatft_dpo(config: dict, scratch: str) -> dict:
    """finetune.train --stage dpo on the pair file, its collator counted."""
    import finetune

    argv = ["--model_name_or_path", config["model"], "--data_path", config["data"], "--stage", "dpo",
            "--pref_beta", str(BETA), "--output_dir", os.path.join(scratch, "out"), "--num_train_epochs", "1",
            "--per_device_train_batch_size", str(config["batch_size"]), "--learning_rate", "1e-4",
            "--lr_scheduler_type", "constant", "--model_max_length", str(config["max_length"]),
            "--logging_steps", "1000", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", "--use_lora", "--lora_r", "64", "--lora_alpha", "16", "--lora_dropout", "0",
            "--disable_tqdm", "True", "--chat_format", "chatml"]
    argv += ["--bf16", "True"] if config["precision"] == "bf16" else []
    argv += [] if config["cuda"] else ["--use_cpu", "True"]
    argv += CHATFT_DPO_VARIANTS[config["variant"]]
    baseline_mib = harness.current_resident_mib()
    trainer = finetune.train(argv, wrap_collator=PairCounter)
    return counted(trainer.data_collator, trainer.state.log_history[-1]["train_runtime"], baseline_mib)


def run_trl_dpo(config: dict, scratch: str) -> dict:
    """TRL's DPOTrainer on the same pairs: LoRA through peft_config, ref_model None (the adapter off)."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from bench.throughput import trl_chat_template

    baseline_mib = harness.current_resident_mib()
    with open(config["data"], encoding="utf-8") as f:
        rows = json.load(f)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config["model"])
    tokenizer.chat_template = trl_chat_template(DEFAULT_SYSTEM_MESSAGE, newline_after_last_reply=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=os.path.join(scratch, "out"), num_train_epochs=1, per_device_train_batch_size=config["batch_size"],
        learning_rate=1e-4, lr_scheduler_type="constant", max_length=config["max_length"], beta=BETA,
        logging_steps=1000, save_strategy="no", report_to="none", seed=0, bf16=config["precision"] == "bf16",
        use_cpu=not config["cuda"], gradient_checkpointing=False, padding_free=TRL_DPO_VARIANTS[config["variant"]],
        disable_tqdm=True, dataloader_num_workers=0)
    lora = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    counter = PairCounter(trainer.data_collator)
    trainer.data_collator = counter
    result = trainer.train()
    return counted(counter, result.metrics["train_runtime"], baseline_mib)


def counted(counter: PairCounter, runtime: float, baseline_mib: float) -> dict:
    return {"train_runtime": runtime, "pairs": counter.pairs, "real_tokens": counter.real_tokens,
            "labelled_tokens": counter.labelled_tokens, "positions": counter.positions, "padding": counter.padding,
            "baseline_mib": baseline_mib}


def worker(config: dict, scratch: str) -> dict:
    runner = run_trl_dpo if config["variant"] in TRL_DPO_VARIANTS else run_chatft_dpo
    return runner(config, scratch)


def plan(variants: list[str], pair_sets: list[str]) -> list[tuple[str, str]]:
    """(pair set, variant) in table order: every variant on `ordinary` and the first long set; chatft's two on the
    further long sets (the shared prompt's saving as the prompt grows)."""
    return [(pair_set, variant) for index, pair_set in enumerate(pair_sets) for variant in variants
            if index < 2 or variant in CHATFT_DPO_VARIANTS]


def measure(config: dict) -> dict:
    result = harness.trained_run("bench.throughput", config)
    if "error" in result:
        return result
    print(f"    {result['tokens_per_second']:.1f} pair tokens/s, {result['positions'] / result['real_tokens']:.2f} "
          f"positions per pair token, peak {result['peak_memory_mib']:.0f} MiB "
          f"({result['peak_above_baseline_mib']:.0f} above the libraries)", flush=True)
    return result


SUMMARIZED = ("tokens_per_second", "peak_memory_mib", "peak_above_baseline_mib", "train_runtime")


def summarize(runs: list[dict]) -> dict:
    """Medians (and min-max) per (precision, pair set, variant); the targets per (precision, pair set)."""
    rows = harness.medians(runs, ("precision", "pair_set", "variant"), SUMMARIZED)
    ok = {(r["precision"], r["pair_set"], r["variant"]): r for r in rows if "error" not in r}
    targets = []
    for precision, pair_set in dict.fromkeys((r["precision"], r["pair_set"]) for r in rows):
        own, unshared = ok.get((precision, pair_set, "chatft")), ok.get((precision, pair_set, "chatft_unshared"))
        trl = [r for (p, s, v), r in ok.items() if p == precision and s == pair_set and v in TRL_DPO_VARIANTS]
        target = {"precision": precision, "pair_set": pair_set}
        if own and unshared:
            target["shared_prompt_saving"] = unshared["train_runtime"] / own["train_runtime"]
        if own and trl:
            best = max(trl, key=lambda r: r["tokens_per_second"])
            speed_target = TARGET_VS_TRL if pair_set == "ordinary" else TARGET_VS_TRL_LONG_PROMPT
            memory = own["peak_above_baseline_mib"] / min(r["peak_above_baseline_mib"] for r in trl)
            target |= {"vs_trl_best": own["tokens_per_second"] / best["tokens_per_second"], "trl_best": best["variant"],
                       "speed_target": speed_target, "memory_vs_trl": memory, "memory_target": TARGET_MEMORY}
        targets.append(target)
    return {"rows": rows, "targets": targets}


def print_report(summary: dict, prompt_lengths: dict[str, float]) -> None:
    from bench.throughput import with_spread

    print("\n| precision | pairs | variant | pair tokens/s | positions / pair token | padding | peak memory MiB "
          "| above libraries | chatft speed / this | chatft memory / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = summary["rows"]
    for r in rows:
        pairs = f"{r['pair_set']} (prompt {prompt_lengths[r['pair_set']]:.0f})"
        if "error" in r:
            print(f"| {r['precision']} | {pairs} | {r['variant']} | failed: {r['error']} |||||||")
            continue
        speed, memory = harness.against_chatft(rows, r, same=("precision", "pair_set"))
        print(f"| {r['precision']} | {pairs} | {r['variant']} | {with_spread(r, 'tokens_per_second')} | "
              f"{r['positions'] / r['real_tokens']:.2f} | {100 * r['padding'] / r['positions']:.0f}% | "
              f"{with_spread(r, 'peak_memory_mib', digits=0)} | {with_spread(r, 'peak_above_baseline_mib', digits=0)} | "
              f"{speed} | {memory} |")
    print()
    for t in summary["targets"]:
        parts = []
        if "vs_trl_best" in t:
            parts.append(f"{t['vs_trl_best']:.2f}x TRL's best ({t['trl_best']}; target >= {t['speed_target']:.0f}x: "
                         f"{'met' if t['vs_trl_best'] >= t['speed_target'] else 'missed'})")
            parts.append(f"memory {t['memory_vs_trl']:.2f}x TRL's (target <= {t['memory_target']}: "
                         f"{'met' if t['memory_vs_trl'] <= t['memory_target'] else 'missed'})")
        if "shared_prompt_saving" in t:
            parts.append(f"shared prompt {t['shared_prompt_saving']:.2f}x faster than unshared")
        print(f"{t['precision']} {t['pair_set']}: " + "; ".join(parts))


def main(args, model: str, cuda: bool) -> int:
    """The DPO table: pair sets built here, every (precision, pair set, variant) in a fresh process, round-robin."""
    import tempfile

    import transformers

    from bench.throughput import trl_chat_template
    from chatft.data.datasets import load_samples

    if args.modes != "lora":
        raise ArgumentError(f"--modes {args.modes}: --stage dpo measures LoRA only (chatft's full-parameter DPO is "
                            "not built yet); give --modes lora.")
    variants = args.variants.split(",") if args.variants else [*CHATFT_DPO_VARIANTS, *TRL_DPO_VARIANTS]
    unknown = [v for v in variants if v not in CHATFT_DPO_VARIANTS and v not in TRL_DPO_VARIANTS]
    if unknown:
        raise ArgumentError(f"--variants: unknown {', '.join(unknown)} under --stage dpo; choose from "
                            f"{', '.join([*CHATFT_DPO_VARIANTS, *TRL_DPO_VARIANTS])}.")
    long_prompts = [int(n) for n in args.long_prompts.split(",")] if args.long_prompts else []
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    samples = load_samples(args.data)
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        files = write_pair_sets(samples, args.num_samples, long_prompts, tokenizer, directory)
        prompt_lengths, longest = {}, 0
        template = trl_chat_template(DEFAULT_SYSTEM_MESSAGE, newline_after_last_reply=False)
        for name, path in files.items():
            with open(path, encoding="utf-8") as f:
                pairs = json.load(f)
            lengths = [[len(tokenizer.apply_chat_template(p["prompt"] + reply, chat_template=template, tokenize=True,
                                                          add_generation_prompt=not reply, return_dict=True)["input_ids"])
                        for reply in ([], p["chosen"], p["rejected"])] for p in pairs]
            prompt_lengths[name] = statistics.mean(prompt for prompt, _, _ in lengths)
            longest = max(longest, *(max(c, r) for _, c, r in lengths))
            print(f"pairs {name}: {len(pairs)}, prompt {prompt_lengths[name]:.0f} tokens on average, replies "
                  f"{statistics.mean(c + r - 2 * p for p, c, r in lengths) / 2:.0f}", flush=True)
        if longest > args.max_length:
            raise ArgumentError(f"--max_length {args.max_length}: the longest prompt + reply has {longest} tokens and "
                                f"would be cut; give --max_length {longest} or more, or shorter --long_prompts.")
        for repeat in range(args.repeats):  # round-robin: a slow spell of the machine hits every variant alike
            for precision in args.precisions.split(","):
                for pair_set, variant in plan(variants, list(files)):
                    config = {"stage": "dpo", "model": model, "data": files[pair_set], "pair_set": pair_set,
                              "max_length": args.max_length, "batch_size": args.batch_size, "mode": "lora",
                              "precision": precision, "variant": variant, "cuda": cuda}
                    print(f"--- dpo {precision} {pair_set} {variant} (run {repeat + 1} of {args.repeats})", flush=True)
                    runs.append({**measure(config), "repeat": repeat})
                    if args.json:  # every run so far: an interrupted benchmark keeps what it measured
                        write_json(args.json, {"stage": "dpo", "repeats": args.repeats,
                                               "prompt_lengths": prompt_lengths, "runs": runs})
    summary = summarize(runs)
    print_report(summary, prompt_lengths)
    if args.json:
        write_json(args.json, {"stage": "dpo", "repeats": args.repeats, "prompt_lengths": prompt_lengths, **summary,
                               "runs": runs})
    return 0


def write_json(path: str, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
