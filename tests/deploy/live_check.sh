#!/usr/bin/env bash
# CTest deploy_live: the local observability stack (deploy/local/observe.sh --check) in a
# private network namespace, so that its fixed ports (50051, 9090, 9091) cannot meet another
# daemon on this machine: a real Prometheus scrapes a real daemon under a short load, then every
# dashboard, rule, alert and autoscaler expression must return data (query_check.py).
#
#   live_check.sh BUILD_DIR
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
export SIEVE_BUILD=$1
if [[ $(id -u) -eq 0 ]]; then
  ns=(unshare --net)
else
  ns=(unshare --user --map-root-user --net)
fi
exec "${ns[@]}" -- bash -c 'ip link set lo up && exec "$0" --check --duration 8' "$repo/deploy/local/observe.sh"
