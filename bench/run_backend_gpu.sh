#!/usr/bin/env bash
# Runs the CUDA backend's GPU checks in one go on the GPU machine, from prebuilt binaries (the GPU
# machine has no Abseil, so the project's CMake cannot configure there):
#   1. scripts/transformers_bf16_logits.py: transformers bf16 logits of the golden prompts;
#   2. kernels_ops_gpu_test: the bf16 operators, cuBLASLt GEMM and simple attention kernel
#      against the CPU references;
#   3. engine_cuda_backend_gpu_test: the backend against the CPU backend, the fp32 goldens and
#      the transformers bf16 logits of step 1;
#   3b. engine_cuda_graph_gpu_test: CUDA-graph decode steps against eager ones;
#   4. optionally (SIEVE_SANITIZE=1) compute-sanitizer memcheck on the op and layer tests.
# Logs go to $OUT (default ./gpu-out). Run from the repository root.
#
# Here (with nvcc, Abseil, GoogleTest):
#   bench/run_backend_gpu.sh build [BUILD_DIR] [PACK_DIR]
#     configures and builds the two tests (default build dir /tmp/sieve-backend-build) and packs
#     them with the shared libraries they link into PACK_DIR (default build-gpu-backend, ignored
#     by git), to be carried to the GPU machine.
# There:
#   bench/run_backend_gpu.sh [PACK_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == build ]]; then
  build=${2:-/tmp/sieve-backend-build}
  pack=${3:-build-gpu-backend}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_BUILD_SERVER=OFF \
    -DSIEVE_CUDA=ON &&
    ninja -C "$build" -j2 kernels_ops_gpu_test engine_cuda_backend_gpu_test \
      engine_cuda_graph_gpu_test model_bench &&
    rm -rf "$pack" &&
    /work/shared/tools/pack-for-device.sh "$pack" "$build/engine/engine_cuda_backend_gpu_test" \
      "$build/engine/engine_cuda_graph_gpu_test" "$build/bench/model_bench" &&
    # The op test links no library to pack, which the packer's grep reports as a failure.
    { /work/shared/tools/pack-for-device.sh "$pack" "$build/kernels/kernels_ops_gpu_test" ||
      [[ -x $pack/bin/kernels_ops_gpu_test ]]; } &&
    rm -f "$pack"/lib/libcublas*  # the GPU machine has them in /usr/local/cuda/lib64
  exit $?
fi

pack=${1:-build-gpu-backend}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

main() {
  echo "== $(date -u +%FT%TZ) commit $(git rev-parse --verify -q HEAD || echo none)$(git diff --quiet HEAD 2>/dev/null || echo +uncommitted)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  # cuBLASLt: the CUDA toolkit's, else the one PyTorch's wheels bring.
  local libs=/usr/local/cuda/lib64
  if [[ ! -e $libs/libcublasLt.so.13 ]]; then
    local found
    found=$(find / -name 'libcublasLt.so.13' -not -path '/proc/*' 2>/dev/null | head -1)
    [[ -n $found ]] && libs="$libs:$(dirname "$found")"
  fi
  export LD_LIBRARY_PATH="$PWD/$pack/lib:$libs:${LD_LIBRARY_PATH:-}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$pack/bin/engine_cuda_backend_gpu_test" | grep -E "not found|cublas|cudart" || true

  echo "== transformers bf16 logits"
  local t0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout 240 python3 scripts/transformers_bf16_logits.py \
    --out "$OUT/hf_bf16_logits.safetensors" 2>&1 | grep -v Warning | tee "$OUT/hf.log"
  local rc_hf=${PIPESTATUS[0]}
  echo "transformers rc $rc_hf in $(( $(date +%s) - t0 )) s"

  echo "== kernels_ops_gpu_test"
  t0=$(date +%s)
  timeout 180 "$pack/bin/kernels_ops_gpu_test" 2>&1 | tee "$OUT/ops_test.log" |
    grep -E "^\[ *(OK|FAILED|PASSED|SKIPPED) *\]|Failure|error|Expected|Which is|actual" | head -80
  local rc_ops=${PIPESTATUS[0]}
  echo "ops test rc $rc_ops in $(( $(date +%s) - t0 )) s"

  echo "== engine_cuda_backend_gpu_test"
  t0=$(date +%s)
  [[ -s $OUT/hf_bf16_logits.safetensors ]] && export SIEVE_HF_BF16_LOGITS=$OUT/hf_bf16_logits.safetensors
  SIEVE_SOURCE_DIR=$PWD timeout 300 "$pack/bin/engine_cuda_backend_gpu_test" 2>&1 |
    tee "$OUT/backend_test.log" |
    grep -E "^\[ *(OK|FAILED|PASSED|SKIPPED) *\]|\[measure\]|Failure|diverges|error|Expected|Which is|actual" | head -120
  local rc_backend=${PIPESTATUS[0]}
  echo "backend test rc $rc_backend in $(( $(date +%s) - t0 )) s"

  echo "== engine_cuda_graph_gpu_test"
  t0=$(date +%s)
  SIEVE_SOURCE_DIR=$PWD timeout 240 "$pack/bin/engine_cuda_graph_gpu_test" 2>&1 |
    tee "$OUT/graph_test.log" |
    grep -E "^\[ *(OK|FAILED|PASSED|SKIPPED) *\]|\[measure\]|Failure|error|Expected|Which is|actual|margin" | head -120
  local rc_graph=${PIPESTATUS[0]}
  echo "graph test rc $rc_graph in $(( $(date +%s) - t0 )) s"

  local rc_san=0
  if [[ -n ${SIEVE_SANITIZE:-} ]] && command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck"
    timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$pack/bin/kernels_ops_gpu_test" \
      --gtest_filter='CudaOpsTest.*:CudaSimpleAttentionTest.*' 2>&1 | tail -3
    rc_san=${PIPESTATUS[0]}
    SIEVE_SOURCE_DIR=$PWD timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$pack/bin/engine_cuda_backend_gpu_test" \
      --gtest_filter='CudaBackendTest.Layer*:CudaModelTest.BatchedEqualsAlone' 2>&1 | tail -3
    [[ ${PIPESTATUS[0]} -eq 0 ]] || rc_san=9
    # The malformed-call test provokes a failing cudaMalloc on purpose: API errors not reported.
    SIEVE_SOURCE_DIR=$PWD timeout 60 compute-sanitizer --tool memcheck --report-api-errors no \
      --error-exitcode 9 "$pack/bin/engine_cuda_backend_gpu_test" \
      --gtest_filter='CudaBackendTest.Malformed*' 2>&1 | tail -2
    [[ ${PIPESTATUS[0]} -eq 0 ]] || rc_san=9
    echo "sanitizer rc $rc_san"
  fi
  echo "== rc: transformers $rc_hf ops $rc_ops backend $rc_backend graph $rc_graph sanitizer $rc_san"
  [[ $rc_hf -eq 0 && $rc_ops -eq 0 && $rc_backend -eq 0 && $rc_graph -eq 0 && $rc_san -eq 0 ]]
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
