#!/usr/bin/env bash
# Installs the dependencies, builds, and starts the Sieve daemon in the foreground on the embedded
# default model (CPU), configured by configs/default.yaml: gRPC on 0.0.0.0:50051 (sieve.v1.Sieve,
# grpc.health.v1.Health, server reflection), Prometheus metrics on http://0.0.0.0:9090/metrics.
#
#   scripts/serve.sh [sieved flags ...]      e.g. --listen 127.0.0.1:50051
#                                                 --set scheduler.max_batch_tokens=4096
#
# Ctrl-C (SIGINT) or SIGTERM drains: in-flight requests finish, then the daemon exits 0.
# `build/server/sieved --help` lists every configuration key.
set -euo pipefail
cd "$(dirname "$0")/.."
# SIEVE_SERVE_DRY_RUN=1 prints the configure command and exits (tests/serve_script_test.sh).
[[ -n "${SIEVE_SERVE_DRY_RUN:-}" ]] || bash scripts/install-deps.sh
# The CUDA kernels take minutes to compile: build them only when the daemon is asked to serve on
# cuda (--backend cuda, --set model.backend=cuda, a config with backend cuda) or SIEVE_CUDA says so.
cuda="${SIEVE_CUDA:-}"
if [[ -z "$cuda" ]]; then
  cuda=OFF
  args=" $* "
  if [[ "$args" =~ (--backend[=\ ]cuda|model\.backend=cuda) ]]; then cuda=ON; fi
  for ((i = 1; i <= $#; i++)); do
    if [[ "${!i}" == "--config" ]]; then
      j=$((i + 1))
      grep -Eq '^[[:space:]]*backend:[[:space:]]*"?cuda' "${!j}" 2>/dev/null && cuda=ON
    fi
  done
fi
configure=(cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_CUDA="$cuda")
if [[ -n "${SIEVE_SERVE_DRY_RUN:-}" ]]; then
  echo "${configure[*]}"
  exit 0
fi
"${configure[@]}" >/dev/null
cmake --build build -j "$(nproc)" --target sieved sieve
exec build/server/sieved --config configs/default.yaml "$@"
