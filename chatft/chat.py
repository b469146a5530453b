"""Loading a fine-tuned result for chat, and generating one reply (used by cli_demo.py and tests)."""

from __future__ import annotations

import os

import torch
import transformers

from chatft.chat_format import IM_END


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_chat_model(path: str, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) from a full model directory or a LoRA adapter directory (detected)."""
    if is_adapter_dir(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(IM_END)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, streamer=None, **sampling) -> str:
    """One assistant reply to `messages` ([{"role", "content"}]) rendered by the tokenizer's chat template.

    Greedy unless `do_sample=True` is passed in `sampling` (with temperature, top_p, top_k).
    """
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    sampling.setdefault("do_sample", False)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
