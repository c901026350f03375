// MInference estimation, selection and conversion (minference.h) on fresh random inputs: the
// fp32 Highway estimator against the fp64 reference, the mass identities and forced entries of
// SPARSE_ATTENTION.md 6.2.1-6.2.2, and the conversion guarantees of 6.2.3 fuzzed over 300 cases.
//
// Tolerance of the fp32 scores (VsScoresCpu against VsScoresRef), relative per score: 2e-4.
// Derivation: a logit is a d-term fp32 dot product times 1/sqrt(d); with FMA accumulation its
// absolute error is at most ~ d u sum_i |q_i k_i| / sqrt(d) <= sqrt(d) d u max|q||k| (u = 2^-24;
// inputs in [-1, 1]), 128 * 6e-8 * 11.3 = 8.7e-5 at d = 128 in the worst case. A probability's
// relative error is its logit's error plus the normaliser's (at most the largest logit error)
// plus a few u from exp: <= 1.8e-4. A score sums at most 64 probabilities, all positive, which
// adds <= 64 u = 4e-6 relative. So 2e-4 relative bounds every score (no underflow: the logits
// of these inputs span less than 2 sqrt(d) / 3 < 8).
#include <algorithm>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "gtest/gtest.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/minference_test_util.h"

namespace sieve::kernels::minference {
namespace {

using testing::Batch;
using testing::SeqShape;

constexpr double kScoreRelTol = 2e-4;

struct Shape {
  int page_size, head_dim, group;
};

class EstimatorTest : public ::testing::TestWithParam<Shape> {};

// (kv_len, q_len): tiny, one short block, a prefill, chunks over earlier keys, a decode-like
// single query, and lengths that straddle tiles.
const std::vector<SeqShape> kSeqs = {{2, 2}, {63, 63}, {700, 700}, {1500, 300}, {200, 1},
                                     {129, 65}};

TEST_P(EstimatorTest, FastScoresMatchReferenceAndSumToQueries) {
  const Shape sh = GetParam();
  const Batch b(kSeqs, sh.page_size, sh.head_dim, 2 * sh.group, 2,
                11 + sh.page_size + sh.head_dim + sh.group);
  const auto p = b.Params();
  for (int s = 0; s < p.num_seqs; ++s) {
    for (int h = 0; h < p.num_q_heads; ++h) {
      VsScores ref;
      VsScoresRef(p, s, h, kDefaultLastQ, &ref);
      const int n = b.kv_lens[s];
      std::vector<float> v(n), sl(n);
      VsScoresCpu(p, s, h, kDefaultLastQ, v.data(), sl.data());
      const int lq = std::min(kDefaultLastQ, b.query_start[s + 1] - b.query_start[s]);
      // 6.2.2: each estimation row is a softmax, so each score vector sums to Lq.
      const double sum_v = std::accumulate(ref.vertical.begin(), ref.vertical.end(), 0.0);
      const double sum_s = std::accumulate(ref.slash.begin(), ref.slash.end(), 0.0);
      EXPECT_NEAR(sum_v, lq, 1e-9 * lq) << "seq " << s << " head " << h;
      EXPECT_NEAR(sum_s, lq, 1e-9 * lq) << "seq " << s << " head " << h;
      int bad = 0;
      for (int j = 0; j < n; ++j) {
        bad += std::abs(v[j] - ref.vertical[j]) > kScoreRelTol * ref.vertical[j];
        bad += std::abs(sl[j] - ref.slash[j]) > kScoreRelTol * ref.slash[j];
      }
      EXPECT_EQ(bad, 0) << "seq " << s << " head " << h;
    }
  }
}

// 6.1.6: the fp32 selection equals the fp64 one except for items whose fp64 score lies within
// the score tolerance of the fp64 cut; sizes always match.
void ExpectSameUpToTies(const std::vector<int32_t>& fast, const std::vector<int32_t>& ref,
                        const std::vector<double>& score, int forced, const std::string& what) {
  ASSERT_EQ(fast.size(), ref.size()) << what;
  double cut = std::numeric_limits<double>::infinity();
  for (int32_t i : ref) {
    if (i >= forced) cut = std::min(cut, score[i]);
  }
  const std::set<int32_t> r(ref.begin(), ref.end());
  for (int32_t i : fast) {
    if (r.count(i) == 0) {
      EXPECT_GE(score[i], cut * (1 - 2 * kScoreRelTol)) << what << ": item " << i;
    }
  }
}

TEST_P(EstimatorTest, FastSelectionMatchesReference) {
  const Shape sh = GetParam();
  const Batch b(kSeqs, sh.page_size, sh.head_dim, 2 * sh.group, 2,
                23 + sh.page_size + sh.head_dim + sh.group);
  const auto p = b.Params();
  for (int s = 0; s < p.num_seqs; ++s) {
    const int n = b.kv_lens[s];
    for (int h = 0; h < p.num_q_heads; ++h) {
      VsScores ref;
      VsScoresRef(p, s, h, kDefaultLastQ, &ref);
      std::vector<float> v(n), sl(n);
      VsScoresCpu(p, s, h, kDefaultLastQ, v.data(), sl.data());
      for (const auto [vs, ss] : {std::pair{30, 50}, {100, 150}, {300, 400}}) {
        const VsIndex x = SelectVs(v.data(), sl.data(), n, vs, ss);
        const VsIndex y = SelectVs(ref.vertical.data(), ref.slash.data(), n, vs, ss);
        const std::string what = "seq " + std::to_string(s) + " head " + std::to_string(h) +
                                 " sizes " + std::to_string(vs) + "/" + std::to_string(ss);
        ExpectSameUpToTies(x.vertical, y.vertical, ref.vertical, kForcedColumns, what + " V");
        ExpectSameUpToTies(x.slash, y.slash, ref.slash, kForcedDiagonals, what + " D");
      }
    }
  }
}

TEST_P(EstimatorTest, BlockSparseFastMatchesReference) {
  const Shape sh = GetParam();
  const Batch b({{1000, 1000}, {900, 250}}, sh.page_size, sh.head_dim, 2 * sh.group, 2,
                31 + sh.page_size + sh.head_dim + sh.group);
  const auto p = b.Params();
  for (int s = 0; s < p.num_seqs; ++s) {
    for (int h = 0; h < p.num_q_heads; ++h) {
      for (int top_k : {1, 3, 8}) {
        std::vector<int32_t> fo, fb, ro, rb;
        BlockSparseCpu(p, s, h, top_k, &fo, &fb);
        BlockSparseRef(p, s, h, top_k, &ro, &rb);
        EXPECT_EQ(fo, ro) << "seq " << s << " head " << h << " top_k " << top_k;
        EXPECT_EQ(fb, rb) << "seq " << s << " head " << h << " top_k " << top_k;
      }
    }
  }
}

std::vector<Shape> Shapes() {
  return {{16, 64, 1}, {16, 128, 4}, {64, 64, 2}, {1, 128, 1}, {7, 64, 4}};
}

std::string Name(const ::testing::TestParamInfo<Shape>& i) {
  return "page" + std::to_string(i.param.page_size) + "_d" + std::to_string(i.param.head_dim) +
         "_group" + std::to_string(i.param.group);
}

INSTANTIATE_TEST_SUITE_P(Sweep, EstimatorTest, ::testing::ValuesIn(Shapes()), Name);

// 6.2.1: forced sinks and local diagonals, clamped sizes, orders; also for N < 64 (Lq = N).
TEST(SelectVsTest, ForcedEntriesAndSizes) {
  for (int n : {2, 5, 29, 30, 31, 63, 64, 65, 99, 100, 101, 300, 1200}) {
    const Batch b({{n, n}}, 16, 64, 2, 1, 100 + n);
    const auto p = b.Params();
    std::vector<float> v(n), sl(n);
    VsScoresCpu(p, 0, 1, kDefaultLastQ, v.data(), sl.data());
    for (const auto [vs, ss] : {std::pair{1, 1}, {30, 100}, {64, 150}, {500, 700}, {5000, 5000}}) {
      const VsIndex x = SelectVs(v.data(), sl.data(), n, vs, ss);
      const std::string what = "n " + std::to_string(n) + " sizes " + std::to_string(vs) + "/" +
                               std::to_string(ss);
      EXPECT_EQ(static_cast<int>(x.vertical.size()), std::min(n, std::max(vs, 30))) << what;
      EXPECT_EQ(static_cast<int>(x.slash.size()), std::min(n, std::max(ss, 50))) << what;
      EXPECT_TRUE(std::is_sorted(x.vertical.begin(), x.vertical.end())) << what;
      EXPECT_TRUE(std::is_sorted(x.slash.rbegin(), x.slash.rend())) << what;
      EXPECT_EQ(std::adjacent_find(x.vertical.begin(), x.vertical.end()), x.vertical.end()) << what;
      EXPECT_EQ(std::adjacent_find(x.slash.begin(), x.slash.end()), x.slash.end()) << what;
      const std::set<int32_t> V(x.vertical.begin(), x.vertical.end());
      const std::set<int32_t> D(x.slash.begin(), x.slash.end());
      for (int j = 0; j < std::min(30, n); ++j) EXPECT_EQ(V.count(j), 1u) << what << " column " << j;
      // The 100 local diagonals are forced; a smaller |D| holds the most local ones.
      const int forced_d = std::min<int>(std::min(100, n), static_cast<int>(x.slash.size()));
      for (int j = 0; j < forced_d; ++j) EXPECT_EQ(D.count(j), 1u) << what << " diagonal " << j;
      for (int32_t j : x.vertical) EXPECT_TRUE(j >= 0 && j < n) << what;
      for (int32_t j : x.slash) EXPECT_TRUE(j >= 0 && j < n) << what;
    }
  }
}

// 6.2.3: the conversion's guarantees for random N, V, D (with the forced entries) and blocks
// starting anywhere (chunked prefill) as well as at multiples of 64.
TEST(ConvertVsTest, GuaranteesOnRandomIndices) {
  std::mt19937 rng(20261205);
  for (int c = 0; c < 300; ++c) {
    const int n = std::uniform_int_distribution<int>(2, 2000)(rng);
    const int nv = std::uniform_int_distribution<int>(std::min(n, 30), n)(rng);
    const int ns = std::uniform_int_distribution<int>(std::min(n, 50), n)(rng);
    // V: the forced columns plus random others; D: the forced diagonals plus random others.
    std::vector<int32_t> all(n);
    std::iota(all.begin(), all.end(), 0);
    std::set<int32_t> V, D;
    for (int j = 0; j < std::min(n, 30); ++j) V.insert(j);
    for (int j = 0; j < std::min({n, 100, ns}); ++j) D.insert(j);
    std::shuffle(all.begin(), all.end(), rng);
    for (int j = 0; static_cast<int>(V.size()) < nv; ++j) V.insert(all[j]);
    std::shuffle(all.begin(), all.end(), rng);
    for (int j = 0; static_cast<int>(D.size()) < ns; ++j) D.insert(all[j]);
    VsIndex x;
    x.vertical.assign(V.begin(), V.end());
    x.slash.assign(D.rbegin(), D.rend());
    const int first = std::uniform_int_distribution<int>(0, n - 1)(rng) * (c % 2);  // chunk start
    for (int start = first; start < n; start += kBlock) {
      BlockKeys k;
      ConvertVs(x, start, &k);
      const std::string what = "case " + std::to_string(c) + " n " + std::to_string(n) +
                               " start " + std::to_string(start);
      int64_t tiles = 0;
      for (size_t r = 0; r < k.range_start.size(); ++r) {
        ASSERT_EQ((k.range_end[r] - k.range_start[r]) % kBlock, 0) << what;
        ASSERT_GT(k.range_end[r], k.range_start[r]) << what;
        ASSERT_GE(k.range_start[r], 0) << what;
        if (r > 0) ASSERT_GE(k.range_start[r], k.range_end[r - 1]) << what;  // disjoint, step >= 64
        tiles += (k.range_end[r] - k.range_start[r]) / kBlock;
      }
      EXPECT_LE(tiles, static_cast<int64_t>(x.slash.size())) << what;
      EXPECT_LE(k.columns.size(), x.vertical.size()) << what;
      for (size_t i = 0; i < k.columns.size(); ++i) {
        EXPECT_LT(k.columns[i], start) << what;
        if (i > 0) EXPECT_GT(k.columns[i], k.columns[i - 1]) << what;
        for (size_t r = 0; r < k.range_start.size(); ++r) {
          EXPECT_FALSE(k.columns[i] >= k.range_start[r] && k.columns[i] < k.range_end[r]) << what;
        }
      }
      for (int i = start; i < std::min(n, start + kBlock); ++i) {
        const std::vector<int32_t> s = testing::SpecKeys(k, i, n);
        ASSERT_EQ(std::adjacent_find(s.begin(), s.end()), s.end()) << what << " query " << i;
        std::vector<bool> in_s(i + 1, false);
        for (int32_t j : s) in_s[j] = true;  // SpecKeys keeps keys <= i only
        for (int32_t j : x.vertical) {
          if (j <= i) ASSERT_TRUE(in_s[j]) << what << ": query " << i << " misses column " << j;
        }
        for (int32_t d : x.slash) {
          if (d <= i) ASSERT_TRUE(in_s[i - d]) << what << ": query " << i << " misses diagonal " << d;
        }
      }
    }
  }
}

}  // namespace
}  // namespace sieve::kernels::minference
