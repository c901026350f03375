#include "engine/attention/double_sparsity_policy.h"

#include "absl/strings/str_cat.h"
#include "engine/attention/sparse_decode_policy.h"

namespace sieve::engine {
namespace {

class DoubleSparsityPolicy final : public SparseDecodePolicy {
 public:
  using SparseDecodePolicy::SparseDecodePolicy;

  std::string_view method() const override { return "double_sparsity"; }

 protected:
  absl::Status SelectKeys(const AttentionStep& step, absl::Span<const uint8_t> dense,
                          AttentionPlan& plan) override {
    DsPlanOptions options;
    options.token_budget = settings().token_budget;
    options.dense_sequences = dense;
    return step.backend->PlanDsTokens(*step.stream, step.layer, step.q, options, plan);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeDoubleSparsityPolicy(
    const DecodePolicySettings& settings) {
  if (settings.token_budget < 1) {
    return absl::InvalidArgumentError(absl::StrCat("attention.decode.token_budget ",
                                                   settings.token_budget, " must be >= 1"));
  }
  if (absl::Status st = CheckSparseDecodeSettings(settings); !st.ok()) return st;
  return std::unique_ptr<AttentionPolicy>(new DoubleSparsityPolicy(settings));
}

}  // namespace sieve::engine
