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
# SPARSE_PREFILL: Sieve's sparse prefill methods to time in each round as well, e.g. xattention or
# xattention,minference (default none). Sparse attention depends on real weights and text, so
# these run the embedded model's own weights on real text (the repository's C++ made into
# PREFILL-token prompts by bench/make_text_prompts.py, as bench/run_cpu_gates.sh section 3 does)
# through the engine (bench/retrieval_fidelity, its TTFT), beside dense prefill on the same
# prompts; llama-bench's prompt speed does not depend on the text.
# The issues' targets: PREFILL=16384,32768 DEPTHS=16384,65536 DECODE_METHODS=dense,quest
# SPARSE_PREFILL=xattention.
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

sparse=${SPARSE_PREFILL:-}
if [[ -n $sparse ]]; then  # real-text prompts of the PREFILL lengths, tokenized by a daemon
  for f in "$build/bench/retrieval_fidelity" "$build/server/sieved" "$build/cli/sieve"; do
    [[ -e $f ]] || { echo "missing $f (SPARSE_PREFILL needs it built)" >&2; exit 1; }
  done
  prompts=$(mktemp -d)
  trap 'rm -rf "$prompts"' EXIT
  port=$((20000 + RANDOM % 20000))
  "$build/server/sieved" --set server.listen_address=127.0.0.1:$port \
    --set metrics.listen_address=127.0.0.1:0 --set http.listen_address= >"$prompts/sieved.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    "$build/cli/sieve" health --target 127.0.0.1:$port >/dev/null 2>&1 && break
    sleep 0.2
  done
  python3 "$repo/bench/make_text_prompts.py" --sieve "$build/cli/sieve" \
    --target 127.0.0.1:$port --lengths "$prefill" --out "$prompts" >/dev/null
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  sparse_policies=()
  for m in ${sparse//,/ }; do sparse_policies+=(--policy "$m:attention.prefill.method=$m"); done
fi

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
  if [[ -n $sparse ]]; then
    echo "== round $r: sieve sparse prefill (engine, real text) $(date -u +%T), $(uptime | sed 's/.*load/load/')"
    for n in ${prefill//,/ }; do
      "$build/bench/retrieval_fidelity" --model "$repo/models/embedded" \
        --prompts "$prompts/text_$n.jsonl" --answer-in prefill --set "model.cpu_threads=$threads" \
        --set "kv_cache.dtype=$kv_dtype" --policy dense "${sparse_policies[@]}"
    done
  fi
  if [[ -n ${BASE_BUILD:-} ]]; then
    echo "== round $r: sieve base $BASE_BUILD $(date -u +%T), $(uptime | sed 's/.*load/load/')"
    "$BASE_BUILD/bench/model_bench" --model "$repo/models/embedded" --backend cpu \
      --prefill 4096,16384 --chunk 512 --decode 1:0,1:4096,1:16384 --steps "$steps" --graphs off
  fi
done
echo "end $(date -u +%T), $(uptime | sed 's/.*load/load/')"
