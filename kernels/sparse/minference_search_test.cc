// The offline pattern search (minference_search.h), SPARSE_ATTENTION.md 6.2.8: a head whose
// keys more than 64 tokens back score at least 30 below the in-window keys gives every
// candidate zero errors, so the search returns the first candidate; a head that needs a far
// vertical column gets the first candidate that keeps it.
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/sparse/minference_search.h"
#include "kernels/sparse/minference_test_util.h"

namespace sieve::kernels::minference {
namespace {

using testing::Batch;

TEST(MInferenceSearchTest, LocalHeadKeepsTheFirstCandidate) {
  // logit(i, j) = sigma q_i . k_j = a (2 i j - j^2) = a i^2 - a (i - j)^2: per query a constant
  // minus a (i - j)^2, so keys 65 or more back sit a * 65^2 = 33.8 below the diagonal key.
  // N = 400 keeps the products small (a i^2 <= 1280, fp32 rounding ~1e-4 of a logit).
  const int n = 400, d = 64;
  const double a = 0.008, inv_sigma = std::sqrt(static_cast<double>(d));
  Batch b({{n, n}}, 16, d, 2, 1, 9);
  for (int t = 0; t < n; ++t) {
    float* k = b.Key(0, 0, t);
    std::fill(k, k + d, 0.0f);
    k[0] = static_cast<float>(t);
    k[1] = static_cast<float>(double{t} * t);
    for (int h = 0; h < 2; ++h) {
      float* q = b.Query(0, h, t);
      std::fill(q, q + d, 0.0f);
      q[0] = static_cast<float>(2 * a * t * inv_sigma);
      q[1] = static_cast<float>(-a * inv_sigma);
    }
  }
  const auto cands = DefaultSearchCandidates();
  std::vector<float> unused;
  const auto r = SearchPatterns(b.Params(&unused), cands, kSearchThreshold, Options{});
  ASSERT_EQ(r.size(), 2u);
  for (const auto& h : r) {
    EXPECT_EQ(h.best, 0);
    for (int64_t e : h.errors) EXPECT_EQ(e, 0);
  }
}

TEST(MInferenceSearchTest, FarVerticalPicksTheFirstCandidateThatKeepsIt) {
  // Every query looks at key j* (logit 25 over noise); values are zero except v_{j*}, so a key
  // set with j* reproduces dense output and one without it gives zeros. A-shape (100, 800)
  // loses j* beyond its window, VS (30, 800) has only the 30 forced columns, VS (100, 800) is
  // the first to select it.
  const int n = 1500, d = 64, jstar = 200;
  Batch b({{n, n}}, 16, d, 2, 1, 10);
  std::mt19937 rng(11);
  std::normal_distribution<float> noise(0.0f, 0.01f);
  std::uniform_real_distribution<float> val(0.5f, 1.0f);
  std::vector<float> u(d);
  float norm = 0;
  for (float& x : u) norm += (x = noise(rng)) * x;
  for (float& x : u) x /= std::sqrt(norm);
  const float alpha = 25.0f * std::sqrt(static_cast<float>(d));
  for (int t = 0; t < n; ++t) {
    float* k = b.Key(0, 0, t);
    float* v = b.Value(0, 0, t);
    for (int i = 0; i < d; ++i) {
      k[i] = t == jstar ? alpha * u[i] : noise(rng);
      v[i] = t == jstar ? val(rng) : 0.0f;
    }
    for (int h = 0; h < 2; ++h) {
      float* q = b.Query(0, h, t);
      for (int i = 0; i < d; ++i) q[i] = u[i] + noise(rng);
    }
  }
  std::vector<float> unused;
  const auto r = SearchPatterns(b.Params(&unused), DefaultSearchCandidates(), kSearchThreshold,
                                Options{});
  for (const auto& h : r) {
    EXPECT_EQ(h.best, 2);
    EXPECT_GT(h.errors[0], 0);
    EXPECT_GT(h.errors[1], 0);
    EXPECT_EQ(h.errors[2], 0);
  }
}

}  // namespace
}  // namespace sieve::kernels::minference
