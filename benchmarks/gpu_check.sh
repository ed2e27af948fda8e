#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine that needs no network (Python with torch, transformers,
# accelerate, peft; docs/gpu_check.md). First, where pip reaches a package index, fill benchmarks/gpu_wheels/
# (bash benchmarks/gpu_check_wheels.sh); copy the checkout with that folder to the CUDA machine; there, from the
# repository root:
#   OUT=gpu_results bash benchmarks/gpu_check.sh
# It installs the copied wheels into a scratch folder (no index), runs benchmarks/gpu_check.py within a time guard
# (GPU_CHECK_BUDGET_S, default 400 s; the whole command stays under 8 minutes) and prints the table last. Under $OUT:
# gpu_check.json (written after every check), gpu_check.md, gpu_check.log, env.txt (GPU, pip list, install log),
# stacks.txt (Python stacks, only if a check hangs past the budget). GPU_CHECK_ONLY=parity,loss_memory reruns groups;
# GPU_CHECK_ARGS="--tiny --device cpu" runs this whole script on a CPU (the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
WHEELS=benchmarks/gpu_wheels
BUDGET="${GPU_CHECK_BUDGET_S:-400}"
HARD_LIMIT=$((BUDGET + 40))  # then SIGINT: the script records the check it was in and writes what it has
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
ENV_LOG="$OUT/env.txt"
{
    echo "== $(date -u +%FT%TZ) $(uname -srm)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    "$PY" --version
    "$PY" -m pip list 2>/dev/null
} >"$ENV_LOG" 2>&1

# 1. The copied wheels, checked against this Python's version, installed without an index and without deps.
PYV="$("$PY" -c 'import platform; print(platform.python_version())')"
"$PY" benchmarks/gpu_check.py --check-wheels "$WHEELS" --python-version "$PYV" | tee -a "$ENV_LOG"
mapfile -t PINS < <(sed 's/#.*//' benchmarks/gpu_check_wheels.txt | grep -v '^[[:space:]]*$')
INSTALL=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
if ! "${INSTALL[@]}" --find-links "$WHEELS" "${PINS[@]}" >>"$ENV_LOG" 2>&1; then
    echo "installing the copied wheels failed:"; tail -20 "$ENV_LOG"; exit 3
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The probe imports what the check needs and builds the config the selective-checkpointing steps use (it fails where
# transformers is too old, e.g. 5.17). Should the copied transformers not import, the machine's own is tried with the
# imports alone: the check then runs, and only its selective-checkpointing steps can fail.
IMPORTS='from trl import DistillationTrainer, SFTTrainer; import peft, datasets
from trl_opsdl import OPSDLConfig, OPSDLTrainer, loss_utils, planner'
SELECTIVE='OPSDLConfig(output_dir="/tmp/probe", gradient_checkpointing=True, activation_checkpointing_policy="selective", bf16=False, report_to="none")'
if ! "$PY" -c "$IMPORTS
$SELECTIVE" >>"$ENV_LOG" 2>&1; then
    echo "the import probe failed with the copied transformers (env.txt); trying the machine's own"
    rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
    if ! "$PY" -c "$IMPORTS" >>"$ENV_LOG" 2>&1; then
        echo "import probe failed:"; tail -30 "$ENV_LOG"; exit 3
    fi
fi
echo "install and import probe: $(($(date +%s) - start)) s" | tee -a "$ENV_LOG"

# 2. The check. Its progress lines go to stdout and the log; the table comes last.
ONLY=()
[ -n "${GPU_CHECK_ONLY:-}" ] && ONLY=(--only "$GPU_CHECK_ONLY")
read -r -a DEVICE_ARGS <<<"${GPU_CHECK_ARGS:---device cuda}"
timeout -s INT -k 20 "$HARD_LIMIT" "$PY" benchmarks/gpu_check.py "${DEVICE_ARGS[@]}" --out "$OUT" --budget-s "$BUDGET" \
    "${ONLY[@]}" 2>&1 | tee "$OUT/gpu_check.log" | grep --line-buffered -E '^\[ *[0-9.]+s\]|Traceback|Error' | cut -c1-300
status=${PIPESTATUS[0]}
echo
echo "gpu_check.py exit status $status; whole command $(($(date +%s) - start)) s"
if [ -f "$OUT/gpu_check.json" ]; then
    "$PY" benchmarks/gpu_check.py --table "$OUT/gpu_check.json"
else
    echo "no results file:"; tail -40 "$OUT/gpu_check.log"
fi
exit "$status"
