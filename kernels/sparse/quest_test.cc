// Quest (quest.h) against SPARSE_ATTENTION.md section 6.4 (and 6.1.3/6.1.4) on fresh random
// inputs: the bound never falls below any q.k of its page (fp64 from the stored fp32 values);
// tightness; incremental bounds equal recomputation after chunked appends that start mid-page,
// on recycled pages full of stale values; selection shape, order consistency, budget nesting;
// a planted needle is always selected; a budget that covers the context gives dense attention;
// the fast selection agrees with the fp64 reference; the per-KV-head option shares one set.
#include "kernels/sparse/quest.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/attention/paged_kv_test_util.h"
#include "kernels/cpu/half.h"

namespace sieve::kernels {
namespace {

constexpr int kPage = 16;

// A batch of decode sequences in a shuffled paged cache, bounds built by QuestUpdateBounds from
// appends of random chunk sizes (so chunks start mid-page), over pages poisoned with stale
// extreme bounds first.
struct Problem : test_util::PagedLayout {
  int q_heads, kv_heads, d;
  bool bf16 = false;  // bounds as bfloat16 (quest.h bf16_bounds)
  std::vector<float> q, k, v, bounds;

  Problem(const std::vector<int32_t>& lens, int hq, int hkv, int dim, uint32_t seed,
          float key_range = 1.0f)
      : q_heads(hq), kv_heads(hkv), d(dim) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f), uk(-key_range, key_range);
    std::vector<test_util::SeqLens> seqs;
    for (int32_t l : lens) seqs.push_back({l, 1});
    Init(seqs, kPage, /*spare_pages=*/3, rng);
    const int pages = num_pages;
    k.resize(static_cast<size_t>(pages) * kPage * kv_heads * d);
    v.resize(k.size());
    for (float& x : k) x = uk(rng);
    for (float& x : v) x = u(rng);
    q.resize(kv_lens.size() * q_heads * d);
    for (float& x : q) x = u(rng);
    Rebuild(false, rng);
  }

  // Bounds from scratch (fp32 or bfloat16) by appends of random chunk sizes, over stale values
  // a previous owner left (the update must not let them leak).
  // The array is exactly one layer's bounds in the chosen layout (16-bit: half the floats,
  // QuestRegionFloats) plus kGuard floats that no update may touch (GuardIntact).
  void Rebuild(bool bf16_bounds, std::mt19937& rng) {
    bf16 = bf16_bounds;
    const size_t layer = static_cast<size_t>(num_pages) * kv_heads * QuestRegionFloats(d, bf16);
    bounds.assign(layer + kGuard, kGuardValue);
    if (bf16) {  // stale Mx = 50 and Mn = -50 as bfloat16 values
      uint16_t* b = reinterpret_cast<uint16_t*>(bounds.data());
      for (size_t i = 0; i < 2 * layer; ++i) b[i] = FloatToBf16((i / d) % 2 == 0 ? 50.0f : -50.0f);
    } else {
      for (size_t i = 0; i < layer; ++i) bounds[i] = (i / d) % 2 == 0 ? 50.0f : -50.0f;
    }
    for (size_t s = 0; s < kv_lens.size(); ++s) AppendAll(static_cast<int>(s), rng);
  }
  bool GuardIntact() const {
    return std::all_of(bounds.end() - kGuard, bounds.end(), [](float x) { return x == kGuardValue; });
  }
  static constexpr size_t kGuard = 256;
  static constexpr float kGuardValue = 1234.5f;

  void Append(int s, int from, int to) {
    std::vector<int64_t> slots;
    for (int t = from; t < to; ++t) slots.push_back(Slot(s, t));
    QuestBoundsUpdate up;
    up.k_cache = k.data();
    up.bounds = bounds.data();
    up.bf16_bounds = bf16;
    up.slots = slots.data();
    up.num_tokens = static_cast<int32_t>(slots.size());
    up.num_kv_heads = kv_heads;
    up.head_dim = d;
    up.page_size = kPage;
    QuestUpdateBounds(up);
  }

  void AppendAll(int s, std::mt19937& rng) {
    std::uniform_int_distribution<int> chunk(1, 40);
    for (int t = 0; t < kv_lens[s];) {
      const int n = std::min(kv_lens[s] - t, chunk(rng));
      Append(s, t, t + n);
      t += n;
    }
  }

  // The bounds of (s, page, g) as fp32, whichever way they are stored.
  std::vector<float> BoundsF(int s, int page, int g) const {
    std::vector<float> out(2 * d);
    const float* b = QuestPageBounds(bounds.data(), bf16, page_table[s * stride + page], g,
                                     kv_heads, d, out.data());
    return {b, b + 2 * d};
  }
  const float* Bounds(int s, int page, int g) const {
    return bounds.data() +
           (int64_t{page_table[s * stride + page]} * kv_heads + g) * 2 * d;
  }
  const float* Key(int s, int t, int g) const { return k.data() + (Slot(s, t) * kv_heads + g) * d; }
  const float* Query(int s, int h) const { return q.data() + (int64_t{s} * q_heads + h) * d; }

  QuestSelectParams Params(int budget, bool per_kv_head = false) const {
    QuestSelectParams p;
    p.q = q.data();
    p.bounds = bounds.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.page_table_stride = stride;
    p.num_seqs = static_cast<int32_t>(kv_lens.size());
    p.num_q_heads = q_heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = d;
    p.page_size = kPage;
    p.page_budget = budget;
    p.per_kv_head = per_kv_head;
    p.bf16_bounds = bf16;
    return p;
  }

  PagedAttentionParams<float> Attn(std::vector<float>& out, const SparseAttentionIndex* x) const {
    out.assign(q.size(), -7.0f);
    return AttentionParams(q.data(), k.data(), v.data(), out.data(), q_heads, kv_heads, d, x);
  }
};

double Dot(const float* a, const float* b, int d) {
  double s = 0;
  for (int c = 0; c < d; ++c) s += double{a[c]} * b[c];
  return s;
}

std::vector<int32_t> Row(const QuestSelection& sel, size_t r) {
  return {sel.key_blocks.begin() + sel.row_start[r], sel.key_blocks.begin() + sel.row_start[r + 1]};
}

// 6.4.3: incremental bounds == recomputation over the page's valid keys, exactly (min/max of
// stored values round nothing), for pages filled by chunks that start mid-page, on pages that
// held stale bounds.
TEST(QuestTest, IncrementalBoundsEqualRecomputation) {
  for (int d : {64, 128}) {
    const Problem pr({1, 15, 16, 17, 333, 1000}, 8, 2, d, 11 + d);
    std::vector<float> ref(2 * d);
    for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
      for (int page = 0; page * kPage < pr.kv_lens[s]; ++page) {
        const int valid = std::min(kPage, pr.kv_lens[s] - page * kPage);
        for (int g = 0; g < pr.kv_heads; ++g) {
          QuestBoundsRef(pr.k.data(), pr.page_table[s * pr.stride + page], g, valid, pr.kv_heads,
                         d, kPage, ref.data());
          ASSERT_TRUE(std::equal(ref.begin(), ref.end(), pr.Bounds(s, page, g)))
              << "seq " << s << " page " << page << " head " << g;
        }
      }
    }
  }
}

// 6.4.1: q.k_t <= U_p(q) for every valid token, in fp64, including pages whose keys are all
// positive or all negative in every channel.
TEST(QuestTest, BoundNeverBelowAnyScore) {
  Problem pr({700, 129}, 8, 2, 128, 5);
  // Page 1 of sequence 0 all positive, page 2 all negative (then recompute its bounds).
  for (int t = kPage; t < 3 * kPage; ++t) {
    for (int g = 0; g < pr.kv_heads; ++g) {
      float* key = pr.k.data() + (pr.Slot(0, t) * pr.kv_heads + g) * pr.d;
      for (int c = 0; c < pr.d; ++c) key[c] = t < 2 * kPage ? std::fabs(key[c]) : -std::fabs(key[c]);
    }
  }
  pr.Append(0, kPage, 3 * kPage);
  int checked = 0;
  for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
    for (int h = 0; h < pr.q_heads; ++h) {
      const int g = h / (pr.q_heads / pr.kv_heads);
      for (int t = 0; t < pr.kv_lens[s]; ++t) {
        const double u = QuestUpperBound(pr.Query(s, h), pr.Bounds(s, t / kPage, g), pr.d);
        ASSERT_LE(Dot(pr.Query(s, h), pr.Key(s, t, g), pr.d), u) << "seq " << s << " t " << t;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, (700 + 129) * 8);
}

// 6.4.2: a one-token page's bound is q.k exactly; an all-positive q gives q.Mx, all-negative q.Mn.
// x rounded to bfloat16 up and down: exact values stay, others move one step outward.
TEST(QuestTest, Bf16DirectedRounding) {
  const float one_plus = 1.0f + std::ldexp(1.0f, -10);  // between 1 and 1 + 2^-7
  EXPECT_EQ(Bf16ToFloat(Bf16RoundUp(1.0f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(Bf16RoundDown(1.0f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(Bf16RoundUp(one_plus)), 1.0f + std::ldexp(1.0f, -7));
  EXPECT_EQ(Bf16ToFloat(Bf16RoundDown(one_plus)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(Bf16RoundUp(-one_plus)), -1.0f);
  EXPECT_EQ(Bf16ToFloat(Bf16RoundDown(-one_plus)), -1.0f - std::ldexp(1.0f, -7));
  EXPECT_EQ(Bf16ToFloat(Bf16RoundUp(std::numeric_limits<float>::max())),
            std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16ToFloat(Bf16RoundDown(-std::numeric_limits<float>::max())),
            -std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16RoundUp(0.0f), 0);
  EXPECT_EQ(Bf16RoundDown(-0.0f), 0x8000);
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> u(-1000.0f, 1000.0f);
  for (int i = 0; i < 100000; ++i) {
    const float x = u(rng);
    const float up = Bf16ToFloat(Bf16RoundUp(x)), down = Bf16ToFloat(Bf16RoundDown(x));
    ASSERT_GE(up, x);
    ASSERT_LE(down, x);
    // Adjacent bfloat16 values (or both x itself): at most one step of 2^-7 relative apart.
    ASSERT_LE(up - down, std::fabs(x) * std::ldexp(1.0f, -7)) << x;
  }
}

// 16-bit bounds over fp32 keys: the incremental update gives the fp32 recomputation rounded
// outward (max up, min down; rounding is monotonic, so rounding each update's max equals
// rounding the final one), so every q.k of the page stays below the bound; over keys that are
// bfloat16 values already, exactly the recomputation.
TEST(QuestTest, Bf16BoundsAreTheRecomputationRoundedOutward) {
  for (const int d : {64, 72}) {
    for (const bool keys_bf16 : {false, true}) {
      Problem pr({1, 15, 16, 17, 333, 1000}, 4, 2, d, 71 + d);
      if (keys_bf16) {
        for (float& x : pr.k) x = Bf16ToFloat(FloatToBf16(x));
      }
      std::mt19937 rng(3);
      pr.Rebuild(/*bf16_bounds=*/true, rng);
      std::vector<float> ref(2 * d);
      for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
        for (int page = 0; page * kPage < pr.kv_lens[s]; ++page) {
          const int valid = std::min(kPage, pr.kv_lens[s] - page * kPage);
          for (int g = 0; g < pr.kv_heads; ++g) {
            QuestBoundsRef(pr.k.data(), pr.page_table[s * pr.stride + page], g, valid,
                           pr.kv_heads, d, kPage, ref.data());
            const std::vector<float> b = pr.BoundsF(static_cast<int>(s), page, g);
            for (int c = 0; c < d; ++c) {
              ASSERT_EQ(b[c], Bf16ToFloat(Bf16RoundUp(ref[c]))) << "seq " << s << " p " << page;
              ASSERT_EQ(b[d + c], Bf16ToFloat(Bf16RoundDown(ref[d + c])));
              if (keys_bf16) {
                ASSERT_EQ(b[c], ref[c]);
                ASSERT_EQ(b[d + c], ref[d + c]);
              }
            }
          }
        }
      }
      EXPECT_TRUE(pr.GuardIntact()) << "16-bit bounds written past half the fp32 layout";
      if (keys_bf16) {
        // Exact bounds give the fp32 bounds' scores bit for bit: the same pages, ties included.
        Problem fp = pr;
        std::mt19937 rng32(3);
        fp.Rebuild(/*bf16_bounds=*/false, rng32);
        for (const bool per_kv_head : {false, true}) {
          for (const int budget : {2, 5, 30}) {
            QuestSelection a, b;
            QuestSelectCpu(fp.Params(budget, per_kv_head), a, 2);
            QuestSelectCpu(pr.Params(budget, per_kv_head), b, 2);
            ASSERT_EQ(a.row_start, b.row_start);
            ASSERT_EQ(a.key_blocks, b.key_blocks) << "d " << d << " budget " << budget;
          }
        }
      }
      for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
        for (int h = 0; h < pr.q_heads; ++h) {
          const int g = h / (pr.q_heads / pr.kv_heads);
          for (int t = 0; t < pr.kv_lens[s]; ++t) {
            const std::vector<float> b = pr.BoundsF(static_cast<int>(s), t / kPage, g);
            ASSERT_LE(Dot(pr.Query(s, h), pr.Key(s, t, g), d),
                      QuestUpperBound(pr.Query(s, h), b.data(), d))
                << "seq " << s << " t " << t;
          }
        }
      }
    }
  }
}

TEST(QuestTest, BoundIsTight) {
  const Problem pr({kPage * 3 + 1}, 2, 1, 64, 9);
  const int last = 3;  // holds one token
  const float* b = pr.Bounds(0, last, 0);
  EXPECT_EQ(QuestUpperBound(pr.Query(0, 0), b, pr.d), Dot(pr.Query(0, 0), pr.Key(0, 3 * kPage, 0), pr.d));
  std::vector<float> pos(pr.d), neg(pr.d);
  for (int c = 0; c < pr.d; ++c) {
    pos[c] = std::fabs(pr.Query(0, 0)[c]) + 0.01f;
    neg[c] = -pos[c];
  }
  const float* b0 = pr.Bounds(0, 0, 0);
  EXPECT_EQ(QuestUpperBound(pos.data(), b0, pr.d), Dot(pos.data(), b0, pr.d));
  EXPECT_EQ(QuestUpperBound(neg.data(), b0, pr.d), Dot(neg.data(), b0 + pr.d, pr.d));
}

// 6.4.4, 6.4.6, 6.4.7 and the fast selection against the fp64 reference.
TEST(QuestTest, SelectionShapeOrderNestingAndReference) {
  for (int group : {1, 4}) {
    const Problem pr({1, kPage, 5 * kPage, 5 * kPage + 1, 2000, 4099}, 2 * group, 2, 128,
                     31 + group);
    for (int budget : {2, 3, 5, 6, 40}) {
      QuestSelection ref, fast, bigger;
      QuestSelectRef(pr.Params(budget), ref);
      QuestSelectCpu(pr.Params(budget), fast, 3);
      QuestSelectRef(pr.Params(budget + 7), bigger);
      ASSERT_EQ(ref.row_start, fast.row_start);
      for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
        const int n = (pr.kv_lens[s] + kPage - 1) / kPage;
        for (int h = 0; h < pr.q_heads; ++h) {
          const size_t r = s * pr.q_heads + h;
          const std::vector<int32_t> row = Row(ref, r);
          const std::string what = "budget " + std::to_string(budget) + " seq " +
                                   std::to_string(s) + " head " + std::to_string(h);
          if (n <= budget) {  // every page
            ASSERT_EQ(static_cast<int>(row.size()), n) << what;
            for (int j = 0; j < n; ++j) EXPECT_EQ(row[j], j) << what;
            continue;
          }
          ASSERT_EQ(static_cast<int>(row.size()), budget) << what;
          EXPECT_EQ(row.back(), n - 1) << what << ": the last page is always kept";
          EXPECT_TRUE(std::is_sorted(row.begin(), row.end()) &&
                      std::adjacent_find(row.begin(), row.end()) == row.end()) << what;
          // Order consistency: every unselected non-last page scores <= every selected one.
          const int g = h / group;
          std::vector<double> u(n - 1);
          for (int j = 0; j < n - 1; ++j) u[j] = QuestUpperBound(pr.Query(s, h), pr.Bounds(s, j, g), pr.d);
          const std::set<int32_t> chosen(row.begin(), row.end() - 1);
          double min_chosen = 1e300, max_other = -1e300;
          for (int j = 0; j < n - 1; ++j) {
            if (chosen.count(j)) min_chosen = std::min(min_chosen, u[j]);
            else max_other = std::max(max_other, u[j]);
          }
          EXPECT_GE(min_chosen, max_other) << what;
          // Nesting: budget K1 <= K2 selects a subset.
          const std::vector<int32_t> big = Row(bigger, r);
          EXPECT_TRUE(std::includes(big.begin(), big.end(), row.begin(), row.end())) << what;
          // The fp32 selection may differ from the fp64 one only within fp32 error of the
          // boundary: |U| <= sum |q||bound| ~ d, fp32 accumulation error ~ d * 2^-24 * that.
          const double eps = 128 * 128 * 6e-8 * 4;
          for (int32_t j : Row(fast, r)) {
            if (j != n - 1) {
              EXPECT_GE(u[j], min_chosen - eps) << what << " fast page " << j;
            }
          }
        }
      }
    }
  }
}

// With small-integer queries and keys every product and partial sum of a bound is an integer
// far below 2^24, so the fast path's fp32 scores (FMA, sign-split form, two pages of up to four
// heads per pass, any order) equal the fp64 reference's exactly, and its selection must be the
// reference's page for page, ties included (larger first, ties to the lower page): keys in
// [-2, 2] make most pages' bounds identical, keys in [-30, 30] few. d 70 (and 72 with 16 lanes)
// runs the scalar tail channels past the last whole vector; odd page counts the single-page
// tail; groups 1, 2, 3 and 4 the passes of 1, 2, 2 + 1 and 4 heads; the 1,100-page sequence the
// top-k's sampled candidate filter (used from 1,024 pages on).
TEST(QuestTest, FastSelectionEqualsReferenceOnExactScoresWithTies) {
  int boundary_ties = 0;
  uint32_t seed = 90;
  for (const int key_range : {2, 30}) {
    for (const int d : {64, 70, 72, 128}) {
      for (const int group : {1, 2, 3, 4}) {
        // (Two problems, so the long sequence does not stretch every sequence's page table.)
        for (const std::vector<int32_t>& lens :
             {std::vector<int32_t>{500, 4099, 16 * 37 + 3}, std::vector<int32_t>{16 * 1100}}) {
          Problem pr(lens, 2 * group, 2, d, seed++);
          for (float& x : pr.k) x = std::round(x * key_range);
          for (float& x : pr.q) x = std::round(x * 5.0f);
          std::mt19937 rng(seed);
          for (size_t s = 0; s < pr.kv_lens.size(); ++s) pr.AppendAll(static_cast<int>(s), rng);
          // The fp64 bounds of every (sequence, head, page), for counting boundary ties.
          std::vector<std::vector<double>> u(pr.kv_lens.size() * pr.q_heads);
          for (size_t s = 0; s < pr.kv_lens.size(); ++s) {
            const int n = (pr.kv_lens[s] + kPage - 1) / kPage;
            for (int h = 0; h < pr.q_heads; ++h) {
              for (int j = 0; j < n - 1; ++j) {
                u[s * pr.q_heads + h].push_back(
                    QuestUpperBound(pr.Query(s, h), pr.Bounds(s, j, h / group), d));
              }
            }
          }
          for (const bool per_kv_head : {false, true}) {
            for (const int budget : {2, 3, 17, 40}) {
              QuestSelection ref, fast;
              QuestSelectRef(pr.Params(budget, per_kv_head), ref);
              QuestSelectCpu(pr.Params(budget, per_kv_head), fast, 2);
              ASSERT_EQ(ref.row_start, fast.row_start);
              ASSERT_EQ(ref.key_blocks, fast.key_blocks)
                  << "keys +-" << key_range << " d " << d << " group " << group << " per_kv_head "
                  << per_kv_head << " budget " << budget;
              if (per_kv_head) continue;
              // Count rows whose boundary is a tie (a selected and an unselected page score equal),
              // so the assertion above is known to have decided ties.
              for (size_t r = 0; r < u.size(); ++r) {
                const int n = static_cast<int>(u[r].size()) + 1;
                if (n <= budget) continue;
                const std::vector<int32_t> row = Row(ref, r);
                const std::set<int32_t> chosen(row.begin(), row.end() - 1);
                double min_chosen = 1e300, max_other = -1e300;
                for (int j = 0; j < n - 1; ++j) {
                  if (chosen.count(j)) min_chosen = std::min(min_chosen, u[r][j]);
                  else max_other = std::max(max_other, u[r][j]);
                }
                boundary_ties += min_chosen == max_other;
              }
            }
          }
          // 16-bit bounds: integers this small are bfloat16 values, so nothing rounds and the
          // selection is again the reference's exactly.
          if (d != 128) {
            pr.Rebuild(/*bf16_bounds=*/true, rng);
            for (const bool per_kv_head : {false, true}) {
              for (const int budget : {2, 17, 40}) {
                QuestSelection ref, fast;
                QuestSelectRef(pr.Params(budget, per_kv_head), ref);
                QuestSelectCpu(pr.Params(budget, per_kv_head), fast, 2);
                ASSERT_EQ(ref.key_blocks, fast.key_blocks)
                    << "bf16 bounds, keys +-" << key_range << " d " << d << " group " << group
                    << " per_kv_head " << per_kv_head << " budget " << budget;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(boundary_ties, 10);
}

// The top-k's candidate filter estimates its threshold from every (n / 256)-th page; here
// exactly those pages have ten times wider keys, so the sample's threshold admits fewer pages
// than budgets 17 and 40 need and the selection must fall back to all pages (budget 3 still
// filters). Integer inputs as above: fast == reference exactly.
TEST(QuestTest, FastSelectionEqualsReferenceWhenTheTopKSampleMisleads) {
  Problem pr({16 * 1501}, 2, 1, 64, 123);
  const int scored = 1500, stride = scored / 256;
  for (int t = 0; t < pr.kv_lens[0]; ++t) {
    const int page = t / kPage;
    const float scale = page < 256 * stride && page % stride == 0 ? 30.0f : 3.0f;
    float* key = pr.k.data() + pr.Slot(0, t) * pr.d;
    for (int c = 0; c < pr.d; ++c) key[c] = std::round(key[c] * scale);
  }
  for (float& x : pr.q) x = std::round(x * 5.0f);
  std::mt19937 rng(5);
  pr.AppendAll(0, rng);
  for (const int budget : {3, 17, 40}) {
    QuestSelection ref, fast;
    QuestSelectRef(pr.Params(budget), ref);
    QuestSelectCpu(pr.Params(budget), fast, 2);
    ASSERT_EQ(ref.key_blocks, fast.key_blocks) << "budget " << budget;
  }
}

// Many sequences on several threads: the scoring and selection items of every sequence run on
// pool threads too (a range per thread), each writing its own sequences' rows. Integer inputs
// as above: fast == reference exactly, per query head and per KV head.
TEST(QuestTest, FastSelectionOverManySequencesOnThreadsEqualsReference) {
  std::vector<int32_t> lens;
  for (int s = 0; s < 24; ++s) lens.push_back(40 + 97 * s);
  Problem pr(lens, 8, 2, 64, 321);
  for (float& x : pr.k) x = std::round(x * 30.0f);
  for (float& x : pr.q) x = std::round(x * 5.0f);
  std::mt19937 rng(8);
  for (size_t s = 0; s < lens.size(); ++s) pr.AppendAll(static_cast<int>(s), rng);
  for (const bool per_kv_head : {false, true}) {
    for (const int threads : {2, 4}) {
      QuestSelection ref, fast;
      QuestSelectRef(pr.Params(9, per_kv_head), ref);
      QuestSelectCpu(pr.Params(9, per_kv_head), fast, threads);
      ASSERT_EQ(ref.row_start, fast.row_start);
      ASSERT_EQ(ref.key_blocks, fast.key_blocks) << "threads " << threads << " per KV head "
                                                 << per_kv_head;
    }
  }
}

// 6.4.5: keys uniform in [-0.1, 0.1], key t* = 10 q / |q|: its page is selected for any budget
// K >= 2, and the output is close to v_t*.
TEST(QuestTest, PlantedNeedleIsSelected) {
  Problem pr({3000}, 4, 1, 128, 77, 0.1f);
  std::mt19937 rng(3);
  for (int trial = 0; trial < 8; ++trial) {
    const int h = trial % 4;
    const int t_star = std::uniform_int_distribution<int>(0, 2900)(rng);
    const float* q = pr.Query(0, h);
    double norm = std::sqrt(Dot(q, q, pr.d));
    float* key = pr.k.data() + pr.Slot(0, t_star) * pr.d;
    std::vector<float> saved(key, key + pr.d);
    for (int c = 0; c < pr.d; ++c) key[c] = static_cast<float>(10.0 * q[c] / norm);
    // Rebuild the needle's page bounds as the append rule would.
    const int page0 = t_star / kPage * kPage;
    pr.Append(0, page0, std::min(pr.kv_lens[0], page0 + kPage));
    for (int budget : {2, 4, 64}) {
      QuestSelection sel;
      QuestSelectCpu(pr.Params(budget), sel, 2);
      const std::vector<int32_t> row = Row(sel, h);
      EXPECT_TRUE(std::binary_search(row.begin(), row.end(), t_star / kPage))
          << "needle at " << t_star << " budget " << budget;
    }
    std::copy(saved.begin(), saved.end(), key);
    pr.Append(0, page0, std::min(pr.kv_lens[0], page0 + kPage));
  }
}

// The sparse index of a decode selection (one query per sequence).
struct SelectionIndex {
  std::vector<int32_t> qbs;
  SparseAttentionIndex x;

  SelectionIndex(const QuestSelection& sel, int num_seqs) {
    for (int s = 0; s <= num_seqs; ++s) qbs.push_back(s);
    x.query_block = 1;
    x.key_block = kPage;
    x.query_block_start = qbs.data();
    x.row_start = sel.row_start.data();
    x.key_blocks = sel.key_blocks.data();
  }
};

// 6.1.3 and 6.1.4: with a budget covering the context the selected attention equals dense, per
// query head and per KV head (whose shared rows the CPU kernel runs as one item per group, and,
// with group_shared_rows off, one item per row); the selection does not depend on V (rescaling V
// rescales the output of the same selection).
TEST(QuestTest, CoveringBudgetEqualsDenseAndSelectionIgnoresV) {
  Problem pr({1, 17, 333, 1030}, 8, 2, 64, 13);
  std::vector<float> dense;
  PagedAttentionRef(pr.Attn(dense, nullptr), 0);
  for (const bool per_kv_head : {false, true}) {
    for (const bool grouped : {true, false}) {
      QuestSelection sel;
      QuestSelectCpu(pr.Params((1030 + kPage - 1) / kPage, per_kv_head), sel, 2);
      const SelectionIndex x(sel, 4);
      std::vector<float> sparse;
      PagedAttentionCpu(pr.Attn(sparse, &x.x), 2, {.group_shared_rows = grouped});
      for (size_t i = 0; i < dense.size(); ++i) {
        // Per-element: the CPU kernel's fp32 error bound (paged_attention_cpu_test.cc) is 2e-5
        // relative per row; values are O(1/sqrt(n)) .. 1, so 2e-5 absolute covers it.
        ASSERT_NEAR(sparse[i], dense[i], 2e-5)
            << i << " per_kv_head " << per_kv_head << " grouped " << grouped;
      }
    }
  }
  QuestSelection small, small_scaled;
  QuestSelectCpu(pr.Params(4), small, 2);
  for (float& x2 : pr.v) x2 *= 3.0f;
  QuestSelectCpu(pr.Params(4), small_scaled, 2);
  EXPECT_EQ(small.key_blocks, small_scaled.key_blocks);
}

// 3.7 (b): with per_kv_head every query head of a group lists the same pages: the top pages by
// the group's largest bound (fp64 reference and fast agree up to boundary error).
TEST(QuestTest, PerKvHeadSharesOneSet) {
  const Problem pr({2000, 777}, 8, 2, 128, 41);
  QuestSelection ref, fast;
  QuestSelectRef(pr.Params(9, true), ref);
  QuestSelectCpu(pr.Params(9, true), fast, 2);
  for (size_t s = 0; s < 2; ++s) {
    const int n = (pr.kv_lens[s] + kPage - 1) / kPage;
    for (int g = 0; g < 2; ++g) {
      const std::vector<int32_t> first = Row(ref, s * 8 + g * 4);
      for (int h = 1; h < 4; ++h) EXPECT_EQ(Row(ref, s * 8 + g * 4 + h), first);
      std::vector<double> agg(n - 1, -1e300);
      for (int h = 0; h < 4; ++h) {
        for (int j = 0; j < n - 1; ++j) {
          agg[j] = std::max(agg[j], QuestUpperBound(pr.Query(s, g * 4 + h), pr.Bounds(s, j, g), pr.d));
        }
      }
      std::vector<double> sorted = agg;
      std::sort(sorted.rbegin(), sorted.rend());
      for (size_t i = 0; i + 1 < first.size(); ++i) EXPECT_GE(agg[first[i]], sorted[7]);
      EXPECT_EQ(first.back(), n - 1);
      for (int h = 0; h < 4; ++h) {
        for (int32_t j : Row(fast, s * 8 + g * 4 + h)) {
          if (j != n - 1) {
            EXPECT_GE(agg[j], sorted[7] - 128 * 128 * 6e-8 * 4);  // as above
          }
        }
      }
    }
  }
}

// A per-KV-head selection under a budget far below the context (rows of a group list the same
// pages, so the CPU kernel runs each group as one item that reads every selected page once, on
// split-KV parts past 512 keys) gives the fp64 reference's attention over the same pages; so does
// the per-row baseline (group_shared_rows off). Fresh random inputs, GQA 4 and 8, d 64 and 128.
TEST(QuestTest, PerKvHeadSelectionAttentionMatchesReference) {
  struct Case {
    int hq, hkv, d, budget;
  };
  uint32_t seed = 61;
  for (const Case c : {Case{8, 2, 64, 40}, Case{16, 2, 128, 9}, Case{4, 1, 64, 100}}) {
    Problem pr({3000, 777, 40, 2049}, c.hq, c.hkv, c.d, seed++);
    QuestSelection sel;
    QuestSelectCpu(pr.Params(c.budget, /*per_kv_head=*/true), sel, 2);
    const SelectionIndex x(sel, 4);
    std::vector<float> ref, grouped, per_row;
    PagedAttentionRef(pr.Attn(ref, &x.x), 0);
    PagedAttentionCpu(pr.Attn(grouped, &x.x), 2);
    PagedAttentionCpu(pr.Attn(per_row, &x.x), 2, {.group_shared_rows = false});
    for (size_t i = 0; i < ref.size(); ++i) {
      // As in CoveringBudgetEqualsDenseAndSelectionIgnoresV: 2e-5 per element.
      ASSERT_NEAR(grouped[i], ref[i], 2e-5) << i << " hq " << c.hq << " d " << c.d;
      ASSERT_NEAR(per_row[i], ref[i], 2e-5) << i << " hq " << c.hq << " d " << c.d;
    }
    // The selection really is sparse: the 3000-token sequence reads at most budget pages.
    EXPECT_LE(sel.row_start[1] - sel.row_start[0], c.budget);
  }
}

}  // namespace
}  // namespace sieve::kernels
