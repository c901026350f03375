#!/usr/bin/env bash
# KV transfer over gRPC vs UCX on one machine (docs/disaggregation.md "Transports"): one prefill
# daemon, two decode daemons in front of it, one with disaggregation.transport grpc and one with
# ucx. The same prompts (sieve_loadgen, same seed) are first sent to the prefill daemon itself,
# so that its prefix cache holds them and the remote prefills that follow compute almost nothing:
# a transfer attempt's seconds are then mostly the page stream. Then the same prompts go, one at
# a time, to the gRPC decode daemon and to the UCX one (their order alternates with --ucx-first),
# and the decode daemons' transfer metrics are printed. CPU backend, embedded model, loopback.
#   bench/run_ucx_transfer_cpu.sh [BUILD_DIR] [--ucx-first]
# UCX picks its own transports (shared memory or tcp on one host); set UCX_TLS to force one.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
order=(grpc ucx)
[[ ${2:-} == --ucx-first ]] && order=(ucx grpc)
sieved="$build/server/sieved"
loadgen="$build/bench/sieve_loadgen"
base=${SIEVE_BENCH_PORT_BASE:-52300}
load_flags=(--rate 0.5 --concurrency 1 --requests 12 --prompt-lengths 2048,4096 --max-tokens 2
            --seed 11)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {  # start NAME GRPC_PORT METRICS_PORT [--set ...]
  local name=$1 grpc=$2 metrics=$3
  shift 3
  "$sieved" --listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
    --set kv_cache.num_pages=8192 --log-level warning "$@" > "/tmp/sieve_bench_$name.log" 2>&1 &
  pids+=($!)
}
wait_serving() {  # wait_serving GRPC_PORT
  for _ in $(seq 1 300); do
    if "$build/cli/sieve" health --target "127.0.0.1:$1" 2>/dev/null | grep -q '^SERVING'; then return; fi
    sleep 0.2
  done
  echo "daemon on port $1 did not come up" >&2
  exit 1
}
metric() {  # metric METRICS_PORT NAME [LABEL_FILTER]: sum of the samples
  curl -s "http://127.0.0.1:$1/metrics" | grep "^$2" | grep -- "${3:-}" | awk '{s += $2} END {printf "%.6g", s + 0}'
}

start prefill $((base)) $((base + 1)) --set server.role=prefill
declare -A port=([grpc]=$((base + 10)) [ucx]=$((base + 20)))
for t in grpc ucx; do
  start "decode_$t" "${port[$t]}" $((port[$t] + 1)) --set server.role=decode \
    --set "disaggregation.prefill_target=ipv4:127.0.0.1:$base" \
    --set disaggregation.local_prefill_below_tokens=64 --set disaggregation.fallback=fail \
    --set "disaggregation.transport=$t"
done
for p in $base "${port[grpc]}" "${port[ucx]}"; do wait_serving "$p"; done

echo "## warm-up: the prompts on the prefill daemon itself (its prefix cache keeps them)"
"$loadgen" --target "127.0.0.1:$base" "${load_flags[@]}" | grep -E "requests|ok" | head -3
for t in "${order[@]}"; do
  echo "## decode daemon, transport $t"
  "$loadgen" --target "127.0.0.1:${port[$t]}" "${load_flags[@]}" | grep -E "requests|ok" | head -3
done
echo
echo "| transport | attempts | failed | KV bytes received | transfer seconds (sum) | mean s per attempt | MB/s |"
echo "|---|---|---|---|---|---|---|"
for t in grpc ucx; do
  m=$((port[$t] + 1))
  n=$(metric $m sieve_kv_transfer_seconds_count 'direction="received"')
  bytes=$(metric $m sieve_kv_transfer_bytes_total 'direction="received"')
  secs=$(metric $m sieve_kv_transfer_seconds_sum 'direction="received"')
  failed=$(metric $m sieve_kv_transfers_total 'outcome="failed"')
  echo "| $t | $n | $failed | $bytes | $secs | $(awk -v s="$secs" -v n="$n" 'BEGIN{printf "%.4f", s/n}') | $(awk -v b="$bytes" -v s="$secs" 'BEGIN{printf "%.0f", b/s/1e6}') |"
done
echo "prefill daemon: sent over grpc $(metric $((base + 1)) sieve_kv_transfer_bytes_total 'transport="grpc"') bytes, over ucx $(metric $((base + 1)) sieve_kv_transfer_bytes_total 'transport="ucx"') bytes"
