#!/usr/bin/env bash
# Copies the shared libraries that EXECUTABLE... link into DIR, except the C/C++ runtime and
# CUDA's own (the GPU machine has those), so binaries built here run on the GPU machine, which
# has CUDA but not Abseil, gRPC, Highway or oneDNN. Used by the `pack` modes of
# scripts/gpu-tests.sh, bench/run_sparse_gpu.sh and bench/run_retrieval_fidelity.sh.
#   scripts/pack-libs.sh DIR EXECUTABLE...
set -euo pipefail
dir=${1:?usage: pack-libs.sh DIR EXECUTABLE...}
shift
mkdir -p "$dir"
# (grep finds nothing when an executable links only those: not an error)
ldd "$@" | awk '/=> \//{print $3}' | sort -u |
  { grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libgcc_s|libstdc\+\+)\.so|/libcu[a-zA-Z]*\.so|/libnv[a-zA-Z_]*\.so' || true; } |
  xargs -r cp -Lu -t "$dir/"
