// MInference plans (minference.h BuildPlan / BuildPlanRef) on fresh random and planted inputs,
// executed by the CPU attention kernel (PagedAttentionCpu) and the reference
// (PagedAttentionRef): SPARSE_ATTENTION.md 6.1.1-6.1.5 and 6.2.3-6.2.7, chunked prefill, and
// 16-bit K caches.
//
// Output tolerance, per row relative L2 error <= 2e-5: the kernel's bound against the fp64
// reference, derived in kernels/attention/paged_attention_cpu_test.cc (at most ~3000 keys here).
// Plans are built from q and K only (the params given to BuildPlan carry no V).
#include <algorithm>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/minference_test_util.h"

namespace sieve::kernels::minference {
namespace {

using testing::Batch;
using testing::RowKeys;
using testing::SeqShape;
using testing::SpecKeys;

constexpr double kOutTol = 2e-5;

int64_t Row(const MInferencePlan& plan, int hq, int s, int b, int h) {
  return (int64_t{plan.query_block_start[s]} + b) * hq + h;
}

// The structure SparseAttentionIndex requires: increasing blocks inside the sequence, increasing
// columns inside the KV, no column inside a listed block.
void ExpectValid(const Batch& b, const MInferencePlan& plan) {
  ASSERT_EQ(plan.query_block_start.size(), b.kv_lens.size() + 1);
  for (size_t s = 0; s < b.kv_lens.size(); ++s) {
    const int q_len = b.query_start[s + 1] - b.query_start[s];
    ASSERT_EQ(plan.query_block_start[s + 1] - plan.query_block_start[s], (q_len + 63) / 64);
    for (int64_t r = int64_t{plan.query_block_start[s]} * b.q_heads;
         r < int64_t{plan.query_block_start[s + 1]} * b.q_heads; ++r) {
      for (int32_t i = plan.row_start[r]; i < plan.row_start[r + 1]; ++i) {
        ASSERT_GE(plan.key_blocks[i], 0);
        ASSERT_LT(plan.key_blocks[i], (b.kv_lens[s] + 63) / 64);
        if (i > plan.row_start[r]) ASSERT_GT(plan.key_blocks[i], plan.key_blocks[i - 1]);
      }
      for (int32_t i = plan.column_start[r]; i < plan.column_start[r + 1]; ++i) {
        const int32_t c = plan.columns[i];
        ASSERT_TRUE(c >= 0 && c < b.kv_lens[s]) << "row " << r << " column " << c;
        if (i > plan.column_start[r]) ASSERT_GT(c, plan.columns[i - 1]);
        ASSERT_FALSE(std::binary_search(plan.key_blocks.begin() + plan.row_start[r],
                                        plan.key_blocks.begin() + plan.row_start[r + 1], c / 64))
            << "row " << r << " column " << c << " inside a listed block";
      }
    }
  }
}

const std::vector<SeqShape> kMixed = {{700, 700}, {1500, 300}, {129, 65}, {40, 40}, {1000, 1}};

std::vector<HeadPattern> MixedPatterns() {
  return {{Pattern::kVerticalSlash, 100, 150}, {Pattern::kVerticalSlash, 30, 50},
          {Pattern::kAShape, 100, 200},        {Pattern::kBlockSparse, 4, 0},
          {Pattern::kVerticalSlash, 300, 120}, {Pattern::kAShape, 7, 64},
          {Pattern::kBlockSparse, 1, 0},       {Pattern::kVerticalSlash, 1000, 6096}};
}

// Every query of every row reads exactly the set its pattern defines: VS the section 1.6 set
// from the reference selection; A-shape the sinks and its block's window (the exact A-shape set
// plus at most 63 window keys, never more); block-sparse its listed blocks, causally.
TEST(MInferencePlanTest, KeySetsAreThePatternsSets) {
  const std::vector<HeadPattern> pats = MixedPatterns();
  const Batch b(kMixed, 16, 64, 8, 2, 7);
  const auto p = b.Params();
  MInferencePlan plan;
  BuildPlanRef(p, pats.data(), Options{}, &plan);
  ExpectValid(b, plan);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int n = b.kv_lens[s], q_len = b.query_start[s + 1] - b.query_start[s];
    const int first = n - q_len;
    for (int h = 0; h < b.q_heads; ++h) {
      const HeadPattern& pat = pats[h];
      VsIndex x;
      std::vector<int32_t> bo, bl;
      if (pat.pattern == Pattern::kVerticalSlash) {
        VsScores sc;
        VsScoresRef(p, s, h, kDefaultLastQ, &sc);
        x = SelectVs(sc.vertical.data(), sc.slash.data(), n, pat.vertical_size, pat.slash_size);
      } else if (pat.pattern == Pattern::kBlockSparse) {
        BlockSparseRef(p, s, h, pat.vertical_size, &bo, &bl);
      }
      for (int blk = 0; blk * 64 < q_len; ++blk) {
        const int start = first + blk * 64;
        const int64_t row = Row(plan, b.q_heads, s, blk, h);
        BlockKeys k;
        if (pat.pattern == Pattern::kVerticalSlash) ConvertVs(x, start, &k);
        for (int i = start; i < std::min(n, start + 64); ++i) {
          const std::vector<int32_t> got = RowKeys(plan, row, i);
          const std::string what = "seq " + std::to_string(s) + " head " + std::to_string(h) +
                                   " query " + std::to_string(i);
          if (pat.pattern == Pattern::kVerticalSlash) {
            ASSERT_EQ(got, SpecKeys(k, i, n)) << what;
          } else if (pat.pattern == Pattern::kBlockSparse) {
            std::vector<int32_t> want;
            for (int32_t j = bo[blk]; j < bo[blk + 1]; ++j) {
              for (int t = bl[j] * 64; t < bl[j] * 64 + 64 && t <= i; ++t) want.push_back(t);
            }
            ASSERT_EQ(got, want) << what;
          } else {
            const int n_init = pat.vertical_size, n_local = pat.slash_size;
            std::vector<int32_t> want;
            for (int j = 0; j <= i; ++j) {
              if (j < n_init || j >= start - n_local + 1) want.push_back(j);
            }
            ASSERT_EQ(got, want) << what;
            for (int j = 0; j <= i; ++j) {  // the exact A-shape set is inside
              if (i - j < n_local || j < n_init) {
                ASSERT_TRUE(std::binary_search(got.begin(), got.end(), j)) << what << " key " << j;
              }
            }
            ASSERT_LE(got.size(), static_cast<size_t>(std::min(i + 1, n_local + n_init + 63))) << what;
          }
        }
      }
    }
  }
}

// 6.1.6: the fp32 plan equals the fp64 one; where a VS head's selections differ they differ
// only by items within rounding of the cut (minference_test.cc checks that per selection), so
// only rows of such heads may differ here.
TEST(MInferencePlanTest, FastPlanMatchesReferencePlan) {
  const std::vector<HeadPattern> pats = MixedPatterns();
  for (uint32_t seed : {1u, 2u, 3u}) {
    const Batch b(kMixed, 16, 128, 8, 4, seed);
    const auto p = b.Params();
    MInferencePlan fast, ref;
    BuildPlan(p, pats.data(), Options{}, &fast);
    BuildPlanRef(p, pats.data(), Options{}, &ref);
    ExpectValid(b, fast);
    ASSERT_EQ(fast.query_block_start, ref.query_block_start);
    int64_t row = 0;
    for (int s = 0; s < p.num_seqs; ++s) {
      for (int blk = 0; blk < fast.query_block_start[s + 1] - fast.query_block_start[s]; ++blk) {
        for (int h = 0; h < b.q_heads; ++h, ++row) {
          const bool same =
              std::equal(fast.key_blocks.begin() + fast.row_start[row],
                         fast.key_blocks.begin() + fast.row_start[row + 1],
                         ref.key_blocks.begin() + ref.row_start[row],
                         ref.key_blocks.begin() + ref.row_start[row + 1]) &&
              std::equal(fast.columns.begin() + fast.column_start[row],
                         fast.columns.begin() + fast.column_start[row + 1],
                         ref.columns.begin() + ref.column_start[row],
                         ref.columns.begin() + ref.column_start[row + 1]);
          if (same) continue;
          ASSERT_EQ(pats[h].pattern, Pattern::kVerticalSlash) << "seed " << seed << " row " << row;
          const int n = b.kv_lens[s];
          VsScores sc;
          VsScoresRef(p, s, h, kDefaultLastQ, &sc);
          std::vector<float> v(n), sl(n);
          VsScoresCpu(p, s, h, kDefaultLastQ, v.data(), sl.data());
          const VsIndex xf = SelectVs(v.data(), sl.data(), n, pats[h].vertical_size, pats[h].slash_size);
          const VsIndex xr = SelectVs(sc.vertical.data(), sc.slash.data(), n,
                                      pats[h].vertical_size, pats[h].slash_size);
          EXPECT_TRUE(xf.vertical != xr.vertical || xf.slash != xr.slash)
              << "seed " << seed << " row " << row << " differs with equal selections";
        }
      }
    }
  }
}

// BuildPlanFromScores (the GPU path's host half) on VsScoresCpu's scores makes exactly the plan
// BuildPlan makes, sequence by sequence, from the lengths alone (q and K not passed); it refuses
// block-sparse heads and batches of several sequences.
TEST(MInferencePlanTest, PlanFromScoresEqualsBuildPlan) {
  const Batch b(kMixed, 16, 64, 8, 2, 17);
  std::vector<HeadPattern> pats(8, {Pattern::kVerticalSlash, 40, 120});
  pats[3] = {Pattern::kAShape, 16, 200};
  pats[6] = {Pattern::kVerticalSlash, 2000, 50};
  const auto all = b.Params();
  for (int s = 0; s < all.num_seqs; ++s) {
    const int32_t n = b.kv_lens[s], q_len = b.query_start[s + 1] - b.query_start[s];
    std::vector<float> v(static_cast<size_t>(8) * n), sl(v.size());
    for (int h = 0; h < 8; ++h) {
      VsScoresCpu(all, s, h, kDefaultLastQ, v.data() + static_cast<size_t>(h) * n,
                  sl.data() + static_cast<size_t>(h) * n);
    }
    // One sequence with its own queries and page-table row, for BuildPlan.
    const int32_t qs[2] = {0, q_len};
    auto one = all;
    one.q = all.q + static_cast<int64_t>(b.query_start[s]) * 8 * 64;
    one.page_table = all.page_table + static_cast<int64_t>(s) * all.page_table_stride;
    one.kv_lens = &n;
    one.query_start = qs;
    one.num_seqs = 1;
    MInferencePlan want, got;
    BuildPlan(one, pats.data(), Options{}, &want);
    auto lengths = one;
    lengths.q = nullptr;
    lengths.k_cache = nullptr;
    lengths.page_table = nullptr;
    ASSERT_TRUE(BuildPlanFromScores(lengths, pats.data(), v.data(), sl.data(), Options{}, &got));
    EXPECT_EQ(got.query_block_start, want.query_block_start) << "seq " << s;
    EXPECT_EQ(got.row_start, want.row_start) << "seq " << s;
    EXPECT_EQ(got.key_blocks, want.key_blocks) << "seq " << s;
    EXPECT_EQ(got.column_start, want.column_start) << "seq " << s;
    EXPECT_EQ(got.columns, want.columns) << "seq " << s;
    std::vector<HeadPattern> block = pats;
    block[5] = {Pattern::kBlockSparse, 4, 0};
    EXPECT_FALSE(BuildPlanFromScores(lengths, block.data(), v.data(), sl.data(), Options{}, &got));
  }
  EXPECT_FALSE(BuildPlanFromScores(all, pats.data(), nullptr, nullptr, Options{}, nullptr));
}

// 6.1.3: budgets that cover everything give dense attention (every causal key, output equal to
// the dense reference), for each pattern, on prefills and chunks.
TEST(MInferencePlanTest, CoveringBudgetsEqualDense) {
  const Batch b({{1100, 1100}, {1500, 300}, {77, 77}, {300, 1}}, 16, 64, 4, 2, 41);
  std::vector<float> dense;
  PagedAttentionRef(b.Params(&dense), 0);
  const std::vector<std::vector<HeadPattern>> cases = {
      {{Pattern::kVerticalSlash, 1500, 50}, {Pattern::kVerticalSlash, 30, 1500},
       {Pattern::kVerticalSlash, 5000, 5000}, {Pattern::kVerticalSlash, 2000, 100}},
      {{Pattern::kAShape, 0, 1500}, {Pattern::kAShape, 1500, 1}, {Pattern::kBlockSparse, 24, 0},
       {Pattern::kBlockSparse, 100, 0}}};
  for (size_t c = 0; c < cases.size(); ++c) {
    MInferencePlan plan;
    BuildPlan(b.Params(), cases[c].data(), Options{}, &plan);
    ExpectValid(b, plan);
    EXPECT_EQ(PlanPairs(b.Params(), plan), DensePairs(b.Params())) << "case " << c;
    const SparseAttentionIndex x = plan.View();
    std::vector<float> out;
    PagedAttentionCpu(b.Params(&out, &x), 2);
    EXPECT_LE(testing::WorstRelError(out, dense, b.head_dim), kOutTol) << "case " << c;
  }
}

// 6.1.1, 6.1.4, 6.1.5: the kernel over a sparse plan equals the reference over the same plan;
// plans are deterministic; scaling V scales the output and leaves the plan alone.
TEST(MInferencePlanTest, SparseOutputMatchesReferenceOverThePlan) {
  const std::vector<HeadPattern> pats = MixedPatterns();
  Batch b(kMixed, 16, 64, 8, 2, 99);
  MInferencePlan plan, again;
  BuildPlan(b.Params(), pats.data(), Options{}, &plan);
  BuildPlan(b.Params(), pats.data(), Options{}, &again);
  EXPECT_EQ(plan.row_start, again.row_start);
  EXPECT_EQ(plan.key_blocks, again.key_blocks);
  EXPECT_EQ(plan.columns, again.columns);
  EXPECT_LT(PlanPairs(b.Params(), plan), DensePairs(b.Params()));  // actually sparse
  const SparseAttentionIndex x = plan.View();
  std::vector<float> out, ref;
  PagedAttentionCpu(b.Params(&out, &x), 2);
  PagedAttentionRef(b.Params(&ref, &x), 0);
  EXPECT_LE(testing::WorstRelError(out, ref, b.head_dim), kOutTol);
  for (float& v : b.v) v *= 3.0f;
  MInferencePlan scaled;
  BuildPlan(b.Params(), pats.data(), Options{}, &scaled);
  EXPECT_EQ(plan.key_blocks, scaled.key_blocks);
  EXPECT_EQ(plan.columns, scaled.columns);
  std::vector<float> out3;
  PagedAttentionCpu(b.Params(&out3, &x), 2);
  // Against 3x the reference over the plan: the kernel's bound, plus one rounding of 3 ref.
  for (float& v : ref) v *= 3.0f;
  EXPECT_LE(testing::WorstRelError(out3, ref, b.head_dim), kOutTol);
}

// 6.2.4: a key aligned with the last queries (logit sigma * alpha = 25 over noise) is a selected
// column, and those queries' outputs are its value.
TEST(MInferencePlanTest, PlantedVerticalIsSelected) {
  const int n = 1000, d = 64, jstar = n / 3;
  Batch b({{n, n}}, 16, d, 2, 1, 5);
  std::mt19937 rng(3);
  std::normal_distribution<float> noise(0.0f, 0.01f);
  std::vector<float> u(d);
  for (float& x : u) x = noise(rng);
  float norm = 0;
  for (float x : u) norm += x * x;
  for (float& x : u) x /= std::sqrt(norm);
  const float alpha = 25.0f * std::sqrt(static_cast<float>(d));
  for (int t = 0; t < n; ++t) {
    float* k = b.Key(0, 0, t);
    for (int i = 0; i < d; ++i) k[i] = t == jstar ? alpha * u[i] : noise(rng);
  }
  for (int h = 0; h < 2; ++h) {
    for (int j = n - 64; j < n; ++j) {
      float* q = b.Query(0, h, j);
      for (int i = 0; i < d; ++i) q[i] = u[i] + noise(rng);
    }
  }
  // Head 0 has one free column beside the 30 forced sinks.
  const std::vector<HeadPattern> pats = {{Pattern::kVerticalSlash, 31, 100},
                                         {Pattern::kVerticalSlash, 100, 800}};
  MInferencePlan plan;
  BuildPlan(b.Params(), pats.data(), Options{}, &plan);
  for (int h = 0; h < 2; ++h) {
    VsScores sc;
    VsScoresRef(b.Params(), 0, h, kDefaultLastQ, &sc);
    const VsIndex x = SelectVs(sc.vertical.data(), sc.slash.data(), n, pats[h].vertical_size,
                               pats[h].slash_size);
    EXPECT_TRUE(std::binary_search(x.vertical.begin(), x.vertical.end(), jstar)) << "head " << h;
    for (int blk = jstar / 64; blk < (n + 63) / 64; ++blk) {
      const auto keys = RowKeys(plan, Row(plan, 2, 0, blk, h), blk * 64 + 63);
      EXPECT_TRUE(std::binary_search(keys.begin(), keys.end(), jstar)) << "block " << blk;
    }
  }
  const SparseAttentionIndex xi = plan.View();
  std::vector<float> out;
  PagedAttentionCpu(b.Params(&out, &xi), 2);
  const float* vstar = b.Value(0, 0, jstar);
  for (int h = 0; h < 2; ++h) {
    for (int j = n - 64; j < n; ++j) {
      const float* o = out.data() + (static_cast<size_t>(j) * 2 + h) * d;
      for (int i = 0; i < d; ++i) ASSERT_NEAR(o[i], vstar[i], 1e-4) << "query " << j << " head " << h;
    }
  }
}

// 6.2.5: a "look delta* back" head (k_j = c q_{j + delta*}, logit 30 over near-orthogonal
// others) selects delta*, and every query i >= delta* reads key i - delta*.
TEST(MInferencePlanTest, PlantedSlashIsSelected) {
  const int n = 1200, d = 128, dstar = 333;
  Batch b({{n, n}}, 16, d, 1, 1, 8);
  std::mt19937 rng(4);
  std::normal_distribution<float> g(0.0f, 1.0f), noise(0.0f, 0.01f);
  for (int j = 0; j < n; ++j) {
    float* q = b.Query(0, 0, j);
    float norm = 0;
    for (int i = 0; i < d; ++i) norm += (q[i] = g(rng)) * q[i];
    for (int i = 0; i < d; ++i) q[i] /= std::sqrt(norm);
  }
  const float c = 30.0f * std::sqrt(static_cast<float>(d));  // sigma * c * |q|^2 = 30
  for (int t = 0; t < n; ++t) {
    float* k = b.Key(0, 0, t);
    const float* q = t + dstar < n ? b.Query(0, 0, t + dstar) : nullptr;
    for (int i = 0; i < d; ++i) k[i] = (q != nullptr ? c * q[i] : 0.0f) + noise(rng);
  }
  const HeadPattern pat{Pattern::kVerticalSlash, 30, 150};
  VsScores sc;
  VsScoresRef(b.Params(), 0, 0, kDefaultLastQ, &sc);
  const VsIndex x = SelectVs(sc.vertical.data(), sc.slash.data(), n, pat.vertical_size, pat.slash_size);
  EXPECT_NE(std::find(x.slash.begin(), x.slash.end(), dstar), x.slash.end());
  MInferencePlan plan;
  BuildPlan(b.Params(), &pat, Options{}, &plan);
  for (int i = dstar; i < n; ++i) {
    const auto keys = RowKeys(plan, Row(plan, 1, 0, i / 64, 0), i);
    ASSERT_TRUE(std::binary_search(keys.begin(), keys.end(), i - dstar)) << "query " << i;
  }
}

// 6.2.7: query blocks m < top_k read every causal block (and equal dense); later ones exactly
// top_k causal blocks.
TEST(MInferencePlanTest, BlockSparseShapeAndDensePrefix) {
  const int n = 1000, top_k = 5;
  const Batch b({{n, n}}, 16, 64, 2, 1, 12);
  const std::vector<HeadPattern> pats(2, HeadPattern{Pattern::kBlockSparse, top_k, 0});
  MInferencePlan plan;
  BuildPlan(b.Params(), pats.data(), Options{}, &plan);
  for (int h = 0; h < 2; ++h) {
    for (int m = 0; m < (n + 63) / 64; ++m) {
      const int64_t r = Row(plan, 2, 0, m, h);
      ASSERT_EQ(plan.row_start[r + 1] - plan.row_start[r], std::min(m + 1, top_k)) << "block " << m;
      for (int32_t i = plan.row_start[r]; i < plan.row_start[r + 1]; ++i) {
        ASSERT_LE(plan.key_blocks[i], m);
      }
    }
  }
  std::vector<float> dense, out;
  PagedAttentionRef(b.Params(&dense), 0);
  const SparseAttentionIndex x = plan.View();
  PagedAttentionCpu(b.Params(&out, &x), 2);
  const size_t prefix = static_cast<size_t>(top_k) * 64 * 2 * 64;  // rows of blocks < top_k
  dense.resize(prefix);
  out.resize(prefix);
  EXPECT_LE(testing::WorstRelError(out, dense, 64), kOutTol);
}

// Chunked prefill: the last chunk of a prompt estimates from the same queries and keys as the
// whole prompt, so its selection is identical, and with a chunk start at a multiple of 64 its
// rows equal the unchunked rows of the same query blocks (block-sparse heads too: their query
// blocks pool the same queries). Chunks starting anywhere keep the
// conversion's guarantees (KeySetsAreThePatternsSets covers those with an unaligned start).
TEST(MInferencePlanTest, LastChunkSelectsWhatTheWholePromptSelects) {
  const int n = 1000, chunk = 704;
  const Batch whole({{n, n}}, 16, 64, 4, 2, 77);
  Batch last({{n, n - chunk}}, 16, 64, 4, 2, 77);  // same cache; queries of the last chunk only
  last.q.assign(whole.q.begin() + static_cast<size_t>(chunk) * 4 * 64, whole.q.end());
  last.k = whole.k;
  last.page_table = whole.page_table;
  const std::vector<HeadPattern> pats = {{Pattern::kVerticalSlash, 100, 150},
                                         {Pattern::kVerticalSlash, 30, 800},
                                         {Pattern::kAShape, 64, 300},
                                         {Pattern::kBlockSparse, 3, 0}};
  for (int h = 0; h < 2; ++h) {
    VsScores a, c;
    VsScoresRef(whole.Params(), 0, h, kDefaultLastQ, &a);
    VsScoresRef(last.Params(), 0, h, kDefaultLastQ, &c);
    EXPECT_EQ(a.vertical, c.vertical);
    EXPECT_EQ(a.slash, c.slash);
  }
  MInferencePlan pw, pc;
  BuildPlan(whole.Params(), pats.data(), Options{}, &pw);
  BuildPlan(last.Params(), pats.data(), Options{}, &pc);
  ExpectValid(last, pc);
  for (int blk = 0; blk < (n - chunk + 63) / 64; ++blk) {
    for (int h = 0; h < 4; ++h) {
      const int64_t rw = Row(pw, 4, 0, chunk / 64 + blk, h), rc = Row(pc, 4, 0, blk, h);
      for (int i = chunk + blk * 64; i < std::min(n, chunk + blk * 64 + 64); ++i) {
        ASSERT_EQ(RowKeys(pw, rw, i), RowKeys(pc, rc, i)) << "head " << h << " query " << i;
      }
    }
  }
  // A chunk shorter than 64 queries estimates from all of them (Lq = q_len).
  Batch tiny({{n, 10}}, 16, 64, 4, 2, 78);
  VsScores t;
  VsScoresRef(tiny.Params(), 0, 0, kDefaultLastQ, &t);
  EXPECT_NEAR(std::accumulate(t.vertical.begin(), t.vertical.end(), 0.0), 10.0, 1e-9);
}

bool SamePlan(const MInferencePlan& a, const MInferencePlan& b) {
  return a.query_block_start == b.query_block_start && a.row_start == b.row_start &&
         a.key_blocks == b.key_blocks && a.column_start == b.column_start &&
         a.columns == b.columns;
}

// A 16-bit K cache (kv_cache.dtype bfloat16, and float16) is widened exactly as keys are read,
// so every estimator (VS scores, block-sparse pooling, both precisions) and so the plan must be
// exactly what an fp32 cache holding the widened keys gives; the tests above then cover 16-bit
// caches too.
TEST(MInferencePlanTest, SixteenBitKeysPlanAsTheirWidenedValues) {
  const std::vector<HeadPattern> pats = MixedPatterns();
  for (const KvDtype t : {KvDtype::kBfloat16, KvDtype::kFloat16}) {
    SCOPED_TRACE(KvDtypeName(t));
    Batch b(kMixed, 16, 64, 8, 2, 31);
    const std::vector<uint16_t> bits = RoundToKv16(b.k, t);
    const auto wide = b.Params();
    auto narrow = wide;
    narrow.k_cache = reinterpret_cast<const float*>(bits.data());
    Options o;
    o.k_dtype = t;
    MInferencePlan pw, pn, rw, rn;
    BuildPlan(wide, pats.data(), Options{}, &pw);
    BuildPlan(narrow, pats.data(), o, &pn);
    BuildPlanRef(wide, pats.data(), Options{}, &rw);
    BuildPlanRef(narrow, pats.data(), o, &rn);
    EXPECT_TRUE(SamePlan(pn, pw));
    EXPECT_TRUE(SamePlan(rn, rw));
    for (int h : {0, 4}) {  // VS heads: the scores themselves
      const int n = b.kv_lens[1];
      std::vector<float> vw(n), sw(n), vn(n), sn(n);
      VsScoresCpu(wide, 1, h, kDefaultLastQ, vw.data(), sw.data());
      VsScoresCpu(narrow, 1, h, kDefaultLastQ, vn.data(), sn.data(), t);
      EXPECT_EQ(vn, vw);
      EXPECT_EQ(sn, sw);
      VsScores a, c;
      VsScoresRef(wide, 1, h, kDefaultLastQ, &a);
      VsScoresRef(narrow, 1, h, kDefaultLastQ, &c, t);
      EXPECT_EQ(c.vertical, a.vertical);
      EXPECT_EQ(c.slash, a.slash);
    }
  }
}

}  // namespace
}  // namespace sieve::kernels::minference
