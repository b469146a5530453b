"""What a run will train on, and what it did.

`dry_run_report` (finetune.py --dry_run): what the model would be trained on, from the tokenizer alone. Counts
(samples, turns, tokens: total, trainable, cut by truncation), the samples dropped and why, a histogram of sample
lengths against model_max_length, optimizer steps per epoch and samples per step (as run, and with --packing True),
and one rendered sample with its trained spans in [[...]]. `packing_summary`: what --packing does to the batch.

At the end of a run: `plot_losses` draws the loss curve (loss.png), `run_summary` prints one screen (time, tokens/s,
peak memory, losses, a mixture-of-experts model's expert load, the last evaluation's replies with
--eval_generate, where things were saved).
"""

from __future__ import annotations

import os
import random
import resource

import torch

from chatft.data.chat_format import IGNORE_INDEX, Conversation, TokenizedSample, describe_sample
from chatft.data.datasets import PackedDataset, as_conversations, keep_trainable, split_summary, tokenize_training_samples
from chatft.train.expert_load import ExpertLoad
from chatft.train.eval_generate import GENERATIONS_FILE, read_generations

HISTOGRAM_BINS = 8
BAR_WIDTH = 40
SHOWN_REPLIES = 3  # of the last evaluation's, in the summary (all are in eval_generations.jsonl)
SHOWN_CHARACTERS = 60  # of a prompt, reply or reference there


def length_histogram(lengths: list[int], max_len: int) -> list[str]:
    """Lines of a text histogram: HISTOGRAM_BINS equal bins up to max_len, and one for longer samples."""
    edges = [round(max_len * k / HISTOGRAM_BINS) for k in range(HISTOGRAM_BINS + 1)]
    counts = [sum(edges[k] < n <= edges[k + 1] for n in lengths) for k in range(HISTOGRAM_BINS)]
    labels = [f"{edges[k] + 1:>6}-{edges[k + 1]:<6}" for k in range(HISTOGRAM_BINS)]
    counts.append(sum(n > max_len for n in lengths))
    labels.append(f"  > {max_len:<8}")
    widest = max(counts) or 1
    return [f"  {label} {count:>7}  {'#' * round(BAR_WIDTH * count / widest)}" + ("  (truncated)" if k == HISTOGRAM_BINS
                                                                                    and count else "")
            for k, (label, count) in enumerate(zip(labels, counts))]


def padded_fraction(lengths: list[int], batch_size: int, seed: int, multiple: int = 8) -> float:
    """The fraction of positions that would be padding, with shuffled batches padded to their longest sample."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        width = -(-max(batch) // multiple) * multiple
        real += sum(batch)
        padded += width * len(batch)
    return 1 - real / padded if padded else 0.0


def steps_per_epoch(batch_units: int, batch_size: int, accumulation: int, processes: int) -> int:
    """Optimizer steps per epoch over `batch_units` samples (or packed rows), as the Trainer counts them."""
    return max(1, -(-batch_units // (batch_size * accumulation * processes)))


def step_shape(batch_size: int, accumulation: int, processes: int, unit: str) -> str:
    """e.g. "2 rows x 8 accumulation x 2 processes"."""
    return (f"{batch_size} {unit}{'s' if batch_size != 1 else ''} x {accumulation} accumulation"
            + (f" x {processes} processes" if processes > 1 else ""))


def packing_summary(rows: PackedDataset, batch_size: int, accumulation: int, processes: int) -> str:
    """What --packing does to the batch, said at the start of a packed run (and by --dry_run)."""
    flags_say = batch_size * accumulation * processes
    per_step = min(rows.num_samples, round(rows.num_samples / len(rows) * flags_say))
    steps = steps_per_epoch(len(rows), batch_size, accumulation, processes)
    return (f"packing: {rows.num_samples} samples in {len(rows)} row{'s' if len(rows) != 1 else ''} of {rows.max_len} tokens "
            f"({100 * rows.fill:.1f}% filled); an optimizer step sees ~{per_step} samples "
            f"({step_shape(batch_size, accumulation, processes, 'row')}), not {flags_say}; {steps} optimizer "
            f"step{'s' if steps != 1 else ''} per epoch")


def dry_run_report(name: str, samples: list[Conversation], tokenizer, max_len: int, system_message: str, packing: bool,
                   padding_free: bool, batch_size: int, accumulation: int, processes: int, seed: int,
                   chat_format: str = "chatml", reasoning_turns: str = "all", estimate_memory=None,
                   ignore_empty_think: bool = False) -> str:
    """The report's lines (module docstring); `estimate_memory`: tokens -> chatft.memory.MemoryEstimate, to add the
    peak memory estimated at the longest batch (chatft.memory.run_estimator). Samples are dropped as training
    drops them (chatft.data.datasets.keep_trainable), from the untruncated tokens cut to max_len: the lengths before truncation
    are part of the report."""
    conversations = as_conversations(samples)
    full = tokenize_training_samples(conversations, tokenizer, 10**9, system_message, desc=f"Tokenizing {name}",
                                     chat_format=chat_format, reasoning_turns=reasoning_turns,
                                     ignore_empty_think=ignore_empty_think)
    kept, dropped = keep_trainable([TokenizedSample(s.input_ids[:max_len], s.labels[:max_len], s.origin,
                                                    s.weights[:max_len] if s.weights is not None else None)
                                    for s in full], conversations, max_len)
    lengths = [len(s.input_ids) for s in full]
    truncated = [n - max_len for n in lengths if n > max_len]
    trainable = sum(s.num_trainable for s in kept)
    cut_trainable = sum(sum(label != IGNORE_INDEX for label in s.labels[max_len:]) for s in full)
    turns = sum(len(c.turns) for c in conversations)
    tool_calls = sum(len(turn.tool_calls) for c in conversations for turn in c.turns)
    with_tools = sum(bool(c.tools) for c in conversations)
    with_reasoning = sum(any(turn.reasoning for turn in c.turns) for c in conversations)
    lines = [f"== {name}: {len(conversations)} samples, {turns} turns"
             + (f"; {with_tools} sample(s) define tools, {tool_calls} tool call(s) (trained; results are not)"
                if with_tools or tool_calls else ""),
             f"format: {chat_format}" + (" (Qwen3's template: think blocks, no default system prompt)"
                                         if chat_format == "qwen3" else "")
             + f"; {with_reasoning} sample(s) with reasoning traces (trained, in <think> blocks)"
             + (f"; {split_summary(full, len(conversations))}" if len(full) > len(conversations) else ""),
             f"tokens: {sum(min(n, max_len) for n in lengths):,} after truncation to model_max_length={max_len} "
             f"({trainable:,} trainable, {100 * trainable / max(1, sum(min(n, max_len) for n in lengths)):.1f}%); "
             f"{sum(truncated):,} cut from {len(truncated)} sample(s) longer than {max_len} "
             f"({cut_trainable:,} of them trainable)"]
    weights = [turn.weight for c in conversations for turn in c.turns if turn.role == "assistant" and turn.weight != 1]
    if weights:
        lines.append(f"loss weights: {len(weights)} assistant turn(s) weighted other than 1 ({weights.count(0)} at 0: "
                     "context only); the loss is the weighted token mean, sum(w * ce) / sum(w)")
    lines.append(dropped or "dropped: none")
    lines.append(f"sample lengths (tokens, before truncation; longest {max(lengths)}, mean {sum(lengths) / len(lengths):.0f}):")
    lines += length_histogram(lengths, max_len)
    kept_lengths = [len(s.input_ids) for s in kept]
    if not kept:
        lines.append("batches: nothing to train on")
    else:
        steps = steps_per_epoch(len(kept), batch_size, accumulation, processes)
        rows = PackedDataset([{"input_ids": [0] * n, "labels": [0] * n} for n in kept_lengths], max_len)
        padding = 100 * padded_fraction(kept_lengths, batch_size, seed)
        unpacked = (f"{steps} optimizer step{'s' if steps != 1 else ''} per epoch of {batch_size * accumulation * processes}"
                    f" samples ({step_shape(batch_size, accumulation, processes, 'sample')}), "
                    + (f"each batch one row without padding (padded batches would be {padding:.1f}% padding)"
                       if padding_free else f"each batch padded to its longest sample ({padding:.1f}% padding)"))
        packed = packing_summary(rows, batch_size, accumulation, processes)
        if packing:
            lines += [f"batches (--packing True): {packed.removeprefix('packing: ')}",
                      f"  without --packing: {unpacked}"]
        else:
            lines += [f"batches: {unpacked}", f"  with --packing True: {packed.removeprefix('packing: ')}"]
    if kept and estimate_memory is not None:
        longest = max(kept_lengths) if not packing else max(len(row["input_ids"]) for row in rows.rows)
        lines.append(estimate_memory(longest * batch_size).text())
    if kept:
        lines.append("first sample as trained (trained tokens in [[...]]" + (", a weight other than 1 after them"
                                                                        if weights else "") + "):")
        lines.append(describe_sample(kept[0], tokenizer))
    return "\n".join(lines)


def plot_losses(log_history: list[dict], path: str) -> dict[str, int]:
    """Write the train (and eval) loss against optimizer steps to `path` (PNG); return each curve's point count."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    curves = {"train": [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e],
              "eval": [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]}
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for name, points in curves.items():
        if points:
            axis.plot(*zip(*points), marker="o" if name == "eval" or len(points) < 30 else None, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(True, alpha=0.3)
    if any(curves.values()):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return {name: len(points) for name, points in curves.items()}


def peak_memory_text() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU (this process)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (this process)"


def run_summary(trainer, what_was_saved: str) -> str:
    """One screen: time, real tokens/s, peak memory, final losses, where things were saved."""
    state, output_dir = trainer.state, trainer.args.output_dir
    history = state.log_history
    runtime = next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None)
    epoch_tokens = getattr(trainer.train_dataset, "num_tokens", None)  # not known up front with --lazy_preprocess
    losses = [e["loss"] for e in history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    start = getattr(trainer, "run_start", None)  # chatft.train.trainer.RunStart: a resumed run began at its checkpoint
    start_epoch, start_step = (start.epoch, start.step) if start is not None else (0.0, 0)
    epochs, steps = (state.epoch or 0) - start_epoch, state.global_step - start_step
    lines = ["", "=" * 60, "Training finished"]
    if runtime:
        speed = f"; about {epoch_tokens * epochs / runtime:,.0f} real tokens/s" if epoch_tokens else ""
        resumed = f" (resumed at step {start_step}, {state.global_step} in all)" if start_step else ""
        lines.append(f"  time        {runtime / 60:.1f} min for {steps} steps, {epochs:.2f} epochs{resumed}{speed}")
    lines.append(f"  peak memory {peak_memory_text()}")
    if losses:
        lines.append(f"  train loss  {losses[0]:.4f} at the first logged step -> {losses[-1]:.4f} at the last")
    if eval_losses:
        lines.append(f"  eval loss   {eval_losses[-1]:.4f} (last evaluation)")
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    expert_load = next((c.text() for c in callbacks if isinstance(c, ExpertLoad)), None)
    if expert_load:
        lines.append(f"  expert load {expert_load}")
    if getattr(trainer.args, "eval_generate", 0):  # else a file there is an earlier run's
        lines += last_replies(os.path.join(output_dir, GENERATIONS_FILE))
    lines += [f"  saved       {what_was_saved} in {output_dir}",
              f"  loss curve  {os.path.join(output_dir, 'loss.png')}", "=" * 60]
    return "\n".join(lines)


def clipped(text: str, width: int = SHOWN_CHARACTERS) -> str:
    """`text` on one line (whitespace runs as one space), cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def last_replies(path: str) -> list[str]:
    """Summary lines for --eval_generate: the last evaluation's first replies (its last prompt message, the reply,
    the reference), each clipped to a line; none without the file."""
    generations = read_generations(path)
    if not generations:
        return []
    step = generations[-1]["step"]
    last = [line for line in generations if line["step"] == step]
    lines = [f"  replies     at step {step} ({len(last)} in {path}):"]
    for line in last[:SHOWN_REPLIES]:
        asked = line["prompt"][-1]["content"] if line["prompt"] else ""
        lines.append(f"    {clipped(asked)!r} -> {clipped(line['reply'])!r} (reference {clipped(line['reference'])!r})")
    return lines
