#!/usr/bin/env bash
# The packing benchmark's one prepared GPU run (issue 9), for a device machine that has only torch:
# throughput of the quick-start d32 trial by pack size up to 1024 against one trial per process
# (alone, and 8 processes sharing the GPU), and the EA/DPA step-time ratio inside the packed trainer.
# Run from the repository root: `OUT=<results dir> bash benchmarks/gpu_packing.sh`. Checked on CPU by
# tests/unit/test_bench_packing.py (same parts, small sizes, with Ray, MLflow, Optuna and pydantic refused).
set -euo pipefail
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
"$PY" -m benchmarks.bench_packing --parts throughput --device "$DEVICE" --steps "${STEPS:-200}" --reps 3 \
    --pack-sizes 1,8,32,64,256,1024 --solo-procs 8 --json "$OUT/packing_throughput.json" \
    | tee "$OUT/packing_throughput.md"
"$PY" -m benchmarks.bench_packing --parts kinds --device "$DEVICE" --steps "${STEPS:-200}" --reps 3 \
    --form-sizes 1,64,1024 --json "$OUT/packing_kinds.json" | tee "$OUT/packing_kinds.md"
