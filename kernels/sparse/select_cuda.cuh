// Device helpers of the selection kernels: an order-preserving unsigned key of a float for radix
// selection (Quest's and DoubleSparsity's row policies of cluster_topk_cuda.cuh), a block-wide
// exclusive prefix sum and the ordered compaction of the selected keys (MInference's index,
// minference_index_cuda.cu).
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

// Ordered compaction after a radix select: calls emit(at, j) for every j < n whose key_at(j) is
// above `threshold` and for the first `remaining` (in j order) equal to it, `at` numbering them
// in j order from 0. Each thread takes a contiguous run of ceil(n / blockDim.x) positions and
// counts it, two block scans place the runs, then each thread emits its run: two scans in all,
// where a scan per blockDim.x positions made long rows latency-bound (two scans per 1,024
// positions: ~256 per 128K-token row). All threads of the block (32 * kWarps) must call.
template <int kWarps, typename KeyAt, typename Emit>
__device__ __forceinline__ void CompactSelected(int n, uint32_t threshold, int remaining,
                                                KeyAt key_at, Emit emit, int* sm) {
  const int threads = 32 * kWarps;
  const int per = (n + threads - 1) / threads;
  const int begin = min(n, static_cast<int>(threadIdx.x) * per);
  const int end = min(n, begin + per);
  int gt = 0, eq = 0;
  for (int j = begin; j < end; ++j) {
    const uint32_t u = key_at(j);
    gt += u > threshold ? 1 : 0;
    eq += u == threshold ? 1 : 0;
  }
  int total = 0;
  const int eq_before = BlockExclusiveScan<kWarps>(eq, total, sm);
  const int eq_take = max(0, min(eq, remaining - eq_before));
  int at = BlockExclusiveScan<kWarps>(gt + eq_take, total, sm);
  int eq_seen = 0;
  for (int j = begin; j < end; ++j) {
    const uint32_t u = key_at(j);
    bool take = u > threshold;
    if (u == threshold) take = eq_seen++ < eq_take;
    if (take) emit(at++, j);
  }
}

}  // namespace sieve::kernels::sparse_select

#endif  // SIEVE_KERNELS_SPARSE_SELECT_CUDA_CUH_
