#!/usr/bin/env bash
# Every GPU check and measurement BENCHMARKS.md asks for, in one go (a few minutes on one GPU):
# the CUDA tests, the metric engine at both sizes, and the training throughput of ViT-B-32 (bf16,
# eager and torch.compile) beside the loader's. Logs go to $OUT (default gpu-results/).
#   bash benchmarks/gpu_checks.sh            # python from $PYTHON, default python3
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

step() {  # step <log name> <command...>: run, log, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*" | tee "$out/$name.log"
    local t0=$SECONDS
    "$@" 2>&1 | tr '\r' '\n' | grep -v -E '^(ranking|original|converted).*(it/s|s/it)' | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

step gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step test_gpu "$py" -m pytest -q tests/test_gpu.py
step metrics_seed "$py" -m benchmarks.metrics seed --device cuda
step metrics_quickdraw "$py" -m benchmarks.metrics quickdraw --device cuda --chunk-size 4096
step train_vit "$py" -m benchmarks.train_throughput --backbone ViT-B-32 --batch-size 256 --precision bf16 --workers 8 --device cuda
exit $status
