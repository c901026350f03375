// Tile micro-kernels of the CPU attention kernels that compute logits tile by tile: scores of
// query rows against a transposed key tile (the MInference estimator,
// kernels/sparse/minference_cpu.cc), and the prefill tile path of
// kernels/attention/paged_attention_cpu_tile-inl.h (rows transposed, register-blocked scores
// and PV). A Highway per-target header: include it after
// "hwy/highway.h" in a file that includes itself per target (hwy/foreach_target.h); the guard
// below toggles so that each target compiles its own copy.
#if defined(SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
#undef SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
#else
#define SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
#endif

#include <algorithm>
#include <cstddef>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels::tile_scores {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Two query rows against a transposed tile kt (key j's channel i at kt[i * tile + j], `tile`
// keys per channel row): s0[j] = scale * dot(q0, k_j) and s1[j] = scale * dot(q1, k_j) for
// j < n_pad, a multiple of 2 lanes (kt holds zeros past the tile's keys). q1/s1 may repeat
// q0/s0. Each K vector is loaded once for both rows and no horizontal sum is needed.
inline void TwoRows(const float* q0, const float* q1, const float* kt, int tile, int n_pad, int d,
                    float scale, float* s0, float* s1) {
  const hn::ScalableTag<float> df;
  const int L = static_cast<int>(hn::Lanes(df));
  const auto vs = hn::Set(df, scale);
  for (int jc = 0; jc < n_pad; jc += 2 * L) {
    auto a00 = hn::Zero(df), a01 = hn::Zero(df), a10 = hn::Zero(df), a11 = hn::Zero(df);
    for (int i = 0; i < d; ++i) {
      const float* ki = kt + static_cast<size_t>(i) * tile + jc;
      const auto k0 = hn::LoadU(df, ki), k1 = hn::LoadU(df, ki + L);
      const auto b0 = hn::Set(df, q0[i]), b1 = hn::Set(df, q1[i]);
      a00 = hn::MulAdd(b0, k0, a00);
      a01 = hn::MulAdd(b0, k1, a01);
      a10 = hn::MulAdd(b1, k0, a10);
      a11 = hn::MulAdd(b1, k1, a11);
    }
    hn::StoreU(hn::Mul(a00, vs), df, s0 + jc);
    hn::StoreU(hn::Mul(a01, vs), df, s0 + jc + L);
    hn::StoreU(hn::Mul(a10, vs), df, s1 + jc);
    hn::StoreU(hn::Mul(a11, vs), df, s1 + jc + L);
  }
}

// ---- The prefill tile path (kernels/attention/paged_attention_cpu_tile-inl.h): rows transposed
// An item's query rows are transposed once (qt[c * rp + r] = q_r[c], rp rows per channel, a
// multiple of the lane count), each tile's keys and values are packed into contiguous fp32 rows
// (kp[j * d + c]), scores come out transposed (st[j * rp + r]) and the outputs stay transposed
// (ot[c * rp + r]) until the item ends. Vectors run over 16 rows (AVX-512), so the online
// softmax needs no horizontal sums, and every lane computes its own row in a fixed order
// (channels, then keys, ascending): a row's result does not depend on which rows share its
// vectors, its item or its register block.

// Largest register blocks: 4 x 4 vectors of accumulators with 32 registers, 4 x 2 with 16.
constexpr int kMaxRowVectors = HWY_LANES(float) >= 16 ? 4 : 2;

// Transposes the L x L block v[0..L) (v[r] lane c) in registers into v[c] lane r, L the lane
// count: log2(L) rounds of ConcatEven/ConcatOdd over pairs, each of which rotates the bits of
// (vector, lane) by one.
template <class D, class V>
HWY_INLINE void TransposeSquare(D d, V* v) {
#if HWY_TARGET != HWY_SCALAR
  constexpr size_t kMax = HWY_LANES(float);
  const size_t L = hn::Lanes(d);
  V t[kMax];
  for (size_t round = 1; round < L; round <<= 1) {
#pragma GCC unroll 16
    for (size_t k = 0; k < L / 2; ++k) {
      t[k] = hn::ConcatEven(d, v[2 * k + 1], v[2 * k]);
      t[k + L / 2] = hn::ConcatOdd(d, v[2 * k + 1], v[2 * k]);
    }
#pragma GCC unroll 16
    for (size_t k = 0; k < L; ++k) v[k] = t[k];
  }
#else
  (void)d;
  (void)v;
#endif
}

// qt[c * rp + r] = rows[r][c] for r < n, c < d; zeros for rows n .. rp - 1 (rp a multiple of the
// lane count).
inline void PackTransposed(const float* const* rows, int n, int d, size_t rp, float* qt) {
  const hn::ScalableTag<float> df;
  const int L = static_cast<int>(hn::Lanes(df));
  using V = hn::Vec<decltype(df)>;
  for (int r0 = 0; r0 < static_cast<int>(rp); r0 += L) {
    int c = 0;
    for (; c + L <= d; c += L) {
      V v[HWY_LANES(float)];
      for (int k = 0; k < L; ++k) v[k] = r0 + k < n ? hn::LoadU(df, rows[r0 + k] + c) : hn::Zero(df);
      TransposeSquare(df, v);
      for (int k = 0; k < L; ++k) hn::StoreU(v[k], df, qt + static_cast<size_t>(c + k) * rp + r0);
    }
    for (; c < d; ++c) {
      for (int k = 0; k < L; ++k) qt[c * rp + r0 + k] = r0 + k < n ? rows[r0 + k][c] : 0.0f;
    }
  }
}

// rows[r][c] = ot[c * rp + r] * scale[r] for r < n, c < d (scale null: 1).
inline void UnpackTransposed(const float* ot, size_t rp, int n, int d, const float* scale,
                             float* const* rows) {
  const hn::ScalableTag<float> df;
  const int L = static_cast<int>(hn::Lanes(df));
  using V = hn::Vec<decltype(df)>;
  for (int r0 = 0; r0 < n; r0 += L) {
    const int m = std::min(L, n - r0);
    int c = 0;
    for (; c + L <= d; c += L) {
      V v[HWY_LANES(float)];
      for (int k = 0; k < L; ++k) v[k] = hn::LoadU(df, ot + static_cast<size_t>(c + k) * rp + r0);
      TransposeSquare(df, v);
      for (int k = 0; k < m; ++k) {
        hn::StoreU(scale ? hn::Mul(v[k], hn::Set(df, scale[r0 + k])) : v[k], df, rows[r0 + k] + c);
      }
    }
    for (; c < d; ++c) {
      for (int k = 0; k < m; ++k) {
        const float x = ot[c * rp + r0 + k];
        rows[r0 + k][c] = scale ? x * scale[r0 + k] : x;
      }
    }
  }
}

// st[j * rp + r] = scale * dot(q_r, k_j) for J keys (kj = kp + j0 * d) and RV row vectors from
// row r0: J broadcasts of K and RV loads of Q^T per channel, J x RV accumulators.
template <int J, int RV>
HWY_INLINE void ScoresBlockT(const float* qt, size_t rp, int r0, const float* kj, int d,
                             float scale, float* stj) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  const int L = static_cast<int>(hn::Lanes(df));
  V a[J][RV];
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) a[j][v] = hn::Zero(df);
  }
  const float* qi = qt + r0;
  for (int i = 0; i < d; ++i, qi += rp) {
    V q[RV];
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) q[v] = hn::LoadU(df, qi + v * L);
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const V b = hn::Set(df, kj[j * d + i]);
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) a[j][v] = hn::MulAdd(b, q[v], a[j][v]);
    }
  }
  const V vs = hn::Set(df, scale);
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) hn::StoreU(hn::Mul(a[j][v], vs), df, stj + j * rp + r0 + v * L);
  }
}

// Scores of keys [j0, j1) of the packed tile kp for RV row vectors from row r0 (above), four
// keys at a time (eight for one row vector: at least 8 accumulators keep both FMA pipes busy
// through their 4-cycle latency); `between` runs after each block (the caller's prefetches).
template <int RV, class F>
void ScoresT(const float* qt, size_t rp, int r0, const float* kp, int d, int j0, int j1,
             float scale, float* st, const F& between) {
  constexpr int J = RV == 1 ? 8 : 4;
  int j = j0;
  for (; j + J <= j1; j += J) {
    ScoresBlockT<J, RV>(qt, rp, r0, kp + static_cast<size_t>(j) * d, d, scale, st + j * rp);
    between();
  }
  if (J > 4 && j + 4 <= j1) {
    ScoresBlockT<4, RV>(qt, rp, r0, kp + static_cast<size_t>(j) * d, d, scale, st + j * rp);
    j += 4;
  }
  for (; j < j1; ++j) {
    ScoresBlockT<1, RV>(qt, rp, r0, kp + static_cast<size_t>(j) * d, d, scale, st + j * rp);
  }
}

// ot[c * rp + r] = ot[c * rp + r] * corr[r] (corr null: unchanged) + sum over keys j in [j0, j1)
// of pt[j * rp + r] * vp[j * d + c], for C channels from c0 and RV row vectors from row r0.
template <int C, int RV>
HWY_INLINE void AccumulateBlockT(const float* pt, size_t rp, int r0, const float* vp, int d,
                                 int c0, int j0, int j1, const float* corr, float* ot) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  const int L = static_cast<int>(hn::Lanes(df));
  V a[C][RV];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) {
      a[c][v] = hn::LoadU(df, ot + (c0 + c) * rp + r0 + v * L);
      if (corr != nullptr) a[c][v] = hn::Mul(a[c][v], hn::LoadU(df, corr + r0 + v * L));
    }
  }
  const float* vj = vp + static_cast<size_t>(j0) * d + c0;
  const float* pj = pt + j0 * rp + r0;
  for (int j = j0; j < j1; ++j, vj += d, pj += rp) {
    V p[RV];
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) p[v] = hn::LoadU(df, pj + v * L);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const V b = hn::Set(df, vj[c]);
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) a[c][v] = hn::MulAdd(b, p[v], a[c][v]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) hn::StoreU(a[c][v], df, ot + (c0 + c) * rp + r0 + v * L);
  }
}

// AccumulateBlockT over every channel, four at a time (eight for one row vector, as ScoresT);
// `between` runs after each block.
template <int RV, class F>
void AccumulateT(const float* pt, size_t rp, int r0, const float* vp, int d, int j0, int j1,
                 const float* corr, float* ot, const F& between) {
  constexpr int C = RV == 1 ? 8 : 4;
  int c = 0;
  for (; c + C <= d; c += C) {
    AccumulateBlockT<C, RV>(pt, rp, r0, vp, d, c, j0, j1, corr, ot);
    between();
  }
  for (; c < d; ++c) AccumulateBlockT<1, RV>(pt, rp, r0, vp, d, c, j0, j1, corr, ot);
}

}  // namespace HWY_NAMESPACE
}  // namespace sieve::kernels::tile_scores
HWY_AFTER_NAMESPACE();

#endif  // SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
