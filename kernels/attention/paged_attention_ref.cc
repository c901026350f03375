#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels {
namespace {

// The key positions (<= last_pos, increasing) that sparse row `r` reads.
void SparseKeys(const SparseAttentionIndex& x, int64_t r, int last_pos, std::vector<int>& keys) {
  keys.clear();
  for (int32_t i = x.row_start[r]; i < x.row_start[r + 1]; ++i) {
    const int64_t first = int64_t{x.key_blocks[i]} * x.key_block;
    for (int64_t t = first; t < first + x.key_block && t <= last_pos; ++t) {
      keys.push_back(static_cast<int>(t));
    }
  }
  if (x.column_start != nullptr) {
    for (int32_t i = x.column_start[r]; i < x.column_start[r + 1]; ++i) {
      if (x.columns[i] <= last_pos) keys.push_back(x.columns[i]);
    }
  }
  std::sort(keys.begin(), keys.end());
}

// Attention of one query row (one token, one head) over the key positions `keys` of sequence s.
void AttendOne(const PagedAttentionParams<float>& p, int s, const float* q, int kv_head,
               const std::vector<int>& keys, float* out, std::vector<double>& scores) {
  const int d = p.head_dim;
  const int32_t* pages = p.page_table + static_cast<int64_t>(s) * p.page_table_stride;
  auto row = [&](const float* cache, int t) {
    int64_t page = pages[t / p.page_size];
    return cache + KvRowOffset(p.kv_layout, page, t % p.page_size, kv_head, p.page_size,
                               p.num_kv_heads, d);
  };
  if (keys.empty()) {
    std::fill(out, out + d, 0.0f);
    return;
  }
  const size_t n = keys.size();
  scores.resize(n);
  double max_score = -INFINITY;
  for (size_t j = 0; j < n; ++j) {
    const float* k = row(p.k_cache, keys[j]);
    double dot = 0.0;
    for (int i = 0; i < d; ++i) dot += static_cast<double>(q[i]) * k[i];
    scores[j] = dot * p.scale;
    max_score = std::max(max_score, scores[j]);
  }
  double denom = 0.0;
  for (size_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    denom += scores[j];
  }
  std::vector<double> acc(d, 0.0);
  for (size_t j = 0; j < n; ++j) {
    const float* v = row(p.v_cache, keys[j]);
    for (int i = 0; i < d; ++i) acc[i] += scores[j] * v[i];
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
    std::vector<int> keys;
    int s = 0;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t token = r / p.num_q_heads;
      const int head = static_cast<int>(r % p.num_q_heads);
      while (token >= p.query_start[s + 1]) ++s;
      const int q_len = p.query_start[s + 1] - p.query_start[s];
      const int j = static_cast<int>(token - p.query_start[s]);  // query index in its sequence
      const int pos = p.kv_lens[s] - q_len + j;
      if (p.sparse != nullptr) {
        const SparseAttentionIndex& x = *p.sparse;
        const int64_t block = int64_t{x.query_block_start[s]} + j / x.query_block;
        SparseKeys(x, block * p.num_q_heads + head, pos, keys);
      } else {
        keys.resize(pos + 1);
        for (int t = 0; t <= pos; ++t) keys[t] = t;
      }
      const int64_t off = (token * p.num_q_heads + head) * p.head_dim;
      AttendOne(p, s, p.q + off, head / group, keys, p.out + off, scores);
    }
  });
}

}  // namespace sieve::kernels
