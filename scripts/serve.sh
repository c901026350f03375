#!/usr/bin/env bash
# Installs the dependencies, builds, and runs the main job on the embedded default model (CPU).
# Until the daemon lands this streams one generation from the CLI:
#   scripts/serve.sh ["prompt"] [extra `sieve generate` options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target sieve
prompt=${1:-"Sieve is a long-context LLM serving daemon"}
shift || true
exec build/cli/sieve generate --model models/embedded --max-tokens 64 "$@" "$prompt"
