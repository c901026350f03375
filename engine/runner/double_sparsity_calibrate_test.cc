// DoubleSparsity calibration on the embedded model: the bundled calibration text gives a valid
// calibration of the model's shape over every token; the host RoPE the qk statistic applies
// reproduces the backend's rotated queries; the ranking is stable in the sense that the same text
// twice gives the same file (deterministic), and different statistics rank differently.
#include "engine/runner/double_sparsity_calibrate.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "engine/model/rope.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/cpu/ops.h"

namespace sieve::engine {
namespace {

std::string EmbeddedDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

ModelRunnerOptions SmallOptions() {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.page_size = 16;
  o.num_pages = 32;
  o.max_step_tokens = 512;
  o.max_step_logits = 8;
  o.num_threads = 2;
  return o;
}

std::vector<int32_t> BundledTokens() {
  std::ifstream in(EmbeddedDir() + "/calibration.txt");
  std::stringstream text;
  text << in.rdbuf();
  auto tok = Tokenizer::FromDirectory(EmbeddedDir());
  EXPECT_TRUE(tok.ok()) << tok.status();
  auto ids = (*tok)->Encode(text.str(), false);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return *ids;
}

TEST(DsCalibrateTest, CalibratesTheEmbeddedModelOnItsBundledText) {
  auto runner = ModelRunner::Load(EmbeddedDir(), SmallOptions());
  ASSERT_TRUE(runner.ok()) << runner.status();
  const std::vector<int32_t> tokens = BundledTokens();
  ASSERT_GT(tokens.size(), 1000u);  // more than one 512-token sequence
  DsCalibrateOptions o;
  o.sequence_tokens = 512;
  auto qk = CalibrateDoubleSparsity(**runner, tokens, o, "test");
  ASSERT_TRUE(qk.ok()) << qk.status();
  EXPECT_EQ(qk->calibration_tokens, static_cast<int64_t>(tokens.size()));
  ASSERT_TRUE(CheckDsCalibrationFits(*qk, 4, 4, 2, 64).ok());
  // The file round-trips and the means are real statistics: positive, not all equal.
  auto back = ParseDsCalibration(DsCalibrationToJson(*qk), "mem");
  ASSERT_TRUE(back.ok()) << back.status();
  for (int l = 0; l < 4; ++l) {
    for (int h = 0; h < 4; ++h) {
      const std::vector<double>& m = qk->means[l][h];
      const std::vector<int32_t>& ch = qk->channels[l][h];
      EXPECT_GT(m[ch.front()], 2.0 * m[ch.back()]) << "layer " << l << " head " << h;
      EXPECT_GT(m[ch.back()], 0.0);
    }
  }
  auto again = CalibrateDoubleSparsity(**runner, tokens, o, "test");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->means, qk->means);
  o.statistic = kernels::DsStatistic::kK;
  auto k = CalibrateDoubleSparsity(**runner, tokens, o, "test");
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->heads(), 2);
  EXPECT_NE(k->channels[0][0], qk->channels[0][0]);
}

// The capture's host RoPE (kernels::RopeRef with the model's tables) equals the rotation the
// backend applied to the queries it attends with (step.q): within fp32 rounding of the same
// formula (the CPU backend runs RopeRef too, so it is exact there).
class CheckRopePolicy final : public AttentionPolicy {
 public:
  explicit CheckRopePolicy(RopeTables rope) : rope_(std::move(rope)) {}
  std::string_view method() const override { return "check"; }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    plan.SetDense();
    const int64_t n = step.layout->num_tokens(), d = step.shape.head_dim;
    const int64_t hq = step.shape.num_q_heads, cols = step.qkv.cols;
    std::vector<float> qkv(n * cols), q(n * hq * d), mine(n * hq * d);
    if (auto s = step.backend->CopyToHost(*step.stream, step.qkv.FirstRows(n), absl::MakeSpan(qkv)); !s.ok()) return s;
    if (auto s = step.backend->CopyToHost(*step.stream, step.q.FirstRows(n), absl::MakeSpan(q)); !s.ok()) return s;
    for (int64_t t = 0; t < n; ++t) std::copy_n(qkv.begin() + t * cols, hq * d, mine.begin() + t * hq * d);
    kernels::RopeRef(mine.data(), step.layout->positions.data(), n, hq, d, rope_.inv_freq.data(),
                     static_cast<int64_t>(rope_.inv_freq.size()), rope_.attention_scaling);
    for (size_t i = 0; i < q.size(); ++i) max_err = std::max(max_err, std::abs(double{q[i]} - mine[i]));
    ++calls;
    return absl::OkStatus();
  }
  double max_err = 0;
  int calls = 0;

 private:
  RopeTables rope_;
};

TEST(DsCalibrateTest, HostRopeMatchesTheBackend) {
  auto runner = ModelRunner::Load(EmbeddedDir(), SmallOptions());
  ASSERT_TRUE(runner.ok()) << runner.status();
  auto rope = ComputeRopeTables(RopeParamsFromConfig((*runner)->config()));
  ASSERT_TRUE(rope.ok());
  auto policy = std::make_unique<CheckRopePolicy>(*rope);
  CheckRopePolicy* check = policy.get();
  auto worker = (*runner)->CreateWorker({}, std::move(policy));
  ASSERT_TRUE(worker.ok()) << worker.status();
  const std::vector<int32_t> tokens = BundledTokens();
  std::vector<int32_t> pages(8);
  for (int i = 0; i < 8; ++i) pages[i] = i;
  SequenceStep step;
  step.tokens = absl::MakeConstSpan(tokens).subspan(0, 100);
  step.pages = pages;
  std::vector<float> logits;
  ASSERT_TRUE((*worker)->Forward({&step, 1}, logits).ok());
  EXPECT_EQ(check->calls, 4);
  EXPECT_EQ(check->max_err, 0.0);
}

}  // namespace
}  // namespace sieve::engine
