#!/usr/bin/env bash
# Enforces the dependency direction proto -> server -> engine -> kernels on #include lines:
# kernels include nothing of ours above them; the engine never sees gRPC, Protobuf,
# prometheus-cpp, yaml-cpp or the server.
set -euo pipefail
root=${1:-$(dirname "$0")/..}
cd "$root"
fail=0
check() {  # check DIR REGEX WHY
  local hits
  hits=$(grep -rnE --include='*.h' --include='*.cc' --include='*.cu' --include='*.cuh' "$2" "$1" || true)
  if [[ -n $hits ]]; then
    echo "layering violation ($3):"
    echo "$hits"
    fail=1
  fi
}
check kernels '#include "(engine|server|proto|cli|sieve/v1|grpc/health)/' \
  "kernels depend on nothing of ours"
check engine '#include "(server|proto|cli|sieve/v1|grpc/health)/' \
  "the engine never includes the server or the generated proto code"
check engine '#include [<"](grpc|grpcpp|google/protobuf|prometheus|yaml-cpp)' \
  "the engine never depends on gRPC, Protobuf, prometheus-cpp or yaml-cpp"
if [[ $fail -eq 0 ]]; then echo "layering: ok"; fi
exit $fail
