#!/usr/bin/env bash
# llama.cpp's llama-bench against Sieve's model_bench on the embedded model, CPU, 2 threads,
# back to back and alternating (llama.cpp, Sieve, llama.cpp, Sieve, ...), so that both see the
# same machine: prefill of 4K and 16K tokens, decode at depth 0, 4K and 16K.
#
#   bench/llamacpp/build.sh                       # once: llama-bench and the F32 GGUF
#   bench/llamacpp/compare.sh [BUILD_DIR] [ROUNDS] > log
#
# llama.cpp: flash attention on, default batch (2048) and micro-batch (512), F32 weights.
# Sieve: the daemon's default prefill chunk (scheduler.prefill_chunk_tokens = 512), random
# weights of the embedded model's shapes (timing does not depend on the values), CPU backend.
# BASE_BUILD=DIR adds a second Sieve build's model_bench to each round (e.g. the commit before a
# change), run with its default threads (all hardware threads).
# Env: SCRATCH (default /tmp/sieve-llamacpp, as build.sh), THREADS (default 2), REPS (llama-bench
# repetitions, default 2; model_bench keeps the best of 2 prefills and the median of STEPS steps),
# PREFILL (prompt lengths, default 4096,16384), DEPTHS (decode context lengths, default
# 0,4096,16384), DECODE_METHODS (Sieve's decode attention, default dense; e.g. dense,quest: each
# over the same KV) and DENSE_LAYERS (attention.decode.dense_layers of the sparse methods,
# default 2), KV_DTYPE (Sieve's kv_cache.dtype, float32 or bfloat16; llama.cpp's cache is F16).
# FA: llama-bench's flash-attention settings (default 1; FA=0,1 runs both: on an AVX2-only host
# llama.cpp decodes long contexts about 2x faster without flash attention, so its best is the
# baseline there).
# The issues' targets: PREFILL=16384,32768 DEPTHS=16384,65536 DECODE_METHODS=dense,quest.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$repo/build}
rounds=${2:-2}
scratch=${SCRATCH:-/tmp/sieve-llamacpp}
threads=${THREADS:-2}
reps=${REPS:-2}
steps=${STEPS:-32}
prefill=${PREFILL:-4096,16384}
depths=${DEPTHS:-0,4096,16384}
methods=${DECODE_METHODS:-dense}
dense_layers=${DENSE_LAYERS:-2}
kv_dtype=${KV_DTYPE:-float32}
fa=${FA:-1}
sieve_decode=$(echo "$depths" | sed -E 's/([0-9]+)/1:\1/g')
llama_bench=$scratch/llama.cpp/build/bin/llama-bench
gguf=$scratch/embedded-f32.gguf
for f in "$llama_bench" "$gguf" "$build/bench/model_bench"; do
  [[ -e $f ]] || { echo "missing $f (run bench/llamacpp/build.sh and build model_bench)" >&2; exit 1; }
done

echo "date $(date -u '+%F %T') UTC; host $(hostname); nproc $(nproc); $(uptime)"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'); simd: $(grep -o -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "sieve commit $(git -C "$repo" rev-parse --short HEAD); llama.cpp $(git -C "$scratch/llama.cpp" rev-parse --short HEAD)"
for ((r = 1; r <= rounds; ++r)); do
  echo "== round $r: llama.cpp $(date -u +%T), $(uptime | sed 's/.*load/load/')"
  "$llama_bench" -m "$gguf" -t "$threads" -fa "$fa" -r "$reps" -p "$prefill" -n 0
  "$llama_bench" -m "$gguf" -t "$threads" -fa "$fa" -r "$reps" -p 0 -n 32 -d "$depths"
  echo "== round $r: sieve $(date -u +%T), $(uptime | sed 's/.*load/load/')"
  "$build/bench/model_bench" --model "$repo/models/embedded" --backend cpu --threads "$threads" \
    --prefill "$prefill" --chunk 512 --page-size 16 --decode "$sieve_decode" --steps "$steps" --graphs off \
    --decode-method "$methods" --dense-layers "$dense_layers" --kv-dtype "$kv_dtype"
  if [[ -n ${BASE_BUILD:-} ]]; then
    echo "== round $r: sieve base $BASE_BUILD $(date -u +%T), $(uptime | sed 's/.*load/load/')"
    "$BASE_BUILD/bench/model_bench" --model "$repo/models/embedded" --backend cpu \
      --prefill 4096,16384 --chunk 512 --decode 1:0,1:4096,1:16384 --steps "$steps" --graphs off
  fi
done
echo "end $(date -u +%T), $(uptime | sed 's/.*load/load/')"
