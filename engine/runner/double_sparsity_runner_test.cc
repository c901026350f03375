// DoubleSparsity labels through the runner with the embedded model: after every append (prefill
// chunks that start mid-page, decode tokens, a recompute on pages that held another sequence)
// each token's labels are its key's outlier channels (SPARSE_ATTENTION 6.5.2); a plan whose
// budget covers the context decodes the same logits as dense attention (6.1.3) and a small
// budget reads a fraction of the keys, all of them under a per-request dense override.
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/attention/double_sparsity_policy.h"
#include "engine/backends/cpu_backend.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "engine/testing/sparse_decode_setup.h"
#include "gtest/gtest.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/double_sparsity_internal.h"

namespace sieve::engine {
namespace {

constexpr int32_t kPage = 16, kChannels = 8;

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

std::unique_ptr<ModelRunner> DsRunner() {
  ModelRunnerOptions o = testing::SparseDecodeRunnerOptions();
  o.ds_label_channels = kChannels;
  auto r = ModelRunner::Load(testing::EmbeddedModelDir(), o);
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return nullptr;
  EXPECT_TRUE((*r)->SetDsCalibration(Calibration()).ok());
  return std::move(*r);
}

std::vector<int32_t> RandomTokens(int n, uint32_t seed, int vocab) {
  return testing::RandomTokens(n, seed, 0, vocab - 1);
}

void Step(ModelWorker& w, const std::vector<int32_t>& tokens, int from, int to,
          const std::vector<int32_t>& pages, bool dense = false,
          std::vector<float>* logits_out = nullptr) {
  ASSERT_TRUE(testing::RunSequenceStep(w, tokens, from, to, pages, dense, logits_out).ok());
}

// Every token of a `len`-token sequence on `pages` has labels equal to its key's channels
// rounded to fp16, in every layer.
void ExpectLabelsExact(const ModelRunner& r, const std::vector<int32_t>& pages, int len,
                       const std::string& what) {
  const auto& cpu = dynamic_cast<const CpuBackend&>(r.backend());
  const DsLabelStore& store = *cpu.ds_labels();
  const kernels::DoubleSparsityShape& sh = store.shape();
  const int64_t page_bytes = kernels::DsLabelPageBytes(sh);
  const int group = sh.num_q_heads / sh.num_kv_heads;
  for (int32_t layer = 0; layer < 4; ++layer) {
    const float* k = cpu.k_cache(layer).data();
    for (int t = 0; t < len; ++t) {
      const int64_t page = pages[t / kPage];
      for (int lh = 0; lh < kernels::DsLabelHeads(sh); ++lh) {
        const float* key = k + kernels::KvRowOffset(cpu.kv_layout(), page, t % kPage, lh / group,
                                                    kPage, sh.num_kv_heads, sh.head_dim);
        for (int c = 0; c < kChannels; ++c) {
          const float want = kernels::F16ToFloat(
              kernels::ds_internal::FloatToF16(key[store.channels(layer)[lh * kChannels + c]]));
          ASSERT_EQ(kernels::DsReadLabel(sh, store.labels(layer) + page * page_bytes, lh, c, t % kPage),
                    want)
              << what << ": layer " << layer << " token " << t << " head " << lh;
        }
      }
    }
  }
}

TEST(DoubleSparsityRunnerTest, LabelsFollowEveryAppend) {
  std::unique_ptr<ModelRunner> r = DsRunner();
  ASSERT_NE(r, nullptr);
  ModelWorker& w = r->default_worker();
  const int vocab = static_cast<int>(r->config().vocab_size);
  const std::vector<int32_t> junk = RandomTokens(80, 1, vocab);
  Step(w, junk, 0, 80, {10, 11, 12, 13, 14});
  const std::vector<int32_t> a = RandomTokens(75, 2, vocab);
  const std::vector<int32_t> pages_a = {30, 31, 32, 33, 34};
  int done = 0;
  for (int chunk : {7, 20, 30, 13}) {  // chunks start at 7, 27, 57: mid-page
    Step(w, a, done, done + chunk, pages_a);
    done += chunk;
    ExpectLabelsExact(*r, pages_a, done, "A chunk to " + std::to_string(done));
  }
  for (; done < 75; ++done) Step(w, a, done, done + 1, pages_a);
  ExpectLabelsExact(*r, pages_a, 75, "A decoded");
  // Recompute on the junk's pages (a preemption that lost A's pages).
  const std::vector<int32_t> pages_a2 = {10, 11, 12, 13, 14};
  Step(w, a, 0, 41, pages_a2);
  Step(w, a, 41, 75, pages_a2);
  ExpectLabelsExact(*r, pages_a2, 75, "A recomputed");
}

// Reads every key through the DoubleSparsity plan (budget >= L: every token as a column).
class AllColumnsPolicy final : public AttentionPolicy {
 public:
  std::string_view method() const override { return "all_columns"; }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    DsPlanOptions o;
    o.token_budget = 1 << 20;
    return step.backend->PlanDsTokens(*step.stream, step.layer, step.q, o, plan);
  }
};

std::vector<float> Decode(ModelRunner& r, std::unique_ptr<AttentionPolicy> policy, bool dense,
                          DecodeAttentionStats* stats) {
  auto w = r.CreateWorker({}, std::move(policy));
  EXPECT_TRUE(w.ok()) << w.status();
  const std::vector<int32_t> t = RandomTokens(301, 9, static_cast<int>(r.config().vocab_size));
  std::vector<int32_t> pages(19);
  std::iota(pages.begin(), pages.end(), 40);
  Step(**w, t, 0, 150, pages);
  Step(**w, t, 150, 300, pages);
  (*w)->TakeDecodeStats();
  std::vector<float> logits;
  Step(**w, t, 300, 301, pages, dense, &logits);
  if (stats != nullptr) *stats = (*w)->TakeDecodeStats();
  return logits;
}

TEST(DoubleSparsityRunnerTest, CoveringPlanEqualsDenseAndSmallBudgetReadsLess) {
  std::unique_ptr<ModelRunner> r = DsRunner();
  ASSERT_NE(r, nullptr);
  const std::vector<float> dense = Decode(*r, nullptr, false, nullptr);
  const std::vector<float> all = Decode(*r, std::make_unique<AllColumnsPolicy>(), false, nullptr);
  ASSERT_EQ(all.size(), dense.size());
  // The same keys in the same order through the sparse path of the fp32 kernel: per-row results
  // differ from the dense path's by fp32 rounding only (relative ~1e-6 per layer, 4 layers);
  // 1e-4 of the logits' range is the golden test's tolerance against transformers.
  double range = 0, err = 0;
  for (size_t i = 0; i < dense.size(); ++i) {
    range = std::max(range, std::abs(double{dense[i]}));
    err = std::max(err, std::abs(double{dense[i]} - all[i]));
  }
  EXPECT_LE(err, 1e-4 * range);
  DecodePolicySettings s;
  s.sparse_min_tokens = 0;
  s.token_budget = 40;
  s.dense_layers = 1;
  s.page_size = kPage;
  DecodeAttentionStats stats;
  auto policy = MakeDoubleSparsityPolicy(s);
  ASSERT_TRUE(policy.ok());
  Decode(*r, std::move(*policy), false, &stats);
  ASSERT_GT(stats.dense_pairs, 0);
  // Layers 1-3 read 40 of 301 keys per head, layer 0 all: (301 + 3 * 40) / (4 * 301) = 0.35.
  EXPECT_NEAR(static_cast<double>(stats.read_pairs) / stats.dense_pairs, (301.0 + 120) / 1204, 1e-9);
  auto again = MakeDoubleSparsityPolicy(s);
  Decode(*r, std::move(*again), /*dense=*/true, &stats);
  EXPECT_EQ(stats.read_pairs, stats.dense_pairs);
}

}  // namespace
}  // namespace sieve::engine
