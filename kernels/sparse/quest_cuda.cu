// Quest on the GPU: see quest_cuda.h.
#include "kernels/sparse/quest_cuda.h"

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda_check.h"
#include "kernels/sparse/cluster_topk_cuda.cuh"
#include "kernels/sparse/select_cuda.cuh"

namespace sieve::kernels {
namespace {

using sparse_select::Key;

constexpr int kMaxGroup = 32;
constexpr int kScoreThreads = 128;  // 4 warps of 8 pages each
constexpr int kPagesPerBlock = 32;  // pages a scoring block takes (sets the grid)

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

// The fp32 values of 8 bf16 in a 16-byte word.
__device__ __forceinline__ void Unpack8(const uint4 w, float (&f)[8]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// grid = (page chunks of kPagesPerBlock, num_kv_heads, num_seqs); dynamic shared memory: 2 *
// group * kD floats. Writes scores[row * stride + j] = U_j(q) of pages j < n - 1 for the group's
// rows (or their max with per_kv_head).
//
// Four lanes take a page (8 pages a warp): lane `sub` of a page reads 16 bytes of each 64-byte
// chunk of Mx and of Mn, so a load instruction reads 64 contiguous bytes of each of 8 pages. The
// term max(q_c Mx_c, q_c Mn_c) is max(q_c, 0) Mx_c + min(q_c, 0) Mn_c (Mx_c >= Mn_c), two fmas
// on the query split once per block into its positive and negative parts; each product is exact
// in fp32 (bf16 times bf16), so each fma rounds as the sum did. Two shuffles sum a head's four
// lanes. The one-warp-per-page form (a 5-shuffle sum per head, 4-byte loads) measured 24-30 us at
// 128K on the H100, against an 11 us read of the bounds.
template <int kD>
__global__ void __launch_bounds__(kScoreThreads) QuestScoreKernel(const QuestSelectGpuParams p,
                                                                  float* __restrict__ scores,
                                                                  int stride) {
  constexpr int kChunks = kD / 32;  // 16-byte words per lane in each of Mx and Mn
  extern __shared__ __align__(16) float sm_split[];  // [group][kD] positive, then negative
  const int g = blockIdx.y, seq = blockIdx.z;
  const int n = PagesOf(p, p.kv_lens[seq]);
  if (n <= p.page_budget) return;  // every page: nothing to score
  const int scored = n - 1;
  const int j0 = blockIdx.x * kPagesPerBlock;
  if (j0 >= scored) return;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int q_row = p.q_rows ? p.q_rows[seq] : seq;
  const __nv_bfloat16* q =
      p.q + (static_cast<int64_t>(q_row) * p.num_q_heads + g * group) * kD;
  float* sm_pos = sm_split;
  float* sm_neg = sm_split + group * kD;
  for (int i = threadIdx.x; i < group * kD; i += kScoreThreads) {
    const float x = __bfloat162float(q[i]);
    sm_pos[i] = fmaxf(x, 0.0f);
    sm_neg[i] = fminf(x, 0.0f);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane & 3;
  const int j = j0 + warp * 8 + (lane >> 2);
  const bool valid = j < scored;
  uint4 mx[kChunks], mn[kChunks];
  if (valid) {
    const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
    const int64_t id = pages[j];
    const uint4* b = reinterpret_cast<const uint4*>(p.bounds + (id * p.num_kv_heads + g) * 2 * kD);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      mx[k] = b[k * 4 + sub];
      mn[k] = b[kD / 8 + k * 4 + sub];
    }
  }
  __syncthreads();
  if (!valid) return;  // after the block's only barrier; the shuffles below stay within a page
  const int rows_per_seq = p.per_kv_head ? p.num_kv_heads : p.num_q_heads;
  float best = -INFINITY;
  for (int h = 0; h < group; ++h) {
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int c = h * kD + k * 32 + sub * 8;
      float x[8], y[8];
      Unpack8(mx[k], x);
      Unpack8(mn[k], y);
      const float4 pa = *reinterpret_cast<const float4*>(sm_pos + c);
      const float4 pb = *reinterpret_cast<const float4*>(sm_pos + c + 4);
      const float4 na = *reinterpret_cast<const float4*>(sm_neg + c);
      const float4 nb = *reinterpret_cast<const float4*>(sm_neg + c + 4);
      const float pos[8] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
      const float neg[8] = {na.x, na.y, na.z, na.w, nb.x, nb.y, nb.z, nb.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v = fmaf(pos[e], x[e], v);
        v = fmaf(neg[e], y[e], v);
      }
    }
    // The page's four lanes are adjacent and all valid or all not (j is the same for them).
    const unsigned quad = 0xfu << (lane & ~3);
    v += __shfl_xor_sync(quad, v, 1);
    v += __shfl_xor_sync(quad, v, 2);
    if (p.per_kv_head) {
      best = fmaxf(best, v);
    } else if (sub == 0) {
      scores[(static_cast<int64_t>(seq) * rows_per_seq + g * group + h) * stride + j] = v;
    }
  }
  if (p.per_kv_head && sub == 0) {
    scores[(static_cast<int64_t>(seq) * rows_per_seq + g) * stride + j] = best;
  }
}

// --- Selection -----------------------------------------------------------------------------------

// The row policy of sparse_select::ClusterTopKKernel: row r ranks its sequence's pages but the
// last by score and keeps K - 1 of them; the last page is always kept, after them.
struct QuestTopPages {
  QuestSelectGpuParams p;
  QuestSelectGpuOutput out;
  const float* scores;
  int stride, rows_per_seq;

  __device__ int Pages(int row) const { return PagesOf(p, p.kv_lens[row / rows_per_seq]); }
  __device__ const int32_t* Table(int row) const {
    return p.page_table + static_cast<int64_t>(row / rows_per_seq) * p.page_table_stride;
  }
  __device__ bool Prepare(int row, int& n, int& keep) const {
    n = Pages(row);
    if (n <= p.page_budget) return false;
    n -= 1;
    keep = p.page_budget - 1;
    return true;
  }
  __device__ void EmitAll(int row, int begin, int end, bool first) const {
    const int32_t* table = Table(row);
    int32_t* sel = out.selected + static_cast<int64_t>(row) * p.page_budget;
    int32_t* ids = out.tables ? out.tables + static_cast<int64_t>(row) * p.page_budget : nullptr;
    for (int j = begin + static_cast<int>(threadIdx.x); j < end; j += blockDim.x) {
      sel[j] = j;
      if (ids) ids[j] = table[j];
    }
    if (first && threadIdx.x == 0) {
      if (out.counts) out.counts[row] = Pages(row);
      if (out.lens) out.lens[row] = p.kv_lens[row / rows_per_seq];
    }
  }
  __device__ uint32_t KeyAt(int row, int j) const {
    return Key(scores[static_cast<int64_t>(row) * stride + j]);
  }
  __device__ void Emit(int row, int at, int j) const {
    out.selected[static_cast<int64_t>(row) * p.page_budget + at] = j;
    if (out.tables) out.tables[static_cast<int64_t>(row) * p.page_budget + at] = Table(row)[j];
  }
  __device__ void Finish(int row) const {
    const int n = Pages(row), keep = p.page_budget - 1;
    const int64_t at = static_cast<int64_t>(row) * p.page_budget + keep;
    out.selected[at] = n - 1;
    if (out.tables) out.tables[at] = Table(row)[n - 1];
    if (out.counts) out.counts[row] = p.page_budget;
    if (out.lens) {
      const int kv_len = p.kv_lens[row / rows_per_seq];
      out.lens[row] = keep * p.page_size + (kv_len - (n - 1) * p.page_size);
    }
  }
};

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
  const int chunks = (stride + kPagesPerBlock - 1) / kPagesPerBlock;
  const dim3 grid(chunks, p.num_kv_heads, p.num_seqs);
  const size_t smem = 2 * static_cast<size_t>(p.num_q_heads / p.num_kv_heads) * p.head_dim *
                      sizeof(float);  // at most 32 KiB (group 32, d 128)
  if (p.head_dim == 128) {
    QuestScoreKernel<128><<<grid, kScoreThreads, smem, stream>>>(p, scores, stride);
  } else {
    QuestScoreKernel<64><<<grid, kScoreThreads, smem, stream>>>(p, scores, stride);
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  const int rows_per_seq = QuestSelectRowsPerSeq(p);
  const QuestTopPages pol{p, out, scores, stride, rows_per_seq};
  return sparse_select::LaunchClusterTopK(pol, static_cast<int64_t>(p.num_seqs) * rows_per_seq,
                                          stride, p.select_blocks_per_row, stream);
}

}  // namespace sieve::kernels
