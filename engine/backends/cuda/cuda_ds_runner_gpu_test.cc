// DoubleSparsity through the model runner and the engine on the cuda backend (label `gpu`), with
// the embedded model: a plan whose budget covers the context decodes the same logits as dense
// attention (SPARSE_ATTENTION 6.1.3), and the double_sparsity policy with a small budget reads the
// fraction of the keys its plan lists, all of them under a per-request dense override; the engine
// (start-up calibration on the device, the label side pool) decodes with a covering budget like
// dense and with a small one to the end reading a fraction of the KV. The CPU twins are
// engine/runner/double_sparsity_runner_test.cc and engine/serving/double_sparsity_engine_test.cc.
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/attention/double_sparsity_policy.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine.h"
#include "engine/serving/engine_config.h"
#include "engine/testing/sparse_decode_setup.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

constexpr int32_t kPage = 16, kChannels = 8;

// Random channel rankings for the embedded model's shape (4 layers, 4 query heads, d 64).
DsCalibration Calibration() {
  DsCalibration cal;
  cal.statistic = kernels::DsStatistic::kQK;
  cal.num_layers = 4;
  cal.num_q_heads = 4;
  cal.num_kv_heads = 2;
  cal.head_dim = 64;
  cal.calibration_tokens = 1;
  std::mt19937 rng(4);
  for (int l = 0; l < 4; ++l) {
    cal.channels.emplace_back();
    cal.means.emplace_back();
    for (int h = 0; h < 4; ++h) {
      std::vector<int32_t> perm(64);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      cal.channels.back().push_back(perm);
      cal.means.back().push_back(std::vector<double>(64, 1.0));
    }
  }
  return cal;
}

std::unique_ptr<ModelRunner> DsRunner(int label_bits) {
  ModelRunnerOptions o = testing::SparseDecodeRunnerOptions();
  o.backend = "cuda";
  o.ds_label_channels = kChannels;
  o.ds_label_bits = label_bits;
  auto r = ModelRunner::Load(testing::EmbeddedModelDir(), o);
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return nullptr;
  EXPECT_TRUE((*r)->SetDsCalibration(Calibration()).ok());
  return std::move(*r);
}

// Reads every key of a decode step through the DoubleSparsity plan (budget >= L: every token as
// a column); prefill steps are dense (the cuda backend's sparse prefill runs XAttention's plans
// only, and the DoubleSparsity policy plans prefill dense too).
class AllColumnsPolicy final : public AttentionPolicy {
 public:
  std::string_view method() const override { return "all_columns"; }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    const BatchLayout& l = *step.layout;
    for (int32_t i = 0; i < l.num_seqs(); ++i) {
      if (l.query_start[i + 1] - l.query_start[i] != 1) {
        plan.SetDense();
        return absl::OkStatus();
      }
    }
    DsPlanOptions o;
    o.token_budget = 1 << 20;
    return step.backend->PlanDsTokens(*step.stream, step.layer, step.q, o, plan);
  }
};

std::vector<float> Decode(ModelRunner& r, std::unique_ptr<AttentionPolicy> policy, bool dense,
                          DecodeAttentionStats* stats) {
  auto w = r.CreateWorker({}, std::move(policy));
  EXPECT_TRUE(w.ok()) << w.status();
  if (!w.ok()) return {};
  const std::vector<int32_t> t =
      testing::RandomTokens(301, 9, 0, static_cast<int>(r.config().vocab_size) - 1);
  std::vector<int32_t> pages(19);
  std::iota(pages.begin(), pages.end(), 40);
  EXPECT_TRUE(testing::RunSequenceStep(**w, t, 0, 150, pages).ok());
  EXPECT_TRUE(testing::RunSequenceStep(**w, t, 150, 300, pages).ok());
  (*w)->TakeDecodeStats();
  std::vector<float> logits;
  const absl::Status st = testing::RunSequenceStep(**w, t, 300, 301, pages, dense, &logits);
  EXPECT_TRUE(st.ok()) << st;
  if (stats != nullptr) *stats = (*w)->TakeDecodeStats();
  return logits;
}

class CudaDsRunnerTest : public ::testing::TestWithParam<int> {};

TEST_P(CudaDsRunnerTest, CoveringPlanEqualsDenseAndSmallBudgetReadsLess) {
  std::unique_ptr<ModelRunner> r = DsRunner(GetParam());
  ASSERT_NE(r, nullptr);
  const std::vector<float> dense = Decode(*r, nullptr, false, nullptr);
  const std::vector<float> all = Decode(*r, std::make_unique<AllColumnsPolicy>(), false, nullptr);
  ASSERT_EQ(all.size(), dense.size());
  ASSERT_FALSE(dense.empty());
  // Exact: the covering plan lists every token in order, the same for every head of a group, so
  // the token-list decode runs the dense decode kernel's arithmetic over the same rows with the
  // same split (PagedDecodeTokenRun: one-token pages, heads_per_block = the group, the same
  // Plan() inputs) and every layer's attention output is the same bits.
  size_t differ = 0;
  for (size_t i = 0; i < dense.size(); ++i) differ += dense[i] != all[i];
  EXPECT_EQ(differ, 0u) << "of " << dense.size() << " logits";
  DecodePolicySettings s;
  s.sparse_min_tokens = 0;
  s.token_budget = 40;
  s.dense_layers = 1;
  s.page_size = kPage;
  DecodeAttentionStats stats;
  auto policy = MakeDoubleSparsityPolicy(s);
  ASSERT_TRUE(policy.ok());
  const std::vector<float> sparse = Decode(*r, std::move(*policy), false, &stats);
  ASSERT_EQ(sparse.size(), dense.size());
  for (float x : sparse) ASSERT_TRUE(std::isfinite(x));
  ASSERT_GT(stats.dense_pairs, 0);
  // Layers 1-3 read 40 of 301 keys per head, layer 0 all: (301 + 3 * 40) / (4 * 301) = 0.35.
  EXPECT_NEAR(static_cast<double>(stats.read_pairs) / stats.dense_pairs, (301.0 + 120) / 1204, 1e-9);
  auto again = MakeDoubleSparsityPolicy(s);
  ASSERT_TRUE(again.ok());
  Decode(*r, std::move(*again), /*dense=*/true, &stats);
  EXPECT_EQ(stats.read_pairs, stats.dense_pairs);
}

INSTANTIATE_TEST_SUITE_P(LabelBits, CudaDsRunnerTest, ::testing::Values(16, 4));

EngineConfig CudaConfig(const std::string& method, int32_t budget) {
  EngineConfig c = testing::SparseDecodeEngineConfig(method, budget);
  c.model.backend = "cuda";
  return c;
}

// The prompts of these tests: n tokens in [10, 200].
std::vector<int32_t> Prompt(int n) { return testing::RandomTokens(n, 5, 10, 200); }

// A budget covering the context plans dense attention (L <= k, 4.8): the same greedy tokens as
// dense decoding, with the labels written on every append and calibrated at start-up on the
// device.
TEST(CudaDsEngineTest, CoveringBudgetDecodesLikeDense) {
  const std::vector<int32_t> prompt = Prompt(350);
  const std::vector<int32_t> dense = testing::GenerateGreedy(CudaConfig("dense", 4096), prompt, 24);
  ASSERT_EQ(dense.size(), 24u);
  EXPECT_EQ(testing::GenerateGreedy(CudaConfig("double_sparsity", 4096), prompt, 24), dense);
}

TEST(CudaDsEngineTest, SmallBudgetReadsAFraction) {
  for (bool per_kv_head : {false, true}) {
    EngineConfig c = CudaConfig("double_sparsity", 48);
    c.attention.decode.double_sparsity.channels = 8;
    c.attention.decode.double_sparsity.per_kv_head = per_kv_head;
    c.attention.decode.double_sparsity.label_bits = per_kv_head ? 4 : 16;
    testing::DecodeStatsObserver observer;
    EXPECT_EQ(testing::GenerateGreedy(c, Prompt(400), 16, &observer).size(), 16u);
    std::lock_guard<std::mutex> lock(observer.mu);
    ASSERT_FALSE(observer.fractions.empty());
    // 3 of 4 layers read 48 of ~400 keys per head: well below 1 (1 dense layer of 4).
    for (double f : observer.fractions) EXPECT_LT(f, 0.5) << "per_kv_head " << per_kv_head;
  }
}

}  // namespace
}  // namespace sieve::engine
