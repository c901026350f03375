// XAttentionPolicy on the CPU backend with the embedded model: a threshold above 1 attends every
// causal key (the dense logits within fp32 tolerance), 0.9 skips blocks, chunked prefill aligned
// to blocks selects what the unchunked prefill selects, a chunk that starts inside a block (a
// prefix-cache hit) plans validly, and threshold files are parsed and checked, errors naming the
// key.
#include "engine/attention/xattention_policy.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

std::string EmbeddedDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

PrefillAttentionConfig SmallBlocks(double tau) {
  PrefillAttentionConfig c;
  c.method = "xattention";
  c.sparse_min_tokens = 0;
  c.xattention.stride = 8;
  c.xattention.block_size = 64;
  c.xattention.threshold = tau;
  return c;
}

// Delegates to an XAttentionPolicy and records, per (layer, absolute query block, head), the
// key blocks of the sparse plans of sequence 0 (plans here have one sequence).
class Recorder final : public AttentionPolicy {
 public:
  explicit Recorder(const PrefillAttentionConfig& c) : inner_(c, {}) {}
  std::string_view method() const override { return inner_.method(); }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    absl::Status s = inner_.Plan(step, plan);
    if (!s.ok() || plan.dense) return s;
    const BatchLayout& l = *step.layout;
    const int32_t first = l.kv_lens[0] - (l.query_start[1] - l.query_start[0]);
    for (int32_t b = 0; b < plan.query_block_start[1]; ++b) {
      for (int32_t h = 0; h < step.shape.num_q_heads; ++h) {
        const int64_t r = int64_t{b} * step.shape.num_q_heads + h;
        const int32_t block = (first + b * plan.query_block) / plan.query_block;
        rows[{step.layer, block, h}] = std::vector<int32_t>(
            plan.key_blocks.begin() + plan.row_start[r], plan.key_blocks.begin() + plan.row_start[r + 1]);
      }
    }
    return s;
  }
  std::map<std::tuple<int32_t, int32_t, int32_t>, std::vector<int32_t>> rows;

 private:
  XAttentionPolicy inner_;
};

class XAttentionPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
    o.num_threads = 2;
    o.num_pages = 128;
    o.max_step_tokens = 640;
    o.max_step_logits = 4;
    auto runner = ModelRunner::Load(EmbeddedDir(), o);
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = std::move(*runner);
    tokens_.resize(640);
    for (int i = 0; i < 640; ++i) tokens_[i] = (i * 131 + 17) % 4096;
    for (int i = 0; i < 40; ++i) pages_.push_back(i);
  }

  // The logits after prefilling tokens_[0, n) in chunks of `chunk` (from position `start`, the
  // tokens before it computed densely first, as a prefix-cache hit would have left them).
  std::vector<float> Prefill(ModelWorker& w, int n, int chunk, int start = 0) {
    std::vector<float> logits;
    if (start > 0) {
      auto dense = runner_->CreateWorker();
      EXPECT_TRUE(dense.ok());
      SequenceStep s{absl::MakeConstSpan(tokens_).subspan(0, start), 0, pages_, false};
      EXPECT_TRUE((*dense)->Forward({s}, logits).ok());
    }
    for (int at = start; at < n; at += chunk) {
      const int len = std::min(chunk, n - at);
      SequenceStep s{absl::MakeConstSpan(tokens_).subspan(at, len), at, pages_, at + len == n};
      const absl::Status st = w.Forward({s}, logits);
      EXPECT_TRUE(st.ok()) << st;
    }
    return logits;
  }

  std::unique_ptr<ModelRunner> runner_;
  std::vector<int32_t> tokens_;
  std::vector<int32_t> pages_;
};

TEST_F(XAttentionPolicyTest, ThresholdAboveOneIsDense) {
  auto dense = runner_->CreateWorker();
  ASSERT_TRUE(dense.ok());
  const std::vector<float> want = Prefill(**dense, 600, 600);
  AttentionConfig config;
  config.prefill = SmallBlocks(1.01);
  auto policy = MakeAttentionPolicy(config, AttentionPhase::kPrefill);
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_EQ((*policy)->method(), "xattention");
  auto all = runner_->CreateWorker({}, std::move(*policy));
  ASSERT_TRUE(all.ok());
  const std::vector<float> got = Prefill(**all, 600, 600);
  const PrefillAttentionStats stats = (*all)->TakePrefillStats();
  EXPECT_EQ(stats.read_pairs, stats.dense_pairs);
  EXPECT_EQ(stats.sparse_layers, 4);
  // The same keys in another summation order than the dense kernel's (see
  // sparse_prefill_policy_test.cc for the bound: fp32 reassociation over <= 600 terms, 4e-5
  // relative per output, amplified far less than 10x by four layers).
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 4e-4 * (1 + std::abs(want[i]))) << i;
  }
}

TEST_F(XAttentionPolicyTest, SkipsBlocksAndChunksAlignedToBlocksSelectAlike) {
  auto whole_policy = std::make_unique<Recorder>(SmallBlocks(0.9));
  Recorder* whole = whole_policy.get();
  auto w1 = runner_->CreateWorker({}, std::move(whole_policy));
  ASSERT_TRUE(w1.ok());
  const std::vector<float> logits = Prefill(**w1, 640, 640);
  const PrefillAttentionStats stats = (*w1)->TakePrefillStats();
  EXPECT_LT(stats.density(), 1.0);
  EXPECT_GT(stats.density(), 0.0);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));

  auto chunked_policy = std::make_unique<Recorder>(SmallBlocks(0.9));
  Recorder* chunked = chunked_policy.get();
  auto w2 = runner_->CreateWorker({}, std::move(chunked_policy));
  ASSERT_TRUE(w2.ok());
  Prefill(**w2, 640, 192);  // chunks of 3 blocks: every chunk starts at a block boundary
  ASSERT_EQ(whole->rows.size(), chunked->rows.size());
  int differ = 0;
  for (const auto& [key, blocks] : whole->rows) {
    auto it = chunked->rows.find(key);
    ASSERT_NE(it, chunked->rows.end());
    differ += it->second != blocks;
  }
  EXPECT_EQ(differ, 0);
}

TEST_F(XAttentionPolicyTest, ChunkStartingInsideABlockPlansTheUnionOfItsBlocks) {
  auto policy = std::make_unique<Recorder>(SmallBlocks(0.9));
  Recorder* rec = policy.get();
  auto w = runner_->CreateWorker({}, std::move(policy));
  ASSERT_TRUE(w.ok());
  // 100 tokens cached (as after a prefix-cache hit), then chunks of 200 from position 100.
  const std::vector<float> logits = Prefill(**w, 600, 200, 100);
  ASSERT_FALSE(logits.empty());
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  EXPECT_LT((*w)->TakePrefillStats().density(), 1.0);
  for (const auto& [key, blocks] : rec->rows) {
    ASSERT_FALSE(blocks.empty());
    EXPECT_EQ(blocks.front(), 0);  // the first block is always read
  }
}

TEST(XAttentionThresholdsTest, ParsesAndChecksTables) {
  const AttentionModelShape model{.num_layers = 2, .num_q_heads = 4};
  auto ok = ParseXAttentionThresholds(R"({"thresholds": [[0.8], [0.9, 0.5, 0.95, 1.2]]})", "f",
                                      model);
  ASSERT_TRUE(ok.ok()) << ok.status();
  XAttentionPolicy policy(PrefillAttentionConfig(), *ok);
  EXPECT_EQ(policy.Threshold(0, 3), 0.8);
  EXPECT_EQ(policy.Threshold(1, 1), 0.5);
  EXPECT_EQ(policy.Threshold(1, 3), 1.2);
  EXPECT_THAT(ParseXAttentionThresholds("{", "f", model).status().message(),
              HasSubstr("f: not valid JSON"));
  EXPECT_THAT(ParseXAttentionThresholds(R"({"thresholds": [[0.8]]})", "f", model)
                  .status().message(),
              HasSubstr("has 1 layers; the model has 2"));
  EXPECT_THAT(ParseXAttentionThresholds(R"({"thresholds": [[0.8], [0.9, 0.5]]})", "f", model)
                  .status().message(),
              HasSubstr("layer 1 has 2 thresholds; give 1 or 4"));
  EXPECT_THAT(ParseXAttentionThresholds(R"({"thresholds": [[0.8], ["x"]]})", "f", model)
                  .status().message(),
              HasSubstr("not a number in [-1, 2]"));

  AttentionConfig config;
  config.prefill.method = "xattention";
  config.prefill.xattention.threshold_file = "/nonexistent/thresholds.json";
  auto missing = MakeAttentionPolicy(config, AttentionPhase::kPrefill, model);
  EXPECT_THAT(missing.status().message(),
              HasSubstr("attention.prefill.xattention.threshold_file '/nonexistent/"
                        "thresholds.json': cannot be read"));
  const std::string path = ::testing::TempDir() + "/xattention_thresholds.json";
  std::ofstream(path) << R"({"thresholds": [[0.7, 0.7, 0.7, 0.7], [0.6]]})";
  config.prefill.xattention.threshold_file = path;
  auto made = MakeAttentionPolicy(config, AttentionPhase::kPrefill, model);
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_EQ(static_cast<XAttentionPolicy&>(**made).Threshold(1, 2), 0.6);
  config.prefill.xattention.stride = 5;
  EXPECT_THAT(MakeAttentionPolicy(config, AttentionPhase::kPrefill, model).status().message(),
              HasSubstr("attention.prefill.xattention.stride must be 4, 8 or 16"));
}

}  // namespace
}  // namespace sieve::engine
