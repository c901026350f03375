// The fp32 VS estimator (minference.h, VsScoresCpu), vectorised with Highway's dynamic
// dispatch in the style of kernels/attention/paged_attention_cpu.cc: the estimation queries'
// logits against every key are computed tile by tile (64 keys transposed once, two query rows
// at a time, no horizontal sums), then each row is softmaxed in place and added into the
// vertical (column) and slash (diagonal) sums.
#ifndef SIEVE_KERNELS_SPARSE_MINFERENCE_CPU_ONCE_
#define SIEVE_KERNELS_SPARSE_MINFERENCE_CPU_ONCE_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/sparse/minference.h"

namespace sieve::kernels::minference {
namespace cpu {

// Per-thread buffers, reused across calls on the thread.
struct Scratch {
  std::vector<float> logit;  // [rows, stride] the rows' logits, then probabilities
  std::vector<float> kt;     // [head_dim, kBlock] one key tile transposed
  std::vector<float> row;    // [head_dim] a 16-bit key widened
};

inline Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace cpu
}  // namespace sieve::kernels::minference

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_CPU_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/sparse/minference_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/cpu/tile_scores-inl.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels::minference {
namespace cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Two query rows against a transposed tile of kBlock keys (kernels/cpu/tile_scores-inl.h).
inline void ScoresT(const float* q0, const float* q1, const float* kt, int n_pad, int d,
                    float scale, float* s0, float* s1) {
  tile_scores::HWY_NAMESPACE::TwoRows(q0, q1, kt, kBlock, n_pad, d, scale, s0, s1);
}

void VsScoresImpl(const PagedAttentionParams<float>& p, int seq, int head, int last_q,
                  float* vertical, float* slash, KvDtype k_dtype) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int32_t q_len = p.query_start[seq + 1] - p.query_start[seq];
  const int32_t n = p.kv_lens[seq], d = p.head_dim;
  const int32_t lq = std::min(std::max(last_q, 1), q_len);
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int32_t* pages = p.page_table + int64_t{seq} * p.page_table_stride;
  Scratch& sc = ThreadScratch();
  const size_t stride = static_cast<size_t>((n + kBlock - 1) / kBlock * kBlock + 2 * L);
  sc.logit.resize(stride * lq);
  sc.kt.resize(static_cast<size_t>(d) * kBlock);
  sc.row.resize(d);
  std::vector<const float*> q(lq);
  for (int32_t r = 0; r < lq; ++r) {
    q[r] = p.q + ((int64_t{p.query_start[seq]} + q_len - lq + r) * p.num_q_heads + head) *
                     int64_t{d};
  }
  const int32_t pos0 = n - lq;  // position of the first estimation query
  for (int32_t t0 = 0; t0 < n; t0 += kBlock) {
    const int nk = std::min<int32_t>(kBlock, n - t0);
    const int n_pad = (nk + 2 * L - 1) / (2 * L) * (2 * L);
    for (int j = 0; j < nk; ++j) {
      const int t = t0 + j;
      const int64_t page = pages[t / p.page_size];
      const float* k = RowAsFloat(p.k_cache, k_dtype,
                                  KvRowOffset(p.kv_layout, page, t % p.page_size, kv_head,
                                              p.page_size, p.num_kv_heads, d),
                                  d, sc.row.data());
      for (int i = 0; i < d; ++i) sc.kt[static_cast<size_t>(i) * kBlock + j] = k[i];
    }
    for (int i = 0; i < d; ++i) {
      std::fill(sc.kt.begin() + static_cast<size_t>(i) * kBlock + nk,
                sc.kt.begin() + static_cast<size_t>(i) * kBlock + n_pad, 0.0f);
    }
    // Rows whose causal range starts before t0 + nk (all but a few in the last tiles).
    const int32_t r0 = std::max(0, t0 - pos0);
    for (int32_t r = r0; r < lq; r += 2) {
      const int32_t r1 = std::min(r + 1, lq - 1);
      ScoresT(q[r], q[r1], sc.kt.data(), n_pad, d, p.scale, sc.logit.data() + r * stride + t0,
              sc.logit.data() + r1 * stride + t0);
    }
  }
  std::fill(vertical, vertical + n, 0.0f);
  std::fill(slash, slash + n, 0.0f);
  for (int32_t r = 0; r < lq; ++r) {
    const int32_t pos = pos0 + r, cnt = pos + 1;  // keys [0, pos]
    float* s = sc.logit.data() + r * stride;
    const int vec = cnt - cnt % L;
    auto vmax = hn::Set(df, -std::numeric_limits<float>::infinity());
    for (int j = 0; j < vec; j += L) vmax = hn::Max(vmax, hn::LoadU(df, s + j));
    float mx = hn::GetLane(hn::MaxOfLanes(df, vmax));
    for (int j = vec; j < cnt; ++j) mx = std::max(mx, s[j]);
    const auto vm = hn::Set(df, mx);
    auto vsum = hn::Zero(df);
    for (int j = 0; j < vec; j += L) {
      const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + j), vm));
      hn::StoreU(e, df, s + j);
      vsum = hn::Add(vsum, e);
    }
    float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
    for (int j = vec; j < cnt; ++j) sum += (s[j] = std::exp(s[j] - mx));
    const float inv = 1.0f / sum;
    const auto vinv = hn::Set(df, inv);
    for (int j = 0; j < vec; j += L) {
      hn::StoreU(hn::MulAdd(hn::LoadU(df, s + j), vinv, hn::LoadU(df, vertical + j)), df,
                 vertical + j);
    }
    for (int j = vec; j < cnt; ++j) vertical[j] += s[j] * inv;
    // slash[pos - j] += p_j: the row reversed onto the diagonals.
    float* sl = slash + pos;
    for (int j = 0; j < cnt; ++j) sl[-j] += s[j] * inv;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace cpu
}  // namespace sieve::kernels::minference
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace sieve::kernels::minference {
namespace cpu {
HWY_EXPORT(VsScoresImpl);
}  // namespace cpu

void VsScoresCpu(const PagedAttentionParams<float>& p, int seq, int head, int last_q,
                 float* vertical, float* slash, KvDtype k_dtype) {
  HWY_DYNAMIC_DISPATCH(cpu::VsScoresImpl)(p, seq, head, last_q, vertical, slash, k_dtype);
}

}  // namespace sieve::kernels::minference
#endif  // HWY_ONCE
