#!/bin/bash
# After the trajectory run ends: bench its checkpoints (short n=100 + 1,024 n=30), the protocol of the AMD base bench.
export PATH=/work/venv/bin:$PATH
while [ ! -f /work/runs/traj/runs/opsdl-seed0.json ]; do sleep 20; done
for step in 50 20 10 30 40; do
  echo "=== step $step $(date -u +%H:%M:%S)"
  trl-opsdl bench ruler --lengths 1024 --num-samples 30 --short-samples 100 --dtype bfloat16 --batch-size 8 \
    --adapter /work/runs/traj/models/opsdl-seed0/checkpoint-$step --label "step $step" \
    --baseline /work/runs/null/base-bf16-amd/ruler_bench.json --output-dir /work/runs/traj-bench/step-$step \
    > /work/runs/traj-bench-step-$step.log 2>&1
  echo "=== done step $step $(date -u +%H:%M:%S) rc=$?"
done
