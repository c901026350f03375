#!/usr/bin/env bash
# Installs the dependencies, builds everything and runs the test suite: each fuzz target
# briefly, then the unit, integration and golden tests with CTest. GPU-labelled tests run only
# where `nvidia-smi -L` finds a GPU (elsewhere: scripts/gpu-tests.sh).
#
#   scripts/test.sh                        # what CI runs
#   SIEVE_FUZZ_SECONDS=0 scripts/test.sh   # skip the fuzz runs (and the sanitizer subsets)
#   SIEVE_SANITIZE=0 scripts/test.sh       # skip the sanitizer subsets (ASan+UBSan, TSan)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

bash scripts/install-deps.sh
# ccache (CMakeLists.txt: SIEVE_CCACHE) keys objects by paths relative to the checkout, so a
# second checkout of the same sources (CI's clean clone) reuses the first one's objects.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}" CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$jobs"

# libFuzzer targets, built with clang (ASan + UBSan) in their own tree, each run for a short
# while from its committed corpus; the same instrumented tree then runs the sanitizer subset of
# the unit tests (scripts/sanitize.sh ci), so the engine is compiled with sanitizers only once.
if [[ ${SIEVE_FUZZ_SECONDS:-20} != 0 ]] && command -v clang++ >/dev/null; then
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DSIEVE_FUZZ=ON -DSIEVE_BUILD_SERVER=ON -DSIEVE_BUILD_TESTS=ON -DSIEVE_CUDA=OFF \
    -DSIEVE_FUZZ_SECONDS="${SIEVE_FUZZ_SECONDS:-20}"
  fuzzers=(tokenizer_fuzz safetensors_fuzz request_fuzz config_yaml_fuzz model_config_fuzz
           tokenizer_json_fuzz)
  cmake --build build-fuzz -j "$jobs" --target "${fuzzers[@]}"
  ctest --test-dir build-fuzz --output-on-failure -L fuzz
  if [[ ${SIEVE_SANITIZE:-1} != 0 ]]; then
    SIEVE_SAN_BUILD_DIR=build-fuzz bash scripts/sanitize.sh ci
  fi
fi

# ThreadSanitizer on the thread pools, the scheduler, the asynchronous engine, output threads,
# watchdog, injected faults, 1,000 streams and churn, and the server's tests (g++, its own tree
# build-tsan/; scripts/sanitize.sh tsan-ci).
if [[ ${SIEVE_FUZZ_SECONDS:-20} != 0 && ${SIEVE_SANITIZE:-1} != 0 ]]; then
  bash scripts/sanitize.sh tsan-ci
fi

exclude=()
if ! nvidia-smi -L >/dev/null 2>&1; then
  exclude=(-LE gpu)
  echo "sieve: no GPU here; tests labelled 'gpu' run on the GPU machine (scripts/gpu-tests.sh)"
fi
ctest --test-dir build --output-on-failure -j "$jobs" "${exclude[@]}"
