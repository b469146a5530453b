#!/usr/bin/env bash
# Full-parameter fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-3); on a machine without CUDA,
# 2 CPU processes over gloo. Qwen's recipe. Options: finetune/launch_common.sh, or `bash finetune/finetune_ds.sh -h`.
set -euo pipefail
RUNNER=torchrun DEEPSPEED=ds_config_zero3.json
LAUNCHER_SUMMARY="Full-parameter fine-tune with DeepSpeed ZeRO-3 over torchrun."
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
qwen_recipe full
parse_launcher_options "$@"
run_finetune
