#!/usr/bin/env bash
# One prepared GPU session (the device tool's lease is short): build, CUDA tests, then the
# benchmarks in priority order, each time-boxed to a session deadline. Results collect under
# $WORK and are packed into $OUT/results.tgz after every step, so a cut-off run still returns.
# Usage: OUT=dir BUDGET_S=530 bash benchmarks/gpu_session.sh
set -u
OUT="${OUT:-gpu-out}" WORK="${WORK:-/tmp/shapkern-gpu}"
mkdir -p "$OUT" "$WORK/results"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
DEADLINE=$(($(date +%s) + ${BUDGET_S:-530}))
R="$WORK/results"
SUMMARY="$R/summary.log"

pack() { tar -czf "$OUT/results.tgz" -C "$WORK" results && cp "$SUMMARY" "$OUT/summary.log"; }

step() { # step NAME SECONDS COMMAND...: run under min(SECONDS, time left), log to $R/NAME.log
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$((DEADLINE - $(date +%s) - 10))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "== $name: skipped, out of time" | tee -a "$SUMMARY"
    return
  fi
  t0=$(date +%s)
  timeout "$limit" "$@" >"$R/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -n 12 "$R/$name.log"
  pack
}

PY="${PY:-python3}"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4" || echo "")
FAST=("shapkern engine" "shapkern engine, compiled" "zero-input full forward" "packed, torch varlen_attn")

{ nvidia-smi; "$PY" -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)"; } \
  >"$R/machine.log" 2>&1
head -n 20 "$R/machine.log"
# The build runs beside the Triton tests, which import the source tree (no extension needed):
# "python -m" puts the working directory first on sys.path; "python -P" (later) does not.
"$PY" -m pip install --no-build-isolation --no-deps . >"$R/install.log" 2>&1 &
BUILD=$!
# Meanwhile, one untimed pass of every compiling method fills the inductor and Triton caches, so
# that the timed runs below spend their budget measuring rather than compiling.
warm() { PYTHONPATH=$PWD timeout "$@" --device cuda --repeats 1 --out "$WORK/warmup"; }
{
  warm 110 "$PY" benchmarks/run.py --stem base \
    --methods "shapkern engine, compiled" "pairs, FlexAttention" "pairs + dense mask, torch.compile"
  warm 35 "$PY" benchmarks/run.py --stem small --model vit_small_patch16_224 --methods "shapkern engine, compiled"
  warm 35 "$PY" benchmarks/run.py --stem large --model vit_large_patch16_224 --images 16 \
    --methods "shapkern engine, compiled"
} >"$R/warmup.log" 2>&1 &
WARMUP=$!
step cuda-tests-triton 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda $XDIST \
  tests/test_ops_varlen_attention.py tests/test_engine.py
wait $BUILD
echo "== install: rc=$?" | tee -a "$SUMMARY"
wait $WARMUP
echo "== warmup done at $((DEADLINE - $(date +%s))) s before the deadline" | tee -a "$SUMMARY"
grep -E "evals/s|failed" "$R/warmup.log"
tail -n 3 "$R/install.log"
"$PY" -P -m shapkern.env >"$R/env.log" 2>&1
cat "$R/env.log"
step cuda-tests-reduce 60 "$PY" -P -m pytest -q -p no:cacheprovider -m cuda tests/test_ops_reduce.py
step throughput 240 "$PY" benchmarks/run.py --device cuda --out "$R" --stem throughput
step profile 60 "$PY" benchmarks/profile_engine.py --device cuda --out "$R"
step throughput-64x128 100 "$PY" benchmarks/run.py --device cuda --images 64 --coalitions 128 --repeats 3 \
  --methods "${FAST[@]}" --out "$R" --stem throughput-vit_base-64x128
step throughput-small 60 "$PY" benchmarks/run.py --device cuda --model vit_small_patch16_224 \
  --methods "${FAST[@]}" --out "$R" --stem throughput-vit_small
step throughput-large 90 "$PY" benchmarks/run.py --device cuda --model vit_large_patch16_224 --images 16 \
  --methods "${FAST[@]}" --out "$R" --stem throughput-vit_large
step attention 60 "$PY" benchmarks/bench_attention.py --device cuda --out "$R"
step tune-attention 60 "$PY" benchmarks/tune_attention.py --out "$R"
step reductions 30 "$PY" benchmarks/bench_reductions.py --device cuda --out "$R/reductions.json"
step train-step 45 "$PY" benchmarks/bench_train_step.py --device cuda --out "$R"
pack
cat "$SUMMARY"
cat "$R"/throughput*.md 2>/dev/null | grep -v "^$"
