// DoubleSparsity channel statistics and ranking (double_sparsity_calibration.h).
#include "kernels/sparse/double_sparsity_calibration.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace sieve::kernels {

DsChannelStats::DsChannelStats(DsStatistic statistic, int num_q_heads, int num_kv_heads,
                               int head_dim)
    : statistic_(statistic),
      num_q_heads_(num_q_heads),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      heads_(statistic == DsStatistic::kK ? num_kv_heads : num_q_heads),
      sums_(static_cast<size_t>(heads_) * head_dim, 0.0) {}

void DsChannelStats::Add(const float* q, const float* k, int64_t tokens) {
  const int d = head_dim_, group = num_q_heads_ / num_kv_heads_;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* qt = q == nullptr ? nullptr : q + t * num_q_heads_ * d;
    const float* kt = k == nullptr ? nullptr : k + t * num_kv_heads_ * d;
    for (int h = 0; h < heads_; ++h) {
      double* sum = sums_.data() + static_cast<size_t>(h) * d;
      switch (statistic_) {
        case DsStatistic::kQ:
          for (int c = 0; c < d; ++c) sum[c] += std::abs(double{qt[h * d + c]});
          break;
        case DsStatistic::kK:
          for (int c = 0; c < d; ++c) sum[c] += std::abs(double{kt[h * d + c]});
          break;
        case DsStatistic::kQK: {
          const float* kh = kt + (h / group) * d;
          for (int c = 0; c < d; ++c) sum[c] += std::abs(double{qt[h * d + c]} * kh[c]);
          break;
        }
      }
    }
  }
  tokens_ += tokens;
}

std::vector<double> DsChannelStats::Means(int head) const {
  std::vector<double> m(sums_.begin() + static_cast<size_t>(head) * head_dim_,
                        sums_.begin() + static_cast<size_t>(head + 1) * head_dim_);
  if (tokens_ > 0) {
    for (double& x : m) x /= static_cast<double>(tokens_);
  }
  return m;
}

std::vector<int32_t> DsRankChannels(const std::vector<double>& means) {
  std::vector<int32_t> order(means.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return means[a] > means[b]; });
  return order;
}

}  // namespace sieve::kernels
