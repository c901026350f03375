// Attention over a paged KV cache: the shared parameter block and the CPU reference.
//
// Layout (shared by every backend and every attention kernel, dense or sparse):
//   q, out   : [num_tokens, num_q_heads, head_dim], the queries of all sequences packed
//              back to back; sequence s owns rows [query_start[s], query_start[s + 1]).
//   k_cache, : [num_pages, page_size, num_kv_heads, head_dim], one layer's keys / values.
//   v_cache    Token t of sequence s lives in page page_table[s * page_table_stride + t / page_size]
//              at offset t % page_size.
//   kv_lens  : [num_seqs], KV tokens of sequence s, including the ones written this step.
// The queries of sequence s are its last q_len = query_start[s+1] - query_start[s] positions:
// query j sits at position kv_lens[s] - q_len + j and attends causally to keys [0, position].
// Grouped-query attention: query head h reads KV head h / (num_q_heads / num_kv_heads).
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_H_

#include <cstdint>

namespace sieve::kernels {

// Parameters of one paged attention call. Element type T is float for the CPU reference;
// device kernels use the same struct with their own element type.
template <typename T>
struct PagedAttentionParams {
  const T* q = nullptr;            // [num_tokens, num_q_heads, head_dim]
  const T* k_cache = nullptr;      // [num_pages, page_size, num_kv_heads, head_dim]
  const T* v_cache = nullptr;      // [num_pages, page_size, num_kv_heads, head_dim]
  T* out = nullptr;                // [num_tokens, num_q_heads, head_dim]
  const int32_t* page_table = nullptr;  // [num_seqs, page_table_stride] page ids
  const int32_t* kv_lens = nullptr;     // [num_seqs] KV tokens per sequence
  const int32_t* query_start = nullptr; // [num_seqs + 1] prefix sums of query tokens
  int32_t page_table_stride = 0;   // page ids per row of page_table
  int32_t num_seqs = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 0;           // tokens per page
  float scale = 0.0f;              // softmax scale, usually 1/sqrt(head_dim)
};

// Exact causal paged attention in fp32 with a max-subtracted softmax accumulated in double,
// one (token, head) at a time. It is the reference every attention kernel is checked against;
// clarity first, speed second (parallel over rows with `num_threads` host threads, 0 = all).
void PagedAttentionRef(const PagedAttentionParams<float>& p, int num_threads = 1);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_H_
