// XAttention's threshold selection and block-sparse index on the GPU: see xattention_cuda.h.
//
// Selection: one thread block per (head, query block) row. The row's masses go to shared memory;
// the candidates 1 .. m - 1 become 64-bit keys (an order-preserving map of the mass, inverted so
// that larger masses sort first, above the block index, so that ties keep the lower index first
// as the host's stable sort does) and are sorted by a bitonic network; one thread then sums the
// row in index order and walks the sorted keys while the covered mass is below threshold *
// total, in fp64 and in the host's order, so the chosen set is exactly XAttentionSelectBlocks'.
// Flags mark the chosen blocks and one warp compacts them in increasing order with ballots.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/sparse/xattention_cuda.h"

namespace sieve::kernels {
namespace {

constexpr int kSelectThreads = 128;
// 128 KB of keys + 64 KB of masses + 16 KB of flags in shared memory.
constexpr int kMaxSelectKeyBlocks = kXAttentionMaxSelectKeyBlocks;

int PowerOfTwoAtLeast(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// float -> uint32 preserving order (-0 taken as +0, as the host's comparison does).
__device__ __forceinline__ uint32_t OrderedBits(float x) {
  const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kSelectThreads) SelectKernel(const XAttentionSelectGpuParams p,
                                                               const float* __restrict__ mass,
                                                               int32_t* __restrict__ count,
                                                               int32_t* __restrict__ blocks,
                                                               int key_capacity) {
  extern __shared__ __align__(16) char smem[];
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(smem);
  float* vals = reinterpret_cast<float*>(keys + key_capacity);
  uint8_t* flag = reinterpret_cast<uint8_t*>(vals + p.k_blocks);
  __shared__ double s_target;
  __shared__ int s_take;
  const int row = blockIdx.x, tid = threadIdx.x;
  const int h = row / p.q_blocks, m = p.first_query_block + row % p.q_blocks;
  const float* mrow = mass + static_cast<int64_t>(row) * p.k_blocks;
  const int n_cand = m >= 2 ? m - 1 : 0;  // blocks 1 .. m - 1
  int P = 1;
  while (P < n_cand) P <<= 1;
  for (int n = tid; n <= m; n += kSelectThreads) {
    vals[n] = mrow[n];
    flag[n] = 0;
  }
  __syncthreads();
  for (int i = tid; i < P; i += kSelectThreads) {
    keys[i] = i < n_cand ? (static_cast<unsigned long long>(~OrderedBits(vals[i + 1])) << 32) |
                               static_cast<uint32_t>(i + 1)
                         : ~0ull;
  }
  if (tid == 0) {
    double total = 0;
    for (int n = 0; n <= m; ++n) total += static_cast<double>(vals[n]);
    const double tau = p.head_thresholds != nullptr ? p.head_thresholds[h] : p.threshold;
    s_target = tau * total;
  }
  __syncthreads();
  for (int k = 2; k <= P; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < P; i += kSelectThreads) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const unsigned long long a = keys[i], b = keys[ixj];
          if ((a > b) == ((i & k) == 0)) {
            keys[i] = b;
            keys[ixj] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    double covered = vals[0];
    if (m > 0) covered += static_cast<double>(vals[m]);
    int take = 0;
    const double target = s_target;
    while (take < n_cand && covered < target) {
      covered += static_cast<double>(vals[static_cast<uint32_t>(keys[take])]);
      ++take;
    }
    s_take = take;
    flag[0] = 1;
    flag[m] = 1;
  }
  __syncthreads();
  for (int i = tid; i < s_take; i += kSelectThreads) flag[static_cast<uint32_t>(keys[i])] = 1;
  __syncthreads();
  if (tid < 32) {
    int32_t* out = blocks + static_cast<int64_t>(row) * p.k_blocks;
    int running = 0;
    for (int base = 0; base <= m; base += 32) {
      const int n = base + tid;
      const bool f = n <= m && flag[n] != 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, f);
      if (f) out[running + __popc(ballot & ((1u << tid) - 1u))] = n;
      running += __popc(ballot);
    }
    if (tid == 0) count[row] = running;
  }
}

constexpr int kScanThreads = 1024;

// row_start over rows r = mi * Hq + h of count[h * q_blocks + mi]: each thread sums a contiguous
// segment, the block scans the 1024 partial sums, each thread writes its segment.
__global__ void __launch_bounds__(kScanThreads) ScanKernel(const XAttentionSelectGpuParams p,
                                                           const int32_t* __restrict__ count,
                                                           int32_t* __restrict__ row_start) {
  __shared__ int32_t part[kScanThreads];
  const int rows = p.q_blocks * p.num_q_heads;
  const int per = (rows + kScanThreads - 1) / kScanThreads;
  const int lo = threadIdx.x * per, hi = min(rows, lo + per);
  const auto at = [&](int r) {
    return count[(r % p.num_q_heads) * p.q_blocks + r / p.num_q_heads];
  };
  int32_t sum = 0;
  for (int r = lo; r < hi; ++r) sum += at(r);
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {
    const int32_t v = threadIdx.x >= off ? part[threadIdx.x - off] : 0;
    __syncthreads();
    part[threadIdx.x] += v;
    __syncthreads();
  }
  int32_t run = part[threadIdx.x] - sum;  // exclusive
  for (int r = lo; r < hi; ++r) {
    row_start[r] = run;
    run += at(r);
  }
  if (threadIdx.x == kScanThreads - 1) row_start[rows] = part[kScanThreads - 1];
}

// One warp per row copies its selected blocks to their place in key_blocks.
__global__ void CopyKernel(const XAttentionSelectGpuParams p, const int32_t* __restrict__ count,
                           const int32_t* __restrict__ blocks,
                           const int32_t* __restrict__ row_start,
                           int32_t* __restrict__ key_blocks) {
  const int rows = p.q_blocks * p.num_q_heads;
  const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (r >= rows) return;
  const int src_row = (r % p.num_q_heads) * p.q_blocks + r / p.num_q_heads;
  const int32_t* src = blocks + static_cast<int64_t>(src_row) * p.k_blocks;
  int32_t* dst = key_blocks + row_start[r];
  for (int j = lane; j < count[src_row]; j += 32) dst[j] = src[j];
}

bool SelectSupports(const XAttentionSelectGpuParams& p) {
  return p.num_q_heads >= 1 && p.first_query_block >= 0 && p.q_blocks >= 1 && p.k_blocks >= 1 &&
         p.k_blocks <= kMaxSelectKeyBlocks && p.first_query_block + p.q_blocks <= p.k_blocks &&
         static_cast<int64_t>(p.q_blocks) * p.num_q_heads < (int64_t{1} << 31);
}

}  // namespace

cudaError_t XAttentionSelectGpu(const XAttentionSelectGpuParams& p, const float* mass,
                                int32_t* count, int32_t* blocks, cudaStream_t stream) {
  if (!SelectSupports(p) || !mass || !count || !blocks) return cudaErrorInvalidValue;
  const int cap = PowerOfTwoAtLeast(p.k_blocks);
  const int bytes = cap * 8 + p.k_blocks * 4 + p.k_blocks;
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(SelectKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  SelectKernel<<<p.q_blocks * p.num_q_heads, kSelectThreads, bytes, stream>>>(p, mass, count,
                                                                            blocks, cap);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t XAttentionBuildIndexGpu(const XAttentionSelectGpuParams& p, const int32_t* count,
                                    const int32_t* blocks, int32_t* row_start,
                                    int32_t* key_blocks, cudaStream_t stream) {
  if (!SelectSupports(p) || !count || !blocks || !row_start || !key_blocks) {
    return cudaErrorInvalidValue;
  }
  ScanKernel<<<1, kScanThreads, 0, stream>>>(p, count, row_start);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  const int rows = p.q_blocks * p.num_q_heads, warps = 8;
  CopyKernel<<<(rows + warps - 1) / warps, 32 * warps, 0, stream>>>(p, count, blocks, row_start,
                                                                   key_blocks);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace sieve::kernels
