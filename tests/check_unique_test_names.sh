#!/usr/bin/env bash
# Every CTest name in the build tree is unique. Two binaries that register the same name (e.g.
# one test source built for the CPU and for the CUDA backend) make CTest apply one's properties
# to both: the CPU copies got the gpu label, and CI (ctest -LE gpu) silently skipped them.
# Usage: check_unique_test_names.sh BUILD_DIR
set -euo pipefail
names=$(ctest --test-dir "$1" -N | sed -n 's/^ *Test *#[0-9]*: //p' | sed 's/ *#.*$//')
dups=$(sort <<<"$names" | uniq -d)
if [[ -n $dups ]]; then
  echo "CTest names registered more than once (give one binary a TEST_PREFIX in sieve_test):"
  echo "$dups"
  exit 1
fi
echo "unique test names: ok ($(wc -l <<<"$names") tests)"
