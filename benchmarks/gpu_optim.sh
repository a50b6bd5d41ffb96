#!/usr/bin/env bash
# MaskedAdamW on the GPU machine in one call of at most ~9.5 minutes, from the repository root:
#   bash benchmarks/gpu_optim.sh
# 1. builds mu_fast._C with CUDA for this GPU's architecture only (setup.py build_ext --inplace with ninja, plus a
#    mu_fast/kernels link; the editable install is the fallback: on the GPU machine it needs the network)   ≤ 150 s
# 2. GPU optimizer tests: tests/optim/test_masked_adamw_gpu.py (cuda + triton backends)                       ≤ 90 s
# 3. bench_optim, quick (MU_FAST_BENCH_QUICK=1): one Llama-3-8B layer (5% heads/rows/cols/random), eager,
#    CUDA-graph-captured and compact-gradient rows                                                                                 ≤ 110 s
# 4. benchmarks/profile_optim.py: host vs device vs graph time, per-kernel time, tile sweep                   ≤ 150 s
# 5. bench_optim, whole Llama-3-8B and Gemma-2-9B at 5% heads+neurons (a separate pytest session and JSON)   ≤ 70 s
#    JSON to $OUT/ and benchmarks/results/<device>/; ratio tables to $OUT/table.txt.
# Optional peers carried in .whl/: *.whl (pip --target) and *.zip site folders (bitsandbytes), put on PYTHONPATH.
# Env: OUT (default /tmp/mu_fast_gpu), PY (python3), SKIP_BUILD=1, SKIP_TESTS=1, SKIP_BENCH=1, SKIP_MODELS=1, SKIP_PROFILE=1,
# FULL_BENCH=1 (every density and structure; much longer: raise the timeouts with BENCH_TIMEOUT / MODELS_TIMEOUT).
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
  export MU_FAST_BUILD_EXT=1 MU_FAST_CUDA_ARCHS=$ARCH MAX_JOBS=${MAX_JOBS:-16}
  if timeout 150 $PY setup.py build_ext --inplace > "$OUT/build_inplace.log" 2>&1; then
    # Without an editable install, mu_fast.kernels (package_dir kernels/) needs a link on this throwaway copy.
    [ -e mu_fast/kernels ] || ln -s ../kernels mu_fast/kernels
  else
    tail -30 "$OUT/build_inplace.log"
    stamp "build_ext --inplace failed (log in $OUT/build_inplace.log); trying the editable install"
    timeout 90 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; stamp "BUILD FAILED; continuing with the triton and torch backends"; }
    [ -e mu_fast/kernels ] || $PY -c "import mu_fast.kernels" 2> /dev/null || ln -s ../kernels mu_fast/kernels
  fi
  unset MU_FAST_BUILD_EXT
fi
# Optional peers carried in .whl/: wheels and zipped site folders, unpacked into /tmp/site.
if ls .whl/*.whl .whl/*.zip > /dev/null 2>&1; then
  mkdir -p /tmp/site
  ls .whl/*.whl > /dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl > "$OUT/peers_install.log" 2>&1
  for z in .whl/*.zip; do [ -e "$z" ] && $PY -m zipfile -e "$z" /tmp/site >> "$OUT/peers_install.log" 2>&1; done
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/backends.txt"
import importlib
import mu_fast
print(mu_fast.backends())
for name in ("bitsandbytes", "torchao"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "unavailable:", type(exc).__name__, str(exc)[:200])
EOF

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "GPU optimizer tests"
  timeout 90 $PY -m pytest -q tests/optim/test_masked_adamw_gpu.py -p no:cacheprovider --maxfail=10 --tb=short \
      --durations=5 -rfs 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  [ "${PIPESTATUS[0]}" = 124 ] && stamp "GPU tests TIMED OUT (90 s)"
fi

bench() {  # bench <name> <timeout s> <pytest -k expression>
  local name=$1 limit=$2 expr=$3
  stamp "bench_optim ($name) on $SLUG"
  MU_FAST_BENCH_QUICK=$QUICK timeout "$limit" $PY -m pytest -q benchmarks/bench_optim.py --benchmark-only -rs \
      -k "$expr" -p no:cacheprovider --benchmark-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 124 ] && stamp "$name TIMED OUT ($limit s): no JSON from this session"
  grep -E "^(SKIPPED|FAILED)" "$OUT/$name.log" | cut -c1-220
  tail -2 "$OUT/$name.log"
  if [ -s "$OUT/$name.json" ]; then
    cp "$OUT/$name.json" "benchmarks/results/$SLUG/$name.json"
  fi
}

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  SLUG=$($PY -c "from benchmarks.common import device_slug; print(device_slug())")
  mkdir -p "benchmarks/results/$SLUG"
  QUICK=1
  [ "${FULL_BENCH:-0}" = 1 ] && QUICK=0
  bench bench_optim "${BENCH_TIMEOUT:-110}" "x1-"
  if [ "${SKIP_PROFILE:-0}" != 1 ]; then
    stamp "profile_optim (host / device / graph split, tile sweep)"
    timeout "${PROFILE_TIMEOUT:-150}" $PY benchmarks/profile_optim.py --out "$OUT" > "$OUT/profile_optim.log" 2>&1
    [ "$?" = 124 ] && stamp "profile_optim TIMED OUT: rows so far are in $OUT/profile_optim.json"
    [ -s "$OUT/profile_optim.json" ] && cp "$OUT/profile_optim.json" "benchmarks/results/$SLUG/profile_optim.json"
    grep -v "^\s*File\|^Traceback" "$OUT/profile_optim.log" | cut -c1-170 | tail -60
  fi
  [ "${SKIP_MODELS:-0}" != 1 ] && bench bench_optim_models "${MODELS_TIMEOUT:-70}" "x32- or x42-"
  $PY benchmarks/print_tables.py --device "$SLUG" 2>&1 | grep -v "^$" | tee "$OUT/table.txt" | grep -A40 "bench_optim"
fi
stamp "done"
