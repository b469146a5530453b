#!/usr/bin/env bash
# The main job, end to end on this machine: ask the bundled SmolLM2-135M-Instruct who it is, LoRA
# fine-tune it on the bundled identity data (data/identity_demo.json), and ask again.
#
#   bash demo.sh [OUTPUT_DIR]     (default: output_demo; replaced on each run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OUTPUT="${1:-output_demo}"
QUESTIONS=(--query "Who are you?" --query "Who made you?" --query "What is the capital of France?")

MODEL="$(python -m chatft.bundled)"
echo "=== Before fine-tuning: $MODEL"
python cli_demo.py -c "$MODEL" "${QUESTIONS[@]}"

echo "=== LoRA fine-tuning on data/identity_demo.json -> $OUTPUT"
# Qwen's LoRA recipe, made quick for 80 short samples on a CPU: 30 optimizer steps of 8 samples
# at a higher learning rate, no activation checkpointing (the model is small).
bash finetune/finetune_lora_single_gpu.sh -o "$OUTPUT" --overwrite_output_dir True \
  --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --learning_rate 1e-3 \
  --num_train_epochs 3 --activation_checkpointing False

echo "=== After fine-tuning: $OUTPUT (LoRA adapter)"
python cli_demo.py -c "$OUTPUT" "${QUESTIONS[@]}"
