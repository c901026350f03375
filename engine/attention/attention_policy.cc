#include "engine/attention/attention_policy.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/attention/double_sparsity_policy.h"
#include "engine/attention/minference_policy.h"
#include "engine/attention/quest_policy.h"
#include "engine/attention/xattention_policy.h"

namespace sieve::engine {

absl::Status DenseAttentionPolicy::Plan(const AttentionStep&, AttentionPlan& plan) {
  plan.SetDense();
  return absl::OkStatus();
}

DecodePolicySettings DecodePolicySettingsFor(const DecodeAttentionConfig& config,
                                             int32_t page_size) {
  DecodePolicySettings s;
  s.sparse_min_tokens = config.sparse_min_tokens;
  s.token_budget = config.token_budget;
  s.dense_layers = config.dense_layers;
  s.quest_per_kv_head = config.quest.per_kv_head;
  if (page_size > 0) s.page_size = page_size;
  return s;
}

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeAttentionPolicy(
    const AttentionConfig& config, AttentionPhase phase, const AttentionModelShape& model) {
  const bool prefill = phase == AttentionPhase::kPrefill;
  const std::string& method = prefill ? config.prefill.method : config.decode.method;
  if (method == "dense") return std::unique_ptr<AttentionPolicy>(new DenseAttentionPolicy());
  if (prefill) {
    std::vector<std::string> errors;
    config.prefill.Validate(errors);
    if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
    if (method == "minference") return MakeMInferencePolicy(config.prefill, model);
    if (method == "xattention") return MakeXAttentionPolicy(config.prefill, model);
  } else if (method == "quest" || method == "double_sparsity") {
    std::vector<std::string> errors;
    config.decode.Validate(errors);
    if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
    const DecodePolicySettings settings = DecodePolicySettingsFor(config.decode, model.page_size);
    if (method == "quest") return MakeQuestPolicy(settings);
    return MakeDoubleSparsityPolicy(settings);
  }
  const auto& methods = prefill ? absl::MakeConstSpan(kPrefillAttentionMethods)
                                : absl::MakeConstSpan(kDecodeAttentionMethods);
  std::vector<std::string> known(methods.begin(), methods.end());
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown ", prefill ? "prefill" : "decode", " attention method '", method,
      "' (attention.", prefill ? "prefill" : "decode", ".method; known: ",
      absl::StrJoin(known, ", "), ")"));
}

}  // namespace sieve::engine
