#!/usr/bin/env bash
# The main job, end to end on this machine: ask the bundled SmolLM2-135M-Instruct who it is, LoRA
# fine-tune it on the bundled identity data (data/identity_demo.json), ask the adapter, merge the
# adapter into the model, quantize the merged model to 4-bit GPTQ, ask the quantized model, export
# the merged model to a GGUF file for llama.cpp / Ollama / LM Studio, and ask that file (in
# llama.cpp when llama-cpp-python is installed, else in transformers).
#
#   bash demo.sh [OUTPUT_DIR]     (default: output_demo; OUTPUT_DIR, OUTPUT_DIR_merged,
#                                  OUTPUT_DIR_int4 and OUTPUT_DIR-q4_k_m.gguf are replaced on each run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
OUTPUT="${1:-output_demo}"
QUESTIONS=(--query "Who are you?" --query "Who made you?" --query "What is the capital of France?")

MODEL="$(python -m chatft.bundled)"
echo "=== Before fine-tuning: $MODEL"
python cli_demo.py --model_name_or_path "$MODEL" "${QUESTIONS[@]}"

echo "=== LoRA fine-tuning on data/identity_demo.json -> $OUTPUT"
# Qwen's LoRA recipe, made quick for 80 short samples on a CPU: 8 samples a step (not 2 x 8 accumulation), so
# 10 steps an epoch, 3 epochs, at a higher learning rate, no activation checkpointing (the model is small).
bash finetune/finetune_lora_single_gpu.sh -o "$OUTPUT" --overwrite_output_dir True \
  --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --learning_rate 1e-3 \
  --num_train_epochs 3 --activation_checkpointing False

echo "=== After fine-tuning: $OUTPUT (LoRA adapter)"
python cli_demo.py --model_name_or_path "$OUTPUT" "${QUESTIONS[@]}"

echo "=== Merging the adapter into the model -> ${OUTPUT}_merged"
python merge_lora.py --adapter_path "$OUTPUT" --output_dir "${OUTPUT}_merged" --overwrite

echo "=== 4-bit GPTQ quantization -> ${OUTPUT}_int4 (1 to 5 minutes on a 2-core CPU; log: ${OUTPUT}_int4.log)"
# gptqmodel's progress display is meant for a terminal; the log keeps it, the summary line is shown.
if ! python run_gptq.py --model_name_or_path "${OUTPUT}_merged" --data_path data/identity_demo.json \
    --output_dir "${OUTPUT}_int4" --bits 4 --overwrite > "${OUTPUT}_int4.log" 2>&1; then
  tail -n 40 "${OUTPUT}_int4.log"
  exit 1
fi
tail -n 1 "${OUTPUT}_int4.log"

echo "=== After fine-tuning, merging and 4-bit quantization: ${OUTPUT}_int4"
python cli_demo.py --model_name_or_path "${OUTPUT}_int4" "${QUESTIONS[@]}"

echo "=== GGUF export for llama.cpp, Ollama, LM Studio -> ${OUTPUT}-q4_k_m.gguf"
python export_gguf.py --model_name_or_path "${OUTPUT}_merged" --output_file "${OUTPUT}-q4_k_m.gguf" --type q4_k_m --overwrite

echo "=== After fine-tuning, merging and GGUF export: ${OUTPUT}-q4_k_m.gguf"
python cli_demo.py --model_name_or_path "${OUTPUT}-q4_k_m.gguf" "${QUESTIONS[@]}"
