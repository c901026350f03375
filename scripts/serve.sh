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
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target sieved sieve
exec build/server/sieved --config configs/default.yaml "$@"
