// XAttention's block-mass estimator on the GPU: see xattention_cuda.h.
#include "kernels/sparse/xattention_cuda.h"

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxQueryBytes = 64 * 1024;  // R * S * d bf16 = B * d * 2 bytes
constexpr int kMaxKeyBlocks = 4096;        // key-block masses kept in shared memory (16 KB)

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

// --- The tensor-core kernel ----------------------------------------------------------------------
//
// The same two sweeps with the scores of 16 query rows x 8 key groups per mma.sync m16n8k16 step
// (bf16 in, fp32 accumulate): A = the reshaped query rows from shared memory (rows padded to a
// multiple of 16 with zeros, each row padded by 16 bytes so that the 8 rows of a fragment hit
// different banks), B = 16 consecutive values of 8 key groups loaded straight from the pages (two
// 4-byte loads per lane per step), accumulating over the S * d / 16 steps of a group.

template <int R>
constexpr int MTiles() { return (R + 15) / 16; }

// Scores of key groups [b0, b0 + 8) against the block's rows (m16n8 accumulator layout per
// M tile: c[mt][0..1] row g, key groups b0 + 2c, +1; c[mt][2..3] row g + 8).
template <int R>
__device__ __forceinline__ void MmaGroupScores(const XAttentionGpuParams& p, const char* qs,
                                               int row_stride_bytes, int g_kv, int64_t b0,
                                               float (&c)[MTiles<R>()][4]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, cq = lane & 3;
  const int d = p.head_dim, steps = p.stride * d / 16;
#pragma unroll
  for (int mt = 0; mt < MTiles<R>(); ++mt) c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0.0f;
  const int64_t nb = b0 + gq;  // this lane's key group for the B fragment
#pragma unroll 4
  for (int ks = 0; ks < steps; ++ks) {
    const int k0 = ks * 16, t = k0 / d, e = k0 % d + 2 * cq;
    const int64_t pos = nb * p.stride + t;
    uint32_t b_lo = 0, b_hi = 0;
    if (pos < p.kv_len) {
      const int64_t slot =
          int64_t{p.page_table[pos / p.page_size]} * p.page_size + pos % p.page_size;
      const uint32_t* key =
          reinterpret_cast<const uint32_t*>(p.k_cache + (slot * p.num_kv_heads + g_kv) * d + e);
      b_lo = __ldg(key);
      b_hi = __ldg(key + 4);  // channels e + 8, e + 9
    }
#pragma unroll
    for (int mt = 0; mt < MTiles<R>(); ++mt) {
      const char* row0 = qs + (mt * 16 + gq) * row_stride_bytes + (k0 + 2 * cq) * 2;
      const char* row8 = row0 + 8 * row_stride_bytes;
      const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(row0),
                             *reinterpret_cast<const uint32_t*>(row8),
                             *reinterpret_cast<const uint32_t*>(row0 + 16),
                             *reinterpret_cast<const uint32_t*>(row8 + 16)};
      ptx::MmaBf16(c[mt], a, b_lo, b_hi);
    }
  }
}

// Folds value z of row r into a running (max, sum) pair.
__device__ __forceinline__ void OnlineAdd(float& mx, float& sum, float z) {
  if (z > mx) {
    sum = sum * expf(mx - z) + 1.0f;
    mx = z;
  } else {
    sum += expf(z - mx);
  }
}

// Merges (mx2, sum2) into (mx, sum).
__device__ __forceinline__ void OnlineMerge(float& mx, float& sum, float mx2, float sum2) {
  if (mx2 == -INFINITY) return;
  if (mx == -INFINITY) {
    mx = mx2;
    sum = sum2;
    return;
  }
  const float m = fmaxf(mx, mx2);
  sum = sum * expf(mx - m) + sum2 * expf(mx2 - m);
  mx = m;
}

// Whether row r of the block (group a_base + r) scores key group b.
template <int R>
__device__ __forceinline__ bool Scored(int r, int64_t b, int64_t a_base, int64_t a_lo,
                                       int64_t a_hi) {
  const int64_t a = a_base + r;
  return r < R && a >= a_lo && a <= a_hi && b <= a;
}

template <int R>
__global__ void __launch_bounds__(kThreads) XAttentionMassMmaKernel(const XAttentionGpuParams p,
                                                                    float* __restrict__ mass) {
  constexpr int kRows = 16 * MTiles<R>();
  extern __shared__ __align__(16) char smem[];
  __shared__ float sm_mass[kMaxKeyBlocks];
  __shared__ float sm_max[kWarps][kRows], sm_sum[kWarps][kRows];
  __shared__ float row_max[kRows], row_inv[kRows];
  const int S = p.stride, B = p.block_size, d = p.head_dim, width = S * d;
  const int row_stride = width + 8;  // bf16 elements: 16 bytes of padding per row
  const int h = blockIdx.y;
  const int g_kv = h / (p.num_q_heads / p.num_kv_heads);
  const int64_t first = p.kv_len - p.q_len;
  const int64_t m0 = first / B, m = m0 + blockIdx.x;
  const int64_t k_blocks = (p.kv_len + B - 1) / B;
  const int64_t q_blocks = (p.kv_len - 1) / B - m0 + 1;
  const int64_t a_base = m * B / S;
  const int64_t a_lo = first / S > a_base ? first / S : a_base;
  const int64_t a_hi_all = (p.kv_len - 1) / S;
  const int64_t a_hi = a_hi_all < a_base + R - 1 ? a_hi_all : a_base + R - 1;
  __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem);
  for (int i = threadIdx.x; i < kRows * width / 2; i += kThreads) {
    const int r = (2 * i) / width, rest = (2 * i) % width, t = rest / d, e = rest % d;
    const int64_t pos = (a_base + r) * S + (S - 1 - t);
    __nv_bfloat162 v = __floats2bfloat162_rn(0.0f, 0.0f);
    if (r < R && pos >= first && pos < p.kv_len) {
      v = *reinterpret_cast<const __nv_bfloat162*>(p.q + (pos - first) * p.q_row_stride +
                                                   static_cast<int64_t>(h) * d + e);
    }
    *reinterpret_cast<__nv_bfloat162*>(qs + static_cast<int64_t>(r) * row_stride + rest) = v;
  }
  for (int n = threadIdx.x; n < kMaxKeyBlocks; n += kThreads) sm_mass[n] = 0.0f;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, cq = lane & 3;
  const float zscale = rsqrtf(static_cast<float>(d)) / S;
  float mx[MTiles<R>()][2], sum[MTiles<R>()][2];
#pragma unroll
  for (int mt = 0; mt < MTiles<R>(); ++mt) {
    mx[mt][0] = mx[mt][1] = -INFINITY;
    sum[mt][0] = sum[mt][1] = 0.0f;
  }
  for (int64_t b0 = 8 * warp; b0 <= a_hi; b0 += 8 * kWarps) {
    float c[MTiles<R>()][4];
    MmaGroupScores<R>(p, smem, row_stride * 2, g_kv, b0, c);
#pragma unroll
    for (int mt = 0; mt < MTiles<R>(); ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 16 + gq + (e >= 2 ? 8 : 0);
        const int64_t b = b0 + 2 * cq + (e & 1);
        if (Scored<R>(r, b, a_base, a_lo, a_hi)) OnlineAdd(mx[mt][e >> 1], sum[mt][e >> 1], c[mt][e] * zscale);
      }
    }
  }
  // Rows are spread over the 4 lanes of a quad: merge them, then the warps through shared memory.
#pragma unroll
  for (int mt = 0; mt < MTiles<R>(); ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, mx[mt][half], off);
        const float s2 = __shfl_xor_sync(0xffffffffu, sum[mt][half], off);
        OnlineMerge(mx[mt][half], sum[mt][half], m2, s2);
      }
      if (cq == 0) {
        sm_max[warp][mt * 16 + gq + 8 * half] = mx[mt][half];
        sm_sum[warp][mt * 16 + gq + 8 * half] = sum[mt][half];
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    float m1 = -INFINITY, s1 = 0.0f;
    for (int w = 0; w < kWarps; ++w) OnlineMerge(m1, s1, sm_max[w][r], sm_sum[w][r]);
    row_max[r] = m1;
    row_inv[r] = s1 > 0.0f ? 1.0f / s1 : 0.0f;
  }
  __syncthreads();
  for (int64_t b0 = 8 * warp; b0 <= a_hi; b0 += 8 * kWarps) {
    float c[MTiles<R>()][4];
    MmaGroupScores<R>(p, smem, row_stride * 2, g_kv, b0, c);
    float col[2] = {0.0f, 0.0f};  // this lane's rows' probabilities of key groups b0 + 2cq, +1
#pragma unroll
    for (int mt = 0; mt < MTiles<R>(); ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 16 + gq + (e >= 2 ? 8 : 0);
        const int64_t b = b0 + 2 * cq + (e & 1);
        if (Scored<R>(r, b, a_base, a_lo, a_hi)) col[e & 1] += expf(c[mt][e] * zscale - row_max[r]) * row_inv[r];
      }
    }
    // Sum over the 8 quads (the rows), then one lane per column adds it to its key block.
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      col[0] += __shfl_xor_sync(0xffffffffu, col[0], off);
      col[1] += __shfl_xor_sync(0xffffffffu, col[1], off);
    }
    if (gq == 0) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t b = b0 + 2 * cq + j;
        if (b <= a_hi) atomicAdd(&sm_mass[b * S / B], col[j]);
      }
    }
  }
  __syncthreads();
  float* out = mass + (static_cast<int64_t>(h) * q_blocks + blockIdx.x) * k_blocks;
  for (int64_t n = threadIdx.x; n < k_blocks; n += kThreads) out[n] = sm_mass[n];
}

template <int R>
cudaError_t Launch(const XAttentionGpuParams& p, float* mass, cudaStream_t stream) {
  const int64_t m0 = (p.kv_len - p.q_len) / p.block_size;
  const int64_t q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  const dim3 grid(static_cast<unsigned>(q_blocks), p.num_q_heads);
  const int width = p.stride * p.head_dim;
  if (p.tensor_cores) {
    const int bytes = 16 * MTiles<R>() * (width + 8) * 2;
    SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        XAttentionMassMmaKernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    XAttentionMassMmaKernel<R><<<grid, kThreads, bytes, stream>>>(p, mass);
  } else {
    const int bytes = R * width * 2;
    SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        XAttentionMassKernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    XAttentionMassKernel<R><<<grid, kThreads, bytes, stream>>>(p, mass);
  }
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
