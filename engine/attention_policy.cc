#include "engine/attention_policy.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace sieve::engine {

absl::Status DenseAttentionPolicy::Plan(const AttentionStep&, AttentionPlan& plan) {
  plan.SetDense();
  return absl::OkStatus();
}

const std::vector<std::string_view>& AttentionMethods(AttentionPhase phase) {
  static const auto* const kPrefill = new std::vector<std::string_view>{"dense"};
  static const auto* const kDecode = new std::vector<std::string_view>{"dense"};
  return phase == AttentionPhase::kPrefill ? *kPrefill : *kDecode;
}

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeAttentionPolicy(std::string_view method,
                                                                      AttentionPhase phase) {
  if (method == "dense") return std::unique_ptr<AttentionPolicy>(new DenseAttentionPolicy());
  std::string known;
  for (std::string_view m : AttentionMethods(phase)) {
    absl::StrAppend(&known, known.empty() ? "" : ", ", std::string(m));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown ", phase == AttentionPhase::kPrefill ? "prefill" : "decode",
      " attention method '", std::string(method), "' (known: ", known, ")"));
}

}  // namespace sieve::engine
