"""Which console lines come from the toolkit, and which are library noise (lines no part of the toolkit chose to
show). Used by the tests that assert a run prints no library noise (the demo, a LoRA run, a chat)."""

from __future__ import annotations

import re

TOOLKIT_LINE = re.compile("|".join([
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) (chatft[.\w]*|finetune): ",  # our loggers
    r"=== ",  # demo.sh's stage titles
    r"\+ ",  # the launchers' `set -x` trace: the exact command they run
    r"User: ", r"Loaded \S+ \(",  # cli_demo.py
    r"trainable params: [\d,]+ \|\| all params",  # the LoRA summary finetune.py asks peft for
    r"\{'(loss|eval_loss|train_runtime)': ",  # the Trainer's log lines (--logging_steps)
    r"\s*\d+%\|[^|]*\| *\d+/\d+ \[",  # the training progress bar (tqdm, no description)
    r"Unloading and merging model: +\d+%",  # merge_lora.py's chosen progress bar
    r"=+$", r"Training finished$", r"  (time|peak memory|train loss|eval loss|saved|loss curve) ",  # run summary
    r"Stopped by SIGTERM at step ",
    r"Perplexity on \d+ held-out conversations",  # run_gptq.py's result
    r"\S+\.gguf$",  # export_gguf.py's result: the file's path alone
    r"error: ",  # a refused input, said once
]))


def library_noise(output: str) -> list[str]:
    """The lines of `output` (progress bars split at their carriage returns) that the toolkit did not print. An assistant's reply (from "Assistant: " to the blank line cli_demo ends it with)
    is the model's text, not noise, whatever it says."""
    noise, in_reply = [], False
    for line in output.split("\n"):
        if in_reply:  # the reply may hold any character, carriage returns included
            in_reply = line.strip() != ""
            continue
        if line.startswith("Assistant: "):
            in_reply = True
            continue
        noise += [part for part in line.split("\r") if part.strip() and not TOOLKIT_LINE.match(part)]
    return noise
