#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` (CPU only) from the source that ships inside the npm package
# `node-llama-cpp` (llama/gitRelease.bundle, a git bundle), in a scratch folder outside the repo,
# and writes models/embedded as an F32 GGUF with llama.cpp's own gguf-py (bench/llamacpp/
# to_gguf.py). Nothing of llama.cpp is committed; only this script and the results.
#
#   bench/llamacpp/build.sh [SCRATCH]      (default /tmp/sieve-llamacpp)
#
# Needs npm (registry access), git, cmake, a C++ compiler, and Debian's python3-numpy (gguf-py's
# only dependency that to_gguf.py uses). Prints the paths of llama-bench and the GGUF.
# Env: NODE_LLAMA_CPP_VERSION (default 3.22.1), JOBS (default 2).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
scratch=${1:-/tmp/sieve-llamacpp}
version=${NODE_LLAMA_CPP_VERSION:-3.22.1}
jobs=${JOBS:-2}
mkdir -p "$scratch"
cd "$scratch"

if [[ ! -f package/llama/gitRelease.bundle ]]; then
  tarball=$(npm pack "node-llama-cpp@$version" --silent)
  tar xzf "$tarball"
fi
if [[ ! -d llama.cpp/.git ]]; then
  git clone -q package/llama/gitRelease.bundle llama.cpp
fi
echo "llama.cpp: node-llama-cpp $version, release $(cat package/llama/llama.cpp.info.json |
  tr -d ' \n'), commit $(git -C llama.cpp rev-parse --short HEAD)" >&2

# CPU only, native ISA (AVX-512 where the host has it), OpenMP threads as llama.cpp ships them.
cmake -S llama.cpp -B llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF >/dev/null
cmake --build llama.cpp/build -j "$jobs" --target llama-bench >/dev/null

gguf="$scratch/embedded-f32.gguf"
PYTHONPATH="$scratch/llama.cpp/gguf-py" /usr/bin/python3 "$repo/bench/llamacpp/to_gguf.py" \
  "$repo/models/embedded" "$gguf"
echo "llama-bench: $scratch/llama.cpp/build/bin/llama-bench"
echo "gguf: $gguf"
