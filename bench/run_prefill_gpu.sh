#!/usr/bin/env bash
# Builds (or takes prebuilt) the paged prefill kernel's GPU test and benchmark, then runs, in one
# go on the GPU machine: the SASS summary, the gpu test sweep, prefill_attention_bench and the
# PyTorch SDPA baseline (cuDNN and flash backends, GEMM and copy ceilings). Logs go to $OUT
# (default ./gpu-out). Run from the repository root.
#
#   bench/run_prefill_gpu.sh                  build with nvcc (or use $SIEVE_PREBUILT), test, bench
#   SIEVE_PREBUILT=DIR ...                    use paged_prefill_gpu_test, prefill_attention_bench
#                                             and paged_prefill.o from DIR (built elsewhere with
#                                             this script's `build` step, e.g. on a CPU machine)
#   SIEVE_SKIP_TESTS=1 ...                    benchmarks only
#   SIEVE_TEST_FILTER=GLOB ...                gtest filter for the sweep
#   bench/run_prefill_gpu.sh build DIR        only build into DIR (needs nvcc, no GPU)
#   SIEVE_VARIANTS="2" ...                    also build/run test and bench with
#                                             SIEVE_PREFILL_STAGES_D128=<each value> (suffix _s<N>)
#   SIEVE_NCU=1 ...                           profile wgmma-$SIEVE_NCU_KERNEL (pingpong) at 32K with Nsight
#                                             Compute (ncu.txt)
#
# Build: nvcc directly on the kernel, its CPU reference, the test (GoogleTest linked statically if
# found, else its built-in main) and the benchmark; flags as the project's CMake uses them.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
GEN="-gencode=arch=compute_90a,code=sm_90a"
NVFLAGS="-std=c++20 -O3 $GEN --expt-relaxed-constexpr -lineinfo -I."

build() {
  local b=$1
  mkdir -p "$b"
  local test_flags="-DSIEVE_NO_GTEST" test_libs=""
  if [[ -d /usr/include/gtest && -n $(ls /usr/lib/*/libgtest.a /usr/lib/libgtest.a 2>/dev/null) ]]; then
    test_flags="" test_libs="-lgtest -lgtest_main"
  fi
  echo "nvcc build into $b; test: ${test_flags:-GoogleTest}"
  nvcc $NVFLAGS -Xptxas -v -c kernels/attention/paged_prefill.cu -o "$b/paged_prefill.o" &&
    g++ -std=c++20 -O2 -I. -c kernels/attention/paged_attention_ref.cc -o "$b/paged_attention_ref.o" &&
    nvcc $NVFLAGS $test_flags -c kernels/attention/paged_prefill_gpu_test.cu -o "$b/test.o" &&
    nvcc $GEN "$b/test.o" "$b/paged_prefill.o" "$b/paged_attention_ref.o" $test_libs -lpthread \
      -o "$b/paged_prefill_gpu_test" &&
    nvcc $NVFLAGS bench/prefill_attention_bench.cu "$b/paged_prefill.o" -o "$b/prefill_attention_bench" &&
    build_variants "$b" "$test_flags" "$test_libs"
}
# Stage-count variants at d = 128 of the kernel, its test and the benchmark.
build_variants() {
  local b=$1 test_flags=$2 test_libs=$3 st
  for st in ${SIEVE_VARIANTS:-}; do
    nvcc $NVFLAGS -DSIEVE_PREFILL_STAGES_D128=$st -Xptxas -v -c kernels/attention/paged_prefill.cu \
      -o "$b/paged_prefill_s$st.o" &&
      nvcc $GEN "$b/test.o" "$b/paged_prefill_s$st.o" "$b/paged_attention_ref.o" $test_libs \
        -lpthread -o "$b/paged_prefill_gpu_test_s$st" &&
      nvcc $NVFLAGS bench/prefill_attention_bench.cu "$b/paged_prefill_s$st.o" \
        -o "$b/prefill_attention_bench_s$st" || return 1
  done
}

if [[ ${1:-} == build ]]; then
  build "${2:-build-prefill}"
  exit $?
fi

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"

main() {
echo "== $(date -u +%FT%TZ) commit $(git rev-parse HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo +uncommitted)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>&1
nvcc --version | tail -1
for d in /usr/include/absl /usr/include/nlohmann /usr/include/gtest; do
  [[ -d $d ]] && echo "have $d" || echo "missing $d"
done
echo "cmake: $(command -v cmake) ninja: $(command -v ninja) nproc: $(nproc)"

local bin
if [[ -n ${SIEVE_PREBUILT:-} && -x ${SIEVE_PREBUILT}/paged_prefill_gpu_test ]]; then
  bin=$SIEVE_PREBUILT
  echo "== using prebuilt binaries from $bin"
else
  bin=build-prefill-gpu
  echo "== build"
  build "$bin" >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  grep -E "registers|spill" "$OUT/build.log"
fi

if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$bin/paged_prefill.o" >"$OUT/sass.txt" 2>&1
  echo "== SASS instruction counts per kernel"
  awk '/Function :/{name=$3} /HGMMA|HMMA|LDGSTS|LDSM|LDL|STL|SYNCS|USETMAXREG|BAR\.SYNC|WARPGROUP/{
        for (i = 1; i <= NF; i++) if ($i ~ /^(HGMMA|HMMA|LDGSTS|LDSM|LDL|STL|SYNCS|USETMAXREG|BAR|WARPGROUP)/) { split($i, a, "."); c[name" "a[1]]++ } }
       END { for (k in c) print c[k], k }' "$OUT/sass.txt" |
    sed -E 's/_ZN5sieve7kernels14prefill_detail[0-9]+//; s/EEEvNS1_11PrefillArgsE//' | sort -k2 | head -40
fi

local rc_test=0
if [[ -z ${SIEVE_SKIP_TESTS:-} ]]; then
  echo "== tests"
  local t0=$(date +%s)
  local filter=()
  [[ -n ${SIEVE_TEST_FILTER:-} ]] && filter=(--gtest_filter="$SIEVE_TEST_FILTER")
  timeout ${SIEVE_TEST_TIMEOUT:-300} "$bin/paged_prefill_gpu_test" "${filter[@]}" 2>&1 | tee "$OUT/test.log" |
    grep -E "^\[ *(OK|FAILED|PASSED) *\]|tests? passed|rel_l2|block\(s\) per SM|FAILED|Failure|error" | head -150
  rc_test=${PIPESTATUS[0]}
  echo "tests rc $rc_test in $(( $(date +%s) - t0 )) s"
  local v
  for v in "$bin"/paged_prefill_gpu_test_s*; do
    [[ -x $v ]] || continue
    echo "== variant $(basename "$v")"
    timeout ${SIEVE_TEST_TIMEOUT:-300} "$v" "${filter[@]}" >>"$OUT/test.log" 2>&1
    local rc_v=$?
    grep -E "^\[ *(PASSED|FAILED) *\]" "$OUT/test.log" | tail -3
    echo "variant tests rc $rc_v"
    [[ $rc_v -eq 0 ]] || rc_test=$rc_v
  done
fi

echo "== benchmark (paged prefill kernels)"
timeout ${SIEVE_BENCH_TIMEOUT:-240} "$bin/prefill_attention_bench" --csv "$OUT/bench.csv" ${SIEVE_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
local rc_bench=${PIPESTATUS[0]}
for v in "$bin"/prefill_attention_bench_s*; do
  [[ -x $v ]] || continue
  echo "== variant $(basename "$v") (wgmma rows only)"
  timeout ${SIEVE_BENCH_TIMEOUT:-240} "$v" --only wgmma-pingpong 2>&1 | tail -n +2
  timeout ${SIEVE_BENCH_TIMEOUT:-240} "$v" --only wgmma-overlap 2>&1 | tail -n +3
done
if [[ -n ${SIEVE_NCU:-} ]] && command -v ncu >/dev/null; then
  echo "== ncu: wgmma-${SIEVE_NCU_KERNEL:-pingpong} at 32K"
  timeout 180 ncu --clock-control none -k regex:PrefillWgmma --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section Occupancy \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    "$bin/prefill_attention_bench" --only wgmma-${SIEVE_NCU_KERNEL:-pingpong} --n 32768 --iters 1 >"$OUT/ncu.txt" 2>&1
  echo "ncu rc $?"
  grep -E "Duration|Throughput|Issued|Eligible|Active Warps|L2 Hit|stalled" "$OUT/ncu.txt" |
    awk '!/stalled/ || $NF+0 >= 0.05' | head -60
fi

echo "== baseline (PyTorch SDPA)"
PYTHONUNBUFFERED=1 python3 bench/prefill_attention_baseline.py --json "$OUT/baseline.json" 2>&1 |
  tee "$OUT/baseline.log"
local rc_base=${PIPESTATUS[0]}

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1
echo "== rc: tests $rc_test bench $rc_bench baseline $rc_base"
[[ $rc_test -eq 0 && $rc_bench -eq 0 && $rc_base -eq 0 ]]
}

main "$@" 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
