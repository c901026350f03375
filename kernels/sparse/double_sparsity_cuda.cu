// DoubleSparsity on the GPU: see double_sparsity_cuda.h.
#include "kernels/sparse/double_sparsity_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "kernels/cuda_check.h"
#include "kernels/sparse/cluster_topk_cuda.cuh"
#include "kernels/sparse/select_cuda.cuh"

namespace sieve::kernels {
namespace {

using sparse_select::Key;

constexpr int kWriteThreads = 256;   // 8 warps, one (token, label head) at a time each
constexpr int kScoreThreads = 256;   // one token per thread per pass
constexpr int kScorePasses = 4;      // tokens per thread per block (sets the grid)
constexpr int kMaxGroup = 32;
constexpr int kMaxHeadDim = 256;

// The label geometry the kernels need, computed on the host (DsLabelHeadBytes and friends are
// host functions).
struct Geometry {
  int32_t label_heads;
  int32_t group;
  int32_t half;         // 4-bit: code bytes per channel
  int64_t head_bytes;   // one label head's block in a page
  int64_t page_bytes;   // one page's labels
};

Geometry GeometryOf(const DoubleSparsityShape& s) {
  Geometry g;
  g.label_heads = DsLabelHeads(s);
  g.group = s.num_q_heads / s.num_kv_heads;
  g.half = (s.page_size + 1) / 2;
  g.head_bytes = DsLabelHeadBytes(s);
  g.page_bytes = DsLabelPageBytes(s);
  return g;
}

// --- Label writes --------------------------------------------------------------------------------

__global__ void __launch_bounds__(kWriteThreads)
    DsWriteLabelsKernel(const DsLabelsUpdateGpu u, const Geometry geo) {
  const DoubleSparsityShape& s = u.shape;
  const int lane = threadIdx.x & 31;
  const int64_t pairs = static_cast<int64_t>(u.num_tokens) * geo.label_heads;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kWriteThreads / 32);
  for (int64_t pair = static_cast<int64_t>(blockIdx.x) * (kWriteThreads / 32) + (threadIdx.x >> 5);
       pair < pairs; pair += warps) {
    const int64_t i = pair / geo.label_heads;
    const int lh = static_cast<int>(pair % geo.label_heads);
    const int64_t slot = u.slots[i];
    const int64_t page = slot / s.page_size;
    const int off = static_cast<int>(slot % s.page_size);
    const int kvh = s.per_kv_head_labels ? lh : lh / geo.group;
    const __nv_bfloat16* key = u.k_cache + (slot * s.num_kv_heads + kvh) * s.head_dim;
    const int32_t* ch = u.channels + static_cast<int64_t>(lh) * s.channels;
    uint8_t* block = u.labels + page * geo.page_bytes + lh * geo.head_bytes;
    if (s.format != DsLabelFormat::kInt4) {
      uint16_t* out = reinterpret_cast<uint16_t*>(block);
      for (int c = lane; c < s.channels; c += 32) {
        const float x = __bfloat162float(key[ch[c]]);
        out[static_cast<int64_t>(c) * s.page_size + off] =
            s.format == DsLabelFormat::kF16 ? __half_as_ushort(__float2half_rn(x))
                                            : __bfloat16_as_ushort(__float2bfloat16_rn(x));
      }
      continue;
    }
    // 4-bit: the row's min and max, then the CPU's quantisation in IEEE fp32.
    float lo = INFINITY, hi = -INFINITY;
    for (int c = lane; c < s.channels; c += 32) {
      const float x = __bfloat162float(key[ch[c]]);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    constexpr float kLevels = 15.0f;
    const float scale = hi > lo ? __fdiv_rn(kLevels, __fsub_rn(hi, lo)) : kLevels;
    if (lane == 0) {
      float* mins = reinterpret_cast<float*>(block);
      mins[off] = lo;
      mins[s.page_size + off] = __fdiv_rn(1.0f, scale);
    }
    uint8_t* codes = block + static_cast<int64_t>(s.page_size) * 8;
    const int nibble = off < geo.half ? 0 : 4;
    for (int c = lane; c < s.channels; c += 32) {
      const float x = __bfloat162float(key[ch[c]]);
      const float r = rintf(__fmul_rn(__fsub_rn(x, lo), scale));
      const uint32_t code = static_cast<uint32_t>(fminf(fmaxf(r, 0.0f), kLevels));
      const int64_t byte = static_cast<int64_t>(c) * geo.half + off % geo.half;
      // The 32-bit word holding the byte (the codes start 4-byte aligned); slot off + half (or
      // off - half) may be written by another warp of this step, so only this nibble changes.
      unsigned int* word = reinterpret_cast<unsigned int*>(codes + (byte & ~int64_t{3}));
      const int shift = static_cast<int>(byte & 3) * 8 + nibble;
      atomicAnd(word, ~(0xfu << shift));
      atomicOr(word, code << shift);
    }
  }
}

// --- Scores --------------------------------------------------------------------------------------

// The stored value of channel index c of the token in `off` of a label block.
__device__ __forceinline__ float LabelAt(const DoubleSparsityShape& s, const Geometry& geo,
                                         const uint8_t* block, int c, int off) {
  if (s.format == DsLabelFormat::kInt4) {
    const float* mins = reinterpret_cast<const float*>(block);
    const uint8_t b =
        block[static_cast<int64_t>(s.page_size) * 8 + static_cast<int64_t>(c) * geo.half +
              off % geo.half];
    const int code = off < geo.half ? (b & 0xf) : (b >> 4);
    return __fadd_rn(__fmul_rn(static_cast<float>(code), mins[s.page_size + off]), mins[off]);
  }
  const uint16_t bits =
      reinterpret_cast<const uint16_t*>(block)[static_cast<int64_t>(c) * s.page_size + off];
  return s.format == DsLabelFormat::kF16 ? __half2float(__ushort_as_half(bits))
                                         : __bfloat162float(__ushort_as_bfloat16(bits));
}

// Heads whose dot products make one selection row's score, each with its label head: 1 (a query
// head), the group's query heads (shared selection over per-query-head labels), or 1 label head
// with the group's queries summed (shared selection over per-KV-head labels).
__device__ __forceinline__ int TermsOf(const DoubleSparsityShape& s, const Geometry& geo) {
  return s.shared_selection && !s.per_kv_head_labels ? geo.group : 1;
}

// grid = (token chunks, selection heads, num_seqs); dynamic shared memory: terms * channels
// floats. scores[row * stride + t] for t < L.
__global__ void __launch_bounds__(kScoreThreads)
    DsScoreKernel(const DsSelectGpuParams p, const Geometry geo, float* __restrict__ scores,
                  int64_t stride) {
  extern __shared__ float sm_q[];  // [terms][channels]
  const DoubleSparsityShape& s = p.shape;
  const int sh = blockIdx.y, seq = blockIdx.z;
  const int len = p.kv_lens[seq];
  if (len <= p.token_budget) return;  // every token: nothing to score
  const int64_t chunk = static_cast<int64_t>(kScoreThreads) * kScorePasses;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * chunk;
  if (t0 >= len) return;
  const int terms = TermsOf(s, geo);
  const int rows_per_seq = s.shared_selection ? s.num_kv_heads : s.num_q_heads;
  const int q_row = p.q_rows ? p.q_rows[seq] : seq;
  const __nv_bfloat16* q = p.q + static_cast<int64_t>(q_row) * s.num_q_heads * s.head_dim;
  // The query channels of each term (summed over the group for per-KV-head shared selection).
  const int h0 = s.shared_selection ? sh * geo.group : sh;
  const int heads = s.shared_selection ? geo.group : 1;
  for (int i = threadIdx.x; i < terms * s.channels; i += kScoreThreads) {
    const int term = i / s.channels, c = i % s.channels;
    if (terms == heads) {  // one term per query head
      const int h = h0 + term;
      const int lh = s.per_kv_head_labels ? h / geo.group : h;
      sm_q[i] = __bfloat162float(q[static_cast<int64_t>(h) * s.head_dim +
                                   p.channels[static_cast<int64_t>(lh) * s.channels + c]]);
    } else {  // per-KV-head labels, shared: the group's queries summed on the label's channels
      const int32_t ch = p.channels[static_cast<int64_t>(sh) * s.channels + c];
      float sum = 0.0f;
      for (int h = h0; h < h0 + heads; ++h) {
        sum += __bfloat162float(q[static_cast<int64_t>(h) * s.head_dim + ch]);
      }
      sm_q[i] = sum;
    }
  }
  __syncthreads();
  const int32_t* pages = p.page_table + static_cast<int64_t>(seq) * p.page_table_stride;
  float* out = scores + (static_cast<int64_t>(seq) * rows_per_seq + sh) * stride;
  for (int pass = 0; pass < kScorePasses; ++pass) {
    const int64_t t = t0 + pass * kScoreThreads + threadIdx.x;
    if (t >= len) break;
    const int64_t page = pages[t / s.page_size];
    const int off = static_cast<int>(t % s.page_size);
    const uint8_t* page_labels = p.labels + page * geo.page_bytes;
    float score = 0.0f;
    for (int term = 0; term < terms; ++term) {
      const int h = h0 + term;
      const int lh = s.shared_selection ? (s.per_kv_head_labels ? sh : h)
                                        : (s.per_kv_head_labels ? h / geo.group : h);
      const uint8_t* block = page_labels + lh * geo.head_bytes;
      const float* qs = sm_q + term * s.channels;
      float dot = 0.0f;
      for (int c = 0; c < s.channels; ++c) dot = fmaf(qs[c], LabelAt(s, geo, block, c, off), dot);
      score += dot;
    }
    out[t] = score;
  }
}

// --- Selection -----------------------------------------------------------------------------------

// The row policy of sparse_select::ClusterTopKKernel: row r keeps the k best of its sequence's
// L tokens (every token when L <= k), writing positions and their KV slots.
struct DsTopTokens {
  DsSelectGpuParams p;
  DsSelectGpuOutput out;
  const float* scores;
  int64_t stride;
  int rows_per_seq;

  __device__ int Seq(int row) const { return row / rows_per_seq; }
  __device__ int32_t Slot(int row, int t) const {
    const int ps = p.shape.page_size;
    const int32_t* table = p.page_table + static_cast<int64_t>(Seq(row)) * p.page_table_stride;
    return table[t / ps] * ps + t % ps;
  }
  __device__ bool Prepare(int row, int& n, int& keep) const {
    const int len = p.kv_lens[Seq(row)];
    n = len < 0 ? 0 : len;
    keep = p.token_budget;
    return n > keep;
  }
  __device__ void EmitAll(int row, int begin, int end, bool first) const {
    const int64_t base = static_cast<int64_t>(row) * p.token_budget;
    for (int t = begin + static_cast<int>(threadIdx.x); t < end; t += blockDim.x) {
      out.positions[base + t] = t;
      if (out.slots) out.slots[base + t] = Slot(row, t);
    }
    if (first && threadIdx.x == 0 && out.counts) {
      const int len = p.kv_lens[Seq(row)];
      out.counts[row] = len < 0 ? 0 : len;
    }
  }
  __device__ uint32_t KeyAt(int row, int t) const { return Key(scores[row * stride + t]); }
  __device__ void Emit(int row, int at, int t) const {
    const int64_t i = static_cast<int64_t>(row) * p.token_budget + at;
    out.positions[i] = t;
    if (out.slots) out.slots[i] = Slot(row, t);
  }
  __device__ void Finish(int row) const {
    if (out.counts) out.counts[row] = p.token_budget;
  }
};

// Workspace layout: fp32 scores [rows, stride], 256-byte aligned.
size_t ScoreBytes(const DsSelectGpuParams& p) {
  const size_t rows = static_cast<size_t>(p.num_seqs) * DsSelectRowsPerSeq(p);
  const size_t stride = static_cast<size_t>(p.page_table_stride) * p.shape.page_size;
  return (rows * stride * sizeof(float) + 255) / 256 * 256;
}

bool ShapeOk(const DoubleSparsityShape& s) {
  return DsValidateShape(s).empty() && s.head_dim <= kMaxHeadDim &&
         s.num_q_heads / s.num_kv_heads <= kMaxGroup;
}

}  // namespace

cudaError_t DsWriteLabelsGpu(const DsLabelsUpdateGpu& u, cudaStream_t stream) {
  if (!ShapeOk(u.shape) || u.num_tokens < 0) return cudaErrorInvalidValue;
  if (u.num_tokens == 0) return cudaSuccess;
  if (!u.k_cache || !u.labels || !u.slots || !u.channels) return cudaErrorInvalidValue;
  const Geometry geo = GeometryOf(u.shape);
  const int64_t pairs = static_cast<int64_t>(u.num_tokens) * geo.label_heads;
  const int64_t want = (pairs + kWriteThreads / 32 - 1) / (kWriteThreads / 32);
  const int blocks = static_cast<int>(want < 65535 ? want : 65535);
  DsWriteLabelsKernel<<<blocks, kWriteThreads, 0, stream>>>(u, geo);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

int32_t DsSelectRowsPerSeq(const DsSelectGpuParams& p) {
  return p.shape.shared_selection ? p.shape.num_kv_heads : p.shape.num_q_heads;
}

size_t DsSelectWorkspaceBytes(const DsSelectGpuParams& p) { return ScoreBytes(p); }

cudaError_t DsSelectGpu(const DsSelectGpuParams& p, const DsSelectGpuOutput& out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  if (!ShapeOk(p.shape) || p.num_seqs < 0 || p.token_budget < 1 || p.page_table_stride < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0) return cudaSuccess;
  if (!p.q || !p.labels || !p.channels || !p.page_table || !p.kv_lens || !out.positions ||
      !workspace || workspace_bytes < DsSelectWorkspaceBytes(p) || p.num_seqs > 65535) {
    return cudaErrorInvalidValue;
  }
  const Geometry geo = GeometryOf(p.shape);
  float* scores = static_cast<float*>(workspace);
  const int64_t stride = static_cast<int64_t>(p.page_table_stride) * p.shape.page_size;
  const int64_t chunk = static_cast<int64_t>(kScoreThreads) * kScorePasses;
  const int64_t chunks = (stride + chunk - 1) / chunk;
  const int rows_per_seq = DsSelectRowsPerSeq(p);
  if (chunks > 0x7fffffff) return cudaErrorInvalidValue;
  const int terms = p.shape.shared_selection && !p.shape.per_kv_head_labels
                        ? p.shape.num_q_heads / p.shape.num_kv_heads
                        : 1;
  const size_t smem = static_cast<size_t>(terms) * p.shape.channels * sizeof(float);
  const dim3 grid(static_cast<unsigned>(chunks), rows_per_seq, p.num_seqs);
  DsScoreKernel<<<grid, kScoreThreads, smem, stream>>>(p, geo, scores, stride);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  const DsTopTokens pol{p, out, scores, stride, rows_per_seq};
  return sparse_select::LaunchClusterTopK(pol, static_cast<int64_t>(p.num_seqs) * rows_per_seq,
                                          stride, p.select_blocks_per_row, stream);
}

}  // namespace sieve::kernels
