// XAttention's block-mass estimator and threshold selection on the GPU (SPARSE_ATTENTION.md
// section 2.3; the geometry, the reference and the host selection are in
// kernels/sparse/xattention.h): the same masses as XAttentionBlockMassRef from bf16 queries and
// the bf16 paged K cache, fp32 arithmetic, and the same selection as XAttentionSelectBlocks.
//
// The estimate is, per query head, a causal GEMM of the reshaped queries ((N / S) x S d) by the
// reshaped keys, a row softmax and sums over R x R tiles (R = B / S). Two kernels compute it:
//   - tensor cores (default): the GEMM tiled as a GEMM, 128 query groups x 64 key groups per
//     tile, operands streamed through shared memory (cp.async, 3 stages, ldmatrix, mma.sync bf16
//     m16n8k16, fp32 accumulation); two sweeps over the causal tiles of a row tile (online row
//     max and sum, then the recomputed probabilities summed into the blocks and written once);
//     each thread block takes row tiles t and T - 1 - t so the blocks' causal work is equal;
//     with a workspace (`workspace`), one sweep instead: each tile computed once, per row its
//     max over the warp tile's columns w and per key block w + log(sum exp(z - w)) stored,
//     the rows' log-sum-exps at the end, and a second kernel sums exp(partial - lse) over each
//     block's rows (exact up to fp32 rounding, no overflow whatever the scores); on sm_90 the
//     one sweep can run its GEMM on wgmma (`wgmma`: two warpgroups, m64n128k16 from shared
//     memory);
//   - CUDA cores (the cross-check): one thread block per (query head, query block), fp32 FMAs
//     from bf16 in shared memory, the same two sweeps.
// kernels/sparse/NOTES.md has what each should cost and why the first version was slow.
//
// Supported: head_dim 64 or 128, B / S in {4, 8, 16, 32}; the CUDA-core kernel also needs
// B * head_dim <= 32768 and at most 4096 key blocks. Never allocates, never synchronizes.
#ifndef SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_H_
#define SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sieve::kernels {

// One sequence's estimate (device pointers); fields as XAttentionParams (xattention.h).
struct XAttentionGpuParams {
  const __nv_bfloat16* q = nullptr;       // query i of head h: q + i * q_row_stride + h * head_dim
  int64_t q_row_stride = 0;
  const __nv_bfloat16* k_cache = nullptr; // [num_pages, page_size, num_kv_heads, head_dim]
  const int32_t* page_table = nullptr;    // this sequence's page ids
  int32_t page_size = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t q_len = 0;                      // >= 1
  int32_t kv_len = 0;                     // >= q_len
  int32_t stride = 16;
  int32_t block_size = 128;
  bool tensor_cores = true;               // mma.sync kernel (false: the CUDA-core kernel)
  int32_t tile_keys = 64;                 // tensor cores: key groups per tile, 64 or 128
  // Tensor cores: device scratch of XAttentionGpuWorkspaceBytes(p) bytes for the one-sweep
  // estimate (each key tile computed once; log-domain partial block sums per query group and
  // key block, normalised by a second kernel); null: the two-sweep kernel (the GEMM twice, no
  // scratch). Ignored by the CUDA-core kernel.
  float* workspace = nullptr;
  // With a workspace: the one-sweep kernel on Hopper's wgmma (sm_90 devices only, 128-key-group
  // tiles whatever tile_keys says); cudaErrorInvalidValue without a workspace or on other GPUs.
  bool wgmma = false;
  // With wgmma: each block computes one (row tile, key tile) of the GEMM instead of sweeping a
  // row tile's keys, in bands of 8 row tiles (key tiles outer, rows inner), so the blocks resident
  // together read a few row tiles' queries and key tiles' keys, which stay in L2 (a row sweep
  // re-streams its 512 KB of reshaped queries per key tile from DRAM); the rows' log-sum-exps are
  // then taken from the workspace's block partials by a small kernel before the normalising one.
  // Same masses up to rounding (the row sums are added in another order). Measured on an H100:
  // 1.59x the row sweeps at 128K, 1.56x at 32K (the CUDA backend's choice on Hopper).
  bool independent_tiles = false;
};

// The one-sweep workspace: num_q_heads x (query blocks x B / S) x (key blocks + 1) floats
// (1.07 GB for 32 heads at 128K tokens, S 16, B 128); 0 for invalid geometry.
size_t XAttentionGpuWorkspaceBytes(const XAttentionGpuParams& p);

// True when the kernel handles these shapes (see the file comment).
bool XAttentionGpuSupports(const XAttentionGpuParams& p);

// Writes mass[(h * q_blocks + m - m0) * k_blocks + n] (fp32, device), the layout of
// XAttentionBlockMassRef, zero for n beyond a query block's causal key blocks.
// cudaErrorInvalidValue (nothing launched) when unsupported or pointers are null.
cudaError_t XAttentionBlockMassGpu(const XAttentionGpuParams& p, float* mass,
                                   cudaStream_t stream);

// Threshold selection on the device, the rule of XAttentionSelectBlocks (xattention.h) for every
// (query head h, query block m0 + mi) row of a mass array laid out as XAttentionBlockMassGpu
// writes it: blocks 0 and m always, then the others by descending mass (ties: lower index first)
// while the selected mass is below threshold * the row's total, sums in fp64 in the host's order,
// so the selected sets are identical to the host's on the same masses. One thread block per row:
// a bitonic sort of the row's (mass, index) keys in shared memory, one thread's running sum.
// The most key blocks a row of XAttentionSelectGpu may have (its shared-memory sort).
inline constexpr int kXAttentionMaxSelectKeyBlocks = 16384;

struct XAttentionSelectGpuParams {
  int32_t num_q_heads = 0;
  int32_t first_query_block = 0;  // m0
  int32_t q_blocks = 0;
  int32_t k_blocks = 0;           // <= 16384
  double threshold = 0.9;
  const double* head_thresholds = nullptr;  // device, [num_q_heads], or null: `threshold`
};

// Writes count[h * q_blocks + mi] and the row's selected key blocks, increasing, to
// blocks[(h * q_blocks + mi) * k_blocks + j] for j < count (device pointers).
cudaError_t XAttentionSelectGpu(const XAttentionSelectGpuParams& p, const float* mass,
                                int32_t* count, int32_t* blocks, cudaStream_t stream);

// The block-sparse index (SparseAttentionIndex, kernels/attention/paged_attention.h) of one
// sequence from XAttentionSelectGpu's output: rows in index order (query block mi, head h) ->
// mi * num_q_heads + h, row_start [q_blocks * num_q_heads + 1] (exclusive prefix sums of the
// counts) and key_blocks (capacity q_blocks * num_q_heads * k_blocks). One single-block scan and
// one copy kernel; row_start[last] is the number of listed blocks.
cudaError_t XAttentionBuildIndexGpu(const XAttentionSelectGpuParams& p, const int32_t* count,
                                    const int32_t* blocks, int32_t* row_start,
                                    int32_t* key_blocks, cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_H_
