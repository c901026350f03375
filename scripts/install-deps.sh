#!/usr/bin/env bash
# Installs every build and test dependency of Sieve from Debian's packages.
# Idempotent: packages already present are left alone. Run as root (or with sudo).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  ccache                     # rebuilds reuse unchanged objects (CMakeLists.txt: SIEVE_CCACHE)
  libabsl-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  prometheus-cpp-dev libyaml-cpp-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libhwy-dev                 # SIMD of the CPU backend (Google Highway)
  libpcre2-dev libicu-dev    # tokenizer regexes (PCRE2) and Unicode normal forms (ICU)
  libdnnl-dev                # sgemm of the CPU backend's linear layers (oneDNN, on libgomp)
  clang libclang-rt-14-dev   # libFuzzer for the fuzz targets
  curl                       # the metrics checks in the integration tests
  openssl                    # test certificates for the TLS and mutual-TLS tests (tests/sieved_harness.cc)
  prometheus python3-yaml    # deployment checks (tests/deploy): promtool, a real Prometheus, PyYAML
  yq jq iproute2 util-linux  # deployment checks: YAML/JSON rewriting, a private loopback (unshare)
  libcpp-httplib-dev         # the OpenAI-compatible HTTP API (cpp-httplib)
  python3-jinja2             # chat-template goldens (scripts/chat_template_goldens/gen_goldens.py)
  libucx-dev                 # disaggregation.transport ucx: KV pages over UCX (optional: SIEVE_UCX)
  node-typescript            # deployment checks: tsc rejects unknown fields in Kubernetes objects
  mmdebstrap                 # tests/deploy/dockerfile_build.py: the Dockerfile's CPU target in clean roots
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

# Debian starts the prometheus package's own service where systemd runs; it would hold port
# 9090, the daemon's metrics port. The deployment checks run their own Prometheus.
if [[ " ${missing[*]-} " == *" prometheus "* ]] && [[ -d /run/systemd/system ]]; then
  ${sudo-} systemctl disable --now prometheus.service || true
fi

# Node.js and the pinned npm packages of the Kubernetes schema checks (tests/deploy/package-lock.json).
if ! command -v npm >/dev/null; then
  sudo_npm=""
  [[ $(id -u) -ne 0 ]] && sudo_npm="sudo"
  $sudo_npm apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_npm apt-get install -y -qq --no-install-recommends nodejs npm
fi
deploy_tests="$(cd "$(dirname "$0")/.." && pwd)/tests/deploy"
if [[ ! -f $deploy_tests/node_modules/.package-lock.json ]] ||
   ! cmp -s <(jq -S '.packages | del(.[""])' "$deploy_tests/package-lock.json") \
             <(jq -S '.packages | del(.[""])' "$deploy_tests/node_modules/.package-lock.json"); then
  npm ci --prefix "$deploy_tests" --no-audit --no-fund --loglevel=error
fi
# kubectl (with its kustomize) renders the Kubernetes overlays; Debian 12 has none recent enough
# (kubernetes-client 1.20 lacks kustomize components): the machine image provides it.
command -v kubectl >/dev/null ||
  echo "sieve: kubectl is missing: the deploy_k8s test will fail until kubectl >= 1.27 is installed" >&2
echo "sieve: dependencies installed"
