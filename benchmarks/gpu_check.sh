#!/usr/bin/env bash
# One check of everything CUDA in tdconv, for a Linux machine with an NVIDIA GPU and PyTorch (no package
# registry needed), in under 7 minutes: the most valuable results first, each stage under its own time
# limit, its log kept even when it is killed, and a summary of what passed, what failed and what did
# not run.
#
#   benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--no-bench]
#
# Stages (limits in seconds; they add up to 415):
#   imports    10   torch, numpy and pytest must import; tensorly, torchvision, ptflops are reported
#   build     150   the extension in place, for this GPU's architecture only (TDCONV_CUDA=1)
#   kernels    40   the CUDA tests of the new kernels and engine paths (tests/test_gpu_kernels.py -k cuda,
#                   verbose, junit XML): validated even if every later stage runs out of time
#   cuda       50   every other CUDA test of the suite (-k cuda, verbose, junit XML)
#   sanitizer  35   compute-sanitizer memcheck on the fused kernels' and the small solve's CUDA tests
#   decompose  55   resnet18's 20 convs, CP rank C/2, 100 sweeps: eager / small solve / graphs / both,
#                   TensorLy beside it (benchmarks/gpu_bench.py; JSON lines written row by row)
#   layers     35   each seed layer at batch 256, float32 and bfloat16: fused vs the cuDNN chain
#   models     40   the seed's CP and Tucker resnet18 vs dense cuDNN, eager then torch.compile
# --dry-run runs every stage on the CPU with tiny shapes (the CUDA tests then skip, the sanitizer is not
# run, the build is skipped when tdconv._C is already importable): a test of this script, not of the GPU.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's architecture),
# MAX_JOBS (parallel compile jobs). Packages missing on the machine can be put on PYTHONPATH beforehand.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--no-bench]}
shift
DRY=0
BENCH=1
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --no-bench) BENCH=0 ;;
    *) echo "unknown option $a (expected --dry-run, --no-bench)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PASSED=()
FAILED=()
NOTRUN=()
say() { echo "$*" | tee -a "$SUMMARY"; }
# stage NAME LIMIT_S CMD...: runs CMD with its output in OUT/NAME.log, records the verdict.
stage() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" t=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local verdict=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="killed at ${limit}s"; FAILED+=("$name"); 
  elif [ "$rc" -ne 0 ]; then verdict="failed"; FAILED+=("$name"); else PASSED+=("$name"); fi
  say "$(printf '%-10s %-16s rc=%-3s %4ss  %s' "$name" "$verdict" "$rc" "$(( $(date +%s) - t ))" \
    "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-140)")"
  return $rc
}
skip() { NOTRUN+=("$1"); say "$(printf '%-10s %-16s %s' "$1" "not run" "$2")"; }

if [ "$DRY" = 1 ]; then
  DEV=cpu
  BENCH_ARGS=(--device cpu --tiny)
  say "gpu_check --dry-run on $(uname -m): every stage on the CPU, tiny shapes; figures meaningless"
else
  DEV=cuda
  BENCH_ARGS=(--device cuda)
  {
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
    echo "== nvcc"; (command -v nvcc && nvcc --version) 2>&1 | tail -2
  } >> "$SUMMARY" 2>&1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" \
      2>/dev/null || echo "9.0")
    export TORCH_CUDA_ARCH_LIST
  fi
  say "gpu_check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1); arch $TORCH_CUDA_ARCH_LIST"
fi

# ---- imports: the required ones must import; the optional ones are reported
stage imports 10 $PY -c "
import importlib, sys
import torch, numpy, pytest
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())
missing = []
for m in ('tensorly', 'torchvision', 'ptflops', 'scipy'):
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(m)
print('optional missing:', ', '.join(missing) or 'none')
" || { say "required packages missing: see imports.log"; exit 1; }

# ---- build in place (an in-place build shadows any installed tdconv: PYTHONPATH=the source tree)
if [ "$DRY" = 1 ] && (cd / && $PY -c "import tdconv._C") 2>/dev/null; then
  skip build "dry run: tdconv._C is importable already"
else
  rm -f tdconv/_C*.so
  stage build 150 env TDCONV_CUDA=$([ "$DRY" = 1 ] && echo 0 || echo 1) MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace || { say "build failed: see build.log"; exit 1; }
fi
if ls tdconv/_C*.so > /dev/null 2>&1; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  PYT=($PY -m pytest)
else
  PYT=($PY -P -m pytest)  # the installed tdconv, not the unbuilt source tree
fi
$PY -m tdconv.info >> "$SUMMARY" 2>&1

# ---- the CUDA tests alone, first: the new kernels, then the rest of the suite's
junit() { [ -f "$1" ] && say "$(printf '%-10s %s' '' "$(grep -o 'tests="[0-9]*"[^>]*' "$1" | head -1 | cut -c1-100)")"; }
stage kernels 40 "${PYT[@]}" -v -rs -p no:cacheprovider tests/test_gpu_kernels.py -k cuda \
  --junitxml="$OUT/kernels-tests.xml"
junit "$OUT/kernels-tests.xml"
stage cuda 50 "${PYT[@]}" -v -rs -p no:cacheprovider tests -k cuda --deselect tests/test_gpu_kernels.py \
  --ignore=tests/test_gpu_check.py --junitxml="$OUT/cuda-tests.xml"
junit "$OUT/cuda-tests.xml"

# ---- compute-sanitizer on the kernels
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$DRY" = 1 ]; then
  skip sanitizer "dry run"
elif [ ! -x "$SAN" ]; then
  skip sanitizer "compute-sanitizer not found"
else
  stage sanitizer 35 "$SAN" --tool memcheck --error-exitcode 9 "${PYT[@]}" -q -p no:cacheprovider \
    tests/test_gpu_kernels.py -k "cuda and (matches_emulation and (3x3 or stride) or small_solve)"
fi

# ---- benchmarks: one JSON line per measured row
if [ "$BENCH" = 1 ]; then
  stage decompose 55 $PY benchmarks/gpu_bench.py decompose --out "$OUT/bench.jsonl" "${BENCH_ARGS[@]}"
  stage layers 35 $PY benchmarks/gpu_bench.py layers --out "$OUT/bench.jsonl" "${BENCH_ARGS[@]}"
  stage models 40 $PY benchmarks/gpu_bench.py models --compile --out "$OUT/bench.jsonl" "${BENCH_ARGS[@]}"
else
  for s in decompose layers models; do skip "$s" "--no-bench"; done
fi

say "passed:  ${PASSED[*]:-none}"
say "failed:  ${FAILED[*]:-none}"
say "not run: ${NOTRUN[*]:-none}"
say "total    $(( $(date +%s) - T0 ))s"
[ "${#FAILED[@]}" -eq 0 ]
