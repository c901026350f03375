// DoubleSparsity on the GPU (SPARSE_ATTENTION.md section 4; the CPU side, the label cache layout
// and the semantics are in kernels/sparse/double_sparsity.h): label rows written from the bf16
// key cache on every append, approximate scores and top-k tokens for a whole decode batch, and
// per-row token lists (KV slots) that the paged decode kernel reads (PagedDecodeTokenRun,
// kernels/attention/paged_decode.h).
//
// Layouts: the label cache of one layer is exactly the CPU's, [num_pages, DsLabelPageBytes]
// (fp16, bf16 or 4-bit, channel-major inside a page), so a page's labels mean the same on both
// sides and DsReadLabel / DsSelectRef read what the GPU wrote. Keys: k_cache [num_pages *
// page_size, num_kv_heads, head_dim] bf16 per layer (a token's slot is page * page_size +
// offset), as the CUDA backend keeps them.
//
// How it runs.
//   DsWriteLabelsGpu: one warp per (new token, label head); lanes take channels. 16-bit labels
//     are one 2-byte store per channel; 4-bit labels take the row's min and max with warp
//     shuffles, then set each code's nibble with two 32-bit atomics (slots j and j + half share a
//     byte, and one step may write both). The arithmetic is the CPU's in IEEE fp32 (explicitly
//     rounded intrinsics, no contraction), so labels equal DsWriteLabels' bit for bit when the
//     CPU reads the same (bf16-valued) keys.
//   DsSelectGpu: (1) a scoring kernel, one thread per token (channel-major labels make a warp's
//     loads of one channel contiguous), per (token chunk, selection head, sequence) block, the
//     selection head's query channels in shared memory; fp32 scores to a workspace. With
//     shared_selection a KV head's score is the sum of its query heads' (the CPU's definition).
//     (2) a selection kernel, a cluster of 1 to 8 blocks per row (sparse_select::
//     ClusterTopKKernel, cluster_topk_cuda.cuh), each holding a slice of the row's scores in
//     shared memory: four 8-bit radix passes, their histograms summed over the cluster, find the
//     k-th best key exactly; one ordered pass keeps every token above it and the lowest
//     positions equal to it (the CPU's tie rule), writing positions in increasing order with
//     their KV slots and the row's count. One read of a row's scores from memory (while a slice
//     fits 16,384 keys). L <= k lists every position 0 .. L - 1 (dense, exactly).
// Never allocates, never synchronizes: graph-capturable.
#ifndef SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CUDA_H_
#define SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/sparse/double_sparsity.h"

namespace sieve::kernels {

// One step's label writes for one layer (device pointers): the tokens at `slots`, whose keys
// RopeAndCacheKv has written. Any order; distinct slots.
struct DsLabelsUpdateGpu {
  DoubleSparsityShape shape;              // must pass DsValidateShape
  const __nv_bfloat16* k_cache = nullptr; // one layer's keys
  uint8_t* labels = nullptr;              // one layer's labels [num_pages, DsLabelPageBytes]
  const int64_t* slots = nullptr;         // [num_tokens] page * page_size + offset
  int32_t num_tokens = 0;
  const int32_t* channels = nullptr;      // [DsLabelHeads, channels], each in [0, head_dim)
};

// Writes the label rows of the tokens on `stream`. cudaErrorInvalidValue (nothing launched) for
// a bad shape or null pointers.
cudaError_t DsWriteLabelsGpu(const DsLabelsUpdateGpu& u, cudaStream_t stream);

// One decode step's selection (device pointers). Sequence s's query is row q_rows[s] of q (row s
// when q_rows is null); its L = kv_lens[s] tokens sit in the pages of page_table row s.
struct DsSelectGpuParams {
  DoubleSparsityShape shape;              // must pass DsValidateShape
  const __nv_bfloat16* q = nullptr;       // [rows, num_q_heads, head_dim] post-RoPE
  const int32_t* q_rows = nullptr;        // [num_seqs] or null
  const uint8_t* labels = nullptr;        // one layer's labels
  const int32_t* channels = nullptr;      // [DsLabelHeads, channels]
  const int32_t* page_table = nullptr;    // [num_seqs, page_table_stride]
  const int32_t* kv_lens = nullptr;       // [num_seqs]
  int32_t page_table_stride = 0;          // >= the most pages of any sequence
  int32_t num_seqs = 0;
  int32_t token_budget = 1;               // k >= 1
  int32_t select_blocks_per_row = 0;      // 0: chosen per launch; 1, 2, 4 or 8 forces it (tests)
};

// Rows per sequence of a selection: num_q_heads, or num_kv_heads with shape.shared_selection.
int32_t DsSelectRowsPerSeq(const DsSelectGpuParams& p);

// The selection, row r = s * rows_per_seq + head (query head, or KV head with shared_selection);
// stride k = token_budget:
//   positions[r * k + i], i < count(r) = min(k, L): the chosen positions, increasing (every
//     position when L <= k);
//   slots[r * k + i] (optional): their KV slots, page_table[s][pos / page_size] * page_size +
//     pos % page_size: the token lists of PagedDecodeTokenRun;
//   counts[r] (optional): count(r).
// Entries past count(r) are left as they were.
struct DsSelectGpuOutput {
  int32_t* positions = nullptr;  // [num_seqs * rows_per_seq, token_budget]
  int32_t* slots = nullptr;      // [num_seqs * rows_per_seq, token_budget] or null
  int32_t* counts = nullptr;     // [num_seqs * rows_per_seq] or null
};

// Workspace bytes DsSelectGpu needs for `p` (fp32 scores of every row's tokens). After a call the workspace starts with the scores: row r's score of
// position t at float index r * page_table_stride * page_size + t, for rows with L > k (tests
// compare them with DsReferenceScores).
size_t DsSelectWorkspaceBytes(const DsSelectGpuParams& p);

// Scores and selects on `stream`. cudaErrorInvalidValue (nothing launched) for a bad shape,
// head_dim above 256, null pointers, a budget below 1 or a workspace smaller than
// DsSelectWorkspaceBytes.
cudaError_t DsSelectGpu(const DsSelectGpuParams& p, const DsSelectGpuOutput& out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CUDA_H_
