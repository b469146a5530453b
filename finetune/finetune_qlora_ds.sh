#!/usr/bin/env bash
# Q-LoRA fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-2): Qwen's LoRA recipe with --q_lora
# (a 4-bit NF4 or GPTQ base, one copy per process). `bash finetune/finetune_qlora_ds.sh -h` for options.
set -euo pipefail
LAUNCHER_NAME="finetune/finetune_qlora_ds.sh"
LAUNCHER_SUMMARY="Q-LoRA fine-tune with DeepSpeed ZeRO-2 over torchrun."
OUTPUT="output_qwen"
DEEPSPEED="ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launcher_options "$@"
run_torchrun "${QWEN_LORA_FLAGS[@]}" --q_lora
