// XAttention's block-mass estimator on the GPU: see xattention_cuda.h.
#include "kernels/sparse/xattention_cuda.h"

#include <cuda_bf16.h>

#include <atomic>
#include <cstdint>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxQueryBytes = 64 * 1024;  // R * S * d bf16 = B * d * 2 bytes
constexpr int kMaxKeyBlocks = 4096;        // key-block masses kept in shared memory (16 KB)

__device__ __forceinline__ int64_t FloorDiv(int64_t a, int64_t b) { return a / b; }

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
    const int64_t pos = b * p.stride + t;
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

template <int R>
cudaError_t Launch(const XAttentionGpuParams& p, float* mass, cudaStream_t stream) {
  const int bytes = R * p.stride * p.head_dim * 2;
  static std::atomic<bool> raised{false};
  if (!raised.load(std::memory_order_acquire)) {
    SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        XAttentionMassKernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxQueryBytes));
    raised.store(true, std::memory_order_release);
  }
  const int64_t m0 = (p.kv_len - p.q_len) / p.block_size;
  const int64_t q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  const dim3 grid(static_cast<unsigned>(q_blocks), p.num_q_heads);
  XAttentionMassKernel<R><<<grid, kThreads, bytes, stream>>>(p, mass);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace

bool XAttentionGpuSupports(const XAttentionGpuParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.stride < 1 || p.block_size < p.stride || p.block_size % p.stride != 0) return false;
  const int r = p.block_size / p.stride;
  if (r != 4 && r != 8 && r != 16 && r != 32) return false;
  if (p.block_size * p.head_dim * 2 > kMaxQueryBytes) return false;
  if (p.num_q_heads < 1 || p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0) return false;
  if (p.q_len < 1 || p.kv_len < p.q_len || p.page_size < 1) return false;
  return (p.kv_len + p.block_size - 1) / p.block_size <= kMaxKeyBlocks &&
         p.num_q_heads <= 65535;
}

cudaError_t XAttentionBlockMassGpu(const XAttentionGpuParams& p, float* mass,
                                   cudaStream_t stream) {
  if (!XAttentionGpuSupports(p) || !p.q || !p.k_cache || !p.page_table || !mass) {
    return cudaErrorInvalidValue;
  }
  switch (p.block_size / p.stride) {
    case 4: return Launch<4>(p, mass, stream);
    case 8: return Launch<8>(p, mass, stream);
    case 16: return Launch<16>(p, mass, stream);
    default: return Launch<32>(p, mass, stream);
  }
}

}  // namespace sieve::kernels
