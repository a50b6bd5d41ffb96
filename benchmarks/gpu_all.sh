#!/usr/bin/env bash
# Every owed GPU check and benchmark in one call of at most ~9.5 minutes, from the repository root:
#   bash benchmarks/gpu_all.sh            (what is owed, and why, is listed in benchmarks/GPU_OWED.md)
# 0. carried wheels (.whl/*.whl via pip --target, .whl/*.zip site folders: the trimmed bitsandbytes) -> /tmp/site
# 1. mu_fast._C with CUDA for this GPU's architecture only (setup.py build_ext --inplace)                     <= 120 s
# 1b. the memory plan against torch's allocator counters: tests/test_memory_allocator.py (the allocator model against
#    torch's on a random sequence), then benchmarks/gpu_plan_reserved.py (max_memory_reserved and
#    max_memory_allocated of Gemma-2-9B FLU edit steps against the plan, bf16 at 24 GB and nf4 at 12 GB, and the
#    budget as a hard cap)                                                                                    <= 150 s
# 2. bench_edit: 7-9B localized edits, mu_fast vs the authors' recipe, one pytest session (and JSON) per model,
#    the most important rows first; every finished row is also appended to $OUT/edit_rows.jsonl
#    (Gemma-2-9B <= 200 s, Llama-3-8B and Gemma-7B <= 90 s each)
# 3. GPU optimizer tests (tests/optim/test_masked_adamw_gpu.py: cuda + triton backends)                      <= 60 s
# 4. loading for edits on the GPU: benchmarks/gpu_load_for_edit.py, then tests/models/test_edit_loading.py and
#    tests/edit/test_delta.py on the GPU machine (bitsandbytes on CUDA)                                      <= 150 s
# 5. batched edits (gpu_batched_edit.py), then the segmented delta-add kernel against the torch per-group loop
#    (gpu_segmented_delta.py, K = 1-16 groups at 7-9B widths; both JSONs appended to optim_gpu_tests.log)                   <= 90 s, <= 75 s
# 6. batched evaluations and K-LoRA relearning of K = 8 organism variants (bench_eval_variants.py,
#    bench_relearn_variants.py --device cuda; their JSON printed into optim_gpu_tests.log)                  <= 100 s
# A part starts only if its limit ends before DEADLINE (570 s): what is skipped is printed and stays owed.
# Results: $OUT/ (at most 8 files come back: env.txt, build.log, bench_edit.json, bench_edit.log, edit_rows.jsonl,
# optim_gpu_tests.log (every test log), load_for_edit.json, plan_reserved.json) and benchmarks/results/<device>/.
# Env: OUT (default /tmp/mu_fast_gpu), PY (python3), SKIP_BUILD=1, SKIP_PLAN=1, PLAN_ROWS (model:loc:frozen,...), SKIP_EDIT=1, SKIP_OPTIM=1, SKIP_LOAD=1, SKIP_BATCHED=1, SKIP_SEGMENTED=1, SKIP_VARIANTS=1, EDIT_TIMEOUT (s per model),
#      MU_FAST_EDIT_MODELS (comma list), MU_FAST_EDIT_STEPS / MU_FAST_AUTHORS_STEPS / MU_FAST_EDIT_SHORT_STEPS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mu_fast_gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
DEADLINE=${DEADLINE:-570}   # seconds: a part starts only if its time limit ends before this
stamp() { echo "[gpu_all +$(( $(date +%s) - t0 ))s] $*"; }
fits() { [ $(( $(date +%s) - t0 + $1 )) -le "$DEADLINE" ] || { stamp "SKIPPED $2: ${1}s would pass the ${DEADLINE}s deadline (owed)"; return 1; }; }

if ls .whl/*.whl .whl/*.zip > /dev/null 2>&1; then
  mkdir -p /tmp/site
  ls .whl/*.whl > /dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl > /tmp/peers_install.log 2>&1
  for z in .whl/*.zip; do [ -e "$z" ] && $PY -m zipfile -e "$z" /tmp/site >> /tmp/peers_install.log 2>&1; done
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -e mu_fast/kernels ] || ln -s ../kernels mu_fast/kernels   # mu_fast.kernels without an install

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
  stamp "building mu_fast._C for sm_$ARCH"
  MU_FAST_BUILD_EXT=1 MU_FAST_CUDA_ARCHS=$ARCH MAX_JOBS=${MAX_JOBS:-16} timeout 120 $PY setup.py build_ext --inplace \
      > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; stamp "BUILD FAILED: the edits run with the triton backend"; }
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, torch, mu_fast
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("backends", mu_fast.backends())
for name in ("transformers", "accelerate", "bitsandbytes", "triton", "peft"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "unavailable:", type(exc).__name__, str(exc)[:200])
EOF
SLUG=$($PY -c "from benchmarks.common import device_slug; print(device_slug())")
mkdir -p "benchmarks/results/$SLUG"

if [ "${SKIP_PLAN:-0}" != 1 ] && fits 150 "plan vs reserved memory"; then
  stamp "plan vs reserved memory (allocator model, Gemma-2-9B FLU steps, budget as a cap)"
  timeout 30 $PY -m pytest -q tests/test_memory_allocator.py -k torch_cuda_allocator -p no:cacheprovider --tb=short -rfs \
      > /tmp/plan_reserved.log 2>&1
  tail -2 /tmp/plan_reserved.log
  timeout 120 $PY benchmarks/gpu_plan_reserved.py "$OUT/plan_reserved.json" --rows "${PLAN_ROWS:-gemma-2-9b:flu:bf16,gemma-2-9b:flu:nf4}" \
      >> /tmp/plan_reserved.log 2>&1
  [ "$?" = 124 ] && stamp "gpu_plan_reserved TIMED OUT (120 s): finished rows are in plan_reserved.json"
  tail -4 /tmp/plan_reserved.log | cut -c1-600
  cat /tmp/plan_reserved.log >> "$OUT/optim_gpu_tests.log"   # $OUT brings back at most 8 files
  [ -s "$OUT/plan_reserved.json" ] && cp "$OUT/plan_reserved.json" "benchmarks/results/$SLUG/plan_reserved.json"
fi

if [ "${SKIP_EDIT:-0}" != 1 ]; then
  export MU_FAST_BENCH_ROWS="$OUT/edit_rows.jsonl"
  for model in ${MU_FAST_EDIT_MODELS:-gemma-2-9b llama-3-8b gemma-7b}; do
    model=${model//,/ }
    limit=$([ "$model" = gemma-2-9b ] && echo "${EDIT_TIMEOUT_TARGET:-200}" || echo "${EDIT_TIMEOUT:-90}")
    fits "$limit" "bench_edit $model" || continue
    stamp "bench_edit $model"
    MU_FAST_EDIT_MODELS=$model timeout "$limit" $PY -m pytest -q benchmarks/bench_edit.py --benchmark-only -rs \
        -p no:cacheprovider --benchmark-json "/tmp/bench_edit_$model.json" > "/tmp/bench_edit_$model.log" 2>&1
    rc=$?
    [ "$rc" = 124 ] && stamp "$model TIMED OUT: its finished rows are in edit_rows.jsonl only"
    grep -E "^(SKIPPED|FAILED|ERROR)|Error|passed|failed" "/tmp/bench_edit_$model.log" | cut -c1-300 | tail -8
    [ -s "/tmp/bench_edit_$model.json" ] && cp "/tmp/bench_edit_$model.json" "benchmarks/results/$SLUG/bench_edit_$model.json"
    cat "/tmp/bench_edit_$model.log" >> "$OUT/bench_edit.log"
  done
  cp "$OUT/edit_rows.jsonl" "benchmarks/results/$SLUG/edit_rows.jsonl" 2>/dev/null
  $PY benchmarks/edit_table.py --merge "$OUT/bench_edit.json" /tmp/bench_edit_*.json
  $PY benchmarks/edit_table.py "$OUT/edit_rows.jsonl" 2>&1 | tee /tmp/edit_table.txt  # printed; rebuilt from edit_rows.jsonl
fi

if [ "${SKIP_OPTIM:-0}" != 1 ] && fits 60 "GPU optimizer tests"; then
  stamp "GPU optimizer tests"
  timeout 60 $PY -m pytest -q tests/optim/test_masked_adamw_gpu.py -p no:cacheprovider --maxfail=10 --tb=short -rfs \
      >> "$OUT/optim_gpu_tests.log" 2>&1
  [ "$?" = 124 ] && stamp "GPU optimizer tests TIMED OUT (60 s)"
  tail -4 "$OUT/optim_gpu_tests.log"
fi
if [ "${SKIP_LOAD:-0}" != 1 ] && fits 150 "loading for edits"; then
  stamp "loading for edits (random 7-9B on the GPU, offloaded checkpoint)"
  timeout 100 $PY benchmarks/gpu_load_for_edit.py "$OUT/load_for_edit.json" > /tmp/load_for_edit.log 2>&1
  [ "$?" = 124 ] && stamp "gpu_load_for_edit TIMED OUT (100 s)"
  tail -15 /tmp/load_for_edit.log
  timeout 50 $PY -m pytest -q tests/models/test_edit_loading.py tests/edit/test_delta.py -p no:cacheprovider --tb=short -rfs \
      >> /tmp/load_for_edit.log 2>&1
  tail -3 /tmp/load_for_edit.log
  cat /tmp/load_for_edit.log >> "$OUT/optim_gpu_tests.log"
  [ -s "$OUT/load_for_edit.json" ] && cp "$OUT/load_for_edit.json" "benchmarks/results/$SLUG/load_for_edit.json"
fi
if [ "${SKIP_BATCHED:-0}" != 1 ] && fits 90 "batched edits (K runs in one pass)"; then
  stamp "batched edits: K = 1, 4, 8, 16 at 7-9B shapes (4 layers), head/neuron masks"
  timeout 85 $PY benchmarks/gpu_batched_edit.py --out /tmp/batched_edit_rows.jsonl --deadline 60 \
      > /tmp/batched_edit.log 2>&1
  [ "$?" = 124 ] && stamp "gpu_batched_edit TIMED OUT (85 s): its finished rows are in batched_edit_rows.jsonl"
  tail -10 /tmp/batched_edit.log
  cp /tmp/batched_edit_rows.jsonl "benchmarks/results/$SLUG/batched_edit_rows.jsonl" 2>/dev/null
  { echo "== batched_edit_rows.jsonl"; cat /tmp/batched_edit_rows.jsonl; } >> "$OUT/optim_gpu_tests.log" 2>/dev/null
fi
if [ "${SKIP_SEGMENTED:-0}" != 1 ] && fits 75 "segmented delta-add kernel"; then
  stamp "segmented delta-add: one Triton launch for K groups vs the torch per-group loop (fwd, fwd+bwd)"
  timeout 70 $PY -m pytest -q tests/kernels/test_segmented_delta.py -k gpu -p no:cacheprovider --tb=short -rfs \
      > /tmp/segmented_delta.log 2>&1
  tail -2 /tmp/segmented_delta.log
  timeout 60 $PY benchmarks/gpu_segmented_delta.py --out /tmp/segmented_delta.json --deadline 40 \
      >> /tmp/segmented_delta.log 2>&1
  [ "$?" = 124 ] && stamp "gpu_segmented_delta TIMED OUT (60 s): no JSON written"
  tail -18 /tmp/segmented_delta.log | cut -c1-300
  cat /tmp/segmented_delta.log >> "$OUT/optim_gpu_tests.log"
  cp /tmp/segmented_delta.json "benchmarks/results/$SLUG/segmented_delta.json" 2>/dev/null
  { echo "== segmented_delta.json"; cat /tmp/segmented_delta.json; } >> "$OUT/optim_gpu_tests.log" 2>/dev/null
fi
if [ "${SKIP_VARIANTS:-0}" != 1 ] && fits 100 "batched evaluations and relearning"; then
  stamp "K = 8 organism variants on the GPU: formats + probe features in one pass, K-LoRA relearning (rows 13-14)"
  timeout 45 $PY benchmarks/bench_eval_variants.py --device cuda --pairs 5 > /tmp/variants.log 2>&1
  [ "$?" = 124 ] && stamp "bench_eval_variants TIMED OUT (45 s)"
  timeout 50 $PY benchmarks/bench_relearn_variants.py --device cuda --pairs 3 >> /tmp/variants.log 2>&1
  [ "$?" = 124 ] && stamp "bench_relearn_variants TIMED OUT (50 s)"
  grep -E '"(speedup|probe_features_speedup)[a-z_]*"' /tmp/variants.log
  cat /tmp/variants.log >> "$OUT/optim_gpu_tests.log"   # the JSONs too (benchmarks/results/$SLUG/bench_*_variants.json)
fi
cp /tmp/build.log "$OUT/build.log" 2>/dev/null
stamp "done"
