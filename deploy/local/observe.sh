#!/usr/bin/env bash
# The local observability stack: the daemon on the embedded model (CPU) with sparse prefill
# and decode attention (XAttention, Quest; thresholds low enough for short prompts), a real Prometheus
# (Debian's package) scraping it every second with Sieve's recording rules and alerts, and a
# short load from sieve_loadgen, so that the dashboards' queries have data to answer.
#
#   deploy/local/observe.sh                # start, load for 20 s, keep serving until Ctrl-C
#   deploy/local/observe.sh --check        # ... then check every query answers, and stop
#   deploy/local/observe.sh --duration 60 --rate 8
#   deploy/local/observe.sh --duration 90 --png DIR  # draw both dashboards into DIR, stop
#   deploy/local/observe.sh --prompt-lengths 128,512,2048   # the load's prompt lengths (tokens)
#
# Ports (loopback): gRPC 50051, daemon metrics 9090, Prometheus 9091 (its UI: /graph, /alerts);
# with --check or --png also a prefill daemon (gRPC 50061, metrics 9092) and a decode daemon
# (50052, 9093) that prefills its long prompts on it, so that the KV transfer panels fill.
# Grafana is not packaged in Debian: point any Grafana at http://127.0.0.1:9091 and load
# deploy/grafana/dashboards (deploy/README.md); deploy/grafana/render_png.py draws a dashboard's
# panels from this Prometheus without Grafana.
# Needs: build/server/sieved, build/cli/sieve, build/bench/sieve_loadgen (SIEVE_BUILD=DIR for
# another build folder), prometheus and promtool (scripts/install-deps.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${SIEVE_BUILD:-$repo/build}
check=0 duration=20 rate=4 png="" lengths=32,128,512
while (($#)); do
  case $1 in
    --check) check=1 ;;
    --duration) duration=$2; shift ;;
    --rate) rate=$2; shift ;;
    --png) png=$(realpath -m "$2"); shift ;;
    --prompt-lengths) lengths=$2; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "observe.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for tool in "$build/server/sieved" "$build/cli/sieve" "$build/bench/sieve_loadgen"; do
  [[ -x $tool ]] || { echo "observe.sh: $tool not built (ninja -C build sieved sieve sieve_loadgen)" >&2; exit 1; }
done
command -v prometheus >/dev/null || { echo "observe.sh: prometheus not installed: run scripts/install-deps.sh" >&2; exit 1; }
[[ -z $png || -d $png ]] || { echo "observe.sh: --png $png: not a folder" >&2; exit 1; }
disaggregated=0
[[ $check == 1 || -n $png ]] && disaggregated=1

work=$(mktemp -d /tmp/sieve-observe.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$repo"
# Sparse attention with thresholds low enough that the load's prompts (by default 32, 128, 512 tokens)
# use it, so that the dashboards' sparse panels have data: XAttention prefill for KV lengths
# above 128 tokens (64-token blocks), Quest decode above 64 tokens with a 64-token budget (four
# pages), the first layer dense in both phases. Every daemon runs them; the decode daemon of
# --check or --png decodes prompts whose KV it imported (their Quest bounds are rebuilt on import).
sparse=(--set attention.prefill.method=xattention --set attention.prefill.sparse_min_tokens=128
        --set attention.prefill.dense_layers=1 --set attention.prefill.xattention.block_size=64
        --set attention.decode.method=quest --set attention.decode.sparse_min_tokens=64
        --set attention.decode.token_budget=64 --set attention.decode.dense_layers=1)
start_sieved() {  # start_sieved NAME GRPC_PORT METRICS_PORT [--set KEY=VALUE ...]
  local name=$1 grpc=$2 metrics=$3
  shift 3
  "$build/server/sieved" --config configs/default.yaml \
    --set "server.listen_address=127.0.0.1:$grpc" --set "metrics.listen_address=127.0.0.1:$metrics" \
    "${sparse[@]}" "$@" >"$work/sieved-$name.log" 2>&1 &
  pids+=($!)
  local pid=$!
  for _ in $(seq 150); do
    "$build/cli/sieve" health --target "127.0.0.1:$grpc" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/sieved-$name.log" >&2; exit 1; }
    sleep 0.2
  done
  "$build/cli/sieve" health --target "127.0.0.1:$grpc" >/dev/null || { echo "observe.sh: sieved ($name) not serving" >&2; exit 1; }
}
start_sieved both 50051 9090
sieved_pid=${pids[0]}

config=deploy/prometheus/local/prometheus.yml
if ((disaggregated)); then
  # The check and the pictures also cover the disaggregated overlay's queries (roles prefill
  # and decode, the KV transfer metrics) with real daemons of those roles: a prefill daemon and
  # a decode daemon that prefills prompts of 64 tokens and more on it (docs/disaggregation.md).
  start_sieved prefill 50061 9092 --set server.role=prefill
  start_sieved decode 50052 9093 --set server.role=decode \
    --set disaggregation.prefill_target=ipv4:127.0.0.1:50061 \
    --set disaggregation.local_prefill_below_tokens=64
  config=$work/prometheus.yml
  yq -y --arg rules "$repo/deploy/prometheus/rules" '
    .rule_files |= map($rules + "/" + (split("/") | last)) |
    .scrape_configs += [(.scrape_configs[0] | .job_name = "sieve-prefill" |
                           .static_configs[0].targets = ["127.0.0.1:9092"] |
                           .static_configs[0].labels.pod = "sieve-local-prefill-0"),
                        (.scrape_configs[0] | .job_name = "sieve-decode" |
                           .static_configs[0].targets = ["127.0.0.1:9093"] |
                           .static_configs[0].labels.pod = "sieve-local-decode-0")]
  ' deploy/prometheus/local/prometheus.yml >"$config"
fi
prometheus --config.file="$config" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address=127.0.0.1:9091 --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:9091/-/ready >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS http://127.0.0.1:9091/-/ready >/dev/null || { cat "$work/prometheus.log" >&2; exit 1; }
echo "observe.sh: sieved on 127.0.0.1:50051 (metrics :9090), Prometheus on http://127.0.0.1:9091"

echo "observe.sh: load for ${duration} s at ${rate} requests/s"
load_start=$(date +%s)
load() {  # load GRPC_PORT OUT
  "$build/bench/sieve_loadgen" --target "127.0.0.1:$1" --rate "$rate" --duration "$duration" \
    --prompt-lengths "$lengths" --shared-prefix 32 --max-tokens 16 --drain-timeout 30 --seed 1 >"$2"
}
if ((disaggregated)); then
  load 50052 "$work/loadgen-decode.md" &
  decode_load=$!
fi
load 50051 "$work/loadgen.md"
if ((disaggregated)); then
  wait "$decode_load" || { echo "observe.sh: the load on the decode daemon failed" >&2; exit 1; }
  grep -E "^\| (requests sent|time to first token \|)" "$work/loadgen-decode.md" | sed 's/^/decode daemon: /' || true
fi
grep -E "^\| (latency|requests sent|output tokens|time to first token \||end-to-end)" "$work/loadgen.md" || tail -n 15 "$work/loadgen.md"
# A few bad calls, so that the error panels have something to show: requests for a model the
# daemon does not serve (refused), and requests whose client deadline ends mid-generation
# (cancelled by the daemon).
"$build/bench/sieve_loadgen" --target 127.0.0.1:50051 --model no-such-model --rate 20 --requests 3 \
  --duration 5 --seed 2 >"$work/loadgen-bad.md" 2>&1 || true
"$build/bench/sieve_loadgen" --target 127.0.0.1:50051 --rate 20 --requests 3 --duration 5 \
  --prompt-lengths 512 --max-tokens 4096 --request-timeout 0.3 --seed 3 >>"$work/loadgen-bad.md" 2>&1 || true
sleep 3   # the last scrapes and rule evaluations

if [[ -n $png ]]; then
  for board in latency overview; do
    /usr/bin/python3 deploy/grafana/render_png.py --prometheus http://127.0.0.1:9091 \
      --seconds "$(($(date +%s) - load_start + 10))" --out "$png/dashboard-$board.png" \
      "deploy/grafana/dashboards/sieve-$board.json"
  done
  ((check)) || exit 0
fi
if ((check)); then
  status=0
  /usr/bin/python3 tests/deploy/query_check.py --prometheus http://127.0.0.1:9091 \
    --metrics http://127.0.0.1:9090/metrics --metrics http://127.0.0.1:9092/metrics \
    --metrics http://127.0.0.1:9093/metrics || status=$?
  kill -TERM "$sieved_pid"
  wait "$sieved_pid" || { echo "observe.sh: sieved exited with $? after SIGTERM" >&2; status=1; }
  exit $status
fi
echo "observe.sh: Prometheus keeps scraping; Ctrl-C stops the daemon and Prometheus"
wait "$sieved_pid"
