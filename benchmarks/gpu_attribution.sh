#!/usr/bin/env bash
# GPU checks of the attribution part (issue 4), in one run of at most ~5 minutes, from the repository root:
#   bash benchmarks/gpu_attribution.sh
# 1. The attribution tests on the GPU (Triton kernels on CUDA tensors, bf16 real-shape kernel checks, the
#    bf16 "Triton error <= 2x torch error" check, and the CPU tests under this machine's transformers).
# 2. The GPU benchmark: random-weight Llama-3-8B / Gemma-2-9B / Gemma-7B shapes (all layers) in bf16,
#    batches 1/32/128 at 24 tokens and 8 at 512 tokens; mu_fast (Triton / torch kernels) vs plain HF hooks.
# Writes $OUT/bench_attribution.json, $OUT/gpu_attribution_tests.log and
# benchmarks/results/<device>/bench_attribution.json, and prints a summary table last.
set -uo pipefail
OUT=${OUT:-/tmp/mu_fast_gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# mu_fast.kernels maps to kernels/ only through the package install; install (no extension) if needed.
$PY -c "import mu_fast.kernels.attribution_reduce" 2>/dev/null \
  || MU_FAST_BUILD_EXT=0 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/pip.log" 2>&1 \
  || { echo "pip install -e . failed; see $OUT/pip.log"; exit 1; }

echo "== attribution tests (GPU machine) =="
timeout 120 $PY -m pytest -q -p no:cacheprovider \
  tests/kernels/test_attribution_kernels.py tests/localize/test_attribution.py tests/localize/test_patching.py \
  tests/localize/test_causal_tracing.py tests/localize/test_attribution_result.py \
  >"$OUT/gpu_attribution_tests.log" 2>&1
echo "tests exit code $?"
tail -n 4 "$OUT/gpu_attribution_tests.log"

echo "== attribution benchmark =="
DEV=$($PY -c "from benchmarks.common import device_slug; print(device_slug())")
mkdir -p "benchmarks/results/$DEV"
MU_FAST_BENCH_ROUNDS=${MU_FAST_BENCH_ROUNDS:-3} timeout 200 $PY -m pytest benchmarks/bench_attribution.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json "$OUT/bench_attribution.json" >"$OUT/bench_attribution.log" 2>&1
echo "benchmark exit code $?"
tail -n 3 "$OUT/bench_attribution.log"
[ -s "$OUT/bench_attribution.json" ] && cp "$OUT/bench_attribution.json" "benchmarks/results/$DEV/bench_attribution.json"

$PY - "$OUT/bench_attribution.json" <<'PYEOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as err:
    sys.exit(f"no benchmark JSON ({err})")
print(f"\n{'workload':<34} {'impl':<18} {'median':>9} {'tok/s':>9} {'%6N':>6} {'peak MB':>9} {'×fwdbwd':>8} {'act×':>6} {'max B≈':>7} {'rho':>6}")
for b in data["benchmarks"]:
    i = b["extra_info"]
    if "batch" not in i:
        continue
    print(f"{i['model'] + ' B=' + str(i['batch']) + ' T=' + str(i['tokens']):<34} {i['impl']:<18} {b['stats']['median'] * 1e3:>7.1f}ms "
          f"{i['tokens_per_s']:>9.0f} {i['pct_6n']:>6.1f} {i.get('peak_mb', float('nan')):>9.0f} {i.get('peak_vs_fwd_bwd', float('nan')):>8.2f} "
          f"{i.get('act_peak_vs_fwd_bwd', float('nan')):>6.2f} {i.get('est_max_batch', 0):>7} {i['spearman_vs_reference']:>6.3f}")
if data["benchmarks"]:
    i = data["benchmarks"][0]["extra_info"]
    print(f"device {i.get('device')}, torch {i.get('torch')}, triton {i.get('triton')}, measured GEMM peak {i.get('peak_tflops_measured', 0):.3g} TFLOP/s")
PYEOF
