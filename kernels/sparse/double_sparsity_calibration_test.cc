// DoubleSparsity calibration (SPARSE_ATTENTION.md 6.5.1): on random activations where a few
// channels of each head are planted with 10x magnitude, every statistic ranks exactly those
// channels first, the ranking is a permutation, and the mean covers every Add call.
#include "kernels/sparse/double_sparsity_calibration.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace sieve::kernels {
namespace {

constexpr int kQHeads = 8, kKvHeads = 2, kDim = 64, kTokens = 300;

// Planted channels of query head h; a KV head's are the union over its query heads, so that
// for qk a head's own channels are 100x (q and k) and its group's others 10x (k only).
std::vector<int32_t> Planted(int h) { return {3, 17, 42, (h * 7 + 50) % kDim}; }
std::vector<int32_t> PlantedKv(int g, int group) {
  std::set<int32_t> all;
  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int c : Planted(h)) all.insert(c);
  }
  return {all.begin(), all.end()};
}

TEST(DsChannelStatsTest, PlantedChannelsRankFirst) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int group = kQHeads / kKvHeads;
  std::vector<float> q(kTokens * kQHeads * kDim), k(kTokens * kKvHeads * kDim);
  for (float& x : q) x = u(rng);
  for (float& x : k) x = u(rng);
  for (int t = 0; t < kTokens; ++t) {
    for (int h = 0; h < kQHeads; ++h) {
      for (int c : Planted(h)) q[(t * kQHeads + h) * kDim + c] *= 10.0f;
    }
    for (int g = 0; g < kKvHeads; ++g) {
      for (int c : PlantedKv(g, group)) k[(t * kKvHeads + g) * kDim + c] *= 10.0f;
    }
  }
  for (DsStatistic stat : {DsStatistic::kQ, DsStatistic::kK, DsStatistic::kQK}) {
    DsChannelStats stats(stat, kQHeads, kKvHeads, kDim);
    stats.Add(q.data(), k.data(), 100);  // two batches: the mean must cover both
    stats.Add(q.data() + 100 * kQHeads * kDim, k.data() + 100 * kKvHeads * kDim, kTokens - 100);
    ASSERT_EQ(stats.tokens(), kTokens);
    ASSERT_EQ(stats.heads(), stat == DsStatistic::kK ? kKvHeads : kQHeads);
    for (int h = 0; h < stats.heads(); ++h) {
      const std::vector<int32_t> rank = DsRankChannels(stats.Means(h));
      ASSERT_EQ(std::set<int32_t>(rank.begin(), rank.end()).size(), size_t{kDim});
      ASSERT_EQ(*std::min_element(rank.begin(), rank.end()), 0);
      ASSERT_EQ(*std::max_element(rank.begin(), rank.end()), kDim - 1);
      const std::vector<int32_t> want = stat == DsStatistic::kK ? PlantedKv(h, group) : Planted(h);
      const std::set<int32_t> top(rank.begin(), rank.begin() + want.size());
      ASSERT_EQ(top, std::set<int32_t>(want.begin(), want.end())) << "head " << h;
    }
  }
}

TEST(DsChannelStatsTest, MeansAreExact) {
  // Two tokens, one head: |q| means by hand.
  DsChannelStats stats(DsStatistic::kQ, 1, 1, 2);
  const float q[] = {1.0f, -2.0f, -3.0f, 0.5f};
  stats.Add(q, nullptr, 1);
  stats.Add(q + 2, nullptr, 1);
  EXPECT_EQ(stats.Means(0), (std::vector<double>{2.0, 1.25}));
  EXPECT_EQ(DsRankChannels(stats.Means(0)), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(DsRankChannels({1.0, 3.0, 3.0, 0.0}), (std::vector<int32_t>{1, 2, 0, 3}));
}

}  // namespace
}  // namespace sieve::kernels
