// The fast CPU attention kernel (paged_attention_cpu.h). Highway's dynamic dispatch: this file
// includes itself once per x86 target (hwy/foreach_target.h) and PagedAttentionCpu calls the
// best one the host supports. Code outside HWY_NAMESPACE is compiled once (guarded below).
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels {
namespace cpu_attention {

// Key positions per tile: a tile's K and V rows (64 x head_dim fp32 each) stay in L1/L2 while
// every query row of the work item reads them.
constexpr int kKeyTile = 64;
// Query rows (query x head) per dense work item: rows share every K/V tile they load.
constexpr int kRowsPerItem = 64;

// One unit of work: the queries [q_begin, q_end) of sequence `seq` (indices within the
// sequence) with all heads of KV head `kv_head` (dense), or with query head `head` over sparse
// row `sparse_row`.
struct WorkItem {
  int32_t seq = 0;
  int32_t kv_head = 0;
  int32_t head = -1;           // sparse: the query head; dense: -1 (all heads of the group)
  int32_t q_begin = 0, q_end = 0;
  int64_t sparse_row = -1;
  int64_t cost = 0;            // query rows x keys, for ordering largest first
};

inline int QueryLen(const PagedAttentionParams<float>& p, int s) {
  return p.query_start[s + 1] - p.query_start[s];
}

// The last key position query j of sequence s may read.
inline int LastPos(const PagedAttentionParams<float>& p, int s, int j) {
  return p.kv_lens[s] - QueryLen(p, s) + j;
}

// Number of listed keys of sparse row r at positions <= last_pos.
inline int64_t SparseKeyCount(const SparseAttentionIndex& x, int64_t r, int last_pos) {
  int64_t n = 0;
  for (int32_t i = x.row_start[r]; i < x.row_start[r + 1]; ++i) {
    const int64_t first = int64_t{x.key_blocks[i]} * x.key_block;
    n += std::max<int64_t>(0, std::min<int64_t>(first + x.key_block, int64_t{last_pos} + 1) - first);
  }
  if (x.column_start != nullptr) {
    for (int32_t i = x.column_start[r]; i < x.column_start[r + 1]; ++i) n += x.columns[i] <= last_pos;
  }
  return n;
}

// Every work item of the call, largest first.
inline std::vector<WorkItem> BuildWorkItems(const PagedAttentionParams<float>& p) {
  std::vector<WorkItem> items;
  const int group = p.num_q_heads / p.num_kv_heads;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = QueryLen(p, s);
    if (q_len <= 0) continue;
    if (p.sparse == nullptr) {
      const int block = std::max(1, kRowsPerItem / group);
      for (int b = 0; b < q_len; b += block) {
        const int e = std::min(q_len, b + block);
        for (int kvh = 0; kvh < p.num_kv_heads; ++kvh) {
          const int64_t keys = std::max(0, LastPos(p, s, e - 1) + 1);
          items.push_back({s, kvh, -1, b, e, -1, int64_t{e - b} * group * keys});
        }
      }
      continue;
    }
    const SparseAttentionIndex& x = *p.sparse;
    const int blocks = x.query_block_start[s + 1] - x.query_block_start[s];
    for (int b = 0; b < blocks; ++b) {
      const int qb = b * x.query_block, qe = std::min(q_len, qb + x.query_block);
      if (qb >= qe) continue;
      for (int h = 0; h < p.num_q_heads; ++h) {
        const int64_t row = (int64_t{x.query_block_start[s]} + b) * p.num_q_heads + h;
        const int64_t keys = SparseKeyCount(x, row, LastPos(p, s, qe - 1));
        items.push_back({s, h / group, h, qb, qe, row, int64_t{qe - qb} * std::max<int64_t>(1, keys)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

// Per-thread buffers, reused across the thread's work items.
struct Scratch {
  std::vector<const float*> q;   // [rows] query vectors
  std::vector<float*> out;       // [rows] output vectors
  std::vector<int> last;         // [rows] last key position each row may read
  std::vector<float> o;          // [rows, head_dim] unnormalised outputs
  std::vector<float> m, l;       // [rows] running max score and sum of exponentials
  std::vector<float> s;          // [kKeyTile + lanes] scores, then probabilities, of one row
  std::vector<int> keys;         // the item's key positions
  std::vector<const float*> k, v;  // [kKeyTile] the tile's K and V rows
};

}  // namespace cpu_attention
}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/attention/paged_attention_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels {
namespace cpu_attention {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// s[j] = scale * dot(q, k[j]) for j < n, four keys at a time.
void Scores(const float* q, const float* const* k, int n, int d, float scale, float* s) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int dv = d - d % L;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
    const float *k0 = k[j], *k1 = k[j + 1], *k2 = k[j + 2], *k3 = k[j + 3];
    for (int i = 0; i < dv; i += L) {
      const auto qv = hn::LoadU(df, q + i);
      a0 = hn::MulAdd(qv, hn::LoadU(df, k0 + i), a0);
      a1 = hn::MulAdd(qv, hn::LoadU(df, k1 + i), a1);
      a2 = hn::MulAdd(qv, hn::LoadU(df, k2 + i), a2);
      a3 = hn::MulAdd(qv, hn::LoadU(df, k3 + i), a3);
    }
    float t0 = hn::GetLane(hn::SumOfLanes(df, a0)), t1 = hn::GetLane(hn::SumOfLanes(df, a1));
    float t2 = hn::GetLane(hn::SumOfLanes(df, a2)), t3 = hn::GetLane(hn::SumOfLanes(df, a3));
    for (int i = dv; i < d; ++i) {
      t0 += q[i] * k0[i];
      t1 += q[i] * k1[i];
      t2 += q[i] * k2[i];
      t3 += q[i] * k3[i];
    }
    s[j] = t0 * scale;
    s[j + 1] = t1 * scale;
    s[j + 2] = t2 * scale;
    s[j + 3] = t3 * scale;
  }
  for (; j < n; ++j) {
    auto a = hn::Zero(df);
    for (int i = 0; i < dv; i += L) a = hn::MulAdd(hn::LoadU(df, q + i), hn::LoadU(df, k[j] + i), a);
    float t = hn::GetLane(hn::SumOfLanes(df, a));
    for (int i = dv; i < d; ++i) t += q[i] * k[j][i];
    s[j] = t * scale;
  }
}

// o += sum_j p[j] * v[j] over j < n, up to four vectors of o held in registers at a time.
void AccumulatePV(const float* p, const float* const* v, int n, int d, float* o) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  int i = 0;
  for (; i + 4 * L <= d; i += 4 * L) {
    auto a0 = hn::LoadU(df, o + i), a1 = hn::LoadU(df, o + i + L);
    auto a2 = hn::LoadU(df, o + i + 2 * L), a3 = hn::LoadU(df, o + i + 3 * L);
    for (int j = 0; j < n; ++j) {
      const auto pj = hn::Set(df, p[j]);
      const float* vj = v[j] + i;
      a0 = hn::MulAdd(pj, hn::LoadU(df, vj), a0);
      a1 = hn::MulAdd(pj, hn::LoadU(df, vj + L), a1);
      a2 = hn::MulAdd(pj, hn::LoadU(df, vj + 2 * L), a2);
      a3 = hn::MulAdd(pj, hn::LoadU(df, vj + 3 * L), a3);
    }
    hn::StoreU(a0, df, o + i);
    hn::StoreU(a1, df, o + i + L);
    hn::StoreU(a2, df, o + i + 2 * L);
    hn::StoreU(a3, df, o + i + 3 * L);
  }
  for (; i + L <= d; i += L) {
    auto a = hn::LoadU(df, o + i);
    for (int j = 0; j < n; ++j) a = hn::MulAdd(hn::Set(df, p[j]), hn::LoadU(df, v[j] + i), a);
    hn::StoreU(a, df, o + i);
  }
  for (; i < d; ++i) {
    float a = o[i];
    for (int j = 0; j < n; ++j) a += p[j] * v[j][i];
    o[i] = a;
  }
}

// One query row against one key tile: scores, the online-softmax update of (m, l, o), and the
// PV accumulation. s has room for n rounded up to whole vectors.
void RowTile(const float* q, int last, const int* pos, const float* const* k,
             const float* const* v, int n, int tile_max, int d, float scale, float& m, float& l,
             float* o, float* s) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  Scores(q, k, n, d, scale, s);
  if (last < tile_max) {  // causal mask inside the tile
    for (int j = 0; j < n; ++j) {
      if (pos[j] > last) s[j] = kNegInf;
    }
  }
  const int padded = (n + L - 1) / L * L;
  for (int j = n; j < padded; ++j) s[j] = kNegInf;
  auto vmax = hn::Set(df, kNegInf);
  for (int j = 0; j < padded; j += L) vmax = hn::Max(vmax, hn::LoadU(df, s + j));
  const float tile_max_score = hn::GetLane(hn::MaxOfLanes(df, vmax));
  if (tile_max_score == kNegInf) return;  // nothing readable in this tile
  const float m_new = std::max(m, tile_max_score);
  const float correction = m == kNegInf ? 0.0f : std::exp(m - m_new);
  const auto vm = hn::Set(df, m_new);
  auto vsum = hn::Zero(df);
  for (int j = 0; j < padded; j += L) {
    // exp(-inf) is 0: masked keys and padding drop out.
    const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + j), vm));
    hn::StoreU(e, df, s + j);
    vsum = hn::Add(vsum, e);
  }
  l = l * correction + hn::GetLane(hn::SumOfLanes(df, vsum));
  m = m_new;
  if (correction != 1.0f) {
    for (int i = 0; i < d; ++i) o[i] *= correction;
  }
  AccumulatePV(s, v, n, d, o);
}

// Attention of the scratch's rows (sc.q, sc.out, sc.last) over the key positions sc.keys of
// sequence `seq`, KV head `kv_head`.
void AttendRows(const PagedAttentionParams<float>& p, int seq, int kv_head, Scratch& sc) {
  const int d = p.head_dim;
  const int rows = static_cast<int>(sc.q.size());
  const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  sc.o.assign(static_cast<size_t>(rows) * d, 0.0f);
  sc.m.assign(rows, -std::numeric_limits<float>::infinity());
  sc.l.assign(rows, 0.0f);
  sc.s.resize(kKeyTile + hn::Lanes(DF()));
  sc.k.resize(kKeyTile);
  sc.v.resize(kKeyTile);
  const int n_keys = static_cast<int>(sc.keys.size());
  for (int t0 = 0; t0 < n_keys; t0 += kKeyTile) {
    const int n = std::min(kKeyTile, n_keys - t0);
    const int* pos = sc.keys.data() + t0;
    int tile_min = pos[0], tile_max = pos[0];
    for (int j = 0; j < n; ++j) {
      const int t = pos[j];
      tile_min = std::min(tile_min, t);
      tile_max = std::max(tile_max, t);
      const int64_t page = pages[t / p.page_size];
      const int64_t off = ((page * p.page_size + t % p.page_size) * p.num_kv_heads + kv_head) * d;
      sc.k[j] = p.k_cache + off;
      sc.v[j] = p.v_cache + off;
    }
    for (int r = 0; r < rows; ++r) {
      if (sc.last[r] < tile_min) continue;  // every key of the tile is in this row's future
      RowTile(sc.q[r], sc.last[r], pos, sc.k.data(), sc.v.data(), n, tile_max, d, p.scale,
              sc.m[r], sc.l[r], sc.o.data() + static_cast<size_t>(r) * d, sc.s.data());
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float* o = sc.o.data() + static_cast<size_t>(r) * d;
    const float inv = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;  // no readable key: zeros
    for (int i = 0; i < d; ++i) sc.out[r][i] = o[i] * inv;
  }
}

// Lays out the rows and keys of one work item in the scratch, then attends.
void RunItem(const PagedAttentionParams<float>& p, const WorkItem& w, Scratch& sc) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int h_begin = w.head >= 0 ? w.head : w.kv_head * group;
  const int h_end = w.head >= 0 ? w.head + 1 : h_begin + group;
  sc.q.clear();
  sc.out.clear();
  sc.last.clear();
  for (int j = w.q_begin; j < w.q_end; ++j) {
    const int64_t token = p.query_start[w.seq] + j;
    for (int h = h_begin; h < h_end; ++h) {
      const int64_t off = (token * p.num_q_heads + h) * p.head_dim;
      sc.q.push_back(p.q + off);
      sc.out.push_back(p.out + off);
      sc.last.push_back(LastPos(p, w.seq, j));
    }
  }
  const int last = LastPos(p, w.seq, w.q_end - 1);
  sc.keys.clear();
  if (w.sparse_row < 0) {
    for (int t = 0; t <= last; ++t) sc.keys.push_back(t);
  } else {
    const SparseAttentionIndex& x = *p.sparse;
    const int64_t r = w.sparse_row;
    for (int32_t i = x.row_start[r]; i < x.row_start[r + 1]; ++i) {
      const int64_t first = int64_t{x.key_blocks[i]} * x.key_block;
      const int64_t end = std::min<int64_t>(first + x.key_block, int64_t{last} + 1);
      for (int64_t t = first; t < end; ++t) sc.keys.push_back(static_cast<int>(t));
    }
    if (x.column_start != nullptr) {
      for (int32_t i = x.column_start[r]; i < x.column_start[r + 1]; ++i) {
        if (x.columns[i] <= last) sc.keys.push_back(x.columns[i]);
      }
    }
  }
  AttendRows(p, w.seq, w.kv_head, sc);
}

void PagedAttentionCpuImpl(const PagedAttentionParams<float>& p, int num_threads) {
  const std::vector<WorkItem> items = BuildWorkItems(p);
  if (items.empty()) return;
  if (num_threads <= 0) num_threads = DefaultCpuThreads();
  const int workers = static_cast<int>(std::min<int64_t>(num_threads, items.size()));
  std::atomic<int64_t> next{0};
  ParallelFor(workers, workers, 1, [&](int64_t, int64_t) {
    Scratch sc;
    for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size());
         i = next.fetch_add(1)) {
      RunItem(p, items[i], sc);
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace cpu_attention
}  // namespace sieve::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace sieve::kernels {
namespace cpu_attention {
HWY_EXPORT(PagedAttentionCpuImpl);
}  // namespace cpu_attention

void PagedAttentionCpu(const PagedAttentionParams<float>& p, int num_threads) {
  HWY_DYNAMIC_DISPATCH(cpu_attention::PagedAttentionCpuImpl)(p, num_threads);
}

}  // namespace sieve::kernels
#endif  // HWY_ONCE
