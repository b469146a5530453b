#!/usr/bin/env bash
# LoRA fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-2); on a machine without CUDA,
# 2 CPU processes over gloo. Qwen's recipe. Options: finetune/launch_common.sh, or `bash finetune/finetune_lora_ds.sh -h`.
set -euo pipefail
RUNNER=torchrun DEEPSPEED=ds_config_zero2.json
LAUNCHER_SUMMARY="LoRA fine-tune with DeepSpeed ZeRO-2 over torchrun."
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
qwen_recipe lora
parse_launcher_options "$@"
run_finetune
