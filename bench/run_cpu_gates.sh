#!/usr/bin/env bash
# The CPU speed targets of the sparse prefill and sparse decode issues, in one run on one machine
# (issue 9 and 10 "What must hold"), each against its baseline measured in the same run:
#   1. one Llama-3.1-8B attention layer at 16K and 32K tokens on the structured inputs
#      (sparse_prefill_bench): dense tiled kernel vs the sgemm rate measured just after it,
#      XAttention and MInference with index building vs dense, the block-sparse kernel's rate per
#      computed tile at fixed densities vs dense (16K);
#   2. decode attention of one 8B layer at 32K and 128K, batch 1 and 8 (quest_decode_bench,
#      ds_decode_bench): dense vs the memory read bandwidth, Quest budget 4096 and
#      DoubleSparsity 16/128 channels at 1/16 of the tokens vs dense;
#   3. the embedded model end to end through the engine (retrieval_fidelity on real text, see
#      bench/make_text_prompts.py): TTFT at 16K and 32K with dense, XAttention and MInference
#      prefill; inter-token latency at 32K with dense and Quest decode (dense_layers 2, the
#      default, and 0; per query head, the default, and per KV head).
# llama.cpp on the same machine: bench/llamacpp/compare.sh (run it right after this).
#
#   bench/run_cpu_gates.sh [BUILD_DIR] > log      (THREADS, default 2; QUICK=1: 16K only;
#                                                  SECTIONS=123, a subset such as 3)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
threads=${THREADS:-2}
tmp=$(mktemp -d)
trap 'if [[ -n ${pid:-} ]]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$tmp"' EXIT
lengths=16384,32768
[[ ${QUICK:-0} == 1 ]] && lengths=16384
echo "# run_cpu_gates: $(date -u '+%F %T') UTC, commit $(git rev-parse --short HEAD), nproc $(nproc), threads $threads"
echo "# $(uptime)"
lscpu | grep -E 'Model name|L2|L3' | sed 's/^/# /'

sections=${SECTIONS:-123}
if [[ $sections == *1* ]]; then
echo; echo "## 1. Sparse prefill, one 8B layer (sparse_prefill_bench)"
"$build/bench/sparse_prefill_bench" --threads "$threads" --tokens "$lengths" --fixed_tokens 16384 --sgemm

fi
if [[ $sections == *2* ]]; then
echo; echo "## 2a. Quest decode, one 8B layer (quest_decode_bench)"
contexts=32768,131072
[[ ${QUICK:-0} == 1 ]] && contexts=32768
"$build/bench/quest_decode_bench" --threads "$threads" --reps 3 --contexts "$contexts" --batches 1,8 --max_kv_gb 9
echo; echo "## 2b. DoubleSparsity decode, one 8B layer (ds_decode_bench)"
"$build/bench/ds_decode_bench" --threads "$threads" --contexts "$contexts" --batches 1,8 --reps 5 --share-kv-above-gib 4

fi
if [[ $sections == *3* ]]; then
echo; echo "## 3. The embedded model end to end (retrieval_fidelity on real text)"
port=$((20000 + RANDOM % 20000))
"$build/server/sieved" --set server.listen_address=127.0.0.1:$port \
  --set metrics.listen_address=127.0.0.1:0 --set http.listen_address= >"$tmp/sieved.log" 2>&1 &
pid=$!
for _ in $(seq 50); do "$build/cli/sieve" health --target 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.2; done
python3 bench/make_text_prompts.py --sieve "$build/cli/sieve" --target 127.0.0.1:$port \
  --lengths "$lengths" --out "$tmp" >/dev/null
kill $pid; wait $pid 2>/dev/null || true
for n in ${lengths//,/ }; do
  "$build/bench/retrieval_fidelity" --model models/embedded \
    --prompts "$tmp/text_$n.jsonl" --answer-in prefill --set "model.cpu_threads=$threads" \
    --policy dense --policy 'xattention:attention.prefill.method=xattention' \
    --policy 'minference:attention.prefill.method=minference' \
    --policy 'quest:attention.decode.method=quest' \
    --policy 'quest-dl0:attention.decode.method=quest;attention.decode.dense_layers=0' \
    --policy 'quest-kv-dl0:attention.decode.method=quest;attention.decode.dense_layers=0;attention.decode.quest.per_kv_head=true'
done
fi
echo "# end $(date -u '+%T'); $(uptime)"
