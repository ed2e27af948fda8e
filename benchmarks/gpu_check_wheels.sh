#!/usr/bin/env bash
# Fill benchmarks/gpu_wheels/ (git-ignored) with the wheels a GPU machine without network may lack, before copying
# the checkout there (docs/gpu_check.md). Run where pip reaches a package index:
#   bash benchmarks/gpu_check_wheels.sh
# The GPU machine is expected to have Python with torch (CUDA), transformers, accelerate and peft. The pins are
# benchmarks/gpu_check_wheels.txt; each is fetched with --no-deps for CPython 3.12 (change it in the loop below to
# the GPU machine's Python) and for this machine's Python (the dry run: benchmarks/gpu_check_dryrun.sh);
# multiprocess and regex have per-version wheels. The folder is kept under 60 MiB, so the copy stays small.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/gpu_wheels
PY="${PYTHON:-python3}"
LOCAL_PY="$("$PY" -c 'import platform; print(".".join(platform.python_version_tuple()[:2]))')"
mapfile -t PINS < <(sed 's/#.*//' benchmarks/gpu_check_wheels.txt | grep -v '^[[:space:]]*$')
rm -rf "$DEST"
mkdir -p "$DEST"
for pyv in 3.12 "$LOCAL_PY"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "${PINS[@]}"
done
ls -l "$DEST"
du -sh "$DEST"
# Tags fit CPython 3.12 on Linux x86_64, one version per package, under 60 MiB in all
"$PY" benchmarks/gpu_check.py --check-wheels "$DEST" --python-version 3.12 --limit-mib 60
