# Sourced by the five launchers: one option parser, Qwen's recipe, and one way to run finetune.py. A launcher sets
#   RUNNER=python (one process) or RUNNER=torchrun with DEEPSPEED=<config>, and LAUNCHER_SUMMARY, then calls
#   qwen_recipe lora|full [more flags]; parse_launcher_options "$@"; run_finetune
# Options: -m/--model, -d/--data, -o/--output, --deepspeed CONFIG (torchrun only), -h/--help. Any other argument,
# and everything after `--`, goes to finetune.py after the recipe; finetune.py's parser keeps a flag's last value,
# so those flags override the recipe (tests/test_launchers.py checks both forms on every launcher).
# Environment: PYTHON (python); one process: CUDA_VISIBLE_DEVICES (0); torchrun: NNODES (1), NODE_RANK (0),
# MASTER_ADDR (localhost), MASTER_PORT (6001), GPUS_PER_NODE (default: the CUDA devices; with none,
# NPROC_PER_NODE or 2 CPU processes over gloo).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
LAUNCHER_NAME="finetune/$(basename "$0")"
OUTPUT="output_qwen"
RECIPE=()
PASS_THROUGH=()

# Qwen's recipe (its finetune_lora_*.sh and finetune_ds.sh). Full-parameter and LoRA differ only in batch,
# accumulation and learning rate (and --use_lora): a step is 16 samples in both.
qwen_recipe() {  # qwen_recipe lora|full [flags added to the recipe, e.g. --q_lora] -> RECIPE
  local kind="$1" batch accumulation learning_rate
  shift
  case "$kind" in
    lora) batch=2 accumulation=8 learning_rate=3e-4; set -- --use_lora "$@" ;;
    full) batch=1 accumulation=16 learning_rate=1e-5 ;;
    *) echo "qwen_recipe: lora or full, not '$kind'" >&2; return 2 ;;
  esac
  RECIPE=(
    --num_train_epochs 5 --per_device_train_batch_size "$batch" --per_device_eval_batch_size 1
    --gradient_accumulation_steps "$accumulation" --eval_strategy no --save_strategy steps --save_steps 1000
    --save_total_limit 10 --learning_rate "$learning_rate" --weight_decay 0.1 --adam_beta2 0.95 --warmup_steps 0.01
    --lr_scheduler_type cosine --logging_steps 1 --report_to none --model_max_length 512
    --activation_checkpointing "$@"
  )
}

usage() {
  local deepspeed_usage="" deepspeed_help="" environment
  if [[ "$RUNNER" = torchrun ]]; then
    deepspeed_usage=" [--deepspeed CONFIG]"
    deepspeed_help="  --deepspeed CONFIG    DeepSpeed config file, or a config name at the top of the repository (default: $DEEPSPEED)"$'\n'
    environment="NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-localhost} \
MASTER_PORT=${MASTER_PORT:-6001}
GPUS_PER_NODE (default: number of CUDA devices; without CUDA: NPROC_PER_NODE or 2 CPU processes over gloo)."
  else
    environment="CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} (one process, one GPU; the CPU when there is none)."
  fi
  cat <<USAGE
Usage: bash $LAUNCHER_NAME [-m MODEL] [-d DATA] [-o OUTPUT]$deepspeed_usage [finetune.py flags ...] [-- finetune.py flags ...]

$LAUNCHER_SUMMARY
Runs $RUNNER finetune.py with the model, data, output${deepspeed_usage:+, DeepSpeed config}, the device's precision flags and Qwen's recipe:
$(echo "${RECIPE[*]}" | fold -s -w 100 | sed 's/ *$//; s/^/    /')
then the finetune.py flags given here, which override the recipe (the last value of a flag wins).

  -m, --model PATH      model directory, cached hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct)
  -d, --data FILE       training data, JSON or JSONL conversations (default: data/identity_demo.json)
  -o, --output DIR      output directory (default: $OUTPUT)
${deepspeed_help}  -h, --help            this help
  Any other argument, and everything after --, goes to finetune.py (python finetune.py --help lists its flags).

Environment: PYTHON=${PYTHON} $environment
USAGE
}

fail_usage() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

need_value() {  # need_value OPTION [VALUE ...]: a value that is not itself an option follows OPTION
  [[ $# -ge 2 && "$2" != -* ]] || fail_usage "$1 needs a value"
}

parse_launcher_options() {  # sets MODEL, DATA, OUTPUT, DEEPSPEED and PASS_THROUGH; exits 2 on a bad option
  MODEL=""  # empty: the bundled demo model, converted once by `python -m chatft.bundled`
  DATA="$ROOT/data/identity_demo.json"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -m|--model) need_value "$@"; MODEL="$2"; shift 2 ;;
      -d|--data) need_value "$@"; DATA="$2"; shift 2 ;;
      -o|--output) need_value "$@"; OUTPUT="$2"; shift 2 ;;
      --deepspeed)
        [[ "$RUNNER" = torchrun ]] || fail_usage "--deepspeed needs several processes: use a *_ds.sh launcher" \
          "(GPUS_PER_NODE=1 for one GPU)"
        need_value "$@"; DEEPSPEED="$2"; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; PASS_THROUGH+=("$@"); break ;;
      *) PASS_THROUGH+=("$1"); shift ;;
    esac
  done
  [[ -f "$DATA" ]] || fail_usage "data file not found: $DATA"
  [[ "$RUNNER" != torchrun ]] || check_torchrun_settings
}

check_torchrun_settings() {
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

absolute() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }

# finetune.py with the options, the device flags, RECIPE, then PASS_THROUGH: `python finetune.py` in one process,
# or torchrun over GPUS_PER_NODE processes on each of NNODES nodes. set -x shows the command.
run_finetune() {
  DATA="$(absolute "$DATA")"; OUTPUT="$(absolute "$OUTPUT")"  # relative to the caller's directory
  [[ -z "$MODEL" || ! -e "$MODEL" ]] || MODEL="$(absolute "$MODEL")"  # a hub id stays as it is
  cd "$ROOT"  # so finetune.py finds the chatft package
  [[ -n "$MODEL" ]] || MODEL="$("$PYTHON" -m chatft.bundled)"
  local launch=() device_flags=() deepspeed=()
  if [[ "$RUNNER" = torchrun ]]; then
    local cuda_devices
    cuda_devices="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [[ -z "${GPUS_PER_NODE:-}" ]]; then
      if (( cuda_devices > 0 )); then GPUS_PER_NODE="$cuda_devices"; else GPUS_PER_NODE="${NPROC_PER_NODE:-2}"; fi
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torchrun's own default, set so that it does not warn about it
    launch=(torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    deepspeed=(--deepspeed "$DEEPSPEED")
  else
    export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one process, one GPU
    launch=("$PYTHON")
  fi
  # bf16 where the device computes it natively, else fp16 on GPU / fp32 on CPU; --use_cpu True without CUDA (gloo)
  read -ra device_flags <<< "$("$PYTHON" -m chatft.device)"
  set -x
  "${launch[@]}" finetune.py --model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT" \
    "${deepspeed[@]}" "${device_flags[@]}" "${RECIPE[@]}" "${PASS_THROUGH[@]}"
}
