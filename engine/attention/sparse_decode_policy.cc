#include "engine/attention/sparse_decode_policy.h"

#include <chrono>

namespace sieve::engine {

absl::Status SparseDecodePolicy::Plan(const AttentionStep& step, AttentionPlan& plan) {
  const BatchLayout& layout = *step.layout;
  const int32_t heads = step.shape.num_q_heads;
  const int64_t dense_pairs = DensePairs(layout, heads);
  stats_.dense_pairs += dense_pairs;
  // A sequence reads sparsely when it decodes (one query), was not asked to stay dense, and its
  // context is longer than both sparse_min_tokens and the budget (L <= budget is dense exactly).
  dense_.assign(layout.num_seqs(), 0);
  bool any_sparse = false;
  for (int32_t i = 0; i < layout.num_seqs(); ++i) {
    const bool asked = !step.dense_decode.empty() && step.dense_decode[i] != 0;
    const bool one_query = layout.query_start[i + 1] - layout.query_start[i] == 1;
    const int32_t kv_len = layout.kv_lens[i];
    const bool long_context = kv_len > s_.sparse_min_tokens && kv_len > s_.token_budget;
    dense_[i] = asked || !one_query || !long_context;
    any_sparse |= !dense_[i];
  }
  if (step.layer < s_.dense_layers || !any_sparse) {
    plan.SetDense();
    stats_.read_pairs += dense_pairs;
    return absl::OkStatus();
  }
  const auto start = std::chrono::steady_clock::now();
  absl::Status st = SelectKeys(step, dense_, plan);
  stats_.selection_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!st.ok()) return st;
  stats_.read_pairs += plan.ReadPairs(layout, heads);
  return absl::OkStatus();
}

DecodeAttentionStats SparseDecodePolicy::TakeDecodeStats() {
  DecodeAttentionStats out = stats_;
  stats_ = {};
  return out;
}

absl::Status CheckSparseDecodeSettings(const DecodePolicySettings& settings) {
  if (settings.dense_layers < 0 || settings.sparse_min_tokens < 0) {
    return absl::InvalidArgumentError(
        "attention.decode.dense_layers and attention.decode.sparse_min_tokens must be >= 0");
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
