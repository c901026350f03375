#!/usr/bin/env bash
# Every GPU test (CTest label `gpu`) in one command.
#
# The GPU machine has CUDA but not Abseil or gRPC, so the tests are built here and carried:
#   scripts/gpu-tests.sh pack [PACK_DIR]   # here: build every gpu-labelled test binary and copy
#                                          # them with the shared libraries they link into
#                                          # PACK_DIR (default .device-pack-gpu-tests, ignored)
#   scripts/gpu-tests.sh run [PACK_DIR]    # there, from the repository root: run them all
#   scripts/gpu-tests.sh targets BUILD_DIR # the gpu test targets of a configured build tree
# On a machine that has both a GPU and the dependencies, `ctest --test-dir build -L gpu` is the
# same thing. Exit status: 0 only if every binary ran and passed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
pack=${2:-.device-pack-gpu-tests}

# The gpu-labelled test targets of build tree $1: every executable named *_gpu_test (the CMake
# helpers label exactly those `gpu`). Read from the build graph, which exists before anything is
# built (CTest's list does not: gtest_discover_tests fills it in only once the binaries exist).
gpu_targets() {
  ninja -C "$1" -t targets all 2>/dev/null |
    grep -oE '^[A-Za-z0-9_]+_gpu_test:' | grep -v '^cmake_' | tr -d ':' | sort -u
}

if [[ $mode == targets ]]; then
  gpu_targets "${2:?usage: scripts/gpu-tests.sh targets BUILD_DIR}"
  exit 0
fi

if [[ $mode == pack ]]; then
  # SIEVE_GPU_BUILD names an existing CUDA build tree to take the binaries from (e.g. build, which
  # scripts/test.sh configures with CUDA when nvcc is here); by default a tree of its own.
  build=${SIEVE_GPU_BUILD:-build-gpu-tests}
  if [[ ! -f $build/build.ninja ]]; then
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_BUILD_SERVER=OFF \
      -DSIEVE_CUDA=ON >/dev/null || exit 1
  fi
  mapfile -t targets < <(gpu_targets "$build")
  [[ ${#targets[@]} -gt 0 ]] || { echo "no gpu tests found in $build"; exit 1; }
  ninja -C "$build" -j "$(nproc)" "${targets[@]}" || exit 1
  rm -rf "$pack"
  bins=()
  for t in "${targets[@]}"; do bins+=("$(find "$build" -name "$t" -type f -perm -u+x | head -1)"); done
  mkdir -p "$pack/bin" "$pack/lib"
  cp "${bins[@]}" "$pack/bin/"
  # The shared libraries they link, except the C/C++ runtime and CUDA's (the GPU machine has those).
  scripts/pack-libs.sh "$pack/lib" "${bins[@]}" || exit 1
  echo "packed ${#bins[@]} gpu tests into $pack: ${targets[*]}"
  exit 0
fi

export LD_LIBRARY_PATH="$PWD/$pack/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export SIEVE_SOURCE_DIR="$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || exit 1
failed=0
# The CUDA backend's comparison with transformers in bf16 reads logits that transformers makes
# here (the GPU machine has it); without them that one test reports itself skipped.
if [[ -z ${SIEVE_HF_BF16_LOGITS:-} ]] && python3 -c 'import torch, transformers' 2>/dev/null; then
  hf=$(mktemp -d)/hf_bf16_logits.safetensors
  if timeout 300 python3 scripts/transformers_bf16_logits.py --out "$hf" >"${hf%.safetensors}.log" 2>&1
  then
    export SIEVE_HF_BF16_LOGITS=$hf
  else
    echo "FAILED: scripts/transformers_bf16_logits.py (log: ${hf%.safetensors}.log)"
    failed=1
  fi
fi
for t in "$pack"/bin/*_gpu_test; do
  echo "=== $(basename "$t")"
  # A kernel that hangs fails its test instead of wedging the run.
  if ! timeout "${SIEVE_GPU_TEST_TIMEOUT:-600}" "$t" --gtest_brief=1; then
    echo "FAILED: $(basename "$t")"
    failed=1
  fi
done
exit $failed
