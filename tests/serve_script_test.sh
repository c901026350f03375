#!/usr/bin/env bash
# scripts/serve.sh configures the build with the CUDA backend off unless the daemon is asked to
# serve on cuda (the CUDA kernels take minutes to compile and the default serves on cpu).
set -euo pipefail
root="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
serve() { SIEVE_SERVE_DRY_RUN=1 bash "$root/scripts/serve.sh" "$@"; }
expect() {
  local want="$1"; shift
  local got
  got="$(serve "$@")"
  if [[ "$got" != *"-DSIEVE_CUDA=$want"* ]]; then
    echo "FAIL: serve.sh $* configured '$got', expected -DSIEVE_CUDA=$want" >&2
    exit 1
  fi
}
expect OFF
expect OFF --listen 127.0.0.1:50051
expect ON --backend cuda
expect ON --backend=cuda
expect ON --set model.backend=cuda
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf 'model:\n  backend: cuda\n' >"$tmp/cuda.yaml"
expect ON --config "$tmp/cuda.yaml"
SIEVE_CUDA=AUTO expect AUTO
echo "serve.sh: CUDA off for cpu, on for cuda"
