#!/usr/bin/env bash
# Rewrites the configuration docs generated from the key table (server/config_keys.cc):
# configs/default.yaml and the key reference in docs/config.md. Run it after adding, changing or
# retiring a key; server_config_test fails until the committed files match the table.
#   scripts/gen-config-docs.sh [BUILD_DIR]      (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
cmake --build "$build" --target config_docs
"$build/server/config_docs" "$PWD"
