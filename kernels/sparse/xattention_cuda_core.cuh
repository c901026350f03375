// The CUDA-core XAttention estimator (the cross-check of the tensor-core kernels), internal to
// xattention_cuda.cu: see xattention_cuda.h. Device code; one translation unit includes it.
#ifndef SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_CORE_CUH_
#define SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_CORE_CUH_

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/sparse/xattention_cuda.h"

namespace sieve::kernels::xattention_cc {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxQueryBytes = 64 * 1024;  // R * S * d bf16 = B * d * 2 bytes
constexpr int kMaxKeyBlocks = 4096;        // key-block masses kept in shared memory (16 KB)

// --- The CUDA-core kernel (the cross-check) ------------------------------------------------------
//
// One thread block per (query head h, query block m): the block's R = B / S reshaped query rows
// (each group's S queries in reverse order, S * d values; zero outside the chunk's queries) sit
// in shared memory as bf16. Warps take strided key groups b = 0 .. last: the lanes split the
// group's S * d key values (zero past kv_len), each lane keeps R partial sums, reduced across the
// warp with shuffles. Sweep 1: each row's online max and sum; sweep 2: the recomputed
// probabilities added into the block's key-block masses in shared memory.

// The R partial antidiagonal sums of key group b against the block's query rows, reduced over the
// warp (every lane ends with the totals). qs: [R][S * d] bf16, reversed within each group.
template <int R>
__device__ __forceinline__ void GroupScores(const XAttentionGpuParams& p, const __nv_bfloat16* qs,
                                            int g, int64_t b, float (&x)[R]) {
  const int lane = threadIdx.x & 31;
  const int d = p.head_dim, width = p.stride * d;
#pragma unroll
  for (int r = 0; r < R; ++r) x[r] = 0.0f;
  // Pairs of values: index i = 2 * lane + 64 * j of the group's flattened [S][d] keys.
  for (int i = 2 * lane; i < width; i += 64) {
    const int t = i / d, e = i % d;
    // 32-bit positions: a 64-bit division per element was most of this loop's instructions.
    const int pos = static_cast<int>(b) * p.stride + t;
    if (pos >= p.kv_len) break;  // the rest of the group is past the keys (zero)
    const int64_t slot =
        int64_t{p.page_table[pos / p.page_size]} * p.page_size + pos % p.page_size;
    const float2 k = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
        p.k_cache + (slot * p.num_kv_heads + g) * d + e));
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float2 q = __bfloat1622float2(
          *reinterpret_cast<const __nv_bfloat162*>(qs + static_cast<int64_t>(r) * width + i));
      x[r] = fmaf(q.x, k.x, fmaf(q.y, k.y, x[r]));
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x[r] += __shfl_xor_sync(0xffffffffu, x[r], off);
  }
}

// grid = (q_blocks, num_q_heads); dynamic shared memory: the query rows (R * S * d bf16).
template <int R>
__global__ void __launch_bounds__(kThreads) XAttentionMassKernel(const XAttentionGpuParams p,
                                                                 float* __restrict__ mass) {
  extern __shared__ __align__(16) char smem[];
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);
  __shared__ float sm_mass[kMaxKeyBlocks];
  __shared__ float sm_max[kWarps][R], sm_sum[kWarps][R];
  __shared__ float row_max[R], row_inv[R];
  const int S = p.stride, B = p.block_size, d = p.head_dim, width = S * d;
  const int h = blockIdx.y;
  const int g = h / (p.num_q_heads / p.num_kv_heads);
  const int64_t first = p.kv_len - p.q_len;  // position of the first query
  const int64_t m0 = first / B, m = m0 + blockIdx.x;
  const int64_t k_blocks = (p.kv_len + B - 1) / B;
  const int64_t q_blocks = (p.kv_len - 1) / B - m0 + 1;
  // Rows: groups a = a_base + r of block m that the reference scores (a in [first / S,
  // (kv_len - 1) / S]).
  const int64_t a_base = m * B / S;
  const int64_t a_lo = first / S > a_base ? first / S : a_base;
  const int64_t a_hi_all = (p.kv_len - 1) / S;
  const int64_t a_hi = a_hi_all < a_base + R - 1 ? a_hi_all : a_base + R - 1;
  // Queries of the rows, reversed within each group; zero outside the chunk.
  for (int i = threadIdx.x; i < R * width / 2; i += kThreads) {
    const int r = (2 * i) / width, rest = (2 * i) % width, t = rest / d, e = rest % d;
    const int64_t pos = (a_base + r) * S + (S - 1 - t);
    __nv_bfloat162 v = __floats2bfloat162_rn(0.0f, 0.0f);
    if (pos >= first && pos < p.kv_len) {
      v = *reinterpret_cast<const __nv_bfloat162*>(p.q + (pos - first) * p.q_row_stride +
                                                   static_cast<int64_t>(h) * d + e);
    }
    reinterpret_cast<__nv_bfloat162*>(qs)[i] = v;
  }
  for (int n = threadIdx.x; n < kMaxKeyBlocks; n += kThreads) sm_mass[n] = 0.0f;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float zscale = rsqrtf(static_cast<float>(d)) / S;
  // Sweep 1: each warp's running max and sum per row (scores b <= a).
  float wmax[R], wsum[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    wmax[r] = -INFINITY;
    wsum[r] = 0.0f;
  }
  for (int64_t b = warp; b <= a_hi; b += kWarps) {
    float x[R];
    GroupScores<R>(p, qs, g, b, x);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t a = a_base + r;
      if (a < a_lo || a > a_hi || b > a) continue;
      const float z = x[r] * zscale;
      if (z > wmax[r]) {
        wsum[r] = wsum[r] * expf(wmax[r] - z) + 1.0f;
        wmax[r] = z;
      } else {
        wsum[r] += expf(z - wmax[r]);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      sm_max[warp][r] = wmax[r];
      sm_sum[warp][r] = wsum[r];
    }
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_max[w][r]);
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (sm_max[w][r] != -INFINITY) sum += sm_sum[w][r] * expf(sm_max[w][r] - mx);
    }
    row_max[r] = mx;
    row_inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  __syncthreads();
  // Sweep 2: probabilities into the key-block masses.
  for (int64_t b = warp; b <= a_hi; b += kWarps) {
    float x[R];
    GroupScores<R>(p, qs, g, b, x);
    if (lane == 0) {
      float total = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t a = a_base + r;
        if (a < a_lo || a > a_hi || b > a) continue;
        total += expf(x[r] * zscale - row_max[r]) * row_inv[r];
      }
      atomicAdd(&sm_mass[b * S / B], total);
    }
  }
  __syncthreads();
  float* out = mass + (static_cast<int64_t>(h) * q_blocks + blockIdx.x) * k_blocks;
  for (int64_t n = threadIdx.x; n < k_blocks; n += kThreads) out[n] = sm_mass[n];
}

}  // namespace sieve::kernels::xattention_cc

#endif  // SIEVE_KERNELS_SPARSE_XATTENTION_CUDA_CORE_CUH_
