#!/usr/bin/env bash
# The seed's experiment at full length on a GPU machine, within 7 minutes: dense ResNet18 trained for
# 15 epochs, CP and Tucker of the 8 conv2 layers at rank C/2, 5 fine-tuning epochs each, the table,
# JSON and plots written into OUT_DIR. Run it after benchmarks/gpu_check.sh (which builds in place).
#
#   benchmarks/gpu_experiment.sh OUT_DIR DATASET [more tdconv experiment options]
#
# DATASET as for `tdconv experiment --dataset`: npz:DIR, fashion-mnist, cifar10 (needs torchvision's
# files under --data-root, or a reachable download host). Machines that reach no package registry can be
# given the data as npz:DIR or as Debian's Fashion-MNIST files (--data-root DIR with FashionMNIST/raw/).
set -u
OUT=${1:?usage: benchmarks/gpu_experiment.sh OUT_DIR DATASET [options]}
DATASET=${2:?usage: benchmarks/gpu_experiment.sh OUT_DIR DATASET [options]}
shift 2
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
timeout 420 $PY -m tdconv experiment --device cuda --dataset "$DATASET" --epochs 15 --finetune-epochs 5 \
  --out "$OUT" --name seed-gpu --latency-batch 256 --quiet "$@" > "$OUT/experiment.log" 2>&1
rc=$?
# A run cut by the time limit has saved its checkpoints: rerun with --resume to finish it.
echo "experiment rc=$rc $(( $(date +%s) - T0 ))s" | tee -a "$OUT/experiment.log"
exit $rc
