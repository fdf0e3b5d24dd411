#!/usr/bin/env bash
# The one-call GPU check (bench/gpu_check.py): build, correctness, kernels, dispatch, throughput,
# decomposition, sanitizer, within a time budget; report in $OUT (or --out DIR).
#   bash bench/gpu_check.sh [--device cuda|cpu] [--quick] [--budget-s 480] [--out DIR]
# $PYTHON picks the interpreter (default: python3, the one holding PyTorch on the device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
