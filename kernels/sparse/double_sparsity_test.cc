// DoubleSparsity label cache and selection (double_sparsity.h) on fresh random inputs, against
// the fp64 reference and the definitions of SPARSE_ATTENTION.md 6.1 and 6.5:
//   - label content after incremental appends (a prefill chunk, chunks starting mid-page, decode
//     tokens): 16-bit labels are exactly the rounded key channels; 4-bit ones within half a step;
//   - DsSelectCpu against DsSelectRef, the tolerant check of 6.1.6: same set sizes, and every
//     fast-selected position has a reference score >= the reference's k-th score - eps;
//   - selection shape (|I| = min(k, L), distinct, increasing, in [0, L)), budget nesting,
//     determinism;
//   - oracle: all channels, 16-bit labels of fp16-representable keys: the exact top-k of q.k, and
//     PagedAttentionCpu over the plan equals the reference attention over the exact top-k;
//   - planted needle: selected, and the output is close to its value;
//   - a budget covering the context: PagedAttentionCpu over the plan equals dense attention.
//
// eps (fast vs reference scores): the fast path sums `r` fp32 products per query head (and G
// heads with shared selection); by the standard bound the error is <= gamma_r sum |q_c x_c| with
// gamma_r ~ r u, u = 2^-24. The 4-bit form step * sum q_c code_c + min * sum q_c has terms up to
// 15 step |q_c| <= (|min| + |max|) |q_c|, so its bound is a few times larger. We take
// eps = 8 (r + 4) u G sum_c |q_c| max|x|: a factor >= 4 above either bound.
// Attention tolerance: relative L2 error per row <= 2e-5, derived in paged_attention_cpu_test.cc
// (fp32 kernel against the fp64-accumulating reference, <= ~3000 keys).
#include "kernels/sparse/double_sparsity.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/double_sparsity_internal.h"

namespace sieve::kernels {
namespace {

constexpr double kU = 1.0 / 16777216.0;  // fp32 unit roundoff
constexpr double kAttnTol = 2e-5;

struct Case {
  int head_dim, group, page_size, channels;
  DsLabelFormat format;
  bool per_kv, shared;
};

std::string FormatName(DsLabelFormat f) {
  return f == DsLabelFormat::kF16 ? "f16" : f == DsLabelFormat::kBf16 ? "bf16" : "int4";
}

std::string Name(const ::testing::TestParamInfo<Case>& i) {
  const Case& c = i.param;
  return "d" + std::to_string(c.head_dim) + "_g" + std::to_string(c.group) + "_p" +
         std::to_string(c.page_size) + "_r" + std::to_string(c.channels) + "_" +
         FormatName(c.format) + (c.per_kv ? "_kvlabels" : "_qlabels") +
         (c.shared ? "_shared" : "_perhead");
}

// A batch of decode sequences in a shuffled paged cache: random keys, values and queries in
// [-1, 1], random channel lists, labels written incrementally as an engine would.
struct World {
  DoubleSparsityShape sh;
  std::vector<int32_t> kv_lens, page_table, channels;
  int stride = 0, pages = 0;
  std::vector<float> k, v, q;
  std::vector<uint8_t> labels;
  std::mt19937 rng;

  World(const Case& c, std::vector<int> lens, uint32_t seed, bool round_keys_to_f16 = false)
      : kv_lens(lens.begin(), lens.end()), rng(seed) {
    sh.num_kv_heads = 2;
    sh.num_q_heads = 2 * c.group;
    sh.head_dim = c.head_dim;
    sh.page_size = c.page_size;
    sh.channels = c.channels;
    sh.format = c.format;
    sh.per_kv_head_labels = c.per_kv;
    sh.shared_selection = c.shared;
    EXPECT_EQ(DsValidateShape(sh), "");
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int len : lens) stride = std::max(stride, (len + c.page_size - 1) / c.page_size);
    pages = stride * static_cast<int>(lens.size()) + 1;
    std::vector<int32_t> ids(pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    page_table.assign(ids.begin(), ids.begin() + stride * lens.size());
    k.resize(static_cast<size_t>(pages) * c.page_size * sh.num_kv_heads * c.head_dim);
    v.resize(k.size());
    q.resize(lens.size() * sh.num_q_heads * c.head_dim);
    for (auto* vec : {&k, &v, &q}) {
      for (float& x : *vec) x = u(rng);
    }
    if (round_keys_to_f16) {
      for (float& x : k) x = F16ToFloat(ds_internal::FloatToF16(x));
    }
    for (int h = 0; h < DsLabelHeads(sh); ++h) {
      std::vector<int32_t> perm(c.head_dim);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      channels.insert(channels.end(), perm.begin(), perm.begin() + c.channels);
    }
    EXPECT_EQ(DsValidateChannels(sh, channels.data()), "");
    // Poison: every label read must have been written.
    labels.assign(static_cast<size_t>(pages) * DsLabelPageBytes(sh), 0xff);
    WriteAllLabels();
  }

  // Appends every sequence's tokens in steps of random size (the first a prefill chunk, later
  // ones starting mid-page, the last few one token each), reading keys from the packed tensor
  // or the cache alternately.
  void WriteAllLabels() {
    const int n = static_cast<int>(kv_lens.size());
    std::vector<int32_t> done(n, 0);
    for (int round = 0;; ++round) {
      std::vector<int32_t> lens(n), qs(n + 1, 0);
      for (int s = 0; s < n; ++s) {
        const int left = kv_lens[s] - done[s];
        int step = left <= 3 ? std::min(left, 1) : std::uniform_int_distribution<int>(1, left)(rng);
        lens[s] = done[s] + step;
        qs[s + 1] = qs[s] + step;
      }
      if (qs[n] == 0) break;
      std::vector<float> packed(static_cast<size_t>(qs[n]) * sh.num_kv_heads * sh.head_dim);
      for (int s = 0; s < n; ++s) {
        for (int t = done[s]; t < lens[s]; ++t) {
          const float* src = Key(s, t, 0);
          std::copy(src, src + sh.num_kv_heads * sh.head_dim,
                    packed.begin() + (qs[s] + t - done[s]) * sh.num_kv_heads * sh.head_dim);
        }
      }
      DsAppendParams p;
      p.k = round % 2 == 0 ? packed.data() : nullptr;
      p.k_cache = k.data();
      p.page_table = page_table.data();
      p.page_table_stride = stride;
      p.kv_lens = lens.data();
      p.query_start = qs.data();
      p.num_seqs = n;
      p.channels = channels.data();
      p.labels = labels.data();
      DsWriteLabels(sh, p, 2);
      done = lens;
    }
  }

  const float* Key(int s, int t, int kvh) const {
    const int64_t page = page_table[s * stride + t / sh.page_size];
    return k.data() + ((page * sh.page_size + t % sh.page_size) * sh.num_kv_heads + kvh) * sh.head_dim;
  }

  DsSelectParams Select(int budget) const {
    DsSelectParams p;
    p.q = q.data();
    p.page_table = page_table.data();
    p.page_table_stride = stride;
    p.kv_lens = kv_lens.data();
    p.num_seqs = static_cast<int>(kv_lens.size());
    p.channels = channels.data();
    p.labels = labels.data();
    p.token_budget = budget;
    return p;
  }

  // Attention of the decode queries (one per sequence), dense or over `sparse`.
  std::vector<float> Attend(const SparseAttentionIndex* sparse, bool reference) const {
    std::vector<int32_t> qs(kv_lens.size() + 1);
    std::iota(qs.begin(), qs.end(), 0);
    std::vector<float> out(q.size(), -7.0f);
    PagedAttentionParams<float> p;
    p.q = q.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = out.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.query_start = qs.data();
    p.page_table_stride = stride;
    p.num_seqs = static_cast<int>(kv_lens.size());
    p.num_q_heads = sh.num_q_heads;
    p.num_kv_heads = sh.num_kv_heads;
    p.head_dim = sh.head_dim;
    p.page_size = sh.page_size;
    p.scale = 1.0f / std::sqrt(static_cast<float>(sh.head_dim));
    p.sparse = sparse;
    if (reference) {
      PagedAttentionRef(p, 2);
    } else {
      PagedAttentionCpu(p, 2);
    }
    return out;
  }
};

// Per-row relative L2 error of `got` against `want`, both [rows, d].
void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, int d,
                 double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t r = 0; r * d < got.size(); ++r) {
    double err = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      err += std::pow(double{got[r * d + i]} - want[r * d + i], 2);
      norm += std::pow(double{want[r * d + i]}, 2);
    }
    ASSERT_LE(std::sqrt(err), tol * std::sqrt(norm)) << "row " << r;
  }
}

std::vector<int32_t> Row(const DsSelection& x, int64_t row) {
  return {x.columns.begin() + x.column_start[row], x.columns.begin() + x.column_start[row + 1]};
}

// |I| = min(k, L), increasing (so distinct), in [0, L); the selection heads of a group agree
// under shared selection.
void ExpectShape(const World& w, const DsSelection& x, int budget) {
  const int hq = w.sh.num_q_heads, group = hq / w.sh.num_kv_heads;
  ASSERT_EQ(x.column_start.size(), w.kv_lens.size() * hq + 1);
  for (size_t s = 0; s < w.kv_lens.size(); ++s) {
    for (int h = 0; h < hq; ++h) {
      const std::vector<int32_t> r = Row(x, s * hq + h);
      ASSERT_EQ(static_cast<int>(r.size()), std::min(budget, w.kv_lens[s]));
      for (size_t i = 0; i < r.size(); ++i) {
        ASSERT_GE(r[i], 0);
        ASSERT_LT(r[i], w.kv_lens[s]);
        if (i > 0) {
          ASSERT_LT(r[i - 1], r[i]);
        }
      }
      if (w.sh.shared_selection && h % group != 0) {
        ASSERT_EQ(r, Row(x, s * hq + h - h % group));
      }
    }
  }
}

class DoubleSparsityTest : public ::testing::TestWithParam<Case> {};

TEST_P(DoubleSparsityTest, LabelsHoldTheKeyChannels) {
  const Case& c = GetParam();
  World w(c, {1, c.page_size, 3 * c.page_size + 1, 517}, 11);
  const int group = w.sh.num_q_heads / w.sh.num_kv_heads;
  const int64_t page_bytes = DsLabelPageBytes(w.sh);
  for (size_t s = 0; s < w.kv_lens.size(); ++s) {
    for (int t = 0; t < w.kv_lens[s]; ++t) {
      const uint8_t* page = w.labels.data() + w.page_table[s * w.stride + t / c.page_size] * page_bytes;
      for (int lh = 0; lh < DsLabelHeads(w.sh); ++lh) {
        const float* key = w.Key(static_cast<int>(s), t, c.per_kv ? lh : lh / group);
        const int32_t* ch = w.channels.data() + lh * c.channels;
        float lo = key[ch[0]], hi = key[ch[0]];
        for (int i = 0; i < c.channels; ++i) {
          lo = std::min(lo, key[ch[i]]);
          hi = std::max(hi, key[ch[i]]);
        }
        for (int i = 0; i < c.channels; ++i) {
          const float x = key[ch[i]];
          const float got = DsReadLabel(w.sh, page, lh, i, t % c.page_size);
          if (c.format == DsLabelFormat::kF16) {
            ASSERT_EQ(got, F16ToFloat(ds_internal::FloatToF16(x)));
          } else if (c.format == DsLabelFormat::kBf16) {
            ASSERT_EQ(got, Bf16ToFloat(FloatToBf16(x)));
          } else {
            // Half a quantisation step, plus fp32 rounding of step and dequantisation (values
            // are <= 1 in magnitude: a few u).
            ASSERT_LE(std::abs(got - x), (hi - lo) / 30.0 + 8 * kU) << "t " << t << " c " << i;
          }
        }
      }
    }
  }
}

// DsSelectCpu against DsSelectRef on `w` for each budget (see eps in the file comment).
void ExpectFastMatchesReference(const Case& c, const World& w, const std::vector<int>& budgets) {
  const int group = w.sh.num_q_heads / w.sh.num_kv_heads;
  for (int budget : budgets) {
    const DsSelectParams p = w.Select(budget);
    DsSelection fast, ref;
    DsSelectCpu(w.sh, p, fast, 2);
    DsSelectRef(w.sh, p, ref);
    ExpectShape(w, fast, budget);
    ExpectShape(w, ref, budget);
    ASSERT_EQ(fast.column_start, ref.column_start);
    const int sel_heads = c.shared ? w.sh.num_kv_heads : w.sh.num_q_heads;
    for (size_t s = 0; s < w.kv_lens.size(); ++s) {
      const int len = w.kv_lens[s];
      if (budget >= len) continue;
      for (int sh = 0; sh < sel_heads; ++sh) {
        const std::vector<double> sc = DsReferenceScores(w.sh, p, static_cast<int>(s), sh);
        std::vector<double> sorted = sc;
        std::nth_element(sorted.begin(), sorted.begin() + (budget - 1), sorted.end(),
                         std::greater<double>());
        const double boundary = sorted[budget - 1];
        double qabs = 0;
        const int h0 = c.shared ? sh * group : sh;
        for (int h = h0; h < h0 + (c.shared ? group : 1); ++h) {
          const int lh = c.per_kv ? h / group : h;
          for (int i = 0; i < c.channels; ++i) {
            qabs += std::abs(w.q[(s * w.sh.num_q_heads + h) * c.head_dim + w.channels[lh * c.channels + i]]);
          }
        }
        const double eps = 8.0 * (c.channels + 4) * kU * qabs;  // labels are <= 1 in magnitude
        const int h = c.shared ? sh * group : sh;
        for (int32_t t : Row(fast, s * w.sh.num_q_heads + h)) {
          ASSERT_GE(sc[t], boundary - eps) << "seq " << s << " head " << sh << " pos " << t;
        }
      }
    }
  }
}

TEST_P(DoubleSparsityTest, FastSelectionMatchesReference) {
  const Case& c = GetParam();
  World w(c, {1, 40, 300, 1000, 2999}, 23);
  ExpectFastMatchesReference(c, w, {1, 17, 64, 333, 4000});
}

// Every instruction set the host runs (AVX-512, AVX2, SSE4 where compiled in): vector widths
// change the vector and scalar-tail split of each page.
TEST_P(DoubleSparsityTest, EveryTargetMatchesTheReference) {
  const Case& c = GetParam();
  World w(c, {40, 1000}, 29);
  int tested = 0;
  for (int64_t target : {int64_t{HWY_AVX3}, int64_t{HWY_AVX2}, int64_t{HWY_SSE4}}) {
    if ((target & hwy::SupportedTargets() & HWY_TARGETS) == 0) continue;
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    ExpectFastMatchesReference(c, w, {7, 200});
    ++tested;
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GE(tested, 1);
}

TEST_P(DoubleSparsityTest, BudgetsNestAndRepeat) {
  const Case& c = GetParam();
  World w(c, {700, 1500}, 31);
  DsSelection small, large, again;
  DsSelectRef(w.sh, w.Select(50), small);
  DsSelectRef(w.sh, w.Select(200), large);
  for (size_t row = 0; row + 1 < small.column_start.size(); ++row) {
    const std::vector<int32_t> a = Row(small, row), b = Row(large, row);
    ASSERT_TRUE(std::includes(b.begin(), b.end(), a.begin(), a.end())) << "row " << row;
  }
  DsSelectCpu(w.sh, w.Select(200), large, 2);
  DsSelectCpu(w.sh, w.Select(200), again, 1);
  EXPECT_EQ(large.columns, again.columns);
}

TEST_P(DoubleSparsityTest, BudgetCoveringTheContextIsDense) {
  const Case& c = GetParam();
  World w(c, {1, 5, 2 * c.page_size, 1234}, 41);
  DsSelection x;
  DsSelectCpu(w.sh, w.Select(1234), x, 2);
  ExpectShape(w, x, 1234);
  const SparseAttentionIndex index = x.Index(c.page_size);
  ExpectClose(w.Attend(&index, false), w.Attend(nullptr, true), c.head_dim, kAttnTol);
}

TEST_P(DoubleSparsityTest, PlantedNeedleIsSelected) {
  const Case& c = GetParam();
  World w(c, {900, 2500}, 53);
  const int group = w.sh.num_q_heads / w.sh.num_kv_heads;
  // The query heads of a group get the same query (so that one key can align with each head's
  // channels); every other key becomes small, and key t* of each sequence and KV head is +-10 on
  // every channel in the sign of the query, with value 5. Then t* scores 10 |q[C]|_1 against at
  // most 0.01 |q[C]|_1 for the others on any channel set C.
  for (float& x : w.k) x *= 0.01f;
  const int hq = w.sh.num_q_heads, d = c.head_dim;
  for (size_t s = 0; s < w.kv_lens.size(); ++s) {
    for (int h = 0; h < hq; ++h) {
      std::copy_n(w.q.begin() + (s * hq + h - h % group) * d, d, w.q.begin() + (s * hq + h) * d);
    }
  }
  std::vector<int> needle;
  for (size_t s = 0; s < w.kv_lens.size(); ++s) {
    const int t = std::uniform_int_distribution<int>(0, w.kv_lens[s] - 2)(w.rng);
    needle.push_back(t);
    for (int kvh = 0; kvh < w.sh.num_kv_heads; ++kvh) {
      float* key = const_cast<float*>(w.Key(static_cast<int>(s), t, kvh));
      const float* q = w.q.data() + (s * hq + kvh * group) * d;
      for (int i = 0; i < d; ++i) key[i] = q[i] >= 0 ? 10.0f : -10.0f;
      const int64_t off = key - w.k.data();
      for (int i = 0; i < d; ++i) w.v[off + i] = 5.0f;
    }
  }
  w.WriteAllLabels();
  DsSelection x;
  DsSelectCpu(w.sh, w.Select(32), x, 2);
  for (size_t s = 0; s < w.kv_lens.size(); ++s) {
    for (int h = 0; h < hq; ++h) {
      const std::vector<int32_t> r = Row(x, s * hq + h);
      ASSERT_TRUE(std::binary_search(r.begin(), r.end(), needle[s])) << "seq " << s << " head " << h;
    }
  }
  // The needle's logit exceeds every other by ~(10 - 0.01) |q|_1 / sqrt(d) (about 40 at
  // d = 64): its softmax weight is 1 within e^-30 per competitor, so the output is its value.
  const SparseAttentionIndex index = x.Index(c.page_size);
  const std::vector<float> out = w.Attend(&index, false);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], 5.0f, 1e-3f) << i;
}

// Channel counts: r = 16 (1/8 of 128, the 1/16-token headline's companion), odd r, small pages
// that are not a multiple of the vector width, 4-bit with odd page sizes (a byte without a
// high slot).
INSTANTIATE_TEST_SUITE_P(
    Shapes, DoubleSparsityTest,
    ::testing::Values(Case{128, 4, 16, 16, DsLabelFormat::kF16, false, false},
                      Case{128, 4, 16, 16, DsLabelFormat::kBf16, false, true},
                      Case{128, 4, 16, 16, DsLabelFormat::kF16, true, true},
                      Case{128, 4, 16, 16, DsLabelFormat::kInt4, true, false},
                      Case{64, 1, 16, 8, DsLabelFormat::kInt4, false, false},
                      Case{64, 1, 7, 5, DsLabelFormat::kF16, false, false},
                      Case{64, 4, 7, 9, DsLabelFormat::kInt4, false, true},
                      Case{128, 1, 32, 32, DsLabelFormat::kBf16, false, false},
                      Case{64, 4, 33, 16, DsLabelFormat::kInt4, false, false}),
    Name);

// 6.5.3: all channels, 16-bit labels of keys that fp16 represents exactly: the approximate scores
// are the exact q.k up to fp32 summation, so the selection is the exact top-k (positions whose
// exact score is within eps of the boundary aside), and the output equals attention over it.
TEST(DoubleSparsityOracle, AllChannelsSelectTheExactTopK) {
  for (int group : {1, 4}) {
    const Case c{64, group, 16, 64, DsLabelFormat::kF16, false, false};
    World w(c, {300, 2047}, 61 + group, /*round_keys_to_f16=*/true);
    const int budget = 100, hq = w.sh.num_q_heads, d = c.head_dim;
    DsSelection x;
    DsSelectCpu(w.sh, w.Select(budget), x, 2);
    DsSelection exact = x;
    for (size_t s = 0; s < w.kv_lens.size(); ++s) {
      for (int h = 0; h < hq; ++h) {
        const float* q = w.q.data() + (s * hq + h) * d;
        std::vector<double> sc(w.kv_lens[s]);
        double qabs = 0;
        for (int i = 0; i < d; ++i) qabs += std::abs(q[i]);
        for (int t = 0; t < w.kv_lens[s]; ++t) {
          const float* key = w.Key(static_cast<int>(s), t, h / group);
          for (int i = 0; i < d; ++i) sc[t] += double{q[i]} * key[i];
        }
        std::vector<int32_t> order(sc.size());
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sc[a] > sc[b]; });
        std::vector<int32_t> top(order.begin(), order.begin() + budget);
        std::sort(top.begin(), top.end());
        const int64_t row = s * hq + h;
        std::copy(top.begin(), top.end(), exact.columns.begin() + exact.column_start[row]);
        const double eps = 8.0 * (d + 4) * kU * qabs;
        const double boundary = sc[order[budget - 1]];
        for (int32_t t : Row(x, row)) {
          if (!std::binary_search(top.begin(), top.end(), t)) {
            ASSERT_GE(sc[t], boundary - eps) << "a position outside the exact top-k";
          }
        }
      }
    }
    // Near-ties aside (none at these sizes: the sets are compared exactly), attention over the
    // selection equals the reference over the exact top-k.
    ASSERT_EQ(x.columns, exact.columns);
    const SparseAttentionIndex got = x.Index(c.page_size), want = exact.Index(c.page_size);
    ExpectClose(w.Attend(&got, false), w.Attend(&want, true), d, kAttnTol);
  }
}

TEST(DoubleSparsityValidate, NamesTheProblem) {
  DoubleSparsityShape s{8, 3, 64, 16, 8, DsLabelFormat::kF16, false, false};
  EXPECT_NE(DsValidateShape(s).find("num_kv_heads"), std::string::npos);
  s.num_kv_heads = 2;
  s.channels = 65;
  EXPECT_NE(DsValidateShape(s).find("channels"), std::string::npos);
  s.channels = 2;
  EXPECT_EQ(DsValidateShape(s), "");
  std::vector<int32_t> ch(8 * 2, 1);
  for (int i = 0; i < 16; i += 2) ch[i] = 0;
  EXPECT_EQ(DsValidateChannels(s, ch.data()), "");
  ch[5] = 64;
  EXPECT_NE(DsValidateChannels(s, ch.data()).find("outside"), std::string::npos);
  ch[5] = 0;
  EXPECT_NE(DsValidateChannels(s, ch.data()).find("twice"), std::string::npos);
}

}  // namespace
}  // namespace sieve::kernels
