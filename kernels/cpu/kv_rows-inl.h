// Per-row attention micro-kernels over K and V rows stored as fp32, bfloat16 or float16 (each
// vector widened to fp32 as it is loaded), for the CPU attention kernel
// (kernels/attention/paged_attention_cpu.cc): scores of one or R query rows against a few keys,
// and o += p * V for one, two or R rows. A Highway per-target header: include it after
// "hwy/highway.h" in a file that includes itself per target (hwy/foreach_target.h); the guard
// below toggles so that each target compiles its own copy.
#if defined(SIEVE_KERNELS_CPU_KV_ROWS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SIEVE_KERNELS_CPU_KV_ROWS_INL_H_
#undef SIEVE_KERNELS_CPU_KV_ROWS_INL_H_
#else
#define SIEVE_KERNELS_CPU_KV_ROWS_INL_H_
#endif

#include <type_traits>
#include <vector>

#include "hwy/highway.h"
#include "kernels/cpu/half.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels::kv_rows {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// A KV element as fp32 (scalar tails; the vector loads are LoadKv below).
inline float ToFloat(float x) { return x; }
inline float ToFloat(hwy::bfloat16_t x) { return Bf16ToFloat(x.bits); }
inline float ToFloat(hwy::float16_t x) { return F16ToFloat(x.bits); }

// Lanes(df) KV elements from p (unaligned) as fp32: bfloat16 widens with a shift, float16 with
// F16C's vcvtph2ps where the target has it; fp32 is a plain load.
template <typename TKV>
HWY_INLINE hn::Vec<DF> LoadKv(DF df, const TKV* p) {
  if constexpr (std::is_same_v<TKV, float>) {
    return hn::LoadU(df, p);
  } else {
    const hn::Rebind<TKV, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, p));
  }
}

// Row k [d] as fp32 into dst (16-bit rows widened, fp32 rows copied).
template <typename TKV>
HWY_INLINE void WidenRowTo(const TKV* k, int d, float* dst) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  int i = 0;
  for (; i + L <= d; i += L) hn::StoreU(LoadKv(df, k + i), df, dst + i);
  for (; i < d; ++i) dst[i] = ToFloat(k[i]);
}

// Row k [d] as fp32: k itself for fp32, else widened into buf (resized to d).
inline const float* WidenRow(const float* k, int, std::vector<float>&) { return k; }
template <typename TKV>
const float* WidenRow(const TKV* k, int d, std::vector<float>& buf) {
  buf.resize(d);
  WidenRowTo(k, d, buf.data());
  return buf.data();
}

// s[j] = scale * dot(q, k[j]) for j < n, four keys at a time.
template <typename TKV>
void Scores(const float* q, const TKV* const* k, int n, int d, float scale, float* s) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int dv = d - d % L;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
    const TKV *k0 = k[j], *k1 = k[j + 1], *k2 = k[j + 2], *k3 = k[j + 3];
    for (int i = 0; i < dv; i += L) {
      const auto qv = hn::LoadU(df, q + i);
      a0 = hn::MulAdd(qv, LoadKv(df, k0 + i), a0);
      a1 = hn::MulAdd(qv, LoadKv(df, k1 + i), a1);
      a2 = hn::MulAdd(qv, LoadKv(df, k2 + i), a2);
      a3 = hn::MulAdd(qv, LoadKv(df, k3 + i), a3);
    }
    float t0 = hn::GetLane(hn::SumOfLanes(df, a0)), t1 = hn::GetLane(hn::SumOfLanes(df, a1));
    float t2 = hn::GetLane(hn::SumOfLanes(df, a2)), t3 = hn::GetLane(hn::SumOfLanes(df, a3));
    for (int i = dv; i < d; ++i) {
      t0 += q[i] * ToFloat(k0[i]);
      t1 += q[i] * ToFloat(k1[i]);
      t2 += q[i] * ToFloat(k2[i]);
      t3 += q[i] * ToFloat(k3[i]);
    }
    s[j] = t0 * scale;
    s[j + 1] = t1 * scale;
    s[j + 2] = t2 * scale;
    s[j + 3] = t3 * scale;
  }
  for (; j < n; ++j) {
    auto a = hn::Zero(df);
    for (int i = 0; i < dv; i += L) a = hn::MulAdd(hn::LoadU(df, q + i), LoadKv(df, k[j] + i), a);
    float t = hn::GetLane(hn::SumOfLanes(df, a));
    for (int i = dv; i < d; ++i) t += q[i] * ToFloat(k[j][i]);
    s[j] = t * scale;
  }
}

// Scores of R rows (decode: the query heads of a KV head) against the same keys:
// s[r][j] = scale * dot(q[r], k[j]), four keys at a time, each K vector loaded once for the R
// rows (4R accumulators). q[r]/s[r] may repeat. d a multiple of the lane count.
template <int R, typename TKV>
void ScoresR(const float* const* q, const TKV* const* k, int n, int d, float scale,
             float* const* s) {
  const DF df;
  using V = hn::Vec<DF>;
  const int L = static_cast<int>(hn::Lanes(df));
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    V a[R][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) a[r][c] = hn::Zero(df);
    }
    for (int i = 0; i < d; i += L) {
      const V k0 = LoadKv(df, k[j] + i), k1 = LoadKv(df, k[j + 1] + i);
      const V k2 = LoadKv(df, k[j + 2] + i), k3 = LoadKv(df, k[j + 3] + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const V qv = hn::LoadU(df, q[r] + i);
        a[r][0] = hn::MulAdd(qv, k0, a[r][0]);
        a[r][1] = hn::MulAdd(qv, k1, a[r][1]);
        a[r][2] = hn::MulAdd(qv, k2, a[r][2]);
        a[r][3] = hn::MulAdd(qv, k3, a[r][3]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) s[r][j + c] = hn::GetLane(hn::SumOfLanes(df, a[r][c])) * scale;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (j < n) Scores(q[r], k + j, n - j, d, scale, s[r] + j);
  }
}

// o += sum_j p[j] * v[j] over j < n, up to four vectors of o held in registers at a time.
template <typename TKV>
void AccumulatePV(const float* p, const TKV* const* v, int n, int d, float* o) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  int i = 0;
  for (; i + 4 * L <= d; i += 4 * L) {
    auto a0 = hn::LoadU(df, o + i), a1 = hn::LoadU(df, o + i + L);
    auto a2 = hn::LoadU(df, o + i + 2 * L), a3 = hn::LoadU(df, o + i + 3 * L);
    for (int j = 0; j < n; ++j) {
      const auto pj = hn::Set(df, p[j]);
      const TKV* vj = v[j] + i;
      a0 = hn::MulAdd(pj, LoadKv(df, vj), a0);
      a1 = hn::MulAdd(pj, LoadKv(df, vj + L), a1);
      a2 = hn::MulAdd(pj, LoadKv(df, vj + 2 * L), a2);
      a3 = hn::MulAdd(pj, LoadKv(df, vj + 3 * L), a3);
    }
    hn::StoreU(a0, df, o + i);
    hn::StoreU(a1, df, o + i + L);
    hn::StoreU(a2, df, o + i + 2 * L);
    hn::StoreU(a3, df, o + i + 3 * L);
  }
  for (; i + L <= d; i += L) {
    auto a = hn::LoadU(df, o + i);
    for (int j = 0; j < n; ++j) a = hn::MulAdd(hn::Set(df, p[j]), LoadKv(df, v[j] + i), a);
    hn::StoreU(a, df, o + i);
  }
  for (; i < d; ++i) {
    float a = o[i];
    for (int j = 0; j < n; ++j) a += p[j] * ToFloat(v[j][i]);
    o[i] = a;
  }
}

// Two rows' o += sum_j p[j] * v[j] (AccumulatePV for a pair: each V vector loaded once).
template <typename TKV>
void AccumulatePV2(const float* p0, const float* p1, const TKV* const* v, int n, int d,
                   float* o0, float* o1) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  int i = 0;
  for (; i + 2 * L <= d; i += 2 * L) {
    auto a0 = hn::LoadU(df, o0 + i), a1 = hn::LoadU(df, o0 + i + L);
    auto b0 = hn::LoadU(df, o1 + i), b1 = hn::LoadU(df, o1 + i + L);
    for (int j = 0; j < n; ++j) {
      const auto x = hn::Set(df, p0[j]), y = hn::Set(df, p1[j]);
      const auto v0 = LoadKv(df, v[j] + i), v1 = LoadKv(df, v[j] + i + L);
      a0 = hn::MulAdd(x, v0, a0);
      a1 = hn::MulAdd(x, v1, a1);
      b0 = hn::MulAdd(y, v0, b0);
      b1 = hn::MulAdd(y, v1, b1);
    }
    hn::StoreU(a0, df, o0 + i);
    hn::StoreU(a1, df, o0 + i + L);
    hn::StoreU(b0, df, o1 + i);
    hn::StoreU(b1, df, o1 + i + L);
  }
  if (i < d) {  // the rest of the head dimension, one row at a time
    std::vector<const TKV*> tail(v, v + n);
    for (const TKV*& t : tail) t += i;
    AccumulatePV(p0, tail.data(), n, d - i, o0 + i);
    AccumulatePV(p1, tail.data(), n, d - i, o1 + i);
  }
}

// AccumulatePVR reading each V row in address order: key by key, the R outputs updated in memory
// (L1) one vector at a time. For V rows that the hardware prefetchers bring in only when read
// front to back (a head-major page's rows of one head: AccumulatePVR's column passes over them
// stall on every line).
template <int R, typename TKV>
void AccumulatePVRowwise(const float* const* p, const TKV* const* v, int n, int d,
                         float* const* o) {
  const DF df;
  using V = hn::Vec<DF>;
  const int L = static_cast<int>(hn::Lanes(df));
  for (int j = 0; j < n; ++j) {
    V x[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) x[r] = hn::Set(df, p[r][j]);
    const TKV* vj = v[j];
    for (int i = 0; i < d; i += L) {
      const V vv = LoadKv(df, vj + i);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        hn::StoreU(hn::MulAdd(x[r], vv, hn::LoadU(df, o[r] + i)), df, o[r] + i);
      }
    }
  }
}

// R rows' o[r] += sum_j p[r][j] * v[j] (AccumulatePV for R rows): 2R accumulators (R rows x 2
// vectors) per step, each V vector loaded once for R rows. R even.
template <int R, typename TKV>
void AccumulatePVR(const float* const* p, const TKV* const* v, int n, int d, float* const* o) {
  const DF df;
  using V = hn::Vec<DF>;
  const int L = static_cast<int>(hn::Lanes(df));
  int i = 0;
  for (; i + 2 * L <= d; i += 2 * L) {
    V a0[R], a1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      a0[r] = hn::LoadU(df, o[r] + i);
      a1[r] = hn::LoadU(df, o[r] + i + L);
    }
    for (int j = 0; j < n; ++j) {
      const V v0 = LoadKv(df, v[j] + i), v1 = LoadKv(df, v[j] + i + L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V x = hn::Set(df, p[r][j]);
        a0[r] = hn::MulAdd(x, v0, a0[r]);
        a1[r] = hn::MulAdd(x, v1, a1[r]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      hn::StoreU(a0[r], df, o[r] + i);
      hn::StoreU(a1[r], df, o[r] + i + L);
    }
  }
  if (i < d) {  // the rest of the head dimension, two rows at a time
    std::vector<const TKV*> tail(v, v + n);
    for (const TKV*& t : tail) t += i;
    for (int r = 0; r < R; r += 2) {
      AccumulatePV2(p[r], p[r + 1], tail.data(), n, d - i, o[r] + i, o[r + 1] + i);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace sieve::kernels::kv_rows
HWY_AFTER_NAMESPACE();

#endif  // SIEVE_KERNELS_CPU_KV_ROWS_INL_H_
