// The fast CPU attention kernel (paged_attention_cpu.h): the decode row path (few rows per
// sequence step: per-key dot products with horizontal sums), the work-item driver (split-KV
// parts and their merge) and the dispatch. The work list and scratch are in
// paged_attention_cpu_items.{h,cc}, the prefill tile path in paged_attention_cpu_tile-inl.h.
// Highway's dynamic dispatch: this file includes itself once per x86 target
// (hwy/foreach_target.h), and with it the per-target headers, and PagedAttentionCpu calls the
// best target the host supports. Code outside HWY_NAMESPACE is compiled once (guarded below).
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/attention/paged_attention_cpu.h"
#include "kernels/attention/paged_attention_cpu_items.h"
#include "kernels/cpu/parallel_for.h"

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/attention/paged_attention_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/cpu/kv_rows-inl.h"
#include "kernels/cpu/tile_scores-inl.h"
#include "kernels/attention/paged_attention_cpu_tile-inl.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels {
namespace cpu_attention {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
// The per-row micro-kernels over K/V rows of any element type (kernels/cpu/kv_rows-inl.h).
using kv_rows::HWY_NAMESPACE::AccumulatePV;
using kv_rows::HWY_NAMESPACE::AccumulatePV2;
using kv_rows::HWY_NAMESPACE::AccumulatePVR;
using kv_rows::HWY_NAMESPACE::AccumulatePVRowwise;
using kv_rows::HWY_NAMESPACE::Scores;
using kv_rows::HWY_NAMESPACE::ScoresR;

// AccumulatePVR over the scratch's active rows a .. a + R - 1 for keys [j0, j0 + n) of the tile
// (probabilities in sc.s, V rows v[0, n)).
template <int R, typename TKV>
void AccumulateRows(Scratch<TKV>& sc, int a, size_t ss, int j0, int n, int d,
                    const TKV* const* v) {
  const float* pr[R];
  float* orow[R];
  for (int i = 0; i < R; ++i) {
    pr[i] = sc.s.data() + sc.active[a + i] * ss + j0;
    orow[i] = sc.o.data() + static_cast<size_t>(sc.active[a + i]) * d;
  }
  if (sc.rowwise_pv) return AccumulatePVRowwise<R, TKV>(pr, v, n, d, orow);
  AccumulatePVR<R, TKV>(pr, v, n, d, orow);
}

// The PV update of active rows [a, e) for keys [j0, j0 + n) over V rows v[0, n).
template <typename TKV>
void AccumulateActive(Scratch<TKV>& sc, int a, int e, size_t ss, int j0, int n, int d,
                      const TKV* const* v) {
  for (; a + 8 <= e; a += 8) AccumulateRows<8, TKV>(sc, a, ss, j0, n, d, v);
  for (; a + 4 <= e; a += 4) AccumulateRows<4, TKV>(sc, a, ss, j0, n, d, v);
  if (sc.rowwise_pv) {
    for (; a + 2 <= e; a += 2) AccumulateRows<2, TKV>(sc, a, ss, j0, n, d, v);
    if (a < e) AccumulateRows<1, TKV>(sc, a, ss, j0, n, d, v);
    return;
  }
  for (; a < e; a += 2) {
    const int r0 = sc.active[a];
    float* o0 = sc.o.data() + static_cast<size_t>(r0) * d;
    if (a + 1 == e) {
      AccumulatePV(sc.s.data() + r0 * ss + j0, v, n, d, o0);
      break;
    }
    const int r1 = sc.active[a + 1];
    AccumulatePV2(sc.s.data() + r0 * ss + j0, sc.s.data() + r1 * ss + j0, v, n, d, o0,
                  sc.o.data() + static_cast<size_t>(r1) * d);
  }
}

// The online-softmax update of one row for one tile whose scores are in s[0, n): causal mask,
// new running max m and sum l, o rescaled; s becomes the probabilities (zeros past n, up to a
// whole vector). Returns false (and changes nothing) when the row reads no key of the tile.
bool SoftmaxUpdate(int last, const int* pos, int n, int tile_max, int d, float& m, float& l,
                   float* o, float* s) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
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
  if (tile_max_score == kNegInf) return false;  // nothing readable in this tile
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
  return true;
}

// The scores of active rows [a, e) for keys [j0, j0 + n) of the tile over K rows k[0, n), into
// sc.s (row stride `ss`): few rows (decode).
template <typename TKV>
void TileScores(const PagedAttentionParams<float>& p, Scratch<TKV>& sc, int a, int e, size_t ss,
                int j0, int n, const TKV* const* k) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int d = p.head_dim;
  const float* q[4];
  float* s[4];
  auto take = [&](int count) {
    for (int i = 0; i < count; ++i) {
      q[i] = sc.q[sc.active[a + i]];
      s[i] = sc.s.data() + sc.active[a + i] * ss + j0;
    }
  };
  if (d % L == 0) {
    for (; a + 4 <= e; a += 4) {
      take(4);
      ScoresR<4, TKV>(q, k, n, d, p.scale, s);
    }
    for (; a + 2 <= e; a += 2) {
      take(2);
      ScoresR<2, TKV>(q, k, n, d, p.scale, s);
    }
  }
  for (; a < e; ++a) {
    const int r = sc.active[a];
    Scores(sc.q[r], k, n, d, p.scale, sc.s.data() + r * ss + j0);
  }
}

// Attention of the scratch's rows (sc.q, sc.out, sc.last) over the key positions sc.keys of
// sequence `seq`, KV head `kv_head`: normalised into sc.out, or (partial non-null) the rows'
// unnormalised state into partial rows [partial_row, partial_row + rows). Items of steps with
// many rows take the prefill tile path (AttendRowsT, paged_attention_cpu_tile-inl.h).
template <typename TKV>
void AttendRows(const PagedAttentionParams<float>& p, const TKV* kc, const TKV* vc, int seq,
                int kv_head, Scratch<TKV>& sc, Partials* partial, int64_t partial_row) {
  if (sc.transpose) return AttendRowsT(p, kc, vc, seq, kv_head, sc, partial, partial_row);
  const int d = p.head_dim;
  // A head-major page holds each head's rows back to back: the PV update reads them front to
  // back (key by key), which the hardware prefetchers follow, instead of AccumulatePVR's passes
  // of one cache line per row (dense decode at 128K on the 8B shape: 1.3x).
  sc.rowwise_pv = p.kv_layout == KvLayout::kHeadMajor && d % hn::Lanes(DF()) == 0;
  const int rows = static_cast<int>(sc.q.size());
  const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  const size_t ss = kKeyTile + 2 * hn::Lanes(DF());  // row stride of sc.s
  sc.o.assign(static_cast<size_t>(rows) * d, 0.0f);
  sc.m.assign(rows, -std::numeric_limits<float>::infinity());
  sc.l.assign(rows, 0.0f);
  sc.s.resize(ss * rows);
  const int n_keys = static_cast<int>(sc.keys.size());
  sc.offs.resize(n_keys);
  // kv_head < 0: every KV head (a decode item over all heads, paged_attention_cpu_items.h); the
  // offsets are head 0's, and each head's rows are attended tile by tile in turn.
  const int g_begin = kv_head < 0 ? 0 : kv_head;
  const int g_end = kv_head < 0 ? p.num_kv_heads : kv_head + 1;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int heads = g_end - g_begin;
  const int64_t head_stride = KvStrides(p.kv_layout, p.page_size, p.num_kv_heads, d).head;
  sc.k.resize(static_cast<size_t>(heads) * kKeyTile);
  sc.v.resize(static_cast<size_t>(heads) * kKeyTile);
  sc.head_start.assign(heads + 1, 0);
  sc.head_kept.resize(heads);
  KeyOffsets(p, pages, g_begin, sc.keys.data(), n_keys, sc.offs.data());
  for (int t0 = 0; t0 < n_keys; t0 += kKeyTile) {
    const int n = std::min(kKeyTile, n_keys - t0);
    const int* pos = sc.keys.data() + t0;
    int tile_min = pos[0], tile_max = pos[0];
    const int64_t* offs = sc.offs.data() + t0;
    for (int j = 0; j < n; ++j) {
      const int t = pos[j];
      tile_min = std::min(tile_min, t);
      tile_max = std::max(tile_max, t);
    }
    // The next tile's K and V rows, toward the caches while this tile is computed: a row of a
    // long context is in L3 or memory, and the gather of scattered pages defeats the hardware
    // prefetchers (1.2-1.5x on the Llama-3.1-8B shape at 16K keys, bench/results/
    // 2026-12-05-cpu-attention-d128.md).
    // Dense items of few rows (decode) skip it: over a sequence's pages in allocation order the
    // hardware prefetchers keep up and the prefetches only cost (model_bench dense decode at 64K,
    // embedded shape, one run on the loaded shared VM: 15.6 ms with vs 14.0 without). Sparse
    // decode items read scattered selected pages and gain (Quest at 64K, 2026-12-06, see
    // kernels/sparse/NOTES.md).
    if (sc.prefetch && t0 + kKeyTile < n_keys) {
      const int n2 = std::min(kKeyTile, n_keys - t0 - kKeyTile);
      for (int j = 0; j < n2; ++j) {
        const int64_t off = offs[kKeyTile + j];
        for (int i = 0; i < d; i += 64 / static_cast<int>(sizeof(TKV))) {  // a cache line
          __builtin_prefetch(kc + off + i);
          __builtin_prefetch(vc + off + i);
        }
      }
    }
    // Rows by KV head: sc.active[head_start[g - g_begin], head_start[g - g_begin + 1]) are
    // head g's rows that read the tile (the others have it in their future).
    sc.active.clear();
    for (int g = g_begin; g < g_end; ++g) {
      const int64_t head_off = int64_t{g - g_begin} * head_stride;
      const TKV** kg = sc.k.data() + (g - g_begin) * kKeyTile;
      const TKV** vg = sc.v.data() + (g - g_begin) * kKeyTile;
      for (int j = 0; j < n; ++j) {
        kg[j] = kc + offs[j] + head_off;
        vg[j] = vc + offs[j] + head_off;
      }
      for (int r = 0; r < rows; ++r) {
        // All KV heads: this head's rows only (rows go query by query, heads in order).
        if (kv_head < 0 && (r % p.num_q_heads) / group != g) continue;
        if (sc.last[r] >= tile_min) sc.active.push_back(r);
      }
      sc.head_start[g - g_begin + 1] = static_cast<int>(sc.active.size());
    }
    // Scores, then softmax, then PV, over blocks of keys with the KV heads inside: with every
    // KV head, a block's K (then V) rows of all heads are consecutive in memory (token-major: a
    // token's 8 heads are one 4 KiB row, blocks of kDecodeKeyBlock tokens; head-major: a page's
    // heads one after the other, blocks of a page), so the tile is read block by block nearly in
    // address order instead of head by head.
    const int block = kv_head >= 0                             ? n
                      : p.kv_layout == KvLayout::kTokenMajor ? kDecodeKeyBlock
                                                             : p.page_size;
    for (int j0 = 0; j0 < n; j0 += block) {
      const int nb = std::min(block, n - j0);
      for (int h = 0; h < heads; ++h) {
        TileScores(p, sc, sc.head_start[h], sc.head_start[h + 1], ss, j0, nb,
                   sc.k.data() + h * kKeyTile + j0);
      }
    }
    for (int h = 0; h < heads; ++h) {
      int kept = sc.head_start[h];
      for (int a = sc.head_start[h]; a < sc.head_start[h + 1]; ++a) {
        const int r = sc.active[a];
        if (SoftmaxUpdate(sc.last[r], pos, n, tile_max, d, sc.m[r], sc.l[r],
                          sc.o.data() + static_cast<size_t>(r) * d, sc.s.data() + r * ss)) {
          sc.active[kept++] = r;
        }
      }
      sc.head_kept[h] = kept;
    }
    for (int j0 = 0; j0 < n; j0 += block) {
      const int nb = std::min(block, n - j0);
      for (int h = 0; h < heads; ++h) {
        AccumulateActive(sc, sc.head_start[h], sc.head_kept[h], ss, j0, nb, d,
                         sc.v.data() + h * kKeyTile + j0);
      }
    }
  }
  if (partial != nullptr) {  // a split-KV part: keep the state for MergeParts
    std::copy(sc.o.begin(), sc.o.end(), partial->o.begin() + partial_row * d);
    std::copy(sc.m.begin(), sc.m.end(), partial->m.begin() + partial_row);
    std::copy(sc.l.begin(), sc.l.end(), partial->l.begin() + partial_row);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const float* o = sc.o.data() + static_cast<size_t>(r) * d;
    const float inv = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;  // no readable key: zeros
    for (int i = 0; i < d; ++i) sc.out[r][i] = o[i] * inv;
  }
}

// The rows of work item w in the scratch: query, output and last readable position per row.
template <typename TKV>
void ItemRows(const PagedAttentionParams<float>& p, const WorkItem& w, Scratch<TKV>& sc) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int h_begin = w.head >= 0 ? w.head : std::max(0, w.kv_head) * group;
  const int h_end = w.head >= 0 ? w.head + 1 : w.kv_head < 0 ? p.num_q_heads : h_begin + group;
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
}

// Lays out the rows and keys (entries [key_begin, key_end) of its list for a split-KV part) of
// one work item in the scratch, then attends.
template <typename TKV>
void RunItem(const PagedAttentionParams<float>& p, const TKV* kc, const TKV* vc,
             const WorkItem& w, Scratch<TKV>& sc, Partials& partials) {
  ItemRows(p, w, sc);
  sc.transpose = QueryLen(p, w.seq) * (p.num_q_heads / p.num_kv_heads) >= kTransposeRows;
  sc.prefetch = sc.transpose || w.sparse_row >= 0;
  const int last = LastPos(p, w.seq, w.q_end - 1);
  const int64_t kb = w.key_begin;
  const int64_t ke = w.key_end < 0 ? std::numeric_limits<int64_t>::max() : w.key_end;
  sc.keys.clear();
  if (w.sparse_row < 0) {
    for (int64_t t = kb; t <= last && t < ke; ++t) sc.keys.push_back(static_cast<int>(t));
  } else {
    const SparseAttentionIndex& x = *p.sparse;
    const int64_t r = w.sparse_row;
    int64_t n = 0;  // list entries before the current block
    for (int32_t i = x.row_start[r]; i < x.row_start[r + 1] && n < ke; ++i) {
      const int64_t first = int64_t{x.key_blocks[i]} * x.key_block;
      const int64_t end = std::min<int64_t>(first + x.key_block, int64_t{last} + 1);
      if (end <= first) continue;
      const int64_t from = first + std::max<int64_t>(0, kb - n);
      const int64_t to = std::min(end, first + std::min<int64_t>(ke - n, x.key_block));
      for (int64_t t = from; t < to; ++t) sc.keys.push_back(static_cast<int>(t));
      n += end - first;
    }
    if (x.column_start != nullptr) {
      for (int32_t i = x.column_start[r]; i < x.column_start[r + 1] && n < ke; ++i) {
        if (x.columns[i] > last) continue;
        if (n >= kb) sc.keys.push_back(x.columns[i]);
        ++n;
      }
    }
  }
  AttendRows(p, kc, vc, w.seq, w.kv_head, sc, w.partial_row >= 0 ? &partials : nullptr,
             w.partial_row);
}

// Combines the parts of split item g into its outputs: with M the largest part max, o = sum_i
// exp(m_i - M) o_i / sum_i exp(m_i - M) l_i (parts that read no key have l_i = 0 and drop out).
void MergeParts(const PagedAttentionParams<float>& p, const SplitGroup& g,
                const Partials& partials, Scratch<float>& sc) {
  const int d = p.head_dim;
  ItemRows(p, g.item, sc);
  sc.o.assign(d, 0.0f);
  for (int r = 0; r < g.rows; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int part = 0; part < g.parts; ++part) {
      const int64_t pr = g.partial_row + int64_t{part} * g.rows + r;
      if (partials.l[pr] > 0.0f) m = std::max(m, partials.m[pr]);
    }
    float l = 0.0f;
    std::fill(sc.o.begin(), sc.o.end(), 0.0f);
    for (int part = 0; part < g.parts; ++part) {
      const int64_t pr = g.partial_row + int64_t{part} * g.rows + r;
      if (!(partials.l[pr] > 0.0f)) continue;
      const float c = std::exp(partials.m[pr] - m);
      l += c * partials.l[pr];
      const float* o = partials.o.data() + pr * d;
      for (int i = 0; i < d; ++i) sc.o[i] += c * o[i];
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no readable key: zeros
    for (int i = 0; i < d; ++i) sc.out[r][i] = sc.o[i] * inv;
  }
}

template <typename TKV>
void Attend(const PagedAttentionParams<float>& p, const TKV* kc, const TKV* vc, int num_threads,
            bool group_shared_rows) {
  std::vector<SplitGroup> groups;
  int64_t partial_rows = 0;
  const std::vector<WorkItem> items = BuildWorkItems(p, group_shared_rows, groups, &partial_rows);
  if (items.empty()) return;
  Partials partials;
  partials.o.resize(static_cast<size_t>(partial_rows) * p.head_dim);
  partials.m.resize(partial_rows);
  partials.l.resize(partial_rows);
  if (num_threads <= 0) num_threads = DefaultCpuThreads();
  const int workers = static_cast<int>(std::min<int64_t>(num_threads, items.size()));
  std::atomic<int64_t> next{0};
  ParallelFor(workers, workers, 1, [&](int64_t, int64_t) {
    Scratch<TKV> sc;
    for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(items.size());
         i = next.fetch_add(1)) {
      RunItem(p, kc, vc, items[i], sc, partials);
    }
  });
  if (groups.empty()) return;
  const int merge_workers = static_cast<int>(std::min<int64_t>(num_threads, groups.size()));
  ParallelFor(static_cast<int64_t>(groups.size()), merge_workers, 1, [&](int64_t b, int64_t e) {
    Scratch<float> sc;
    for (int64_t g = b; g < e; ++g) MergeParts(p, groups[g], partials, sc);
  });
}

// One instantiation of the kernel per KV element type (the type-erased caches of kv).
void PagedAttentionCpuImpl(const PagedAttentionParams<float>& p, const PagedKvCache& kv,
                           int num_threads, bool group_shared_rows) {
  switch (kv.dtype) {
    case KvDtype::kFloat32:
      return Attend(p, static_cast<const float*>(kv.k), static_cast<const float*>(kv.v),
                    num_threads, group_shared_rows);
    case KvDtype::kBfloat16:
      return Attend(p, static_cast<const hwy::bfloat16_t*>(kv.k),
                    static_cast<const hwy::bfloat16_t*>(kv.v), num_threads, group_shared_rows);
    case KvDtype::kFloat16:
      return Attend(p, static_cast<const hwy::float16_t*>(kv.k),
                    static_cast<const hwy::float16_t*>(kv.v), num_threads, group_shared_rows);
  }
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
  PagedAttentionCpu(p, num_threads, PagedAttentionCpuOptions());
}

void PagedAttentionCpu(const PagedAttentionParams<float>& p, int num_threads,
                       const PagedAttentionCpuOptions& options) {
  PagedAttentionCpu(p, PagedKvCache{p.k_cache, p.v_cache, KvDtype::kFloat32}, num_threads,
                    options);
}

void PagedAttentionCpu(const PagedAttentionParams<float>& p, const PagedKvCache& kv,
                       int num_threads, const PagedAttentionCpuOptions& options) {
  HWY_DYNAMIC_DISPATCH(cpu_attention::PagedAttentionCpuImpl)(p, kv, num_threads,
                                                             options.group_shared_rows);
}

const char* PagedAttentionCpuTarget() {
  // The best (lowest-bit) target both compiled in and supported by the host.
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & -targets);
}

}  // namespace sieve::kernels
#endif  // HWY_ONCE
