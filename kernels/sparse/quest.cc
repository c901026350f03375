// Quest bounds and selection (quest.h). Highway's dynamic dispatch for the fp32 scores: this file
// includes itself once per x86 target (hwy/foreach_target.h); code outside HWY_NAMESPACE is
// compiled once (guarded below).
#ifndef SIEVE_KERNELS_SPARSE_QUEST_ONCE_
#define SIEVE_KERNELS_SPARSE_QUEST_ONCE_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/quest.h"

namespace sieve::kernels {
namespace quest {

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

// Fills every row of `p` into `out` (row_start already set): for each (sequence, KV head) item,
// score(s, kv_head, n_scored, scores) writes the G query heads' scores of pages [0, n_scored)
// to scores[h * n_scored + page] (T: double or float).
template <typename T, typename ScoreFn>
void SelectRows(const QuestSelectParams& p, QuestSelection& out, int num_threads, ScoreFn score) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t items = int64_t{p.num_seqs} * p.num_kv_heads;
  ParallelFor(items, num_threads, 1, [&](int64_t b, int64_t e) {
    std::vector<T> scores, agg;
    std::vector<int32_t> idx;
    for (int64_t it = b; it < e; ++it) {
      const int s = static_cast<int>(it / p.num_kv_heads);
      const int g = static_cast<int>(it % p.num_kv_heads);
      const int32_t n = PagesOf(p, s);
      const size_t row0 = static_cast<size_t>(s) * p.num_q_heads + static_cast<size_t>(g) * group;
      if (n <= p.page_budget) {  // every page: exactly dense
        for (int h = 0; h < group; ++h) {
          int32_t* o = out.key_blocks.data() + out.row_start[row0 + h];
          for (int32_t j = 0; j < n; ++j) o[j] = j;
        }
        continue;
      }
      const int32_t scored = n - 1, keep = p.page_budget - 1;
      scores.resize(static_cast<size_t>(group) * scored);
      score(s, g, scored, scores.data());
      if (p.per_kv_head) {
        agg.assign(scores.begin(), scores.begin() + scored);
        for (int h = 1; h < group; ++h) {
          for (int32_t j = 0; j < scored; ++j) agg[j] = std::max(agg[j], scores[h * scored + j]);
        }
        int32_t* first = out.key_blocks.data() + out.row_start[row0];
        TopPages(agg.data(), scored, keep, n - 1, idx, first);
        for (int h = 1; h < group; ++h) {
          std::copy(first, first + keep + 1, out.key_blocks.data() + out.row_start[row0 + h]);
        }
        continue;
      }
      for (int h = 0; h < group; ++h) {
        TopPages(scores.data() + static_cast<size_t>(h) * scored, scored, keep, n - 1, idx,
                 out.key_blocks.data() + out.row_start[row0 + h]);
      }
    }
  });
}

inline const float* BoundsOf(const QuestSelectParams& p, int s, int32_t page, int g) {
  const int64_t id = p.page_table[static_cast<int64_t>(s) * p.page_table_stride + page];
  return p.bounds + (id * p.num_kv_heads + g) * 2 * p.head_dim;
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
      const int64_t at = (slot * u.num_kv_heads + g) * d;
      const float* k = u.k_cache + at;
      if (u.k_cache == nullptr) {
        for (int c = 0; c < d; ++c) row[c] = Bf16ToFloat(u.k_cache_bf16[at + c]);
        k = row.data();
      }
      float* mx = u.bounds + (page * u.num_kv_heads + g) * 2 * d;
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
                    int32_t num_kv_heads, int32_t head_dim, int32_t page_size, float* out) {
  for (int c = 0; c < head_dim; ++c) {
    out[c] = -std::numeric_limits<float>::infinity();
    out[head_dim + c] = std::numeric_limits<float>::infinity();
  }
  for (int32_t e = 0; e < valid; ++e) {
    const float* k =
        k_cache + ((int64_t{page} * page_size + e) * num_kv_heads + kv_head) * head_dim;
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

void QuestSelectRef(const QuestSelectParams& p, QuestSelection& out) {
  quest::RowStarts(p, out);
  const int group = p.num_q_heads / p.num_kv_heads;
  quest::SelectRows<double>(p, out, 1, [&](int s, int g, int32_t n, double* scores) {
    for (int h = 0; h < group; ++h) {
      const float* q =
          p.q + (static_cast<int64_t>(s) * p.num_q_heads + g * group + h) * p.head_dim;
      for (int32_t j = 0; j < n; ++j) {
        scores[h * n + j] = QuestUpperBound(q, quest::BoundsOf(p, s, j, g), p.head_dim);
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

// scores[h * n + j] = U_j(q_h) for the `group` query heads of KV head g of sequence s, pages
// [0, n): each page's bounds are loaded once for the whole group.
void ScoreGroup(const QuestSelectParams& p, int s, int g, int32_t n, float* scores) {
  const hn::ScalableTag<float> df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int d = p.head_dim, dv = d - d % L;
  const int group = p.num_q_heads / p.num_kv_heads;
  const float* q0 = p.q + (static_cast<int64_t>(s) * p.num_q_heads + g * group) * d;
  for (int32_t j = 0; j < n; ++j) {
    const float* mx = BoundsOf(p, s, j, g);
    const float* mn = mx + d;
    if (j + 1 < n) __builtin_prefetch(BoundsOf(p, s, j + 1, g));
    for (int h = 0; h < group; ++h) {
      const float* q = q0 + static_cast<int64_t>(h) * d;
      auto a0 = hn::Zero(df), a1 = hn::Zero(df);
      int c = 0;
      for (; c + 2 * L <= dv; c += 2 * L) {
        const auto qa = hn::LoadU(df, q + c), qb = hn::LoadU(df, q + c + L);
        a0 = hn::Add(a0, hn::Max(hn::Mul(qa, hn::LoadU(df, mx + c)),
                                 hn::Mul(qa, hn::LoadU(df, mn + c))));
        a1 = hn::Add(a1, hn::Max(hn::Mul(qb, hn::LoadU(df, mx + c + L)),
                                 hn::Mul(qb, hn::LoadU(df, mn + c + L))));
      }
      for (; c < dv; c += L) {
        const auto qa = hn::LoadU(df, q + c);
        a0 = hn::Add(a0, hn::Max(hn::Mul(qa, hn::LoadU(df, mx + c)),
                                 hn::Mul(qa, hn::LoadU(df, mn + c))));
      }
      float u = hn::GetLane(hn::SumOfLanes(df, hn::Add(a0, a1)));
      for (; c < d; ++c) u += std::max(q[c] * mx[c], q[c] * mn[c]);
      scores[static_cast<size_t>(h) * n + j] = u;
    }
  }
}

void QuestSelectCpuImpl(const QuestSelectParams& p, QuestSelection& out, int num_threads) {
  RowStarts(p, out);
  SelectRows<float>(p, out, num_threads, [&](int s, int g, int32_t n, float* scores) {
    ScoreGroup(p, s, g, n, scores);
  });
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
