"""What a run will train on, and what it did.

`dry_run_report` (finetune.py --dry_run): what the model would be trained on, from the tokenizer alone. Counts
(samples, turns, tokens: total, trainable, cut by truncation), the samples dropped and why, a histogram of sample
lengths against model_max_length, optimizer steps per epoch and samples per step (as run, and with --packing True),
and one rendered sample with its trained spans in [[...]]. `packing_summary`: what --packing does to the batch.

At the end of a run: `plot_losses` draws the loss curve (loss.png; a preference run's reward margins and accuracies in
a panel below), `run_summary` prints one screen (time, tokens/s, peak memory, losses, a preference run's last reward
margins and accuracies, a mixture-of-experts model's expert load, the last evaluation's replies with
--eval_generate, where things were saved).
"""

from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch

from chatft.data.chat_format import IGNORE_INDEX, Conversation, TokenizedSample, describe_sample
from chatft.data.datasets import (DataSamples, PackedDataset, as_conversations, dropped_message, first_fit_decreasing,
                                  split_summary_of, tokenized_chunks)
from chatft.train.expert_load import ExpertLoad
from chatft.train.eval_generate import GENERATIONS_FILE, read_generations

HISTOGRAM_BINS = 8
BAR_WIDTH = 40
SHOWN_REPLIES = 3  # of the last evaluation's, in the summary (all are in eval_generations.jsonl)
SHOWN_CHARACTERS = 60  # of a prompt, reply or reference there


def length_histogram(lengths: list[int], max_len: int) -> list[str]:
    """Lines of a text histogram: HISTOGRAM_BINS equal bins up to max_len, and one for longer samples."""
    edges = [round(max_len * k / HISTOGRAM_BINS) for k in range(HISTOGRAM_BINS + 1)]
    lengths = np.asarray(lengths)
    counts = [int(((lengths > edges[k]) & (lengths <= edges[k + 1])).sum()) for k in range(HISTOGRAM_BINS)]
    labels = [f"{edges[k] + 1:>6}-{edges[k + 1]:<6}" for k in range(HISTOGRAM_BINS)]
    counts.append(int((lengths > max_len).sum()))
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


class PackingShape:
    """What `packing_summary` reads of a PackedDataset, from the samples' lengths alone (the dry run's)."""

    def __init__(self, lengths: list[int], max_len: int):
        bins = first_fit_decreasing(lengths, max_len)
        self.num_samples, self.max_len, self.rows = len(lengths), max_len, len(bins)
        self.longest = max((sum(lengths[i] for i in members) for members in bins), default=0)
        self.fill = sum(lengths) / (self.rows * max_len) if self.rows else 0.0

    def __len__(self):
        return self.rows


def dry_run_report(name: str, samples: list[Conversation], tokenizer, max_len: int, system_message: str, packing: bool,
                   padding_free: bool, batch_size: int, accumulation: int, processes: int, seed: int,
                   chat_format: str = "chatml", reasoning_turns: str = "all", estimate_memory=None,
                   ignore_empty_think: bool = False, num_workers: int = 1) -> str:
    """The report's lines (module docstring); `estimate_memory`: tokens -> chatft.memory.MemoryEstimate, to add the
    peak memory estimated at the longest batch (chatft.memory.run_estimator). Samples are dropped as training
    drops them (chatft.data.datasets.keep_trainable's rule and message), from the untruncated tokens cut to max_len:
    the lengths before truncation are part of the report. Computed a chunk at a time (tokenized_chunks): what it
    holds per sample is a few numbers, so memory stays bounded whatever the data's size."""
    conversations = samples if isinstance(samples, DataSamples) else as_conversations(samples)
    lengths_parts, trainable_parts, origin_parts = [], [], []
    totals: dict[str, int] = {}
    cut_trainable, first_kept = 0, None
    for chunk, _, stats in tokenized_chunks(conversations, tokenizer, 10**9, system_message, num_workers,
                                            chat_format, reasoning_turns, ignore_empty_think,
                                            desc=f"Tokenizing {name}", stats=True):
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
        lengths = chunk["lengths"].astype(np.int64)
        if not len(lengths):
            continue
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        within = (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)) < max_len
        labelled = chunk["labelled"].astype(np.int64)
        trainable = np.add.reduceat(labelled * within, starts)
        cut_trainable += int((labelled * ~within).sum())
        lengths_parts.append(lengths)
        trainable_parts.append(trainable)
        origin_parts.append(chunk["origins"])
        if first_kept is None and (trainable > 0).any():
            i = int(np.flatnonzero(trainable > 0)[0])
            a, n = int(starts[i]), min(int(lengths[i]), max_len)
            ids = chunk["input_ids"][a: a + n]
            weights = chunk["weights"][a: a + n].tolist() if chunk["weighted"][i] else None
            first_kept = TokenizedSample(ids.tolist(), np.where(chunk["labelled"][a: a + n].astype(bool), ids,
                                                                IGNORE_INDEX).tolist(), int(chunk["origins"][i]), weights)
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, np.int64)
    trainable_each = np.concatenate(trainable_parts) if trainable_parts else np.zeros(0, np.int64)
    origins = np.concatenate(origin_parts) if origin_parts else np.zeros(0, np.int64)
    kept = trainable_each > 0
    dropped = (dropped_message(origins[~kept], conversations, len(lengths), max_len) if not kept.all() else None)
    truncated = lengths[lengths > max_len] - max_len
    trainable = int(trainable_each.sum())
    kept_tokens = int(np.minimum(lengths, max_len).sum())
    turns, tool_calls = totals.get("turns", 0), totals.get("tool_calls", 0)
    with_tools, with_reasoning = totals.get("with_tools", 0), totals.get("with_reasoning", 0)
    lines = [f"== {name}: {len(conversations)} samples, {turns} turns"
             + (f"; {with_tools} sample(s) define tools, {tool_calls} tool call(s) (trained; results are not)"
                if with_tools or tool_calls else ""),
             f"format: {chat_format}" + (" (Qwen3's template: think blocks, no default system prompt)"
                                         if chat_format == "qwen3" else "")
             + f"; {with_reasoning} sample(s) with reasoning traces (trained, in <think> blocks)"
             + (f"; {split_summary_of(origins, lengths, len(conversations))}" if len(lengths) > len(conversations)
                else ""),
             f"tokens: {kept_tokens:,} after truncation to model_max_length={max_len} "
             f"({trainable:,} trainable, {100 * trainable / max(1, kept_tokens):.1f}%); "
             f"{int(truncated.sum()):,} cut from {len(truncated)} sample(s) longer than {max_len} "
             f"({cut_trainable:,} of them trainable)"]
    weighted_turns = totals.get("weighted_turns", 0)
    if weighted_turns:
        lines.append(f"loss weights: {weighted_turns} assistant turn(s) weighted other than 1 ({totals.get('weight_0', 0)} "
                     "at 0: context only); the loss is the weighted token mean, sum(w * ce) / sum(w)")
    lines.append(dropped or "dropped: none")
    lines.append(f"sample lengths (tokens, before truncation; longest {int(lengths.max())}, mean {lengths.mean():.0f}):")
    lines += length_histogram(lengths, max_len)
    kept_lengths = np.minimum(lengths[kept], max_len).tolist()
    if not kept_lengths:
        lines.append("batches: nothing to train on")
    else:
        steps = steps_per_epoch(len(kept_lengths), batch_size, accumulation, processes)
        rows = PackingShape(kept_lengths, max_len)
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
        if estimate_memory is not None:
            longest = max(kept_lengths) if not packing else rows.longest
            lines.append(estimate_memory(longest * batch_size).text())
        lines.append("first sample as trained (trained tokens in [[...]]" + (", a weight other than 1 after them"
                                                                        if weighted_turns else "") + "):")
        lines.append(describe_sample(first_kept, tokenizer))
    return "\n".join(lines)


REWARD_CURVES = ("rewards/margins", "rewards/accuracies")  # a preference stage's, logged beside its loss


def loss_figure(log_history: list[dict]):
    """(a matplotlib Figure of the train and eval loss against optimizer steps, each curve's point count). A preference
    run's rewards/margins and rewards/accuracies (train, and eval where evaluated) get a second panel below."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    def points(key):
        return [(e["step"], e[key]) for e in log_history if key in e and "step" in e]

    curves = {"train": points("loss"), "eval": points("eval_loss")}
    rewards = {key: points(key) for name in REWARD_CURVES for key in (name, f"eval_{name}") if points(key)}
    figure = Figure(figsize=(7, 6 if rewards else 4))
    panels = [(figure.add_subplot(2 if rewards else 1, 1, 1), curves, "loss")]
    if rewards:
        panels.append((figure.add_subplot(2, 1, 2, sharex=panels[0][0]), rewards, "reward"))
    for axis, panel, ylabel in panels:
        for name, values in panel.items():
            if values:
                axis.plot(*zip(*values), marker="o" if name.startswith("eval") or len(values) < 30 else None,
                          label=name)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if any(panel.values()):
            axis.legend()
    panels[-1][0].set_xlabel("step")
    figure.tight_layout()
    return figure, {name: len(values) for panel in (curves, rewards) for name, values in panel.items()}


def plot_losses(log_history: list[dict], path: str) -> dict[str, int]:
    """Write `loss_figure` to `path` (PNG); return each curve's point count (train, eval, and a preference run's
    reward curves where logged)."""
    figure, counts = loss_figure(log_history)
    figure.savefig(path, dpi=100)
    return counts


def peak_memory_text() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU (this process)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (this process)"


def run_summary(trainer, what_was_saved: str) -> str:
    """One screen: time, real tokens/s, peak memory, final losses (and rewards), where things were saved."""
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
    run_mean = next((e["train_loss"] for e in reversed(history) if "train_loss" in e), None)
    if losses:
        lines.append(f"  train loss  {losses[0]:.4f} at the first logged step -> {losses[-1]:.4f} at the last")
    elif run_mean is not None:  # no step logged (--logging_steps above the run's steps): the Trainer's run mean
        lines.append(f"  train loss  {run_mean:.4f} (mean over the run; --logging_steps N logs it every N steps)")
    if eval_losses:
        lines.append(f"  eval loss   {eval_losses[-1]:.4f} (last evaluation)")
    rewards = reward_text(history)
    if rewards:
        lines.append(f"  rewards     {rewards}")
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    expert_load = next((c.text() for c in callbacks if isinstance(c, ExpertLoad)), None)
    if expert_load:
        lines.append(f"  expert load {expert_load}")
    if getattr(trainer.args, "eval_generate", 0):  # else a file there is an earlier run's
        lines += last_replies(os.path.join(output_dir, GENERATIONS_FILE))
    lines += [f"  saved       {what_was_saved} in {output_dir}",
              f"  loss curve  {os.path.join(output_dir, 'loss.png')}", "=" * 60]
    return "\n".join(lines)


def reward_text(history: list[dict]) -> str | None:
    """A preference run's last logged rewards/margins and rewards/accuracies, and the last evaluation's (None
    without): the summary's rewards line."""
    parts = []
    for prefix, when in (("", "at the last logged step"), ("eval_", "at the last evaluation")):
        last = next((e for e in reversed(history) if f"{prefix}rewards/margins" in e), None)
        if last is not None:
            accuracy = last.get(f"{prefix}rewards/accuracies")
            parts.append(f"margins {last[f'{prefix}rewards/margins']:.4f}"
                         + (f", accuracies {accuracy:.2f}" if accuracy is not None else "") + f" {when}")
    return "; ".join(parts) or None


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
