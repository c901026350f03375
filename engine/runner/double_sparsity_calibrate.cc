// DoubleSparsity calibration on a loaded model (double_sparsity_calibrate.h).
#include "engine/runner/double_sparsity_calibrate.h"

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/rope.h"
#include "engine/status_macros.h"
#include "kernels/cpu/ops.h"

namespace sieve::engine {
namespace {

// Attends densely and adds each layer's q and k (split from qkv, rotated on the host for qk) to
// that layer's statistics. Waits for the backend once per layer (CopyToHost): calibration only.
class CapturePolicy final : public AttentionPolicy {
 public:
  CapturePolicy(std::vector<kernels::DsChannelStats>& stats, AttentionShape shape,
                RopeTables rope)
      : stats_(stats), shape_(shape), rope_(std::move(rope)) {}

  std::string_view method() const override { return "double_sparsity_calibration"; }

  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    plan.SetDense();
    const int64_t n = step.layout->num_tokens();
    const int64_t d = shape_.head_dim, hq = shape_.num_q_heads, hkv = shape_.num_kv_heads;
    const int64_t cols = (hq + 2 * hkv) * d;
    if (step.qkv.cols != cols || step.qkv.rows < n) {
      return absl::InternalError("double sparsity calibration: qkv has the wrong shape");
    }
    qkv_.resize(n * cols);
    SIEVE_RETURN_IF_ERROR(
        step.backend->CopyToHost(*step.stream, step.qkv.FirstRows(n), absl::MakeSpan(qkv_)));
    q_.resize(n * hq * d);
    k_.resize(n * hkv * d);
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(qkv_.begin() + t * cols, hq * d, q_.begin() + t * hq * d);
      std::copy_n(qkv_.begin() + t * cols + hq * d, hkv * d, k_.begin() + t * hkv * d);
    }
    kernels::DsChannelStats& stats = stats_.at(step.layer);
    if (stats.statistic() == kernels::DsStatistic::kQK) {
      const int64_t half = static_cast<int64_t>(rope_.inv_freq.size());
      const int32_t* pos = step.layout->positions.data();
      kernels::RopeRef(q_.data(), pos, n, hq, d, rope_.inv_freq.data(), half,
                       rope_.attention_scaling);
      kernels::RopeRef(k_.data(), pos, n, hkv, d, rope_.inv_freq.data(), half,
                       rope_.attention_scaling);
    }
    stats.Add(q_.data(), k_.data(), n);
    return absl::OkStatus();
  }

 private:
  std::vector<kernels::DsChannelStats>& stats_;
  AttentionShape shape_;
  RopeTables rope_;
  std::vector<float> qkv_, q_, k_;
};

}  // namespace

absl::StatusOr<DsCalibration> CalibrateDoubleSparsity(ModelRunner& runner,
                                                      absl::Span<const int32_t> tokens,
                                                      const DsCalibrateOptions& options,
                                                      std::string source) {
  const ModelConfig& c = runner.config();
  const ModelRunnerOptions& ro = runner.options();
  if (tokens.empty()) {
    return absl::InvalidArgumentError("double sparsity calibration: the text has no tokens");
  }
  const int32_t seq = std::min<int32_t>(
      {options.sequence_tokens, ro.max_step_tokens, ro.num_pages * ro.page_size});
  if (seq < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "double sparsity calibration: sequence_tokens (", options.sequence_tokens,
        ") must be positive and the runner must hold a step of tokens"));
  }
  AttentionShape shape;
  shape.num_q_heads = static_cast<int32_t>(c.num_attention_heads);
  shape.num_kv_heads = static_cast<int32_t>(c.num_key_value_heads);
  shape.head_dim = static_cast<int32_t>(c.head_dim);
  SIEVE_ASSIGN_OR_RETURN(RopeTables rope, ComputeRopeTables(RopeParamsFromConfig(c)));
  std::vector<kernels::DsChannelStats> stats;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    stats.emplace_back(options.statistic, shape.num_q_heads, shape.num_kv_heads, shape.head_dim);
  }
  SIEVE_ASSIGN_OR_RETURN(
      std::unique_ptr<ModelWorker> worker,
      runner.CreateWorker({}, std::make_unique<CapturePolicy>(stats, shape, std::move(rope))));
  std::vector<int32_t> pages((seq + ro.page_size - 1) / ro.page_size);
  std::iota(pages.begin(), pages.end(), 0);
  std::vector<float> logits;
  for (size_t begin = 0; begin < tokens.size(); begin += seq) {
    const size_t n = std::min<size_t>(seq, tokens.size() - begin);
    SequenceStep step;
    step.tokens = tokens.subspan(begin, n);
    step.num_cached = 0;
    step.pages = absl::MakeConstSpan(pages).first((n + ro.page_size - 1) / ro.page_size);
    step.want_logits = false;
    SIEVE_RETURN_IF_ERROR(worker->Forward({&step, 1}, logits));
  }
  return DsCalibrationFromStats(stats, shape.num_q_heads, shape.num_kv_heads, std::move(source));
}

}  // namespace sieve::engine
