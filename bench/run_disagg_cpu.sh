#!/usr/bin/env bash
# Load run of disaggregated serving on one machine (docs/disaggregation.md): the same Poisson load
# (sieve_loadgen) against one `both` daemon, then against one decode daemon in front of two
# prefill daemons. Prints both loadgen reports and the decode daemon's transfer metrics (the
# transfer's share of time to first token). CPU backend, embedded model, loopback.
#   bench/run_disagg_cpu.sh [BUILD_DIR] [extra sieve_loadgen flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
sieved="$build/server/sieved"
loadgen="$build/bench/sieve_loadgen"
base=${SIEVE_BENCH_PORT_BASE:-52100}
load_flags=(--rate 1 --requests 24 --prompt-lengths 512,1024,2048 --max-tokens 32 --seed 7 "$@")
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {  # start NAME GRPC_PORT METRICS_PORT [--set ...]
  local name=$1 grpc=$2 metrics=$3
  shift 3
  "$sieved" --listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
    --set kv_cache.num_pages=4096 --log-level warning "$@" > "/tmp/sieve_bench_$name.log" 2>&1 &
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
  curl -s "http://127.0.0.1:$1/metrics" | grep "^$2" | grep -- "${3:-}" | awk '{s += $2} END {print s + 0}'
}

echo "## one both daemon"
start both $((base)) $((base + 1))
wait_serving $((base))
"$loadgen" --target "127.0.0.1:$base" "${load_flags[@]}"
cleanup
pids=()

echo "## one decode daemon, two prefill daemons"
start prefill1 $((base + 10)) $((base + 11)) --set server.role=prefill
start prefill2 $((base + 20)) $((base + 21)) --set server.role=prefill
start decode $((base + 30)) $((base + 31)) --set server.role=decode \
  --set "disaggregation.prefill_target=ipv4:127.0.0.1:$((base + 10)),127.0.0.1:$((base + 20))" \
  --set disaggregation.local_prefill_below_tokens=256
for p in $((base + 10)) $((base + 20)) $((base + 30)); do wait_serving "$p"; done
"$loadgen" --target "127.0.0.1:$((base + 30))" "${load_flags[@]}"
m=$((base + 31))
echo
echo "decode daemon: remote prefills $(metric $m sieve_prefills_total 'location="remote"'), local $(metric $m sieve_prefills_total 'location="local"'), retries $(metric $m sieve_kv_transfer_retries_total)"
echo "transfers: $(metric $m sieve_kv_transfer_seconds_count 'direction="received"') attempts, $(metric $m sieve_kv_transfer_bytes_total 'direction="received"') bytes, $(metric $m sieve_kv_transfer_seconds_sum 'direction="received"') s in all"
echo "TTFT (sum over requests, the transfer phase included): $(metric $m sieve_request_time_to_first_token_seconds_sum) s over $(metric $m sieve_request_time_to_first_token_seconds_count) requests"
echo "of which the transfer phase (sum): $(metric $m sieve_request_transfer_seconds_sum) s over $(metric $m sieve_request_transfer_seconds_count) requests"
