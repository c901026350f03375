// Device helpers the top-k selection kernels share (Quest's pages, quest_cuda.cu; DoubleSparsity's
// tokens, double_sparsity_cuda.cu): an order-preserving unsigned key of a float for radix
// selection, and a block-wide exclusive prefix sum for ordered compaction.
#ifndef SIEVE_KERNELS_SPARSE_SELECT_CUDA_CUH_
#define SIEVE_KERNELS_SPARSE_SELECT_CUDA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace sieve::kernels::sparse_select {

// An unsigned key ordered as the float (larger float, larger key); -0 and +0 alike.
__device__ __forceinline__ uint32_t Key(float x) {
  uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over a block of kWarps full warps (all threads must call); total
// gets the block's sum. `sm` holds kWarps ints.
template <int kWarps>
__device__ __forceinline__ int BlockExclusiveScan(int v, int& total, int* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += x;
  }
  __syncthreads();  // sm free from any earlier call
  if (lane == 31) sm[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int x = sm[w];
    before += w < warp ? x : 0;
    total += x;
  }
  return before + incl - v;
}

}  // namespace sieve::kernels::sparse_select

#endif  // SIEVE_KERNELS_SPARSE_SELECT_CUDA_CUH_
