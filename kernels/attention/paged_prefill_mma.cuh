// The FlashAttention-2 style paged prefill kernel (internal to paged_prefill.cu): mma.sync
// m16n8k16 bf16 with fp32 accumulators, ldmatrix from XOR-swizzled shared memory, K/V tiles of
// 64 keys double-buffered with cp.async, online softmax in registers.
//
// Block: 8 warps, 128 query rows of one (sequence, query head); warp w owns rows 16w..16w+15 and
// keeps its Q fragments in registers. Per K/V tile, S = Q K^T (16 x 64 per warp), mask, online
// softmax, O += P V with P taken straight from the S accumulators (the m16n8 accumulator layout
// is the A-fragment layout of the next mma). A warp skips tiles wholly above its rows' diagonal.
//
// Block-sparse modes (same loop, same tile math): with 128-query BSR rows each block sweeps its
// row's key blocks; with 64-query rows and single columns (MInference, kVs) the block's two
// 64-row halves (warps 0-3 and 4-7) read two rows: their key block lists are merged (a block
// both list is loaded once and both halves compute it, one only one list names is computed by
// that half only), then each half's columns are gathered 64 at a time into the same K/V tiles
// (keys by index, padding entries zero-filled and masked) and computed by that half.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_MMA_CUH_
#define SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_MMA_CUH_

#include <climits>

#include "kernels/attention/paged_prefill_device.cuh"

namespace sieve::kernels::prefill_detail {

template <int D>
struct MmaCfg {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
  static constexpr int kThreads = 256;
  static constexpr int kChunks = D / 8;                       // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;     // rows one copy pass covers
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKvBytes = kBlockN * D * 2;
  static constexpr int kSmemBytes = kQBytes + 4 * kKvBytes;   // Q, K x 2 stages, V x 2 stages
};

// Byte offset of 16-byte chunk c of row r in a tile with D / 8 chunks per row; the chunk index is
// XORed with the row within each group of 8 chunks so that ldmatrix rows hit distinct banks.
template <int D>
__device__ __forceinline__ uint32_t SwizzledOffset(int r, int c) {
  return static_cast<uint32_t>(r * (D * 2) + (((c & ~7) | ((c ^ r) & 7)) << 4));
}

// SwizzledOffset<D>(r, c + c_even) given base = SwizzledOffset<D>(r, c) with c in {0, 1} and
// c_even an even compile-time constant: the XOR only flips bits 4-6, so the step is one LOP3 and
// an add instead of a register per (row, chunk) pair.
__device__ __forceinline__ uint32_t SwizzledStep(uint32_t base, int c_even) {
  return (base ^ static_cast<uint32_t>((c_even & 7) << 4)) + static_cast<uint32_t>((c_even & ~7) << 4);
}

// Copies keys [n0, n0 + 64) of one KV head from the pages into a swizzled tile at `dst`; keys
// at or past kv_len are zero-filled.
template <int D>
__device__ __forceinline__ void MmaLoadKvTile(const PrefillArgs& a, const bf16* cache,
                                              const int32_t* pages, int kv_head, int kv_len,
                                              int n0, uint32_t dst) {
  using C = MmaCfg<D>;
  const int c = threadIdx.x % C::kChunks;
#pragma unroll
  for (int i = 0; i < C::kBlockN / C::kRowsPerPass; ++i) {
    const int r = threadIdx.x / C::kChunks + i * C::kRowsPerPass;
    const int token = n0 + r;
    const bool valid = token < kv_len;
    const bf16* src = valid ? cache + KvRowOffset<D>(a, pages, token, kv_head) + c * 8 : cache;
    CpAsync16(dst + SwizzledOffset<D>(r, c), src, valid);
  }
}

// Copies the keys cols[0 .. n) (n <= 64; any positions below kv_len) of one KV head into a
// swizzled tile at `dst`, row r holding key cols[r]; rows n..63 are zero-filled.
template <int D>
__device__ __forceinline__ void MmaGatherKvTile(const PrefillArgs& a, const bf16* cache,
                                                const int32_t* pages, int kv_head,
                                                const int32_t* cols, int n, uint32_t dst) {
  using C = MmaCfg<D>;
  const int c = threadIdx.x % C::kChunks;
#pragma unroll
  for (int i = 0; i < C::kBlockN / C::kRowsPerPass; ++i) {
    const int r = threadIdx.x / C::kChunks + i * C::kRowsPerPass;
    const bool valid = r < n;
    const bf16* src = valid ? cache + KvRowOffset<D>(a, pages, __ldg(cols + r), kv_head) + c * 8
                            : cache;
    CpAsync16(dst + SwizzledOffset<D>(r, c), src, valid);
  }
}

// The work list of one 128-row query tile in the kVs mode: the merge of its two 64-query rows'
// key blocks (64 keys each), then the first half's columns, then the second's, 64 per item.
// Every thread steps it identically (the lists are read from global memory, cached).
struct VsSweep {
  const int32_t* blocks[2];
  int n_blocks[2];
  const int32_t* cols[2];
  int n_cols[2];
  int ib[2], ic[2];  // list positions consumed

  // One work item: a key block (cols == nullptr, keys [n0, n0 + 64)) or up to 64 gathered
  // columns, read by the halves whose bits are set (bit 0: rows 0-63, bit 1: rows 64-127).
  struct Item {
    int n0, halves, n;
    const int32_t* cols;
  };

  __device__ __forceinline__ Item Next() {
    Item it{0, 0, 0, nullptr};
    const bool la = ib[0] < n_blocks[0], lb = ib[1] < n_blocks[1];
    if (la || lb) {
      const int ka = la ? __ldg(blocks[0] + ib[0]) : INT_MAX;
      const int kb = lb ? __ldg(blocks[1] + ib[1]) : INT_MAX;
      const int k = min(ka, kb);
      it.halves = (ka == k ? 1 : 0) | (kb == k ? 2 : 0);
      ib[0] += ka == k;
      ib[1] += kb == k;
      it.n0 = k * 64;
      return it;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (ic[half] < n_cols[half]) {
        it.cols = cols[half] + ic[half];
        it.n = min(64, n_cols[half] - ic[half]);
        it.halves = 1 << half;
        ic[half] += 64;
        return it;
      }
    }
    return it;  // halves == 0: the end
  }
};

// Online-softmax update of one warp's 16 x 64 score tile (already scaled to the exp2 domain and
// masked): rescales o, l and m, and leaves the probabilities in s.
template <int D>
__device__ __forceinline__ void MmaSoftmaxUpdate(float (&s)[8][4], float (&o)[D / 8][4],
                                                 float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = -INFINITY;
#pragma unroll
    for (int jb = 0; jb < 8; ++jb) mx = fmaxf(mx, fmaxf(s[jb][2 * half], s[jb][2 * half + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[half], mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = FastExp2(m[half] - m_use);
    m[half] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int jb = 0; jb < 8; ++jb) {
      s[jb][2 * half] = FastExp2(s[jb][2 * half] - m_use);
      s[jb][2 * half + 1] = FastExp2(s[jb][2 * half + 1] - m_use);
      sum += s[jb][2 * half] + s[jb][2 * half + 1];
    }
    l[half] = l[half] * alpha + sum;
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
      o[db][2 * half] *= alpha;
      o[db][2 * half + 1] *= alpha;
    }
  }
}

// One 128-row query tile starting at row m0 of the sequence: the whole KV sweep and the output.
// kVs: the BSR rows are 64-query blocks with single columns (see the file comment).
template <int D, bool kVs>
__device__ __forceinline__ void MmaQueryTile(const PrefillArgs& a, const SeqInfo& si,
                                             const int32_t* pages, int h, int m0, uint8_t* smem) {
  using C = MmaCfg<D>;
  const uint32_t sq = SmemAddr(smem), sk = sq + C::kQBytes, sv = sk + 2 * C::kKvBytes;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kv_head = h / a.group;
  const int rows_valid = min(C::kBlockM, si.q_len - m0);
  // Dense: every tile up to the last row's position. Block-sparse: the tiles of the listed key
  // blocks, in list order (the causal mask below applies to any tile; the softmax is online).
  int n_tiles = (si.q_off + m0 + rows_valid - 1) / C::kBlockN + 1;
  const int32_t* key_blocks = nullptr;
  const int tiles_per_block = a.bsr_tiles_per_block;
  if (!kVs && a.bsr_row_start != nullptr) {
    const int64_t row =
        (static_cast<int64_t>(a.bsr_qblock_start[si.seq]) + m0 / C::kBlockM) * a.num_q_heads + h;
    const int b0 = a.bsr_row_start[row];
    key_blocks = a.bsr_key_blocks + b0;
    n_tiles = (a.bsr_row_start[row + 1] - b0) * tiles_per_block;
  }
  const auto tile_start = [&](int j) {
    if (key_blocks == nullptr) return j * C::kBlockN;
    if (j >= n_tiles) return 0;
    return key_blocks[j / tiles_per_block] * (tiles_per_block * C::kBlockN) +
           (j % tiles_per_block) * C::kBlockN;
  };
  // kVs: the two halves' rows, the work list, and the current and next items.
  VsSweep sweep{};
  VsSweep::Item cur{0, 0, 0, nullptr}, nxt{0, 0, 0, nullptr};
  if constexpr (kVs) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      sweep.n_blocks[half] = sweep.n_cols[half] = 0;
      sweep.blocks[half] = sweep.cols[half] = nullptr;
      sweep.ib[half] = sweep.ic[half] = 0;
      if (64 * half < rows_valid) {
        const int64_t row =
            (static_cast<int64_t>(a.bsr_qblock_start[si.seq]) + m0 / 64 + half) * a.num_q_heads +
            h;
        const int b0 = a.bsr_row_start[row];
        sweep.blocks[half] = a.bsr_key_blocks + b0;
        sweep.n_blocks[half] = a.bsr_row_start[row + 1] - b0;
        if (a.bsr_column_start != nullptr) {
          const int c0 = a.bsr_column_start[row];
          sweep.cols[half] = a.bsr_columns + c0;
          sweep.n_cols[half] = a.bsr_column_start[row + 1] - c0;
        }
      }
    }
    cur = sweep.Next();
    n_tiles = cur.halves != 0 ? 1 : 0;  // only "none or some" matters below
  }
  const auto load_kv = [&](const VsSweep::Item& it, int j, const bf16* cache, uint32_t dst) {
    if (kVs && it.cols != nullptr) {
      MmaGatherKvTile<D>(a, cache, pages, kv_head, it.cols, it.n, dst);
    } else {
      MmaLoadKvTile<D>(a, cache, pages, kv_head, si.kv_len, kVs ? it.n0 : tile_start(j), dst);
    }
  };
  const int64_t q_stride = static_cast<int64_t>(a.num_q_heads) * D;

  // Q rows (zero past the sequence), then K and V of tile 0.
  {
    const bf16* q0 = a.q + (static_cast<int64_t>(si.q_begin + m0) * a.num_q_heads + h) * D;
    const int c = tid % C::kChunks;
#pragma unroll
    for (int i = 0; i < C::kBlockM / C::kRowsPerPass; ++i) {
      const int r = tid / C::kChunks + i * C::kRowsPerPass;
      const bool valid = r < rows_valid;
      CpAsync16(sq + SwizzledOffset<D>(r, c), valid ? q0 + r * q_stride + c * 8 : q0, valid);
    }
  }
  load_kv(cur, 0, a.k_cache, sk);
  CpAsyncCommit();
  load_kv(cur, 0, a.v_cache, sv);
  CpAsyncCommit();
  if (n_tiles == 0) CpAsyncWait<0>();  // a row listing nothing: zero output, no copy left

  // Positions of this thread's two rows and the span of this warp's valid rows.
  const int warp_min_pos = si.q_off + m0 + 16 * warp;
  const int warp_rows = min(16, rows_valid - 16 * warp);
  const int warp_max_pos = warp_rows > 0 ? warp_min_pos + warp_rows - 1 : -1;
  const int pos0 = warp_min_pos + lane / 4, pos1 = pos0 + 8;
  // Per-lane ldmatrix row offsets at chunk 0 (Q: rows of the warp; K: 16-key slabs; V: 16-key
  // slabs read transposed); SwizzledStep moves them to an even chunk.
  const uint32_t lane_q = SwizzledOffset<D>(16 * warp + lane % 16, lane / 16);
  const uint32_t lane_k = SwizzledOffset<D>((lane / 16) * 8 + lane % 8, (lane / 8) & 1);
  const uint32_t lane_v = SwizzledOffset<D>(lane % 8 + ((lane / 8) & 1) * 8, lane / 16);

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int db = 0; db < D / 8; ++db) o[db][0] = o[db][1] = o[db][2] = o[db][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float s[8][4];

  for (int j = 0; kVs ? cur.halves != 0 : j < n_tiles; ++j) {
    const int stage = j & 1;
    if constexpr (kVs) nxt = sweep.Next();
    const bool more = kVs ? nxt.halves != 0 : j + 1 < n_tiles;
    CpAsyncWait<1>();  // K of tile j (and Q) landed; V of tile j may still be in flight
    __syncthreads();
    if (more) {
      load_kv(nxt, j + 1, a.k_cache, sk + (stage ^ 1) * C::kKvBytes);
      CpAsyncCommit();
    }
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) LdMatrixX4(qf[kk], sq + SwizzledStep(lane_q, 2 * kk));
    }
    // The tile's first key (for gathered columns the smallest: columns increase) and whether
    // this warp computes it.
    const int n0 = kVs ? (cur.cols != nullptr ? __ldg(cur.cols) : cur.n0) : tile_start(j);
    const bool active = (!kVs || ((cur.halves >> (warp / 4)) & 1) != 0) && n0 <= warp_max_pos;
    if (active) {
      const uint32_t kt = sk + stage * C::kKvBytes;
#pragma unroll
      for (int jb = 0; jb < 8; ++jb) s[jb][0] = s[jb][1] = s[jb][2] = s[jb][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int jn = 0; jn < 4; ++jn) {
          uint32_t b[4];
          LdMatrixX4(b, kt + jn * 16 * (2 * D) + SwizzledStep(lane_k, 2 * kk));
          MmaBf16(s[2 * jn], qf[kk], b[0], b[1]);
          MmaBf16(s[2 * jn + 1], qf[kk], b[2], b[3]);
        }
      }
      if (kVs && cur.cols != nullptr) {
        // Gathered columns: key position from the list; padding entries masked.
#pragma unroll
        for (int jb = 0; jb < 8; ++jb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int idx = jb * 8 + 2 * (lane % 4) + e;
            const int col = idx < cur.n ? __ldg(cur.cols + idx) : INT_MAX;
            s[jb][e] = col > pos0 ? -INFINITY : s[jb][e] * a.scale_log2;
            s[jb][e + 2] = col > pos1 ? -INFINITY : s[jb][e + 2] * a.scale_log2;
          }
        }
      } else {
        const bool mask = n0 + C::kBlockN - 1 > warp_min_pos;
#pragma unroll
        for (int jb = 0; jb < 8; ++jb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n0 + jb * 8 + 2 * (lane % 4) + (e & 1);
            const float x = s[jb][e] * a.scale_log2;
            s[jb][e] = (mask && col > (e < 2 ? pos0 : pos1)) ? -INFINITY : x;
          }
        }
      }
      MmaSoftmaxUpdate<D>(s, o, m, l);
    }
    if (more) {
      CpAsyncWait<1>();  // V of tile j landed; K of tile j + 1 may still be in flight
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    if (more) {
      load_kv(nxt, j + 1, a.v_cache, sv + (stage ^ 1) * C::kKvBytes);
      CpAsyncCommit();
    }
    if (active) {
      const uint32_t vt = sv + stage * C::kKvBytes;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t pa[4] = {PackBf16(s[2 * kk][0], s[2 * kk][1]),
                                PackBf16(s[2 * kk][2], s[2 * kk][3]),
                                PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dc = 0; dc < D / 8; dc += 2) {
          uint32_t b[4];
          LdMatrixX4Trans(b, vt + kk * 16 * (2 * D) + SwizzledStep(lane_v, dc));
          MmaBf16(o[dc], pa, b[0], b[1]);
          MmaBf16(o[dc + 1], pa, b[2], b[3]);
        }
      }
    }
    if constexpr (kVs) cur = nxt;
  }

  // Normalize, stage this warp's rows in the (now unused) Q tile, and write 16-byte rows out.
  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = l[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  const int r0 = 16 * warp + lane / 4;
#pragma unroll
  for (int db = 0; db < D / 8; ++db) {
    *reinterpret_cast<uint32_t*>(smem + SwizzledOffset<D>(r0, db) + 4 * (lane % 4)) =
        PackBf16(o[db][0] * inv[0], o[db][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(smem + SwizzledOffset<D>(r0 + 8, db) + 4 * (lane % 4)) =
        PackBf16(o[db][2] * inv[1], o[db][3] * inv[1]);
  }
  __syncwarp();
  bf16* out0 = a.out + (static_cast<int64_t>(si.q_begin + m0) * a.num_q_heads + h) * D;
#pragma unroll
  for (int i = 0; i < 16 * C::kChunks / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = 16 * warp + idx / C::kChunks, c = idx % C::kChunks;
    if (r < rows_valid) {
      *reinterpret_cast<uint4*>(out0 + r * q_stride + c * 8) =
          *reinterpret_cast<const uint4*>(smem + SwizzledOffset<D>(r, c));
    }
  }
}

// Grid: (query-tile slots, query heads, sequences). Block x takes tiles x, x + gridDim.x, ...
// of its sequence counted from the last (longest KV sweep) one. kVs: see MmaQueryTile.
template <int D, bool kVs = false>
__global__ void __launch_bounds__(256, 1) PrefillMmaKernel(const PrefillArgs a) {
  using C = MmaCfg<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int s = blockIdx.z, h = blockIdx.y;
  const SeqInfo si = LoadSeqInfo(a, s, C::kBlockM);
  const int32_t* pages = a.page_table + static_cast<int64_t>(s) * a.page_table_stride;
  for (int t = blockIdx.x; t < si.m_tiles; t += gridDim.x) {
    MmaQueryTile<D, kVs>(a, si, pages, h, (si.m_tiles - 1 - t) * C::kBlockM, smem);
    __syncthreads();  // the next tile reuses every shared buffer
  }
}

}  // namespace sieve::kernels::prefill_detail

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_MMA_CUH_
