#!/usr/bin/env bash
# The README's commands run as root too (root-only images have no sudo): no line of its shell
# blocks may start with an unconditional `sudo` (issue 15, item 7; `$( [ "$(id -u)" -ne 0 ] &&
# echo sudo )` is the form that works for both).
# Usage: check_readme_commands.sh REPO_ROOT
set -euo pipefail
bad=$(awk '/^```/ {
             if (!inblock) { inblock = 1; shell = ($0 ~ /^```(bash|sh|shell)?[[:space:]]*$/) }
             else { inblock = 0; shell = 0 }
             next
           }
           shell && /^[[:space:]]*sudo[[:space:]]/ { print FILENAME ":" NR ": " $0 }' "$1/README.md")
if [[ -n $bad ]]; then
  echo "README commands that need sudo (fail as root without it):"
  echo "$bad"
  exit 1
fi
echo "README commands: ok"
