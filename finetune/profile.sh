#!/usr/bin/env bash
# Qwen's profiling table for any model: peak memory and seconds per iteration of LoRA, LoRA with trainable
# embeddings, Q-LoRA and full-parameter training at sequence lengths 256..8192 (batch 1, gradient accumulation 8).
#
#   bash finetune/profile.sh [-m MODEL] [-o OUTPUT_DIR] [--modes lora,full] [--lengths 256,512] [...]
#
# With no arguments: the bundled SmolLM2-135M-Instruct, every mode and length, into output_profile/
# (profile.md, profile.json, profile.png). `python -m bench.profile_table --help` lists every option.
# -m also takes a Qwen shape at random initialisation (python -m bench.models): qwen2.5-0.5b, qwen2.5-1.5b,
# qwen2.5-7b, qwen-1.8b, qwen-7b; for qwen-1.8b and qwen-7b each cell also shows Qwen's published A100 number.
# Runs bench.profile_table from the repository root; relative paths resolve against the caller's directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python}" -m bench.profile_table "$@"
