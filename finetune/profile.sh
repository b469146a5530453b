#!/usr/bin/env bash
# Qwen's profiling table for any model: peak memory and seconds per iteration of LoRA, LoRA with trainable
# embeddings, Q-LoRA and full-parameter training at sequence lengths 256..8192 (batch 1, gradient accumulation 8).
#
#   bash finetune/profile.sh [-m MODEL] [-o OUTPUT_DIR] [--modes lora,full] [--lengths 256,512] [...]
#
# With no arguments: the bundled SmolLM2-135M-Instruct, every mode and length, into output_profile/
# (profile.md, profile.json, profile.png). `python finetune/profile_table.py --help` lists every option.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-python}" "$ROOT/finetune/profile_table.py" "$@"
