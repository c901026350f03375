// SparsePrefillPolicy, the part every sparse prefill method shares: which sequences and layers
// run sparse (dense_layers, sparse_min_tokens, a request's dense override, decode tokens), the
// rows it assembles (dense sequences list every causal block), and a ModelWorker's density and
// index-time counters.
#include "engine/attention/sparse_prefill_policy.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

std::string EmbeddedDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

// A sparse method for tests: query and key blocks of 16; every row keeps key block 0 and the
// blocks its queries sit in (the forced blocks of a block-threshold method), or every causal
// block when `keep_all`.
class DiagonalPolicy final : public SparsePrefillPolicy {
 public:
  DiagonalPolicy(const PrefillAttentionConfig& c, bool keep_all)
      : SparsePrefillPolicy(c), keep_all_(keep_all) {}
  std::string_view method() const override { return "test-diagonal"; }
  int sparse_calls = 0;

 protected:
  int32_t query_block() const override { return 16; }
  int32_t key_block() const override { return 16; }
  absl::Status PlanSequence(const AttentionStep& step, int32_t seq, PlanRowWriter& rows) override {
    ++sparse_calls;
    const BatchLayout& l = *step.layout;
    const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
    const int32_t first = l.kv_lens[seq] - q_len;
    for (int32_t b = 0; b * 16 < q_len; ++b) {
      const int32_t lo = (first + b * 16) / 16, hi = (first + std::min(q_len, b * 16 + 16) - 1) / 16;
      std::vector<int32_t> blocks;
      for (int32_t j = 0; j <= hi; ++j) {
        if (keep_all_ || j == 0 || j >= lo) blocks.push_back(j);
      }
      for (int32_t h = 0; h < step.shape.num_q_heads; ++h) rows.AddRow(blocks);
    }
    return absl::OkStatus();
  }

 private:
  bool keep_all_;
};

// Two prefill chunks and a decode token: 64 queries after 64 cached, 40 new, 1 after 99.
BatchLayout ThreeSequences() {
  BatchLayout l;
  l.query_start = {0, 64, 104, 105};
  l.kv_lens = {128, 40, 100};
  for (int p = 64; p < 128; ++p) l.positions.push_back(p);
  for (int p = 0; p < 40; ++p) l.positions.push_back(p);
  l.positions.push_back(99);
  l.slots.assign(l.positions.size(), 0);
  l.page_table_stride = 8;
  l.page_table.assign(24, 0);
  return l;
}

TEST(SparsePrefillPolicyTest, ChoosesSparseSequencesAndLayers) {
  PrefillAttentionConfig c;
  c.sparse_min_tokens = 50;
  c.dense_layers = 1;
  DiagonalPolicy policy(c, false);
  const BatchLayout l = ThreeSequences();
  AttentionStep step{.layer = 1, .layout = &l, .shape = {4, 2, 8}};
  EXPECT_TRUE(policy.SequenceIsSparse(step, 0));
  EXPECT_FALSE(policy.SequenceIsSparse(step, 1));  // 40 KV tokens <= 50
  EXPECT_FALSE(policy.SequenceIsSparse(step, 2));  // one query (decode)
  const std::vector<uint8_t> dense = {1, 0, 0};
  AttentionStep forced = step;
  forced.dense_prefill = dense;
  EXPECT_FALSE(policy.SequenceIsSparse(forced, 0));
  AttentionStep first_layer = step;
  first_layer.layer = 0;
  EXPECT_FALSE(policy.SequenceIsSparse(first_layer, 0));

  AttentionPlan plan;
  ASSERT_TRUE(policy.Plan(first_layer, plan).ok());
  EXPECT_TRUE(plan.dense);
  ASSERT_TRUE(policy.Plan(forced, plan).ok());
  EXPECT_TRUE(plan.dense);
  EXPECT_EQ(policy.sparse_calls, 0);

  ASSERT_TRUE(policy.Plan(step, plan).ok());
  EXPECT_EQ(policy.sparse_calls, 1);
  ASSERT_FALSE(plan.dense);
  ASSERT_TRUE(plan.Validate(l, 4).ok()) << plan.Validate(l, 4);
  EXPECT_EQ(plan.query_block_start, (std::vector<int32_t>{0, 4, 7, 8}));
  EXPECT_TRUE(plan.column_start.empty());
  // Sequence 0, query block 2 (positions 96..111), head 3: blocks 0 and 6.
  const int32_t r = 2 * 4 + 3;
  EXPECT_EQ(std::vector<int32_t>(plan.key_blocks.begin() + plan.row_start[r],
                                 plan.key_blocks.begin() + plan.row_start[r + 1]),
            (std::vector<int32_t>{0, 6}));
  // The dense sequences read exactly their causal keys.
  BatchLayout only_dense = l;
  int64_t sparse_pairs = 0;
  {
    // Sequence 0 alone: blocks 0 and its own.
    for (int q = 64; q < 128; ++q) sparse_pairs += 16 + (q % 16) + 1;
  }
  const int64_t dense_rest = 4 * ((40 * 41) / 2 + 100);
  EXPECT_EQ(plan.ReadPairs(l, 4), 4 * sparse_pairs + dense_rest);
}

// max_density: a plan whose sparse sequences read more than that fraction of their causal pairs
// is made dense. Sequence 0 reads 1,568 of its 6,176 pairs per head (0.254); with the dense
// sequences 1 and 2 counted the plan would read 0.35, so 0.3 keeps it sparse only if they are
// left out, as they must be (they are dense whatever the method does).
TEST(SparsePrefillPolicyTest, PlansDenserThanMaxDensityRunDense) {
  const BatchLayout l = ThreeSequences();
  AttentionStep step{.layer = 1, .layout = &l, .shape = {4, 2, 8}};
  PrefillAttentionConfig c;
  c.sparse_min_tokens = 50;
  AttentionPlan plan;
  for (const auto& [max_density, want_dense] :
       std::vector<std::pair<double, bool>>{{0.0, false}, {1.0, false}, {0.3, false},
                                            {0.26, false}, {0.25, true}, {0.05, true}}) {
    c.max_density = max_density;
    DiagonalPolicy policy(c, false);
    ASSERT_TRUE(policy.Plan(step, plan).ok());
    EXPECT_EQ(policy.sparse_calls, 1) << max_density;  // the estimate runs either way
    EXPECT_EQ(plan.dense, want_dense) << max_density;
    EXPECT_EQ(policy.dense_fallbacks(), want_dense ? 1 : 0) << max_density;
    if (!want_dense) {
      EXPECT_EQ(plan.ReadPairs(l, 4), 4 * (1568 + (40 * 41) / 2 + 100)) << max_density;
      // The check counted the plan once and kept the count (the runner's stats reuse it); with
      // max_density 0 or 1 nothing was counted. Either way the count is the plan's own.
      const int64_t counted = plan.counted_pairs;
      plan.counted_pairs = -1;
      EXPECT_EQ(counted, max_density > 0 && max_density < 1 ? plan.ReadPairs(l, 4) : -1)
          << max_density;
    } else {
      EXPECT_EQ(plan.counted_pairs, -1) << max_density;  // SetDense
    }
  }
  // Every block kept: density 1, dense below 1.
  c.max_density = 0.9;
  DiagonalPolicy all(c, true);
  ASSERT_TRUE(all.Plan(step, plan).ok());
  EXPECT_TRUE(plan.dense);
  EXPECT_EQ(all.dense_fallbacks(), 1);
  // Out of range: the key named.
  std::vector<std::string> errors;
  c.max_density = 1.5;
  c.Validate(errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("attention.prefill.max_density"), std::string::npos) << errors[0];
}

// A method whose backend keeps the plan on the device (as the CUDA backend's MInference index
// does for a step of one sequence): it reports `pairs` read.
class OnDevicePolicy final : public SparsePrefillPolicy {
 public:
  OnDevicePolicy(const PrefillAttentionConfig& c, int64_t pairs)
      : SparsePrefillPolicy(c), pairs_(pairs) {}
  std::string_view method() const override { return "test-on-device"; }
  int device_calls = 0, host_calls = 0;

 protected:
  int32_t query_block() const override { return 16; }
  int32_t key_block() const override { return 16; }
  absl::StatusOr<bool> PlanOnDevice(const AttentionStep& step, AttentionPlan& plan) override {
    ++device_calls;
    plan.dense = false;
    plan.on_device = true;
    plan.on_device_pairs = pairs_;
    plan.query_block = plan.key_block = 16;
    const BatchLayout& l = *step.layout;
    plan.query_block_start = {0, (l.query_start[1] + 15) / 16};
    return true;
  }
  absl::Status PlanSequence(const AttentionStep& step, int32_t seq, PlanRowWriter& rows) override {
    ++host_calls;
    const BatchLayout& l = *step.layout;
    const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
    for (int32_t b = 0; b * 16 < q_len; ++b) {
      for (int32_t h = 0; h < step.shape.num_q_heads; ++h) rows.AddRow(std::vector<int32_t>{0});
    }
    return absl::OkStatus();
  }

 private:
  int64_t pairs_;
};

// A step of one sparse sequence asks the method for an on-device plan; max_density judges its
// device-counted pairs (sequence 0 alone: 6,176 causal pairs per head, 24,704 over 4 heads). A
// step of several sequences builds its rows on the host.
TEST(SparsePrefillPolicyTest, OneSequenceStepsMayKeepThePlanOnTheDevice) {
  BatchLayout one;
  one.query_start = {0, 64};
  one.kv_lens = {128};
  for (int p = 64; p < 128; ++p) one.positions.push_back(p);
  one.slots.assign(64, 0);
  one.page_table_stride = 8;
  one.page_table.assign(8, 0);
  AttentionStep step{.layer = 1, .layout = &one, .shape = {4, 2, 8}};
  ASSERT_EQ(SequenceDensePairs(one, 0, 4), 24704);
  PrefillAttentionConfig c;
  c.sparse_min_tokens = 50;
  c.max_density = 0.5;
  AttentionPlan plan;
  for (const auto& [pairs, want_dense] :
       std::vector<std::pair<int64_t, bool>>{{12352, false}, {12353, true}}) {
    OnDevicePolicy policy(c, pairs);
    ASSERT_TRUE(policy.Plan(step, plan).ok());
    EXPECT_EQ(policy.device_calls, 1);
    EXPECT_EQ(policy.host_calls, 0);
    EXPECT_EQ(plan.dense, want_dense) << pairs;
    EXPECT_EQ(plan.on_device, !want_dense) << pairs;
    EXPECT_EQ(policy.dense_fallbacks(), want_dense ? 1 : 0) << pairs;
    if (!want_dense) {
      EXPECT_TRUE(plan.Validate(one, 4).ok()) << plan.Validate(one, 4);
      EXPECT_EQ(plan.ReadPairs(one, 4), pairs);
      EXPECT_EQ(plan.counted_pairs, pairs);
    }
  }
  const BatchLayout three = ThreeSequences();
  AttentionStep several{.layer = 1, .layout = &three, .shape = {4, 2, 8}};
  OnDevicePolicy policy(c, 1);
  ASSERT_TRUE(policy.Plan(several, plan).ok());
  EXPECT_EQ(policy.device_calls, 0);
  EXPECT_EQ(policy.host_calls, 1);
  EXPECT_FALSE(plan.on_device);
  EXPECT_FALSE(plan.dense);
}

TEST(SparsePrefillPolicyTest, WorkerCountsDensityAndKeepsDenseLogitsWhenEverythingIsKept) {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.num_threads = 1;
  o.num_pages = 16;
  o.max_step_tokens = 128;
  o.max_step_logits = 4;
  auto runner = ModelRunner::Load(EmbeddedDir(), o);
  ASSERT_TRUE(runner.ok()) << runner.status();
  PrefillAttentionConfig c;
  c.sparse_min_tokens = 32;
  std::vector<int32_t> tokens(100);
  for (int i = 0; i < 100; ++i) tokens[i] = (i * 53 + 7) % 4096;
  std::vector<int32_t> pages(7);
  for (int i = 0; i < 7; ++i) pages[i] = i;
  auto run = [&](ModelWorker& w, bool dense_request) {
    std::vector<float> logits;
    SequenceStep s{tokens, 0, pages, true};
    s.dense_prefill = dense_request;
    EXPECT_TRUE(w.Forward({s}, logits).ok());
    return logits;
  };
  auto dense = (*runner)->CreateWorker();
  ASSERT_TRUE(dense.ok());
  const std::vector<float> want = run(**dense, false);
  EXPECT_EQ((*dense)->TakePrefillStats().dense_pairs, 0);  // a dense policy counts nothing

  auto all = (*runner)->CreateWorker({}, std::make_unique<DiagonalPolicy>(c, true));
  ASSERT_TRUE(all.ok());
  // Every block: the same keys, but the sparse kernel sums them per head in another order than the
  // dense kernel's grouped pass. fp32 reassociation over <= 100 terms errs by <= ~100 * 2^-24 =
  // 6e-6 relative per attention output; four layers of norms and projections amplify that by
  // far less than 10x, so 1e-4 relative (plus 1e-4 absolute near zero) bounds it.
  const std::vector<float> kept = run(**all, false);
  ASSERT_EQ(kept.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(kept[i], want[i], 1e-4 * (1 + std::abs(want[i]))) << i;
  }
  PrefillAttentionStats stats = (*all)->TakePrefillStats();
  EXPECT_EQ(stats.sparse_layers, 4);
  EXPECT_EQ(stats.read_pairs, stats.dense_pairs);
  EXPECT_EQ(stats.dense_pairs, int64_t{4} * 4 * 100 * 101 / 2);  // 4 layers, 4 heads
  EXPECT_GE(stats.plan_seconds, 0);
  EXPECT_EQ((*all)->TakePrefillStats().dense_pairs, 0);  // taken

  auto diag = (*runner)->CreateWorker({}, std::make_unique<DiagonalPolicy>(c, false));
  ASSERT_TRUE(diag.ok());
  const std::vector<float> sparse = run(**diag, false);
  stats = (*diag)->TakePrefillStats();
  EXPECT_LT(stats.density(), 0.8);
  EXPECT_GT(stats.density(), 0.2);
  EXPECT_NE(sparse, want);
  // The request asks for dense: the dense logits, density 1, no sparse layer.
  EXPECT_EQ(run(**diag, true), want);
  stats = (*diag)->TakePrefillStats();
  EXPECT_EQ(stats.density(), 1.0);
  EXPECT_EQ(stats.sparse_layers, 0);
}

}  // namespace
}  // namespace sieve::engine
