#!/usr/bin/env bash
# Dry run of gpu_check.sh's installer on a CPU machine, before copying the checkout to the GPU machine
# (docs/gpu_check.md):
#   bash benchmarks/gpu_check_wheels.sh && bash benchmarks/gpu_check_dryrun.sh
# 1. the wheels to copy against the GPU machine's package list (GPU_PACKAGES_FILE=FILE: a text file with a line
#    "Packages: a, b, c." naming what that machine has installed; skipped when the file is missing): nothing copied
#    that it has (except the pinned peft), every requirement of a copied wheel either copied or there;
# 2. gpu_check.sh's install line (--no-index --no-deps --find-links) into scratch --target folders, with this Python
#    and with CPython 3.12 where pyenv has one (the multiprocess wheel is per Python version);
# 3. the size of the copy: the working tree (tracked + untracked files git does not ignore) plus
#    benchmarks/gpu_wheels, kept under 64 MiB;
# 4. the --tiny CPU check with the scratch install first on PYTHONPATH (as on the GPU machine). GPU_SIM_SITE=DIR
#    goes next, standing for the GPU machine's own packages (e.g. a --target install of the transformers and
#    huggingface-hub versions installed there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PACKAGES="${GPU_PACKAGES_FILE:-benchmarks/gpu_machine_packages.txt}"
WHEELS=benchmarks/gpu_wheels
SCRATCH="${SCRATCH:-$(mktemp -d /tmp/gpu_check_dryrun.XXXXXX)}"
mapfile -t PINS < <(sed 's/#.*//' benchmarks/gpu_check_wheels.txt | grep -v '^[[:space:]]*$')

echo "== 1. the wheels to copy against the GPU machine's packages ($PACKAGES)"
"$PY" - "$PACKAGES" "$WHEELS" "${PINS[@]}" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
from email.parser import Parser
packages_file, wheels, pins = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
text = packages_file.read_text() if packages_file.exists() else ""
listed = re.search(r"Packages: (.*?)\.\s*$", text, re.M)
machine = {norm(p.strip()) for p in listed.group(1).split(",")} if listed else set()
print(f"  machine lists {len(machine)} packages" if machine else f"  {packages_file} not found: step 1 skipped")
carried = {norm(p.split("==")[0]) for p in pins}
problems = []
for name in sorted(carried & machine):
    print(f"  note: {name} is on the machine already (pinned here to the tested version)")
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    for requirement in meta.get_all("Requires-Dist") or []:
        if "extra ==" in requirement:
            continue
        name = norm(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
        if machine and name not in machine | carried:
            problems.append(f"{wheel.name} needs {requirement!r}: neither on the machine nor carried")
for problem in problems:
    print("  PROBLEM:", problem)
print("  OK: every requirement is carried or on the machine" if not problems else f"  {len(problems)} problem(s)")
sys.exit(1 if problems else 0)
PYEOF

echo "== 2. the install line into scratch targets"
INSTALL=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
"$PY" "${INSTALL[@]}" --target "$SCRATCH/site" --find-links "$WHEELS" "${PINS[@]}"
echo "  $("$PY" --version): installed $(ls "$SCRATCH/site" | grep -c dist-info) distributions into $SCRATCH/site"
PY312=""
for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do  # a pyenv shim may exist and fail
    if "$candidate" -m pip --version >/dev/null 2>&1; then PY312="$candidate"; break; fi
done
if [ -n "$PY312" ]; then
    "$PY312" "${INSTALL[@]}" --target "$SCRATCH/site312" --find-links "$WHEELS" "${PINS[@]}"
    echo "  $("$PY312" --version): $(ls "$SCRATCH/site312" | grep dist-info | tr '\n' ' ')"
else
    echo "  no CPython 3.12 here: only the tag check (gpu_check_wheels.sh) speaks for 3.12"
fi

echo "== 3. the size of the copy"
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s + 0}')
wheel_bytes=$(du -sb "$WHEELS" | cut -f1)
total=$((tree_bytes + wheel_bytes))
echo "  working tree $((tree_bytes / 1024)) KiB + $WHEELS $((wheel_bytes / 1024)) KiB = $((total / 1048576)) MiB (kept under 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "  PROBLEM: over 64 MiB"; exit 1; }

echo "== 4. the --tiny CPU check on the scratch install"
export PYTHONPATH="$SCRATCH/site:${GPU_SIM_SITE:+$GPU_SIM_SITE:}$PWD"
"$PY" -c 'import trl, datasets, peft, transformers; print("  imports from:", trl.__file__, "| transformers", transformers.__version__)'
"$PY" benchmarks/gpu_check.py --tiny --device cpu --out "$SCRATCH/out" >"$SCRATCH/tiny.log" 2>&1 || true
"$PY" benchmarks/gpu_check.py --table "$SCRATCH/out/gpu_check.json" | tail -3
echo "  scratch: $SCRATCH"
