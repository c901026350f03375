// The attention-policy seam: plans are validated and counted, and a ModelWorker executes what its
// policy plans on the CPU backend: a block-sparse plan that lists every key block gives exactly
// the dense logits; one that drops blocks gives other logits; a broken plan fails the step.
#include "engine/attention/attention_policy.h"

#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/serving/engine_config.h"
#include "engine/runner/model_runner.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

std::string EmbeddedDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

// A layout of two sequences: a 40-token prompt chunk after 24 cached tokens, and one decode
// token after 70.
BatchLayout TwoSequences() {
  BatchLayout l;
  l.query_start = {0, 40, 41};
  l.kv_lens = {64, 71};
  for (int p = 24; p < 64; ++p) l.positions.push_back(p);
  l.positions.push_back(70);
  l.slots.assign(l.positions.size(), 0);
  l.page_table_stride = 5;
  l.page_table.assign(10, 0);
  return l;
}

// Fills `plan` as a block-sparse plan over `layout` with query blocks of `qb` and key blocks of
// `kb`, keeping key block j of a row when keep(row, j) says so.
void BlockPlan(const BatchLayout& layout, int32_t heads, int32_t qb, int32_t kb,
               const std::function<bool(int64_t, int32_t)>& keep, AttentionPlan& plan) {
  plan.SetDense();
  plan.dense = false;
  plan.query_block = qb;
  plan.key_block = kb;
  plan.query_block_start = {0};
  for (int32_t s = 0; s < layout.num_seqs(); ++s) {
    const int32_t q_len = layout.query_start[s + 1] - layout.query_start[s];
    plan.query_block_start.push_back(plan.query_block_start.back() + (q_len + qb - 1) / qb);
  }
  plan.row_start = {0};
  for (int32_t s = 0; s < layout.num_seqs(); ++s) {
    const int32_t blocks = (layout.kv_lens[s] + kb - 1) / kb;
    for (int64_t r = int64_t{plan.query_block_start[s]} * heads;
         r < int64_t{plan.query_block_start[s + 1]} * heads; ++r) {
      for (int32_t j = 0; j < blocks; ++j) {
        if (keep(r, j)) plan.key_blocks.push_back(j);
      }
      plan.row_start.push_back(static_cast<int32_t>(plan.key_blocks.size()));
    }
  }
}

TEST(AttentionPlanTest, DenseAndEveryBlockReadTheSamePairs) {
  const BatchLayout l = TwoSequences();
  AttentionPlan plan;
  EXPECT_TRUE(plan.Validate(l, 4).ok());
  // Seq 0: queries at 24..63 read 25..64 keys; seq 1: one query reads 71. Times 4 heads.
  const int64_t dense = 4 * ((25 + 64) * 40 / 2 + 71);
  EXPECT_EQ(DensePairs(l, 4), dense);
  EXPECT_EQ(plan.ReadPairs(l, 4), dense);
  BlockPlan(l, 4, 16, 8, [](int64_t, int32_t) { return true; }, plan);
  ASSERT_TRUE(plan.Validate(l, 4).ok()) << plan.Validate(l, 4);
  EXPECT_EQ(plan.ReadPairs(l, 4), dense);
}

TEST(AttentionPlanTest, ReadPairsCountsWhatIsListedAndCausal) {
  const BatchLayout l = TwoSequences();
  std::mt19937 rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const int32_t qb = 1 + rng() % 20, kb = 1 + rng() % 20;
    std::vector<std::vector<bool>> kept;
    AttentionPlan plan;
    BlockPlan(l, 2, qb, kb, [&](int64_t r, int32_t j) {
      if (static_cast<int64_t>(kept.size()) <= r) kept.resize(r + 1);
      if (static_cast<int32_t>(kept[r].size()) <= j) kept[r].resize(j + 1);
      return kept[r][j] = rng() % 3 != 0;
    }, plan);
    // Single columns outside the kept blocks.
    plan.column_start = {0};
    for (size_t r = 0; r + 1 < plan.row_start.size(); ++r) {
      const int32_t s = r < static_cast<size_t>(plan.query_block_start[1]) * 2 ? 0 : 1;
      for (int32_t c = 0; c < l.kv_lens[s]; c += 7) {
        const int32_t j = c / kb;
        if ((j >= static_cast<int32_t>(kept[r].size()) || !kept[r][j]) && rng() % 2) {
          plan.columns.push_back(c);
        }
      }
      plan.column_start.push_back(static_cast<int32_t>(plan.columns.size()));
    }
    ASSERT_TRUE(plan.Validate(l, 2).ok()) << plan.Validate(l, 2);
    // Brute force: every (query, head, key) pair.
    int64_t want = 0;
    for (int32_t s = 0; s < 2; ++s) {
      const int32_t q_len = l.query_start[s + 1] - l.query_start[s];
      for (int32_t q = 0; q < q_len; ++q) {
        const int32_t pos = l.kv_lens[s] - q_len + q;
        for (int32_t h = 0; h < 2; ++h) {
          const int64_t r = (int64_t{plan.query_block_start[s]} + q / qb) * 2 + h;
          for (int32_t t = 0; t <= pos; ++t) {
            bool listed = false;
            for (int32_t i = plan.row_start[r]; i < plan.row_start[r + 1]; ++i) {
              listed |= plan.key_blocks[i] == t / kb;
            }
            for (int32_t i = plan.column_start[r]; i < plan.column_start[r + 1]; ++i) {
              listed |= plan.columns[i] == t;
            }
            want += listed ? 1 : 0;
          }
        }
      }
    }
    EXPECT_EQ(plan.ReadPairs(l, 2), want) << "qb " << qb << " kb " << kb;
  }
}

TEST(AttentionPlanTest, ValidateNamesWhatIsWrong) {
  const BatchLayout l = TwoSequences();
  AttentionPlan plan;
  BlockPlan(l, 4, 16, 8, [](int64_t, int32_t) { return true; }, plan);
  AttentionPlan bad = plan;
  bad.query_block_start.pop_back();
  EXPECT_THAT(bad.Validate(l, 4).message(), HasSubstr("query_block_start"));
  bad = plan;
  bad.key_blocks[0] = 99;
  EXPECT_THAT(bad.Validate(l, 4).message(), HasSubstr("key block 99"));
  bad = plan;
  std::swap(bad.key_blocks[0], bad.key_blocks[1]);
  EXPECT_THAT(bad.Validate(l, 4).message(), HasSubstr("must increase"));
  bad = plan;
  bad.column_start.assign(plan.row_start.size(), 0);
  bad.column_start.back() = 1;
  bad.columns = {3};
  EXPECT_FALSE(bad.Validate(l, 4).ok());
  EXPECT_EQ(plan.Validate(l, 3).code(), absl::StatusCode::kInternal);  // rows for 4 heads
}

TEST(AttentionPlanTest, OnDevicePlansCarryTheirPairsAndNoHostRows) {
  const BatchLayout l = TwoSequences();
  AttentionPlan plan;
  plan.SetDense();
  plan.dense = false;
  plan.on_device = true;
  plan.query_block = 1;
  plan.key_block = 8;
  plan.query_block_start = {0, 40, 41};
  plan.on_device_pairs = 1234;
  EXPECT_TRUE(plan.Validate(l, 4).ok()) << plan.Validate(l, 4);
  EXPECT_EQ(plan.ReadPairs(l, 4), 1234);
  AttentionPlan bad = plan;
  bad.row_start = {0};
  EXPECT_THAT(bad.Validate(l, 4).message(), HasSubstr("on_device"));
  bad = plan;
  bad.query_block_start = {0, 40};
  EXPECT_THAT(bad.Validate(l, 4).message(), HasSubstr("query_block_start"));
  plan.SetDense();  // back to dense: the device flag and its pairs go
  EXPECT_FALSE(plan.on_device);
  EXPECT_EQ(plan.ReadPairs(l, 4), DensePairs(l, 4));
}

TEST(AttentionPolicyTest, MakesDenseAndRefusesUnknownMethods) {
  AttentionConfig config;
  auto dense = MakeAttentionPolicy(config, AttentionPhase::kPrefill);
  ASSERT_TRUE(dense.ok());
  EXPECT_EQ((*dense)->method(), "dense");
  config.decode.method = "fancy";
  auto bad = MakeAttentionPolicy(config, AttentionPhase::kDecode);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("unknown decode attention method 'fancy'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("known: dense"));
}

// A policy that builds BlockPlan with `keep`, counting its calls.
class BlockPolicy final : public AttentionPolicy {
 public:
  explicit BlockPolicy(std::function<bool(int64_t, int32_t)> keep) : keep_(std::move(keep)) {}
  std::string_view method() const override { return "test-blocks"; }
  absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
    ++calls;
    BlockPlan(*step.layout, step.shape.num_q_heads, 16, 8, keep_, plan);
    return absl::OkStatus();
  }
  int calls = 0;

 private:
  std::function<bool(int64_t, int32_t)> keep_;
};

// Logits of a 75-token prompt in chunks of 40 and 35 on `worker` (fresh pages each time).
std::vector<float> PromptLogits(ModelWorker& worker, absl::Status* status = nullptr) {
  std::vector<int32_t> tokens(75);
  for (int i = 0; i < 75; ++i) tokens[i] = (i * 37 + 11) % 4096;
  const std::vector<int32_t> pages = {0, 1, 2, 3, 4};
  std::vector<float> logits;
  SequenceStep first{absl::MakeConstSpan(tokens).subspan(0, 40), 0, pages, false};
  absl::Status st = worker.Forward({first}, logits);
  SequenceStep second{absl::MakeConstSpan(tokens).subspan(40), 40, pages, true};
  if (st.ok()) st = worker.Forward({second}, logits);
  if (status != nullptr) *status = st;
  return logits;
}

TEST(AttentionPolicyTest, WorkersExecuteTheirPoliciesPlans) {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.num_threads = 1;
  o.page_size = 16;
  o.num_pages = 16;
  o.max_step_tokens = 64;
  o.max_step_logits = 4;
  auto runner = ModelRunner::Load(EmbeddedDir(), o);
  ASSERT_TRUE(runner.ok()) << runner.status();
  auto dense = (*runner)->CreateWorker();
  ASSERT_TRUE(dense.ok());
  const std::vector<float> want = PromptLogits(**dense);
  ASSERT_EQ(want.size(), 4096u);

  auto all = std::make_unique<BlockPolicy>([](int64_t, int32_t) { return true; });
  BlockPolicy* all_raw = all.get();
  auto every = (*runner)->CreateWorker({}, std::move(all));
  ASSERT_TRUE(every.ok());
  EXPECT_EQ(PromptLogits(**every), want);  // the same keys, the same arithmetic
  EXPECT_EQ(all_raw->calls, 2 * 4);        // two steps of four layers

  // Only the first and the latest key blocks: other logits.
  auto local = (*runner)->CreateWorker({}, std::make_unique<BlockPolicy>([](int64_t, int32_t j) {
    return j == 0 || j >= 8;
  }));
  ASSERT_TRUE(local.ok());
  const std::vector<float> sparse = PromptLogits(**local);
  ASSERT_EQ(sparse.size(), want.size());
  double diff = 0;
  for (size_t i = 0; i < want.size(); ++i) diff = std::max<double>(diff, std::abs(sparse[i] - want[i]));
  EXPECT_GT(diff, 1e-3);

  // A plan listing a block past the sequence fails the step with the plan's error.
  class Broken final : public AttentionPolicy {
   public:
    std::string_view method() const override { return "broken"; }
    absl::Status Plan(const AttentionStep& step, AttentionPlan& plan) override {
      BlockPlan(*step.layout, step.shape.num_q_heads, 16, 8, [](int64_t, int32_t) { return true; },
                plan);
      plan.key_blocks.back() = 1000;
      return absl::OkStatus();
    }
  };
  auto worker = (*runner)->CreateWorker({}, std::make_unique<Broken>());
  ASSERT_TRUE(worker.ok());
  absl::Status st;
  PromptLogits(**worker, &st);
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(st.message(), HasSubstr("key block 1000"));
}

}  // namespace
}  // namespace sieve::engine
