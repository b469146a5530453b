#!/usr/bin/env bash
# Q-LoRA fine-tune on every GPU of every node (torchrun + DeepSpeed ZeRO-2), Qwen's defaults (fp16).
# The --q_lora training mode itself arrives with the Q-LoRA issue; until then finetune.py refuses it.
set -euo pipefail
LAUNCHER_NAME="finetune/finetune_qlora_ds.sh"
LAUNCHER_SUMMARY="Q-LoRA fine-tune with DeepSpeed ZeRO-2 over torchrun."
OUTPUT="output_qwen"
DEEPSPEED="ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launcher_options "$@"
run_torchrun \
  --num_train_epochs 5 \
  --per_device_train_batch_size 2 \
  --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps 8 \
  --eval_strategy no \
  --save_strategy steps \
  --save_steps 1000 \
  --save_total_limit 10 \
  --learning_rate 3e-4 \
  --weight_decay 0.1 \
  --adam_beta2 0.95 \
  --warmup_steps 0.01 \
  --lr_scheduler_type cosine \
  --logging_steps 1 \
  --report_to none \
  --model_max_length 512 \
  --lazy_preprocess True \
  --activation_checkpointing \
  --use_lora \
  --q_lora
