#include "engine/attention/attention_policy.h"
#include "engine/attention/double_sparsity_policy.h"
#include "engine/attention/quest_policy.h"

#include <vector>

#include "absl/types/span.h"

#include "absl/strings/str_cat.h"

namespace sieve::engine {

absl::Status DenseAttentionPolicy::Plan(const AttentionStep&, AttentionPlan& plan) {
  plan.SetDense();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeAttentionPolicy(
    std::string_view method, AttentionPhase phase, const DecodePolicySettings& decode) {
  if (method == "dense") return std::unique_ptr<AttentionPolicy>(new DenseAttentionPolicy());
  if (phase == AttentionPhase::kDecode && method == "quest") return MakeQuestPolicy(decode);
  if (phase == AttentionPhase::kDecode && method == "double_sparsity") {
    return MakeDoubleSparsityPolicy(decode);
  }
  std::string known;
  const auto& methods = phase == AttentionPhase::kPrefill
                            ? absl::MakeConstSpan(kPrefillAttentionMethods)
                            : absl::MakeConstSpan(kDecodeAttentionMethods);
  for (std::string_view m : methods) {
    absl::StrAppend(&known, known.empty() ? "" : ", ", std::string(m));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown ", phase == AttentionPhase::kPrefill ? "prefill" : "decode",
      " attention method '", std::string(method), "' (known: ", known, ")"));
}

}  // namespace sieve::engine
