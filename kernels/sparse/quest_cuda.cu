// Quest on the GPU: see quest_cuda.h.
#include "kernels/sparse/quest_cuda.h"

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/sparse/select_cuda.cuh"

namespace sieve::kernels {
namespace {

using sparse_select::CompactSelected;
using sparse_select::Key;

constexpr int kMaxGroup = 32;
constexpr int kScoreThreads = 128;  // 4 warps, one page at a time each
constexpr int kPagesPerWarp = 8;    // pages a scoring warp takes (sets the grid)
constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;

// --- Bounds --------------------------------------------------------------------------------------

__global__ void QuestBoundsKernel(const QuestBoundsUpdateGpu u) {
  const int half = u.head_dim / 2;
  for (int i = blockIdx.x; i < u.num_tokens; i += gridDim.x) {
    const int64_t slot = u.slots[i];
    const bool fresh = slot % u.page_size == 0;
    if (!fresh && i > 0 && u.slots[i - 1] == slot - 1) continue;  // inside another token's run
    int end = i + 1;  // the run: consecutive slots of this page
    while (end < u.num_tokens && u.slots[end] == u.slots[end - 1] + 1 &&
           u.slots[end] % u.page_size != 0) {
      ++end;
    }
    const int64_t page = slot / u.page_size;
    for (int idx = threadIdx.x; idx < u.num_kv_heads * half; idx += blockDim.x) {
      const int g = idx / half;
      const int c = (idx % half) * 2;
      __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(
          u.bounds + (page * u.num_kv_heads + g) * 2 * u.head_dim + c);
      __nv_bfloat162* b_min = b + half;
      const __nv_bfloat162 k0 = *reinterpret_cast<const __nv_bfloat162*>(
          u.k_cache + (slot * u.num_kv_heads + g) * u.head_dim + c);
      __nv_bfloat162 mx = fresh ? k0 : __hmax2(*b, k0);
      __nv_bfloat162 mn = fresh ? k0 : __hmin2(*b_min, k0);
      for (int t = i + 1; t < end; ++t) {
        const __nv_bfloat162 k = *reinterpret_cast<const __nv_bfloat162*>(
            u.k_cache + (u.slots[t] * u.num_kv_heads + g) * u.head_dim + c);
        mx = __hmax2(mx, k);
        mn = __hmin2(mn, k);
      }
      *b = mx;
      *b_min = mn;
    }
  }
}

// --- Scores --------------------------------------------------------------------------------------

__device__ __forceinline__ int PagesOf(const QuestSelectGpuParams& p, int kv_len) {
  return (kv_len + p.page_size - 1) / p.page_size;
}

// grid = (page chunks, num_kv_heads, num_seqs). Writes scores[row * stride + j] = U_j(q) of pages
// j < n - 1 for the group's rows (or their max with per_kv_head).
template <int kD>
__global__ void __launch_bounds__(kScoreThreads) QuestScoreKernel(const QuestSelectGpuParams p,
                                                                  float* __restrict__ scores,
                                                                  int stride) {
  constexpr int kPerLane = kD / 32;
  __shared__ __align__(16) float sm_q[kMaxGroup * kD];
  const int g = blockIdx.y, seq = blockIdx.z;
  const int n = PagesOf(p, p.kv_lens[seq]);
  if (n <= p.page_budget) return;  // every page: nothing to score
  const int scored = n - 1;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int q_row = p.q_rows ? p.q_rows[seq] : seq;
  const __nv_bfloat16* q =
      p.q + (static_cast<int64_t>(q_row) * p.num_q_heads + g * group) * kD;
  for (int i = threadIdx.x; i < group * kD; i += kScoreThreads) sm_q[i] = __bfloat162float(q[i]);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c0 = lane * kPerLane;
  const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  const int rows_per_seq = p.per_kv_head ? p.num_kv_heads : p.num_q_heads;
  // kUnroll pages per warp per step, their bounds loaded before any is scored: a warp keeps
  // kUnroll pages' reads in flight instead of one (one page at a time measured 31 us at 128K,
  // a third of the copy rate).
  constexpr int kUnroll = 4;
  const int step = gridDim.x * 4;
  for (int j0 = blockIdx.x * 4 + warp; j0 < scored; j0 += kUnroll * step) {
    float fx[kUnroll][kPerLane], fn[kUnroll][kPerLane];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * step;
      const int64_t id = pages[j < scored ? j : j0];
      const __nv_bfloat16* mx = p.bounds + (id * p.num_kv_heads + g) * 2 * kD + c0;
      const __nv_bfloat16* mn = mx + kD;
#pragma unroll
      for (int c = 0; c < kPerLane; c += 2) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(mx + c));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(mn + c));
        fx[u][c] = a.x;
        fx[u][c + 1] = a.y;
        fn[u][c] = b.x;
        fn[u][c + 1] = b.y;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * step;
      if (j >= scored) break;  // warp-uniform
      float best = -INFINITY;
      for (int h = 0; h < group; ++h) {
        const float* qh = sm_q + h * kD + c0;
        float v = 0.0f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) v += fmaxf(qh[c] * fx[u][c], qh[c] * fn[u][c]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (p.per_kv_head) {
          best = fmaxf(best, v);
        } else if (lane == 0) {
          scores[(static_cast<int64_t>(seq) * rows_per_seq + g * group + h) * stride + j] = v;
        }
      }
      if (p.per_kv_head && lane == 0) {
        scores[(static_cast<int64_t>(seq) * rows_per_seq + g) * stride + j] = best;
      }
    }
  }
}

// --- Selection -----------------------------------------------------------------------------------

// One block per row. See the file comment of quest_cuda.h.
__global__ void __launch_bounds__(kSelectThreads) QuestTopPagesKernel(
    const QuestSelectGpuParams p, const QuestSelectGpuOutput out, const float* __restrict__ scores,
    int stride, int rows_per_seq) {
  __shared__ int hist[256];
  __shared__ int sm_scan[kSelectWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int row = blockIdx.x;
  const int seq = row / rows_per_seq;
  const int kv_len = p.kv_lens[seq];
  const int n = PagesOf(p, kv_len);
  const int K = p.page_budget;
  const int32_t* table = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  int32_t* sel = out.selected + static_cast<int64_t>(row) * K;
  int32_t* ids = out.tables ? out.tables + static_cast<int64_t>(row) * K : nullptr;
  if (n <= K) {  // every page
    for (int j = threadIdx.x; j < n; j += kSelectThreads) {
      sel[j] = j;
      if (ids) ids[j] = table[j];
    }
    if (threadIdx.x == 0) {
      if (out.counts) out.counts[row] = n;
      if (out.lens) out.lens[row] = kv_len;
    }
    return;
  }
  const int scored = n - 1, keep = K - 1;
  const float* sc = scores + static_cast<int64_t>(row) * stride;
  // Radix select of the keep-th largest key, 8 bits at a time from the top.
  uint32_t prefix = 0, mask = 0;
  int remaining = keep;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < scored; j += kSelectThreads) {
      const uint32_t u = Key(sc[j]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const int top = 255 - lane * 8;  // this lane's bins, top .. top - 7, from high to low
      int local = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) local += hist[top - b];
      int incl = local;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int x = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += x;
      }
      const int excl = incl - local;
      if (excl < remaining && remaining <= incl) {
        int cum = excl;
        for (int b = 0; b < 8; ++b) {
          const int c = hist[top - b];
          if (cum + c >= remaining) {
            s_prefix = prefix | (static_cast<uint32_t>(top - b) << shift);
            s_remaining = remaining - cum;
            break;
          }
          cum += c;
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
    __syncthreads();  // hist and s_* are rewritten by the next pass
  }
  // Keep keys above the threshold and the first `remaining` equal to it, in page order.
  CompactSelected<kSelectWarps>(
      scored, prefix, remaining, [sc](int j) { return Key(sc[j]); },
      [&](int at, int j) {
        sel[at] = j;
        if (ids) ids[at] = table[j];
      },
      sm_scan);
  if (threadIdx.x == 0) {
    sel[keep] = n - 1;
    if (ids) ids[keep] = table[n - 1];
    if (out.counts) out.counts[row] = K;
    if (out.lens) out.lens[row] = keep * p.page_size + (kv_len - (n - 1) * p.page_size);
  }
}

}  // namespace

cudaError_t QuestUpdateBoundsGpu(const QuestBoundsUpdateGpu& u, cudaStream_t stream) {
  if (u.num_tokens < 0 || u.num_kv_heads < 1 || u.head_dim < 2 || u.head_dim % 2 != 0 ||
      u.page_size < 1) {
    return cudaErrorInvalidValue;
  }
  if (u.num_tokens == 0) return cudaSuccess;
  if (!u.k_cache || !u.bounds || !u.slots) return cudaErrorInvalidValue;
  const int blocks = u.num_tokens < 65535 ? u.num_tokens : 65535;
  const int work = u.num_kv_heads * (u.head_dim / 2);
  const int threads = work >= 256 ? 256 : ((work + 31) / 32) * 32;
  QuestBoundsKernel<<<blocks, threads, 0, stream>>>(u);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

int32_t QuestSelectRowsPerSeq(const QuestSelectGpuParams& p) {
  return p.per_kv_head ? p.num_kv_heads : p.num_q_heads;
}

size_t QuestSelectWorkspaceBytes(const QuestSelectGpuParams& p) {
  const size_t rows = static_cast<size_t>(p.num_seqs) * QuestSelectRowsPerSeq(p);
  const size_t bytes = rows * static_cast<size_t>(p.page_table_stride) * sizeof(float);
  return (bytes + 255) / 256 * 256;
}

cudaError_t QuestSelectGpu(const QuestSelectGpuParams& p, const QuestSelectGpuOutput& out,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_q_heads < 1 || p.num_kv_heads < 1 ||
      p.num_q_heads % p.num_kv_heads != 0 || p.num_q_heads / p.num_kv_heads > kMaxGroup ||
      (p.head_dim != 64 && p.head_dim != 128) || p.page_size < 1 || p.page_budget < 2 ||
      p.page_table_stride < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0) return cudaSuccess;
  if (!p.q || !p.bounds || !p.page_table || !p.kv_lens || !out.selected || !workspace ||
      workspace_bytes < QuestSelectWorkspaceBytes(p) || p.num_seqs > 65535) {
    return cudaErrorInvalidValue;
  }
  float* scores = static_cast<float*>(workspace);
  const int stride = p.page_table_stride;
  const int chunks = (stride + 4 * kPagesPerWarp - 1) / (4 * kPagesPerWarp);
  const dim3 grid(chunks, p.num_kv_heads, p.num_seqs);
  if (p.head_dim == 128) {
    QuestScoreKernel<128><<<grid, kScoreThreads, 0, stream>>>(p, scores, stride);
  } else {
    QuestScoreKernel<64><<<grid, kScoreThreads, 0, stream>>>(p, scores, stride);
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  const int rows_per_seq = QuestSelectRowsPerSeq(p);
  QuestTopPagesKernel<<<p.num_seqs * rows_per_seq, kSelectThreads, 0, stream>>>(
      p, out, scores, stride, rows_per_seq);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace sieve::kernels
