// DoubleSparsity's offline channel calibration (SPARSE_ATTENTION.md section 4.2): per head, the
// mean over every calibration token of a per-channel statistic, and the channels ranked by it.
// The first `r` channels of a head's ranking are its outlier channel set C_h, whose key values
// the label cache keeps (double_sparsity.h).
#ifndef SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CALIBRATION_H_
#define SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CALIBRATION_H_

#include <cstdint>
#include <vector>

namespace sieve::kernels {

// The per-channel statistic (section 4.2's table).
enum class DsStatistic : int32_t {
  kQ,   // mean_t |q_t[c]|, one row per query head (the reference takes q before RoPE)
  kK,   // mean_t |k_t[c]|, one row per KV head (before RoPE)
  kQK,  // mean_t |q_t[c] k_t[c]|, one row per query head, k of its KV head (after RoPE)
};

// Accumulates one layer's statistic over calibration tokens, in double (a proper mean over every
// token added, across any number of Add calls; the reference's qk hook kept only its last batch).
// Not thread-safe.
class DsChannelStats {
 public:
  DsChannelStats(DsStatistic statistic, int num_q_heads, int num_kv_heads, int head_dim);

  // Adds `tokens` tokens: q [tokens, num_q_heads, head_dim] and k [tokens, num_kv_heads,
  // head_dim], before or after RoPE as the statistic wants (the caller provides them). kK reads
  // only k and kQ only q (the other may be null).
  void Add(const float* q, const float* k, int64_t tokens);

  // Rows of the statistic: num_kv_heads for kK, else num_q_heads.
  int heads() const { return heads_; }
  int head_dim() const { return head_dim_; }
  int64_t tokens() const { return tokens_; }
  DsStatistic statistic() const { return statistic_; }

  // The mean statistic of each channel of `head` ([head_dim]; zeros before any token).
  std::vector<double> Means(int head) const;

 private:
  DsStatistic statistic_;
  int num_q_heads_, num_kv_heads_, head_dim_, heads_;
  int64_t tokens_ = 0;
  std::vector<double> sums_;  // [heads, head_dim]
};

// The channels 0..size-1 ordered by descending `means` (ties: lower channel first): a
// permutation.
std::vector<int32_t> DsRankChannels(const std::vector<double>& means);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CALIBRATION_H_
