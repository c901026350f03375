// MInference's vertical-slash estimate on the GPU: see minference_cuda.h.
#include "kernels/sparse/minference_cuda.h"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

constexpr int kTile = 64;      // keys per tile and most estimation rows
constexpr int kThreads = 256;  // 16 x 16 threads, each 4 rows x 4 keys of the 64 x 64 logits
constexpr int kPitch = 68;     // floats per shared row (a multiple of 4 for float4 reads)
constexpr int kDiagonals = 2 * kTile - 1;  // local diagonals r - c in [-63, 63] of one tile

// The workspace's arrays for `heads` heads and `tiles` key tiles.
struct Workspace {
  float* part_max;    // [heads, tiles, 64] a row's max over one tile
  float* part_sum;    // [heads, tiles, 64] a row's sum of exp(z - part_max) over the tile
  float* row_max;     // [heads, 64]
  float* row_sum;     // [heads, 64]
  float* part_slash;  // [heads, tiles, 128] a tile's sums over its local diagonals
};

Workspace Carve(void* base, int heads, int tiles) {
  float* f = static_cast<float*>(base);
  Workspace w;
  const size_t rows = static_cast<size_t>(heads) * tiles * kTile;
  w.part_max = f;
  w.part_sum = w.part_max + rows;
  w.row_max = w.part_sum + rows;
  w.row_sum = w.row_max + static_cast<size_t>(heads) * kTile;
  w.part_slash = w.row_sum + static_cast<size_t>(heads) * kTile;
  return w;
}

struct Geo {
  int lq;     // estimation rows
  int pos0;   // position of row 0 (kv_len - lq)
  int tiles;  // key tiles
};

__device__ __forceinline__ int FloorDiv(int a, int b) { return (a >= 0 ? a : a - b + 1) / b; }

// One (key tile, query head): the 64 x 64 logits z (scaled; -inf where masked) of this thread's
// 4 x 4 block: rows 4 tr + i, keys t0 + 4 tc + j.
template <int D>
__device__ __forceinline__ void TileLogits(const MInferenceVsGpuParams& p, const Geo& g,
                                           float scale, float* qs, float* ks, float (&z)[4][4]) {
  const int tid = threadIdx.x, h = blockIdx.y, t0 = blockIdx.x * kTile;
  const int kv_head = h / (p.num_q_heads / p.num_kv_heads);
  // Q rows (the chunk's last lq queries) and the tile's keys, transposed to [d][row or key].
  for (int idx = tid; idx < kTile * D; idx += kThreads) {
    const int r = idx / D, e = idx % D;
    float qv = 0.0f, kv = 0.0f;
    if (r < g.lq) {
      const int64_t j = p.q_len - g.lq + r;
      qv = __bfloat162float(p.q[j * p.q_row_stride + int64_t{h} * D + e]);
    }
    const int t = t0 + r;
    if (t < p.kv_len) {
      const int64_t page = p.page_table[t / p.page_size];
      const int64_t slot = page * p.page_size + t % p.page_size;
      kv = __bfloat162float(p.k_cache[(slot * p.num_kv_heads + kv_head) * D + e]);
    }
    qs[e * kPitch + r] = qv;
    ks[e * kPitch + r] = kv;
  }
  __syncthreads();
  const int tr = tid / 16, tc = tid % 16;
  float acc[4][4] = {};
#pragma unroll 8
  for (int e = 0; e < D; ++e) {
    const float4 a = *reinterpret_cast<const float4*>(qs + e * kPitch + 4 * tr);
    const float4 b = *reinterpret_cast<const float4*>(ks + e * kPitch + 4 * tc);
    const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * tr + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int t = t0 + 4 * tc + j;
      const bool valid = r < g.lq && t < p.kv_len && t <= g.pos0 + r;
      z[i][j] = valid ? acc[i][j] * scale : -INFINITY;
    }
  }
}

// Pass 1: per row, the tile's max and sum of exp(z - max).
template <int D>
__global__ void __launch_bounds__(kThreads) VsStatsKernel(const MInferenceVsGpuParams p, Geo g,
                                                          float scale, Workspace w) {
  extern __shared__ __align__(16) float smem[];
  float z[4][4];
  TileLogits<D>(p, g, scale, smem, smem + D * kPitch, z);
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
  const size_t base = (static_cast<size_t>(blockIdx.y) * g.tiles + blockIdx.x) * kTile;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float mx = fmaxf(fmaxf(z[i][0], z[i][1]), fmaxf(z[i][2], z[i][3]));
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int j = 0; j < 4; ++j) sum += expf(z[i][j] - mx);
    }
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (tc == 0) {
      w.part_max[base + 4 * tr + i] = mx;
      w.part_sum[base + 4 * tr + i] = sum;
    }
  }
}

// Pass 2: per row, its max and sum over all tiles (one block per head; a warp per row, lanes
// over tiles, then a fixed shuffle tree).
__global__ void __launch_bounds__(kThreads) VsRowStatsKernel(Geo g, Workspace w) {
  const int h = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kTile; r += kThreads / 32) {
    float m = -INFINITY, l = 0.0f;
    for (int t = lane; t < g.tiles; t += 32) {
      const size_t i = (static_cast<size_t>(h) * g.tiles + t) * kTile + r;
      const float pm = w.part_max[i], ps = w.part_sum[i];
      if (pm == -INFINITY) continue;
      const float mn = fmaxf(m, pm);
      l = (m == -INFINITY ? 0.0f : l * expf(m - mn)) + ps * expf(pm - mn);
      m = mn;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, o);
      const float ol = __shfl_xor_sync(0xffffffffu, l, o);
      const float mn = fmaxf(m, om);
      if (mn != -INFINITY) {
        l = (m == -INFINITY ? 0.0f : l * expf(m - mn)) +
            (om == -INFINITY ? 0.0f : ol * expf(om - mn));
      }
      m = mn;
    }
    if (lane == 0) {
      w.row_max[h * kTile + r] = m;
      w.row_sum[h * kTile + r] = l;
    }
  }
}

// Pass 3: the tile's probabilities, its columns' sums (vertical) and its local diagonals' sums.
template <int D>
__global__ void __launch_bounds__(kThreads) VsSumsKernel(const MInferenceVsGpuParams p, Geo g,
                                                         float scale, Workspace w,
                                                         float* vertical) {
  extern __shared__ __align__(16) float smem[];
  float z[4][4];
  TileLogits<D>(p, g, scale, smem, smem + D * kPitch, z);
  const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16, h = blockIdx.y;
  const int t0 = blockIdx.x * kTile;
  __syncthreads();  // every thread is done with qs / ks: the probabilities reuse them
  constexpr int kP = kTile + 1;  // P's pitch
  float* P = smem;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = 4 * tr + i;
    const float m = w.row_max[h * kTile + r], l = w.row_sum[h * kTile + r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      P[r * kP + 4 * tc + j] = z[i][j] == -INFINITY ? 0.0f : expf(z[i][j] - m) * inv;
    }
  }
  __syncthreads();
  if (tid < kTile) {
    float sum = 0.0f;
    for (int r = 0; r < kTile; ++r) sum += P[r * kP + tid];
    if (t0 + tid < p.kv_len) vertical[static_cast<size_t>(h) * p.kv_len + t0 + tid] = sum;
  } else if (tid < kTile + kDiagonals) {
    const int diff = tid - kTile - (kTile - 1);  // r - c
    float sum = 0.0f;
    for (int r = max(0, diff); r < min(kTile, kTile + diff); ++r) sum += P[r * kP + r - diff];
    w.part_slash[(static_cast<size_t>(h) * g.tiles + blockIdx.x) * (2 * kTile) + tid - kTile] =
        sum;
  }
}

// Pass 4: slash[delta] from the tiles whose local diagonals hold it, in tile order. Tile t's
// local diagonal k = r - c + 63 is delta = pos0 - 64 t + r - c.
__global__ void __launch_bounds__(kThreads) VsSlashKernel(const MInferenceVsGpuParams p, Geo g,
                                                          Workspace w, float* slash) {
  const int h = blockIdx.y;
  const int delta = blockIdx.x * kThreads + threadIdx.x;
  if (delta >= p.kv_len) return;
  // 0 <= k < 127 <=> 64 t in [x - 63, x + 63], x = pos0 - delta: t in {floor(x / 64), + 1}.
  const int lo = max(0, FloorDiv(g.pos0 - delta, kTile));
  const int hi = min(g.tiles - 1, FloorDiv(g.pos0 - delta + kTile - 1, kTile));
  float sum = 0.0f;
  for (int t = lo; t <= hi; ++t) {
    const int k = delta - g.pos0 + kTile * t + kTile - 1;
    if (k >= 0 && k < kDiagonals) {
      sum += w.part_slash[(static_cast<size_t>(h) * g.tiles + t) * (2 * kTile) + k];
    }
  }
  slash[static_cast<size_t>(h) * p.kv_len + delta] = sum;
}

template <int D>
cudaError_t Launch(const MInferenceVsGpuParams& p, const Geo& g, float scale, const Workspace& w,
                   float* vertical, float* slash, cudaStream_t stream) {
  const int smem = 2 * D * kPitch * static_cast<int>(sizeof(float));
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(VsStatsKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(VsSumsKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 tiles(g.tiles, p.num_q_heads);
  VsStatsKernel<D><<<tiles, kThreads, smem, stream>>>(p, g, scale, w);
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  VsRowStatsKernel<<<p.num_q_heads, kThreads, 0, stream>>>(g, w);
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  VsSumsKernel<D><<<tiles, kThreads, smem, stream>>>(p, g, scale, w, vertical);
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const dim3 diag((p.kv_len + kThreads - 1) / kThreads, p.num_q_heads);
  VsSlashKernel<<<diag, kThreads, 0, stream>>>(p, g, w, slash);
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace

bool MInferenceVsGpuSupports(const MInferenceVsGpuParams& p) {
  return (p.head_dim == 64 || p.head_dim == 128) && p.num_kv_heads > 0 && p.num_q_heads > 0 &&
         p.num_q_heads % p.num_kv_heads == 0 && p.num_q_heads <= 65535 && p.q_len >= 1 &&
         p.kv_len >= p.q_len && p.page_size > 0 &&
         p.q_row_stride >= int64_t{p.num_q_heads} * p.head_dim &&
         p.last_q >= 1 && p.last_q <= kTile && p.scale >= 0.0f && std::isfinite(p.scale);
}

size_t MInferenceVsGpuWorkspaceBytes(const MInferenceVsGpuParams& p) {
  if (!MInferenceVsGpuSupports(p)) return 0;
  const size_t tiles = (static_cast<size_t>(p.kv_len) + kTile - 1) / kTile;
  return static_cast<size_t>(p.num_q_heads) * (tiles * kTile * 2 + kTile * 2 + tiles * 2 * kTile) *
         sizeof(float);
}

cudaError_t MInferenceVsScoresGpu(const MInferenceVsGpuParams& p, float* vertical, float* slash,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!MInferenceVsGpuSupports(p) || p.q == nullptr || p.k_cache == nullptr ||
      p.page_table == nullptr || vertical == nullptr || slash == nullptr ||
      workspace == nullptr || workspace_bytes < MInferenceVsGpuWorkspaceBytes(p)) {
    return cudaErrorInvalidValue;
  }
  Geo g;
  g.lq = p.last_q < p.q_len ? p.last_q : p.q_len;
  g.pos0 = p.kv_len - g.lq;
  g.tiles = (p.kv_len + kTile - 1) / kTile;
  const float scale = p.scale > 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  const Workspace w = Carve(workspace, p.num_q_heads, g.tiles);
  if (p.head_dim == 128) return Launch<128>(p, g, scale, w, vertical, slash, stream);
  return Launch<64>(p, g, scale, w, vertical, slash, stream);
}

}  // namespace sieve::kernels
