#include "engine/attention/quest_policy.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace sieve::engine {
namespace {

class QuestAttentionPolicy final : public AttentionPolicy {
 public:
  explicit QuestAttentionPolicy(const DecodePolicySettings& s) : s_(s) {}

  std::string_view method() const override { return "quest"; }

  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    const BatchLayout& layout = *step.layout;
    const int32_t heads = step.shape.num_q_heads;
    stats_.dense_pairs += DensePairs(layout, heads);
    if (step.layer < s_.dense_layers || !AnySparse(step)) {
      plan.SetDense();
      stats_.read_pairs += DensePairs(layout, heads);
      return absl::OkStatus();
    }
    const auto start = std::chrono::steady_clock::now();
    Backend::QuestPlanOptions options;
    options.page_budget = s_.token_budget / s_.page_size;
    options.per_kv_head = s_.quest_per_kv_head;
    dense_.assign(layout.num_seqs(), 0);
    for (int32_t i = 0; i < layout.num_seqs(); ++i) {
      dense_[i] = !step.dense_decode.empty() && step.dense_decode[i] != 0
                      ? 1
                      : static_cast<uint8_t>(!Sparse(layout.kv_lens[i]));
    }
    options.dense_sequences = dense_;
    absl::Status st = step.backend->PlanQuestPages(*step.stream, step.layer, step.q, step.shape,
                                                   options, plan);
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
  // A context this long is read sparsely (when its query is alone and not overridden).
  bool Sparse(int32_t kv_len) const {
    return kv_len > s_.sparse_min_tokens && kv_len > s_.token_budget;
  }
  bool AnySparse(const AttentionStep& step) const {
    const BatchLayout& l = *step.layout;
    for (int32_t i = 0; i < l.num_seqs(); ++i) {
      const bool dense = !step.dense_decode.empty() && step.dense_decode[i] != 0;
      if (!dense && Sparse(l.kv_lens[i]) && l.query_start[i + 1] - l.query_start[i] == 1) {
        return true;
      }
    }
    return false;
  }

  DecodePolicySettings s_;
  DecodeAttentionStats stats_;
  std::vector<uint8_t> dense_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeQuestPolicy(
    const DecodePolicySettings& settings) {
  if (settings.page_size <= 0 || settings.token_budget < 2 * settings.page_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention.decode.token_budget ", settings.token_budget,
        " is below two KV pages of ", settings.page_size,
        " tokens: Quest keeps at least one selected page and the last page"));
  }
  if (settings.dense_layers < 0 || settings.sparse_min_tokens < 0) {
    return absl::InvalidArgumentError(
        "attention.decode.dense_layers and attention.decode.sparse_min_tokens must be >= 0");
  }
  return std::unique_ptr<AttentionPolicy>(new QuestAttentionPolicy(settings));
}

}  // namespace sieve::engine
