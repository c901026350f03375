// The simple paged attention kernel (see paged_attention_simple.h).
#include "kernels/attention/paged_attention_simple.h"

#include <cmath>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPerLane = kSimpleAttentionMaxHeadDim / 32;  // head dims each lane holds

// One block per (query token, query head). Lane l of each warp holds dims l, l + 32, ...; warp w
// takes keys w, w + 4, ... with its own running max, sum and accumulator.
__global__ void __launch_bounds__(kThreads) PagedAttentionSimpleKernel(
    const PagedAttentionParams<bf16> p) {
  __shared__ float s_max[kWarps], s_sum[kWarps];
  __shared__ float s_acc[kWarps][kSimpleAttentionMaxHeadDim];
  const int t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int d_len = p.head_dim;
  // The sequence of token t: the last s with query_start[s] <= t.
  int lo = 0, hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.query_start[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int s = lo;
  const int q_len = p.query_start[s + 1] - p.query_start[s];
  const int pos = p.kv_lens[s] - q_len + (t - p.query_start[s]);
  const int kv_head = h / (p.num_q_heads / p.num_kv_heads);
  const int32_t* pages = p.page_table + static_cast<int64_t>(s) * p.page_table_stride;

  float q[kPerLane], acc[kPerLane];
  const bf16* q_row = p.q + (static_cast<int64_t>(t) * p.num_q_heads + h) * d_len;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int d = lane + 32 * u;
    q[u] = d < d_len ? __bfloat162float(q_row[d]) * p.scale : 0.0f;
    acc[u] = 0.0f;
  }
  float run_max = -INFINITY, run_sum = 0.0f;
  for (int key = warp; key <= pos; key += kWarps) {
    const int64_t slot = static_cast<int64_t>(pages[key / p.page_size]) * p.page_size +
                         key % p.page_size;
    const int64_t base = (slot * p.num_kv_heads + kv_head) * d_len;
    const bf16* k_row = p.k_cache + base;
    const bf16* v_row = p.v_cache + base;
    float dot = 0.0f;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int d = lane + 32 * u;
      if (d < d_len) dot += q[u] * __bfloat162float(k_row[d]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float new_max = fmaxf(run_max, dot);
    const float correction = expf(run_max - new_max);  // 0 on the first key
    const float weight = expf(dot - new_max);
    run_sum = run_sum * correction + weight;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int d = lane + 32 * u;
      const float v = d < d_len ? __bfloat162float(v_row[d]) : 0.0f;
      acc[u] = acc[u] * correction + weight * v;
    }
    run_max = new_max;
  }
  if (lane == 0) {
    s_max[warp] = run_max;
    s_sum[warp] = run_sum;
  }
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int d = lane + 32 * u;
    if (d < d_len) s_acc[warp][d] = acc[u];
  }
  __syncthreads();
  float total_max = -INFINITY;
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, s_max[w]);
  float scale_w[kWarps];
  float total_sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    scale_w[w] = s_max[w] == -INFINITY ? 0.0f : expf(s_max[w] - total_max);
    total_sum += s_sum[w] * scale_w[w];
  }
  const float inv = total_sum > 0.0f ? 1.0f / total_sum : 0.0f;
  bf16* out_row = p.out + (static_cast<int64_t>(t) * p.num_q_heads + h) * d_len;
  for (int d = threadIdx.x; d < d_len; d += kThreads) {
    float o = 0.0f;
    for (int w = 0; w < kWarps; ++w) o += s_acc[w][d] * scale_w[w];
    out_row[d] = __float2bfloat16_rn(o * inv);
  }
}

}  // namespace

cudaError_t PagedAttentionSimpleRun(const PagedAttentionParams<bf16>& p, int32_t num_tokens,
                                    cudaStream_t stream) {
  if (num_tokens < 0 || p.head_dim < 1 || p.head_dim > kSimpleAttentionMaxHeadDim ||
      p.num_kv_heads < 1 || p.num_q_heads < 1 || p.num_q_heads % p.num_kv_heads != 0 ||
      p.num_q_heads > 65535 || p.page_size < 1 || !std::isfinite(p.scale)) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0) return cudaSuccess;
  if (p.num_seqs < 1 || p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
      p.out == nullptr || p.page_table == nullptr || p.kv_lens == nullptr ||
      p.query_start == nullptr || p.page_table_stride < 1) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(p.num_q_heads));
  PagedAttentionSimpleKernel<<<grid, kThreads, 0, stream>>>(p);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace sieve::kernels
