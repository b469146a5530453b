#!/usr/bin/env bash
# Q-LoRA fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-2): Qwen's LoRA recipe with --q_lora
# (a 4-bit NF4 or GPTQ base, one copy per process). Options: finetune/launch_common.sh, or
# `bash finetune/finetune_qlora_ds.sh -h`.
set -euo pipefail
RUNNER=torchrun DEEPSPEED=ds_config_zero2.json
LAUNCHER_SUMMARY="Q-LoRA fine-tune (LoRA on a 4-bit NF4 or GPTQ base, one copy per process) with DeepSpeed ZeRO-2 \
over torchrun."
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
qwen_recipe lora --q_lora
parse_launcher_options "$@"
run_finetune
