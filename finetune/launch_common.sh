# Sourced by the multi-process launchers (finetune_ds.sh, finetune_lora_ds.sh, finetune_qlora_ds.sh):
# option parsing, the torchrun topology, and the device flags. Each launcher sets its defaults, then calls
#   parse_launcher_options "$@" && run_torchrun <its finetune.py flags...>
# Options: -m/--model, -d/--data, -o/--output, --deepspeed CONFIG, -h/--help; finetune.py flags after `--`.
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6001), GPUS_PER_NODE
# (default: the CUDA devices; with none, NPROC_PER_NODE or 2 CPU processes over gloo), PYTHON (python).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
EXTRA=()

usage() {
  cat <<USAGE
Usage: bash $LAUNCHER_NAME [-m MODEL] [-d DATA] [-o OUTPUT] [--deepspeed CONFIG] [-- finetune.py flags ...]

$LAUNCHER_SUMMARY

  -m, --model PATH      model directory, cached hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct)
  -d, --data FILE       training data, JSON or JSONL conversations (default: data/identity_demo.json)
  -o, --output DIR      output directory (default: $OUTPUT)
  --deepspeed CONFIG    DeepSpeed config (default: $DEEPSPEED)
  -h, --help            this help
  -- FLAGS              everything after -- goes to finetune.py and overrides the defaults

Environment: NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-6001}
GPUS_PER_NODE (default: number of CUDA devices; without CUDA: NPROC_PER_NODE or 2 CPU processes over gloo).
USAGE
}

fail_usage() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

parse_launcher_options() {
  MODEL=""
  DATA="$ROOT/data/identity_demo.json"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -m|--model) [[ $# -ge 2 ]] || fail_usage "$1 needs a value"; MODEL="$2"; shift 2 ;;
      -d|--data) [[ $# -ge 2 ]] || fail_usage "$1 needs a value"; DATA="$2"; shift 2 ;;
      -o|--output) [[ $# -ge 2 ]] || fail_usage "$1 needs a value"; OUTPUT="$2"; shift 2 ;;
      --deepspeed) [[ $# -ge 2 ]] || fail_usage "$1 needs a value"; DEEPSPEED="$2"; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) fail_usage "unknown option: $1 (finetune.py flags go after --)" ;;
    esac
  done
  [[ -f "$DATA" ]] || fail_usage "data file not found: $DATA"
  [[ "$DEEPSPEED" = /* || -f "$DEEPSPEED" ]] || DEEPSPEED="$ROOT/$DEEPSPEED"  # repo-relative config names work anywhere
  [[ -f "$DEEPSPEED" ]] || fail_usage "DeepSpeed config not found: $DEEPSPEED"
  NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
  MASTER_ADDR="${MASTER_ADDR:-localhost}"; MASTER_PORT="${MASTER_PORT:-6001}"
  for name in NNODES NODE_RANK MASTER_PORT; do
    is_count "${!name}" || fail_usage "$name must be a whole number, not '${!name}'"
  done
  [[ -z "${GPUS_PER_NODE:-}" ]] || is_count "$GPUS_PER_NODE" || fail_usage "GPUS_PER_NODE must be a whole number"
  [[ -z "${NPROC_PER_NODE:-}" ]] || is_count "$NPROC_PER_NODE" || fail_usage "NPROC_PER_NODE must be a whole number"
  (( NNODES >= 1 && NODE_RANK < NNODES )) || fail_usage "need NNODES >= 1 and NODE_RANK < NNODES"
}

# Qwen's LoRA recipe, shared by finetune_lora_ds.sh and finetune_qlora_ds.sh (which adds --q_lora).
QWEN_LORA_FLAGS=(
  --num_train_epochs 5 --per_device_train_batch_size 2 --per_device_eval_batch_size 1
  --gradient_accumulation_steps 8 --eval_strategy no --save_strategy steps --save_steps 1000
  --save_total_limit 10 --learning_rate 3e-4 --weight_decay 0.1 --adam_beta2 0.95 --warmup_steps 0.01
  --lr_scheduler_type cosine --logging_steps 1 --report_to none --model_max_length 512
  --activation_checkpointing --use_lora
)

absolute() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }

run_torchrun() {
  DATA="$(absolute "$DATA")"; OUTPUT="$(absolute "$OUTPUT")"
  [[ -z "$MODEL" || ! -e "$MODEL" ]] || MODEL="$(absolute "$MODEL")"
  cd "$ROOT"  # so finetune.py finds the chatft package
  [[ -n "$MODEL" ]] || MODEL="$("$PYTHON" -m chatft.bundled)"
  local cuda_devices device_flags
  cuda_devices="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
  if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if (( cuda_devices > 0 )); then GPUS_PER_NODE="$cuda_devices"; else GPUS_PER_NODE="${NPROC_PER_NODE:-2}"; fi
  fi
  device_flags="$("$PYTHON" -m chatft.device)"  # bf16/fp16, and --use_cpu True without CUDA (gloo backend)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torchrun's own default, set so that it does not warn about it
  set -x
  torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    finetune.py --model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT" \
    --deepspeed "$DEEPSPEED" $device_flags "$@" "${EXTRA[@]}"
}
