#!/usr/bin/env bash
# End-to-end run of the daemon on the GPU machine: sieved serves the Llama-3.1-8B shape (seeded
# random weights, configs/llama-3.1-8b-h100.yaml) with the CUDA backend, and sieve_loadgen drives
# it over gRPC on loopback, for each prompt length in $LENGTHS: first one request at a time
# (unloaded latency), then Poisson arrivals at the rate given for that length. Ends with a scrape
# of the metrics endpoint and a SIGTERM drain. Reports and logs go to $OUT.
#
# The GPU machine has no gRPC, Protobuf or Abseil: build here and carry the binaries with the
# shared libraries they link:
#   cmake --build build --target sieved sieve sieve_loadgen
#   /work/shared/tools/pack-for-device.sh .device-pack build/server/sieved build/cli/sieve \
#       build/bench/sieve_loadgen
# There, from the repository root:
#   bench/run_daemon_gpu.sh [PACK_DIR]
# Settings (environment): CONFIG, LENGTHS ("8192:1.0 32768:0.25" = length:rate pairs),
# DURATION (seconds of Poisson arrivals per length; 0: none), MAX_TOKENS, UNLOADED (requests run one at
# a time per length), SIEVED_ARGS (more sieved flags, e.g. "--set pools.decode_priority=normal"),
# LOADGEN_ARGS (more sieve_loadgen flags, e.g. "--drain-timeout 300" for prefills over 120 s).
set -uo pipefail
cd "$(dirname "$0")/.."
pack=${1:-.device-pack}
out=${OUT:-./daemon-out}
config=${CONFIG:-configs/llama-3.1-8b-h100.yaml}
lengths=${LENGTHS:-"8192:1.0 32768:0.25"}
duration=${DURATION:-60}
max_tokens=${MAX_TOKENS:-64}
unloaded=${UNLOADED:-4}
mkdir -p "$out"
export LD_LIBRARY_PATH="$pack/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
target=127.0.0.1:50051

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
start=$(date +%s.%N)
# shellcheck disable=SC2086  # SIEVED_ARGS is a list of flags
"$pack/bin/sieved" --config "$config" --listen "$target" --metrics-listen 127.0.0.1:9090 \
  ${SIEVED_ARGS:-} >"$out/sieved.log" 2>&1 &
pid=$!
# Whatever ends this script (a time limit's SIGTERM included) stops the daemon too, so that a next
# run finds its ports free.
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null' EXIT
trap 'exit 143' TERM INT
ready=0
for _ in $(seq 1 600); do
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  if [[ $("$pack/bin/sieve" health --target "$target" 2>/dev/null) == SERVING ]]; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ $ready != 1 ]]; then
  echo "sieved did not become SERVING; its log:" >&2
  tail -50 "$out/sieved.log" >&2
  kill "$pid" 2>/dev/null
  exit 1
fi
echo "sieved SERVING after $(python3 -c "import time; print(round(time.time() - $start, 1))") s" | tee "$out/startup.txt"

status=0
for pair in $lengths; do
  len=${pair%%:*}
  rate=${pair##*:}
  echo "== $len tokens: $unloaded requests one at a time"
  # shellcheck disable=SC2086  # LOADGEN_ARGS is a list of flags
  "$pack/bin/sieve_loadgen" --target "$target" --prompt-lengths "$len" --requests "$unloaded" \
    --duration 0 --concurrency 1 --rate 1000 --max-tokens "$max_tokens" --seed 7 \
    ${LOADGEN_ARGS:-} --json "$out/unloaded-$len.json" | tee "$out/unloaded-$len.md" || status=1
  [[ $duration == 0 ]] && continue  # DURATION=0: unloaded requests only
  echo "== $len tokens: Poisson arrivals at $rate/s for $duration s"
  # shellcheck disable=SC2086  # LOADGEN_ARGS is a list of flags
  "$pack/bin/sieve_loadgen" --target "$target" --prompt-lengths "$len" --rate "$rate" \
    --duration "$duration" --max-tokens "$max_tokens" --seed 11 ${LOADGEN_ARGS:-} \
    --json "$out/poisson-$len.json" | tee "$out/poisson-$len.md" || status=1
done

# Per-phase histograms and gauges as the daemon exported them.
python3 - "$out/metrics.txt" <<'EOF' || status=1
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=10).read().decode()
open(sys.argv[1], "w").write(text)
EOF
kill -TERM "$pid"
wait "$pid"
echo "sieved exited with $?" | tee -a "$out/startup.txt"
exit $status
