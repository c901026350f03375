// Test helpers shared by the CPU attention and sparse-selection tests: a batch of sequences in a
// shuffled paged KV cache (the layout of paged_attention.h) with fresh random queries, keys and
// values, and the PagedAttentionParams that describe it.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_KV_TEST_UTIL_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_KV_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels::test_util {

// One sequence of a batch: its KV length after the step and its query count (the last q_len
// positions of kv_len).
struct SeqLens {
  int kv_len, q_len;
};

// Where a batch's sequences sit: page_table rows of `stride` pages (the longest sequence's),
// drawn from a shuffled pool of stride * sequences + spare pages, so that sequences use
// scattered, non-consecutive pages and some pages belong to nobody.
struct PagedLayout {
  int page_size = 16, stride = 0, num_pages = 0;
  std::vector<int32_t> kv_lens, query_start, page_table;

  // Lays out `seqs` on pages of `page` tokens; draws the shuffle from `rng`.
  void Init(const std::vector<SeqLens>& seqs, int page, int spare_pages, std::mt19937& rng) {
    page_size = page;
    stride = 0;
    kv_lens.clear();
    query_start.assign(1, 0);
    for (const SeqLens& s : seqs) {
      kv_lens.push_back(s.kv_len);
      query_start.push_back(query_start.back() + s.q_len);
      stride = std::max(stride, (s.kv_len + page_size - 1) / page_size);
    }
    num_pages = stride * static_cast<int>(seqs.size()) + spare_pages;
    std::vector<int32_t> ids(num_pages);
    for (int i = 0; i < num_pages; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    page_table.assign(ids.begin(), ids.begin() + static_cast<int64_t>(stride) * seqs.size());
  }

  // The KV slot (page * page_size + offset) of position `pos` of sequence `seq`.
  int64_t Slot(int seq, int pos) const {
    return int64_t{page_table[static_cast<size_t>(seq) * stride + pos / page_size]} * page_size +
           pos % page_size;
  }

  // These pages and the given buffers as attention parameters (scale 1/sqrt(head_dim)); `v` and
  // `out` may be null (estimators read only q and K).
  PagedAttentionParams<float> AttentionParams(const float* q, const float* k, const float* v,
                                              float* out, int q_heads, int kv_heads,
                                              int head_dim,
                                              const SparseAttentionIndex* sparse) const {
    PagedAttentionParams<float> p;
    p.q = q;
    p.k_cache = k;
    p.v_cache = v;
    p.out = out;
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

// A paged batch with q, K and V uniform in [-1, 1] (one spare page).
struct PagedBatch : PagedLayout {
  int head_dim = 64, q_heads = 4, kv_heads = 2;
  KvLayout layout = KvLayout::kTokenMajor;  // of k and v; Params() passes it on
  std::vector<float> q, k, v;

  PagedBatch(const std::vector<SeqLens>& seqs, int page, int dim, int qh, int kvh, uint32_t seed)
      : head_dim(dim), q_heads(qh), kv_heads(kvh) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    Init(seqs, page, /*spare_pages=*/1, rng);
    k.resize(static_cast<size_t>(num_pages) * page_size * kv_heads * head_dim);
    v.resize(k.size());
    q.resize(static_cast<size_t>(query_start.back()) * q_heads * head_dim);
    for (auto* vec : {&q, &k, &v}) {
      for (float& x : *vec) x = u(rng);
    }
  }

  float* Key(int seq, int kv_head, int pos) {
    const int64_t slot = Slot(seq, pos);
    return k.data() + KvRowOffset(layout, slot / page_size, static_cast<int32_t>(slot % page_size),
                                  kv_head, page_size, kv_heads, head_dim);
  }
  float* Value(int seq, int kv_head, int pos) {
    return v.data() + (Key(seq, kv_head, pos) - k.data());
  }
  // Query j (index within the sequence's queries) of head h.
  float* Query(int seq, int head, int j) {
    return q.data() + ((static_cast<int64_t>(query_start[seq]) + j) * q_heads + head) * head_dim;
  }

  // The batch as attention parameters (scale 1/sqrt(head_dim)). With `out`, it is poisoned
  // (every row must be written) and the values are attached; without, only q and K (for
  // estimators that read no values).
  PagedAttentionParams<float> Params(std::vector<float>* out = nullptr,
                                     const SparseAttentionIndex* sparse = nullptr) const {
    if (out != nullptr) out->assign(q.size(), -7.0f);
    PagedAttentionParams<float> p =
        AttentionParams(q.data(), k.data(), out != nullptr ? v.data() : nullptr,
                        out != nullptr ? out->data() : nullptr, q_heads, kv_heads, head_dim,
                        sparse);
    p.kv_layout = layout;
    return p;
  }
  PagedAttentionParams<float> Params(std::vector<float>& out,
                                     const SparseAttentionIndex* sparse = nullptr) const {
    return Params(&out, sparse);
  }
};

}  // namespace sieve::kernels::test_util

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_KV_TEST_UTIL_H_
