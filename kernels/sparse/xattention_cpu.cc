// The fast XAttention estimator (xattention.h). Highway's dynamic dispatch: this file includes
// itself once per x86 target (hwy/foreach_target.h); code outside HWY_NAMESPACE is compiled once.
#ifndef SIEVE_KERNELS_SPARSE_XATTENTION_CPU_ONCE_
#define SIEVE_KERNELS_SPARSE_XATTENTION_CPU_ONCE_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/xattention.h"

namespace sieve::kernels {
namespace xattention_cpu {

// Query-group rows per GEMM micro-tile (registers: kRows x 2 vector accumulators).
constexpr int kRows = 8;

// One work item: query head `head`, absolute query block `block`.
struct Item {
  int32_t head = 0;
  int32_t block = 0;
};

}  // namespace xattention_cpu
}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_XATTENTION_CPU_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/sparse/xattention_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels {
namespace xattention_cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Panel width: key groups per packed panel, two vectors.
inline int PanelWidth() { return 2 * static_cast<int>(hn::Lanes(DF())); }

// Packs the keys of KV head g: panel j holds key groups [j*W, j*W + W) as [S*d][W] floats,
// element (t*d + e, c) = k_{(j*W + c)*S + t}[e] (zero past the keys).
void PackKeys(const XAttentionParams& p, int32_t g, int64_t groups, float* packed,
              int num_threads) {
  const int W = PanelWidth();
  const int32_t S = p.stride, d = p.head_dim;
  const int64_t panels = (groups + W - 1) / W;
  const int64_t panel_floats = int64_t{S} * d * W;
  ParallelFor(panels, num_threads, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> widened(p.k_dtype == KvDtype::kFloat32 ? 0 : d);  // 16-bit keys
    for (int64_t j = begin; j < end; ++j) {
      float* out = packed + j * panel_floats;
      for (int c = 0; c < W; ++c) {
        const int64_t b = j * W + c;
        for (int32_t t = 0; t < S; ++t) {
          const int64_t pos = b * S + t;
          float* dst = out + int64_t{t} * d * W + c;
          if (pos >= p.kv_len) {
            for (int32_t e = 0; e < d; ++e) dst[int64_t{e} * W] = 0.0f;
            continue;
          }
          const int64_t row = KvRowOffset(p.kv_layout, p.page_table[pos / p.page_size],
                                          static_cast<int32_t>(pos % p.page_size), g,
                                          p.page_size, p.num_kv_heads, d);
          const float* src = RowAsFloat(p.k_cache, p.k_dtype, row, d, widened.data());
          for (int32_t e = 0; e < d; ++e) dst[int64_t{e} * W] = src[e];
        }
      }
    }
  });
}

// x[r][0..W) = sum over t, e of rows[r][t][e] * panel[(t*d + e) * W + c], for kRows rows.
void MicroTile(const float* const* rows, int32_t S, int32_t d, const float* panel, float* x,
               int64_t x_stride) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int W = 2 * L;
  auto c00 = hn::Zero(df), c01 = hn::Zero(df), c10 = hn::Zero(df), c11 = hn::Zero(df);
  auto c20 = hn::Zero(df), c21 = hn::Zero(df), c30 = hn::Zero(df), c31 = hn::Zero(df);
  auto c40 = hn::Zero(df), c41 = hn::Zero(df), c50 = hn::Zero(df), c51 = hn::Zero(df);
  auto c60 = hn::Zero(df), c61 = hn::Zero(df), c70 = hn::Zero(df), c71 = hn::Zero(df);
  for (int32_t t = 0; t < S; ++t) {
    const float* a0 = rows[0 * S + t];
    const float* a1 = rows[1 * S + t];
    const float* a2 = rows[2 * S + t];
    const float* a3 = rows[3 * S + t];
    const float* a4 = rows[4 * S + t];
    const float* a5 = rows[5 * S + t];
    const float* a6 = rows[6 * S + t];
    const float* a7 = rows[7 * S + t];
    const float* bp = panel + int64_t{t} * d * W;
    for (int32_t e = 0; e < d; ++e, bp += W) {
      const auto b0 = hn::LoadU(df, bp), b1 = hn::LoadU(df, bp + L);
      auto v = hn::Set(df, a0[e]);
      c00 = hn::MulAdd(v, b0, c00);
      c01 = hn::MulAdd(v, b1, c01);
      v = hn::Set(df, a1[e]);
      c10 = hn::MulAdd(v, b0, c10);
      c11 = hn::MulAdd(v, b1, c11);
      v = hn::Set(df, a2[e]);
      c20 = hn::MulAdd(v, b0, c20);
      c21 = hn::MulAdd(v, b1, c21);
      v = hn::Set(df, a3[e]);
      c30 = hn::MulAdd(v, b0, c30);
      c31 = hn::MulAdd(v, b1, c31);
      v = hn::Set(df, a4[e]);
      c40 = hn::MulAdd(v, b0, c40);
      c41 = hn::MulAdd(v, b1, c41);
      v = hn::Set(df, a5[e]);
      c50 = hn::MulAdd(v, b0, c50);
      c51 = hn::MulAdd(v, b1, c51);
      v = hn::Set(df, a6[e]);
      c60 = hn::MulAdd(v, b0, c60);
      c61 = hn::MulAdd(v, b1, c61);
      v = hn::Set(df, a7[e]);
      c70 = hn::MulAdd(v, b0, c70);
      c71 = hn::MulAdd(v, b1, c71);
    }
  }
  hn::StoreU(c00, df, x + 0 * x_stride);
  hn::StoreU(c01, df, x + 0 * x_stride + L);
  hn::StoreU(c10, df, x + 1 * x_stride);
  hn::StoreU(c11, df, x + 1 * x_stride + L);
  hn::StoreU(c20, df, x + 2 * x_stride);
  hn::StoreU(c21, df, x + 2 * x_stride + L);
  hn::StoreU(c30, df, x + 3 * x_stride);
  hn::StoreU(c31, df, x + 3 * x_stride + L);
  hn::StoreU(c40, df, x + 4 * x_stride);
  hn::StoreU(c41, df, x + 4 * x_stride + L);
  hn::StoreU(c50, df, x + 5 * x_stride);
  hn::StoreU(c51, df, x + 5 * x_stride + L);
  hn::StoreU(c60, df, x + 6 * x_stride);
  hn::StoreU(c61, df, x + 6 * x_stride + L);
  hn::StoreU(c70, df, x + 7 * x_stride);
  hn::StoreU(c71, df, x + 7 * x_stride + L);
}

// Softmax of z = x[0..n) * zscale in place (n >= 1), then adds each group's probability to
// mass[b / groups_per_block].
void SoftmaxIntoBlocks(float* x, int64_t n, float zscale, int32_t groups_per_block, float* mass) {
  const DF df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  const auto vscale = hn::Set(df, zscale);
  auto vmax = hn::Set(df, -HUGE_VALF);
  int64_t i = 0;
  for (; i + L <= n; i += L) vmax = hn::Max(vmax, hn::LoadU(df, x + i));
  float zmax = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; i < n; ++i) zmax = std::max(zmax, x[i]);
  zmax *= zscale;  // zscale > 0: the max of the scaled scores
  const auto vzmax = hn::Set(df, zmax);
  auto vsum = hn::Zero(df);
  i = 0;
  for (; i + L <= n; i += L) {
    const auto e = hn::Exp(df, hn::Sub(hn::Mul(hn::LoadU(df, x + i), vscale), vzmax));
    hn::StoreU(e, df, x + i);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] * zscale - zmax));
  const float inv = 1.0f / sum;
  for (int64_t b0 = 0, n_block = 0; b0 < n; b0 += groups_per_block, ++n_block) {
    const int64_t b1 = std::min<int64_t>(n, b0 + groups_per_block);
    int64_t j = b0;
    auto acc = hn::Zero(df);
    for (; j + L <= b1; j += L) acc = hn::Add(acc, hn::LoadU(df, x + j));
    float s = hn::GetLane(hn::SumOfLanes(df, acc));
    for (; j < b1; ++j) s += x[j];
    mass[n_block] += s * inv;
  }
}

void BlockMass(const XAttentionParams& p, float* mass, int num_threads) {
  const int32_t S = p.stride, B = p.block_size, d = p.head_dim;
  const int W = PanelWidth();
  const int32_t m0 = XAttentionFirstQueryBlock(p), qb = XAttentionQueryBlocks(p);
  const int32_t kb = XAttentionKeyBlocks(p);
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t first = p.kv_len - p.q_len;
  const int64_t key_groups = (p.kv_len + S - 1) / S;
  const int64_t panels = (key_groups + W - 1) / W;
  const int64_t panel_floats = int64_t{S} * d * W;
  const float zscale = 1.0f / (std::sqrt(static_cast<float>(d)) * S);
  std::fill(mass, mass + int64_t{p.num_q_heads} * qb * kb, 0.0f);
  if (num_threads <= 0) num_threads = DefaultCpuThreads();
  // Buffers kept per thread across calls (PackKeys and MicroTile write every element they later
  // read): a chunked prefill calls this once per chunk and layer, and fresh zeroed buffers cost
  // page faults and memsets comparable to the packing itself.
  thread_local std::vector<float> packed_buffer;
  if (packed_buffer.size() < static_cast<size_t>(panels * panel_floats)) {
    packed_buffer.resize(static_cast<size_t>(panels * panel_floats));
  }
  float* const packed = packed_buffer.data();  // a pointer: the lambda below runs on other threads
  const std::vector<float> zeros(static_cast<size_t>(d), 0.0f);
  // Items of one KV head, largest (latest query block) first.
  std::vector<Item> items;
  for (int32_t m = m0 + qb - 1; m >= m0; --m) {
    for (int32_t hh = 0; hh < group; ++hh) items.push_back({hh, m});
  }
  for (int32_t g = 0; g < p.num_kv_heads; ++g) {
    PackKeys(p, g, key_groups, packed, num_threads);
    std::atomic<size_t> next{0};
    ParallelFor(num_threads, num_threads, 1, [&](int64_t, int64_t) {
      std::vector<const float*> rows(static_cast<size_t>(kRows) * S);
      thread_local std::vector<float> x;
      if (x.size() < static_cast<size_t>(kRows) * panels * W) {
        x.resize(static_cast<size_t>(kRows) * panels * W);
      }
      const int64_t x_stride = panels * W;
      for (size_t it = next++; it < items.size(); it = next++) {
        const int32_t h = g * group + items[it].head;
        const int32_t m = items[it].block;
        float* row_mass = mass + (int64_t{h} * qb + (m - m0)) * kb;
        // Query groups of block m that hold a query.
        const int64_t a_begin = std::max<int64_t>(int64_t{m} * B / S, first / S);
        const int64_t a_end = std::min<int64_t>(int64_t{m + 1} * B / S, (p.kv_len - 1) / S + 1);
        for (int64_t a = a_begin; a < a_end; a += kRows) {
          const int nrows = static_cast<int>(std::min<int64_t>(kRows, a_end - a));
          for (int r = 0; r < kRows; ++r) {
            for (int32_t t = 0; t < S; ++t) {
              const int64_t pos = (a + r) * S + S - 1 - t;
              rows[r * S + t] = (r < nrows && pos >= first && pos < p.kv_len)
                                    ? p.q + (pos - first) * p.q_row_stride + int64_t{h} * d
                                    : zeros.data();
            }
          }
          const int64_t a_last = a + nrows - 1;
          for (int64_t j = 0; j * W <= a_last; ++j) {
            MicroTile(rows.data(), S, d, packed + j * panel_floats, x.data() + j * W,
                      x_stride);
          }
          for (int r = 0; r < nrows; ++r) {
            SoftmaxIntoBlocks(x.data() + r * x_stride, a + r + 1, zscale, B / S, row_mass);
          }
        }
      }
    });
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace xattention_cpu
}  // namespace sieve::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace sieve::kernels {
namespace xattention_cpu {
HWY_EXPORT(BlockMass);
}  // namespace xattention_cpu

void XAttentionBlockMassCpu(const XAttentionParams& p, float* mass, int num_threads) {
  HWY_DYNAMIC_DISPATCH(xattention_cpu::BlockMass)(p, mass, num_threads);
}

}  // namespace sieve::kernels
#endif  // HWY_ONCE
