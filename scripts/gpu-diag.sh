#!/usr/bin/env bash
# Diagnoses the CUDA backend test failures seen on an H200 on 2026-12-05 at 718dc72
# (LayerMatchesCpuWithSimpleAttention, BatchedEqualsAlone, LogitsMatchTransformersBf16 prompt0,
# DeviceSamplingEqualsHostSamplingEndToEnd; see the GPU-run issues' notes): the failing filters
# plain, with launches serialized, on one CPU core, then under compute-sanitizer memcheck and
# racecheck. Run on the GPU machine from the repository root, with the pack that
# `scripts/gpu-tests.sh pack` made here:
#   bash scripts/gpu-diag.sh [PACK_DIR] > $OUT/diag.log 2>&1
pack=${1:-.device-pack-gpu-tests}
export LD_LIBRARY_PATH="$PWD/$pack/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export SIEVE_SOURCE_DIR="$PWD"
bin=$pack/bin/engine_cuda_backend_gpu_test
filter='*Simple*:*BatchedEqualsAlone*:*LayerMatchesCpu*'
show() { grep -E "measure|FAILED|PASSED"; }
echo "=== plain"; "$bin" --gtest_filter="$filter" --gtest_brief=1 2>&1 | show
echo "=== CUDA_LAUNCH_BLOCKING=1"; CUDA_LAUNCH_BLOCKING=1 "$bin" --gtest_filter="$filter" --gtest_brief=1 2>&1 | show
echo "=== one CPU core"; taskset -c 0 "$bin" --gtest_filter="$filter" --gtest_brief=1 2>&1 | show
echo "=== memcheck"; timeout 240 compute-sanitizer --tool memcheck --print-limit 20 "$bin" \
  --gtest_filter='*LayerMatchesCpuWithSimple*' 2>&1 | tail -40
echo "=== racecheck"; timeout 200 compute-sanitizer --tool racecheck --print-limit 10 "$bin" \
  --gtest_filter='*LayerMatchesCpuWithSimple*' 2>&1 | tail -25
