// Quest on the GPU (SPARSE_ATTENTION.md section 3; the CPU side and the semantics are in
// kernels/sparse/quest.h): page bounds kept in the KV element type (bf16, exact: min and max of
// bf16 values are bf16 values), upper-bound page scores and top-k page selection for a whole
// decode batch, and compacted per-row page tables that the paged decode kernel reads
// (PagedDecodeSparseRun, kernels/attention/paged_decode.h).
//
// Layouts follow quest.h with bf16 elements: bounds [num_pages, num_kv_heads, 2, head_dim] (Mx,
// then Mn) per layer; k_cache [num_pages * page_size, num_kv_heads, head_dim] per layer.
//
// How it runs.
//   QuestUpdateBoundsGpu: one block per token of the step; a token that starts a run of
//     consecutive slots of one page (offset 0, the step's first token, or a slot not right after
//     the previous token's) folds the run's keys (at most page_size) into its page, starting from
//     the key itself at offset 0 (a reset) or from the stored bounds otherwise; other tokens'
//     blocks exit. Pages of one step are disjoint, so no two blocks write one page.
//   QuestSelectGpu: (1) a scoring kernel, one warp per (page, KV head) at a time reading the
//     page's bounds once for all query heads of the group (lanes split the channels, a shuffle
//     sum per head), fp32 U_p(q) to a workspace; (2) a selection kernel, a cluster of 1 to 8 blocks
//     per row (sparse_select::ClusterTopKKernel, cluster_topk_cuda.cuh): an 8-bit radix select
//     (four histogram passes, summed over the cluster) finds the score of the (K-1)-th best
//     page, then one ordered pass keeps every page above it and the lowest-index pages equal to
//     it (the CPU's tie rule), writing the pages in increasing order, the last page after them,
//     and the row's compacted page ids and token count.
// Never allocates, never synchronizes: graph-capturable.
#ifndef SIEVE_KERNELS_SPARSE_QUEST_CUDA_H_
#define SIEVE_KERNELS_SPARSE_QUEST_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sieve::kernels {

// One step's bound update for one layer (device pointers). Tokens of one page must come in
// position order and at consecutive slots (a step's tokens do).
struct QuestBoundsUpdateGpu {
  const __nv_bfloat16* k_cache = nullptr;  // one layer's keys
  __nv_bfloat16* bounds = nullptr;         // one layer's bounds
  const int64_t* slots = nullptr;          // [num_tokens]
  int32_t num_tokens = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;                    // even
  int32_t page_size = 0;
};
cudaError_t QuestUpdateBoundsGpu(const QuestBoundsUpdateGpu& u, cudaStream_t stream);

// One decode step's selection (device pointers). Sequence s's query is row q_rows[s] of q (row s
// when q_rows is null); its n = ceil(kv_lens[s] / page_size) pages are page_table row s.
struct QuestSelectGpuParams {
  const __nv_bfloat16* q = nullptr;       // [rows, num_q_heads, head_dim]
  const int32_t* q_rows = nullptr;        // [num_seqs] or null
  const __nv_bfloat16* bounds = nullptr;  // one layer's bounds
  const int32_t* page_table = nullptr;    // [num_seqs, page_table_stride]
  const int32_t* kv_lens = nullptr;       // [num_seqs]
  int32_t page_table_stride = 0;          // >= the most pages of any sequence
  int32_t num_seqs = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;                   // 64 or 128
  int32_t page_size = 0;
  int32_t page_budget = 2;                // K, pages per row including the last (>= 2)
  bool per_kv_head = false;               // one row per KV head (max of the group's bounds)
  int32_t select_blocks_per_row = 0;      // 0: chosen per launch; 1, 2, 4 or 8 forces it (tests)
};

// Rows per sequence of a selection: num_q_heads, or num_kv_heads with per_kv_head.
int32_t QuestSelectRowsPerSeq(const QuestSelectGpuParams& p);

// The selection, row r = s * rows_per_seq + head (query head, or KV head with per_kv_head):
//   selected[r * K + i], i < count(r) = min(n, K): sequence page indices, increasing, the last
//     page last (n <= K: every page 0 .. n - 1, exactly dense);
//   tables[r * K + i] (optional): the page ids of those pages (page_table entries);
//   lens[r] (optional): tokens they hold: (count - 1) * page_size plus the last page's tokens.
// tables, lens and stride K form the PagedDecodeTables of PagedDecodeSparseRun (heads_per_block
// 1, or the group with per_kv_head). Entries past count(r) are left as they were.
struct QuestSelectGpuOutput {
  int32_t* selected = nullptr;  // [num_seqs * rows_per_seq, page_budget]
  int32_t* counts = nullptr;    // [num_seqs * rows_per_seq] or null
  int32_t* tables = nullptr;    // [num_seqs * rows_per_seq, page_budget] or null
  int32_t* lens = nullptr;      // [num_seqs * rows_per_seq] or null
};

// Workspace bytes QuestSelectGpu needs for `p` (fp32 scores of every row's pages). After a call
// the workspace starts with them: row r's score of page j at float index r * page_table_stride
// + j, for j < n - 1 of rows with n > page_budget (tests rank them).
size_t QuestSelectWorkspaceBytes(const QuestSelectGpuParams& p);

// Scores and selects on `stream`. cudaErrorInvalidValue (nothing launched) for unsupported
// shapes (head_dim not 64 / 128, group above 32, page_budget < 2, null pointers) or a workspace
// smaller than QuestSelectWorkspaceBytes.
cudaError_t QuestSelectGpu(const QuestSelectGpuParams& p, const QuestSelectGpuOutput& out,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_QUEST_CUDA_H_
