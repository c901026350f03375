// MInference's index on the device: see the end of minference_cuda.h. The rules are those of
// kernels/sparse/minference.cc (TopK, SelectVsImpl, ConvertVs, RangeToBsr, BlockKeysToBsr,
// HeadPlan's A-shape rows), restated here per thread; minference_gpu_test.cc checks the plans
// equal BuildPlanFromScores's on the same scores, ties included.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/sparse/minference.h"
#include "kernels/sparse/minference_cuda.h"
#include "kernels/sparse/select_cuda.cuh"

namespace sieve::kernels {
namespace {

using sparse_select::BlockExclusiveScan;
using sparse_select::CompactSelected;
using sparse_select::Key;
namespace mi = minference;

constexpr int kSelectThreads = 1024;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kRowThreads = 128;
constexpr int kScanThreads = 1024;

__host__ __device__ inline int32_t Rows(const MInferenceIndexGpuParams& p) {
  return (p.q_len + mi::kBlock - 1) / mi::kBlock * p.num_heads;
}

// Workspace: the vertical lists [heads, n], the slash lists [heads, n], then block and column
// counts per row.
struct Layout {
  int32_t* vlist;
  int32_t* slist;
  int32_t* nblocks;  // [rows]
  int32_t* ncols;    // [rows]
};

__host__ __device__ inline Layout LayoutOf(void* ws, int32_t heads, int32_t n, int32_t rows) {
  Layout l;
  l.vlist = static_cast<int32_t*>(ws);
  l.slist = l.vlist + static_cast<int64_t>(heads) * n;
  l.nblocks = l.slist + static_cast<int64_t>(heads) * n;
  l.ncols = l.nblocks + rows;
  return l;
}

// The sizes section 1.4 selects for head h (SelectVsImpl).
__device__ __forceinline__ int32_t VerticalK(const MInferenceIndexGpuParams& p, int h) {
  return min(p.kv_len, max(p.vertical_size[h], mi::kMinVertical));
}
__device__ __forceinline__ int32_t SlashK(const MInferenceIndexGpuParams& p, int h) {
  return min(p.kv_len, max(p.slash_size[h], mi::kMinSlash));
}

// One block per (head, list): list 0 the vertical columns (ascending), list 1 the slash
// diagonals (descending). The k largest keys, forced entries (index < forced) above every
// score, ties to the lower index: an 8-bit radix select over four passes, then the ordered
// compaction.
__global__ void __launch_bounds__(kSelectThreads)
    TopKKernel(const MInferenceIndexGpuParams p, Layout l) {
  __shared__ int hist[256];
  __shared__ int scan[kSelectWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int h = blockIdx.x >> 1, list = blockIdx.x & 1;
  if (p.pattern[h] != 0) return;  // A-shape: no lists
  const int n = p.kv_len;
  const int k = list == 0 ? VerticalK(p, h) : SlashK(p, h);
  const int forced = list == 0 ? mi::kForcedColumns : mi::kForcedDiagonals;
  const float* score = (list == 0 ? p.vertical : p.slash) + static_cast<int64_t>(h) * n;
  int32_t* out = (list == 0 ? l.vlist : l.slist) + static_cast<int64_t>(h) * n;
  auto key_at = [score, forced](int j) { return j < forced ? 0xffffffffu : Key(score[j]); };
  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += kSelectThreads) {
      const uint32_t u = key_at(j);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the bin, from the top, that holds the remaining-th largest key
      int cum = 0, bin = 255;
      for (; bin > 0 && cum + hist[bin] < remaining; --bin) cum += hist[bin];
      s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      s_remaining = remaining - cum;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
    __syncthreads();
  }
  CompactSelected<kSelectWarps>(
      n, prefix, remaining, key_at,
      [&](int at, int j) { out[list == 0 ? at : k - 1 - at] = j; }, scan);
}

// Section 1.6 for one row, as ConvertVs then BlockKeysToBsr (RangeToBsr) do it: counts the
// row's key blocks and columns, and writes them when kWrite.
template <bool kWrite>
__device__ void VsRow(const int32_t* V, int nv, const int32_t* D, int nd, int start, int last,
                      int32_t* blocks, int32_t* cols, int& nb, int& nc) {
  auto col = [&](int c) {
    if (kWrite) cols[nc] = c;
    ++nc;
  };
  auto range = [&](int rs, int re) {  // RangeToBsr
    const int e = min(re, last + 1);
    if (e <= rs) return;
    int b = (rs + mi::kBlock - 1) / mi::kBlock;
    for (int c = rs; c < min(b * mi::kBlock, e); ++c) col(c);
    for (; b * mi::kBlock < e; ++b) {
      if (b * mi::kBlock + mi::kBlock <= e || e == last + 1) {
        if (kWrite) blocks[nb] = b;
        ++nb;
      } else {
        for (int c = b * mi::kBlock; c < e; ++c) col(c);
      }
    }
  };
  const int end = start + mi::kBlock;
  int s = 0, v = 0;
  while (s < nd && D[s] >= end) ++s;
  if (s == nd) return;
  int rs = max(end - D[s], mi::kBlock) - mi::kBlock, re = rs + mi::kBlock;
  auto emit = [&]() {
    for (; v < nv && V[v] < re; ++v) {
      if (V[v] < rs && V[v] <= last) col(V[v]);
    }
    range(rs, re);
  };
  for (++s; s < nd; ++s) {
    const int e = max(end - D[s], mi::kBlock);
    if (e > re + mi::kBlock) {
      emit();
      rs = e - mi::kBlock;
      re = e;
    } else if (e > re) {
      re += mi::kBlock;
    }
  }
  emit();
}

// An A-shape row (HeadPlan): the sinks before the window, then the window [ws, last].
template <bool kWrite>
__device__ void AShapeRow(int n_init, int n_local, int start, int last, int32_t* blocks,
                          int32_t* cols, int& nb, int& nc) {
  const int ws = max(0, start - max(n_local, 1) + 1);
  for (int c = 0; c < min(n_init, ws); ++c) {
    if (kWrite) cols[nc] = c;
    ++nc;
  }
  const int e = last + 1;
  if (e <= ws) return;
  int b = (ws + mi::kBlock - 1) / mi::kBlock;
  for (int c = ws; c < min(b * mi::kBlock, e); ++c) {
    if (kWrite) cols[nc] = c;
    ++nc;
  }
  for (; b * mi::kBlock < e; ++b) {  // e == last + 1: every block is listed
    if (kWrite) blocks[nb] = b;
    ++nb;
  }
}

// One thread per row: counts (kWrite false) or writes at the scanned starts.
template <bool kWrite>
__global__ void __launch_bounds__(kRowThreads)
    RowsKernel(const MInferenceIndexGpuParams p, Layout l, const int32_t* row_start,
               const int32_t* column_start, int32_t* key_blocks, int32_t* columns) {
  const int rows = Rows(p);
  const int row = blockIdx.x * kRowThreads + threadIdx.x;
  if (row >= rows) return;
  const int b = row / p.num_heads, h = row % p.num_heads;
  const int start = p.kv_len - p.q_len + b * mi::kBlock;
  const int last = min(start + mi::kBlock, p.kv_len) - 1;
  int32_t* blocks = kWrite ? key_blocks + row_start[row] : nullptr;
  int32_t* cols = kWrite ? columns + column_start[row] : nullptr;
  int nb = 0, nc = 0;
  if (p.pattern[h] == 0) {
    const int64_t off = static_cast<int64_t>(h) * p.kv_len;
    VsRow<kWrite>(l.vlist + off, VerticalK(p, h), l.slist + off, SlashK(p, h), start, last,
                  blocks, cols, nb, nc);
  } else {
    AShapeRow<kWrite>(p.vertical_size[h], p.slash_size[h], start, last, blocks, cols, nb, nc);
  }
  if (!kWrite) {
    l.nblocks[row] = nb;
    l.ncols[row] = nc;
  }
}

// One block: exclusive prefix sums of the rows' counts into starts[rows + 1].
__device__ void ScanInto(const int32_t* counts, int rows, int32_t* starts, int* sm) {
  const int per = (rows + kScanThreads - 1) / kScanThreads;
  const int begin = min(rows, static_cast<int>(threadIdx.x) * per), end = min(rows, begin + per);
  int local = 0;
  for (int r = begin; r < end; ++r) local += counts[r];
  int total = 0;
  int at = BlockExclusiveScan<kScanThreads / 32>(local, total, sm);
  for (int r = begin; r < end; ++r) {
    starts[r] = at;
    at += counts[r];
  }
  if (threadIdx.x == 0) starts[rows] = total;
}

__global__ void __launch_bounds__(kScanThreads)
    ScanKernel(const MInferenceIndexGpuParams p, Layout l, int32_t* row_start,
               int32_t* column_start) {
  __shared__ int sm[kScanThreads / 32];
  const int rows = Rows(p);
  ScanInto(l.nblocks, rows, row_start, sm);
  ScanInto(l.ncols, rows, column_start, sm);
}

// The causal (query, key) pairs of key block [a, a + 64) for the queries at positions [p0, p1]
// (attention_plan.cc's CausalKeysInBlock).
__device__ __forceinline__ long long BlockPairs(long long p0, long long p1, long long a) {
  constexpr long long kb = mi::kBlock;
  if (p1 < a) return 0;
  long long total = 0;
  const long long lo = max(p0, a), hi = min(p1, a + kb - 1);
  if (lo <= hi) total += (hi - lo + 1) * (lo - a + 1 + hi - a + 1) / 2;
  const long long past = max(p0, a + kb);
  if (past <= p1) total += (p1 - past + 1) * kb;
  return total;
}

// One warp per row: its key blocks' and columns' causal pairs, summed over the warp, one atomic.
__global__ void __launch_bounds__(kRowThreads)
    PairsKernel(const MInferenceIndexGpuParams p, const int32_t* __restrict__ row_start,
                const int32_t* __restrict__ key_blocks, const int32_t* __restrict__ column_start,
                const int32_t* __restrict__ columns, unsigned long long* pairs) {
  const int row = static_cast<int>((blockIdx.x * kRowThreads + threadIdx.x) / 32);
  const int lane = threadIdx.x & 31;
  long long sum = 0;
  if (row < Rows(p)) {
    const long long first = p.kv_len - p.q_len;
    const long long p0 = first + static_cast<long long>(row / p.num_heads) * mi::kBlock;
    const long long p1 = min(first + p.q_len - 1, p0 + mi::kBlock - 1);
    for (int i = row_start[row] + lane; i < row_start[row + 1]; i += 32) {
      sum += BlockPairs(p0, p1, static_cast<long long>(key_blocks[i]) * mi::kBlock);
    }
    for (int i = column_start[row] + lane; i < column_start[row + 1]; i += 32) {
      sum += max(0LL, p1 - max(static_cast<long long>(columns[i]), p0) + 1);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
  if (lane == 0 && sum != 0) atomicAdd(pairs, static_cast<unsigned long long>(sum));
}

bool Valid(const MInferenceIndexGpuParams& p) {
  if (p.vertical == nullptr || p.slash == nullptr || p.num_heads < 1 ||
      p.num_heads > kMInferenceIndexMaxHeads || p.q_len < 1 || p.kv_len < p.q_len) {
    return false;
  }
  for (int h = 0; h < p.num_heads; ++h) {
    if (p.pattern[h] != 0 && p.pattern[h] != 1) return false;
  }
  return true;
}

}  // namespace

size_t MInferenceIndexGpuWorkspaceBytes(const MInferenceIndexGpuParams& p) {
  return (2 * static_cast<size_t>(p.num_heads) * p.kv_len + 2 * static_cast<size_t>(Rows(p))) *
         sizeof(int32_t);
}

cudaError_t MInferenceIndexCountGpu(const MInferenceIndexGpuParams& p, void* workspace,
                                    size_t workspace_bytes, int32_t* row_start,
                                    int32_t* column_start, cudaStream_t stream) {
  if (!Valid(p) || workspace == nullptr || row_start == nullptr || column_start == nullptr ||
      workspace_bytes < MInferenceIndexGpuWorkspaceBytes(p)) {
    return cudaErrorInvalidValue;
  }
  const int rows = Rows(p);
  const Layout l = LayoutOf(workspace, p.num_heads, p.kv_len, rows);
  TopKKernel<<<2 * p.num_heads, kSelectThreads, 0, stream>>>(p, l);
  RowsKernel<false><<<(rows + kRowThreads - 1) / kRowThreads, kRowThreads, 0, stream>>>(
      p, l, nullptr, nullptr, nullptr, nullptr);
  ScanKernel<<<1, kScanThreads, 0, stream>>>(p, l, row_start, column_start);
  return cudaGetLastError();
}

cudaError_t MInferenceIndexFillGpu(const MInferenceIndexGpuParams& p, const void* workspace,
                                   const int32_t* row_start, const int32_t* column_start,
                                   int32_t* key_blocks, int32_t* columns, cudaStream_t stream) {
  if (!Valid(p) || workspace == nullptr || row_start == nullptr || column_start == nullptr ||
      key_blocks == nullptr || columns == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int rows = Rows(p);
  const Layout l = LayoutOf(const_cast<void*>(workspace), p.num_heads, p.kv_len, rows);
  RowsKernel<true><<<(rows + kRowThreads - 1) / kRowThreads, kRowThreads, 0, stream>>>(
      p, l, row_start, column_start, key_blocks, columns);
  return cudaGetLastError();
}

cudaError_t MInferencePlanPairsGpu(const MInferenceIndexGpuParams& p, const int32_t* row_start,
                                   const int32_t* key_blocks, const int32_t* column_start,
                                   const int32_t* columns, unsigned long long* pairs,
                                   cudaStream_t stream) {
  if (!Valid(p) || row_start == nullptr || column_start == nullptr || key_blocks == nullptr ||
      columns == nullptr || pairs == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t threads = int64_t{Rows(p)} * 32;
  const cudaError_t e = cudaMemsetAsync(pairs, 0, sizeof(unsigned long long), stream);
  if (e != cudaSuccess) return e;
  PairsKernel<<<static_cast<unsigned>((threads + kRowThreads - 1) / kRowThreads), kRowThreads, 0,
                stream>>>(p, row_start, key_blocks, column_start, columns, pairs);
  return cudaGetLastError();
}

}  // namespace sieve::kernels
