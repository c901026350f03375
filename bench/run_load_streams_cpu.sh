#!/usr/bin/env bash
# Inter-token latency of the CPU daemon (embedded model) at 64, 256 and 1000 concurrent streams
# (issue 15, item 1), with output processing inline on the scheduler thread
# (pools.output_workers=0) and on its own thread (1), each burst sent at once by sieve_loadgen
# (short prompts and max_tokens so a burst is seconds). With PERF=1, perf records the daemon
# during the 1000-stream bursts and prints where the scheduler thread (sieve-sched) spent its
# samples. Prints the loadgen reports (Markdown).
#   bench/run_load_streams_cpu.sh [BUILD_DIR] [extra sieve_loadgen flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
sieved="$build/server/sieved"
loadgen="$build/bench/sieve_loadgen"
port=${SIEVE_BENCH_PORT_BASE:-52300}
out=${OUT_DIR:-/tmp/sieve_load_streams}
mkdir -p "$out"
pid=""
cleanup() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

# Inline and threaded alternate at each stream count, so that both see the same machine load.
for streams in 64 256 1000; do
  for workers in 0 1; do
    "$sieved" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((port + 1))" \
      --set kv_cache.num_pages=4096 --set scheduler.max_running_requests=1000 \
      --set scheduler.max_queued_requests=1000 --set scheduler.max_batch_tokens=2048 \
      --set pools.output_workers=$workers --log-level warning > "$out/sieved_${workers}_${streams}.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do
      if "$build/cli/sieve" health --target "127.0.0.1:$port" 2>/dev/null | grep -q '^SERVING'; then break; fi
      sleep 0.2
    done
    perf_pid=""
    if [ "${PERF:-0}" = 1 ] && [ "$streams" = 1000 ]; then
      perf record -F 999 -g -p "$pid" -o "$out/perf_w$workers.data" > /dev/null 2>&1 &
      perf_pid=$!
      sleep 0.5
    fi
    echo "## output_workers=$workers, $streams streams"
    "$loadgen" --target "127.0.0.1:$port" --rate 100000 --requests "$streams" \
      --concurrency "$streams" --prompt-lengths 32 --max-tokens 16 --seed 3 \
      --json "$out/w${workers}_s${streams}.json" "$@"
    if [ -n "$perf_pid" ]; then
      kill -INT "$perf_pid"; wait "$perf_pid" || true
      echo "### perf: samples per thread, output_workers=$workers"
      { perf report -i "$out/perf_w$workers.data" --no-children --sort comm -g none --stdio < /dev/null \
          2>/dev/null | grep '%' | head -8; } || true
      echo "### perf: the scheduler thread (sieve-sched), its own samples, output_workers=$workers"
      { perf report -i "$out/perf_w$workers.data" --comm sieve-sched --no-children --sort dso,sym \
          -g none --percentage relative --stdio < /dev/null 2>/dev/null | grep '%' | head -25; } || true
    fi
    kill -TERM "$pid"; wait "$pid" || true; pid=""
  done
done
