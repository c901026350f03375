#include "engine/attention/quest_policy.h"

#include "absl/strings/str_cat.h"
#include "engine/attention/sparse_decode_policy.h"

namespace sieve::engine {
namespace {

class QuestAttentionPolicy final : public SparseDecodePolicy {
 public:
  using SparseDecodePolicy::SparseDecodePolicy;

  std::string_view method() const override { return "quest"; }

 protected:
  absl::Status SelectKeys(const AttentionStep& step, absl::Span<const uint8_t> dense,
                          AttentionPlan& plan) override {
    Backend::QuestPlanOptions options;
    options.page_budget = settings().token_budget / settings().page_size;
    options.per_kv_head = settings().quest_per_kv_head;
    options.dense_sequences = dense;
    return step.backend->PlanQuestPages(*step.stream, step.layer, step.q, step.shape, options,
                                        plan);
  }
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
  if (absl::Status st = CheckSparseDecodeSettings(settings); !st.ok()) return st;
  return std::unique_ptr<AttentionPolicy>(new QuestAttentionPolicy(settings));
}

}  // namespace sieve::engine
