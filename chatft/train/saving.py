"""Saving a finished run to output_dir: the model or adapter, the tokenizer with its chat template, a generation
config that stops at <|im_end|>, the trainer state and the arguments used (finetune_args.json). A PiSSA/OLoRA
adapter is saved converted to a plain LoRA of the original base (chatft.model.lora_variants). The guard on
output_dir is chatft.output_dir; the loss curve and the end-of-run summary are chatft.train.report."""

from __future__ import annotations

import dataclasses
import json
import os

import shutil

import transformers

from chatft.data.chat_format import stop_token_ids
from chatft.model.lora_variants import STARTING_ADAPTER_ATTRIBUTE, as_plain_lora


def chat_generation_config(model, tokenizer):
    """The model's generation config, set to stop at <|im_end|> (and the tokenizer's eos) and pad with pad."""
    config = model.generation_config
    stop_ids = stop_token_ids(tokenizer)
    config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    config.pad_token_id = tokenizer.pad_token_id
    return config


def drop_reference_adapter(directory: str) -> None:
    """A DPO/KTO run from --lora_weight_path holds the starting adapter twice, the second frozen as its reference
    (chatft.model.load.REFERENCE_ADAPTER); peft saves every adapter, the others in a folder named after each. The
    result is the trained adapter alone, where merge_lora.py and --resume_from_checkpoint read it."""
    from chatft.model.load import REFERENCE_ADAPTER

    folder = os.path.join(directory, REFERENCE_ADAPTER)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        shutil.rmtree(folder)


class ReferenceAdapterNotSaved(transformers.TrainerCallback):
    """Each checkpoint without the reference adapter (`drop_reference_adapter`); a resumed run loads it again from
    --lora_weight_path."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            drop_reference_adapter(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


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
        drop_reference_adapter(output_dir)
        start = getattr(model, STARTING_ADAPTER_ATTRIBUTE, None)
        if start is not None:  # PiSSA/OLoRA: an adapter of the original base, not of the rewritten one
            as_plain_lora(output_dir, start)
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
