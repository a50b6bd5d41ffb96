#!/usr/bin/env bash
# MaskedAdamW on the GPU machine, in one call of about 5 minutes, from the repository root:
#   bash benchmarks/gpu_optim.sh
# 1. builds mu_fast._C with CUDA for this GPU's architecture only (editable install, no network);
# 2. runs the GPU optimizer tests (tests/optim/test_masked_adamw_gpu.py + the CPU-collected optimizer tests);
# 3. runs benchmarks/bench_optim.py on the GPU (MU_FAST_BENCH_QUICK=1: the 5% structures of one Llama-3-8B
#    layer, plus whole Llama-3-8B and Gemma-2-9B at 5% heads+neurons), JSON to $OUT and to
#    benchmarks/results/<device>/bench_optim.json;
# 4. prints the ratio table.
# Env: OUT (default /tmp/mu_fast_gpu), PY (python3), SKIP_BUILD=1, SKIP_TESTS=1, SKIP_BENCH=1, FULL_BENCH=1 (every
# density and structure; longer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mu_fast_gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[gpu_optim +$(( $(date +%s) - t0 ))s] $*"; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
  stamp "building mu_fast._C for sm_$ARCH"
  if ! MU_FAST_BUILD_EXT=1 MU_FAST_CUDA_ARCHS=$ARCH MAX_JOBS=${MAX_JOBS:-16} \
      $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    stamp "editable install failed (log in $OUT/build.log); trying build_ext --inplace"
    MU_FAST_BUILD_EXT=1 MU_FAST_CUDA_ARCHS=$ARCH $PY setup.py build_ext --inplace > "$OUT/build_inplace.log" 2>&1 \
      || { tail -40 "$OUT/build_inplace.log"; stamp "BUILD FAILED; continuing with the triton and torch backends"; }
    # Without the editable install, mu_fast.kernels (package_dir kernels/) needs a link on this throwaway copy.
    [ -e mu_fast/kernels ] || ln -s ../kernels mu_fast/kernels
  fi
fi
# Optional peers carried as wheels (see the report): bitsandbytes, torchao.
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
$PY -c "import mu_fast; print(mu_fast.backends())" 2>&1 | tee "$OUT/backends.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "GPU optimizer tests"
  timeout 150 $PY -m pytest -q -x tests/optim/test_masked_adamw_gpu.py tests/optim/test_masked_adamw_optimizer.py \
      -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  SLUG=$($PY -c "from benchmarks.common import device_slug; print(device_slug())")
  mkdir -p "benchmarks/results/$SLUG"
  stamp "bench_optim on $SLUG"
  QUICK=1
  [ "${FULL_BENCH:-0}" = 1 ] && QUICK=0
  # No timeout here: pytest-benchmark writes its JSON only at the end of the session.
  MU_FAST_BENCH_QUICK=$QUICK $PY -m pytest -q benchmarks/bench_optim.py --benchmark-only \
      -p no:cacheprovider --benchmark-json "$OUT/bench_optim.json" > "$OUT/bench.log" 2>&1
  tail -5 "$OUT/bench.log"
  if [ -s "$OUT/bench_optim.json" ]; then
    cp "$OUT/bench_optim.json" "benchmarks/results/$SLUG/bench_optim.json"
    $PY benchmarks/print_tables.py --device "$SLUG" 2>&1 | tee "$OUT/table.txt"
  fi
fi
stamp "done"
