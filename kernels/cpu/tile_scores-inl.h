// Scores of query rows against a transposed key tile, shared by the CPU attention kernels that
// compute logits tile by tile (kernels/attention/paged_attention_cpu.cc, the MInference
// estimator kernels/sparse/minference_cpu.cc). A Highway per-target header: include it after
// "hwy/highway.h" in a file that includes itself per target (hwy/foreach_target.h); the guard
// below toggles so that each target compiles its own copy.
#if defined(SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
#undef SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
#else
#define SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
#endif

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

// Four query rows against a transposed tile (as TwoRows): eight independent accumulators per
// step of 2 vectors, enough to cover the FMA latency of two pipes (4 cycles x 2), with each K
// vector loaded once for four rows. q[r]/s[r] may repeat (rows past the end of a group).
inline void FourRows(const float* const* q, const float* kt, int tile, int n_pad, int d,
                     float scale, float* const* s) {
  const hn::ScalableTag<float> df;
  const int L = static_cast<int>(hn::Lanes(df));
  const auto vs = hn::Set(df, scale);
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  for (int jc = 0; jc < n_pad; jc += 2 * L) {
    auto a00 = hn::Zero(df), a01 = hn::Zero(df), a10 = hn::Zero(df), a11 = hn::Zero(df);
    auto a20 = hn::Zero(df), a21 = hn::Zero(df), a30 = hn::Zero(df), a31 = hn::Zero(df);
    for (int i = 0; i < d; ++i) {
      const float* ki = kt + static_cast<size_t>(i) * tile + jc;
      const auto k0 = hn::LoadU(df, ki), k1 = hn::LoadU(df, ki + L);
      const auto b0 = hn::Set(df, q0[i]), b1 = hn::Set(df, q1[i]);
      const auto b2 = hn::Set(df, q2[i]), b3 = hn::Set(df, q3[i]);
      a00 = hn::MulAdd(b0, k0, a00);
      a01 = hn::MulAdd(b0, k1, a01);
      a10 = hn::MulAdd(b1, k0, a10);
      a11 = hn::MulAdd(b1, k1, a11);
      a20 = hn::MulAdd(b2, k0, a20);
      a21 = hn::MulAdd(b2, k1, a21);
      a30 = hn::MulAdd(b3, k0, a30);
      a31 = hn::MulAdd(b3, k1, a31);
    }
    hn::StoreU(hn::Mul(a00, vs), df, s[0] + jc);
    hn::StoreU(hn::Mul(a01, vs), df, s[0] + jc + L);
    hn::StoreU(hn::Mul(a10, vs), df, s[1] + jc);
    hn::StoreU(hn::Mul(a11, vs), df, s[1] + jc + L);
    hn::StoreU(hn::Mul(a20, vs), df, s[2] + jc);
    hn::StoreU(hn::Mul(a21, vs), df, s[2] + jc + L);
    hn::StoreU(hn::Mul(a30, vs), df, s[3] + jc);
    hn::StoreU(hn::Mul(a31, vs), df, s[3] + jc + L);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace sieve::kernels::tile_scores
HWY_AFTER_NAMESPACE();

#endif  // SIEVE_KERNELS_CPU_TILE_SCORES_INL_H_
