#!/usr/bin/env bash
# Everything a GPU session runs, built here and packed into ONE archive that fits the device
# tool's 64 MiB (with the ~33 MB working tree): every gpu-labelled test, the sparse GPU
# benchmarks, the daemon, CLI and load generator, and the retrieval fidelity bench, stripped,
# with one shared lib/ (the GPU machine has CUDA but not Abseil, gRPC, Highway or oneDNN), as
# an xz -9 tar (its 64 MB dictionary shares the test binaries' common code: ~30 MB for ~200 MB).
#
#   scripts/device-pack.sh [BUILD_DIR]        # default build (a CUDA tree); writes
#                                             # .device-carry/pack.tar.xz (ignored by git)
# There (carry .device-carry; from the repository root):
#   tar xJf .device-carry/pack.tar.xz         # -> .dp/bin, .dp/lib
#   scripts/gpu-tests.sh run .dp              # every GPU test
#   LD_LIBRARY_PATH=$PWD/.dp/lib .dp/bin/xattention_prefill_gpu_bench ...
#   bench/run_daemon_gpu.sh .dp               # the daemon (its bin/ and lib/ layout)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
[[ -f $build/build.ninja ]] || { echo "no build tree at $build (configure with CUDA first)" >&2; exit 1; }
mapfile -t tests < <(scripts/gpu-tests.sh targets "$build")
benches=(quest_decode_gpu_bench xattention_prefill_gpu_bench minference_prefill_gpu_bench
  ds_decode_gpu_bench)
tools=(sieved sieve sieve_loadgen retrieval_fidelity)
[[ ${#tests[@]} -gt 0 ]] || { echo "no gpu tests in $build: is CUDA on?" >&2; exit 1; }
ninja -C "$build" "${tests[@]}" "${benches[@]}" "${tools[@]}"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/.dp/bin" "$stage/.dp/lib"
for t in "${tests[@]}" "${benches[@]}" "${tools[@]}"; do
  cp "$(find "$build" -name "$t" -type f -perm -u+x | head -1)" "$stage/.dp/bin/"
done
strip --strip-unneeded "$stage/.dp/bin/"*
scripts/pack-libs.sh "$stage/.dp/lib" "$stage/.dp/bin/"*
mkdir -p .device-carry
XZ_OPT="-9 -T2" tar cJf .device-carry/pack.tar.xz -C "$stage" .dp
echo "packed ${#tests[@]} tests, ${#benches[@]} benchmarks, ${#tools[@]} tools:" \
  "$(du -h .device-carry/pack.tar.xz | cut -f1) in .device-carry/pack.tar.xz" \
  "(working tree: $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes)"
