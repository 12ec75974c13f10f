#!/usr/bin/env bash
# One check of everything CUDA in tdconv, for any Linux machine with an NVIDIA GPU and PyTorch (no
# package registry needed): build the extension in place against this machine's torch, run the test
# suite (the CUDA tests included), run compute-sanitizer on the small CUDA kernel tests where it exists, run the
# benchmarks on the GPU, and write logs and JSON into OUT_DIR (8 files at most). The stage limits add up
# to under 9 minutes; a typical run on one H200 should take about 4. benchmarks/gpu_experiment.sh is the
# full-length training experiment, run separately.
#
#   benchmarks/gpu_check.sh OUT_DIR [--no-bench]
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's architecture),
# MAX_JOBS (parallel compile jobs). Python packages missing on the machine (e.g. tensorly) can be put
# on PYTHONPATH beforehand.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The extension is built in place: scripts run from benchmarks/ must find the package here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME TIMEOUT_S LOG CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  say "$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t ))" "$(tail -n 1 "$log" | cut -c1-150)")"
  return $rc
}

{
  echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
  echo "== nvcc"; (command -v nvcc && nvcc --version) 2>&1 | tail -2
  echo "== compute-sanitizer"; command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>&1
} >> "$SUMMARY" 2>&1

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
say "gpu_check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1); arch $TORCH_CUDA_ARCH_LIST"

rm -f tdconv/_C*.so
stage build 150 "$OUT/build.log" env TDCONV_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace || {
  say "build failed: see build.log"; exit 1; }
$PY -m tdconv.info 2>&1 | tee -a "$SUMMARY" | grep -E "cuda_kernels_usable|reasons_cuda"

# The whole suite: every device-parametrised test runs on CPU and CUDA here.
stage tests 150 "$OUT/tests.log" $PY -m pytest -q -rs -p no:cacheprovider tests
if [ "${2:-}" != "--no-bench" ]; then
  stage bench 120 "$OUT/bench.log" $PY benchmarks/decompose.py --device cuda --layers both --iters 100 \
    --tensorly-iters 20 --repeats 2 --json "$OUT/decompose-cuda.json"
  stage latency 60 "$OUT/latency.log" $PY benchmarks/latency.py --device cuda --inputs imagenet32 \
    --batches 32,256 --configs seed --min-time 0.5 --json "$OUT/latency-cuda.json"
fi
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SAN" ]; then
  stage sanitizer 45 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -p no:cacheprovider tests/test_cp.py tests/test_nn.py \
    -k "cuda and (mode_contract or fused_tiles or (fused_low_precision and not tucker))"
else
  say "sanitizer    skipped: compute-sanitizer not found"
fi
say "total        $(( $(date +%s) - T0 ))s"
