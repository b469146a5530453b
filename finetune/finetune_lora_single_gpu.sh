#!/usr/bin/env bash
# LoRA fine-tune in one process: on one GPU when there is one, else on the CPU. Qwen's hyper-parameters.
#
#   bash finetune/finetune_lora_single_gpu.sh [-m MODEL] [-d DATA] [-o OUTPUT] [finetune.py flags ...]
#
# With no arguments: the bundled SmolLM2-135M-Instruct on the bundled identity demo data, into output_qwen.
# Flags after the options (optionally after `--`) go to finetune.py and override the defaults below.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

MODEL=""  # empty: the bundled demo model, converted once by `python -m chatft.bundled`
DATA="$ROOT/data/identity_demo.json"
OUTPUT="output_qwen"
EXTRA=()

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -m|--model) MODEL="$2"; shift 2 ;;
    -d|--data) DATA="$2"; shift 2 ;;
    -o|--output) OUTPUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

if [[ ! -f "$DATA" ]]; then
  echo "error: data file not found: $DATA" >&2; usage >&2; exit 2
fi
cd "$ROOT"  # so `chatft` imports; paths given above were resolved by the caller's shell already
[[ "$DATA" = /* ]] || DATA="$OLDPWD/$DATA"
[[ "$OUTPUT" = /* ]] || OUTPUT="$OLDPWD/$OUTPUT"
if [[ -z "$MODEL" ]]; then
  MODEL="$("$PYTHON" -m chatft.bundled)"
elif [[ -e "$OLDPWD/$MODEL" && "$MODEL" != /* ]]; then
  MODEL="$OLDPWD/$MODEL"
fi

export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one process, one GPU
# bf16 where the device computes it natively, else fp16 on GPU / fp32 on CPU; --use_cpu when there is no GPU.
DEVICE_FLAGS="$("$PYTHON" -m chatft.device)"

set -x
"$PYTHON" finetune.py \
  --model_name_or_path "$MODEL" \
  --data_path "$DATA" \
  --output_dir "$OUTPUT" \
  $DEVICE_FLAGS \
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
  --activation_checkpointing \
  --use_lora \
  "${EXTRA[@]}"
