"""Sequence parallelism (--sequence_parallel_size N): one long row split across N processes by DeepSpeed's Ulysses
sequence parallelism (ALST, Arctic Long Sequence Training), as transformers' Trainer and accelerate wire it.

Nothing here re-implements the engine. The Trainer gets accelerate's `ParallelismConfig(sp_backend="deepspeed",
sp_size=N)` (`parallelism_config`); accelerate then registers DeepSpeed's `UlyssesSPAttentionHF` in place of the
model's attention function and hands DeepSpeed its sequence-parallel groups, and the Trainer wraps the training
dataloader in `UlyssesSPDataLoaderAdapter`, which gives each of the N processes one N-th of the row (input_ids,
position_ids, and the labels already shifted, `shift_labels`). In every attention layer the engine exchanges the
shards (all-to-all: each process gets the whole sequence for 1/N of the heads), gathers the position_ids of the
whole row and calls the model's own attention function with them. So chatft's per-sample sdpa (the default
attention on the CPU, chatft.model.attention) or flash-attention's variable-length kernel still finds the samples
of a padding-free row from their restarting position_ids, and attention stays inside each sample.

What chatft adds: the checks (`sequence_parallel_problems`: N divides the processes, DeepSpeed ZeRO, padding-free
rows, the model's heads divisible by N), rows padded to a multiple of N (`SequenceParallelCollator`: the adapter
refuses others), and the loss over the shards (chatft.train.losses.SupervisedLoss with a `LossScale` naming the
group: the token mean over the whole row's labelled tokens, as one process computes it).
"""

from __future__ import annotations

from chatft.data.chat_format import IGNORE_INDEX, LOSS_WEIGHTS


def parallelism_config(sp_size: int, attn_implementation: str):
    """accelerate's ParallelismConfig for DeepSpeed Ulysses over `sp_size` processes, the engine wrapping the
    model's own attention function `attn_implementation` (it must be the one the model runs with). Sequence lengths
    vary from batch to batch; evaluation runs without sequence parallelism (every process the whole sequence)."""
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa",
                                              sp_disable_in_eval=True)
    # accelerate's own check (accelerate 1.16) admits only flash-attention and sdpa by name, while DeepSpeed accepts
    # any attention function registered with transformers (it checks ALL_ATTENTION_FUNCTIONS): chatft's per-sample
    # sdpa is one, and the one that keeps the samples of a row apart once the engine has gathered it (plain sdpa,
    # given no mask, would attend across them). So the model's function is named after accelerate's check.
    handler.sp_attn_implementation = attn_implementation
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp_size, sp_handler=handler)


def sequence_parallel_problems(size: int, world_size: int, zero_stage: int | None, padding_free: bool,
                               pad_to_max_length: bool, fsdp, batch_size: int = 1,
                               attn_implementation: str = "auto") -> list[str]:
    """What stands in the way of --sequence_parallel_size `size` with these settings (empty: nothing)."""
    if size == 1:
        return []
    if size < 1:
        return [f"--sequence_parallel_size must be at least 1, not {size}."]
    problems = []
    if world_size % size:
        problems.append(f"--sequence_parallel_size {size} must divide the number of processes ({world_size}): launch "
                        f"a multiple of {size} processes (torchrun --nproc_per_node {size}).")
    if fsdp:
        problems.append("--sequence_parallel_size runs through DeepSpeed (Ulysses), not FSDP: use --deepspeed "
                        "ds_config_zero2.json or ds_config_zero3.json instead of --fsdp.")
    elif zero_stage is None:
        problems.append("--sequence_parallel_size needs DeepSpeed (its Ulysses sequence parallelism): add --deepspeed "
                        "ds_config_zero2.json (or ds_config_zero3.json).")
    if not padding_free or pad_to_max_length:
        problems.append("--sequence_parallel_size splits padding-free rows: drop --padding_free False and "
                        "--pad_to_max_length.")
    kernel = attn_implementation.split("|")[-1]
    if kernel in ("sdpa", "eager", "flex_attention"):
        problems.append(f"--sequence_parallel_size with --attn_implementation {attn_implementation}: DeepSpeed drops "
                        "the attention mask, so the samples of a row would attend to each other; use auto (chatft's "
                        "per-sample sdpa, or flash-attention where installed) or flash_attention_2.")
    if batch_size != 1:
        problems.append("--sequence_parallel_size trains one row at a time (DeepSpeed's Ulysses attention is built "
                        "for the micro-batch DeepSpeed is given, one padding-free row): use "
                        f"--per_device_train_batch_size 1 (not {batch_size}), --packing to put several samples in a "
                        "row, and --gradient_accumulation_steps for more rows a step.")
    return problems


def head_problem(size: int, config) -> str | None:
    """Why the model of `config` cannot be split over `size` processes by heads (Ulysses gives each process
    heads / size of them, key/value heads replicated where there are fewer than processes); None if it can."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads and heads % size:
        return (f"--sequence_parallel_size {size}: the model's {heads} attention heads are not divisible by {size} "
                f"(each process attends with 1/{size} of them).")
    if kv_heads and kv_heads % size and size % kv_heads:
        return (f"--sequence_parallel_size {size}: the model's {kv_heads} key/value heads and {size} must divide one "
                "another.")
    return None


class SequenceParallelCollator:
    """The padding-free collator's row, padded at its end to a multiple of `size` tokens (DeepSpeed's adapter splits
    a row into `size` equal shards), or to `length` when given: padding tokens carry no label, weight 0, and
    positions of their own (a sample of padding after the last one, which causal attention keeps out of every real
    sample).

    `length`: on the CPU every row is padded to the same length, the longest a row can be (batch size x
    --model_max_length). DeepSpeed's adapter first gathers the rows of the group's processes with one all_gather of
    tensors as long as each row; NCCL takes tensors of different lengths there, gloo refuses them ("ProcessGroupGloo::
    allgather: invalid tensor size", torch 2.14)."""

    def __init__(self, collator, size: int, pad_token_id: int = 0, length: int | None = None):
        self.collator, self.size, self.pad_token_id = collator, size, pad_token_id
        self.length = None if length is None else -(-length // size) * size

    def __call__(self, features):
        import torch

        batch = self.collator(features)
        length = batch["input_ids"].shape[1]
        missing = max(self.length - length, 0) if self.length is not None else -length % self.size
        if not missing:
            return batch
        rows = batch["input_ids"].shape[0]
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, LOSS_WEIGHTS: 0.0, "attention_mask": 0}
        for name, value in list(batch.items()):
            if not torch.is_tensor(value) or value.ndim != 2 or value.shape[1] != length:
                continue
            if name == "position_ids":
                tail = torch.arange(missing, dtype=value.dtype).expand(rows, missing)
            else:
                tail = torch.full((rows, missing), fill.get(name, 0), dtype=value.dtype)
            batch[name] = torch.cat([value, tail], dim=1)
        return batch


def sequence_parallel_group(trainer):
    """(DeepSpeed's sequence-parallel process group, its size) while `trainer` trains with sequence parallelism,
    else None."""
    config = getattr(trainer.accelerator, "parallelism_config", None)
    if config is None or config.sp_backend != "deepspeed" or not config.sp_enabled:
        return None
    from deepspeed.utils import groups

    return groups._get_sequence_parallel_group(), config.sp_size


def sums_gradients_over_the_group() -> bool:
    """Whether DeepSpeed sums (rather than averages) gradients over the sequence-parallel group: it averages them
    under ZeRO-3 before deepspeed 0.20.2 (deepspeedai/DeepSpeed#8854), the case transformers' own sequence-parallel
    loss (transformers.integrations.deepspeed.deepspeed_sp_compute_loss) scales for."""
    import importlib.metadata

    from packaging import version
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    old = version.parse(importlib.metadata.version("deepspeed")) < version.parse("0.20.2")
    return not (is_deepspeed_zero3_enabled() and old)
