#!/usr/bin/env bash
# Installs every build and test dependency of Sieve from Debian's packages.
# Idempotent: packages already present are left alone. Run as root (or with sudo).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libabsl-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  prometheus-cpp-dev libyaml-cpp-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libhwy-dev                 # SIMD of the CPU backend (Google Highway)
  libdnnl-dev                # sgemm of the CPU backend's linear layers (oneDNN, on libgomp)
  clang libclang-rt-14-dev   # libFuzzer for the fuzz targets
  curl                       # the metrics checks in the integration tests
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "sieve: dependencies installed"
