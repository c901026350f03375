// XAttention's fp64 reference estimator and the threshold selection (xattention.h).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/sparse/xattention.h"

namespace sieve::kernels {
namespace {

// Key position `pos` of KV head g as fp32 (16-bit keys widened into buf), or null past the keys.
const float* KeyAt(const XAttentionParams& p, int32_t g, int64_t pos, float* buf) {
  if (pos >= p.kv_len) return nullptr;
  return RowAsFloat(p.k_cache, p.k_dtype,
                    KvRowOffset(p.kv_layout, p.page_table[pos / p.page_size],
                                static_cast<int32_t>(pos % p.page_size), g, p.page_size,
                                p.num_kv_heads, p.head_dim),
                    p.head_dim, buf);
}

// Query at position `pos` of head h, or null outside the sequence's queries.
const float* QueryAt(const XAttentionParams& p, int32_t h, int64_t pos) {
  const int64_t first = p.kv_len - p.q_len;
  if (pos < first || pos >= p.kv_len) return nullptr;
  return p.q + (pos - first) * p.q_row_stride + int64_t{h} * p.head_dim;
}

}  // namespace

void XAttentionBlockMassRef(const XAttentionParams& p, double* mass) {
  const int32_t S = p.stride, B = p.block_size, d = p.head_dim;
  const int32_t m0 = XAttentionFirstQueryBlock(p), qb = XAttentionQueryBlocks(p);
  const int32_t kb = XAttentionKeyBlocks(p);
  const int32_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t first = p.kv_len - p.q_len;
  const double zscale = 1.0 / (std::sqrt(static_cast<double>(d)) * S);
  std::fill(mass, mass + int64_t{p.num_q_heads} * qb * kb, 0.0);
  std::vector<double> z;
  std::vector<float> kbuf(d);
  for (int32_t h = 0; h < p.num_q_heads; ++h) {
    const int32_t g = h / group;
    for (int64_t a = first / S; a <= (p.kv_len - 1) / S; ++a) {
      z.assign(a + 1, 0.0);
      for (int64_t b = 0; b <= a; ++b) {
        double x = 0;
        for (int32_t t = 0; t < S; ++t) {
          const float* qv = QueryAt(p, h, a * S + S - 1 - t);
          const float* kv = KeyAt(p, g, b * S + t, kbuf.data());
          if (qv == nullptr || kv == nullptr) continue;
          for (int32_t e = 0; e < d; ++e) x += static_cast<double>(qv[e]) * kv[e];
        }
        z[b] = x * zscale;
      }
      const double zmax = *std::max_element(z.begin(), z.end());
      double sum = 0;
      for (double& v : z) sum += (v = std::exp(v - zmax));
      const int64_t m = a * S / B;
      double* row = mass + (int64_t{h} * qb + (m - m0)) * kb;
      for (int64_t b = 0; b <= a; ++b) row[b * S / B] += z[b] / sum;
    }
  }
}

void XAttentionSelectBlocks(const double* mass, int32_t m, double threshold,
                            std::vector<int32_t>& selected, std::vector<int32_t>& order) {
  double total = 0;
  for (int32_t n = 0; n <= m; ++n) total += mass[n];
  const double target = threshold * total;
  selected.clear();
  selected.push_back(0);
  double covered = mass[0];
  if (m > 0) {
    selected.push_back(m);
    covered += mass[m];
  }
  order.clear();
  for (int32_t n = 1; n < m; ++n) order.push_back(n);
  std::stable_sort(order.begin(), order.end(),
                   [mass](int32_t x, int32_t y) { return mass[x] > mass[y]; });
  for (int32_t n : order) {
    if (!(covered < target)) break;
    selected.push_back(n);
    covered += mass[n];
  }
  std::sort(selected.begin(), selected.end());
}

}  // namespace sieve::kernels
