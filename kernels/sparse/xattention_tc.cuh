// XAttention's tensor-core building blocks, shared by the estimator's kernels in
// xattention_cuda.cu (the design is described there): the tile geometry, the cp.async slice
// copies into XOR-swizzled stages, the mma.sync slice step, the online row statistics, the two
// epilogues (sweep 2's block sums, the one sweep's log-domain partial block sums) and the
// block-mass writes; then the Hopper pieces (the warpgroup lane view, the slice pipeline and
// the wgmma slice step). Device code only; included by that one translation unit.
#ifndef SIEVE_KERNELS_SPARSE_XATTENTION_TC_CUH_
#define SIEVE_KERNELS_SPARSE_XATTENTION_TC_CUH_

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/ptx.cuh"
#include "kernels/sparse/xattention_cuda.h"

namespace sieve::kernels::xattention_tc {


inline constexpr int kBM = 128, kBK = 64, kStages = 3, kThreads = 256;
inline constexpr int kATileBytes = kBM * kBK * 2;
// Key groups per tile BN (64 or 128): the warps form a 4 x 2 grid of 32 x (BN / 2) warp tiles.
template <int BN>
constexpr int StageBytes() { return kATileBytes + BN * kBK * 2; }
template <int BN>
constexpr int SmemBytes() { return kStages * StageBytes<BN>(); }  // 72 or 96 KB

// Byte offset of 16-byte chunk c (0..7) of row r in a tile of 128-byte rows; the chunk index is
// XORed with the row so that the 8 rows an ldmatrix reads hit distinct banks.
__device__ __forceinline__ uint32_t Swz(int r, int c) {
  return static_cast<uint32_t>(r * 128 + (((c ^ r) & 7) << 4));
}

// One sequence's geometry in query/key groups (xattention.h).
struct Geo {
  int first;      // position of the first query
  int a_lo, a_hi; // query groups the reference scores
  int m0, q_blocks, k_blocks;
  float zscale;   // 1 / (sqrt(d) S)
};

__device__ __forceinline__ Geo GeoOf(const XAttentionGpuParams& p) {
  Geo geo;
  geo.first = p.kv_len - p.q_len;
  geo.a_lo = geo.first / p.stride;
  geo.a_hi = (p.kv_len - 1) / p.stride;
  geo.m0 = geo.first / p.block_size;
  geo.q_blocks = (p.kv_len - 1) / p.block_size - geo.m0 + 1;
  geo.k_blocks = (p.kv_len + p.block_size - 1) / p.block_size;
  geo.zscale = rsqrtf(static_cast<float>(p.head_dim)) / p.stride;
  return geo;
}

// Copies slice kc (columns [64 kc, 64 kc + 64) of the S * d reshaped width) of row tile a0 and
// key tile n0 into one pipeline stage. Reshaped column k = t d + e is, for query group a, query
// position a S + S - 1 - t, and for key group b, key position b S + t; channel e. Positions
// outside the chunk's queries or past kv_len copy zeros.
template <int BN>
__device__ __forceinline__ void LoadSlice(const XAttentionGpuParams& p, const Geo& geo, int h,
                                          int g_kv, int a0, int n0, int kc, uint32_t stage) {
  const int S = p.stride, d = p.head_dim;
  const int t = (kc * kBK) / d, e0 = (kc * kBK) % d;
  const int c = threadIdx.x & 7, r_base = threadIdx.x >> 3;  // 32 rows per pass
#pragma unroll
  for (int i = 0; i < kBM / 32; ++i) {
    const int r = r_base + 32 * i;
    const int pos = (a0 + r) * S + S - 1 - t;
    const bool valid = pos >= geo.first && pos < p.kv_len;
    const __nv_bfloat16* src =
        valid ? p.q + int64_t{pos - geo.first} * p.q_row_stride + int64_t{h} * d + e0 + c * 8
              : p.q;
    ptx::CpAsync16(stage + Swz(r, c), src, valid);
  }
#pragma unroll
  for (int i = 0; i < BN / 32; ++i) {
    const int r = r_base + 32 * i;
    const int pos = (n0 + r) * S + t;
    const bool valid = pos < p.kv_len;
    const __nv_bfloat16* src = p.k_cache;
    if (valid) {
      const int64_t slot = int64_t{p.page_table[pos / p.page_size]} * p.page_size +
                           pos % p.page_size;
      src = p.k_cache + (slot * p.num_kv_heads + g_kv) * d + e0 + c * 8;
    }
    ptx::CpAsync16(stage + kATileBytes + Swz(r, c), src, valid);
  }
}

// Folds (mx2, sum2) into (mx, sum).
__device__ __forceinline__ void Merge(float& mx, float& sum, float mx2, float sum2) {
  if (mx2 == -INFINITY) return;
  if (mx == -INFINITY) {
    mx = mx2;
    sum = sum2;
    return;
  }
  const float m = fmaxf(mx, mx2);
  sum = sum * expf(mx - m) + sum2 * expf(mx2 - m);
  mx = m;
}

// The per-thread view of a tile (m16n8 accumulator layout): this thread's rows are tile rows
// 32 wm + 16 mt + gq + 8 hf (query group a0 + that), its columns WN wn + 8 nt + 2 cq + e.
struct Lane {
  int lane, gq, cq, wm, wn;
  int wr;  // the warp's first tile row (mma.sync: 32 wm; wgmma: 16 per warp)
};

// acc += the slice's 64 columns of the warp tile's scores (4 k16 steps).
template <int NT>
__device__ __forceinline__ void MmaSlice(uint32_t sa, uint32_t sb, uint32_t lane_a,
                                         uint32_t lane_b, float (&acc)[2][NT][4]) {
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    uint32_t af[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      ptx::LdMatrixX4(af[mt], sa + ((lane_a + mt * 16 * 128) ^ ((2 * kk) << 4)));
    }
#pragma unroll
    for (int jn = 0; jn < NT / 2; ++jn) {
      uint32_t b[4];
      ptx::LdMatrixX4(b, sb + ((lane_b + jn * 16 * 128) ^ ((2 * kk) << 4)));
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        ptx::MmaBf16(acc[mt][2 * jn], af[mt], b[0], b[1]);
        ptx::MmaBf16(acc[mt][2 * jn + 1], af[mt], b[2], b[3]);
      }
    }
  }
}

// Sweep 1: folds the tile's scored entries of this thread's rows into their running max and sum
// of exponentials (wc0: the warp tile's first key group).
template <int NT>
__device__ __forceinline__ void RowStatsUpdate(const Geo& geo, const Lane& l, int a0, int wc0,
                                               const float (&acc)[2][NT][4], float (&mx)[2][2],
                                               float (&sm)[2][2]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int a = a0 + 32 * l.wm + 16 * mt + l.gq + 8 * hf;
      const bool row_ok = a >= geo.a_lo && a <= geo.a_hi;
      float z[2 * NT], tmax = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int b = wc0 + 8 * nt + 2 * l.cq + e;
          z[2 * nt + e] = row_ok && b <= a ? acc[mt][nt][2 * hf + e] * geo.zscale : -INFINITY;
          tmax = fmaxf(tmax, z[2 * nt + e]);
        }
      }
      if (tmax != -INFINITY) {
        const float nm = fmaxf(mx[mt][hf], tmax);
        float sum = sm[mt][hf] * expf(mx[mt][hf] - nm);
#pragma unroll
        for (int i = 0; i < 2 * NT; ++i) sum += expf(z[i] - nm);
        sm[mt][hf] = sum;
        mx[mt][hf] = nm;
      }
    }
  }
}

// End of sweep 1: merges the quad's lanes, then the two column warps, into each row's max and
// 1 / sum, and leaves this thread's rows' values in (mx, sm) for sweep 2. Block-wide barriers.
// One sweep (lse non-null): also writes each row's log-sum-exp M + log L to lse[r * lse_stride]
// for the tile's first `lse_rows` rows.
template <int MT = 2, int kColGroups = 2>
__device__ __forceinline__ void RowStatsFinish(const Lane& l, float (&mx)[MT][2], float (&sm)[MT][2],
                                               float (*st_max)[kBM], float (*st_sum)[kBM],
                                               float* row_max, float* row_inv,
                                               float* __restrict__ lse = nullptr,
                                               int64_t lse_stride = 0, int lse_rows = 0) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, mx[mt][hf], off);
        const float s2 = __shfl_xor_sync(0xffffffffu, sm[mt][hf], off);
        Merge(mx[mt][hf], sm[mt][hf], m2, s2);
      }
      if (l.cq == 0) {
        const int r = l.wr + 16 * mt + l.gq + 8 * hf;
        st_max[l.wn][r] = mx[mt][hf];
        st_sum[l.wn][r] = sm[mt][hf];
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < kBM) {
    const int r = threadIdx.x;
    float m1 = st_max[0][r], s1 = st_sum[0][r];
    if (kColGroups == 2) Merge(m1, s1, st_max[1][r], st_sum[1][r]);
    row_max[r] = m1 == -INFINITY ? 0.0f : m1;  // rows with nothing scored: inverse sum 0
    row_inv[r] = s1 > 0.0f ? 1.0f / s1 : 0.0f;
    if (lse != nullptr && r < lse_rows) lse[r * lse_stride] = m1 + logf(s1);
  }
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = l.wr + 16 * mt + l.gq + 8 * hf;
      mx[mt][hf] = row_max[r];
      sm[mt][hf] = row_inv[r];
    }
  }
}

// Sweep 2: the tile's probabilities exp(z - max) / sum summed over R x R blocks into blk. A
// lane's two columns share a block (R >= 4); the lanes of one block are combined with shuffles
// over the quad (columns) and the lane groups (rows), then the block's first lane adds into
// shared memory.
template <int R, int NT>
__device__ __forceinline__ void BlockSums(const Geo& geo, const Lane& l, int a0, int wc0,
                                          const float (&acc)[2][NT][4], const float (&mx)[2][2],
                                          const float (&inv)[2][2], float (*blk)[2 * NT * 8 / R]) {
  constexpr int WN = 8 * NT;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int a = a0 + 32 * l.wm + 16 * mt + l.gq + 8 * hf;
      const bool row_ok = a >= geo.a_lo && a <= geo.a_hi;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float v = 0.0f;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int b = wc0 + 8 * nt + 2 * l.cq + e;
          if (row_ok && b <= a) {
            v += expf(acc[mt][nt][2 * hf + e] * geo.zscale - mx[mt][hf]) * inv[mt][hf];
          }
        }
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        if (R >= 8) v += __shfl_xor_sync(0xffffffffu, v, 2);
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        if (R >= 8) v += __shfl_xor_sync(0xffffffffu, v, 16);
        const bool leader = R >= 8 ? l.lane == 0 : (l.lane & 0b01101) == 0;
        if (leader) {
          const int rb = (32 * l.wm + 16 * mt + 8 * hf + l.gq) / R;
          const int cb = (WN * l.wn + 8 * nt + 2 * l.cq) / R;
          atomicAdd(&blk[rb][cb], v);
        }
      }
    }
  }
}

// One sweep: for each of this thread's rows, the row's max w over the warp tile's columns (the
// quad's lanes hold the row's columns), each key block's partial sum of exp(z - w) stored as
// w + log(sum) to ws[(a - a_ws0) * ws_stride + n] (only blocks with a causal column, rows the
// reference scores), and (w, the thread's sum) folded into the row's running max and sum.
// acc: this thread's accumulators in the m16n8 layout, [MT][NT][4] (mma.sync's m tiles, or one
// wgmma m64 accumulator's NT n8 column groups).
template <int R, int MT, int NT>
__device__ __forceinline__ void OneSweepTile(const Geo& geo, const Lane& l, int a0, int wc0,
                                             const float (&acc)[MT * NT * 4], float (&mx)[MT][2],
                                             float (&sm)[MT][2], float* __restrict__ ws,
                                             int a_ws0, int64_t ws_stride) {
  constexpr int NV = R >= 8 ? 8 * NT / R : NT;  // block partial sums per lane
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int a = a0 + l.wr + 16 * mt + l.gq + 8 * hf;
      const bool row_ok = a >= geo.a_lo && a <= geo.a_hi;
      // In base 2 (z = logit / ln 2, exp2): one MUFU op per entry; w and the partial sums go out
      // in natural log units.
      const float zscale2 = geo.zscale * 1.44269504088896341f;
      float z[2 * NT], w = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int b = wc0 + 8 * nt + 2 * l.cq + e;
          z[2 * nt + e] =
              row_ok && b <= a ? acc[(mt * NT + nt) * 4 + 2 * hf + e] * zscale2 : -INFINITY;
          w = fmaxf(w, z[2 * nt + e]);
        }
      }
      w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, 1));
      w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, 2));
      // w == -inf (nothing scored in the warp tile): no terms, no writes; the lanes still take
      // part in the shuffles below (full-warp masks).
      const bool any = w != -INFINITY;
      float v[NV], tsum = 0.0f;
#pragma unroll
      for (int j = 0; j < NV; ++j) v[j] = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = any ? exp2f(z[2 * nt + e] - w) : 0.0f;  // 0 for masked entries
          tsum += pr;
          v[R >= 8 ? nt / (R / 8) : nt] += pr;
        }
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        v[j] += __shfl_xor_sync(0xffffffffu, v[j], 1);
        if (R >= 8) v[j] += __shfl_xor_sync(0xffffffffu, v[j], 2);
      }
      w *= 0.69314718055994531f;               // back to natural units (-inf stays)
      Merge(mx[mt][hf], sm[mt][hf], w, tsum);  // no-op when w == -inf
      const bool writer = R >= 8 ? l.cq == 0 : (l.cq & 1) == 0;
      if (!writer || !row_ok || !any) continue;
      float* row = ws + int64_t{a - a_ws0} * ws_stride;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int n = (wc0 + (R >= 8 ? j * R : 8 * j + 2 * l.cq)) / R;
        if (n * R <= a) row[n] = w + logf(v[j]);  // -inf when the block's columns are masked
      }
    }
  }
}

// The key tile's block masses (blk, then cleared) to `mass`; after the row tile's last key tile
// (`last`), zeros for the key blocks past it. The caller synchronizes before and after.
template <int R, int BN>
__device__ __forceinline__ void WriteTile(const Geo& geo, int h, int a0, int n0, bool last,
                                          float* __restrict__ mass, float (*blk)[BN / R]) {
  const int qb0 = a0 / R - geo.m0;  // the tile's first query block, relative to m0
  float* rows = mass + int64_t{h} * geo.q_blocks * geo.k_blocks;
  for (int i = threadIdx.x; i < (kBM / R) * (BN / R); i += kThreads) {
    const int rb = i / (BN / R), cb = i % (BN / R);
    const int mi = qb0 + rb, n = n0 / R + cb;
    if (mi < geo.q_blocks && n < geo.k_blocks) rows[int64_t{mi} * geo.k_blocks + n] = blk[rb][cb];
    blk[rb][cb] = 0.0f;
  }
  if (!last) return;
  const int n_done = (n0 + BN) / R, width = geo.k_blocks - n_done;
  if (width <= 0) return;
  for (int i = threadIdx.x; i < (kBM / R) * width; i += kThreads) {
    const int mi = qb0 + i / width, n = n_done + i % width;
    if (mi < geo.q_blocks) rows[int64_t{mi} * geo.k_blocks + n] = 0.0f;
  }
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SIEVE_XATTN_HAVE_WGMMA 1
#else
#define SIEVE_XATTN_HAVE_WGMMA 0
#endif

inline constexpr int kWgBN = 128;
inline constexpr int kWgSmemBytes = SmemBytes<kWgBN>() + 1024;  // + slack to align the stages

// The thread's view of a warpgroup's m64 accumulator, in the m16n8 layout per 16-row warp: warp
// w of warpgroup g holds the tile's rows 64 g + 16 w .. + 15.
__device__ __forceinline__ Lane WgLane() {
  Lane l;
  l.lane = threadIdx.x & 31;
  l.gq = l.lane >> 2;
  l.cq = l.lane & 3;
  l.wm = 0;
  l.wn = 0;
  l.wr = 16 * (threadIdx.x >> 5);
  return l;
}

// The slices [0, total) of a block's sweep through the kStages stages at smem, kStages - 1
// copies ahead: load(s, stage) copies slice s (LoadSlice); mma(s, stage) runs once every
// thread's copies of slice s have landed and every warpgroup's wgmmas of slice s - 1 are done.
// mma may leave its wgmmas in flight (WgSliceMma<false>): they then run while the threads wait
// for the next slice's copies, and are waited for just before the barrier that frees their
// stage for the copy engine, and at the end. The copies are drained at the end.
template <typename Load, typename Mma>
__device__ __forceinline__ void WgSlices(int total, uint32_t smem, const Load& load, const Mma& mma) {
  const auto stage = [&](int s) { return smem + (s % kStages) * StageBytes<kWgBN>(); };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load(s, stage(s));
    ptx::CpAsyncCommit();
  }
  for (int s = 0; s < total; ++s) {
    ptx::CpAsyncWait<kStages - 2>();
    ptx::FenceProxyAsync();  // this thread's copies of slice s, visible to the async proxy
    ptx::WgmmaWait<0>();     // this warpgroup's wgmmas of slice s - 1 (if left in flight)
    __syncthreads();         // slice s landed for every thread; slice s - 1's wgmmas are done
    ptx::FenceProxyAsync();  // (again on the reading side; and the wgmma reads before new copies)
    if (s + kStages - 1 < total) load(s + kStages - 1, stage(s + kStages - 1));
    ptx::CpAsyncCommit();
    mma(s, stage(s));
  }
  ptx::WgmmaWait<0>();
  ptx::CpAsyncWaitAll();
  __syncthreads();
}

// acc += (first: =) the 64-column slice at stage sa: warpgroup wg's 64 query-group rows (A)
// against the stage's 128 key groups (B), 4 m64n128k16 wgmmas (32 bytes per k16 step inside the
// atom), waited for (kWait), or left in flight for WgSlices to wait for (then acc must not be
// read before WgSlices returns, and FenceRegs(acc) comes first).
template <bool kWait = true, int NA>
__device__ __forceinline__ void WgSliceMma(float (&acc)[NA], uint32_t sa, int wg, bool first) {
  const uint32_t a_lo = ptx::Sw128DescLo(sa + wg * 64 * 128, 16);
  const uint32_t b_lo = ptx::Sw128DescLo(sa + kATileBytes, 16);
  ptx::FenceRegs(acc);
  ptx::WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    ptx::WgmmaSS_N128(acc, a_lo + 2 * kk, b_lo + 2 * kk, first && kk == 0 ? 0u : 1u);
  }
  ptx::WgmmaCommit();
  if constexpr (kWait) ptx::WgmmaWait<0>();
  ptx::FenceRegs(acc);
}

}  // namespace sieve::kernels::xattention_tc

#endif  // SIEVE_KERNELS_SPARSE_XATTENTION_TC_CUH_
