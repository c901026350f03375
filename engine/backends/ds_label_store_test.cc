// DsLabelStore: labels written through step layouts (a prefill chunk, then a chunk starting
// mid-page with a decode token beside it) select what the kernels select from labels written
// directly; decode plans are valid, sparse where asked and list every page elsewhere; a budget
// covering the context lists every token.
#include "engine/backends/ds_label_store.h"

#include <numeric>
#include <random>
#include <vector>

#include "engine/backends/backend.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

constexpr int kPage = 4, kHq = 4, kHkv = 2, kDim = 16, kPages = 64;

kernels::DoubleSparsityShape Shape() {
  return {kHq, kHkv, kDim, kPage, 5, kernels::DsLabelFormat::kF16, false, false};
}

// A step: sequence i has kv_lens[i] tokens after it, q_lens[i] of them new; pages[i] its pages.
BatchLayout Layout(const std::vector<int>& kv_lens, const std::vector<int>& q_lens,
                   const std::vector<std::vector<int32_t>>& pages) {
  BatchLayout l;
  l.page_table_stride = kPages;
  l.query_start.push_back(0);
  for (size_t s = 0; s < kv_lens.size(); ++s) {
    for (int t = kv_lens[s] - q_lens[s]; t < kv_lens[s]; ++t) {
      l.positions.push_back(t);
      l.slots.push_back(int64_t{pages[s][t / kPage]} * kPage + t % kPage);
    }
    l.query_start.push_back(l.query_start.back() + q_lens[s]);
    l.kv_lens.push_back(kv_lens[s]);
    std::vector<int32_t> row(kPages, 0);
    std::copy(pages[s].begin(), pages[s].end(), row.begin());
    l.page_table.insert(l.page_table.end(), row.begin(), row.end());
  }
  return l;
}

TEST(DsLabelStoreTest, AppendsAndPlans) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> k_cache(kPages * kPage * kHkv * kDim);
  for (float& x : k_cache) x = u(rng);
  auto store = DsLabelStore::Create(Shape(), 1, kPages);
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<int32_t> channels;
  for (int h = 0; h < kHq; ++h) {
    for (int c = 0; c < 5; ++c) channels.push_back((h + 3 * c) % kDim);
  }
  ASSERT_FALSE((*store)->ready());
  EXPECT_FALSE((*store)->SetChannels(0, absl::MakeConstSpan(channels).first(7)).ok());
  ASSERT_TRUE((*store)->SetChannels(0, channels).ok());
  ASSERT_TRUE((*store)->ready());
  // Pages of the three sequences, shuffled.
  std::vector<int32_t> ids(kPages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  const std::vector<std::vector<int32_t>> pages = {{ids.begin(), ids.begin() + 20},
                                                   {ids.begin() + 20, ids.begin() + 40},
                                                   {ids.begin() + 40, ids.begin() + 60}};
  // Step 1: prefill chunks of 30, 61 and 10 tokens. Step 2: 13 more for sequence 0 (starting
  // mid-page), a decode token for 1, 5 more for 2.
  (*store)->Append(0, Layout({30, 61, 10}, {30, 61, 10}, pages), k_cache.data(),
                   kernels::KvDtype::kFloat32, 2);
  const BatchLayout step = Layout({43, 62, 15}, {13, 1, 5}, pages);
  (*store)->Append(0, step, k_cache.data(), kernels::KvDtype::kFloat32, 2);
  // The same labels written directly by the kernels, in one go.
  std::vector<uint8_t> labels(kPages * kernels::DsLabelPageBytes(Shape()));
  const BatchLayout all = Layout({43, 62, 15}, {43, 62, 15}, pages);
  kernels::DsAppendParams a;
  a.k_cache = k_cache.data();
  a.page_table = all.page_table.data();
  a.page_table_stride = kPages;
  a.kv_lens = all.kv_lens.data();
  a.query_start = all.query_start.data();
  a.num_seqs = 3;
  a.channels = channels.data();
  a.labels = labels.data();
  kernels::DsWriteLabels(Shape(), a, 1);

  // A decode step for all three; sequence 2 asks for dense.
  const BatchLayout decode = Layout({43, 62, 15}, {1, 1, 1}, pages);
  // Query rows for the larger of the two layouts below (decode: 3 tokens; step: 19).
  std::vector<float> q(19 * kHq * kDim);
  for (float& x : q) x = u(rng);
  const std::vector<uint8_t> dense = {0, 0, 1};
  DsPlanOptions o;
  o.token_budget = 9;
  o.dense_sequences = dense;
  AttentionPlan plan;
  (*store)->Plan(0, decode, q.data(), o, plan, 2);
  ASSERT_TRUE(plan.Validate(decode, kHq).ok()) << plan.Validate(decode, kHq);
  // Sequences 0 and 1: the kernels' selection over the directly written labels.
  kernels::DsSelectParams p;
  p.q = q.data();
  p.page_table = decode.page_table.data();
  p.page_table_stride = kPages;
  p.kv_lens = decode.kv_lens.data();
  p.num_seqs = 2;
  p.channels = channels.data();
  p.labels = labels.data();
  p.token_budget = 9;
  kernels::DsSelection want;
  kernels::DsSelectRef(Shape(), p, want);
  for (int row = 0; row < 2 * kHq; ++row) {
    EXPECT_EQ(plan.row_start[row + 1] - plan.row_start[row], 0);
    EXPECT_EQ(std::vector<int32_t>(plan.columns.begin() + plan.column_start[row],
                                   plan.columns.begin() + plan.column_start[row + 1]),
              std::vector<int32_t>(want.columns.begin() + want.column_start[row],
                                   want.columns.begin() + want.column_start[row + 1]))
        << "row " << row;
  }
  // Sequence 2: every page, no columns.
  for (int row = 2 * kHq; row < 3 * kHq; ++row) {
    EXPECT_EQ(std::vector<int32_t>(plan.key_blocks.begin() + plan.row_start[row],
                                   plan.key_blocks.begin() + plan.row_start[row + 1]),
              (std::vector<int32_t>{0, 1, 2, 3}));
    EXPECT_EQ(plan.column_start[row + 1], plan.column_start[row]);
  }
  // A budget covering every context: every token of every sparse row.
  o.token_budget = 1000;
  (*store)->Plan(0, decode, q.data(), o, plan, 2);
  for (int row = 0; row < kHq; ++row) {
    std::vector<int32_t> cols(plan.columns.begin() + plan.column_start[row],
                              plan.columns.begin() + plan.column_start[row + 1]);
    std::vector<int32_t> every(43);
    std::iota(every.begin(), every.end(), 0);
    EXPECT_EQ(cols, every);
  }
  // A step with a multi-token sequence: it lists all of its pages for each of its queries.
  (*store)->Plan(0, step, q.data(), DsPlanOptions{.token_budget = 4}, plan, 1);
  ASSERT_TRUE(plan.Validate(step, kHq).ok()) << plan.Validate(step, kHq);
  EXPECT_EQ(plan.query_block_start, (std::vector<int32_t>{0, 13, 14, 19}));
}

}  // namespace
}  // namespace sieve::engine
