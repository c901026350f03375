// XAttention's block-mass estimator on the GPU: see xattention_cuda.h.
#include "kernels/sparse/xattention_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda_check.h"
#include "kernels/sparse/xattention_cuda_core.cuh"
#include "kernels/sparse/xattention_tc.cuh"

namespace sieve::kernels {
namespace {

using xattention_cc::kMaxKeyBlocks;
using xattention_cc::kMaxQueryBytes;
using xattention_cc::kThreads;
using xattention_cc::XAttentionMassKernel;

// --- The tensor-core kernel ----------------------------------------------------------------------
//
// The estimate is, per query head, a causal GEMM X = Q' K'^T of the reshaped queries Q' (one row
// per query group, S * d wide) and keys K' (one row per key group), followed by a row softmax
// and sums over R x R tiles of the probabilities. This kernel tiles that GEMM as a GEMM: a block
// owns 128 query-group rows of one head and sweeps tiles of BN = 64 (or 128, `tile_keys`) key
// groups up to its diagonal, with both operands streamed through shared memory in 64-column
// slices (cp.async, 3 stages, XOR-swizzled rows, ldmatrix fragments, mma.sync m16n8k16 bf16 with
// fp32 accumulators; 8 warps in a 4 x 2 grid of 32 x BN/2 warp tiles). Pages are resolved once
// per 16-byte copy, in 32-bit arithmetic. Sweep 1 keeps each row's online max and sum of
// exponentials in registers; sweep 2 recomputes the tiles and reduces exp(z - max) / sum over the
// R x R blocks (warp shuffles, then shared-memory adds), writing each tile's block masses
// straight to `mass`: a block owns whole query blocks, so no global atomics and no scratch. Warp
// tiles wholly above the diagonal skip the MMAs. A block takes row tiles t and T - 1 - t, so
// every block does the same causal work (16K tokens, 32 heads: 128 equal blocks; 32K: 256).
namespace tc {

using namespace ::sieve::kernels::xattention_tc;  // the building blocks (xattention_tc.cuh)

// One row tile (query groups [a0, a0 + 128)) of head h: both sweeps over the key tiles up to its
// diagonal, as one 3-stage pipeline of 64-column slices (sweep 2's first slices load while
// sweep 1 finishes); or (kOne) one sweep writing the log-domain partial block sums and the
// rows' log-sum-exps to the workspace rows ws (p.workspace, this head's; row stride
// k_blocks + 1, the row's log-sum-exp last), normalised later by NormalizeKernel.
template <int R, int BN, bool kOne>
__device__ void RowTile(const XAttentionGpuParams& p, const Geo& geo, int h, int g_kv, int a0,
                        float* __restrict__ mass, uint32_t smem, float (*st_max)[kBM],
                        float (*st_sum)[kBM], float* row_max, float* row_inv,
                        float (*blk)[BN / R], float* __restrict__ ws) {
  constexpr int WN = BN / 2, NT = WN / 8;  // warp tile columns, n8 tiles per warp
  Lane l;
  l.lane = threadIdx.x & 31;
  l.gq = l.lane >> 2;
  l.cq = l.lane & 3;
  l.wm = threadIdx.x >> 6;        // warp tile rows [32 wm, +32)
  l.wn = (threadIdx.x >> 5) & 1;  // warp tile columns [WN wn, +WN)
  l.wr = 32 * l.wm;
  const int n_tiles = min(a0 + kBM - 1, geo.a_hi) / BN + 1;
  const int kc_per_tile = p.stride * p.head_dim / kBK;
  const int steps_per_pass = n_tiles * kc_per_tile, total = (kOne ? 1 : 2) * steps_per_pass;
  float mx[2][2], sm[2][2];  // sweep 1: running max and sum; sweep 2: row max and 1 / sum
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    mx[mt][0] = mx[mt][1] = -INFINITY;
    sm[mt][0] = sm[mt][1] = 0.0f;
  }
  float acc[2][NT][4];
  const uint32_t lane_a = Swz(32 * l.wm + (l.lane & 15), l.lane >> 4);  // + 16 rows per m tile
  const uint32_t lane_b = Swz(WN * l.wn + ((l.lane >> 4) << 3) + (l.lane & 7), (l.lane >> 3) & 1);
  const auto load = [&](int s) {  // step s: key tile j, slice kc of either sweep
    const int rem = s % steps_per_pass;
    LoadSlice<BN>(p, geo, h, g_kv, a0, rem / kc_per_tile * BN, rem % kc_per_tile,
                  smem + (s % kStages) * StageBytes<BN>());
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load(s);
    ptx::CpAsyncCommit();
  }
  for (int s = 0; s < total; ++s) {
    ptx::CpAsyncWait<kStages - 2>();
    __syncthreads();  // slice s landed for every thread; slice s - 1's stage is free
    if (s + kStages - 1 < total) load(s + kStages - 1);
    ptx::CpAsyncCommit();
    const int pass = s / steps_per_pass, rem = s % steps_per_pass;
    const int j = rem / kc_per_tile, kc = rem % kc_per_tile, n0 = j * BN;
    if (kc == 0) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
        }
      }
    }
    // A warp tile wholly above the diagonal, or of rows the reference does not score, has
    // nothing to compute (its scores are all masked).
    const int wr0 = a0 + 32 * l.wm, wc0 = n0 + WN * l.wn;
    if (wc0 <= wr0 + 31 && wr0 + 31 >= geo.a_lo && wr0 <= geo.a_hi) {
      const uint32_t sa = smem + (s % kStages) * StageBytes<BN>();
      MmaSlice<NT>(sa, sa + kATileBytes, lane_a, lane_b, acc);
    }
    if (kc != kc_per_tile - 1) continue;
    // The key tile's scores are complete.
    if (kOne) {
      const int64_t ws_stride = int64_t{geo.k_blocks} + 1;
      OneSweepTile<R, 2, NT>(geo, l, a0, wc0, reinterpret_cast<const float(&)[2 * NT * 4]>(acc),
                             mx, sm, ws, geo.m0 * R, ws_stride);
      if (j == n_tiles - 1) {
        const int a_end = (geo.m0 + geo.q_blocks) * R;  // the workspace's rows end here
        RowStatsFinish(l, mx, sm, st_max, st_sum, row_max, row_inv,
                       ws + (a0 - geo.m0 * R) * ws_stride + geo.k_blocks, ws_stride,
                       min(kBM, a_end - a0));
      }
      continue;
    }
    if (pass == 0) {
      RowStatsUpdate<NT>(geo, l, a0, wc0, acc, mx, sm);
      if (j == n_tiles - 1) RowStatsFinish(l, mx, sm, st_max, st_sum, row_max, row_inv);
      continue;
    }
    BlockSums<R, NT>(geo, l, a0, wc0, acc, mx, sm, blk);
    __syncthreads();
    WriteTile<R, BN>(geo, h, a0, n0, j == n_tiles - 1, mass, blk);
    // blk's next adds come after the next iteration's barrier.
  }
  ptx::CpAsyncWaitAll();
  __syncthreads();  // the stages are free for the next row tile
}

// grid: num_q_heads * ceil(T / 2) blocks, T = row tiles of 128 query groups; block i takes head
// i % Hq and the row tiles t = i / Hq and T - 1 - t (once when they coincide).
template <int R, int BN, bool kOne>
__global__ void __launch_bounds__(kThreads, BN == 64 ? 2 : 1)
    MassKernel(const XAttentionGpuParams p, float* __restrict__ mass) {
  extern __shared__ __align__(128) char smem[];
  __shared__ float st_max[2][kBM], st_sum[2][kBM], row_max[kBM], row_inv[kBM];
  __shared__ float blk[kBM / R][BN / R];
  const Geo geo = GeoOf(p);
  const int rows = geo.q_blocks * R, tiles = (rows + kBM - 1) / kBM;
  const int h = static_cast<int>(blockIdx.x % p.num_q_heads);
  const int t = static_cast<int>(blockIdx.x / p.num_q_heads);
  const int g_kv = h / (p.num_q_heads / p.num_kv_heads);
  for (int i = threadIdx.x; i < (kBM / R) * (BN / R); i += kThreads) (&blk[0][0])[i] = 0.0f;
  __syncthreads();
  const uint32_t base = ptx::SmemAddr(smem);
  float* ws = kOne ? p.workspace + int64_t{h} * rows * (int64_t{geo.k_blocks} + 1) : nullptr;
  RowTile<R, BN, kOne>(p, geo, h, g_kv, geo.m0 * R + t * kBM, mass, base, st_max, st_sum,
                       row_max, row_inv, blk, ws);
  if (tiles - 1 - t != t) {
    RowTile<R, BN, kOne>(p, geo, h, g_kv, geo.m0 * R + (tiles - 1 - t) * kBM, mass, base, st_max,
                         st_sum, row_max, row_inv, blk, ws);
  }
}

// --- The one-sweep kernel on Hopper's warpgroup MMA (sm_90a) ---------------------------------
//
// The same one sweep with the GEMM on wgmma: a block's two warpgroups own 64 query-group rows
// each and issue m64n128k16 wgmmas with both operands in shared memory (the stages LoadSlice
// fills: one 64-column slice per stage, rows of 128 bytes in the 128-byte swizzle, which is
// the layout the wgmma descriptors name; stages start on 1024-byte boundaries). Key tiles of 128
// groups; the accumulators (64 per thread) are in the m16n8 layout per 16-row warp, so the
// epilogue is OneSweepTile with MT = 1. Per slice: wait for the stage, fence the async proxy,
// 4 wgmmas, wait for them (the next barrier then frees the stage for the copy engine).
template <int R>
__device__ void RowTileWg(const XAttentionGpuParams& p, const Geo& geo, int h, int g_kv, int a0,
                          uint32_t smem, float (*st_max)[kBM], float (*st_sum)[kBM],
                          float* row_max, float* row_inv, float* __restrict__ ws) {
#if SIEVE_XATTN_HAVE_WGMMA
  constexpr int NT = kWgBN / 8;
  const Lane l = WgLane();
  const int wg = threadIdx.x >> 7;
  const int n_tiles = min(a0 + kBM - 1, geo.a_hi) / kWgBN + 1;
  const int kc_per_tile = p.stride * p.head_dim / kBK;
  const int64_t ws_stride = int64_t{geo.k_blocks} + 1;
  float mx[1][2] = {{-INFINITY, -INFINITY}}, sm[1][2] = {{0.0f, 0.0f}};
  float acc[NT * 4];
#pragma unroll
  for (int i = 0; i < NT * 4; ++i) acc[i] = 0.0f;
  const int wr0 = a0 + 64 * wg;  // the warpgroup's first row
  WgSlices(
      n_tiles * kc_per_tile, smem,
      [&](int s, uint32_t stage) {
        LoadSlice<kWgBN>(p, geo, h, g_kv, a0, s / kc_per_tile * kWgBN, s % kc_per_tile, stage);
      },
      [&](int s, uint32_t sa) {
        const int j = s / kc_per_tile, kc = s % kc_per_tile, n0 = j * kWgBN;
        // Warpgroup-uniform: rows wholly below the tile's columns or unscored compute nothing
        // (the epilogue masks all of their entries, so stale accumulators are never read).
        if (n0 <= wr0 + 63 && wr0 + 63 >= geo.a_lo && wr0 <= geo.a_hi) {
          WgSliceMma(acc, sa, wg, kc == 0);
        }
        if (kc != kc_per_tile - 1) return;
        OneSweepTile<R, 1, NT>(geo, l, a0, n0, acc, mx, sm, ws, geo.m0 * R, ws_stride);
        if (j == n_tiles - 1) {
          const int a_end = (geo.m0 + geo.q_blocks) * R;
          RowStatsFinish<1, 1>(l, mx, sm, st_max, st_sum, row_max, row_inv,
                               ws + (a0 - geo.m0 * R) * ws_stride + geo.k_blocks, ws_stride,
                               min(kBM, a_end - a0));
        }
      });
#else
  __trap();  // launched only on sm_90 (XAttentionBlockMassGpu checks)
#endif
}

template <int R>
__global__ void __launch_bounds__(kThreads, 1)
    MassKernelWg(const XAttentionGpuParams p, float* __restrict__ mass) {
  extern __shared__ __align__(1024) char smem_wg[];
  __shared__ float st_max[2][kBM], st_sum[2][kBM], row_max[kBM], row_inv[kBM];
  const Geo geo = GeoOf(p);
  const int rows = geo.q_blocks * R, tiles = (rows + kBM - 1) / kBM;
  const int h = static_cast<int>(blockIdx.x % p.num_q_heads);
  const int t = static_cast<int>(blockIdx.x / p.num_q_heads);
  const int g_kv = h / (p.num_q_heads / p.num_kv_heads);
  const uint32_t base = (ptx::SmemAddr(smem_wg) + 1023u) & ~1023u;
  float* ws = p.workspace + int64_t{h} * rows * (int64_t{geo.k_blocks} + 1);
  RowTileWg<R>(p, geo, h, g_kv, geo.m0 * R + t * kBM, base, st_max, st_sum, row_max, row_inv, ws);
  if (tiles - 1 - t != t) {
    RowTileWg<R>(p, geo, h, g_kv, geo.m0 * R + (tiles - 1 - t) * kBM, base, st_max, st_sum,
                 row_max, row_inv, ws);
  }
  (void)mass;
}

// --- Independent tiles (XAttentionGpuParams::independent_tiles) -------------------------------------
//
// One block, one 128 x 128 tile (row tile i, key tile j) of one head: the slices of RowTileWg's
// loop for that key tile only, then OneSweepTile's partial block sums to the workspace (its row
// statistics are not used: RowLseKernel takes them from the partials). Blocks go in bands of 8
// row tiles: within a band, block x is row tile 8 y + x % 8 and key tile x / 8, so consecutive
// blocks share a key tile and a band's rows share their queries; a band has blocks only for the
// key tiles of its last row (BandOf), and the few above a row's diagonal exit at once.
//
// When every key group lies inside one page (page_size % S == 0: the engine's page 16 with S 16,
// 8, 4...), the tile's 128 query-group and 128 key-group rows are resolved to element offsets
// once, at the start (TileRows), so a slice's copy is a shared-memory read and an add instead of
// a page-table read, a division and 64-bit multiplies (the copies' integer work was the
// kernel's limit: ncu showed the ALU pipe busiest at 54% of issue slots, L2 at 42%; resolving
// the key rows alone took 19.0 ms to 14.3 ms at 128K).
constexpr int kBand = 8;

// Row offsets of one independent tile, resolved once at its start: per query-group row r the
// element offset in q of its position-0 column (position (a0 + r) S + S - 1, head h, channel 0),
// per key-group row r that of its first key in the KV cache (head g_kv, channel 0); -1 for rows
// wholly outside the chunk's queries or past kv_len. `full`: every position of every row is
// inside (no per-copy checks).
struct TileRows {
  long long a[kBM];
  long long b[kWgBN];
  int full;
};

__device__ __forceinline__ void ResolveTileRows(const XAttentionGpuParams& p, const Geo& geo, int h,
                                                int g_kv, int a0, int n0, TileRows& rows) {
  const int S = p.stride, t = static_cast<int>(threadIdx.x);
  if (t < kBM) {
    const int last = (a0 + t) * S + S - 1;  // the row's position-0 column (t = 0)
    rows.a[t] = last - (S - 1) < p.kv_len && last >= geo.first
                    ? int64_t{last - geo.first} * p.q_row_stride + int64_t{h} * p.head_dim
                    : -1;
  } else if (t < kBM + kWgBN) {
    const int pos = (n0 + t - kBM) * S;
    rows.b[t - kBM] = pos < p.kv_len ? ((int64_t{p.page_table[pos / p.page_size]} * p.page_size +
                                         pos % p.page_size) * p.num_kv_heads + g_kv) * p.head_dim
                                     : -1;
  }
  if (t == 0) {
    rows.full = a0 * S >= geo.first && (a0 + kBM) * S <= p.kv_len && (n0 + kWgBN) * S <= p.kv_len;
  }
}

// Copies slice kc of the tile (LoadSlice<kWgBN>'s layout) from the resolved rows: a copy is a
// shared-memory read and an add (plus the bounds checks when the tile is not `full`).
__device__ __forceinline__ void LoadSliceResolved(const XAttentionGpuParams& p, const Geo& geo,
                                                  int a0, int n0, int kc, uint32_t stage,
                                                  const TileRows& rows, bool full) {
  const int S = p.stride, d = p.head_dim;
  const int t = (kc * kBK) / d, e0 = (kc * kBK) % d;
  const int c = threadIdx.x & 7, r_base = threadIdx.x >> 3;  // 32 rows per pass
  const __nv_bfloat16* q = p.q - int64_t{t} * p.q_row_stride + e0 + c * 8;
  const __nv_bfloat16* k = p.k_cache + int64_t{t} * p.num_kv_heads * d + e0 + c * 8;
#pragma unroll
  for (int i = 0; i < kBM / 32; ++i) {
    const int r = r_base + 32 * i;
    const long long off = rows.a[r];
    bool valid = true;
    if (!full) {
      const int pos = (a0 + r) * S + S - 1 - t;
      valid = off >= 0 && pos >= geo.first && pos < p.kv_len;
    }
    ptx::CpAsync16(stage + Swz(r, c), valid ? q + off : p.q, valid);
  }
#pragma unroll
  for (int i = 0; i < kWgBN / 32; ++i) {
    const int r = r_base + 32 * i;
    const long long off = rows.b[r];
    const bool valid = full || (off >= 0 && (n0 + r) * S + t < p.kv_len);
    ptx::CpAsync16(stage + kATileBytes + Swz(r, c), valid ? k + off : p.k_cache, valid);
  }
}

template <int R, bool kResolved>
__device__ void TileWg(const XAttentionGpuParams& p, const Geo& geo, int h, int g_kv, int a0, int j,
                       uint32_t smem, TileRows& rows, float* __restrict__ ws) {
#if SIEVE_XATTN_HAVE_WGMMA
  constexpr int NT = kWgBN / 8;
  const int wg = threadIdx.x >> 7;
  const int n0 = j * kWgBN;
  float mx[1][2] = {{-INFINITY, -INFINITY}}, sm[1][2] = {{0.0f, 0.0f}};
  float acc[NT * 4];
#pragma unroll
  for (int i = 0; i < NT * 4; ++i) acc[i] = 0.0f;
  const int wr0 = a0 + 64 * wg;
  const bool active = n0 <= wr0 + 63 && wr0 + 63 >= geo.a_lo && wr0 <= geo.a_hi;
  const int slices = p.stride * p.head_dim / kBK;  // the key tile's
  const auto mma = [&](int s, uint32_t sa) {
    if (active) WgSliceMma<false>(acc, sa, wg, s == 0);  // waited for in WgSlices
  };
  if constexpr (kResolved) {
    ResolveTileRows(p, geo, h, g_kv, a0, n0, rows);
    __syncthreads();
    const bool full = rows.full != 0;
    WgSlices(
        slices, smem,
        [&](int s, uint32_t stage) { LoadSliceResolved(p, geo, a0, n0, s, stage, rows, full); },
        mma);
  } else {
    WgSlices(
        slices, smem,
        [&](int s, uint32_t stage) { LoadSlice<kWgBN>(p, geo, h, g_kv, a0, n0, s, stage); }, mma);
  }
  ptx::FenceRegs(acc);  // the last slice's wgmmas were waited for at the end of WgSlices
  OneSweepTile<R, 1, NT>(geo, WgLane(), a0, n0, acc, mx, sm, ws, geo.m0 * R,
                         int64_t{geo.k_blocks} + 1);
#else
  __trap();
#endif
}

// Key tiles of the row tile whose first query group is a0 (those up to its diagonal).
__host__ __device__ inline int KeyTilesOf(int64_t a0, int64_t a_hi) {
  return static_cast<int>((a0 + kBM - 1 < a_hi ? a0 + kBM - 1 : a_hi) / kWgBN + 1);
}

// Blocks of MassTileKernelWg per head: per band, 8 blocks per key tile of its last row tile.
__host__ __device__ inline int64_t TileBlocks(int64_t row0, int tiles, int64_t a_hi) {
  int64_t blocks = 0;
  for (int y = 0; y * kBand < tiles; ++y) {
    const int last = (y + 1) * kBand < tiles ? (y + 1) * kBand - 1 : tiles - 1;
    blocks += int64_t{kBand} * KeyTilesOf(row0 + int64_t{last} * kBM, a_hi);
  }
  return blocks;
}

template <int R, bool kResolved>
__global__ void __launch_bounds__(kThreads, 2) MassTileKernelWg(const XAttentionGpuParams p) {
  extern __shared__ __align__(1024) char smem_wg[];
  __shared__ TileRows tile_rows;
  const Geo geo = GeoOf(p);
  const int rows = geo.q_blocks * R, tiles = (rows + kBM - 1) / kBM;
  const int row0 = geo.m0 * R;
  // The band of this block: the first whose blocks reach past blockIdx.x.
  int64_t x = blockIdx.x;
  int y = 0;
  for (;; ++y) {
    const int last = min((y + 1) * kBand, tiles) - 1;
    const int64_t n = int64_t{kBand} * KeyTilesOf(row0 + int64_t{last} * kBM, geo.a_hi);
    if (x < n || (y + 1) * kBand >= tiles) break;
    x -= n;
  }
  const int i = y * kBand + static_cast<int>(x % kBand);
  const int j = static_cast<int>(x / kBand);
  if (i >= tiles) return;
  const int a0 = row0 + i * kBM;
  if (j >= KeyTilesOf(a0, geo.a_hi)) return;  // above the row tile's diagonal
  const int h = static_cast<int>(blockIdx.z);
  const int g_kv = h / (p.num_q_heads / p.num_kv_heads);
  const uint32_t base = (ptx::SmemAddr(smem_wg) + 1023u) & ~1023u;
  TileWg<R, kResolved>(p, geo, h, g_kv, a0, j, base, tile_rows,
            p.workspace + int64_t{h} * rows * (int64_t{geo.k_blocks} + 1));
}

// Each scored row's log-sum-exp over all its causal key groups, from the block partials
// ws[a][n] = w + log(sum of exp(z - w)) the tiles wrote (every n with n R <= a is written), to
// ws[a][k_blocks], where the row-sweep kernels' RowStatsFinish puts it. One warp per row.
template <int R>
__global__ void __launch_bounds__(kThreads) RowLseKernel(const XAttentionGpuParams p) {
  const int first = p.kv_len - p.q_len;
  const int a_lo = first / p.stride, a_hi = (p.kv_len - 1) / p.stride;
  const int m0 = first / p.block_size;
  const int q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  const int k_blocks = (p.kv_len + p.block_size - 1) / p.block_size;
  const int rows = q_blocks * R;
  const int64_t ws_stride = int64_t{k_blocks} + 1;
  const int64_t total = int64_t{p.num_q_heads} * rows;
  const int lane = threadIdx.x & 31;
  for (int64_t w = (blockIdx.x * int64_t{kThreads} + threadIdx.x) / 32; w < total;
       w += int64_t{gridDim.x} * kThreads / 32) {
    const int r = static_cast<int>(w % rows), a = m0 * R + r;
    if (a < a_lo || a > a_hi) continue;  // warp-uniform: the reference does not score the row
    float* row = p.workspace + w * ws_stride;
    float mx = -INFINITY, sum = 0.0f;
    for (int n = lane; n * R <= a; n += 32) Merge(mx, sum, row[n], 1.0f);
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, mx, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, sum, off);
      Merge(mx, sum, m2, s2);
    }
    if (lane == 0) row[k_blocks] = mx + logf(sum);
  }
}

// One sweep's second kernel: mass[h][mi][n] = sum over query block m0 + mi's rows a (those the
// reference scores, with a causal column in block n) of exp(ws[a][n] - ws[a][k_blocks]), the
// row's probabilities in the block; zero past the causal blocks. One thread per mass entry
// (consecutive threads: consecutive key blocks, so the workspace reads coalesce).
template <int R>
__global__ void __launch_bounds__(kThreads) NormalizeKernel(const XAttentionGpuParams p,
                                                            float* __restrict__ mass) {
  const int first = p.kv_len - p.q_len;
  const int a_lo = first / p.stride, a_hi = (p.kv_len - 1) / p.stride;
  const int m0 = first / p.block_size;
  const int q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  const int k_blocks = (p.kv_len + p.block_size - 1) / p.block_size;
  const int64_t ws_stride = int64_t{k_blocks} + 1;
  const int64_t total = int64_t{p.num_q_heads} * q_blocks * k_blocks;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int n = static_cast<int>(i % k_blocks);
    const int64_t hm = i / k_blocks;  // h * q_blocks + mi
    const int mi = static_cast<int>(hm % q_blocks), h = static_cast<int>(hm / q_blocks);
    const int m = m0 + mi;
    float out = 0.0f;
    if (n <= m) {
      const float* rows = p.workspace + (int64_t{h} * q_blocks * R + int64_t{mi} * R) * ws_stride;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int a = m * R + r;
        if (a < a_lo || a > a_hi || n * R > a) continue;
        out += expf(rows[r * ws_stride + n] - rows[r * ws_stride + k_blocks]);
      }
    }
    mass[i] = out;
  }
}

}  // namespace tc

template <int R, int BN, bool kOne>
cudaError_t LaunchTc(const XAttentionGpuParams& p, float* mass, int64_t blocks,
                     cudaStream_t stream) {
  SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      tc::MassKernel<R, BN, kOne>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      tc::SmemBytes<BN>()));
  tc::MassKernel<R, BN, kOne><<<static_cast<unsigned>(blocks), tc::kThreads, tc::SmemBytes<BN>(),
                                stream>>>(p, mass);
  return cudaSuccess;
}

template <int R>
cudaError_t Launch(const XAttentionGpuParams& p, float* mass, cudaStream_t stream) {
  const int64_t m0 = (p.kv_len - p.q_len) / p.block_size;
  const int64_t q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  if (p.tensor_cores) {
    const int64_t tiles = (q_blocks * R + tc::kBM - 1) / tc::kBM;
    const int64_t blocks = (tiles + 1) / 2 * p.num_q_heads;
    if (p.workspace != nullptr) {
      cudaError_t err = cudaSuccess;
      if (p.wgmma && p.independent_tiles) {
        const auto kernel = p.page_size % p.stride == 0 ? tc::MassTileKernelWg<R, true>
                                                        : tc::MassTileKernelWg<R, false>;
        SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, tc::kWgSmemBytes));
        const int64_t tile_blocks = tc::TileBlocks(m0 * R, static_cast<int>(tiles),
                                                   (p.kv_len - 1) / p.stride);
        const dim3 grid(static_cast<unsigned>(tile_blocks), 1,
                        static_cast<unsigned>(p.num_q_heads));
        kernel<<<grid, tc::kThreads, tc::kWgSmemBytes, stream>>>(p);
        SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
        const int64_t row_warps = p.num_q_heads * q_blocks * R;
        tc::RowLseKernel<R><<<static_cast<unsigned>(std::min<int64_t>(
                                  (row_warps * 32 + kThreads - 1) / kThreads, 65535)),
                              kThreads, 0, stream>>>(p);
      } else if (p.wgmma) {
        SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
            tc::MassKernelWg<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, tc::kWgSmemBytes));
        tc::MassKernelWg<R><<<static_cast<unsigned>(blocks), tc::kThreads, tc::kWgSmemBytes,
                              stream>>>(p, mass);
      } else {
        err = p.tile_keys == 128
                  ? LaunchTc<R, 128, true>(p, mass, blocks, stream)
                  : LaunchTc<R, 64, true>(p, mass, blocks, stream);
      }
      SIEVE_CUDA_RETURN_IF_ERROR(err);
      const int64_t k_blocks = (p.kv_len + p.block_size - 1) / p.block_size;
      const int64_t entries = p.num_q_heads * q_blocks * k_blocks;
      const int64_t grid = std::min<int64_t>((entries + kThreads - 1) / kThreads, 65535);
      tc::NormalizeKernel<R><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p, mass);
    } else {
      const cudaError_t err = p.tile_keys == 128
                                  ? LaunchTc<R, 128, false>(p, mass, blocks, stream)
                                  : LaunchTc<R, 64, false>(p, mass, blocks, stream);
      SIEVE_CUDA_RETURN_IF_ERROR(err);
    }
  } else {
    const dim3 grid(static_cast<unsigned>(q_blocks), p.num_q_heads);
    const int bytes = R * p.stride * p.head_dim * 2;
    SIEVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        XAttentionMassKernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    XAttentionMassKernel<R><<<grid, kThreads, bytes, stream>>>(p, mass);
  }
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace

size_t XAttentionGpuWorkspaceBytes(const XAttentionGpuParams& p) {
  if (p.stride < 1 || p.block_size < p.stride || p.q_len < 1 || p.kv_len < p.q_len) return 0;
  const int64_t m0 = (p.kv_len - p.q_len) / p.block_size;
  const int64_t q_blocks = (p.kv_len - 1) / p.block_size - m0 + 1;
  const int64_t k_blocks = (p.kv_len + p.block_size - 1) / p.block_size;
  const int64_t rows = q_blocks * (p.block_size / p.stride);
  return static_cast<size_t>(int64_t{p.num_q_heads} * rows * (k_blocks + 1)) * sizeof(float);
}

bool XAttentionGpuSupports(const XAttentionGpuParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.stride < 1 || p.block_size < p.stride || p.block_size % p.stride != 0) return false;
  const int r = p.block_size / p.stride;
  if (r != 4 && r != 8 && r != 16 && r != 32) return false;
  if (p.num_q_heads < 1 || p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0) return false;
  if (p.q_len < 1 || p.kv_len < p.q_len || p.page_size < 1) return false;
  if (p.tensor_cores) {  // any length (int32 positions)
    return (p.tile_keys == 64 || p.tile_keys == 128) && p.num_q_heads <= 65535;
  }
  if (p.wgmma) return false;  // wgmma is a tensor-core kernel
  // The CUDA-core kernel keeps a block's queries and its key-block masses in shared memory.
  return p.block_size * p.head_dim * 2 <= kMaxQueryBytes &&
         (p.kv_len + p.block_size - 1) / p.block_size <= kMaxKeyBlocks && p.num_q_heads <= 65535;
}

cudaError_t XAttentionBlockMassGpu(const XAttentionGpuParams& p, float* mass,
                                   cudaStream_t stream) {
  if (!XAttentionGpuSupports(p) || !p.q || !p.k_cache || !p.page_table || !mass) {
    return cudaErrorInvalidValue;
  }
  if (p.wgmma) {  // the one-sweep kernel only, on sm_90 (compiled for sm_90a)
    int dev = 0, major = 0;
    SIEVE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
    SIEVE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (!p.workspace || major != 9) return cudaErrorInvalidValue;
  }
  switch (p.block_size / p.stride) {
    case 4: return Launch<4>(p, mass, stream);
    case 8: return Launch<8>(p, mass, stream);
    case 16: return Launch<16>(p, mass, stream);
    default: return Launch<32>(p, mass, stream);
  }
}

}  // namespace sieve::kernels
