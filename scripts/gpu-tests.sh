#!/usr/bin/env bash
# Every GPU test (CTest label `gpu`) in one command.
#
# The GPU machine has CUDA but not Abseil or gRPC, so the tests are built here and carried:
#   scripts/gpu-tests.sh pack [PACK_DIR]   # here: build every gpu-labelled test binary and copy
#                                          # them with the shared libraries they link into
#                                          # PACK_DIR (default .device-pack-gpu-tests, ignored)
#   scripts/gpu-tests.sh run [PACK_DIR]    # there, from the repository root: run them all
# On a machine that has both a GPU and the dependencies, `ctest --test-dir build -L gpu` is the
# same thing. Exit status: 0 only if every binary ran and passed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
pack=${2:-.device-pack-gpu-tests}

if [[ $mode == pack ]]; then
  build=${SIEVE_GPU_BUILD:-build-gpu-tests}
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_BUILD_SERVER=OFF \
    -DSIEVE_CUDA=ON >/dev/null || exit 1
  # The gpu-labelled targets, from CTest's own list of their commands.
  mapfile -t targets < <(ctest --test-dir "$build" -L gpu -N -V 2>/dev/null |
    grep -oE '/[^ ]+_gpu_test' | xargs -r -n1 basename | sort -u)
  [[ ${#targets[@]} -gt 0 ]] || { echo "no gpu tests found in $build"; exit 1; }
  ninja -C "$build" -j "$(nproc)" "${targets[@]}" || exit 1
  rm -rf "$pack"
  bins=()
  for t in "${targets[@]}"; do bins+=("$(find "$build" -name "$t" -type f -perm -u+x | head -1)"); done
  mkdir -p "$pack/bin" "$pack/lib"
  cp "${bins[@]}" "$pack/bin/"
  # The shared libraries they link, except the C/C++ runtime and CUDA's (the GPU machine has those).
  ldd "${bins[@]}" | awk '/=> \//{print $3}' | sort -u |
    grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libgcc_s|libstdc\+\+)\.so|/libcu[a-zA-Z]*\.so|/libnv[a-zA-Z_]*\.so' |
    xargs -r cp -Lu -t "$pack/lib/"
  echo "packed ${#bins[@]} gpu tests into $pack: ${targets[*]}"
  exit 0
fi

export LD_LIBRARY_PATH="$PWD/$pack/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export SIEVE_SOURCE_DIR="$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || exit 1
failed=0
for t in "$pack"/bin/*_gpu_test; do
  echo "=== $(basename "$t")"
  if ! "$t" --gtest_brief=1; then
    echo "FAILED: $(basename "$t")"
    failed=1
  fi
done
exit $failed
