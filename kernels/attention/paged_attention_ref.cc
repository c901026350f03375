#include <cmath>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels {
namespace {

// Attention of one query row (one token, one head) over keys [0, last_pos] of sequence s.
void AttendOne(const PagedAttentionParams<float>& p, int s, const float* q, int kv_head,
               int last_pos, float* out, std::vector<double>& scores) {
  const int d = p.head_dim;
  const int32_t* pages = p.page_table + static_cast<int64_t>(s) * p.page_table_stride;
  auto row = [&](const float* cache, int t) {
    int64_t page = pages[t / p.page_size];
    return cache + ((page * p.page_size + t % p.page_size) * p.num_kv_heads + kv_head) * d;
  };
  scores.resize(last_pos + 1);
  double max_score = -INFINITY;
  for (int t = 0; t <= last_pos; ++t) {
    const float* k = row(p.k_cache, t);
    double dot = 0.0;
    for (int i = 0; i < d; ++i) dot += static_cast<double>(q[i]) * k[i];
    scores[t] = dot * p.scale;
    max_score = std::max(max_score, scores[t]);
  }
  double denom = 0.0;
  for (int t = 0; t <= last_pos; ++t) {
    scores[t] = std::exp(scores[t] - max_score);
    denom += scores[t];
  }
  std::vector<double> acc(d, 0.0);
  for (int t = 0; t <= last_pos; ++t) {
    const float* v = row(p.v_cache, t);
    for (int i = 0; i < d; ++i) acc[i] += scores[t] * v[i];
  }
  for (int i = 0; i < d; ++i) out[i] = static_cast<float>(acc[i] / denom);
}

}  // namespace

void PagedAttentionRef(const PagedAttentionParams<float>& p, int num_threads) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t num_tokens = p.query_start[p.num_seqs];
  const int64_t rows = num_tokens * p.num_q_heads;
  ParallelFor(rows, num_threads, 4, [&](int64_t begin, int64_t end) {
    std::vector<double> scores;
    int s = 0;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t token = r / p.num_q_heads;
      const int head = static_cast<int>(r % p.num_q_heads);
      while (token >= p.query_start[s + 1]) ++s;
      const int q_len = p.query_start[s + 1] - p.query_start[s];
      const int pos = p.kv_lens[s] - q_len + static_cast<int>(token - p.query_start[s]);
      const int64_t off = (token * p.num_q_heads + head) * p.head_dim;
      AttendOne(p, s, p.q + off, head / group, pos, p.out + off, scores);
    }
  });
}

}  // namespace sieve::kernels
