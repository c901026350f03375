// Quest bounds and selection (quest.h). Highway's dynamic dispatch for the fp32 scores: this file
// includes itself once per x86 target (hwy/foreach_target.h); code outside HWY_NAMESPACE is
// compiled once (guarded below).
#ifndef SIEVE_KERNELS_SPARSE_QUEST_ONCE_
#define SIEVE_KERNELS_SPARSE_QUEST_ONCE_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <limits>
#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/quest.h"

namespace sieve::kernels {
namespace quest {

// 16-bit bounds live in float storage (quest.h): accessed through a type that may alias it.
typedef uint16_t __attribute__((may_alias)) Bf16Bits;

inline int32_t PagesOf(const QuestSelectParams& p, int s) {
  return (p.kv_lens[s] + p.page_size - 1) / p.page_size;
}

// Entries of each row: every page when they fit the budget, else the budget.
inline void RowStarts(const QuestSelectParams& p, QuestSelection& out) {
  out.row_start.resize(static_cast<size_t>(p.num_seqs) * p.num_q_heads + 1);
  out.row_start[0] = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int32_t n = PagesOf(p, s);
    const int32_t count = n <= p.page_budget ? n : p.page_budget;
    for (int h = 0; h < p.num_q_heads; ++h) {
      const size_t r = static_cast<size_t>(s) * p.num_q_heads + h;
      out.row_start[r + 1] = out.row_start[r] + count;
    }
  }
  out.key_blocks.resize(out.row_start.back());
}

// The top `keep` of scores[0, n) (larger first, ties to the lower page), then page `last`,
// written increasing to out. idx is scratch.
template <typename T>
void TopPages(const T* scores, int32_t n, int32_t keep, int32_t last, std::vector<int32_t>& idx,
              int32_t* out) {
  idx.resize(n);
  for (int32_t i = 0; i < n; ++i) idx[i] = i;
  const auto better = [scores](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  std::nth_element(idx.begin(), idx.begin() + keep, idx.end(), better);
  std::sort(idx.begin(), idx.begin() + keep);
  std::copy(idx.begin(), idx.begin() + keep, out);
  out[keep] = last;
}

// The same pages as TopPages, found without sorting indices. The keep-th largest score t comes
// from an nth_element over a copy of the values (no indirection), restricted when the budget is
// a small share of the pages to the candidates scoring at least t0, the r-th largest of a
// strided sample of kSample scores with r about twice the budget's share of the sample (~2 keep
// candidates, found by one branch-free pass). That is exact whenever at least keep pages score
// >= t0: then t >= t0, every page outside the candidates scores below t and every page equal
// to t is a candidate; otherwise (a sample unlike the rest) all pages are candidates. One pass
// over the candidates in page order then takes every page above t and, of those equal to t,
// the lowest until `keep` are taken: exactly "larger first, ties to the lower page", written
// increasing. (Scores must not be NaN, as for TopPages' comparison.) vals, cand: scratch.
template <typename T>
void TopPagesByThreshold(const T* scores, int32_t n, int32_t keep, int32_t last,
                         std::vector<T>& vals, std::vector<int32_t>& cand, int32_t* out) {
  constexpr int32_t kSample = 256;
  cand.resize(n);
  int32_t m = 0;
  if (n >= 4 * kSample && int64_t{keep} * 8 <= n) {
    const int32_t stride = n / kSample;
    vals.resize(kSample);
    for (int32_t i = 0; i < kSample; ++i) vals[i] = scores[static_cast<int64_t>(i) * stride];
    const int32_t r = static_cast<int32_t>(
        std::min<int64_t>(kSample - 1, int64_t{2} * keep * kSample / n + 4));
    std::nth_element(vals.begin(), vals.begin() + r, vals.end(), std::greater<T>());
    const T t0 = vals[r];
    for (int32_t i = 0; i < n; ++i) {
      cand[m] = i;
      m += scores[i] >= t0;
    }
  }
  if (m < keep) {  // no sample, or it misled: every page is a candidate
    for (int32_t i = 0; i < n; ++i) cand[i] = i;
    m = n;
  }
  vals.resize(m);
  for (int32_t i = 0; i < m; ++i) vals[i] = scores[cand[i]];
  std::nth_element(vals.begin(), vals.begin() + (keep - 1), vals.end(), std::greater<T>());
  const T t = vals[keep - 1];
  int32_t above = 0;
  for (int32_t i = 0; i < m; ++i) above += vals[i] > t;
  int32_t ties = keep - above;  // pages equal to t still to take, lowest first
  int32_t k = 0;
  for (int32_t i = 0; i < m; ++i) {
    const T x = scores[cand[i]];
    if (x > t || (x == t && ties-- > 0)) out[k++] = cand[i];
  }
  out[keep] = last;
}

// The rows of (sequence s, KV head g) (row_start already set): every page when the sequence's n
// pages fit the budget (gs unused), else from the group's scores gs[h * (n - 1) + j] of pages
// j < n - 1, top(scores, n - 1, keep, last, row) per query head or, with per_kv_head, once over
// the group's maximum (agg: scratch) and copied to every head of the group.
template <typename T, typename TopFn>
void FillGroupRows(const QuestSelectParams& p, QuestSelection& out, int s, int g, const T* gs,
                   std::vector<T>& agg, const TopFn& top) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int32_t n = PagesOf(p, s);
  const size_t row0 = static_cast<size_t>(s) * p.num_q_heads + static_cast<size_t>(g) * group;
  if (n <= p.page_budget) {  // every page: exactly dense
    for (int h = 0; h < group; ++h) {
      int32_t* o = out.key_blocks.data() + out.row_start[row0 + h];
      for (int32_t j = 0; j < n; ++j) o[j] = j;
    }
    return;
  }
  const int32_t scored = n - 1, keep = p.page_budget - 1;
  if (p.per_kv_head) {
    agg.assign(gs, gs + scored);
    for (int h = 1; h < group; ++h) {
      for (int32_t j = 0; j < scored; ++j) agg[j] = std::max(agg[j], gs[h * scored + j]);
    }
    int32_t* first = out.key_blocks.data() + out.row_start[row0];
    top(agg.data(), scored, keep, n - 1, first);
    for (int h = 1; h < group; ++h) {
      std::copy(first, first + keep + 1, out.key_blocks.data() + out.row_start[row0 + h]);
    }
    return;
  }
  for (int h = 0; h < group; ++h) {
    top(gs + static_cast<size_t>(h) * scored, scored, keep, n - 1,
        out.key_blocks.data() + out.row_start[row0 + h]);
  }
}

// Fills every row of `p` into `out` (row_start already set): for each (sequence, KV head) item,
// score(s, kv_head, n_scored, scores) writes the G query heads' scores of pages [0, n_scored)
// to scores[h * n_scored + page] (T: double), top pages by TopPages: the reference
// (QuestSelectRef). The fast path is SelectFast.
template <typename T, typename ScoreFn>
void SelectRows(const QuestSelectParams& p, QuestSelection& out, int num_threads, ScoreFn score) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t items = int64_t{p.num_seqs} * p.num_kv_heads;
  ParallelFor(items, num_threads, 1, [&](int64_t b, int64_t e) {
    std::vector<T> scores, agg;
    std::vector<int32_t> idx;
    const auto top = [&](const T* sc, int32_t n_scored, int32_t keep, int32_t last, int32_t* o) {
      TopPages(sc, n_scored, keep, last, idx, o);
    };
    for (int64_t it = b; it < e; ++it) {
      const int s = static_cast<int>(it / p.num_kv_heads);
      const int g = static_cast<int>(it % p.num_kv_heads);
      const int32_t n = PagesOf(p, s);
      if (n > p.page_budget) {
        scores.resize(static_cast<size_t>(group) * (n - 1));
        score(s, g, n - 1, scores.data());
      }
      FillGroupRows(p, out, s, g, scores.data(), agg, top);
    }
  });
}

inline const float* BoundsOf(const QuestSelectParams& p, int s, int32_t page, int g) {
  const int64_t id = p.page_table[static_cast<int64_t>(s) * p.page_table_stride + page];
  return p.bounds + (id * p.num_kv_heads + g) * QuestRegionFloats(p.head_dim, p.bf16_bounds);
}

}  // namespace quest

void QuestUpdateBounds(const QuestBoundsUpdate& u) {
  const int d = u.head_dim;
  std::vector<float> row(u.k_cache == nullptr ? d : 0);  // a bfloat16 key widened
  for (int32_t i = 0; i < u.num_tokens; ++i) {
    const int64_t slot = u.slots[i];
    const int64_t page = slot / u.page_size;
    const bool fresh = slot % u.page_size == 0;
    for (int g = 0; g < u.num_kv_heads; ++g) {
      const int64_t at = KvRowOffset(u.kv_layout, page, static_cast<int32_t>(slot % u.page_size),
                                     g, u.page_size, u.num_kv_heads, d);
      const float* k = u.k_cache + at;
      if (u.k_cache == nullptr) {
        for (int c = 0; c < d; ++c) row[c] = Bf16ToFloat(u.k_cache_bf16[at + c]);
        k = row.data();
      }
      float* mx = u.bounds + (page * u.num_kv_heads + g) * QuestRegionFloats(d, u.bf16_bounds);
      if (u.bf16_bounds) {  // Mx rounded up, Mn down: 2 * d bfloat16 values
        quest::Bf16Bits* mx16 = reinterpret_cast<quest::Bf16Bits*>(mx);
        quest::Bf16Bits* mn16 = mx16 + d;
        for (int c = 0; c < d; ++c) {
          if (fresh || k[c] > Bf16ToFloat(mx16[c])) mx16[c] = Bf16RoundUp(k[c]);
          if (fresh || k[c] < Bf16ToFloat(mn16[c])) mn16[c] = Bf16RoundDown(k[c]);
        }
        continue;
      }
      float* mn = mx + d;
      if (fresh) {  // a new page: whatever it held before is gone
        std::copy(k, k + d, mx);
        std::copy(k, k + d, mn);
        continue;
      }
      for (int c = 0; c < d; ++c) {
        mx[c] = k[c] > mx[c] ? k[c] : mx[c];
        mn[c] = k[c] < mn[c] ? k[c] : mn[c];
      }
    }
  }
}

void QuestBoundsRef(const float* k_cache, int32_t page, int32_t kv_head, int32_t valid,
                    int32_t num_kv_heads, int32_t head_dim, int32_t page_size, float* out,
                    KvLayout layout) {
  for (int c = 0; c < head_dim; ++c) {
    out[c] = -std::numeric_limits<float>::infinity();
    out[head_dim + c] = std::numeric_limits<float>::infinity();
  }
  for (int32_t e = 0; e < valid; ++e) {
    const float* k =
        k_cache + KvRowOffset(layout, page, e, kv_head, page_size, num_kv_heads, head_dim);
    for (int c = 0; c < head_dim; ++c) {
      out[c] = std::max(out[c], k[c]);
      out[head_dim + c] = std::min(out[head_dim + c], k[c]);
    }
  }
}

double QuestUpperBound(const float* q, const float* bounds, int32_t head_dim) {
  double u = 0;
  for (int c = 0; c < head_dim; ++c) {
    const double a = double{q[c]} * bounds[c], b = double{q[c]} * bounds[head_dim + c];
    u += a > b ? a : b;
  }
  return u;
}

uint16_t Bf16RoundUp(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  const uint16_t toward_zero = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffffu) == 0 || (u >> 31) != 0) return toward_zero;  // exact, or negative: up
  return static_cast<uint16_t>(toward_zero + 1);  // positive: away from zero (max -> inf)
}

uint16_t Bf16RoundDown(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  const uint16_t toward_zero = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffffu) == 0 || (u >> 31) == 0) return toward_zero;  // exact, or positive: down
  return static_cast<uint16_t>(toward_zero + 1);  // negative: away from zero
}

const float* QuestPageBounds(const float* bounds, bool bf16_bounds, int64_t page, int32_t kv_head,
                             int32_t num_kv_heads, int32_t head_dim, float* out) {
  const float* region = bounds + (page * num_kv_heads + kv_head) *
                                     QuestRegionFloats(head_dim, bf16_bounds);
  if (!bf16_bounds) return region;
  const quest::Bf16Bits* b = reinterpret_cast<const quest::Bf16Bits*>(region);
  for (int c = 0; c < 2 * head_dim; ++c) out[c] = Bf16ToFloat(b[c]);
  return out;
}

void QuestSelectRef(const QuestSelectParams& p, QuestSelection& out) {
  quest::RowStarts(p, out);
  const int group = p.num_q_heads / p.num_kv_heads;
  std::vector<float> widened(2 * p.head_dim);
  quest::SelectRows<double>(p, out, 1, [&](int s, int g, int32_t n, double* scores) {
    for (int h = 0; h < group; ++h) {
      const float* q =
          p.q + (static_cast<int64_t>(s) * p.num_q_heads + g * group + h) * p.head_dim;
      for (int32_t j = 0; j < n; ++j) {
        const int64_t id = p.page_table[static_cast<int64_t>(s) * p.page_table_stride + j];
        const float* b = QuestPageBounds(p.bounds, p.bf16_bounds, id, g, p.num_kv_heads,
                                         p.head_dim, widened.data());
        scores[h * n + j] = QuestUpperBound(q, b, p.head_dim);
      }
    }
  });
}

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_QUEST_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/sparse/quest.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels {
namespace quest {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Pages whose bounds (every KV head's) are prefetched ahead of the one being scored. A
// sequence's pages are scattered over the side pool (their order is the allocator's), so the
// hardware prefetchers see no stream across pages; without this the scoring waited on memory
// for two thirds of its time (perf, 64K context, 2026-12-06).
constexpr int kPrefetchPages = 16;

#if HWY_TARGET != HWY_SCALAR
// v reduced to one 128-bit block by adding its halves (each lane keeps its position mod 4).
template <class D>
HWY_INLINE hn::Vec<hn::FixedTag<float, 4>> FoldToBlock(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(d) > 4) {
    const hn::Half<D> dh;
    return FoldToBlock(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  } else {
    return v;
  }
}

// The lane sums of four vectors as one 4-lane vector (sum a0, sum a1, sum a2, sum a3): two
// interleave-add levels inside each 128-bit block, then the blocks folded; one reduction for
// four pages instead of four SumOfLanes.
template <class D>
HWY_INLINE hn::Vec<hn::FixedTag<float, 4>> Sum4(D d, hn::Vec<D> a0, hn::Vec<D> a1,
                                                hn::Vec<D> a2, hn::Vec<D> a3) {
  // Per block: [a0_0 + a0_2, a1_0 + a1_2, a0_1 + a0_3, a1_1 + a1_3] and the same for a2, a3.
  const auto t0 = hn::Add(hn::InterleaveLower(d, a0, a1), hn::InterleaveUpper(d, a0, a1));
  const auto t1 = hn::Add(hn::InterleaveLower(d, a2, a3), hn::InterleaveUpper(d, a2, a3));
  const hn::Repartition<uint64_t, D> d64;
  const auto u0 = hn::BitCast(d64, t0), u1 = hn::BitCast(d64, t1);
  const auto lo = hn::BitCast(d, hn::InterleaveLower(d64, u0, u1));
  const auto hi = hn::BitCast(d, hn::InterleaveUpper(d64, u0, u1));
  return FoldToBlock(d, hn::Add(lo, hi));
}
#endif

// scores[h * n + j] = U_j(q_h) for the `group` query heads of KV head g of sequence s, pages
// [j0, j1) of its n scored pages: each page's bounds are loaded (and widened) once for up to four
// heads of the group. qs: the group's queries split by sign, [group, 2, d] (SplitQueries). The
// bound in sign-split form: max(q_c Mx_c, q_c Mn_c) is q_c Mx_c for q_c >= 0 and q_c Mn_c
// otherwise (rounding is monotonic, so the fp32 products compare as the exact ones do), so
// U = sum_c q+_c Mx_c + q-_c Mn_c with q+ = max(q, 0), q- = min(q, 0): two FMAs per channel and
// no max (the zero term of each pair adds exactly nothing). Two pages of two heads share one
// horizontal reduction (Sum4); without GQA (group 1), four pages of the one head. fp32 with
// FMA: the rounding differs from the reference's fp64 by the accumulation error that
// quest_test's tolerance derives. T: the bounds' element type, float or (bf16_bounds)
// hwy::bfloat16_t, widened to fp32 as loaded.
template <typename T>
void ScorePages(const QuestSelectParams& p, int s, int g, const float* qs, int32_t j0, int32_t j1,
                int32_t n, float* scores) {
  const hn::ScalableTag<float> df;
  const auto load = [&](const float* region, int c) {  // bounds element c of a region
    if constexpr (std::is_same_v<T, float>) {
      return hn::LoadU(df, region + c);
    } else {
      const hn::Rebind<T, decltype(df)> dh;
      return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const T*>(region) + c));
    }
  };
  const auto at = [](const float* region, int c) {  // the same, scalar
    if constexpr (std::is_same_v<T, float>) {
      return region[c];
    } else {
      return Bf16ToFloat(reinterpret_cast<const Bf16Bits*>(region)[c]);
    }
  };
  const int L = static_cast<int>(hn::Lanes(df));
  const int d = p.head_dim, dv = d - d % L;
  const int group = p.num_q_heads / p.num_kv_heads;
  const float* qp0 = qs;
  // Scalar channels past the last whole vector.
  const auto tail = [&](const float* b, int h) {
    const float* qp = qp0 + h * 2 * d;
    float u = 0.0f;
    for (int c = dv; c < d; ++c) u += qp[c] * at(b, c) + qp[d + c] * at(b, d + c);
    return u;
  };
  int32_t j = j0;
#if HWY_TARGET != HWY_SCALAR
  const hn::FixedTag<float, 4> d4;
  using V = hn::Vec<decltype(df)>;
  // Pages j, j + 1 for H query heads from head h: each bounds vector is widened once for the H
  // heads, and a channel's max and min terms go to the same accumulator (2H accumulators, 4
  // bounds and 2 query vectors: 14 of AVX2's 16 registers at H = 4). Before, four pages per
  // head re-widened every bounds vector for each head of the group: 3 vector instructions per
  // multiply-add instead of ~1.5.
  const auto pair = [&]<int H>(const float* b0, const float* b1, int h) {
    V a0[H], a1[H];
#pragma GCC unroll 4
    for (int k = 0; k < H; ++k) a0[k] = a1[k] = hn::Zero(df);
    const float* q = qp0 + h * 2 * d;
    for (int c = 0; c < dv; c += L) {
      const V mx0 = load(b0, c), mn0 = load(b0, d + c), mx1 = load(b1, c), mn1 = load(b1, d + c);
#pragma GCC unroll 4
      for (int k = 0; k < H; ++k) {
        const V vp = hn::LoadU(df, q + k * 2 * d + c), vn = hn::LoadU(df, q + k * 2 * d + d + c);
        a0[k] = hn::MulAdd(vp, mx0, a0[k]);
        a1[k] = hn::MulAdd(vp, mx1, a1[k]);
        a0[k] = hn::MulAdd(vn, mn0, a0[k]);
        a1[k] = hn::MulAdd(vn, mn1, a1[k]);
      }
    }
    float sums[2 * H];
    if constexpr (H == 1) {
      sums[0] = hn::GetLane(hn::SumOfLanes(df, a0[0]));
      sums[1] = hn::GetLane(hn::SumOfLanes(df, a1[0]));
    } else {
#pragma GCC unroll 2
      for (int k = 0; k < H; k += 2) {  // [head k: j, j + 1, head k + 1: j, j + 1]
        hn::StoreU(Sum4(df, a0[k], a1[k], a0[k + 1], a1[k + 1]), d4, sums + 2 * k);
      }
    }
    for (int k = 0; k < H; ++k) {
      float* out = scores + static_cast<size_t>(h + k) * n + j;
      out[0] = sums[2 * k];
      out[1] = sums[2 * k + 1];
      if (dv < d) {
        out[0] += tail(b0, h + k);
        out[1] += tail(b1, h + k);
      }
    }
  };
  if (group == 1) {  // one head (no GQA): four pages per reduction, nothing to share
    const float* qp = qp0;
    for (; j + 4 <= j1; j += 4) {
      const float* b[4];
      for (int k = 0; k < 4; ++k) b[k] = BoundsOf(p, s, j + k, g);
      V x[4];
      for (int k = 0; k < 4; ++k) x[k] = hn::Zero(df);
      for (int c = 0; c < dv; c += L) {
        const V vp = hn::LoadU(df, qp + c), vn = hn::LoadU(df, qp + d + c);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          x[k] = hn::MulAdd(vp, load(b[k], c), x[k]);
          x[k] = hn::MulAdd(vn, load(b[k], d + c), x[k]);
        }
      }
      float* out = scores + j;
      hn::StoreU(Sum4(df, x[0], x[1], x[2], x[3]), d4, out);
      if (dv < d) {
        for (int k = 0; k < 4; ++k) out[k] += tail(b[k], 0);
      }
    }
  }
  for (; j + 2 <= j1; j += 2) {
    const float* b0 = BoundsOf(p, s, j, g);
    const float* b1 = BoundsOf(p, s, j + 1, g);
    int h = 0;
    for (; h + 4 <= group; h += 4) pair.template operator()<4>(b0, b1, h);
    for (; h + 2 <= group; h += 2) pair.template operator()<2>(b0, b1, h);
    for (; h < group; ++h) pair.template operator()<1>(b0, b1, h);
  }
#endif
  for (; j < j1; ++j) {  // the last page of an odd count (or every page on a scalar target)
    const float* b = BoundsOf(p, s, j, g);
    for (int h = 0; h < group; ++h) {
      const float* qp = qp0 + h * 2 * d;
      auto x = hn::Zero(df), y = hn::Zero(df);
      for (int c = 0; c < dv; c += L) {
        x = hn::MulAdd(hn::LoadU(df, qp + c), load(b, c), x);
        y = hn::MulAdd(hn::LoadU(df, qp + d + c), load(b, d + c), y);
      }
      scores[static_cast<size_t>(h) * n + j] =
          hn::GetLane(hn::SumOfLanes(df, hn::Add(x, y))) + tail(b, h);
    }
  }
}

// q+ = max(q, 0) then q- = min(q, 0) of each query head of sequence s: qs [num_q_heads, 2, d].
void SplitQueries(const QuestSelectParams& p, int s, float* qs) {
  const int d = p.head_dim;
  const float* q0 = p.q + static_cast<int64_t>(s) * p.num_q_heads * d;
  for (int h = 0; h < p.num_q_heads; ++h) {
    for (int c = 0; c < d; ++c) {
      const float x = q0[static_cast<int64_t>(h) * d + c];
      qs[(h * 2) * d + c] = x >= 0.0f ? x : 0.0f;
      qs[(h * 2 + 1) * d + c] = x >= 0.0f ? 0.0f : x;
    }
  }
}

// Two phases. (1) Scores: items of kScoreChunk pages of one sequence, every KV head of a page in
// turn, so that a page's bounds of all heads (num_kv_heads * 2 * d values, one run of memory) are
// read at once; per KV head items read 1 of every 8 KiB and waited on memory (the prefetch before
// each page took a quarter of the time, perf at 128K, 2026-12-06). (2) Selection: per (sequence,
// KV head) item, the top pages of each row from the scores (TopPagesByThreshold).
constexpr int32_t kScoreChunk = 256;

template <typename T>
void SelectFast(const QuestSelectParams& p, QuestSelection& out, int num_threads) {
  const int d = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  // Scores of sequence s at offset off[s]: [num_kv_heads, group, scored] (none when n <= K).
  std::vector<int64_t> off(p.num_seqs + 1, 0);
  std::vector<std::pair<int, int32_t>> items;  // (sequence, first page of the chunk)
  for (int s = 0; s < p.num_seqs; ++s) {
    const int32_t n = PagesOf(p, s);
    const int32_t scored = n > p.page_budget ? n - 1 : 0;
    off[s + 1] = off[s] + int64_t{p.num_q_heads} * scored;
    for (int32_t j0 = 0; j0 < scored; j0 += kScoreChunk) items.emplace_back(s, j0);
  }
  // The calling thread's scratch (the lambdas below run on pool threads: they use the pointers,
  // never the thread_local names).
  thread_local std::vector<float> scores, qs;
  scores.resize(static_cast<size_t>(off[p.num_seqs]));
  qs.resize(static_cast<size_t>(p.num_seqs) * p.num_q_heads * 2 * d);
  float* const sc = scores.data();
  float* const qsp = qs.data();
  ParallelFor(p.num_seqs, num_threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      if (off[s + 1] > off[s]) SplitQueries(p, static_cast<int>(s), qsp + s * p.num_q_heads * 2 * d);
    }
  });
  const int64_t page_bytes = int64_t{p.num_kv_heads} *
                             QuestRegionFloats(d, p.bf16_bounds) * static_cast<int64_t>(sizeof(float));
  ParallelFor(static_cast<int64_t>(items.size()), num_threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int s = items[it].first;
      const int32_t scored = PagesOf(p, s) - 1;
      const int32_t j0 = items[it].second, j1 = std::min(scored, j0 + kScoreChunk);
      const float* qs_s = qsp + static_cast<int64_t>(s) * p.num_q_heads * 2 * d;
      for (int32_t j = j0; j < j1; j += 4) {
        const int32_t je = std::min(j1, j + 4);
        // The pages kPrefetchPages ahead, every head's bounds: the hardware prefetchers see
        // no stream across pages (their order in the pool is the allocator's).
        for (int32_t k = j + kPrefetchPages; k < je + kPrefetchPages && k < scored; ++k) {
          const char* c = reinterpret_cast<const char*>(BoundsOf(p, s, k, 0));
          for (int64_t i = 0; i < page_bytes; i += 64) __builtin_prefetch(c + i);
        }
        for (int g = 0; g < p.num_kv_heads; ++g) {
          ScorePages<T>(p, s, g, qs_s + static_cast<int64_t>(g) * group * 2 * d, j, je, scored,
                        sc + off[s] + static_cast<int64_t>(g) * group * scored);
        }
      }
    }
  });
  const int64_t rows = int64_t{p.num_seqs} * p.num_kv_heads;
  ParallelFor(rows, num_threads, 1, [&](int64_t b, int64_t e) {
    std::vector<float> agg, vals;
    std::vector<int32_t> cand;
    const auto top = [&](const float* x, int32_t n_scored, int32_t keep, int32_t last,
                         int32_t* o) { TopPagesByThreshold(x, n_scored, keep, last, vals, cand, o); };
    for (int64_t it = b; it < e; ++it) {
      const int s = static_cast<int>(it / p.num_kv_heads);
      const int g = static_cast<int>(it % p.num_kv_heads);
      const int32_t scored = std::max(0, PagesOf(p, s) - 1);
      FillGroupRows(p, out, s, g, sc + off[s] + static_cast<int64_t>(g) * group * scored, agg,
                    top);
    }
  });
}

void QuestSelectCpuImpl(const QuestSelectParams& p, QuestSelection& out, int num_threads) {
  RowStarts(p, out);
  if (p.bf16_bounds) {
    SelectFast<hwy::bfloat16_t>(p, out, num_threads);
  } else {
    SelectFast<float>(p, out, num_threads);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace quest
}  // namespace sieve::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace sieve::kernels {
namespace quest {
HWY_EXPORT(QuestSelectCpuImpl);
}  // namespace quest

void QuestSelectCpu(const QuestSelectParams& p, QuestSelection& out, int num_threads) {
  HWY_DYNAMIC_DISPATCH(quest::QuestSelectCpuImpl)(p, out, num_threads);
}

}  // namespace sieve::kernels
#endif  // HWY_ONCE
