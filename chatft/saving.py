"""Writing a run to output_dir: model or adapter, tokenizer with chat template, generation config,
trainer state and the arguments used, the loss curve and the end-of-run summary. Also the guard that keeps
earlier runs safe."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import tempfile

import torch

from chatft.chat_format import IM_END
from chatft.errors import OutputDirError


def check_output_dir(training_args) -> None:
    """Refuse a non-empty output_dir unless --overwrite_output_dir, before anything is loaded or written."""
    output_dir = training_args.output_dir
    if training_args.resume_from_checkpoint:  # continuing the run that is in output_dir
        return
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not training_args.overwrite_output_dir:
        raise OutputDirError(
            f"output_dir {output_dir} is not empty; choose another --output_dir or pass --overwrite_output_dir."
        )


def check_new_output_dir(output_dir: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """For merge_lora.py and run_gptq.py: refuse a non-empty output_dir unless --overwrite, and an output_dir
    that is one of the inputs (it would be replaced while it is still needed)."""
    target = os.path.realpath(output_dir)
    for source in inputs:
        if source and os.path.exists(source) and os.path.realpath(source) == target:
            raise OutputDirError(f"--output_dir {output_dir} is also an input ({source}); write the result elsewhere.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"{output_dir} exists and is not a directory.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise OutputDirError(f"{output_dir} is not empty; choose another output directory or pass --overwrite.")


@contextlib.contextmanager
def staged_output_dir(output_dir: str):
    """Yield a scratch directory beside `output_dir` to write the result into.

    Only when the block succeeds does the scratch directory take `output_dir`'s place (a previous
    `output_dir` is removed only then); if it fails, the scratch directory is deleted and whatever was
    at `output_dir` is untouched. So a crash or a bad input never leaves a half-written model behind.
    """
    output_dir = os.path.abspath(output_dir)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    # mkdtemp (and the atomic writes of some libraries) make private files; give them the usual modes
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(scratch):
        os.chmod(directory, 0o777 & ~umask)
        for file in files:
            os.chmod(os.path.join(directory, file), 0o666 & ~umask)
    previous = None
    if os.path.exists(output_dir):
        previous = tempfile.mkdtemp(prefix=f".{name}.previous-", dir=parent)
        os.rename(output_dir, os.path.join(previous, name))
    os.rename(scratch, output_dir)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


def chat_generation_config(model, tokenizer):
    """The model's generation config, set to stop at <|im_end|> (and the tokenizer's eos) and pad with pad."""
    config = model.generation_config
    stop_ids = [tokenizer.convert_tokens_to_ids(IM_END)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    config.pad_token_id = tokenizer.pad_token_id
    return config


def save_run(trainer, tokenizer, argument_groups: dict, base_model_path: str) -> None:
    """Save everything needed to reload the result with plain transformers/peft from output_dir alone."""
    output_dir = trainer.args.output_dir
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = True  # training turned it off; inference wants it
    base.generation_config = chat_generation_config(base, tokenizer)
    if hasattr(model, "peft_config"):
        # Recorded so that AutoPeftModelForCausalLM.from_pretrained(output_dir) finds the base by itself.
        absolute = os.path.abspath(base_model_path)
        for config in model.peft_config.values():
            config.base_model_name_or_path = absolute if os.path.isdir(base_model_path) else base_model_path
    trainer.save_model(output_dir)  # rank 0 writes; handles full models and adapters alike
    trainer.save_state()
    if trainer.is_world_process_zero():
        # The Trainer also pickles its arguments; finetune_args.json says the same without a pickle to load.
        pickled_args = os.path.join(output_dir, "training_args.bin")
        if os.path.exists(pickled_args):
            os.remove(pickled_args)
        tokenizer.save_pretrained(output_dir)
        base.generation_config.save_pretrained(output_dir)
        arguments = {
            name: (json.loads(group.to_json_string()) if hasattr(group, "to_json_string") else dataclasses.asdict(group))
            for name, group in argument_groups.items()
        }
        with open(os.path.join(output_dir, "finetune_args.json"), "w", encoding="utf-8") as f:
            json.dump(arguments, f, indent=2, ensure_ascii=False)


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
    start = getattr(trainer, "run_start", None)  # chatft.trainer.RunStart: a resumed run began at its checkpoint
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
    lines += [f"  saved       {what_was_saved} in {output_dir}",
              f"  loss curve  {os.path.join(output_dir, 'loss.png')}", "=" * 60]
    return "\n".join(lines)
