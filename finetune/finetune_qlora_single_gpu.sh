#!/usr/bin/env bash
# Q-LoRA fine-tune in one process: finetune_lora_single_gpu.sh (same options, Qwen's hyper-parameters) with
# --q_lora, i.e. LoRA on a 4-bit base: NF4 quantized on load with bitsandbytes, or a GPTQ model as it is.
#
#   bash finetune/finetune_qlora_single_gpu.sh [-m MODEL] [-d DATA] [-o OUTPUT] [finetune.py flags ...]
exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_lora_single_gpu.sh" "$@" --q_lora
