#!/usr/bin/env bash
# The sparse attention GPU benchmarks (Quest and DoubleSparsity decode, XAttention and MInference
# prefill) in one command, built here and carried like scripts/gpu-tests.sh does (the GPU machine
# has CUDA but not Highway or oneDNN, which sieve_kernels links):
#   bench/run_sparse_gpu.sh pack [PACK_DIR]   # here: build the benchmarks in a CUDA tree
#                                             # (SIEVE_GPU_BUILD, default build-gpu-tests) and
#                                             # copy them with their shared libraries into PACK_DIR
#                                             # (default .device-pack-sparse-bench, ignored)
#   bench/run_sparse_gpu.sh run [PACK_DIR]    # there, from the repository root: run them, output
#                                             # to $OUT (or ./gpu-out) and the terminal
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
pack=${2:-.device-pack-sparse-bench}
benches=(quest_decode_gpu_bench xattention_prefill_gpu_bench minference_prefill_gpu_bench
  ds_decode_gpu_bench)

if [[ $mode == pack ]]; then
  build=${SIEVE_GPU_BUILD:-build-gpu-tests}
  if [[ ! -f $build/build.ninja ]]; then
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_BUILD_SERVER=OFF \
      -DSIEVE_CUDA=ON >/dev/null || exit 1
  fi
  ninja -C "$build" -j "$(nproc)" "${benches[@]}" || exit 1
  rm -rf "$pack"
  mkdir -p "$pack/bin" "$pack/lib"
  for b in "${benches[@]}"; do cp "$build/bench/$b" "$pack/bin/"; done
  scripts/pack-libs.sh "$pack/lib" "$pack"/bin/* || exit 1
  echo "packed ${benches[*]} into $pack"
  exit 0
fi

out=${OUT:-gpu-out}
mkdir -p "$out"
status=0
for b in "${benches[@]}"; do
  echo "== $b"
  LD_LIBRARY_PATH="$pack/lib:${LD_LIBRARY_PATH:-}" "$pack/bin/$b" 2>&1 | tee "$out/$b.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
exit $status
