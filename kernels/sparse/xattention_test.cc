// XAttention's estimator and selection (xattention.h) against ../shared SPARSE_ATTENTION.md
// 6.1 and 6.3: the fast fp32 GEMM path against the fp64 direct definition (lengths that are not
// multiples of S or B, GQA and MHA, d 64 and 128, chunks aligned and not), row normalisation,
// forced blocks and shape, threshold coverage / minimality / monotonicity, limits, a planted
// needle block, chunked == unchunked for chunks aligned to B, and 16-bit K caches.
#include "kernels/sparse/xattention.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = 16;

// One sequence's queries and paged keys (pages in shuffled order), random N(0, sigma).
struct Problem {
  int hq, hkv, d, kv_len, q_len, stride, block;
  std::vector<float> q, k;
  std::vector<int32_t> pages;

  Problem(int hq_, int hkv_, int d_, int kv_len_, int q_len_, int stride_, int block_,
          unsigned seed, float sigma = 1.0f)
      : hq(hq_), hkv(hkv_), d(d_), kv_len(kv_len_), q_len(q_len_), stride(stride_), block(block_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.0f, sigma);
    const int num_pages = (kv_len + kPage - 1) / kPage;
    pages.resize(num_pages);
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), rng);
    k.resize(static_cast<size_t>(num_pages) * kPage * hkv * d);
    for (float& x : k) x = n(rng);
    q.resize(static_cast<size_t>(q_len) * hq * d);
    for (float& x : q) x = n(rng);
  }

  float* Key(int pos, int g) {
    return k.data() + ((static_cast<size_t>(pages[pos / kPage]) * kPage + pos % kPage) * hkv + g) * d;
  }

  // The parameters of the last `chunk` queries (all of them by default).
  XAttentionParams Params(int chunk = -1) const {
    if (chunk < 0) chunk = q_len;
    XAttentionParams p;
    p.q = q.data() + static_cast<size_t>(q_len - chunk) * hq * d;
    p.q_row_stride = int64_t{hq} * d;
    p.k_cache = k.data();
    p.page_table = pages.data();
    p.page_size = kPage;
    p.num_q_heads = hq;
    p.num_kv_heads = hkv;
    p.head_dim = d;
    p.q_len = chunk;
    p.kv_len = kv_len;
    p.stride = stride;
    p.block_size = block;
    return p;
  }
};

size_t MassSize(const XAttentionParams& p) {
  return static_cast<size_t>(p.num_q_heads) * XAttentionQueryBlocks(p) * XAttentionKeyBlocks(p);
}

std::vector<double> RefMass(const XAttentionParams& p) {
  std::vector<double> m(MassSize(p));
  XAttentionBlockMassRef(p, m.data());
  return m;
}

std::vector<float> CpuMass(const XAttentionParams& p, int threads = 2) {
  std::vector<float> m(MassSize(p), -1.0f);
  XAttentionBlockMassCpu(p, m.data(), threads);
  return m;
}

// The bound on |z_fast - z_ref| over all (a, b): fp32 accumulation of S*d products errs by at
// most gamma_n * sum |q_e k_e| with gamma_n = n u / (1 - n u), u = 2^-24, and the sum is at most
// |Q_a| |K_b| (Cauchy-Schwarz over the reshaped rows), so
//   dz <= gamma_{S d} * max |Q_a| * max |K_b| / (sqrt(d) S).
double ScoreErrorBound(const Problem& pr) {
  const int S = pr.stride;
  double max_q = 0, max_k = 0;
  const int first = pr.kv_len - pr.q_len;
  for (int h = 0; h < pr.hq; ++h) {
    for (int a = first / S; a <= (pr.kv_len - 1) / S; ++a) {
      double s = 0;
      for (int pos = a * S; pos < a * S + S; ++pos) {
        if (pos < first || pos >= pr.kv_len) continue;
        const float* v = pr.q.data() + (static_cast<size_t>(pos - first) * pr.hq + h) * pr.d;
        for (int e = 0; e < pr.d; ++e) s += double{v[e]} * v[e];
      }
      max_q = std::max(max_q, std::sqrt(s));
    }
  }
  Problem& mut = const_cast<Problem&>(pr);
  for (int g = 0; g < pr.hkv; ++g) {
    for (int b = 0; b <= (pr.kv_len - 1) / S; ++b) {
      double s = 0;
      for (int pos = b * S; pos < std::min(pr.kv_len, b * S + S); ++pos) {
        const float* v = mut.Key(pos, g);
        for (int e = 0; e < pr.d; ++e) s += double{v[e]} * v[e];
      }
      max_k = std::max(max_k, std::sqrt(s));
    }
  }
  const double nu = double{S} * pr.d * std::ldexp(1.0, -24);
  return nu / (1 - nu) * max_q * max_k / (std::sqrt(double{pr.d}) * S);
}

// A block's mass is a sum of probabilities p_b; a score error dz changes each by a factor within
// exp(+-2 dz), so |dA| <= A (exp(2 dz) - 1), plus the fp32 rounding of the exponentials, the
// normalisation and the sums (a few hundred ulps of the row total at these lengths; 1e-5 of it).
double MassTolerance(double a_ref, double dz, double row_total) {
  return a_ref * std::expm1(2 * dz) + 1e-5 * row_total;
}

struct Case {
  int hq, hkv, d, kv_len, q_len, stride, block;
  float sigma;
};

class XAttentionCpuTest : public ::testing::TestWithParam<Case> {};

TEST_P(XAttentionCpuTest, MatchesTheFp64DirectDefinition) {
  const Case c = GetParam();
  Problem pr(c.hq, c.hkv, c.d, c.kv_len, c.q_len, c.stride, c.block, 7 + c.kv_len, c.sigma);
  const XAttentionParams p = pr.Params();
  const std::vector<double> ref = RefMass(p);
  const std::vector<float> fast = CpuMass(p);
  const double dz = ScoreErrorBound(pr);
  ASSERT_LT(dz, 0.05) << "inputs too large for a meaningful comparison";
  const int qb = XAttentionQueryBlocks(p), kb = XAttentionKeyBlocks(p);
  const int m0 = XAttentionFirstQueryBlock(p);
  const int first = c.kv_len - c.q_len;
  std::vector<int32_t> sel_ref, sel_fast, order;
  for (int h = 0; h < c.hq; ++h) {
    for (int m = m0; m < m0 + qb; ++m) {
      const size_t row = (static_cast<size_t>(h) * qb + (m - m0)) * kb;
      // Row normalisation (6.3.2): T_m = the query groups of block m that hold a query.
      const int a0 = std::max(m * c.block / c.stride, first / c.stride);
      const int a1 = std::min((m + 1) * c.block / c.stride, (c.kv_len - 1) / c.stride + 1);
      double total = 0;
      for (int n = 0; n < kb; ++n) total += ref[row + n];
      EXPECT_NEAR(total, a1 - a0, 1e-9 * (a1 - a0));
      for (int n = 0; n < kb; ++n) {
        if (n > m) {
          EXPECT_EQ(ref[row + n], 0.0);
          EXPECT_EQ(fast[row + n], 0.0f);
          continue;
        }
        ASSERT_NEAR(fast[row + n], ref[row + n], MassTolerance(ref[row + n], dz, total))
            << "head " << h << " query block " << m << " key block " << n;
      }
      // Index sets (6.1.6): equal, except blocks whose decision lies within the masses'
      // tolerance of the threshold.
      const double tau = 0.9;
      std::vector<double> fast_row(fast.begin() + row, fast.begin() + row + m + 1);
      XAttentionSelectBlocks(ref.data() + row, m, tau, sel_ref, order);
      XAttentionSelectBlocks(fast_row.data(), m, tau, sel_fast, order);
      if (sel_ref == sel_fast) continue;
      // The rank of every differing block in the reference's order must put the mass before it
      // within the summed tolerance of the target.
      double row_tol = 0;
      for (int n = 0; n <= m; ++n) row_tol += MassTolerance(ref[row + n], dz, total);
      std::vector<int32_t> diff;
      std::set_symmetric_difference(sel_ref.begin(), sel_ref.end(), sel_fast.begin(),
                                    sel_fast.end(), std::back_inserter(diff));
      for (int32_t n : diff) {
        double before = ref[row] + (m > 0 ? ref[row + m] : 0);
        for (int j = 1; j < m; ++j) {
          if (ref[row + j] > ref[row + n] || (ref[row + j] == ref[row + n] && j < n)) {
            before += ref[row + j];
          }
        }
        EXPECT_NEAR(before, tau * total, row_tol) << "block " << n << " differs off the cut";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, XAttentionCpuTest,
    ::testing::Values(Case{4, 2, 64, 300, 300, 8, 32, 1.0f},      // GQA 2, N not a multiple of S*
                      Case{2, 2, 128, 517, 389, 16, 128, 0.7f},   // MHA, chunk at 128, N % S != 0
                      Case{8, 2, 64, 450, 200, 4, 64, 1.2f},      // GQA 4, chunk inside a block
                      Case{4, 1, 128, 1000, 1000, 16, 128, 0.6f},  // longer, G = 4
                      Case{4, 4, 64, 77, 77, 8, 16, 1.0f},         // short, MHA
                      Case{2, 1, 64, 5, 3, 4, 16, 1.0f}));         // one block, tiny

TEST(XAttentionTest, SelectionCoversMinimallyAndMonotonically) {
  Problem pr(4, 2, 64, 1100, 1100, 8, 64, 3, 1.5f);
  const XAttentionParams p = pr.Params();
  const std::vector<double> ref = RefMass(p);
  const int qb = XAttentionQueryBlocks(p), kb = XAttentionKeyBlocks(p);
  std::vector<int32_t> sel, lo_sel, order;
  for (int h = 0; h < 4; ++h) {
    for (int m = 0; m < qb; ++m) {
      const double* row = ref.data() + (static_cast<size_t>(h) * qb + m) * kb;
      double total = 0;
      for (int n = 0; n <= m; ++n) total += row[n];
      for (double tau : {0.5, 0.8, 0.9, 0.95}) {
        XAttentionSelectBlocks(row, m, tau, sel, order);
        // Forced blocks and shape (6.3.3).
        ASSERT_TRUE(std::binary_search(sel.begin(), sel.end(), 0));
        ASSERT_TRUE(std::binary_search(sel.begin(), sel.end(), m));
        ASSERT_LE(sel.back(), m);
        ASSERT_TRUE(std::adjacent_find(sel.begin(), sel.end()) == sel.end());
        // Coverage (6.3.4).
        double covered = 0;
        for (int32_t n : sel) covered += row[n];
        EXPECT_GE(covered, tau * total * (1 - 1e-12));
        // Minimality: without the lightest non-forced block, below the target.
        double lightest = -1;
        for (int32_t n : sel) {
          if (n != 0 && n != m && (lightest < 0 || row[n] < lightest)) lightest = row[n];
        }
        if (lightest >= 0) EXPECT_LT(covered - lightest, tau * total);
        // Monotonicity: tau 0.5 selects a subset.
        XAttentionSelectBlocks(row, m, 0.5, lo_sel, order);
        EXPECT_TRUE(std::includes(sel.begin(), sel.end(), lo_sel.begin(), lo_sel.end()));
      }
      // Limits (6.3.5, 2.7): tau <= 0 keeps the forced blocks only; tau > 1 every block.
      XAttentionSelectBlocks(row, m, 0.0, sel, order);
      const std::vector<int32_t> forced =
          m == 0 ? std::vector<int32_t>{0} : std::vector<int32_t>{0, m};
      EXPECT_EQ(sel, forced);
      XAttentionSelectBlocks(row, m, 1.01, sel, order);
      EXPECT_EQ(static_cast<int>(sel.size()), m + 1);
    }
  }
}

TEST(XAttentionTest, PlantedNeedleBlockIsSelected) {
  // Block n* = 2 of one KV head carries keys equal to a scaled mean of query block m = 9's
  // queries of the heads that read it (6.3.6).
  const int B = 64, S = 8, m = 9, needle = 2;
  Problem pr(4, 2, 64, 1024, 1024, S, B, 11, 1.0f);
  for (int g = 0; g < 2; ++g) {
    std::vector<float> mean(64, 0.0f);
    for (int pos = m * B; pos < (m + 1) * B; ++pos) {
      for (int hh = 0; hh < 2; ++hh) {
        const float* v = pr.q.data() + (static_cast<size_t>(pos) * 4 + g * 2 + hh) * 64;
        for (int e = 0; e < 64; ++e) mean[e] += v[e] / (2 * B);
      }
    }
    for (int pos = needle * B; pos < (needle + 1) * B; ++pos) {
      float* k = pr.Key(pos, g);
      for (int e = 0; e < 64; ++e) k[e] = 4.0f * mean[e] * 8.0f;
    }
  }
  const XAttentionParams p = pr.Params();
  const std::vector<float> fast = CpuMass(p);
  const std::vector<double> ref = RefMass(p);
  const int qb = XAttentionQueryBlocks(p), kb = XAttentionKeyBlocks(p);
  std::vector<int32_t> sel, order;
  for (int h = 0; h < 4; ++h) {
    const size_t row = (static_cast<size_t>(h) * qb + m) * kb;
    std::vector<double> fast_row(fast.begin() + row, fast.begin() + row + m + 1);
    XAttentionSelectBlocks(fast_row.data(), m, 0.9, sel, order);
    EXPECT_TRUE(std::binary_search(sel.begin(), sel.end(), needle)) << "head " << h;
    XAttentionSelectBlocks(ref.data() + row, m, 0.9, sel, order);
    EXPECT_TRUE(std::binary_search(sel.begin(), sel.end(), needle)) << "head " << h;
  }
}

TEST(XAttentionTest, ChunksAlignedToBlocksScoreAsTheWholePrompt) {
  // 6.3.7: with k_len > q_len the rows are offset by o_b = (k_len - q_len) / B; with chunks
  // aligned to B each query block's masses equal the unchunked prefill's (bitwise for the fast
  // path: the same groups meet the same packed keys in the same order).
  const int B = 64;
  Problem pr(4, 2, 64, 700, 700, 8, B, 5, 1.2f);
  const XAttentionParams whole = pr.Params();
  const std::vector<float> all = CpuMass(whole);
  const std::vector<double> all_ref = RefMass(whole);
  const int kb = XAttentionKeyBlocks(whole), qb_all = XAttentionQueryBlocks(whole);
  for (int chunk : {700 - 128, 700 - 640, 60}) {
    const XAttentionParams part = pr.Params(chunk);
    const int m0 = XAttentionFirstQueryBlock(part), qb = XAttentionQueryBlocks(part);
    EXPECT_EQ(m0, (700 - chunk) / B);
    const std::vector<float> got = CpuMass(part, 1);
    const std::vector<double> got_ref = RefMass(part);
    const bool aligned = (700 - chunk) % B == 0;
    for (int h = 0; h < 4; ++h) {
      for (int m = m0; m < m0 + qb; ++m) {
        if (!aligned && m == m0) continue;  // a block split by the chunk boundary differs
        for (int n = 0; n < kb; ++n) {
          const size_t a = (static_cast<size_t>(h) * qb_all + m) * kb + n;
          const size_t b = (static_cast<size_t>(h) * qb + (m - m0)) * kb + n;
          ASSERT_EQ(got[b], all[a]) << "chunk " << chunk << " head " << h << " block " << m;
          ASSERT_EQ(got_ref[b], all_ref[a]);
        }
      }
    }
  }
}

TEST(XAttentionTest, ResultsDoNotDependOnThreads) {
  Problem pr(4, 2, 64, 900, 600, 16, 128, 9);
  const XAttentionParams p = pr.Params();
  EXPECT_EQ(CpuMass(p, 1), CpuMass(p, 3));
}

// A 16-bit K cache (kv_cache.dtype bfloat16, and float16) is widened exactly as the keys are
// read, so both estimators must give exactly what they give on an fp32 cache holding the
// widened values: same panels, same sums (the fp32 test above then covers the 16-bit caches).
TEST(XAttentionTest, SixteenBitKeysScoreAsTheirWidenedValues) {
  for (const KvDtype t : {KvDtype::kBfloat16, KvDtype::kFloat16}) {
    Problem pr(4, 2, 64, 700, 450, 8, 64, 21);
    const std::vector<uint16_t> bits = RoundToKv16(pr.k, t);
    const XAttentionParams wide = pr.Params();
    XAttentionParams narrow = wide;
    narrow.k_cache = bits.data();
    narrow.k_dtype = t;
    SCOPED_TRACE(KvDtypeName(t));
    EXPECT_EQ(CpuMass(narrow), CpuMass(wide));
    EXPECT_EQ(RefMass(narrow), RefMass(wide));
  }
}

}  // namespace
}  // namespace sieve::kernels
