// Attention over a paged KV cache: the shared parameter block and the CPU reference.
//
// Layout (shared by every backend and every attention kernel, dense or sparse):
//   q, out   : [num_tokens, num_q_heads, head_dim], the queries of all sequences packed
//              back to back; sequence s owns rows [query_start[s], query_start[s + 1]).
//   k_cache, : one layer's keys / values, num_pages pages of page_size * num_kv_heads * head_dim
//   v_cache    elements. Token t of sequence s lives in page
//              page_table[s * page_table_stride + t / page_size] at slot t % page_size. Within a
//              page the rows are [page_size, num_kv_heads, head_dim] (KvLayout::kTokenMajor, every
//              CUDA kernel) or [num_kv_heads, page_size, head_dim] (kHeadMajor, the cpu backend:
//              a KV head's rows of one page are one run of memory, which sparse decode reads).
//   kv_lens  : [num_seqs], KV tokens of sequence s, including the ones written this step.
// The queries of sequence s are its last q_len = query_start[s+1] - query_start[s] positions:
// query j sits at position kv_lens[s] - q_len + j and attends causally to keys [0, position].
// Grouped-query attention: query head h reads KV head h / (num_q_heads / num_kv_heads).
//
// Sparse attention (optional, `sparse` non-null) restricts which keys each query reads, in a
// block-sparse-row (BSR) form beside the page table, as FlashInfer's BSR API does:
//   - query blocks: sequence s's q_len queries split into ceil(q_len / query_block) blocks of
//     query_block queries (the last may be short); query_block_start [num_seqs + 1] holds the
//     prefix sums of the blocks per sequence, so block b of sequence s is global block
//     query_block_start[s] + b;
//   - rows: one per (global query block, query head): row = block * num_q_heads + head;
//   - key blocks: row r reads key blocks key_blocks[row_start[r] .. row_start[r + 1]) (block j
//     covers sequence positions [j * key_block, (j + 1) * key_block)), increasing; with
//     key_block == page_size a key block is a page (decode: query_block 1, one row per head);
//   - columns: row r also reads the single key positions columns[column_start[r] ..
//     column_start[r + 1]), increasing, none inside a listed key block (MInference's vertical
//     lines, DoubleSparsity's top-k tokens). column_start may be null: no columns.
// Causality still applies: a query at position p reads only listed keys at positions <= p. A
// query whose row lists no key it may read gets a zero output. With every block listed, sparse
// attention equals dense attention.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_H_

#include <cstdint>

namespace sieve::kernels {

// The sparse index of one attention call (see the file comment); arrays in the memory of the
// backend that runs the call.
struct SparseAttentionIndex {
  int32_t query_block = 0;                 // queries per query block (>= 1)
  int32_t key_block = 0;                   // key positions per key block (>= 1)
  const int32_t* query_block_start = nullptr;  // [num_seqs + 1]
  const int32_t* row_start = nullptr;      // [num_rows + 1], num_rows = blocks * num_q_heads
  const int32_t* key_blocks = nullptr;     // [row_start[num_rows]]
  const int32_t* column_start = nullptr;   // [num_rows + 1] or null
  const int32_t* columns = nullptr;        // [column_start[num_rows]]
};

// How a page of a KV pool orders its rows (see the file comment).
enum class KvLayout : int8_t {
  kTokenMajor = 0,  // [page_size, num_kv_heads, head_dim]
  kHeadMajor = 1,   // [num_kv_heads, page_size, head_dim]
};

// Element strides of a page's rows: between consecutive slots of one KV head, and between KV heads
// at one slot.
struct KvRowStrides {
  int64_t slot = 0;
  int64_t head = 0;
};

inline KvRowStrides KvStrides(KvLayout layout, int32_t page_size, int32_t num_kv_heads,
                              int32_t head_dim) {
  if (layout == KvLayout::kHeadMajor) return {head_dim, int64_t{page_size} * head_dim};
  return {int64_t{num_kv_heads} * head_dim, head_dim};
}

// Element offset of the row (page, slot, kv_head) in a pool of that layout.
inline int64_t KvRowOffset(KvLayout layout, int64_t page, int32_t slot, int32_t kv_head,
                           int32_t page_size, int32_t num_kv_heads, int32_t head_dim) {
  const KvRowStrides st = KvStrides(layout, page_size, num_kv_heads, head_dim);
  return page * page_size * num_kv_heads * head_dim + slot * st.slot + kv_head * st.head;
}

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
  const SparseAttentionIndex* sparse = nullptr;  // null: dense (every causal key)
  KvLayout kv_layout = KvLayout::kTokenMajor;    // the CPU kernels take both; CUDA token-major
};

// Exact causal paged attention (dense, or restricted by p.sparse) in fp32 with a max-subtracted
// softmax accumulated in double, one (token, head) at a time. It is the reference every attention kernel is checked against;
// clarity first, speed second (parallel over rows with `num_threads` host threads, 0 = all).
void PagedAttentionRef(const PagedAttentionParams<float>& p, int num_threads = 1);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_ATTENTION_H_
