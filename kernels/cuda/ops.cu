// The bf16 GPU operators of kernels/cuda/ops.h. Each kernel is memory-bound: it reads its inputs
// once with 16-byte loads where the row width and pointers allow (8 bf16 per access), does its
// arithmetic in fp32 and rounds each output once.
#include "kernels/cuda/ops.h"

#include <algorithm>
#include <cstdint>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kMaxBlocks = 1 << 20;  // grid-stride kernels cap their grid here

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Loads V consecutive bf16 as floats; V == 8 is one 16-byte load (pointer 16-byte aligned).
template <int V>
__device__ __forceinline__ void Load(const bf16* p, float (&f)[V]) {
  if constexpr (V == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 t = __bfloat1622float2(h[k]);
      f[2 * k] = t.x;
      f[2 * k + 1] = t.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = __bfloat162float(p[k]);
  }
}

// Stores V floats as bf16 (round to nearest even); V == 8 is one 16-byte store.
template <int V>
__device__ __forceinline__ void Store(bf16* p, const float (&f)[V]) {
  if constexpr (V == 8) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = __float2bfloat16_rn(f[k]);
  }
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), returned to every
// thread. `scratch` holds 33 floats of shared memory; one call per kernel.
__device__ float BlockSum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  return scratch[32];
}

// --- Gather ------------------------------------------------------------------------------------

template <int V>
__global__ void GatherRowsKernel(const bf16* x, int64_t x_rows, int64_t cols, const int32_t* rows,
                                 bf16* out) {
  const int64_t i = blockIdx.x;
  const int32_t r = rows[i];
  bf16* o = out + i * cols;
  const bool valid = r >= 0 && r < x_rows;
  const bf16* src = x + (valid ? static_cast<int64_t>(r) : 0) * cols;
  for (int64_t c = threadIdx.x * V; c < cols; c += static_cast<int64_t>(blockDim.x) * V) {
    float f[V];
    if (valid) {
      Load<V>(src + c, f);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) f[k] = 0.0f;
    }
    Store<V>(o + c, f);
  }
}

// --- RMSNorm -----------------------------------------------------------------------------------

// One block per row. With kAdd, residual = bf16(residual + x) first and the norm reads it.
template <int V, bool kAdd>
__global__ void RmsNormKernel(const bf16* x, bf16* residual, const bf16* weight, int64_t dim,
                              float eps, bf16* out) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const bf16* xr = x + row * dim;
  bf16* rr = kAdd ? residual + row * dim : nullptr;
  const bf16* src = kAdd ? rr : xr;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * V;
  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x * V; c < dim; c += stride) {
    float a[V];
    Load<V>(xr + c, a);
    if constexpr (kAdd) {
      float r[V];
      Load<V>(rr + c, r);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = __bfloat162float(__float2bfloat16_rn(r[k] + a[k]));
      Store<V>(rr + c, a);  // exact: a already holds bf16 values
    }
#pragma unroll
    for (int k = 0; k < V; ++k) sum_sq += a[k] * a[k];
  }
  const float total = BlockSum(sum_sq, scratch);
  const float inv = 1.0f / sqrtf(total / static_cast<float>(dim) + eps);
  bf16* orow = out + row * dim;
  // Each thread re-reads only the elements it wrote (kAdd) or read, so no barrier is needed.
  for (int64_t c = threadIdx.x * V; c < dim; c += stride) {
    float a[V], w[V];
    Load<V>(src + c, a);
    Load<V>(weight + c, w);
#pragma unroll
    for (int k = 0; k < V; ++k) a[k] = w[k] * (a[k] * inv);
    Store<V>(orow + c, a);
  }
}

template <bool kAdd>
cudaError_t LaunchRmsNorm(const bf16* x, bf16* residual, const bf16* weight, int64_t rows,
                          int64_t dim, float eps, bf16* out, cudaStream_t stream) {
  if (rows < 0 || dim <= 0 || rows > INT32_MAX || x == nullptr || weight == nullptr ||
      out == nullptr || (kAdd && residual == nullptr) || !(eps >= 0.0f)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const bool vec = dim % 8 == 0 && Aligned16(x) && Aligned16(weight) && Aligned16(out) &&
                   (!kAdd || Aligned16(residual));
  const int64_t vecs = vec ? dim / 8 : dim;
  // One thread per vector access up to 256 threads (1024 for very wide rows), warps whole.
  const int64_t want = std::max<int64_t>(32, (vecs + 31) / 32 * 32);
  const int t = static_cast<int>(std::min<int64_t>(want, vecs >= 2048 ? 1024 : 256));
  if (vec) {
    RmsNormKernel<8, kAdd><<<static_cast<unsigned>(rows), t, 0, stream>>>(x, residual, weight,
                                                                          dim, eps, out);
  } else {
    RmsNormKernel<1, kAdd><<<static_cast<unsigned>(rows), t, 0, stream>>>(x, residual, weight,
                                                                          dim, eps, out);
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

// --- RoPE + KV write ---------------------------------------------------------------------------

// One block per (token, head). Blocks y < num_q_heads rotate a query head into q_out; the others
// rotate a key head into the cache and copy its value head beside it. Each thread owns rotary
// pairs i = threadIdx.x, threadIdx.x + blockDim.x, ... and computes their cos and sin itself, so
// a decode step of a few tokens spreads over (Hq + Hkv) blocks per token instead of one block
// per token (which on the H200 made this kernel 12.7 us of a 5.9 ms 8B decode step, x32 layers).
__global__ void RopeQkvKernel(const RopeQkvParams p) {
  const int t = blockIdx.x, h = blockIdx.y;
  const int d_len = p.head_dim, half = p.half_rot;
  const bf16* row = p.qkv + static_cast<int64_t>(t) * p.qkv_stride;
  const int q_elems = p.num_q_heads * d_len, kv_elems = p.num_kv_heads * d_len;
  const bf16* src;
  bf16* dst;
  if (h < p.num_q_heads) {
    src = row + h * d_len;
    dst = p.q_out + static_cast<int64_t>(t) * q_elems + h * d_len;
  } else {
    const int64_t slot = p.slots[t];
    if (slot < 0 || slot >= p.num_slots) return;
    const int kh = h - p.num_q_heads;
    src = row + q_elems + kh * d_len;
    dst = p.k_cache + slot * kv_elems + kh * d_len;
    const bf16* v_src = row + q_elems + kv_elems + kh * d_len;
    bf16* v_dst = p.v_cache + slot * kv_elems + kh * d_len;
    for (int d = threadIdx.x; d < d_len; d += blockDim.x) v_dst[d] = v_src[d];
  }
  const float pos = static_cast<float>(p.positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    // One fp32 product, as Hugging Face computes the angle, then full-range sin and cos.
    const float angle = __fmul_rn(pos, p.inv_freq[i]);
    float s, c;
    sincosf(angle, &s, &c);
    c *= p.attention_scaling;
    s *= p.attention_scaling;
    const float a = __bfloat162float(src[i]), b = __bfloat162float(src[i + half]);
    dst[i] = __float2bfloat16_rn(a * c - b * s);
    dst[i + half] = __float2bfloat16_rn(b * c + a * s);
  }
  // Dimensions past the rotary ones (partial rotary) pass through.
  for (int d = 2 * half + threadIdx.x; d < d_len; d += blockDim.x) dst[d] = src[d];
}

// --- Elementwise -------------------------------------------------------------------------------

template <int V>
__global__ void SiluMulKernel(const bf16* gate_up, int64_t rows, int64_t inter, bf16* out) {
  const int64_t per_row = inter / V;
  const int64_t total = rows * per_row;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / per_row, c = (e - r * per_row) * V;
    const bf16* g = gate_up + r * 2 * inter + c;
    float gv[V], uv[V];
    Load<V>(g, gv);
    Load<V>(g + inter, uv);
#pragma unroll
    for (int k = 0; k < V; ++k) gv[k] = gv[k] / (1.0f + expf(-gv[k])) * uv[k];
    Store<V>(out + r * inter + c, gv);
  }
}

__global__ void Bf16ToFloatKernel(const bf16* x, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __bfloat162float(x[i]);
  }
}

unsigned GridFor(int64_t items, int threads) {
  return static_cast<unsigned>(std::min<int64_t>(kMaxBlocks, (items + threads - 1) / threads));
}

}  // namespace

cudaError_t GatherRowsBf16(const bf16* x, int64_t x_rows, int64_t cols, const int32_t* rows,
                           int64_t n, bf16* out, cudaStream_t stream) {
  if (n < 0 || n > INT32_MAX || cols <= 0 || x_rows < 0 || x == nullptr || out == nullptr ||
      (n > 0 && rows == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  const bool vec = cols % 8 == 0 && Aligned16(x) && Aligned16(out);
  const int64_t vecs = vec ? cols / 8 : cols;
  const int threads = static_cast<int>(std::min<int64_t>(256, (vecs + 31) / 32 * 32));
  if (vec) {
    GatherRowsKernel<8><<<static_cast<unsigned>(n), threads, 0, stream>>>(x, x_rows, cols, rows, out);
  } else {
    GatherRowsKernel<1><<<static_cast<unsigned>(n), threads, 0, stream>>>(x, x_rows, cols, rows, out);
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t RmsNormBf16(const bf16* x, const bf16* weight, int64_t rows, int64_t dim, float eps,
                        bf16* out, cudaStream_t stream) {
  return LaunchRmsNorm<false>(x, nullptr, weight, rows, dim, eps, out, stream);
}

cudaError_t AddRmsNormBf16(const bf16* x, bf16* residual, const bf16* weight, int64_t rows,
                           int64_t dim, float eps, bf16* out, cudaStream_t stream) {
  return LaunchRmsNorm<true>(x, residual, weight, rows, dim, eps, out, stream);
}

cudaError_t RopeQkvAndCacheKvBf16(const RopeQkvParams& p, cudaStream_t stream) {
  const int64_t cols = static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * p.head_dim;
  if (p.num_tokens < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.half_rot < 0 || p.half_rot > kMaxRopePairs || 2 * p.half_rot > p.head_dim ||
      p.qkv_stride < cols || p.num_slots < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.qkv == nullptr || p.q_out == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
      p.positions == nullptr || p.slots == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int heads = p.num_q_heads + p.num_kv_heads;
  if (heads > 65535) return cudaErrorInvalidValue;
  // A thread per rotary pair (whole warps, at most 128; more pairs loop).
  const int threads = std::clamp((std::max(p.half_rot, p.head_dim / 2) + 31) / 32 * 32, 32, 128);
  RopeQkvKernel<<<dim3(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(heads)),
                  threads, 0, stream>>>(p);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t SiluMulBf16(const bf16* gate_up, int64_t rows, int64_t inter, bf16* out,
                        cudaStream_t stream) {
  if (rows < 0 || inter <= 0 || gate_up == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  if (inter % 8 == 0 && Aligned16(gate_up) && Aligned16(out)) {
    SiluMulKernel<8><<<GridFor(rows * inter / 8, kThreads), kThreads, 0, stream>>>(gate_up, rows,
                                                                                  inter, out);
  } else {
    SiluMulKernel<1><<<GridFor(rows * inter, kThreads), kThreads, 0, stream>>>(gate_up, rows,
                                                                              inter, out);
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t Bf16ToFloat(const bf16* x, int64_t n, float* out, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (x == nullptr || out == nullptr))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  Bf16ToFloatKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(x, n, out);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace sieve::kernels
