#!/usr/bin/env bash
# Enforces the dependency direction proto -> server -> engine -> kernels on #include lines:
# kernels include nothing of ours above them; the engine never sees gRPC, Protobuf,
# prometheus-cpp, yaml-cpp or the server.
set -euo pipefail
root=${1:-$(dirname "$0")/..}
cd "$root"
fail=0
check() {  # check DIR REGEX WHY [GREP_OPTION...]
  local hits
  hits=$(grep -rnE --include='*.h' --include='*.cc' --include='*.cu' --include='*.cuh' "${@:4}" \
    "$2" "$1" | grep -v '"engine/status_macros.h"' || true)
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
# Inside the engine, rooms depend in one direction (engine/README.md):
#   tokenizer, model, sampling  <  backends  <  attention  <  runner  <  serving  <  testing
# A room includes only rooms to its left (and itself); nothing but tests (and sieved's --testing-*
# flags) includes testing/. engine/status_macros.h is shared by all.
engine_rooms=(tokenizer model sampling backends attention runner serving testing)
declare -A allowed=(
  [tokenizer]="tokenizer"
  [model]="model"
  [sampling]="sampling"
  [backends]="backends model sampling"
  [attention]="attention backends model sampling"
  [runner]="runner attention backends model sampling"
  [serving]="serving runner attention backends model sampling tokenizer"
  [testing]="${engine_rooms[*]}"
)
for room in "${engine_rooms[@]}"; do
  [[ -d engine/$room ]] || continue
  forbidden=()
  for other in "${engine_rooms[@]}"; do
    [[ " ${allowed[$room]} " == *" $other "* ]] || forbidden+=("$other")
  done
  ((${#forbidden[@]})) || continue
  pattern="#include \"engine/($(IFS='|'; echo "${forbidden[*]}"))/"
  # Unit tests may drive their room through the rooms above it (an engine, a runner).
  check "engine/$room" "$pattern" "engine/$room may include only engine/{${allowed[$room]// /,}}" \
    --exclude='*_test.cc'
done
check engine '#include "engine/[a-z_]+\.h"' \
  "engine headers live in rooms (engine/<room>/x.h); only engine/status_macros.h is shared" 
if [[ $fail -eq 0 ]]; then echo "layering: ok"; fi
exit $fail
