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
// 128: each K/V tile (gathered, transposed, prefetched once per item) serves twice the rows of
// 64, 1.06-1.25x on the prefill shapes of bench/cpu_attention_bench (2026-12-05).
constexpr int kRowsPerItem = 128;
// From this many rows on, an item takes the prefill tile path (AttendRowsT: its rows transposed
// once, each tile's K and V packed, register-blocked scores and PV over vectors of rows); below
// it (decode) per-key dot products with horizontal sums. Counted per sequence step (its
// queries x the group's heads), not per work item: the two paths sum a dot product in different
// orders, and every item of a step must take the same one, so that a sparse plan listing every
// key gives dense attention's result bit for bit however the items cut the rows.
constexpr int kTransposeRows = 8;
// Split-KV: a work item of at most kSplitMaxRows query rows (decode, very short chunks) that reads
// more than kSplitKeys keys is cut along its key list into parts of kSplitKeys keys, each run by
// whichever thread takes it, and the parts' partial softmax states are merged afterwards
// (log-sum-exp). The cut depends only on the item, never on the thread count or the batch, so
// results stay bitwise reproducible. 512 keys: a part reads 512 K and V rows (256 KB at d=128),
// enough to amortise the item overhead, and a 128K-token sequence gives 256 parts per KV head.
// Rows, not queries: a full dense prefill item (kRowsPerItem rows, 32 queries of a group of 4)
// is never split; its parts would only add partial states to write and merge (256 MB of them
// for a 512-token chunk over 16K keys on the Llama-3.1-8B shape).
constexpr int kSplitMaxRows = 16;
constexpr int kSplitKeys = 512;
static_assert(kSplitKeys % kKeyTile == 0, "parts are whole tiles");

// One unit of work: the queries [q_begin, q_end) of sequence `seq` (indices within the
// sequence) with all heads of KV head `kv_head` (dense, or sparse over the row `sparse_row` that
// all of them share), or with query head `head` over sparse row `sparse_row`.
struct WorkItem {
  int32_t seq = 0;
  int32_t kv_head = 0;
  int32_t head = -1;           // the query head, or -1: all heads of the group
  int32_t q_begin = 0, q_end = 0;
  int64_t sparse_row = -1;
  int64_t cost = 0;            // query rows x keys, for ordering largest first
  // Split-KV part: the item reads entries [key_begin, key_end) of its key list and leaves its
  // rows' partial state (unnormalised o, running max m, sum l) at partial rows [partial_row,
  // partial_row + rows) for MergeParts; key_end < 0: the whole list, written to out directly.
  int32_t key_begin = 0, key_end = -1;
  int64_t partial_row = -1;
};

// A split item: its parts are consecutive in the partial buffer, `rows` rows each.
struct SplitGroup {
  WorkItem item;  // the unsplit item (key_end < 0)
  int32_t parts = 0;
  int32_t rows = 0;
  int64_t partial_row = 0;  // the first part's first row
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

// True when sparse rows row .. row + group - 1 (the query heads of one KV head in one query
// block) list the same key blocks and columns, as a selection shared per KV head makes them.
inline bool GroupSharesKeys(const SparseAttentionIndex& x, int64_t row, int group) {
  auto same = [&](const int32_t* start, const int32_t* list) {
    const int32_t n = start[row + 1] - start[row];
    for (int g = 1; g < group; ++g) {
      if (start[row + g + 1] - start[row + g] != n ||
          !std::equal(list + start[row], list + start[row + 1], list + start[row + g])) {
        return false;
      }
    }
    return true;
  };
  return same(x.row_start, x.key_blocks) &&
         (x.column_start == nullptr || same(x.column_start, x.columns));
}

// Every work item of the call, largest first, with long short-query items cut into split-KV
// parts (described in `groups`; partial rows counted in *partial_rows). group_shared_rows: one
// item for the query heads of a KV head whose sparse rows list the same keys.
inline std::vector<WorkItem> BuildWorkItems(const PagedAttentionParams<float>& p,
                                            bool group_shared_rows,
                                            std::vector<SplitGroup>& groups,
                                            int64_t* partial_rows) {
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
        if (group_shared_rows && group > 1 && h % group == 0 && GroupSharesKeys(x, row, group)) {
          // One item for the whole group (head -1), as dense items: each K/V row it reads is
          // loaded once for all of the group's query heads.
          items.push_back({s, h / group, -1, qb, qe, row,
                           int64_t{qe - qb} * group * std::max<int64_t>(1, keys)});
          h += group - 1;
          continue;
        }
        items.push_back({s, h / group, h, qb, qe, row, int64_t{qe - qb} * std::max<int64_t>(1, keys)});
      }
    }
  }
  // Split-KV: the item's key count is cost / queries / heads (cost counts query rows x keys).
  groups.clear();
  *partial_rows = 0;
  const size_t unsplit = items.size();
  for (size_t i = 0; i < unsplit; ++i) {
    WorkItem& w = items[i];
    const int queries = w.q_end - w.q_begin;
    const int heads = w.head >= 0 ? 1 : group;
    const int64_t keys = w.cost / (int64_t{queries} * heads);
    if (queries * heads > kSplitMaxRows || keys <= kSplitKeys) continue;
    SplitGroup g;
    g.item = w;
    g.parts = static_cast<int32_t>((keys + kSplitKeys - 1) / kSplitKeys);
    g.rows = queries * heads;
    g.partial_row = *partial_rows;
    *partial_rows += int64_t{g.parts} * g.rows;
    for (int32_t part = 0; part < g.parts; ++part) {
      WorkItem pw = g.item;
      pw.key_begin = part * kSplitKeys;
      pw.key_end = static_cast<int32_t>(std::min<int64_t>(keys, int64_t{part + 1} * kSplitKeys));
      pw.partial_row = g.partial_row + int64_t{part} * g.rows;
      pw.cost = int64_t{g.rows} * (pw.key_end - pw.key_begin);
      if (part == 0) {
        w = pw;
      } else {
        items.push_back(pw);
      }
    }
    groups.push_back(g);
  }
  // Largest first. Dense items in classes of a power of two, and within a class by KV head:
  // threads then walk one KV head's items together, whose K and V rows stay in L3 from one item
  // to the next, instead of cycling through every KV head's rows (all of a 16K-token layer's K and
  // V, 64 MB on the 8B shape, do not fit in L3). Sparse items, which read few keys each, keep
  // the build order among equal costs (the KV heads of one query block together: the same pages
  // and query rows). The order only decides which thread runs what, never a result.
  auto size_class = [](int64_t c) { return c <= 0 ? 0 : 64 - __builtin_clzll(static_cast<uint64_t>(c)); };
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    if (a.sparse_row >= 0 || b.sparse_row >= 0) return a.cost > b.cost;
    const int ca = size_class(a.cost), cb = size_class(b.cost);
    if (ca != cb) return ca > cb;
    if (a.seq != b.seq) return a.seq < b.seq;
    if (a.kv_head != b.kv_head) return a.kv_head < b.kv_head;
    return a.cost > b.cost;
  });
  return items;
}

// Per-thread buffers, reused across the thread's work items; TKV is the KV cache's element type.
template <typename TKV>
struct Scratch {
  std::vector<const float*> q;   // [rows] query vectors
  std::vector<float*> out;       // [rows] output vectors
  std::vector<int> last;         // [rows] last key position each row may read
  std::vector<float> o;          // [rows, head_dim] unnormalised outputs
  std::vector<float> m, l;       // [rows] running max score and sum of exponentials
  std::vector<float> s;          // [rows, kKeyTile + lanes] scores, then probabilities
  std::vector<int> active;       // rows that read at least one key of the tile
  std::vector<int> keys;         // the item's key positions
  std::vector<const TKV*> k, v;  // [kKeyTile] the tile's K and V rows
  std::vector<int64_t> offs;     // the item's keys' row offsets into the K and V caches
  bool transpose = false;        // the item's step takes the prefill tile path (AttendRowsT)
  bool prefetch = false;         // prefetch each next tile's K/V rows (see AttendRows)
  // The prefill tile path, rows padded to rp (a multiple of the lane count):
  std::vector<float> qt, ot;     // [head_dim, rp] the queries and unnormalised outputs, transposed
  std::vector<float> st;         // [kKeyTile, rp] a tile's scores, then probabilities, transposed
  std::vector<float> kp, vp;     // [kKeyTile, head_dim] the tile's K and V rows, packed as fp32
  std::vector<float> corr;       // [rp] the tile's rescale of each row's output
  std::vector<int> lastp;        // [rp] last readable position per row (padding: the last row's)
  std::vector<int> vlo, vhi, jv; // per row vector: least and largest last position, keys to read
  std::vector<float*> dst;       // [rows] where the rows' results go
};

// Element offsets into the K and V caches of KV head kv_head's rows at positions pos[0, n):
// consecutive positions within a page step by a row, so only page changes divide.
inline void KeyOffsets(const PagedAttentionParams<float>& p, const int32_t* pages, int kv_head,
                       const int* pos, int n, int64_t* offs) {
  const int ps = p.page_size;
  const int64_t row = int64_t{p.num_kv_heads} * p.head_dim;
  const int64_t head = int64_t{kv_head} * p.head_dim;
  int prev = -2, in_page = 0;
  int64_t off = 0;
  for (int j = 0; j < n; ++j) {
    const int t = pos[j];
    if (t == prev + 1 && in_page + 1 < ps) {
      ++in_page;
      off += row;
    } else {
      in_page = t % ps;
      off = (int64_t{pages[t / ps]} * ps + in_page) * row + head;
    }
    offs[j] = off;
    prev = t;
  }
}

// The partial softmax states of split-KV parts: per partial row, o [head_dim], m and l.
struct Partials {
  std::vector<float> o, m, l;
};

}  // namespace cpu_attention
}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/attention/paged_attention_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/cpu/kv_rows-inl.h"
#include "kernels/cpu/tile_scores-inl.h"

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
using kv_rows::HWY_NAMESPACE::Scores;
using kv_rows::HWY_NAMESPACE::ScoresR;
using kv_rows::HWY_NAMESPACE::LoadKv;
using kv_rows::HWY_NAMESPACE::ToFloat;

// AccumulatePVR over the scratch's active rows a .. a + R - 1 (probabilities in sc.s).
template <int R, typename TKV>
void AccumulateRows(Scratch<TKV>& sc, int a, size_t ss, int n, int d) {
  const float* pr[R];
  float* orow[R];
  for (int i = 0; i < R; ++i) {
    pr[i] = sc.s.data() + sc.active[a + i] * ss;
    orow[i] = sc.o.data() + static_cast<size_t>(sc.active[a + i]) * d;
  }
  AccumulatePVR<R, TKV>(pr, sc.v.data(), n, d, orow);
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

// The tile's scores for the rows in sc.active, into sc.s (row stride `ss`): few rows (decode).
template <typename TKV>
void TileScores(const PagedAttentionParams<float>& p, int n, Scratch<TKV>& sc, size_t ss) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int d = p.head_dim;
  const int rows = static_cast<int>(sc.active.size());
  int a = 0;
  const float* q[4];
  float* s[4];
  auto take = [&](int count) {
    for (int i = 0; i < count; ++i) {
      q[i] = sc.q[sc.active[a + i]];
      s[i] = sc.s.data() + sc.active[a + i] * ss;
    }
  };
  if (d % L == 0) {
    for (; a + 4 <= rows; a += 4) {
      take(4);
      ScoresR<4, TKV>(q, sc.k.data(), n, d, p.scale, s);
    }
    for (; a + 2 <= rows; a += 2) {
      take(2);
      ScoresR<2, TKV>(q, sc.k.data(), n, d, p.scale, s);
    }
  }
  for (; a < rows; ++a) {
    const int r = sc.active[a];
    Scores(sc.q[r], sc.k.data(), n, d, p.scale, sc.s.data() + r * ss);
  }
}

// ---- The prefill tile path (steps of at least kTransposeRows rows) ----
using tile_scores::HWY_NAMESPACE::kMaxRowVectors;

// K or V row k [d] as fp32 into dst (16-bit caches widened).
template <typename TKV>
HWY_INLINE void PackRow(const TKV* k, int d, float* dst) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  int i = 0;
  for (; i + L <= d; i += L) hn::StoreU(LoadKv(df, k + i), df, dst + i);
  for (; i < d; ++i) dst[i] = ToFloat(k[i]);
}

// The online-softmax update of the row vector at row r0 for keys j < jn of a tile whose scores
// are st[j * rp + r] (transposed): keys past a row's last position masked (only keys past `lo`,
// the vector's least last position, need the test), running max m and sum l updated, the
// factor that rescales each row's output left in corr, st turned into probabilities.
void SoftmaxT(const int* pos, int jn, int lo, const int* last, size_t rp, int r0, float* st,
              float* m, float* l, float* corr) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const auto neg = hn::Set(df, -std::numeric_limits<float>::infinity());
  const auto lastv = hn::LoadU(di, last + r0);
  auto vmax = neg;
  for (int j = 0; j < jn; ++j) {
    float* s = st + j * rp + r0;
    auto x = hn::LoadU(df, s);
    if (pos[j] > lo) {
      x = hn::IfThenElse(hn::RebindMask(df, hn::Lt(lastv, hn::Set(di, pos[j]))), neg, x);
      hn::StoreU(x, df, s);
    }
    vmax = hn::Max(vmax, x);
  }
  const auto mo = hn::LoadU(df, m + r0);
  const auto mn = hn::Max(mo, vmax);
  // A row with nothing readable yet keeps m = -inf: subtract 0 there (exp(-inf) = 0). A row
  // whose max did not move (a tile wholly masked for it included) is rescaled by exactly 1.
  const auto msub = hn::IfThenZeroElse(hn::Eq(mn, neg), mn);
  const auto c = hn::IfThenElse(hn::Eq(mn, mo), hn::Set(df, 1.0f), hn::Exp(df, hn::Sub(mo, msub)));
  auto sum = hn::Zero(df);
  for (int j = 0; j < jn; ++j) {
    float* s = st + j * rp + r0;
    const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s), msub));
    hn::StoreU(e, df, s);
    sum = hn::Add(sum, e);
  }
  hn::StoreU(hn::MulAdd(hn::LoadU(df, l + r0), c, sum), df, l + r0);
  hn::StoreU(mn, df, m + r0);
  hn::StoreU(c, df, corr + r0);
}

// Scores (then, with pv, the PV update) of keys [j0, j1) for rv row vectors from row r0: the
// register block's width picked at run time.
template <class F>
void GroupScores(int rv, const float* qt, size_t rp, int r0, const float* kp, int d, int j0,
                 int j1, float scale, float* st, const F& between) {
  namespace ts = tile_scores::HWY_NAMESPACE;
  if constexpr (kMaxRowVectors >= 4) {
    if (rv == 4) return ts::ScoresT<4>(qt, rp, r0, kp, d, j0, j1, scale, st, between);
    if (rv == 3) return ts::ScoresT<3>(qt, rp, r0, kp, d, j0, j1, scale, st, between);
  }
  if (rv == 2) return ts::ScoresT<2>(qt, rp, r0, kp, d, j0, j1, scale, st, between);
  ts::ScoresT<1>(qt, rp, r0, kp, d, j0, j1, scale, st, between);
}
template <class F>
void GroupPV(int rv, const float* pt, size_t rp, int r0, const float* vp, int d, int j0, int j1,
             const float* corr, float* ot, const F& between) {
  namespace ts = tile_scores::HWY_NAMESPACE;
  if constexpr (kMaxRowVectors >= 4) {
    if (rv == 4) return ts::AccumulateT<4>(pt, rp, r0, vp, d, j0, j1, corr, ot, between);
    if (rv == 3) return ts::AccumulateT<3>(pt, rp, r0, vp, d, j0, j1, corr, ot, between);
  }
  if (rv == 2) return ts::AccumulateT<2>(pt, rp, r0, vp, d, j0, j1, corr, ot, between);
  ts::AccumulateT<1>(pt, rp, r0, vp, d, j0, j1, corr, ot, between);
}

// AttendRows for steps of many rows (prefill, chunks): the rows (sc.q, padded to a multiple of
// the lane count) are transposed once, each tile's K and V rows packed once as fp32; per group of
// up to kMaxRowVectors row vectors, scores, softmax and PV run over the keys the group's rows may
// read (with ascending keys, a prefix of the tile: the masked part of diagonal tiles is skipped
// per row vector). The next tile's rows are prefetched a few lines per score block.
template <typename TKV>
void AttendRowsT(const PagedAttentionParams<float>& p, const TKV* kc, const TKV* vc, int seq,
                 int kv_head, Scratch<TKV>& sc, Partials* partial, int64_t partial_row) {
  const int L = static_cast<int>(hn::Lanes(DF()));
  const int d = p.head_dim;
  const int rows = static_cast<int>(sc.q.size());
  const int nv = (rows + L - 1) / L;
  const size_t rp = static_cast<size_t>(nv) * L;
  const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  const int n_keys = static_cast<int>(sc.keys.size());
  sc.offs.resize(n_keys);
  KeyOffsets(p, pages, kv_head, sc.keys.data(), n_keys, sc.offs.data());
  // The first tile's K and V rows (one line each: the TLB walk and the first line start) while
  // the queries are transposed: an item of a sparse row reads only one or two tiles.
  for (int j = 0; j < std::min(n_keys, kKeyTile); ++j) {
    __builtin_prefetch(kc + sc.offs[j]);
    __builtin_prefetch(vc + sc.offs[j]);
  }
  sc.qt.resize(d * rp);
  tile_scores::HWY_NAMESPACE::PackTransposed(sc.q.data(), rows, d, rp, sc.qt.data());
  sc.ot.assign(d * rp, 0.0f);
  sc.m.assign(rp, -std::numeric_limits<float>::infinity());
  sc.l.assign(rp, 0.0f);
  sc.corr.resize(rp);
  sc.lastp.assign(sc.last.begin(), sc.last.end());
  sc.lastp.resize(rp, sc.last.back());
  sc.vlo.resize(nv);
  sc.vhi.resize(nv);
  sc.jv.resize(nv);
  for (int v = 0; v < nv; ++v) {
    const auto [lo, hi] = std::minmax_element(sc.lastp.begin() + v * L, sc.lastp.begin() + (v + 1) * L);
    sc.vlo[v] = *lo;
    sc.vhi[v] = *hi;
  }
  sc.st.resize(kKeyTile * rp);
  sc.kp.resize(static_cast<size_t>(kKeyTile) * d);
  sc.vp.resize(static_cast<size_t>(kKeyTile) * d);
  const int line = 64 / static_cast<int>(sizeof(TKV));  // elements per cache line
  const int lines_per_row = (d + line - 1) / line;
  for (int t0 = 0; t0 < n_keys; t0 += kKeyTile) {
    const int n = std::min(kKeyTile, n_keys - t0);
    const int* pos = sc.keys.data() + t0;
    const int64_t* offs = sc.offs.data() + t0;
    bool ascending = true;
    int tile_min = pos[0];
    for (int j = 0; j < n; ++j) {
      if (j > 0 && pos[j] <= pos[j - 1]) ascending = false;
      tile_min = std::min(tile_min, pos[j]);
      PackRow(kc + offs[j], d, sc.kp.data() + static_cast<size_t>(j) * d);
      PackRow(vc + offs[j], d, sc.vp.data() + static_cast<size_t>(j) * d);
    }
    for (int v = 0; v < nv; ++v) {
      sc.jv[v] = ascending ? static_cast<int>(std::upper_bound(pos, pos + n, sc.vhi[v]) - pos)
                           : (tile_min <= sc.vhi[v] ? n : 0);
    }
    // The next tile's K and V rows, toward the caches while this tile is computed: a row of a
    // long context is in L3 or memory, and the gather of scattered pages defeats the hardware
    // prefetchers. Spread over the tile's score blocks: issued all at once, they fill the miss
    // queue and stall the core (12% of the kernel's time on the 8B shape before 2026-12-06).
    const int n2 = std::min(kKeyTile, n_keys - t0 - kKeyTile);
    const int pf_total = n2 > 0 ? n2 * lines_per_row : 0;
    const int groups = (nv + kMaxRowVectors - 1) / kMaxRowVectors;
    const int calls = std::max(1, groups * (n / 4 + d / 4));  // score and PV blocks
    const int pf_step = (pf_total + calls - 1) / calls;
    int pf_next = 0;
    auto prefetch = [&](int count) {
      for (const int e = std::min(pf_total, pf_next + count); pf_next < e; ++pf_next) {
        // The first line of every row first: each row is in its own 4 KB page (8 KV heads of
        // 512 B per token), and its first touch is a TLB miss; walks start early and overlap.
        const int64_t off = offs[kKeyTile + pf_next % n2] + (pf_next / n2) * line;
        __builtin_prefetch(kc + off);
        __builtin_prefetch(vc + off);
      }
    };
    auto between = [&] { prefetch(pf_step); };
    float* st = sc.st.data();
    for (int g0 = 0; g0 < nv; g0 += kMaxRowVectors) {
      const int gv = std::min(kMaxRowVectors, nv - g0);
      int* jv = sc.jv.data() + g0;
      if (!std::is_sorted(jv, jv + gv)) std::fill(jv, jv + gv, *std::max_element(jv, jv + gv));
      if (jv[gv - 1] == 0) continue;  // the tile is in the future of every row of the group
      // Vectors read ascending key prefixes (rows are in query order): keys [jv[v - 1], jv[v])
      // are read by vectors v .. gv - 1, one register block of gv - v vectors per segment. Each
      // lane still sums over channels, then keys, in ascending order.
      for (int v = 0, from = 0; v < gv; from = jv[v++]) {
        if (jv[v] == from) continue;
        GroupScores(gv - v, sc.qt.data(), rp, (g0 + v) * L, sc.kp.data(), d, from, jv[v],
                    p.scale, st, between);
      }
      for (int v = 0; v < gv; ++v) {
        if (jv[v] > 0) {
          SoftmaxT(pos, jv[v], sc.vlo[g0 + v], sc.lastp.data(), rp, (g0 + v) * L, st,
                   sc.m.data(), sc.l.data(), sc.corr.data());
        }
      }
      // The rescale goes with a vector's first segment: the one that starts at key 0.
      for (int v = 0, from = 0; v < gv; from = jv[v++]) {
        if (jv[v] == from) continue;
        GroupPV(gv - v, st, rp, (g0 + v) * L, sc.vp.data(), d, from, jv[v],
                from == 0 ? sc.corr.data() : nullptr, sc.ot.data(), between);
      }
    }
    prefetch(pf_total);
  }
  if (partial != nullptr) {  // a split-KV part: keep the state for MergeParts
    sc.dst.resize(rows);
    for (int r = 0; r < rows; ++r) sc.dst[r] = partial->o.data() + (partial_row + r) * d;
    tile_scores::HWY_NAMESPACE::UnpackTransposed(sc.ot.data(), rp, rows, d, nullptr,
                                                 sc.dst.data());
    std::copy(sc.m.begin(), sc.m.begin() + rows, partial->m.begin() + partial_row);
    std::copy(sc.l.begin(), sc.l.begin() + rows, partial->l.begin() + partial_row);
    return;
  }
  for (int r = 0; r < rows; ++r) sc.corr[r] = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;  // no key: 0
  tile_scores::HWY_NAMESPACE::UnpackTransposed(sc.ot.data(), rp, rows, d, sc.corr.data(),
                                               sc.out.data());
}

// Attention of the scratch's rows (sc.q, sc.out, sc.last) over the key positions sc.keys of
// sequence `seq`, KV head `kv_head`: normalised into sc.out, or (partial non-null) the rows'
// unnormalised state into partial rows [partial_row, partial_row + rows).
template <typename TKV>
void AttendRows(const PagedAttentionParams<float>& p, const TKV* kc, const TKV* vc, int seq,
                int kv_head, Scratch<TKV>& sc, Partials* partial, int64_t partial_row) {
  if (sc.transpose) return AttendRowsT(p, kc, vc, seq, kv_head, sc, partial, partial_row);
  const int d = p.head_dim;
  const int rows = static_cast<int>(sc.q.size());
  const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  const size_t ss = kKeyTile + 2 * hn::Lanes(DF());  // row stride of sc.s
  sc.o.assign(static_cast<size_t>(rows) * d, 0.0f);
  sc.m.assign(rows, -std::numeric_limits<float>::infinity());
  sc.l.assign(rows, 0.0f);
  sc.s.resize(ss * rows);
  sc.k.resize(kKeyTile);
  sc.v.resize(kKeyTile);
  const int n_keys = static_cast<int>(sc.keys.size());
  sc.offs.resize(n_keys);
  KeyOffsets(p, pages, kv_head, sc.keys.data(), n_keys, sc.offs.data());
  for (int t0 = 0; t0 < n_keys; t0 += kKeyTile) {
    const int n = std::min(kKeyTile, n_keys - t0);
    const int* pos = sc.keys.data() + t0;
    int tile_min = pos[0], tile_max = pos[0];
    const int64_t* offs = sc.offs.data() + t0;
    for (int j = 0; j < n; ++j) {
      const int t = pos[j];
      tile_min = std::min(tile_min, t);
      tile_max = std::max(tile_max, t);
      sc.k[j] = kc + offs[j];
      sc.v[j] = vc + offs[j];
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
    sc.active.clear();
    for (int r = 0; r < rows; ++r) {
      if (sc.last[r] >= tile_min) sc.active.push_back(r);  // else the tile is in its future
    }
    TileScores(p, n, sc, ss);
    int kept = 0;
    for (int r : sc.active) {
      if (SoftmaxUpdate(sc.last[r], pos, n, tile_max, d, sc.m[r], sc.l[r],
                        sc.o.data() + static_cast<size_t>(r) * d, sc.s.data() + r * ss)) {
        sc.active[kept++] = r;
      }
    }
    int a = 0;
    for (; a + 8 <= kept; a += 8) AccumulateRows<8, TKV>(sc, a, ss, n, d);
    for (; a + 4 <= kept; a += 4) AccumulateRows<4, TKV>(sc, a, ss, n, d);
    for (; a < kept; a += 2) {
      const int r0 = sc.active[a];
      float* o0 = sc.o.data() + static_cast<size_t>(r0) * d;
      if (a + 1 == kept) {
        AccumulatePV(sc.s.data() + r0 * ss, sc.v.data(), n, d, o0);
        break;
      }
      const int r1 = sc.active[a + 1];
      AccumulatePV2(sc.s.data() + r0 * ss, sc.s.data() + r1 * ss, sc.v.data(), n, d, o0,
                    sc.o.data() + static_cast<size_t>(r1) * d);
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
