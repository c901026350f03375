// Batched paged decode attention on the GPU: one query token per sequence, bf16 in and out,
// fp32 accumulation, grouped-query heads read together, split along the KV length.
//
// Layout and semantics are those of kernels/attention/paged_attention.h, restricted to decode:
// sequence s has exactly one query token, row s of q and out (query_start[s] == s; the kernel
// reads row s and ignores query_start), which attends to all kv_lens[s] keys of the sequence.
//
// How it runs. One thread block takes one (sequence, KV head, split): all num_q_heads /
// num_kv_heads query heads of that KV head against one chunk of the KV length, so every K and V
// byte is read from device memory once per step. K and V rows stream through shared memory in
// 64-token stages (16-byte asynchronous copies, three or four stages in flight); Q.K^T and P.V
// run on the tensor cores (mma.sync m16n8k16, the query heads padded to 16 rows); the softmax is
// online in fp32. When a sequence is split, each split writes its unnormalized partial output
// with its running max and sum of exponentials to the workspace, and a second kernel merges them.
//
// Plan / run: Plan() decides the split from shapes alone (never from data) and the workspace
// size; PagedDecodeRun() never allocates and never synchronizes, so it can be captured in a CUDA
// graph. One plan serves any call whose sequences number at most the planned count.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_DECODE_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_DECODE_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {

// The shapes a decode plan is made for.
struct PagedDecodeShape {
  int32_t num_seqs = 0;      // most sequences a run with this plan may pass
  int32_t num_q_heads = 0;   // query heads; a multiple of num_kv_heads
  int32_t num_kv_heads = 0;  // KV heads; group = num_q_heads / num_kv_heads must be 1..16
  int32_t head_dim = 0;      // 64 or 128
  int32_t max_kv_len = 0;    // longest KV length (tokens) expected; longer ones still run right,
                             // with their tail in the last split (slower, never wrong)
  int32_t heads_per_block = 0;  // 0: dense decode (PagedDecodeRun), a block per KV head; > 0:
                                // sparse decode (PagedDecodeSparseRun), a block per this many
                                // query heads sharing a compacted page table (a divisor of the
                                // group; max_kv_len then bounds the compacted lengths)
};

// A decision of how to split the KV length, made by Plan().
struct PagedDecodePlan {
  PagedDecodeShape shape;     // the shape it was made for
  int32_t num_splits = 0;     // KV chunks per sequence; 0 means the shape is not supported
  int32_t chunk_tokens = 0;   // tokens per chunk, a multiple of 64; split i covers
                              // [i * chunk_tokens, (i + 1) * chunk_tokens), the last one to the end
  size_t workspace_bytes = 0; // fp32 partial results; 0 when num_splits == 1
};

// True when the kernels handle `shape`: head_dim 64 or 128, group size 1..16, positive counts.
bool PagedDecodeSupports(const PagedDecodeShape& shape);

// Chooses the split for `shape` on a device with `num_sms` multiprocessors: enough
// (sequence, KV head, split) blocks to fill the device in as few waves as possible, each chunk at
// least 64 tokens. Depends only on its arguments. Returns num_splits == 0 if unsupported.
PagedDecodePlan Plan(const PagedDecodeShape& shape, int num_sms);

// Runs decode attention for p.num_seqs sequences on `stream` with the split of `plan`.
// Requirements (else cudaErrorInvalidValue, nothing launched): a dense plan (heads_per_block 0),
// p's head counts and head_dim equal
// the plan's, 0 <= p.num_seqs <= plan.shape.num_seqs, page_size >= 1, non-null pointers, and
// `workspace` of plan.workspace_bytes (256-byte aligned) unless that is 0. A sequence with
// kv_lens[s] == 0 gets a zero output. Device pointers must stay valid until the work completes.
// Never allocates or synchronizes; returns the launch error, if any. The first run on each
// device also raises the kernel's shared memory limit (a host-side setting): make one run
// before capturing runs in a CUDA graph.
cudaError_t PagedDecodeRun(const PagedAttentionParams<__nv_bfloat16>& p,
                           const PagedDecodePlan& plan, void* workspace, cudaStream_t stream);

// Per-row page tables of sparse decode (Quest, kernels/sparse/quest_cuda.h): the heads of each
// sequence are split into runs of `heads_per_block` consecutive query heads (1: each query head;
// the group: each KV head), and run r of sequence s reads the lens[s * runs + r] tokens listed by
// row s * runs + r of `pages` (runs = num_q_heads / heads_per_block): token t of the row sits in
// page pages[row * stride + t / page_size] at offset t % page_size. Rows list page ids in any
// order (decode has no mask inside the context); a page may be partial only where it is last.
struct PagedDecodeTables {
  const int32_t* pages = nullptr;  // [num_seqs * runs, stride] page ids (device)
  const int32_t* lens = nullptr;   // [num_seqs * runs] tokens per row (device)
  int32_t stride = 0;              // entries per row of `pages`
  int32_t heads_per_block = 1;     // query heads per row; must equal the plan's
};

// Decode attention restricted to the rows of `tables` (page_table and kv_lens of `p` are
// ignored): query head h of sequence s attends to the tokens of row s * runs + h /
// heads_per_block, exactly as PagedDecodeRun attends to a sequence's whole row. `plan` must come
// from Plan() for a shape with the same heads_per_block (and max_kv_len the longest row).
// Requirements and guarantees otherwise as PagedDecodeRun's.
cudaError_t PagedDecodeSparseRun(const PagedAttentionParams<__nv_bfloat16>& p,
                                 const PagedDecodePlan& plan, const PagedDecodeTables& tables,
                                 void* workspace, cudaStream_t stream);

// Per-row token lists of sparse decode (DoubleSparsity, kernels/sparse/double_sparsity_cuda.h):
// as PagedDecodeTables, but row r lists lens[r] KV slots (page * page_size + offset), one per
// token, in any order, instead of pages.
struct PagedDecodeTokenLists {
  const int32_t* slots = nullptr;  // [num_seqs * runs, stride] KV slots (device)
  const int32_t* lens = nullptr;   // [num_seqs * runs] tokens per row (device)
  int32_t stride = 0;              // entries per row of `slots`
  int32_t heads_per_block = 1;     // query heads per row; must equal the plan's
};

// Decode attention restricted to the tokens of `lists`: PagedDecodeSparseRun over pages of one
// token (the same kernel, inner loop, split and merge; a slot is the id of a one-token page).
// `plan` as for PagedDecodeSparseRun, with max_kv_len the longest list.
cudaError_t PagedDecodeTokenRun(const PagedAttentionParams<__nv_bfloat16>& p,
                                const PagedDecodePlan& plan, const PagedDecodeTokenLists& lists,
                                void* workspace, cudaStream_t stream);

// The blocks per multiprocessor that Plan() assumes for a head dim (from the shared memory each
// block takes); tests compare it with what the CUDA occupancy calculator reports.
int PagedDecodeBlocksPerSm(int head_dim);

// The decode kernel's own function for a head dim and group size, for occupancy queries in
// tests; nullptr when unsupported.
const void* PagedDecodeKernelForTesting(int head_dim, int group);

// Dynamic shared memory (bytes) the decode kernel takes per block for a head dim.
int PagedDecodeSharedBytes(int head_dim);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_DECODE_H_
