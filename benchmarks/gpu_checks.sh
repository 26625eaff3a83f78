#!/usr/bin/env bash
# Every GPU check and measurement BENCHMARKS.md asks for, in one go (a few minutes on one GPU):
# the CUDA tests, the metric engine at both sizes, the training throughput of ViT-B-32 (bf16: eager,
# torch.compile, fused AdamW, uint8 input normalised on the GPU, end to end from the prepared cache;
# model FLOP/s against the H200's 989 dense bf16 TFLOP/s) beside the loader's, the loader from files
# and from the cache on real-shaped images, the demo's train -> infer -> evaluate on CUDA, and
# last the whole test suite on this machine (failures listed by name).
# Each step has a time limit, so one slow step cannot eat the rest. Logs go to $OUT (default gpu-results/).
#   bash benchmarks/gpu_checks.sh            # python from $PYTHON, default python3
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

step() {  # step <log name> <seconds> <command...>: run, log, remember a failure, go on
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee "$out/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -E '[0-9]%\|' | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

# the demo end to end on CUDA: two epochs of the tiny model (bf16), then infer and evaluate there
demo="r=outputs/gpu-demo; rm -rf \$r && $py train.py dataset=demo model=tiny train.epochs=2 device=cuda \
hydra.run.dir=\$r && $py infer.py path=\$r device=cuda && $py evaluate.py path=\$r eval.device=cuda \
&& ls \$r/infer_output/*/*/eval_result.json \$r/infer_output/*/*/report.html"

step gpu 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step test_gpu 120 "$py" -m pytest -q tests/test_gpu.py
step metrics_seed 120 "$py" -m benchmarks.metrics seed --device cuda
step metrics_quickdraw 150 "$py" -m benchmarks.metrics quickdraw --device cuda --chunk-size 4096
step train_vit 360 "$py" -m benchmarks.train_throughput --backbone ViT-B-32 --batch-size 256 --precision bf16 --workers 8 --device cuda --peak-tflops 989
step loader_cache 300 "$py" -m benchmarks.loader --workers 0 2 4 8 --per-kind 1000
step demo_cuda 150 bash -c "$demo"
step metrics_seed_cpu 60 "$py" -m benchmarks.metrics seed --device cpu
step full_suite 420 "$py" -m pytest -q -rf -p no:cacheprovider tests
exit $status
