// Causal paged prefill attention on the GPU: bf16 in and out, fp32 accumulation and softmax,
// grouped-query heads, head dim 64 or 128, any power-of-two page size, variable lengths per
// sequence in one batch, chunked prefill.
//
// Layout and semantics are those of kernels/attention/paged_attention.h: the queries of sequence
// s are its last q_len = query_start[s + 1] - query_start[s] positions, and the keys and values
// of all kv_lens[s] positions (earlier chunks and this one) are already in the paged cache.
// Query j of sequence s sits at position kv_lens[s] - q_len + j and attends to keys
// [0, position]; query head h reads KV head h / (num_q_heads / num_kv_heads).
//
// How it runs. One thread block takes 128 query rows of one (sequence, query head) and sweeps the
// KV length from key 0 to its last row's position, skipping tiles wholly above the causal
// diagonal and masking the ones that cross it. Two kernels implement this:
//   kWgmma   (Hopper, sm_90a): three warpgroups; one producer copies K and V tiles of 128 keys
//            from the pages into 128-byte-swizzled shared memory with 16-byte cp.async
//            (three stages at d 128, four at d 64, handed over through mbarriers, K and V
//            released separately); two consumers each own 64 query rows and run S = Q K^T (A and
//            B from shared memory) and O += P V (P from registers) on wgmma, with the online
//            softmax in registers. The consumers' schedule is PagedPrefillPlan::overlap.
//   kMmaSync (any sm_80+ part of the fat binary): FlashAttention-2 style, eight warps of 16 rows,
//            mma.sync m16n8k16 with ldmatrix, 64-key K/V tiles double-buffered by cp.async.
// Keys past kv_lens[s] are zero-filled in shared memory, never read, so stale or NaN cache slots
// beyond a sequence's end cannot leak into its output.
//
// Plan / run: Plan() decides the kernel, the tiling and the grid from shapes alone (never from
// data); PagedPrefillRun() never allocates and never synchronizes, so it can be captured in a CUDA
// graph. Blocks take their query tiles longest-first; a sequence longer than the planned
// max_q_len still runs right (blocks loop over the extra tiles), only slower.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_H_
#define SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention/paged_attention.h"

namespace sieve::kernels {

// The shapes a prefill plan is made for.
struct PagedPrefillShape {
  int32_t num_seqs = 0;      // most sequences a run with this plan may pass
  int32_t num_q_heads = 0;   // query heads; a multiple of num_kv_heads
  int32_t num_kv_heads = 0;  // KV heads
  int32_t head_dim = 0;      // 64 or 128
  int32_t max_q_len = 0;     // longest query chunk (tokens) of one sequence expected in a run
};

// Which kernel a plan runs.
enum class PagedPrefillKernel : int32_t {
  kNone = 0,     // the shape is not supported; Run refuses the plan
  kAuto = 1,     // only as a request to Plan(): let it choose
  kMmaSync = 2,  // FlashAttention-2 style, mma.sync (see the file comment)
  kWgmma = 3,    // Hopper warp-specialized wgmma kernel
};

// A decision of how to run a prefill shape, made by Plan().
struct PagedPrefillPlan {
  PagedPrefillShape shape;                          // the shape it was made for
  PagedPrefillKernel kernel = PagedPrefillKernel::kNone;
  int32_t block_m = 0;        // query rows per thread block
  int32_t block_n = 0;        // keys per K/V tile
  int32_t threads = 0;        // threads per block
  int32_t grid_m = 0;         // blocks per (sequence, query head) along the query length
  int32_t overlap = 0;        // kWgmma only, the consumers' schedule: 0 runs S, softmax and P V
                              // of a tile one after the other; 1 issues each tile's S before the
                              // previous tile's P V so the softmax overlaps it (FlashAttention-3's
                              // intra-warpgroup pipelining); 2 adds ping-pong between the two
                              // consumer warpgroups (one issues while the other does softmax)
  int32_t shared_bytes = 0;   // dynamic shared memory per block (bytes)
  size_t workspace_bytes = 0; // always 0 today: the prefill kernels need no workspace
};

// True when the kernels handle `shape`: head_dim 64 or 128, num_q_heads a positive multiple of
// num_kv_heads, num_seqs >= 1 and max_q_len >= 1.
bool PagedPrefillSupports(const PagedPrefillShape& shape);

// Plans `shape` for a device with `num_sms` multiprocessors. `kernel` may force kMmaSync or
// kWgmma (tests and benchmarks compare them); kAuto picks the fastest one built. Depends only on
// its arguments. Returns kernel == kNone if the shape is unsupported or num_sms < 1. Callers may
// set `overlap` of a kWgmma plan to 0, 1 or 2 to compare the consumer schedules.
PagedPrefillPlan Plan(const PagedPrefillShape& shape, int num_sms,
                      PagedPrefillKernel kernel = PagedPrefillKernel::kAuto);

// Runs causal prefill attention for p.num_seqs sequences on `stream` as `plan` says.
// Requirements (else cudaErrorInvalidValue, nothing launched): plan.kernel is kMmaSync or kWgmma,
// p's head counts and head_dim equal the plan's, 0 <= p.num_seqs <= plan.shape.num_seqs,
// page_size a power of two, scale > 0 and finite, non-null pointers. Each sequence must have
// kv_lens[s] >= q_len (its queries are its last positions). `workspace` is unused (the plan asks
// for 0 bytes). Device pointers must stay valid until the work completes. Never allocates or
// synchronizes; returns the launch error, if any.
// Block-sparse attention (p.sparse non-null, its arrays in device memory): either
//   - query blocks of 128 (the kernels' query tile, counted from each sequence's first query),
//     key blocks a multiple of the plan's K/V tile (kMmaSync 64 keys, kWgmma 128), no single
//     columns (column_start null): each query tile sweeps only the tiles of its row's key
//     blocks, in list order (XAttention's plans); or
//   - a kMmaSync plan with query blocks of 64 and key blocks of 64, single columns allowed
//     (MInference's plans,
//     kernels/sparse/minference.h): each 128-row query tile sweeps the merge of its two rows'
//     key blocks (increasing lists: a block both rows list is loaded once), then each row's
//     columns gathered 64 keys at a time, each half of the tile computing only its row's work;
// with the same inner loop and causal mask as dense (a row that lists nothing gets a zero
// output). Else cudaErrorInvalidValue.
cudaError_t PagedPrefillRun(const PagedAttentionParams<__nv_bfloat16>& p,
                            const PagedPrefillPlan& plan, void* workspace, cudaStream_t stream);

// The kernel function a plan launches, for occupancy queries in tests; nullptr if none.
const void* PagedPrefillKernelForTesting(const PagedPrefillPlan& plan);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_H_
