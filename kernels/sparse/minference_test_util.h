// Test helpers for the MInference tests: a paged batch of sequences with random q, K, V, the
// key set a plan row gives each query, and the set section 1.6 defines.
#ifndef SIEVE_KERNELS_SPARSE_MINFERENCE_TEST_UTIL_H_
#define SIEVE_KERNELS_SPARSE_MINFERENCE_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "kernels/attention/paged_attention.h"
#include "kernels/sparse/minference.h"

namespace sieve::kernels::minference::testing {

struct SeqShape {
  int kv_len, q_len;
};

// Sequences in a shuffled paged cache; q, K, V uniform in [-1, 1].
struct Batch {
  int page_size = 16, head_dim = 64, q_heads = 4, kv_heads = 2, stride = 0;
  std::vector<int32_t> kv_lens, query_start, page_table;
  std::vector<float> q, k, v;

  Batch(const std::vector<SeqShape>& seqs, int page, int dim, int qh, int kvh, uint32_t seed)
      : page_size(page), head_dim(dim), q_heads(qh), kv_heads(kvh) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    query_start.push_back(0);
    for (const SeqShape& s : seqs) {
      kv_lens.push_back(s.kv_len);
      query_start.push_back(query_start.back() + s.q_len);
      stride = std::max(stride, (s.kv_len + page_size - 1) / page_size);
    }
    const int pages = stride * static_cast<int>(seqs.size()) + 1;
    std::vector<int32_t> ids(pages);
    for (int i = 0; i < pages; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    page_table.assign(ids.begin(), ids.begin() + stride * seqs.size());
    k.resize(static_cast<size_t>(pages) * page_size * kv_heads * head_dim);
    v.resize(k.size());
    q.resize(static_cast<size_t>(query_start.back()) * q_heads * head_dim);
    for (auto* vec : {&q, &k, &v}) {
      for (float& x : *vec) x = u(rng);
    }
  }

  float* Key(int seq, int kv_head, int pos) {
    const int64_t page = page_table[static_cast<size_t>(seq) * stride + pos / page_size];
    return k.data() + ((page * page_size + pos % page_size) * kv_heads + kv_head) * head_dim;
  }
  float* Value(int seq, int kv_head, int pos) {
    return v.data() + (Key(seq, kv_head, pos) - k.data());
  }
  // Query j (index within the sequence's queries) of head h.
  float* Query(int seq, int head, int j) {
    return q.data() + ((static_cast<int64_t>(query_start[seq]) + j) * q_heads + head) * head_dim;
  }

  PagedAttentionParams<float> Params(std::vector<float>* out = nullptr,
                                     const SparseAttentionIndex* sparse = nullptr) const {
    PagedAttentionParams<float> p;
    if (out != nullptr) {
      out->assign(q.size(), -7.0f);
      p.out = out->data();
      p.v_cache = v.data();
    }
    p.q = q.data();
    p.k_cache = k.data();
    p.page_table = page_table.data();
    p.kv_lens = kv_lens.data();
    p.query_start = query_start.data();
    p.page_table_stride = stride;
    p.num_seqs = static_cast<int32_t>(kv_lens.size());
    p.num_q_heads = q_heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = head_dim;
    p.page_size = page_size;
    p.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    p.sparse = sparse;
    return p;
  }
};

// The keys query position `pos` reads in plan row `row` (listed blocks and columns, <= pos).
inline std::vector<int32_t> RowKeys(const MInferencePlan& plan, int64_t row, int32_t pos) {
  std::vector<int32_t> keys;
  for (int32_t i = plan.row_start[row]; i < plan.row_start[row + 1]; ++i) {
    for (int32_t t = plan.key_blocks[i] * kBlock; t < (plan.key_blocks[i] + 1) * kBlock; ++t) {
      if (t <= pos) keys.push_back(t);
    }
  }
  for (int32_t i = plan.column_start[row]; i < plan.column_start[row + 1]; ++i) {
    if (plan.columns[i] <= pos) keys.push_back(plan.columns[i]);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

// S_i of section 1.6 for a query at `pos` (< n keys) from a block's converted key lists.
inline std::vector<int32_t> SpecKeys(const BlockKeys& b, int32_t pos, int32_t n) {
  std::vector<int32_t> keys;
  for (size_t r = 0; r < b.range_start.size(); ++r) {
    for (int32_t t = b.range_start[r]; t < b.range_end[r]; ++t) {
      if (t <= pos && t < n) keys.push_back(t);
    }
  }
  for (int32_t c : b.columns) {
    if (c <= pos) keys.push_back(c);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

// Per-row relative L2 error of out against ref, worst row.
inline double WorstRelError(const std::vector<float>& out, const std::vector<float>& ref, int d) {
  double worst = 0;
  for (size_t r = 0; r < ref.size() / d; ++r) {
    double err = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      const double a = out[r * d + i], b = ref[r * d + i];
      err += (a - b) * (a - b);
      norm += b * b;
    }
    worst = std::max(worst, norm == 0 ? std::sqrt(err) : std::sqrt(err / norm));
  }
  return worst;
}

}  // namespace sieve::kernels::minference::testing

#endif  // SIEVE_KERNELS_SPARSE_MINFERENCE_TEST_UTIL_H_
