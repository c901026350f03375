// SgemmNT and LinearCpu (oneDNN sgemm on our threads) against an fp64 reference on fresh random
// inputs in [-1, 1]: odd and tiny shapes, column counts that are and are not multiples of the
// thread block, the embedded model's and an lm_head's shapes, leading dimensions wider than the
// matrices (the padding must stay untouched), 1-3 threads, bias, k = 0, and concurrent callers.
//
// Tolerance, per element: |c - c64| <= gamma(k + 1) * (sum_l |a_il b_jl| + |bias_j|) with
// gamma(n) = n u / (1 - n u), u = 2^-24. This is the worst-case bound for a k-term fp32 dot
// product summed in any order, with or without fused multiply-adds (each product and partial sum
// rounds at most once per term), plus one rounding for the bias; c64 is exact to ~k 2^-53, far
// below it. It holds for any blocking oneDNN chooses, so a failure means a wrong element.
#include "kernels/cpu/gemm_cpu.h"

#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sieve::kernels {
namespace {

constexpr double kU = 1.0 / (1 << 24);

double Gamma(int64_t n) { return n * kU / (1.0 - n * kU); }

struct Case {
  int64_t m, n, k;
};

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Checks c (ldc) against a * b^T (+ bias) in fp64 with the bound above; returns the number of
// elements out of bound (reports the first few).
int CheckProduct(const Case& s, const std::vector<float>& a, int64_t lda,
                 const std::vector<float>& b, int64_t ldb, const float* bias,
                 const std::vector<float>& c, int64_t ldc) {
  int bad = 0;
  for (int64_t i = 0; i < s.m; ++i) {
    for (int64_t j = 0; j < s.n; ++j) {
      double exact = 0, magnitude = 0;
      for (int64_t l = 0; l < s.k; ++l) {
        const double p = static_cast<double>(a[i * lda + l]) * b[j * ldb + l];
        exact += p;
        magnitude += std::fabs(p);
      }
      if (bias != nullptr) {
        exact += bias[j];
        magnitude += std::fabs(bias[j]);
      }
      const double err = std::fabs(c[i * ldc + j] - exact);
      if (err > Gamma(s.k + 1) * magnitude && bad++ < 5) {
        ADD_FAILURE() << "c[" << i << ", " << j << "] = " << c[i * ldc + j] << ", exact "
                      << exact << ", bound " << Gamma(s.k + 1) * magnitude;
      }
    }
  }
  return bad;
}

const Case kCases[] = {
    {1, 1, 1},       {3, 50, 7},      {5, 47, 33},     {1, 48, 256},   {1, 97, 100},
    {1, 1536, 256},  {1, 256, 768},   {16, 4096, 256}, {37, 512, 256}, {120, 1536, 256},
    {67, 256, 768}, {129, 145, 300},
};

TEST(SgemmNTTest, MatchesFp64WithPaddedLeadingDimensions) {
  const uint32_t seed = std::random_device()();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (const Case& s : kCases) {
    for (int threads : {1, 2, 3}) {
      SCOPED_TRACE("m " + std::to_string(s.m) + " n " + std::to_string(s.n) + " k " +
                   std::to_string(s.k) + " threads " + std::to_string(threads));
      const int64_t lda = s.k + 3, ldb = s.k + 5, ldc = s.n + 7;
      const std::vector<float> a = Random(rng, s.m * lda), b = Random(rng, s.n * ldb);
      std::vector<float> c = Random(rng, s.m * ldc);
      const std::vector<float> before = c;
      SgemmNT(s.m, s.n, s.k, a.data(), lda, b.data(), ldb, c.data(), ldc, threads);
      EXPECT_EQ(CheckProduct(s, a, lda, b, ldb, nullptr, c, ldc), 0);
      for (int64_t i = 0; i < s.m; ++i) {
        for (int64_t j = s.n; j < ldc; ++j) {
          ASSERT_EQ(c[i * ldc + j], before[i * ldc + j]) << "padding written at " << i << ", " << j;
        }
      }
    }
  }
}

TEST(LinearCpuTest, MatchesFp64WithAndWithoutBias) {
  const uint32_t seed = std::random_device()();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (const Case& s : kCases) {
    for (bool with_bias : {false, true}) {
      SCOPED_TRACE("m " + std::to_string(s.m) + " n " + std::to_string(s.n) + " k " +
                   std::to_string(s.k) + (with_bias ? " bias" : ""));
      const std::vector<float> x = Random(rng, s.m * s.k), w = Random(rng, s.n * s.k);
      const std::vector<float> bias = Random(rng, s.n);
      std::vector<float> out = Random(rng, s.m * s.n);
      LinearCpu(x.data(), w.data(), with_bias ? bias.data() : nullptr, s.m, s.k, s.n,
                out.data(), 2);
      EXPECT_EQ(CheckProduct(s, x, s.k, w, s.k, with_bias ? bias.data() : nullptr, out, s.n), 0);
    }
  }
}

TEST(SgemmNTTest, EmptyInnerDimensionZeroesTheOutput) {
  std::mt19937 rng(std::random_device{}());
  std::vector<float> c = Random(rng, 4 * 9);
  SgemmNT(3, 5, 0, nullptr, 1, nullptr, 1, c.data(), 9, 2);
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t j = 0; j < 9; ++j) {
      if (j < 5) EXPECT_EQ(c[i * 9 + j], 0.0f) << i << ", " << j;
      else EXPECT_NE(c[i * 9 + j], 0.0f) << "padding zeroed at " << i << ", " << j;
    }
  }
}

// Engine streams run linear layers on several worker threads at once: each caller must get its
// own product (the library's scratch buffers are not shared between concurrent calls).
TEST(LinearCpuTest, ConcurrentCallersEachGetTheirProduct) {
  const uint32_t seed = std::random_device()();
  SCOPED_TRACE("seed " + std::to_string(seed));
  constexpr int kCallers = 4;
  const Case s{96, 768, 256};
  std::mt19937 rng(seed);
  std::vector<std::vector<float>> x, w, out(kCallers);
  for (int t = 0; t < kCallers; ++t) {
    x.push_back(Random(rng, s.m * s.k));
    w.push_back(Random(rng, s.n * s.k));
  }
  std::vector<std::thread> callers;
  for (int t = 0; t < kCallers; ++t) {
    callers.emplace_back([&, t] {
      out[t].assign(s.m * s.n, 0.0f);
      for (int rep = 0; rep < 20; ++rep) {
        LinearCpu(x[t].data(), w[t].data(), nullptr, s.m, s.k, s.n, out[t].data(), 2);
      }
    });
  }
  for (std::thread& c : callers) c.join();
  for (int t = 0; t < kCallers; ++t) {
    SCOPED_TRACE("caller " + std::to_string(t));
    EXPECT_EQ(CheckProduct(s, x[t], s.k, w[t], s.k, nullptr, out[t], s.n), 0);
  }
}

}  // namespace
}  // namespace sieve::kernels
