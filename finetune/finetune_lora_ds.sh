#!/usr/bin/env bash
# LoRA fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-2); on a machine without CUDA,
# 2 CPU processes over gloo. Qwen's defaults. `bash finetune/finetune_lora_ds.sh -h` for options.
set -euo pipefail
LAUNCHER_NAME="finetune/finetune_lora_ds.sh"
LAUNCHER_SUMMARY="LoRA fine-tune with DeepSpeed ZeRO-2 over torchrun."
OUTPUT="output_qwen"
DEEPSPEED="ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launcher_options "$@"
run_torchrun "${QWEN_LORA_FLAGS[@]}"
