#!/usr/bin/env bash
# Issue 17's fidelity benchmark in one command: fresh retrieval prompts for the trained model
# (models/retrieval), answered by the engine under each attention policy, accuracy beside
# prefill density / decode KV read and time (bench/retrieval_fidelity.cc).
#
#   bench/run_retrieval_fidelity.sh [--lengths 8192,32768,131072] [--count 24,6,2]
#       [--backend cpu|cuda] [--bin PATH] [--out DIR]
#   bench/run_retrieval_fidelity.sh pack [PACK_DIR]   # here: the binary and its shared libraries
#                                                     # into PACK_DIR (default .device-pack-fidelity)
#
# Defaults: lengths 8192,32768, counts 24,6, backend cpu, bin build/bench/retrieval_fidelity,
# out bench/results/fidelity-<date>. Writes prompts.jsonl, table.md (the bench's output) and
# results.json into --out. Needs python3 with torch (the prompt generator); Debian's
# python3-torch will do. On the GPU machine (which has torch and 16 cores but not Abseil or
# oneDNN): `pack` here (about 80 MB: carry it as `tar cJf` of PACK_DIR, ~20 MB), and there run
#   bench/run_retrieval_fidelity.sh --bin .device-pack-fidelity/bin/retrieval_fidelity ...
# (the libraries are found beside it). --backend cuda needs a model whose head_dim the CUDA
# kernels take (64 or 128); models/retrieval has 32, so run it there on the CPU backend.
# The CI-sized form is tests/retrieval_model_test.sh (ctest -R retrieval_model).
#
# Policies: dense; XAttention at tau 0.9 (default) and 0.95; MInference (default sizes); Quest
# and DoubleSparsity at budgets 4096 (default), 1024, 256; XAttention 0.9 + Quest 1024. The
# prefill methods run at lengths above 4096 (the default sparse_min_tokens 8192 would leave the
# 8K prompts dense); decode methods with attention.decode.dense_layers=0 (the default 2 keeps
# two of an 8B model's 32 layers dense; this model has 2 layers, so 2 would switch them off).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == pack ]]; then
  pack=${2:-.device-pack-fidelity}
  ninja -C build retrieval_fidelity
  rm -rf "$pack" && mkdir -p "$pack/bin" "$pack/lib"
  cp build/bench/retrieval_fidelity "$pack/bin/" && strip --strip-unneeded "$pack/bin/"*
  scripts/pack-libs.sh "$pack/lib" "$pack/bin/retrieval_fidelity"
  echo "packed retrieval_fidelity into $pack ($(du -sh "$pack" | cut -f1))"
  exit 0
fi
lengths=8192,32768 count=24,6 backend=cpu bin=build/bench/retrieval_fidelity
out=bench/results/fidelity-$(date -u +%Y-%m-%d)
while [[ $# -gt 0 ]]; do
  case $1 in
    --lengths) lengths=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -x $bin ]] || { echo "no $bin: build it (ninja -C build retrieval_fidelity)" >&2; exit 2; }
libs=$(cd "$(dirname "$bin")/../lib" 2>/dev/null && pwd || true)
[[ -n $libs ]] && export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
py=python3
[[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import torch' 2>/dev/null && py=/usr/bin/python3
mkdir -p "$out"
"$py" scripts/retrieval/make_prompt_set.py --model models/retrieval --lengths "$lengths" \
  --count "$count" --out "$out/prompts.jsonl"
D='attention.decode.dense_layers=0'
P='attention.prefill.sparse_min_tokens=4096'
{
  echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
       "backend $backend, host $(hostname), $(nproc) cores"
  "$bin" --model models/retrieval --prompts "$out/prompts.jsonl" --set "model.backend=$backend" \
    --policy dense \
    --policy "xattn-0.9:attention.prefill.method=xattention;$P" \
    --policy "xattn-0.95:attention.prefill.method=xattention;attention.prefill.xattention.threshold=0.95;$P" \
    --policy "minference:attention.prefill.method=minference;$P" \
    --policy "quest-4096:attention.decode.method=quest;$D" \
    --policy "quest-1024:attention.decode.method=quest;attention.decode.token_budget=1024;$D" \
    --policy "quest-256:attention.decode.method=quest;attention.decode.token_budget=256;$D" \
    --policy "ds-4096:attention.decode.method=double_sparsity;$D" \
    --policy "ds-1024:attention.decode.method=double_sparsity;attention.decode.token_budget=1024;$D" \
    --policy "ds-256:attention.decode.method=double_sparsity;attention.decode.token_budget=256;$D" \
    --policy "xattn-0.9+quest-1024:attention.prefill.method=xattention;$P;attention.decode.method=quest;attention.decode.token_budget=1024;$D" \
    --json "$out/results.json"
} 2>&1 | tee "$out/table.md"
