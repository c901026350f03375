// The prefill tile path of the CPU attention kernel (paged_attention_cpu.cc): a work item of a
// sequence step with at least kTransposeRows rows (prefill, chunks) attends with its rows
// transposed, each K/V tile packed once as fp32 and register-blocked score and PV micro-kernels
// (kernels/cpu/tile_scores-inl.h). AttendRows (paged_attention_cpu.cc) hands such items to
// AttendRowsT. A Highway per-target header: include it after "hwy/highway.h" in a file that
// includes itself per target (hwy/foreach_target.h); the guard below toggles so that each target
// compiles its own copy.
#if defined(SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_TILE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_TILE_INL_H_
#undef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_TILE_INL_H_
#else
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_TILE_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/attention/paged_attention_cpu_items.h"
#include "kernels/cpu/kv_rows-inl.h"
#include "kernels/cpu/tile_scores-inl.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels {
namespace cpu_attention {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using kv_rows::HWY_NAMESPACE::WidenRowTo;
using tile_scores::HWY_NAMESPACE::kMaxRowVectors;


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
      WidenRowTo(kc + offs[j], d, sc.kp.data() + static_cast<size_t>(j) * d);
      WidenRowTo(vc + offs[j], d, sc.vp.data() + static_cast<size_t>(j) * d);
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

}  // namespace HWY_NAMESPACE
}  // namespace cpu_attention
}  // namespace sieve::kernels
HWY_AFTER_NAMESPACE();

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_CPU_TILE_INL_H_
