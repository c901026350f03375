// Small-batch GEMV (see gemv.h).
#include "kernels/cuda/gemv.h"

#include <cuda_bf16.h>

#include <climits>
#include <cstdint>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 8;     // warps (output columns) per block
constexpr int kUnroll = 4;    // 16-byte loads of w in flight per lane
constexpr int kVec = 8;       // bf16 per 16-byte load
constexpr int kStep = 32 * kVec;  // elements of a row one warp covers per load

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ void Unpack(const uint4& v, float (&f)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Adds the products of one 16-byte chunk of w (at element c of the row) with every row of x.
template <int M>
__device__ __forceinline__ void Accumulate(const uint4& wv, const bf16* x, int64_t k, int64_t c,
                                           float (&acc)[M]) {
  float wf[kVec];
  Unpack(wv, wf);
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float xf[kVec];
    Unpack(*reinterpret_cast<const uint4*>(x + r * k + c), xf);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[r] = fmaf(wf[i], xf[i], acc[r]);
  }
}

template <int M>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(const bf16* __restrict__ x,
                                                          const bf16* __restrict__ w,
                                                          const bf16* __restrict__ bias,
                                                          bf16* __restrict__ y, int64_t n,
                                                          int64_t k) {
  const int lane = threadIdx.x % 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (col >= n) return;  // whole warps leave together; nothing below synchronizes the block
  const bf16* row = w + col * k;
  float acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = 0.0f;
  int64_t c = static_cast<int64_t>(lane) * kVec;
  // Full groups of kUnroll loads per lane first (all issued before any is used), then the rest.
  for (; c + (kUnroll - 1) * kStep < k; c += kUnroll * kStep) {
    uint4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      wv[u] = __ldcs(reinterpret_cast<const uint4*>(row + c + u * kStep));  // streamed once
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) Accumulate<M>(wv[u], x, k, c + u * kStep, acc);
  }
  for (; c < k; c += kStep) {
    Accumulate<M>(__ldcs(reinterpret_cast<const uint4*>(row + c)), x, k, c, acc);
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? __bfloat162float(bias[col]) : 0.0f;
#pragma unroll
    for (int r = 0; r < M; ++r) y[r * n + col] = __float2bfloat16_rn(acc[r] + b);
  }
}

}  // namespace

bool GemvSupported(const GemmArgs& a) {
  return a.m >= 1 && a.m <= kGemvMaxRows && a.n >= 1 && a.k >= 1 && a.k % kVec == 0 &&
         a.y != nullptr && a.y_f32 == nullptr && a.x != nullptr && a.w != nullptr &&
         Aligned16(a.x) && Aligned16(a.w) && Aligned16(a.y) &&
         (a.bias == nullptr || Aligned16(a.bias)) &&
         (a.n + kWarps - 1) / kWarps <= INT32_MAX;
}

cudaError_t GemvBf16(const GemmArgs& a, cudaStream_t stream) {
  if (!GemvSupported(a)) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>((a.n + kWarps - 1) / kWarps);
  const dim3 threads(kWarps * 32);
  switch (a.m) {
    case 1:
      GemvKernel<1><<<blocks, threads, 0, stream>>>(a.x, a.w, a.bias, a.y, a.n, a.k);
      break;
    case 2:
      GemvKernel<2><<<blocks, threads, 0, stream>>>(a.x, a.w, a.bias, a.y, a.n, a.k);
      break;
    case 3:
      GemvKernel<3><<<blocks, threads, 0, stream>>>(a.x, a.w, a.bias, a.y, a.n, a.k);
      break;
    default:
      GemvKernel<4><<<blocks, threads, 0, stream>>>(a.x, a.w, a.bias, a.y, a.n, a.k);
      break;
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace sieve::kernels
