#!/usr/bin/env bash
# Installs the dependencies, builds everything and runs the test suite: each fuzz target
# briefly, then the unit, integration and golden tests with CTest. GPU-labelled tests run only
# where `nvidia-smi -L` finds a GPU (elsewhere: scripts/gpu-tests.sh).
#
#   scripts/test.sh                        # what CI runs
#   SIEVE_FUZZ_SECONDS=0 scripts/test.sh   # skip the fuzz runs
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$jobs"

# libFuzzer targets, built with clang in their own tree, each run for a short while.
if [[ ${SIEVE_FUZZ_SECONDS:-20} != 0 ]] && command -v clang++ >/dev/null; then
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DSIEVE_FUZZ=ON -DSIEVE_BUILD_SERVER=OFF -DSIEVE_BUILD_TESTS=OFF -DSIEVE_CUDA=OFF \
    -DSIEVE_FUZZ_SECONDS="${SIEVE_FUZZ_SECONDS:-20}"
  cmake --build build-fuzz -j "$jobs" --target tokenizer_fuzz safetensors_fuzz
  ctest --test-dir build-fuzz --output-on-failure
fi

exclude=()
if ! nvidia-smi -L >/dev/null 2>&1; then
  exclude=(-LE gpu)
  echo "sieve: no GPU here; tests labelled 'gpu' run on the GPU machine (scripts/gpu-tests.sh)"
fi
ctest --test-dir build --output-on-failure -j "$jobs" "${exclude[@]}"
