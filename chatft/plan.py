"""The run plan: everything the flags and the model's config decide, resolved once, before any weights load.

    >>> plan, tokenizer = plan_run(*parse_args(["--model_name_or_path", path, "--use_lora", "--q_lora", ...]))
    >>> plan.mode, plan.compute_dtype, plan.quantization, plan.shard, plan.world_size, plan.chat_format
    ('qlora', torch.bfloat16, 'nf4', 'zero2', 2, 'chatml')

finetune.py plans once the tokenizer is loaded (the plan needs its size, the ChatML tokens it lacked and the chat
format its template resolved to). Then everything reads the plan and nothing decides again: chatft.model.load.load_model
loads what it says, chatft.memory estimates from it, the dry-run report and the summary name its format and mode, and
the bench tools plan through the same `plan_run`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import torch

from chatft.args import deepspeed_zero_stage
from chatft.model.sources import saved_quantization
from chatft.device import compute_dtype
from chatft.errors import ArgumentError
from chatft.model.load import explicit_target_parameters, load_tokenizer, model_config, resolve_model_path
from chatft.model.lora_variants import rewrites_base_weights

logger = logging.getLogger(__name__)

MODES = ("full", "lora", "qlora")
REFERENCES = ("none", "adapter_off", "adapter", "copy", "precomputed")
QUANTIZATIONS = ("none", "nf4", "gptq")
SHARDINGS = ("none", "zero1", "zero2", "zero3", "fsdp_grad", "fsdp_full")


@dataclass(frozen=True)
class RunPlan:
    """What a run trains and how, decided once by `plan_run`. The defaults (a LoRA run in bf16 in one process) are a
    starting point for `dataclasses.replace` in tests and tools that estimate memory without flags."""

    model_path: str = ""  # resolved: a .gguf file's converted directory
    config: object = field(default=None, compare=False, repr=False)  # the model's transformers config, read once
    trust_remote_code: bool = False
    cache_dir: str | None = None  # downloaded hub files (--cache_dir)
    mode: str = "lora"  # one of MODES
    compute_dtype: torch.dtype = torch.bfloat16  # what the Trainer autocasts to (--bf16/--fp16)
    # full-parameter training keeps fp32 master weights; LoRA freezes the base, loaded in the compute dtype
    load_dtype: torch.dtype = torch.bfloat16
    quantization: str = "none"  # one of QUANTIZATIONS: Q-LoRA's base, NF4 on load or the model's own GPTQ weights
    gptq_bits: int = 4
    gptq_group_size: int = 128
    attn_implementation: str = "sdpa"  # resolved from --attn_implementation
    per_sample_attention: bool = False  # sdpa made per-sample once loaded, where the model's code allows it
    shard: str = "none"  # one of SHARDINGS: fsdp_grad is FSDP's shard_grad_op, fsdp_full its full_shard
    world_size: int = 1
    chat_format: str = "chatml"  # resolved from --chat_format: chatml or qwen3
    added_tokens: tuple[str, ...] = ()  # ChatML tokens the tokenizer lacked and were added
    train_embeddings: bool = False  # the embeddings and output layer train (LoRA: as modules_to_save)
    vocab_size: int | None = None  # the tokenizer's size: the embeddings are resized to it when larger
    lora_r: int = 64
    lora_targets: tuple[str, ...] = ()  # empty: every linear layer but the output layer
    # peft target_parameters: None for the model's routed experts (their 3-D weights), () for none
    lora_target_parameters: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    activation_checkpointing: bool = True
    labelled_logits_only: bool = True
    sequence_parallel_size: int = 1  # --sequence_parallel_size: a row split across this many processes
    # a preference stage's reference (dpo, kto), one of REFERENCES: the adapter switched off (a new LoRA adapter), a
    # frozen copy of the starting adapter (--lora_weight_path), a frozen copy of the model (full-parameter), or
    # log-probabilities computed once before training (--precompute_ref_log_probs); none for other stages
    reference: str = "none"

    @property
    def data_parallel_size(self) -> int:
        """How many different batches a step takes: the processes of a sequence-parallel group share one row."""
        return max(self.world_size // max(self.sequence_parallel_size, 1), 1)


def plan_run(model_args, data_args, training_args, lora_args):
    """(RunPlan, tokenizer) for finetune.py's parsed flags: the model path resolved, the tokenizer loaded (ChatML
    tokens added, the chat template installed), the model's config read, and every decision taken. No weights are
    read. Raises ArgumentError for combinations that cannot train (trainable_embeddings)."""
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer, added_tokens, chat_format = load_tokenizer(
        model_path, training_args.model_max_length, data_args.system_message, cache_dir=training_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code, chat_format=data_args.chat_format,
    )
    mode = "qlora" if lora_args.q_lora else "lora" if lora_args.use_lora else "full"
    shard = sharding(training_args)
    dtype = compute_dtype(training_args)
    attn_implementation = resolve_attn_implementation(model_args.attn_implementation, dtype, training_args.use_cpu)
    saved = saved_quantization(model_path, training_args.cache_dir) if mode == "qlora" else None
    gptq = bool(saved) and saved.get("quant_method") == "gptq"
    plan = RunPlan(
        model_path=model_path,
        config=model_config(model_path, model_args.trust_remote_code, training_args.cache_dir),
        trust_remote_code=model_args.trust_remote_code, cache_dir=training_args.cache_dir, mode=mode,
        compute_dtype=dtype, load_dtype=dtype if mode != "full" else torch.float32,
        quantization="gptq" if gptq else "nf4" if mode == "qlora" else "none",
        gptq_bits=int(saved.get("bits", 4)) if gptq else 4,
        gptq_group_size=int(saved.get("group_size", 128)) if gptq else 128,
        attn_implementation=attn_implementation,
        per_sample_attention=model_args.attn_implementation == "auto" and attn_implementation == "sdpa",
        shard=shard, world_size=world_size(), chat_format=chat_format, added_tokens=tuple(added_tokens),
        train_embeddings=trainable_embeddings(model_args.train_embeddings, mode, added_tokens, shard),
        vocab_size=len(tokenizer), lora_r=lora_args.lora_r, lora_targets=tuple(lora_args.lora_target_modules or ()),
        lora_target_parameters=lora_target_parameters(lora_args),
        lora_dropout=lora_args.lora_dropout, activation_checkpointing=bool(training_args.activation_checkpointing),
        labelled_logits_only=bool(training_args.labelled_logits_only),
        sequence_parallel_size=getattr(training_args, "sequence_parallel_size", 1),
        reference=reference_kind(data_args.stage, mode, lora_args.lora_weight_path,
                                 getattr(training_args, "precompute_ref_log_probs", False)),
    )
    return plan, tokenizer


def reference_kind(stage: str, mode: str, lora_weight_path: str, precomputed: bool) -> str:
    """What a DPO/KTO run compares its policy with (one of REFERENCES): what it starts from, held as cheaply as the
    mode allows."""
    if stage not in ("dpo", "kto"):
        return "none"
    if precomputed:
        return "precomputed"
    if mode == "full":
        return "copy"
    return "adapter" if lora_weight_path else "adapter_off"


def lora_target_parameters(lora_args) -> tuple[str, ...] | None:
    """The bare parameters LoRA adapts: --lora_target_parameters, else (None) the model's routed experts; none with
    DoRA, PiSSA or OLoRA, which peft's ParamWrapper refuses (args.lora_variant_problems refuses them named)."""
    explicit = explicit_target_parameters(lora_args)
    if explicit is not None:
        return tuple(explicit)
    return () if lora_args.use_dora or rewrites_base_weights(lora_args.lora_init) else None


def world_size() -> int:
    """Processes in the run, as its launcher (torchrun, deepspeed, accelerate) sets WORLD_SIZE; 1 when run alone.
    Known before the process group is joined, so --dry_run says the same as the run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding(training_args) -> str:
    """none, zero1/zero2/zero3 (DeepSpeed's ZeRO stage), fsdp_grad (shard_grad_op) or fsdp_full (full_shard)."""
    stage = deepspeed_zero_stage(training_args)
    if stage is not None:
        return f"zero{stage}" if stage else "none"
    fsdp = training_args.fsdp
    if not fsdp:
        return "none"
    if fsdp is True:  # transformers >= 5.x: the strategy moved to fsdp_config (FSDP2: reshard_after_forward)
        reshard = str((training_args.fsdp_config or {}).get("reshard_after_forward", True)).lower()
        return "fsdp_full" if reshard in ("true", "1", "full_shard") else "fsdp_grad"
    options = " ".join(str(getattr(option, "value", option)) for option in
                       ([fsdp] if isinstance(fsdp, str) else fsdp))
    return "fsdp_grad" if "shard_grad_op" in options else "fsdp_full"


def resolve_attn_implementation(requested: str, dtype: torch.dtype, use_cpu: bool) -> str:
    """auto -> flash_attention_2 where flash-attn is installed and training runs on CUDA in 16 bits, else sdpa (made
    per-sample once the model is loaded: RunPlan.per_sample_attention)."""
    if requested != "auto":
        return requested
    on_cuda = torch.cuda.is_available() and not use_cpu
    if on_cuda and importlib.util.find_spec("flash_attn") is not None and dtype != torch.float32:
        return "flash_attention_2"
    return "sdpa"


def trainable_embeddings(requested: str, mode: str, added_tokens: list[str], shard: str) -> bool:
    """Whether the embeddings and output layer train, for --train_embeddings `requested` (auto, true or false):
    full-parameter training trains them unless false; LoRA when true, or auto and ChatML tokens had to be added (their
    embeddings start untrained). Refuses the combinations that cannot work."""
    if mode == "full":
        return requested != "false"
    train = {"true": True, "false": False}.get(requested, bool(added_tokens))
    if mode == "qlora" and added_tokens:
        raise ArgumentError(
            f"--q_lora: the tokenizer lacks {' and '.join(added_tokens)}, so they would have to be learned, but Q-LoRA "
            "keeps the base model frozen in 4 bits and its embeddings cannot learn new tokens. Train LoRA on the "
            "full-precision model instead (drop --q_lora; the embeddings then train as modules_to_save), or start "
            "from a model whose tokenizer already has the ChatML tokens."
        )
    if added_tokens and not train:
        logger.warning("--train_embeddings false: the added %s tokens keep untrained embeddings.", list(added_tokens))
    if train and shard == "zero3":
        # peft copies modules_to_save, which cannot be done with ZeRO-3's partitioned parameters
        raise ArgumentError(
            "LoRA with trainable embeddings (--train_embeddings, or ChatML tokens added to the tokenizer) cannot run "
            "under DeepSpeed ZeRO-3: use --deepspeed ds_config_zero2.json (finetune/finetune_lora_ds.sh's default)."
        )
    return train
