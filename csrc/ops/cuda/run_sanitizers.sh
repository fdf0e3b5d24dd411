#!/usr/bin/env bash
# Runs the quick CUDA kernel tests under compute-sanitizer (memcheck, then racecheck) on a GPU machine.
#
# Usage (repository root, package built with CUDA):  bash csrc/ops/cuda/run_sanitizers.sh [OUT_DIR]
# Logs go to OUT_DIR (default: .); the exit status is non-zero if either tool reports an error.
set -uo pipefail

out="${1:-.}"
mkdir -p "$out"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
sanitizer="${COMPUTE_SANITIZER:-$cuda_home/bin/compute-sanitizer}"
# The caching allocator would hide out-of-bounds accesses inside its pooled blocks.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# The "small" tests cover every kernel (direct, GEMM tiles, split-K, fused bottleneck) on shapes
# that stay fast under instrumentation.
tests=(python -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py -k small)

status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  "$sanitizer" --tool "$tool" --target-processes all --error-exitcode 1 "${tests[@]}" 2>&1 | tee "$out/sanitizer_$tool.log"
  rc=${PIPESTATUS[0]}
  echo "== $tool exit status $rc"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
