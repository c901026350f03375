#!/usr/bin/env bash
# Builds the GPU kernels, runs the gpu-labelled tests and the decode attention benchmarks, and
# writes every log to $OUT (default ./gpu-out). Run from the repository root on the GPU machine.
#
#   bench/run_gpu.sh                 build, test, benchmark
#   SIEVE_SKIP_TESTS=1 ...           benchmarks only
#   SIEVE_PREBUILT=DIR ...           use paged_decode_gpu_test and decode_attention_bench from DIR
#                                    (built elsewhere, e.g. by this script) instead of building
#   SIEVE_VARIANTS="2 4" ...         also build and time pipeline-depth variants (d = 128)
#   SIEVE_SANITIZE=1 ...             also run small test cases under compute-sanitizer
#
# Build: the project's CMake (-DSIEVE_BUILD_SERVER=OFF -DSIEVE_BUILD_TESTS=ON -DSIEVE_CUDA=ON)
# when its dependencies are there (Abseil, nlohmann-json, GoogleTest); otherwise nvcc directly on
# the kernel, its CPU reference, the test (GoogleTest if found, else its built-in main) and the
# benchmark. Logs: run.log (everything), test.log, bench.log, bench.csv, baseline.log,
# baseline.json, build.log, sass.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

main() {
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --verify -q HEAD || echo none)$(git diff --quiet HEAD 2>/dev/null && [[ -z $(git status --porcelain 2>/dev/null) ]] || echo +uncommitted)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>&1
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -2
echo "cmake: $(command -v cmake) ninja: $(command -v ninja) nproc: $(nproc)"
for d in /usr/include/absl /usr/include/nlohmann /usr/include/gtest; do
  [[ -d $d ]] && echo "have $d" || echo "missing $d"
done

GEN="-gencode=arch=compute_90a,code=sm_90a"
NVFLAGS="-std=c++20 -O3 $GEN --expt-relaxed-constexpr -lineinfo -I."
build_with_cmake() {
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_BUILD_SERVER=OFF \
    -DSIEVE_BUILD_TESTS=ON -DSIEVE_CUDA=ON &&
    ninja -C build-gpu kernels_paged_decode_gpu_test decode_attention_bench &&
    BIN_TEST=build-gpu/kernels/kernels_paged_decode_gpu_test &&
    BIN_BENCH=build-gpu/bench/decode_attention_bench &&
    OBJ=$(find build-gpu -name 'paged_decode.cu.o' | head -1)
}
build_with_nvcc() {
  local b=build-gpu-nvcc
  mkdir -p $b
  local test_flags="-DSIEVE_NO_GTEST" test_libs=""
  if [[ -d /usr/include/gtest ]] && compgen -G "/usr/lib*/**/libgtest.*" >/dev/null; then
    test_flags="" test_libs="-lgtest -lgtest_main"
  fi
  echo "nvcc build; test flags: ${test_flags:-GoogleTest}"
  nvcc $NVFLAGS -Xptxas -v -c kernels/attention/paged_decode.cu -o $b/paged_decode.o &&
    g++ -std=c++20 -O2 -I. -c kernels/attention/paged_attention_ref.cc -o $b/paged_attention_ref.o &&
    nvcc $NVFLAGS $test_flags -c kernels/attention/paged_decode_gpu_test.cu -o $b/test.o &&
    nvcc $GEN $b/test.o $b/paged_decode.o $b/paged_attention_ref.o $test_libs -lpthread \
      -o $b/paged_decode_gpu_test &&
    nvcc $NVFLAGS bench/decode_attention_bench.cu $b/paged_decode.o -o $b/decode_attention_bench &&
    BIN_TEST=$b/paged_decode_gpu_test && BIN_BENCH=$b/decode_attention_bench && OBJ=$b/paged_decode.o &&
    build_variants $b
}
# Tuning variants of the benchmark (pipeline depth at d = 128), run after the main benchmark.
build_variants() {
  [[ -n ${SIEVE_VARIANTS:-} ]] || return 0
  for st in $SIEVE_VARIANTS; do
    nvcc $NVFLAGS -DSIEVE_PAGED_DECODE_STAGES_D128=$st bench/decode_attention_bench.cu \
      kernels/attention/paged_decode.cu -o $1/decode_attention_bench_stages$st || return 1
  done
}

BIN_TEST="" BIN_BENCH="" OBJ=""
if [[ -n ${SIEVE_PREBUILT:-} ]] && "$SIEVE_PREBUILT/paged_decode_gpu_test" --gtest_list_tests >/dev/null 2>&1; then
  echo "== using prebuilt binaries from $SIEVE_PREBUILT"
  BIN_TEST=$SIEVE_PREBUILT/paged_decode_gpu_test BIN_BENCH=$SIEVE_PREBUILT/decode_attention_bench
  OBJ=$SIEVE_PREBUILT/paged_decode.o
else
  echo "== build"
  t0=$(date +%s)
  if [[ -d /usr/include/absl && -d /usr/include/nlohmann && -d /usr/include/gtest ]]; then
    build_with_cmake >"$OUT/build.log" 2>&1 || { echo "cmake build failed, trying nvcc"; build_with_nvcc >>"$OUT/build.log" 2>&1; }
  else
    build_with_nvcc >"$OUT/build.log" 2>&1
  fi
  rc=$?
  grep -E "error|registers|spill" "$OUT/build.log" | head -40
  echo "build rc $rc in $(( $(date +%s) - t0 )) s"
  [[ $rc -eq 0 ]] || { tail -40 "$OUT/build.log"; return 1; }
fi

if [[ -n $OBJ ]] && command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$OBJ" >"$OUT/sass.txt" 2>&1
  echo "== SASS instruction counts per kernel (LDGSTS = cp.async, HMMA = mma, LDSM = ldmatrix)"
  awk '/Function :/{name=$3} /LDGSTS|HMMA|LDSM|LDL|STL|MUFU.EX2|BAR.SYNC/{
        for (i = 1; i <= NF; i++) if ($i ~ /^(LDGSTS|HMMA|LDSM|LDL|STL|MUFU|BAR)/) { split($i, a, "."); c[name" "a[1]]++ } }
       END { for (k in c) print c[k], k }' "$OUT/sass.txt" | sed 's/_ZN5sieve7kernels[^ ]*Paged/Paged/' | sort -k2 | head -40
fi

rc_test=0
if [[ -z ${SIEVE_SKIP_TESTS:-} ]]; then
  echo "== tests"
  t0=$(date +%s)
  "$BIN_TEST" 2>&1 | tee "$OUT/test.log" | grep -E "^\[ *(OK|FAILED|PASSED) *\]|tests? passed|rel_l2 .* non-finite [1-9]|FAILED|Failure" | head -80
  rc_test=${PIPESTATUS[0]}
  echo "tests rc $rc_test in $(( $(date +%s) - t0 )) s"
fi

if [[ -n ${SIEVE_SANITIZE:-} ]] && command -v compute-sanitizer >/dev/null && "$BIN_TEST" --gtest_list_tests >/dev/null 2>&1; then
  echo "== compute-sanitizer on small cases"
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 "$BIN_TEST" \
      --gtest_filter='*len17_*:*mixed3_d64*:*page7*:*group16_d64*' 2>&1 | grep -E "ERROR SUMMARY|PASSED|FAILED|Invalid|Race|Hazard" | head -8
    echo "$tool rc ${PIPESTATUS[0]}"
  done
fi

echo "== benchmark (paged decode kernel)"
"$BIN_BENCH" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}

for v in $(dirname "$BIN_BENCH")/decode_attention_bench_stages*; do
  [[ -x $v ]] || continue
  echo "== variant $(basename "$v")"
  "$v" --iters 20 2>&1
done

echo "== baseline (PyTorch SDPA)"
PYTHONUNBUFFERED=1 python3 bench/decode_attention_baseline.py --json "$OUT/baseline.json" 2>&1 | tee "$OUT/baseline.log"
rc_base=${PIPESTATUS[0]}

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1
echo "== rc: tests $rc_test bench $rc_bench baseline $rc_base"
[[ $rc_test -eq 0 && $rc_bench -eq 0 && $rc_base -eq 0 ]]
}

main "$@" 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
