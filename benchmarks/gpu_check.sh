#!/usr/bin/env bash
# One check of everything CUDA in tdconv, for a Linux machine with an NVIDIA GPU and PyTorch (no package
# registry needed), in under 7 minutes: the most valuable results first, each stage under its own time
# limit, its log kept even when it is killed, and a summary of what passed, what failed and what did
# not run.
#
#   benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--no-bench]
#
# Stages (limits in seconds; they add up to 400, and no stage runs past the 415 s deadline of the whole
# script: a stage gets what is left, or is marked "not run"):
#   imports    25   torch, numpy and pytest must import; tensorly, torchvision, ptflops are reported
#   build     100   the extension in place, for this GPU's architecture only (TDCONV_CUDA=1); its slowest
#                   unit compiles in 33 s on a 2-core CPU (torch 2.11, sm_90), so 16 jobs need about 50 s
#   kernels    50   the CUDA tests of the new kernels and engine paths (tests/test_gpu_kernels.py -k cuda,
#                   verbose, junit XML): validated even if every later stage runs out of time
#   cuda       40   every other CUDA test of the suite (-k cuda, verbose, junit XML)
#   sanitizer  30   compute-sanitizer memcheck on the fused kernels' CUDA tests (float32, bfloat16)
#   racecheck  25   compute-sanitizer racecheck and synccheck on one Tucker bfloat16 case
#   decompose  45   resnet18's 20 convs, CP rank C/2, 100 sweeps: eager / small solve / graphs / both,
#                   TensorLy beside it, then each shape group alone (benchmarks/gpu_bench.py; JSON
#                   lines written row by row)
#   layers     25   each seed layer at batch 256, float32 and bfloat16: fused vs the cuDNN chain
#   models     60   the seed's CP and Tucker resnet18 vs dense cuDNN, eager then torch.compile
# The benchmarks stop starting rows before their stage's limit (STAGE_DEADLINE); one whose last row
# still overruns is reported "partial", its finished rows kept, and does not fail the check. A sanitizer
# stage whose tool cannot attach to the device here (it prints "Device not supported" under some
# sandboxes), and that reports no error and no failed test, is "not run", neither passed nor failed. A failed
# import or build marks every later stage "not run"; the summary is always written.
# --dry-run runs every stage on the CPU with tiny shapes (the CUDA tests then skip, the sanitizer is not
# run, the build is skipped when tdconv._C is built in place or installed): a test of this script, not of the GPU.
# Its CPU stages take longer than the GPU's, so the dry run multiplies every limit and the deadline by
# DRY_SCALE (default 6). GPU_CHECK_DEADLINE (default 415 s) moves the deadline: tests/test_gpu_check.py
# uses it to check that a stage past its limit is killed and that the stages after the deadline do not run.
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
ROOT=$PWD
PY=${PYTHON:-python3}
PY=$(command -v "$PY" || echo "$PY")  # absolute: commands also run from OUT_DIR
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SCALE=1
if [ "$DRY" = 1 ]; then
  SCALE=${DRY_SCALE:-6}
  [[ $SCALE =~ ^[1-9][0-9]{0,2}$ ]] || { echo "DRY_SCALE must be an integer from 1 to 999, got '$SCALE'" >&2; exit 2; }
fi
DEADLINE=${GPU_CHECK_DEADLINE:-415}
[[ $DEADLINE =~ ^[1-9][0-9]{0,4}$ ]] || { echo "GPU_CHECK_DEADLINE must be a number of seconds, got '$DEADLINE'" >&2; exit 2; }
DEADLINE=$(( DEADLINE * SCALE ))
STOP=""  # why the remaining stages do not run (a failed import or build)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PASSED=()
FAILED=()
PARTIAL=()
NOTRUN=()
say() { echo "$*" | tee -a "$SUMMARY"; }
skip() { NOTRUN+=("$1"); say "$(printf '%-10s %-16s %s' "$1" "not run" "$2")"; }
# stage NAME LIMIT_S CMD...: runs CMD with its output in OUT/NAME.log and records the verdict. The limit
# is cut to what is left of the deadline; with too little left, or after STOP, the stage does not run.
stage() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) - 3 ))
  if [ -n "$STOP" ]; then skip "$name" "$STOP"; return 1; fi
  if [ "$left" -lt 5 ]; then skip "$name" "the ${DEADLINE}s deadline was reached"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log="$OUT/$name.log" t=$(date +%s)
  STAGE_DEADLINE=$(( limit - 8 )) timeout --kill-after=2 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local verdict=passed
  if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ -n "${PARTIAL_OK:-}" ]; then
    verdict="partial (${limit}s)"; PARTIAL+=("$name")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="killed at ${limit}s"; FAILED+=("$name")
  elif [ -n "${UNAVAILABLE_IF:-}" ] && grep -qE "$UNAVAILABLE_IF" "$log" && ! grep -qE "$FINDINGS" "$log"; then
    verdict="not run"; NOTRUN+=("$name")  # the tool could not attach here: says nothing of the kernels
  elif [ "$rc" -ne 0 ]; then verdict="failed"; FAILED+=("$name"); else PASSED+=("$name"); fi
  say "$(printf '%-10s %-16s rc=%-3s %4ss  %s' "$name" "$verdict" "$rc" "$(( $(date +%s) - t ))" \
    "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-140)")"
  return $rc
}
junit() { [ -f "$1" ] && say "$(printf '%-10s %s' '' "$(grep -o '<testsuite [^>]*' "$1" | head -1 | cut -c12-120)")"; }

if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--device cpu --tiny)
  say "gpu_check --dry-run on $(uname -m): every stage on the CPU, tiny shapes; figures meaningless"
else
  BENCH_ARGS=(--device cuda)
  {
    echo "== nvidia-smi"; timeout 10 nvidia-smi 2>&1 | head -20
    echo "== nvcc"; (command -v nvcc && timeout 10 nvcc --version) 2>&1 | tail -2
  } >> "$SUMMARY" 2>&1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(timeout 30 $PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" \
      2>/dev/null || echo "9.0")
    export TORCH_CUDA_ARCH_LIST
  fi
  say "gpu_check: $(timeout 10 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1); arch $TORCH_CUDA_ARCH_LIST"
fi

# ---- imports: the required ones must import; the optional ones are reported
stage imports 25 $PY -c "
import importlib
import torch, numpy, pytest
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())
missing = []
for m in ('tensorly', 'torchvision', 'ptflops', 'scipy'):
    try:
        importlib.import_module(m)
    except Exception:
        missing.append(m)
print('optional missing:', ', '.join(missing) or 'none')
" || STOP="the imports failed (imports.log)"

# ---- build in place (an in-place build shadows any installed tdconv: PYTHONPATH=the source tree)
if [ -n "$STOP" ]; then
  skip build "$STOP"
elif [ "$DRY" = 1 ] && { ls tdconv/_C*.so > /dev/null 2>&1 || (cd / && $PY -c "import tdconv._C") 2>/dev/null; }; then
  skip build "dry run: tdconv._C is built already"
else
  rm -f tdconv/_C*.so
  stage build 100 env TDCONV_CUDA=$([ "$DRY" = 1 ] && echo 0 || echo 1) MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace || STOP="the build failed (build.log)"
fi
# Python runs from OUT_DIR, so that the tdconv it imports is the in-place build (PYTHONPATH) or, where
# the tree was not built, the installed package: never the unbuilt source tree of the working directory.
ls tdconv/_C*.so > /dev/null 2>&1 && export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYT=(env -C "$OUT" $PY -m pytest -p no:cacheprovider --rootdir "$ROOT")
[ -z "$STOP" ] && (cd "$OUT" && timeout 30 $PY -m tdconv.info) >> "$SUMMARY" 2>&1

# ---- the CUDA tests alone, first: the new kernels, then the rest of the suite's
K="$ROOT/tests/test_gpu_kernels.py"
stage kernels 50 "${PYT[@]}" -v -rs "$K" -k cuda --junitxml="$OUT/kernels-tests.xml"
junit "$OUT/kernels-tests.xml"
stage cuda 40 "${PYT[@]}" -v -rs "$ROOT/tests" -k cuda --ignore="$K" --ignore="$ROOT/tests/test_gpu_check.py" \
  --junitxml="$OUT/cuda-tests.xml"
junit "$OUT/cuda-tests.xml"

# ---- compute-sanitizer on the kernels
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$DRY" = 1 ]; then
  skip sanitizer "dry run"; skip racecheck "dry run"
elif [ ! -x "$SAN" ]; then
  skip sanitizer "compute-sanitizer not found"; skip racecheck "compute-sanitizer not found"
else
  # What the sanitizer prints where it cannot attach to the GPU; a log that also reports errors, or a
  # failed test, is a finding all the same.
  UNAVAILABLE_IF='^=+ .*Device not supported'
  FINDINGS='ERROR SUMMARY: [1-9]|[0-9]+ failed'

  stage sanitizer 30 "$SAN" --tool memcheck --error-exitcode 9 "${PYT[@]}" -q "$K" \
    -k "cuda and matches_emulation and 3x3 and (float32 or bfloat16)"
  stage racecheck 25 bash -c '
    san=$1; k=$2; shift 2
    for tool in racecheck synccheck; do
      "$san" --tool $tool --error-exitcode 9 "$@" -q "$k" -k "cuda and matches_emulation and 3x3 and bfloat16 and tucker" || exit
    done' _ "$SAN" "$K" "${PYT[@]}"
  UNAVAILABLE_IF=
fi

# ---- benchmarks: one JSON line per measured row
if [ "$BENCH" = 1 ]; then
  B=(env -C "$OUT" $PY "$ROOT/benchmarks/gpu_bench.py")
  PARTIAL_OK=1
  stage decompose 45 "${B[@]}" decompose --repeats 1 --out "$OUT/bench.jsonl" "${BENCH_ARGS[@]}"
  stage layers 25 "${B[@]}" layers --out "$OUT/bench.jsonl" "${BENCH_ARGS[@]}"
  stage models 60 "${B[@]}" models --compile --out "$OUT/bench.jsonl" "${BENCH_ARGS[@]}"
  PARTIAL_OK=
else
  for s in decompose layers models; do skip "$s" "--no-bench"; done
fi

say "passed:  ${PASSED[*]:-none}"
say "failed:  ${FAILED[*]:-none}"
say "partial: ${PARTIAL[*]:-none}"
say "not run: ${NOTRUN[*]:-none}"
say "total    $(( $(date +%s) - T0 ))s"
[ "${#FAILED[@]}" -eq 0 ] && [ -z "$STOP" ]
