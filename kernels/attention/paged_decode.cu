// Batched paged decode attention: see paged_decode.h for the contract, NOTES.md for the
// measurements behind the choices.
#include "kernels/attention/paged_decode.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstdint>

#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

constexpr int kThreads = 128;       // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTileTokens = 64;     // tokens per pipeline stage; each warp takes 16 of them
constexpr int kMaxGroup = 16;       // query heads per KV head the 16-row MMA tile holds
constexpr int kMaxSplits = 1024;    // bound on splits per sequence (grid.y)
constexpr float kLog2e = 1.4426950408889634f;

// Pipeline depth per head dim: 3 x 32 KB at d = 128 (2 blocks / SM), 4 x 16 KB at d = 64
// (3 blocks / SM); either way 64 KB or more of K/V in flight per multiprocessor. The macros
// exist for tuning builds (bench/run_gpu.sh builds variants); NOTES.md has the measurements.
#ifndef SIEVE_PAGED_DECODE_STAGES_D128
#define SIEVE_PAGED_DECODE_STAGES_D128 3
#endif
#ifndef SIEVE_PAGED_DECODE_STAGES_D64
#define SIEVE_PAGED_DECODE_STAGES_D64 4
#endif
template <int kD>
constexpr int Stages() {
  return kD == 128 ? SIEVE_PAGED_DECODE_STAGES_D128 : SIEVE_PAGED_DECODE_STAGES_D64;
}
template <int kD>
constexpr int StageBytes() { return kTileTokens * kD * 2 * 2; }  // K and V, bf16
template <int kD>
constexpr int SharedBytes() { return Stages<kD>() * StageBytes<kD>(); }
// Resident blocks per SM that the shared memory allows: 228 KB per SM, 1 KB reserved per block.
template <int kD>
constexpr int BlocksPerSm() { return (228 * 1024) / (SharedBytes<kD>() + 1024); }

// The PTX wrappers (cp.async, ldmatrix, mma.sync, ex2) are in kernels/cuda/ptx.cuh.
using namespace ::sieve::kernels::ptx;

// d += a (16x16 bf16, row-major) * b (16x8 bf16, column-major), fp32 accumulate.
__device__ __forceinline__ void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3};
  MmaBf16(d, a, b0, b1);
}

// Byte offset of 16-byte chunk `chunk` of K/V row `row` inside a stage buffer. Rows are kD bf16
// (kD / 8 chunks); chunks are XOR-swizzled by row % 8 so that ldmatrix's 8 rows hit 8 different
// bank groups.
template <int kD>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * (kD * 2) + ((chunk ^ (row & 7)) << 4));
}

// --- The split kernel ---------------------------------------------------------------------------

// What one block works on, read once at its start.
struct BlockWork {
  int seq, kv_head, split;
  int q_head0;     // first query head of the block (its heads are q_head0 .. q_head0 + rows - 1)
  int start, end;  // KV token range [start, end)
};

// Which query heads a block takes and which page table row it reads. Dense decode: the whole
// group of its KV head and the sequence's own row (rows = group, tables_per_seq = 1). Sparse
// decode (PagedDecodeSparseRun): `rows` query heads that share a compacted table, one table per
// (sequence, block column): tables_per_seq = num_q_heads / rows.
struct RowMap {
  int rows;            // query heads per block (1..16, dividing the group)
  int tables_per_seq;  // page table rows (and lengths) per sequence: 1 or num_q_heads / rows
};

// The page table row (and length entry) of sequence `seq`, block column `col`.
__device__ __forceinline__ int TableOf(const RowMap& m, int seq, int col) {
  return seq * m.tables_per_seq + col % m.tables_per_seq;
}

// Issues the asynchronous copies of tokens [tile_start, tile_start + 64) of the block's KV head
// into one stage buffer; tokens at or past `end` are zero-filled (and read nothing from K/V).
template <int kD>
__device__ __forceinline__ void LoadTile(uint32_t k_dst, uint32_t v_dst,
                                         const PagedAttentionParams<__nv_bfloat16>& p,
                                         const int32_t* __restrict__ pages, int kv_head,
                                         int tile_start, int end) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  constexpr int kPasses = kTileTokens / kRowsPerPass;
  const int chunk = threadIdx.x % kChunksPerRow;
  const int row0 = threadIdx.x / kChunksPerRow;
  // Page and in-page offset of this thread's first token, then stepped by kRowsPerPass.
  int token = tile_start + row0;
  int page_idx = token / p.page_size;
  int in_page = token - page_idx * p.page_size;
  const int64_t head_off = static_cast<int64_t>(kv_head) * kD + chunk * 8;
#pragma unroll
  for (int j = 0; j < kPasses; ++j) {
    const int row = row0 + j * kRowsPerPass;
    const bool valid = token < end;
    // The page id is read whether or not the token is valid (clamped into the table row, so
    // always in bounds): the read then does not wait for kv_len.
    const int64_t page = __ldg(pages + min(page_idx, p.page_table_stride - 1));
    const int64_t off =
        valid ? ((page * p.page_size + in_page) * p.num_kv_heads) * kD + head_off : 0;
    const uint32_t dst = SwizzledOffset<kD>(row, chunk);
    CpAsync16(k_dst + dst, p.k_cache + off, valid);
    CpAsync16(v_dst + dst, p.v_cache + off, valid);
    token += kRowsPerPass;
    in_page += kRowsPerPass;
    if (p.page_size == 1) {  // token lists (PagedDecodeTokenRun): a page per token
      page_idx = token;
      in_page = 0;
    }
    while (in_page >= p.page_size) {
      in_page -= p.page_size;
      ++page_idx;
    }
  }
}

// Running softmax state of one query-head row inside one warp: max (log2 units), this lane's
// part of the sum of exponentials.
struct RowState {
  float max = -INFINITY;
  float sum = 0.0f;
};

// Folds four new scores (log2 units, -inf when masked) of one row into its running state and
// turns them into probabilities. Returns the factor the row's old output must be scaled by.
__device__ __forceinline__ float OnlineSoftmax(RowState& st, float& x0, float& x1, float& x2,
                                               float& x3) {
  float mx = fmaxf(fmaxf(x0, x1), fmaxf(x2, x3));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float new_max = fmaxf(st.max, mx);
  const float base = new_max == -INFINITY ? 0.0f : new_max;  // all masked so far: no NaN
  const float alpha = FastExp2(st.max - base);
  st.max = new_max;
  x0 = FastExp2(x0 - base);
  x1 = FastExp2(x1 - base);
  x2 = FastExp2(x2 - base);
  x3 = FastExp2(x3 - base);
  st.sum = st.sum * alpha + ((x0 + x1) + (x2 + x3));
  return alpha;
}

// One warp's share (16 tokens) of one 64-token stage: S = Q K^T, online softmax, O += P V.
// `qa` holds the A fragments of Q (rows = query heads, padded to 16), `o` the output
// accumulators (rows = query heads, 8 columns of head dim per fragment).
template <int kD, bool kM16>
__device__ __forceinline__ void ComputeTile(uint32_t k_src, uint32_t v_src,
                                            const uint32_t (&qa)[kD / 16][4],
                                            float (&o)[kD / 8][4], RowState& r0, RowState& r1,
                                            int tile_start, int end, float scale_log2) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float s[2][4] = {};
  // Q K^T: B fragments are K rows (tokens) straight from shared memory.
  {
    const int row = warp * 16 + (lane >> 4) * 8 + (lane & 7);
    const int half = (lane >> 3) & 1;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t b[4];
      LdMatrixX4(b, k_src + SwizzledOffset<kD>(row, 2 * kk + half));
      Mma16816(s[0], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
      Mma16816(s[1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[2], b[3]);
    }
  }
  // Scale to log2 units and mask tokens past the end (only the last tile has any).
  const int tok0 = tile_start + warp * 16 + 2 * (lane & 3);
  const bool tail = tile_start + kTileTokens > end;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = s[nt][e] * scale_log2;
      s[nt][e] = (tail && tok0 + nt * 8 + (e & 1) >= end) ? -INFINITY : x;
    }
  }
  const float alpha0 = OnlineSoftmax(r0, s[0][0], s[0][1], s[1][0], s[1][1]);
  float alpha1 = 1.0f;
  if constexpr (kM16) alpha1 = OnlineSoftmax(r1, s[0][2], s[0][3], s[1][2], s[1][3]);
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
    o[n][0] *= alpha0;
    o[n][1] *= alpha0;
    if constexpr (kM16) {
      o[n][2] *= alpha1;
      o[n][3] *= alpha1;
    }
  }
  // P (bf16) as the A fragment: the S accumulator layout is exactly the A layout.
  const uint32_t pa0 = PackBf16(s[0][0], s[0][1]);
  const uint32_t pa2 = PackBf16(s[1][0], s[1][1]);
  const uint32_t pa1 = kM16 ? PackBf16(s[0][2], s[0][3]) : 0u;
  const uint32_t pa3 = kM16 ? PackBf16(s[1][2], s[1][3]) : 0u;
  // P V: B fragments are V rows read transposed.
  {
    const int row = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
    const int half = lane >> 4;
#pragma unroll
    for (int j = 0; j < kD / 16; ++j) {
      uint32_t b[4];
      LdMatrixX4Trans(b, v_src + SwizzledOffset<kD>(row, 2 * j + half));
      Mma16816(o[2 * j], pa0, pa1, pa2, pa3, b[0], b[1]);
      Mma16816(o[2 * j + 1], pa0, pa1, pa2, pa3, b[2], b[3]);
    }
  }
}

// Loads this lane's A fragments of Q: rows are the group's query heads (zero past `group`).
template <int kD, bool kM16>
__device__ __forceinline__ void LoadQ(uint32_t (&qa)[kD / 16][4], const __nv_bfloat16* q_group,
                                      int group) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int c = 2 * (lane & 3);
  const uint32_t* row0 = reinterpret_cast<const uint32_t*>(q_group + g * kD + c);
  const uint32_t* row1 = reinterpret_cast<const uint32_t*>(q_group + (g + 8) * kD + c);
  const bool has0 = g < group;
  const bool has1 = kM16 && g + 8 < group;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    qa[kk][0] = has0 ? __ldg(row0 + kk * 8) : 0u;
    qa[kk][2] = has0 ? __ldg(row0 + kk * 8 + 4) : 0u;
    qa[kk][1] = has1 ? __ldg(row1 + kk * 8) : 0u;
    qa[kk][3] = has1 ? __ldg(row1 + kk * 8 + 4) : 0u;
  }
}

// Combines the four warps' partial results for the block's query heads through shared memory
// and writes either the final bf16 output (one split) or the fp32 partials (several splits).
template <int kD, bool kM16>
__device__ void CombineWarps(char* smem, const float (&o)[kD / 8][4], RowState r0, RowState r1,
                             const PagedAttentionParams<__nv_bfloat16>& p, const BlockWork& w,
                             int rows, int planned_seqs, int num_splits,
                             float* __restrict__ ws) {
  float* sm_o = reinterpret_cast<float*>(smem);           // [kWarps][16][kD]
  float* sm_m = sm_o + kWarps * 16 * kD;                  // [kWarps][16]
  float* sm_l = sm_m + kWarps * 16;                       // [kWarps][16]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = 2 * (lane & 3);
  r0.sum += __shfl_xor_sync(0xffffffffu, r0.sum, 1);
  r0.sum += __shfl_xor_sync(0xffffffffu, r0.sum, 2);
  r1.sum += __shfl_xor_sync(0xffffffffu, r1.sum, 1);
  r1.sum += __shfl_xor_sync(0xffffffffu, r1.sum, 2);
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
    float* dst = sm_o + (warp * 16 + g) * kD + n * 8 + c;
    *reinterpret_cast<float2*>(dst) = make_float2(o[n][0], o[n][1]);
    if constexpr (kM16) {
      *reinterpret_cast<float2*>(dst + 8 * kD) = make_float2(o[n][2], o[n][3]);
    }
  }
  if ((lane & 3) == 0) {
    sm_m[warp * 16 + g] = r0.max;
    sm_l[warp * 16 + g] = r0.sum;
    sm_m[warp * 16 + g + 8] = kM16 ? r1.max : -INFINITY;
    sm_l[warp * 16 + g + 8] = kM16 ? r1.sum : 0.0f;
  }
  __syncthreads();
  const int q_head0 = w.q_head0;
  for (int idx = threadIdx.x; idx < rows * (kD / 4); idx += kThreads) {
    const int row = idx / (kD / 4);
    const int d = (idx % (kD / 4)) * 4;
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) m = fmaxf(m, sm_m[k * 16 + row]);
    const float base = m == -INFINITY ? 0.0f : m;
    float l = 0.0f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int k = 0; k < kWarps; ++k) {
      const float f = FastExp2(sm_m[k * 16 + row] - base);
      l += f * sm_l[k * 16 + row];
      const float4 v = *reinterpret_cast<const float4*>(sm_o + (k * 16 + row) * kD + d);
      acc.x += f * v.x;
      acc.y += f * v.y;
      acc.z += f * v.z;
      acc.w += f * v.w;
    }
    const int64_t q_row = static_cast<int64_t>(w.seq) * p.num_q_heads + q_head0 + row;
    if (num_splits == 1) {
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      uint2 packed;
      packed.x = PackBf16(acc.x * inv, acc.y * inv);
      packed.y = PackBf16(acc.z * inv, acc.w * inv);
      *reinterpret_cast<uint2*>(p.out + q_row * kD + d) = packed;
    } else {
      // Workspace: o [seqs * q_heads, splits, kD], then max and sum [seqs * q_heads, splits].
      const int64_t slot = q_row * num_splits + w.split;
      *reinterpret_cast<float4*>(ws + slot * kD + d) = acc;
      if (d == 0) {
        const int64_t planes = static_cast<int64_t>(planned_seqs) * p.num_q_heads * num_splits;
        ws[planes * kD + slot] = m;
        ws[planes * (kD + 1) + slot] = l;
      }
    }
  }
}

// grid = (num_q_heads / map.rows, num_splits, num_seqs); block = kThreads. The KV heads of one
// split are neighbours in launch order, so blocks running together read neighbouring rows of
// each page. Dense: map.rows = group, so grid.x is the KV head.
template <int kD, bool kM16>
__global__ void __launch_bounds__(kThreads, BlocksPerSm<kD>()) PagedDecodeSplitKernel(
    const PagedAttentionParams<__nv_bfloat16> p, int planned_seqs, int chunk_tokens,
    int num_splits, float scale_log2, float* __restrict__ ws, const RowMap map) {
  extern __shared__ __align__(128) char smem[];
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows = map.rows;
  BlockWork w;
  w.q_head0 = blockIdx.x * rows;
  w.kv_head = w.q_head0 / group;
  w.split = blockIdx.y;
  w.seq = blockIdx.z;
  const int table = TableOf(map, w.seq, blockIdx.x);
  const int kv_len = p.kv_lens[table];
  w.start = w.split * chunk_tokens;
  w.end = w.split == num_splits - 1 ? kv_len : min(kv_len, w.start + chunk_tokens);
  // Let the merge kernel (a programmatic dependent) be scheduled once every block has started;
  // it still waits for this whole grid to finish before it reads anything.
  GridDependentsLaunch();
  // Q, the first tiles' page ids and kv_len are independent loads, all in flight at once: the
  // prologue is issued before the empty-block check (tiles past the end are zero-fills).
  const int32_t* pages = p.page_table + static_cast<int64_t>(table) * p.page_table_stride;
  uint32_t qa[kD / 16][4];
  LoadQ<kD, kM16>(qa, p.q + (static_cast<int64_t>(w.seq) * p.num_q_heads + w.q_head0) * kD,
                  rows);
  constexpr int kStages = Stages<kD>();
  const uint32_t smem_base = SmemAddr(smem);
  auto k_buf = [&](int stage) { return smem_base + stage * StageBytes<kD>(); };
  auto v_buf = [&](int stage) { return k_buf(stage) + StageBytes<kD>() / 2; };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    LoadTile<kD>(k_buf(i), v_buf(i), p, pages, w.kv_head, w.start + i * kTileTokens, w.end);
    CpAsyncCommit();
  }
  if (w.start >= w.end) {
    CpAsyncWait<0>();
    if (num_splits == 1) {  // empty sequence: defined zero output
      const int64_t base = (static_cast<int64_t>(w.seq) * p.num_q_heads + w.q_head0) * kD;
      for (int i = threadIdx.x; i < rows * kD; i += kThreads) {
        p.out[base + i] = __float2bfloat16(0.0f);
      }
    }
    return;
  }
  float o[kD / 8][4] = {};
  RowState r0, r1;
  const int num_tiles = (w.end - w.start + kTileTokens - 1) / kTileTokens;
  for (int i = 0; i < num_tiles; ++i) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // tile i visible to all; everyone is done with the buffer refilled next
    const int next = i + kStages - 1;
    if (next < num_tiles) {
      LoadTile<kD>(k_buf(next % kStages), v_buf(next % kStages), p, pages, w.kv_head,
                   w.start + next * kTileTokens, w.end);
    }
    CpAsyncCommit();
    ComputeTile<kD, kM16>(k_buf(i % kStages), v_buf(i % kStages), qa, o, r0, r1,
                          w.start + i * kTileTokens, w.end, scale_log2);
  }
  CpAsyncWait<0>();
  __syncthreads();  // the stage buffers are reused for the cross-warp combine
  CombineWarps<kD, kM16>(smem, o, r0, r1, p, w, rows, planned_seqs, num_splits, ws);
}

// --- The merge kernel ---------------------------------------------------------------------------

// One block per (sequence, query head): out = sum_i 2^(m_i - M) o_i / sum_i 2^(m_i - M) l_i over
// the splits that saw tokens. Each of the 4 warps takes a quarter of the splits: its lane j
// computes a weight (32 splits at a time) and broadcasts it, and the partial outputs are loaded 8
// splits at a time so that their L2 latencies overlap; the warps then add up through shared
// memory. Launched as a programmatic dependent of the split kernel: it may start while that one
// finishes and waits for its results at griddepcontrol.wait.
// grid = num_seqs * num_q_heads, block = kThreads.
template <int kD>
__global__ void __launch_bounds__(kThreads) PagedDecodeMergeKernel(
    const PagedAttentionParams<__nv_bfloat16> p, int planned_seqs, int chunk_tokens,
    int num_splits, const float* __restrict__ ws, const RowMap map) {
  constexpr int kPerLane = kD / 32;  // 4 at d = 128, 2 at d = 64
  constexpr int kBatch = 8;
  using Vec = std::conditional_t<kPerLane == 4, float4, float2>;
  __shared__ float sm_acc[kWarps][kD];
  __shared__ float sm_l[kWarps];
  GridDependencyWait();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t q_row = blockIdx.x;
  const int seq = static_cast<int>(q_row / p.num_q_heads);
  const int head = static_cast<int>(q_row % p.num_q_heads);
  const int kv_len = p.kv_lens[TableOf(map, seq, head / map.rows)];
  const int used = kv_len <= 0 ? 0 : min(num_splits, (kv_len + chunk_tokens - 1) / chunk_tokens);
  const int64_t planes = static_cast<int64_t>(planned_seqs) * p.num_q_heads * num_splits;
  const float* o = ws + q_row * num_splits * kD + lane * kPerLane;
  const float* ms = ws + planes * kD + q_row * num_splits;
  const float* ls = ws + planes * (kD + 1) + q_row * num_splits;
  float m = -INFINITY;
  for (int i = lane; i < used; i += 32) m = fmaxf(m, ms[i]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  const float base = m == -INFINITY ? 0.0f : m;
  const int per_warp = (used + kWarps - 1) / kWarps;
  const int first = warp * per_warp;
  const int last = min(used, first + per_warp);
  float acc[kPerLane] = {};
  float l = 0.0f;
  for (int c0 = first; c0 < last; c0 += 32) {
    const int mine = c0 + lane;
    const float w = mine < last ? FastExp2(ms[mine] - base) : 0.0f;
    l += mine < last ? w * ls[mine] : 0.0f;
    const int n = min(32, last - c0);
    for (int j0 = 0; j0 < n; j0 += kBatch) {
      Vec v[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        if (j0 + k < n) {
          v[k] = *reinterpret_cast<const Vec*>(o + static_cast<int64_t>(c0 + j0 + k) * kD);
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const float f = __shfl_sync(0xffffffffu, w, (j0 + k) & 31);
        if (j0 + k < n) {
          acc[0] += f * v[k].x;
          acc[1] += f * v[k].y;
          if constexpr (kPerLane == 4) {
            acc[2] += f * v[k].z;
            acc[3] += f * v[k].w;
          }
        }
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) sm_acc[warp][lane * kPerLane + k] = acc[k];
  if (lane == 0) sm_l[warp] = l;
  __syncthreads();
  if (warp != 0) return;
  float total_l = 0.0f;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) total_l += sm_l[k];
  const float inv = total_l > 0.0f ? 1.0f / total_l : 0.0f;
  __nv_bfloat16* dst = p.out + q_row * kD + lane * kPerLane;
#pragma unroll
  for (int k = 0; k < kPerLane; k += 2) {
    float a = 0.0f, b = 0.0f;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) {
      a += sm_acc[x][lane * kPerLane + k];
      b += sm_acc[x][lane * kPerLane + k + 1];
    }
    *reinterpret_cast<uint32_t*>(dst + k) = PackBf16(a * inv, b * inv);
  }
}

// --- Host side ----------------------------------------------------------------------------------

// Raises the kernel's dynamic shared memory limit once per device (a host-side setting that
// outlives the call), so that later runs, also those captured in a graph, skip it.
template <int kD, bool kM16>
cudaError_t EnsureSharedMemoryLimit() {
  static std::atomic<uint64_t> done_devices{0};
  int device = 0;
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (done_devices.load(std::memory_order_acquire) & bit) return cudaSuccess;
  SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(PagedDecodeSplitKernel<kD, kM16>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  SharedBytes<kD>()));
  done_devices.fetch_or(bit, std::memory_order_release);
  return cudaSuccess;
}

template <int kD, bool kM16>
cudaError_t Launch(const PagedAttentionParams<__nv_bfloat16>& p, const PagedDecodePlan& plan,
                   float* ws, const RowMap map, cudaStream_t stream) {
  auto* kernel = PagedDecodeSplitKernel<kD, kM16>;
  SIEVE_CUDA_RETURN_IF_ERROR((EnsureSharedMemoryLimit<kD, kM16>()));
  const float scale_log2 = p.scale * kLog2e;
  const dim3 grid(p.num_q_heads / map.rows, plan.num_splits, p.num_seqs);
  kernel<<<grid, kThreads, SharedBytes<kD>(), stream>>>(p, plan.shape.num_seqs, plan.chunk_tokens,
                                                        plan.num_splits, scale_log2, ws, map);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  if (plan.num_splits > 1) {
    // Programmatic dependent launch: the merge grid is scheduled while the split grid drains
    // (its blocks wait at griddepcontrol.wait), which hides the launch gap between the two.
    const int64_t rows = static_cast<int64_t>(p.num_seqs) * p.num_q_heads;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(rows));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    SIEVE_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, PagedDecodeMergeKernel<kD>, p,
                                                  static_cast<int>(plan.shape.num_seqs),
                                                  static_cast<int>(plan.chunk_tokens),
                                                  static_cast<int>(plan.num_splits),
                                                  static_cast<const float*>(ws), map));
  }
  return cudaSuccess;
}

bool ParamsMatchPlan(const PagedAttentionParams<__nv_bfloat16>& p, const PagedDecodePlan& plan,
                     const void* workspace) {
  if (plan.num_splits <= 0 || plan.chunk_tokens <= 0) return false;
  if (p.num_q_heads != plan.shape.num_q_heads || p.num_kv_heads != plan.shape.num_kv_heads ||
      p.head_dim != plan.shape.head_dim) {
    return false;
  }
  if (p.num_seqs < 0 || p.num_seqs > plan.shape.num_seqs || p.page_size < 1) return false;
  if (p.num_seqs > 0 && (!p.q || !p.k_cache || !p.v_cache || !p.out || !p.page_table ||
                         !p.kv_lens || p.page_table_stride < 1)) {
    return false;
  }
  if (plan.num_splits > 1 &&
      (!workspace || reinterpret_cast<uintptr_t>(workspace) % 256 != 0)) {
    return false;
  }
  return true;
}

// Query heads per block of a shape: the group (dense) or shape.heads_per_block (sparse).
int RowsOf(const PagedDecodeShape& s) {
  return s.heads_per_block > 0 ? s.heads_per_block : s.num_q_heads / s.num_kv_heads;
}

cudaError_t LaunchWithMap(const PagedAttentionParams<__nv_bfloat16>& p,
                          const PagedDecodePlan& plan, float* ws, const RowMap map,
                          cudaStream_t stream) {
  const bool m16 = map.rows > 8;
  if (p.head_dim == 128) {
    return m16 ? Launch<128, true>(p, plan, ws, map, stream)
               : Launch<128, false>(p, plan, ws, map, stream);
  }
  return m16 ? Launch<64, true>(p, plan, ws, map, stream)
             : Launch<64, false>(p, plan, ws, map, stream);
}

}  // namespace

bool PagedDecodeSupports(const PagedDecodeShape& s) {
  if (s.num_seqs < 1 || s.num_q_heads < 1 || s.num_kv_heads < 1 || s.max_kv_len < 0) return false;
  if (s.head_dim != 64 && s.head_dim != 128) return false;
  if (s.num_q_heads % s.num_kv_heads != 0) return false;
  const int group = s.num_q_heads / s.num_kv_heads;
  if (s.heads_per_block < 0 || (s.heads_per_block > 0 && group % s.heads_per_block != 0)) {
    return false;
  }
  return group >= 1 && group <= kMaxGroup && s.num_seqs <= 65535;
}

int PagedDecodeBlocksPerSm(int head_dim) {
  if (head_dim == 128) return BlocksPerSm<128>();
  if (head_dim == 64) return BlocksPerSm<64>();
  return 0;
}

int PagedDecodeSharedBytes(int head_dim) {
  if (head_dim == 128) return SharedBytes<128>();
  if (head_dim == 64) return SharedBytes<64>();
  return 0;
}

const void* PagedDecodeKernelForTesting(int head_dim, int group) {
  const bool m16 = group > 8;
  if (head_dim == 128) {
    return m16 ? reinterpret_cast<const void*>(PagedDecodeSplitKernel<128, true>)
               : reinterpret_cast<const void*>(PagedDecodeSplitKernel<128, false>);
  }
  if (head_dim == 64) {
    return m16 ? reinterpret_cast<const void*>(PagedDecodeSplitKernel<64, true>)
               : reinterpret_cast<const void*>(PagedDecodeSplitKernel<64, false>);
  }
  return nullptr;
}

PagedDecodePlan Plan(const PagedDecodeShape& shape, int num_sms) {
  PagedDecodePlan plan;
  plan.shape = shape;
  if (!PagedDecodeSupports(shape) || num_sms < 1) return plan;
  // Cost model, in "tokens one block streams": a launch takes ceil(blocks / slots) waves, each as
  // long as one chunk plus a fixed per-block cost (pipeline fill and drain, combine), plus the
  // merge kernel when there is more than one split. Ties go to fewer splits.
  constexpr int64_t kBlockOverhead = 64;
  constexpr int64_t kMergeOverhead = 64;
  const int64_t slots = static_cast<int64_t>(num_sms) * PagedDecodeBlocksPerSm(shape.head_dim);
  // Blocks per split: one per KV head (dense), one per group of heads_per_block heads (sparse).
  const int64_t pairs = static_cast<int64_t>(shape.num_seqs) * (shape.num_q_heads / RowsOf(shape));
  const int64_t tiles = std::max<int64_t>(1, (shape.max_kv_len + kTileTokens - 1) / kTileTokens);
  int64_t best_cost = INT64_MAX;
  int best_splits = 1;
  int64_t best_chunk_tiles = tiles;
  const int64_t max_splits = std::min<int64_t>(tiles, kMaxSplits);
  for (int64_t n = 1; n <= max_splits; ++n) {
    const int64_t chunk_tiles = (tiles + n - 1) / n;
    const int64_t splits = (tiles + chunk_tiles - 1) / chunk_tiles;
    if (splits != n) continue;  // same chunk as a smaller n
    const int64_t waves = (pairs * splits + slots - 1) / slots;
    const int64_t cost = waves * (chunk_tiles * kTileTokens + kBlockOverhead) +
                         (splits > 1 ? kMergeOverhead : 0);
    if (cost < best_cost) {
      best_cost = cost;
      best_splits = static_cast<int>(splits);
      best_chunk_tiles = chunk_tiles;
    }
  }
  plan.num_splits = best_splits;
  plan.chunk_tokens = static_cast<int32_t>(best_chunk_tiles * kTileTokens);
  if (best_splits > 1) {
    const size_t rows = static_cast<size_t>(shape.num_seqs) * shape.num_q_heads * best_splits;
    const size_t bytes = rows * (shape.head_dim + 2) * sizeof(float);
    plan.workspace_bytes = (bytes + 255) / 256 * 256;
  }
  return plan;
}

cudaError_t PagedDecodeRun(const PagedAttentionParams<__nv_bfloat16>& p,
                           const PagedDecodePlan& plan, void* workspace, cudaStream_t stream) {
  if (plan.shape.heads_per_block != 0 || !ParamsMatchPlan(p, plan, workspace)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_seqs == 0) return cudaSuccess;
  const RowMap map{p.num_q_heads / p.num_kv_heads, 1};
  return LaunchWithMap(p, plan, static_cast<float*>(workspace), map, stream);
}

cudaError_t PagedDecodeSparseRun(const PagedAttentionParams<__nv_bfloat16>& p,
                                 const PagedDecodePlan& plan, const PagedDecodeTables& tables,
                                 void* workspace, cudaStream_t stream) {
  const int rows = tables.heads_per_block;
  if (rows < 1 || p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0 ||
      (p.num_q_heads / p.num_kv_heads) % rows != 0 || RowsOf(plan.shape) != rows) {
    return cudaErrorInvalidValue;
  }
  PagedAttentionParams<__nv_bfloat16> sp = p;
  sp.page_table = tables.pages;
  sp.kv_lens = tables.lens;
  sp.page_table_stride = tables.stride;
  if (!ParamsMatchPlan(sp, plan, workspace)) return cudaErrorInvalidValue;
  if (sp.num_seqs == 0) return cudaSuccess;
  const RowMap map{rows, p.num_q_heads / rows};
  return LaunchWithMap(sp, plan, static_cast<float*>(workspace), map, stream);
}

cudaError_t PagedDecodeTokenRun(const PagedAttentionParams<__nv_bfloat16>& p,
                                const PagedDecodePlan& plan, const PagedDecodeTokenLists& lists,
                                void* workspace, cudaStream_t stream) {
  PagedAttentionParams<__nv_bfloat16> tp = p;
  tp.page_size = 1;  // slot s is page s of one token: the same K/V rows
  const PagedDecodeTables t{lists.slots, lists.lens, lists.stride, lists.heads_per_block};
  return PagedDecodeSparseRun(tp, plan, t, workspace, stream);
}

}  // namespace sieve::kernels
