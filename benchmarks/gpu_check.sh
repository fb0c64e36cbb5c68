#!/usr/bin/env bash
# One prepared GPU session for the device tool: install, the CUDA tests, then the benchmarks.
# Everything lands under $OUT (default ./gpu-out). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT/results"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
step() { echo "== $1"; shift; timeout "$1" "${@:2}" 2>&1 | tee "$OUT/$(echo "$*" | tr -c 'a-z0-9' _ | cut -c1-60).log" | tail -n 40; }
step install 400 pip install --no-build-isolation --no-deps .
python -m shapkern.env | tee "$OUT/env.txt"
step cuda-tests 300 pytest -q -m cuda tests
step engine 300 python benchmarks/bench_engine.py --device cuda --out "$OUT/results"
step attention 200 python benchmarks/bench_attention.py --device cuda --out "$OUT/results"
step reductions 120 python benchmarks/bench_reductions.py --device cuda --out "$OUT/results/reductions-cuda.json"
step train-step 120 python benchmarks/bench_train_step.py --device cuda --out "$OUT/results"
