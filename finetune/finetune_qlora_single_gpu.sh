#!/usr/bin/env bash
# Q-LoRA fine-tune in one process: Qwen's LoRA recipe with --q_lora, i.e. LoRA on a 4-bit base (NF4 quantized on
# load with bitsandbytes, or a GPTQ model as it is). Options and the recipe: finetune/launch_common.sh, or
# `bash finetune/finetune_qlora_single_gpu.sh -h`.
set -euo pipefail
RUNNER=python
LAUNCHER_SUMMARY="Q-LoRA fine-tune (LoRA on a 4-bit NF4 or GPTQ base) in one process: on GPU 0 when there is
a GPU, else on the CPU."
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
qwen_recipe lora --q_lora
parse_launcher_options "$@"
run_finetune
