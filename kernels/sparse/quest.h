// Quest (SPARSE_ATTENTION.md section 3): per-page key bounds and query-aware page selection for
// sparse decode over the paged KV cache (layout of kernels/attention/paged_attention.h).
//
// Page bounds: for each (page, KV head) the elementwise max Mx and min Mn of the page's keys
// (post-RoPE, as stored), laid out [num_pages, num_kv_heads, 2, head_dim] with Mx first. They are
// kept current on every append with the section 3.2 rule (a token at page offset 0 resets the
// page, any other token widens it), so a recycled page never keeps its previous owner's bounds
// and a prefill chunk that starts mid-page continues from the stored values.
//
// 16-bit bounds (bf16_bounds in both calls): the same layout with bfloat16 elements,
// [num_pages, num_kv_heads, 2, head_dim] bfloat16 (the GPU's, kernels/sparse/quest_cuda.h) held
// in the float array: each (page, KV head) region is head_dim floats' worth of bytes
// (QuestRegionFloats), so a layer's bounds take half the memory and selection reads half the
// bytes. Mx is rounded up and Mn down to bfloat16, so the bound stays a bound; keys that are
// bfloat16 already (k_cache_bf16) round nothing and the bounds are exact: the same values as
// fp32 bounds of those keys, hence the same fp32 scores and the same selection.
//
// Selection (3.3, 3.4, 3.7): U_p(q) = sum_c max(q_c Mx_pc, q_c Mn_pc) bounds q.k for every key of
// page p. With K = page_budget pages and n = ceil(L / page_size) pages of a sequence: n <= K
// lists every page (exactly dense); otherwise the top K - 1 of pages 0 .. n - 2 by U_p (ties:
// lower page first) plus the last page, in increasing order. Per query head by default; with
// per_kv_head every head of a group shares the pages of the group's largest bound
// (max over the group of U_p(q_h), option (b) of 3.7).
#ifndef SIEVE_KERNELS_SPARSE_QUEST_H_
#define SIEVE_KERNELS_SPARSE_QUEST_H_

#include <cstdint>
#include <vector>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {

// Appends the keys of `num_tokens` tokens to the bounds of one layer: token i was written at KV
// slot slots[i] (page * page_size + offset), its keys at that slot's rows of k_cache (pages laid out
// as kv_layout says, paged_attention.h). Tokens of one page must come in position
// order (a step's tokens do). Serial; O(num_tokens * num_kv_heads * head_dim).
struct QuestBoundsUpdate {
  const float* k_cache = nullptr;  // one layer's keys
  // Or (k_cache null) the layer's keys stored as bfloat16 (a 16-bit KV cache), widened to fp32
  // as read: the bounds are those of the keys attention reads.
  const uint16_t* k_cache_bf16 = nullptr;
  float* bounds = nullptr;         // one layer's bounds [num_pages, num_kv_heads, 2, head_dim]
  bool bf16_bounds = false;        // the bounds as bfloat16 (above: half the array)
  const int64_t* slots = nullptr;  // [num_tokens]
  int32_t num_tokens = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 0;
  KvLayout kv_layout = KvLayout::kTokenMajor;
};
void QuestUpdateBounds(const QuestBoundsUpdate& u);

// The bounds of one (page, KV head) recomputed from its first `valid` keys (the reference for
// the incremental update): out [2, head_dim], Mx then Mn, in fp32.
void QuestBoundsRef(const float* k_cache, int32_t page, int32_t kv_head, int32_t valid,
                    int32_t num_kv_heads, int32_t head_dim, int32_t page_size, float* out,
                    KvLayout layout = KvLayout::kTokenMajor);

// One decode step's selection: one query per sequence.
struct QuestSelectParams {
  const float* q = nullptr;        // [num_seqs, num_q_heads, head_dim]
  const float* bounds = nullptr;   // one layer's bounds
  bool bf16_bounds = false;        // written by QuestUpdateBounds with bf16_bounds
  const int32_t* page_table = nullptr;  // [num_seqs, page_table_stride]
  const int32_t* kv_lens = nullptr;     // [num_seqs] L, including the current token
  int32_t page_table_stride = 0;
  int32_t num_seqs = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 0;
  int32_t page_budget = 2;         // K, pages per row including the last (>= 2)
  bool per_kv_head = false;
};

// The selection as BSR rows (one per (sequence, query head), row = seq * num_q_heads + head):
// row r lists pages key_blocks[row_start[r] .. row_start[r + 1]) (sequence page indices, not
// page ids), increasing. Vectors are resized (capacity kept).
struct QuestSelection {
  std::vector<int32_t> row_start;
  std::vector<int32_t> key_blocks;
};

// fp64 reference: bounds and scores in double, one row at a time.
void QuestSelectRef(const QuestSelectParams& p, QuestSelection& out);
// Fast: Highway-vectorised fp32 scores, rows on `num_threads` host threads (0 = all).
void QuestSelectCpu(const QuestSelectParams& p, QuestSelection& out, int num_threads = 0);

// U_p(q) of one query against one page's bounds [2, head_dim], in double (tests, reference).
double QuestUpperBound(const float* q, const float* bounds, int32_t head_dim);

// The (page, KV head) region of one layer's bounds as fp32 [2, head_dim] (widened into `out`
// when bf16_bounds; out must hold 2 * head_dim floats). Returns out or the region itself.
const float* QuestPageBounds(const float* bounds, bool bf16_bounds, int64_t page, int32_t kv_head,
                             int32_t num_kv_heads, int32_t head_dim, float* out);

// Floats of one (page, KV head) region: 2 * head_dim (fp32 bounds) or head_dim (bf16_bounds:
// 2 * head_dim bfloat16 values). A layer's bounds are num_pages * num_kv_heads regions.
inline int64_t QuestRegionFloats(int32_t head_dim, bool bf16_bounds) {
  return bf16_bounds ? int64_t{head_dim} : int64_t{2} * head_dim;
}

// x rounded to bfloat16 toward +infinity (up) or -infinity (down), as bits.
uint16_t Bf16RoundUp(float x);
uint16_t Bf16RoundDown(float x);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_QUEST_H_
