#!/usr/bin/env bash
# One prepared GPU session (H100 or H200, ~12 minutes of device time): build, CUDA tests, then the
# benchmarks in priority order, each time-boxed to a deadline. Results collect under $WORK and are
# packed into $OUT/results.tgz after every step, so a cut-off run still returns them.
#
# Usage: OUT=dir BUDGET_S=540 bash benchmarks/gpu_session.sh
# A device command runs at most 10 minutes, so the session takes two calls on the same warm
# machine: the second call (say BUDGET_S=150) skips the install and every step already done
# (markers in $WORK, which lies in the git-ignored runs/ so that it survives between calls) and
# runs what the first call left out. $OUT/results.tgz always holds the steps of both calls.
# Delete $WORK to start over. DRY_RUN=1 prints each step's command instead of running it (and
# skips the install): tests/test_benchmarks.py parses every one of them.
#
# Priority: install + CUDA tests; throughput at vit_base 32 images x 32 paired coalitions
# (forward and forward+backward, every engine route and every alternative, one run); the ShapleyViT
# training step at 32 x 32; throughput of the other model families at 224 px, bf16, 32 x 32
# (EVA-02-B, SigLIP-B/16, BEiT-B, a step each, time-boxed to 90-120 s); the engine's dispatch table
# from those runs and the default path re-timed with it in force (throughput and training step);
# the profile; reductions; attention
# (micro-benchmark, tile sweep); fused ops; then throughput at other sizes.
set -u
OUT="${OUT:-gpu-out}" WORK="${WORK:-runs/gpu-session}"
mkdir -p "$OUT" "$WORK/results" "$WORK/done"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
DEADLINE=$(($(date +%s) + ${BUDGET_S:-540}))
R="$WORK/results"
SUMMARY="$R/summary.log"

pack() { tar -czf "$OUT/results.tgz" -C "$WORK" results && cp "$SUMMARY" "$OUT/summary.log"; }

step() { # step NAME SECONDS COMMAND...: run under min(SECONDS, time left), log to $R/NAME.log
  local name=$1 limit=$2 left t0 rc
  shift 2
  if [[ -e "$WORK/done/$name" ]]; then
    return
  fi
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
    return
  fi
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
  ((rc != 124)) && touch "$WORK/done/$name" # a step cut by its time limit runs again next call
  tail -n 12 "$R/$name.log"
  pack
}

out_of() { # the --out value a benchmark module takes: a folder (harness.py) or, for older scripts, a JSON path
  grep -q "^from benchmarks import .*harness" "benchmarks/$1.py" && echo "$R" || echo "$R/$1.json"
}

PY="${PY:-python3}"
# The benchmarks run as modules (python -m benchmarks.<name>) against the installed shapkern and its
# extension: -P keeps the checkout, whose shapkern/ holds no extension, off sys.path, and PYTHONPATH
# names a folder that holds only a link to benchmarks/.
mkdir -p "$WORK/import" && ln -sfn "$PWD/benchmarks" "$WORK/import/benchmarks"
BENCH=(env PYTHONPATH="$WORK/import" "$PY" -P -m)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4" || echo "")
FAST=("shapkern engine" "shapkern engine, compiled" "shapkern engine, fused kernels" "shapkern engine, pair attention"
  "shapkern engine, compiled, pair attention" "shapkern default" "zero-input full forward" "packed, torch varlen_attn")
# The model families: every method but FlexAttention (the slowest alternative on vit_base, and it
# compiles); a method a family cannot run gets a row saying why.
FAMILY=("shapkern engine" "shapkern engine, compiled" "shapkern engine, fused kernels" "shapkern engine, fp8"
  "shapkern engine, pair attention" "shapkern engine, compiled, pair attention" "shapkern default"
  "zero-input full forward" "key mask, SDPA" "pairs + dense mask, SDPA" "packed, torch varlen_attn"
  "pairs + dense mask, torch.compile")
# CUDA tests that need only Triton and the source tree: they run while the extension builds.
TRITON_TESTS=()
for t in tests/test_ops_varlen_attention.py tests/test_ops_layer_norm.py tests/test_ops_linear_gelu.py \
  tests/test_engine.py tests/test_engine_adapters_eva.py tests/test_engine_adapters_siglip.py \
  tests/test_engine_adapters_beit.py tests/test_engine_dispatch.py; do
  [[ -e $t ]] && TRITON_TESTS+=("$t")
done

if [[ -z "${DRY_RUN:-}" && ! -e "$WORK/done/install" ]]; then
  { nvidia-smi; "$PY" -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)"; } \
    >"$R/machine.log" 2>&1
  head -n 20 "$R/machine.log"
  # The build runs beside the Triton tests, which import the source tree (no extension needed):
  # "python -m" puts the working directory first on sys.path; "python -P" (later) does not.
  "$PY" -m pip install --no-build-isolation --no-deps . >"$R/install.log" 2>&1 &
  BUILD=$!
  # Meanwhile, one untimed pass of every compiling method fills the inductor and Triton caches, so
  # that the timed runs below spend their budget measuring rather than compiling.
  warm() { PYTHONPATH=$PWD timeout "$@" --device cuda --repeats 1 --warmup 0 --out "$WORK/warmup"; }
  {
    warm 120 "$PY" -m benchmarks.throughput --stem base \
      --methods "shapkern engine, compiled" "shapkern engine, fused kernels" "pairs, FlexAttention" \
      "pairs + dense mask, torch.compile" "shapkern engine, compiled, pair attention"
    warm 120 "$PY" -m benchmarks.bench_train_step
  } >"$R/warmup.log" 2>&1 &
  WARMUP=$!
  step cuda-tests-triton 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda $XDIST "${TRITON_TESTS[@]}"
  wait $BUILD
  rc=$?
  echo "== install: rc=$rc" | tee -a "$SUMMARY"
  ((rc == 0)) && touch "$WORK/done/install"
  wait $WARMUP
  echo "== warmup done at $((DEADLINE - $(date +%s))) s before the deadline" | tee -a "$SUMMARY"
  grep -E "evals/s|images/s|failed" "$R/warmup.log"
  tail -n 3 "$R/install.log"
  "$PY" -P -m shapkern.env >"$R/env.log" 2>&1
  cat "$R/env.log"
fi
# The rest of `pytest -m cuda`, against the installed package and its extension.
IGNORE=()
for t in "${TRITON_TESTS[@]}"; do IGNORE+=("--ignore=$t"); done
step cuda-tests 120 "$PY" -P -m pytest -q -p no:cacheprovider -m cuda $XDIST tests "${IGNORE[@]}"
step throughput 240 "${BENCH[@]}" benchmarks.throughput --device cuda --out "$R" --stem throughput
step train-step 120 "${BENCH[@]}" benchmarks.bench_train_step --device cuda --out "$R"
family() { # family STEM LIMIT MODEL: throughput of one model family at its 224 px, bf16, 32 x 32
  step "throughput-$1" "$2" "${BENCH[@]}" benchmarks.throughput --device cuda --model "$3" --images 32 \
    --coalitions 32 --dtype bf16 --repeats 5 --methods "${FAMILY[@]}" --out "$R" --stem "throughput-$1"
}
family eva02 120 eva02_base_patch14_224
family siglip 120 vit_base_patch16_siglip_224
family beit 90 beit_base_patch16_224 # no pairs (Beit's bias table): nothing to compile but the engine
# The engine's dispatch table (issue 24) from every throughput run so far, then the default path
# (what a call gets) with that table in force, timed again beside the strongest alternatives.
RUNS=()
for run in "$R"/throughput.json "$R"/throughput-{eva02,siglip,beit}.json; do
  [[ -e $run || -n "${DRY_RUN:-}" ]] && RUNS+=("$run")
done
step dispatch-table 30 "${BENCH[@]}" benchmarks.dispatch_table "${RUNS[@]}" --out "$R"
step dispatch-check 150 env SHAPKERN_DISPATCH_TABLE="$R/dispatch_table.json" "${BENCH[@]}" benchmarks.throughput \
  --device cuda --methods "shapkern default" "shapkern engine, compiled" "shapkern engine, compiled, pair attention" \
  "pairs + dense mask, torch.compile" "packed, torch varlen_attn" --out "$R" --stem throughput-dispatch
step train-step-dispatch 120 env SHAPKERN_DISPATCH_TABLE="$R/dispatch_table.json" "${BENCH[@]}" \
  benchmarks.bench_train_step --device cuda --out "$R/dispatch"
step profile 60 "${BENCH[@]}" benchmarks.profile_engine --device cuda --out "$R"
step reductions 90 "${BENCH[@]}" benchmarks.bench_reductions --device cuda --sweep --out "$(out_of bench_reductions)"
# The reduction ops' Triton kernels carry no cuda marker (they also run in the CPU interpreter).
step reduce-triton-tests 90 "$PY" -P -m pytest -q -p no:cacheprovider tests/test_ops_reduce.py -k "triton or opcheck or cuda"
step attention 60 "${BENCH[@]}" benchmarks.bench_attention --device cuda --out "$R"
step tune-attention 60 "${BENCH[@]}" benchmarks.tune_attention --out "$R"
if [[ -e benchmarks/bench_fused.py ]]; then
  step fused 90 "${BENCH[@]}" benchmarks.bench_fused --device cuda --out "$(out_of bench_fused)"
fi
step throughput-64x128 100 "${BENCH[@]}" benchmarks.throughput --device cuda --images 64 --coalitions 128 \
  --repeats 3 --methods "${FAST[@]}" --out "$R" --stem throughput-vit_base-64x128
step throughput-small 60 "${BENCH[@]}" benchmarks.throughput --device cuda --model vit_small_patch16_224 \
  --methods "${FAST[@]}" --out "$R" --stem throughput-vit_small
step throughput-large 90 "${BENCH[@]}" benchmarks.throughput --device cuda --model vit_large_patch16_224 --images 16 \
  --methods "${FAST[@]}" --out "$R" --stem throughput-vit_large
step fp8-error 90 "${BENCH[@]}" benchmarks.fp8_error --device cuda --out "$R"
step peers 150 "${BENCH[@]}" benchmarks.experiments.peers --device cuda --model vit_base_patch16_224 --settings 196 \
  --reference-budget 100000 --budgets 512 2048 8192 --out "$R"
step recipe-epoch 180 "${BENCH[@]}" benchmarks.recipe_epoch --device cuda --out "$(out_of recipe_epoch)"
# The dataset explain rate (issue 28): vit_base, 1,024 images at 2,048 evaluations; the store lives in
# $WORK, so a step cut by its limit resumes at the next call without recomputing finished shards.
step explain-store 300 "$PY" -P -m shapkern explain --model vit_base_patch16_224 --data evidence --split train \
  --limit 1024 --budget 2048 --shard-size 64 --device cuda --no-progress --out "$WORK/explain-vit_base"
cp "$WORK/explain-vit_base/manifest.json" "$R/explain-store-manifest.json" 2>/dev/null
cp "$WORK/explain-vit_base/metrics.json" "$R/explain-store-metrics.json" 2>/dev/null
[[ -n "${DRY_RUN:-}" ]] && exit 0
pack
cat "$SUMMARY"
cat "$R"/throughput.md "$R"/train_step.md 2>/dev/null | grep -v "^$"
