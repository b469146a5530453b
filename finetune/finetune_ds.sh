#!/usr/bin/env bash
# Full-parameter fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-3); on a machine
# without CUDA, 2 CPU processes over gloo. Qwen's defaults. `bash finetune/finetune_ds.sh -h` for options.
set -euo pipefail
LAUNCHER_NAME="finetune/finetune_ds.sh"
LAUNCHER_SUMMARY="Full-parameter fine-tune with DeepSpeed ZeRO-3 over torchrun."
OUTPUT="output_qwen"
DEEPSPEED="ds_config_zero3.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launcher_options "$@"
run_torchrun \
  --num_train_epochs 5 \
  --per_device_train_batch_size 1 \
  --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps 16 \
  --eval_strategy no \
  --save_strategy steps \
  --save_steps 1000 \
  --save_total_limit 10 \
  --learning_rate 1e-5 \
  --weight_decay 0.1 \
  --adam_beta2 0.95 \
  --warmup_steps 0.01 \
  --lr_scheduler_type cosine \
  --logging_steps 1 \
  --report_to none \
  --model_max_length 512 \
  --activation_checkpointing
