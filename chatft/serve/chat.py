"""Loading a fine-tuned result for chat, and generating one reply (used by cli_demo.py and tests).

A GGUF file (export_gguf.py's) is served by llama.cpp when llama-cpp-python is installed (chatft.serve.gguf_runtime), as
its users will run it; otherwise by transformers, from the file's de-quantised copy (chatft.model.gguf_convert.gguf_to_hf_dir)."""

from __future__ import annotations

import json

import torch
import transformers

from chatft import console
from chatft.data.chat_format import THINK_CLOSE, THINK_OPEN, stop_token_ids
from chatft.model.sources import (ADAPTER_CONFIG_FILE, adapter_base, checkpoint_kind, require_model_source,
                                saved_quantization)
from chatft.device import inference_device_and_dtype
from chatft.errors import ArgumentError
from chatft.serve.gguf_runtime import LlamaCppModel, llama_cpp_installed


def load_chat_model(path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False, device=None):
    """(model, tokenizer, kind) from a full, merged or GPTQ model directory, a LoRA/Q-LoRA adapter directory or a
    .gguf file. A GGUF file in llama.cpp is a LlamaCppModel, with no tokenizer (llama.cpp has its own).

    A Q-LoRA adapter is served on the same NF4 rounding of its base that it was trained on.
    """
    require_model_source(path, "--model_name_or_path", allow_adapter=True, trust_remote_code=trust_remote_code)
    kind = checkpoint_kind(path)
    if kind == "gguf" and llama_cpp_installed():
        return LlamaCppModel.load(path), None, kind
    if kind == "gguf":
        from chatft.model.load import resolve_model_path

        path = resolve_model_path(path)
    if kind in ("lora", "qlora"):
        base = adapter_base(path)
        require_model_source(base, f"the base model recorded in {path}/{ADAPTER_CONFIG_FILE}:",
                             trust_remote_code=trust_remote_code)
    default_device, default_dtype = inference_device_and_dtype(gptq=kind == "gptq")
    device, dtype = device or default_device, dtype or default_dtype
    loading = {"dtype": dtype, "device_map": {"": device}, "trust_remote_code": trust_remote_code,
               "use_safetensors": True}
    if kind == "qlora":
        from chatft.model.load import nf4_config

        if saved_quantization(base) is None:  # an adapter trained on a GPTQ base loads that base as saved
            loading["quantization_config"] = nf4_config(dtype)
    if kind == "gptq" or (kind == "qlora" and "quantization_config" not in loading):  # a GPTQ model or base
        console.import_gptqmodel()
    if kind in ("lora", "qlora"):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **loading)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **loading)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer, kind


def load_tools(path: str) -> list[dict]:
    """Tool definitions from a JSON file: a list of definitions (bare or OpenAI-wrapped), as in training data's
    `tools`; wrapped as in training (chatft.data.chat_format.parse_tools)."""
    from chatft.checks import read_json_file
    from chatft.data.chat_format import parse_tools

    definitions, problem = read_json_file("--tools", path)  # the file, and where its JSON breaks (line, column)
    if problem:
        raise ArgumentError(problem)
    if not isinstance(definitions, list):  # parse_tools reads null and "" as "no tools"; a file naming none is a slip
        raise ArgumentError(f"--tools {path}: expected a list of tool definitions, found a "
                            f"{type(definitions).__name__}")
    try:
        return [json.loads(tool) for tool in parse_tools(definitions)]
    except ValueError as error:
        raise ArgumentError(f"--tools {path}: {error}") from None


@torch.inference_mode()
def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, streamer=None, tools=None,
                   **sampling) -> str:
    """One assistant reply to `messages` ([{"role", "content"}]) rendered by the tokenizer's chat template, with the
    tool definitions `tools` (a list of dicts) in the system message when given.

    Greedy unless `do_sample=True` is passed in `sampling` (with temperature, top_p, top_k).
    """
    if isinstance(model, LlamaCppModel):
        return model.reply(messages, max_new_tokens, streamer, tools, **sampling)
    inputs = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
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


class ThinkingStreamer(transformers.TextStreamer):
    """Streams a reply as `Assistant: ...`, with a `<think>` block it opens with shown on a `Thinking: ...` line
    of its own (or left out with show_thinking=False)."""

    def __init__(self, tokenizer, show_thinking: bool = True):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.show_thinking = show_thinking
        self.pending, self.state = "", "start"  # start -> (thinking ->) answer

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.pending += text
        if self.state == "start":
            stripped = self.pending.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.pending, self.state = stripped[len(THINK_OPEN):].lstrip("\n"), "thinking"
                if self.show_thinking:
                    print("Thinking: ", end="", flush=True)
            elif len(stripped) >= len(THINK_OPEN) or not THINK_OPEN.startswith(stripped) or stream_end:
                self.state = "answer"
                print("Assistant: ", end="", flush=True)
        if self.state == "thinking":
            if THINK_CLOSE in self.pending:
                thought, self.pending = self.pending.split(THINK_CLOSE, 1)
                if self.show_thinking:
                    print(thought.rstrip("\n"), flush=True)
                self.pending, self.state = self.pending.lstrip("\n"), "answer"
                print("Assistant: ", end="", flush=True)
            elif self.show_thinking and not stream_end:
                keep = len(THINK_CLOSE)  # a closing tag may be arriving in pieces
                print(self.pending[:-keep], end="", flush=True)
                self.pending = self.pending[-keep:]
        if self.state == "answer" or stream_end:
            print(self.pending, end="\n" if stream_end else "", flush=True)
            self.pending = ""
        if stream_end:
            self.state = "start"
