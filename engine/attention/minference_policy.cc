#include "engine/attention/minference_policy.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace sieve::engine {

MInferencePolicy::MInferencePolicy(const PrefillAttentionConfig& config,
                                   MInferencePatterns patterns)
    : SparsePrefillPolicy(config), patterns_(std::move(patterns)) {}

MInferenceHeadPattern MInferencePolicy::Pattern(int32_t layer, int32_t head) const {
  if (layer >= 0 && layer < static_cast<int32_t>(patterns_.size()) && head >= 0 &&
      head < static_cast<int32_t>(patterns_[layer].size())) {
    return patterns_[layer][head];
  }
  const MInferenceConfig& m = config().minference;
  return {kernels::minference::Pattern::kVerticalSlash, m.vertical_size, m.slash_size};
}

MInferenceEstimate MInferencePolicy::Estimate(const AttentionStep& step, int32_t seq) {
  const int32_t heads = step.shape.num_q_heads;
  layer_.resize(heads);
  for (int32_t h = 0; h < heads; ++h) layer_[h] = Pattern(step.layer, h);
  MInferenceEstimate e;
  e.seq = seq;
  e.patterns = layer_;
  e.last_q = config().minference.last_q;
  return e;
}

absl::StatusOr<bool> MInferencePolicy::PlanOnDevice(const AttentionStep& step,
                                                    AttentionPlan& plan) {
  have_host_plan_ = false;
  MInferenceEstimate e = Estimate(step, 0);
  e.device_plan = &plan;
  plan.on_device = false;
  SIEVE_RETURN_IF_ERROR(
      step.backend->MInferenceIndex(*step.stream, step.layer, step.q, step.shape, e, plan_));
  have_host_plan_ = !plan.on_device;
  return plan.on_device;
}

absl::Status MInferencePolicy::PlanSequence(const AttentionStep& step, int32_t seq,
                                            PlanRowWriter& rows) {
  const int32_t heads = step.shape.num_q_heads;
  if (!(have_host_plan_ && seq == 0)) {
    const MInferenceEstimate e = Estimate(step, seq);
    SIEVE_RETURN_IF_ERROR(
        step.backend->MInferenceIndex(*step.stream, step.layer, step.q, step.shape, e, plan_));
  }
  have_host_plan_ = false;
  const BatchLayout& l = *step.layout;
  const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
  const int64_t want = int64_t{(q_len + kernels::minference::kBlock - 1) / kernels::minference::kBlock} * heads;
  if (static_cast<int64_t>(plan_.row_start.size()) != want + 1 ||
      plan_.column_start.size() != plan_.row_start.size()) {
    return absl::InternalError(absl::StrCat("MInference index of sequence ", seq, " has ",
                                            plan_.row_start.size() - 1, " rows; want ", want));
  }
  for (int64_t r = 0; r < want; ++r) {
    rows.AddRow(absl::MakeConstSpan(plan_.key_blocks.data() + plan_.row_start[r],
                                    plan_.row_start[r + 1] - plan_.row_start[r]),
                absl::MakeConstSpan(plan_.columns.data() + plan_.column_start[r],
                                    plan_.column_start[r + 1] - plan_.column_start[r]));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionPolicy>> MakeMInferencePolicy(
    const PrefillAttentionConfig& config, const AttentionModelShape& model) {
  MInferencePatterns patterns;
  const MInferenceConfig& m = config.minference;
  if (!m.pattern_file.empty()) {
    if (model.num_layers <= 0 || model.num_q_heads <= 0) {
      return absl::InvalidArgumentError(
          "attention.prefill.minference.pattern_file: the model's layer and head counts are "
          "unknown here, so the file cannot be checked");
    }
    const MInferenceHeadPattern fallback{kernels::minference::Pattern::kVerticalSlash,
                                         m.vertical_size, m.slash_size};
    auto loaded = LoadMInferencePatterns(m.pattern_file, model.num_layers, model.num_q_heads, fallback);
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("attention.prefill.minference.pattern_file: ",
                                       loaded.status().message()));
    }
    patterns = *std::move(loaded);
  }
  return std::unique_ptr<AttentionPolicy>(new MInferencePolicy(config, std::move(patterns)));
}

}  // namespace sieve::engine
