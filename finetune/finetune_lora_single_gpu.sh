#!/usr/bin/env bash
# LoRA fine-tune in one process, Qwen's recipe: on GPU 0 when there is a GPU, else on the CPU. With no arguments,
# the bundled SmolLM2-135M-Instruct on data/identity_demo.json into output_qwen. Options and the recipe:
# finetune/launch_common.sh, or `bash finetune/finetune_lora_single_gpu.sh -h`.
set -euo pipefail
RUNNER=python
LAUNCHER_SUMMARY="LoRA fine-tune in one process: on GPU 0 when there is a GPU, else on the CPU."
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
qwen_recipe lora
parse_launcher_options "$@"
run_finetune
