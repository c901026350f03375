#!/usr/bin/env bash
# Trains several variants of the retrieval model side by side on one GPU and keeps the best.
#
#   scripts/retrieval/train_variants.sh OUT_DIR MINUTES 'NAME ARGS...' ['NAME ARGS...' ...]
#
# Each variant runs train_retrieval_model.py --max-minutes MINUTES --out /tmp/variants/NAME ARGS
# (all at once: a 4-layer hidden-256 model leaves most of an H100/H200 idle at short lengths).
# Afterwards the variant with the best final evaluation (the mean accuracy over its evaluated
# lengths, longest lengths weighted double) is packed into OUT_DIR/best.tar.gz (the checkpoint
# folder), and every variant's train_log.jsonl and eval.json into OUT_DIR/variants.tar.gz.
# Exit status: 0 if at least one variant finished its evaluation.
set -uo pipefail
out=$1 minutes=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
root=/tmp/variants
rm -rf "$root" && mkdir -p "$root" "$out"
pids=()
for spec in "$@"; do
  read -r name args <<<"$spec"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 python3 "$here/train_retrieval_model.py" --out "$root/$name" \
    --max-minutes "$minutes" $args >"$root/$name.log" 2>&1 &
  pids+=($!)
  echo "started $name: $args"
done
for p in "${pids[@]}"; do wait "$p"; done
best=$(python3 - "$root" <<'PY'
import json, os, sys
root = sys.argv[1]
best, best_score = None, -1.0
for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "eval.json")
    if not os.path.isfile(path):
        continue
    acc = json.load(open(path))["accuracy"]
    lengths = sorted(acc, key=int)
    weights = [2.0 if i >= len(lengths) - 2 else 1.0 for i in range(len(lengths))]
    score = sum(w * acc[L] for w, L in zip(weights, lengths)) / sum(weights)
    print(f"{name}: {json.dumps(acc)} score {score:.4f}", file=sys.stderr)
    if score > best_score:
        best, best_score = name, score
print(best or "")
PY
)
for spec in "$@"; do
  read -r name _ <<<"$spec"
  echo "== $name (last lines)"; tail -n 4 "$root/$name.log"
done
(cd "$root" && tar czf "$out/variants.tar.gz" ./*.log ./*/train_log.jsonl ./*/eval.json 2>/dev/null)
[[ -n $best ]] || { echo "no variant finished"; exit 1; }
echo "best: $best"
tar czf "$out/best.tar.gz" -C "$root/$best" .
