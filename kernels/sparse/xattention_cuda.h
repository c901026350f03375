// XAttention's block-mass estimator on the GPU (SPARSE_ATTENTION.md section 2.3; the geometry,
// the reference and the selection are in kernels/sparse/xattention.h): the same masses as
// XAttentionBlockMassRef from bf16 queries and the bf16 paged K cache, fp32 arithmetic.
//
// How it runs. One thread block per (query head, query block m): the block's R = B / S reshaped
// query rows (each group's S queries in reverse order, S * d values; zero outside the chunk's
// queries) sit in shared memory as bf16. Warps take strided key groups b = 0 .. last: the lanes
// split the group's S * d key values (zero past kv_len) and each lane keeps R partial
// antidiagonal sums, reduced across the warp with shuffles. A first sweep keeps each row's
// running max and sum of exponentials (online softmax over b <= a); a second sweep recomputes the
// scores and adds each row's probabilities into the block's key-block masses in shared memory.
// Recomputing doubles the arithmetic but needs no scratch for the (N / S)^2 scores. Two kernels
// share this plan: the default computes the scores on the tensor cores (mma.sync m16n8k16, 16
// query rows x 8 key groups per step, key fragments loaded straight from the pages); the other
// on CUDA cores (lanes split a key group, R partial sums each), kept as a cross-check.
// kernels/sparse/NOTES.md has what each should cost.
//
// Supported: head_dim 64 or 128, B / S in {4, 8, 16, 32}, B * head_dim <= 32768 (the queries of
// a block in 64 KB of shared memory). Never allocates, never synchronizes.
#ifndef SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_H_
#define SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

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
};

// True when the kernel handles these shapes (see the file comment).
bool XAttentionGpuSupports(const XAttentionGpuParams& p);

// Writes mass[(h * q_blocks + m - m0) * k_blocks + n] (fp32, device), the layout of
// XAttentionBlockMassRef, zero for n beyond a query block's causal key blocks.
// cudaErrorInvalidValue (nothing launched) when unsupported or pointers are null.
cudaError_t XAttentionBlockMassGpu(const XAttentionGpuParams& p, float* mass,
                                   cudaStream_t stream);

}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_H_
