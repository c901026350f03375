#include "engine/attention/double_sparsity_policy.h"

#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"

namespace sieve::engine {
namespace {

class DoubleSparsityPolicy final : public AttentionPolicy {
 public:
  explicit DoubleSparsityPolicy(const DecodePolicySettings& s) : s_(s) {}

  std::string_view method() const override { return "double_sparsity"; }

  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    const BatchLayout& layout = *step.layout;
    const int32_t heads = step.shape.num_q_heads;
    const int64_t dense_pairs = DensePairs(layout, heads);
    stats_.dense_pairs += dense_pairs;
    dense_.assign(layout.num_seqs(), 0);
    bool any_sparse = false;
    for (int32_t i = 0; i < layout.num_seqs(); ++i) {
      const bool asked = !step.dense_decode.empty() && step.dense_decode[i] != 0;
      const bool one_query = layout.query_start[i + 1] - layout.query_start[i] == 1;
      dense_[i] = asked || !one_query || !Sparse(layout.kv_lens[i]);
      any_sparse |= !dense_[i];
    }
    if (step.layer < s_.dense_layers || !any_sparse) {
      plan.SetDense();
      stats_.read_pairs += dense_pairs;
      return absl::OkStatus();
    }
    const auto start = std::chrono::steady_clock::now();
    DsPlanOptions options;
    options.token_budget = s_.token_budget;
    options.dense_sequences = dense_;
    absl::Status st = step.backend->PlanDsTokens(*step.stream, step.layer, step.q, options, plan);
    stats_.selection_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!st.ok()) return st;
    stats_.read_pairs += plan.ReadPairs(layout, heads);
    return absl::OkStatus();
  }

  DecodeAttentionStats TakeDecodeStats() override {
    DecodeAttentionStats out = stats_;
    stats_ = {};
    return out;
  }

 private:
  // A context this long is read sparsely (when its query is alone and not overridden); L <= k
  // is dense exactly (4.8).
  bool Sparse(int32_t kv_len) const {
    return kv_len > s_.sparse_min_tokens && kv_len > s_.token_budget;
  }

  DecodePolicySettings s_;
  DecodeAttentionStats stats_;
  std::vector<uint8_t> dense_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeDoubleSparsityPolicy(
    const DecodePolicySettings& settings) {
  if (settings.token_budget < 1) {
    return absl::InvalidArgumentError(absl::StrCat("attention.decode.token_budget ",
                                                   settings.token_budget, " must be >= 1"));
  }
  if (settings.dense_layers < 0 || settings.sparse_min_tokens < 0) {
    return absl::InvalidArgumentError(
        "attention.decode.dense_layers and attention.decode.sparse_min_tokens must be >= 0");
  }
  return std::unique_ptr<AttentionPolicy>(new DoubleSparsityPolicy(settings));
}

}  // namespace sieve::engine
