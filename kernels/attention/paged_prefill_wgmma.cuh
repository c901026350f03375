// The Hopper paged prefill kernel (internal to paged_prefill.cu; sm_90a only): warp-specialized,
// wgmma with fp32 accumulators, K/V tiles of 128 keys copied from the pages by a producer
// warpgroup with 16-byte cp.async into 128-byte-swizzled shared memory.
//
// Block: 3 warpgroups and 128 query rows of one (sequence, query head).
//   warpgroup 0 (producer, 40 registers): for each K/V tile, waits until the stage is free,
//     copies K then V (keys past kv_len zero-filled) and arms the stage's full barriers with
//     cp.async.mbarrier.arrive, so the copies complete the barrier without the producer waiting.
//   warpgroups 1, 2 (consumers, 232 registers): each owns 64 query rows, loads them once, then
//     per tile: S = Q K^T (8 wgmma m64n128k16, both operands in shared memory), mask, online
//     softmax in registers, P to bf16 in the A-register layout, O += P V (wgmma with A from
//     registers and V read N-major through the transpose bit), then frees the stage.
// Block-sparse (PrefillArgs' BSR index with 128-query rows, key blocks of whole 128-key tiles):
// the same producer, consumers and schedule over the listed key blocks' tiles instead of every
// tile up to the diagonal (WgSweep); each listed tile is computed by both consumer groups, the
// causal mask applying to any tile that reaches past a row, so the list may be in any order.
// Shared memory is 128-byte swizzled (16-byte unit u of row r at u ^ (r % 8)), the layout the
// wgmma descriptors name, in atoms of 64 bf16 columns; a row of d 128 spans two atoms.
#ifndef SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_WGMMA_CUH_
#define SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_WGMMA_CUH_

#include "kernels/attention/paged_prefill_device.cuh"

namespace sieve::kernels::prefill_detail {

// K/V stages at head dim 128 (3 fit in the 227 KiB a block may have next to 32 KiB of Q).
#ifndef SIEVE_PREFILL_STAGES_D128
#define SIEVE_PREFILL_STAGES_D128 3
#endif

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SIEVE_PREFILL_HAVE_WGMMA 1
#else
#define SIEVE_PREFILL_HAVE_WGMMA 0
#endif

template <int D>
struct WgCfg {
  static constexpr int kBlockM = 128;                  // query rows per block, 64 per consumer
  static constexpr int kBlockN = 128;                  // keys per K/V tile
  static constexpr int kThreads = 384;
  static constexpr int kStages = D == 128 ? SIEVE_PREFILL_STAGES_D128 : 4;  // K/V tiles in flight
  static constexpr int kAtoms = D / 64;                // 128-byte swizzle atoms per row
  static constexpr int kQBytes = 64 * D * 2;           // one consumer's Q rows
  static constexpr int kKvBytes = kBlockN * D * 2;     // one K or V stage
  static constexpr int kKOff = 2 * kQBytes;
  static constexpr int kVOff = kKOff + kStages * kKvBytes;
  static constexpr int kBarOff = kVOff + kStages * kKvBytes;
  static constexpr int kSmemBytes = kBarOff + 4 * kStages * 8 + 1024;  // + alignment slack
  static_assert(kSmemBytes <= 232448, "more shared memory than a Hopper block may have");
};

// Byte offset of 16-byte chunk c (0 .. D/8 - 1) of row r in a 128-byte-swizzled tile of `rows`
// rows: atom c / 8 holds columns [64 (c / 8), 64 (c / 8) + 64) of every row.
__device__ __forceinline__ uint32_t Sw128Offset(int rows, int r, int c) {
  return static_cast<uint32_t>((c >> 3) * (rows * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// The query tile t of a block (counted from the sequence's last tile) and its KV sweep.
struct TileSpan {
  int m0;          // first query row of the tile within the sequence
  int rows_valid;  // query rows of the tile inside the sequence
  int n_tiles;     // K/V tiles from key 0 through the last valid row's position
};
__device__ __forceinline__ TileSpan SpanOf(const SeqInfo& si, int t, int block_m, int block_n) {
  TileSpan sp;
  sp.m0 = (si.m_tiles - 1 - t) * block_m;
  sp.rows_valid = min(block_m, si.q_len - sp.m0);
  sp.n_tiles = (si.q_off + sp.m0 + sp.rows_valid - 1) / block_n + 1;
  return sp;
}

// The K/V tiles one query tile sweeps: dense, tiles 0 .. span.n_tiles - 1 (key 0 through the
// tile's last row); block-sparse, the tiles of the key blocks its BSR row lists, in list order.
struct WgSweep {
  const int32_t* key_blocks;  // null: dense
  int tiles_per_block;
  int n_tiles;
  // First key of tile j (block_n keys a tile).
  __device__ __forceinline__ int Start(int j, int block_n) const {
    if (key_blocks == nullptr) return j * block_n;
    return key_blocks[j / tiles_per_block] * (tiles_per_block * block_n) +
           (j % tiles_per_block) * block_n;
  }
};
__device__ __forceinline__ WgSweep SweepOf(const PrefillArgs& a, const SeqInfo& si,
                                           const TileSpan& sp, int h, int block_m) {
  WgSweep w{nullptr, 1, sp.n_tiles};
  if (a.bsr_row_start != nullptr) {
    const int64_t row =
        (static_cast<int64_t>(a.bsr_qblock_start[si.seq]) + sp.m0 / block_m) * a.num_q_heads + h;
    const int b0 = a.bsr_row_start[row];
    w.key_blocks = a.bsr_key_blocks + b0;
    w.tiles_per_block = a.bsr_tiles_per_block;
    w.n_tiles = (a.bsr_row_start[row + 1] - b0) * a.bsr_tiles_per_block;
  }
  return w;
}

// Barriers of the K/V ring, per stage: K full and V full (count 128: one cp.async arrival per
// producer thread) and K empty and V empty (count 256: every consumer thread). K and V are
// released separately: K as soon as S has landed, V after P V, so the producer refills K a
// softmax earlier.
template <int D>
struct WgBarriers {
  uint32_t base;
  __device__ __forceinline__ uint32_t At(int kind, int st) const {
    return base + WgCfg<D>::kBarOff + 8 * (kind * WgCfg<D>::kStages + st);
  }
  __device__ __forceinline__ uint32_t KFull(int st) const { return At(0, st); }
  __device__ __forceinline__ uint32_t VFull(int st) const { return At(1, st); }
  __device__ __forceinline__ uint32_t KEmpty(int st) const { return At(2, st); }
  __device__ __forceinline__ uint32_t VEmpty(int st) const { return At(3, st); }
};

// Producer warpgroup: streams the K and V tiles of every query tile of the block, in the order
// the consumers use them. Thread t copies 16-byte unit t % 8 of each atom of rows t / 8 + 16 i,
// so a warp writes 4 whole 128-byte rows per instruction.
template <int D>
__device__ __forceinline__ void WgProducer(const PrefillArgs& a, const SeqInfo& si,
                                           const int32_t* pages, int h, uint32_t sbase) {
  using C = WgCfg<D>;
  const WgBarriers<D> bars{sbase};
  const int tid = threadIdx.x, u = tid % 8, r_lo = tid / 8;
  const int kv_head = h / a.group;
  uint32_t it = 0;
  for (int t = blockIdx.x; t < si.m_tiles; t += gridDim.x) {
    const WgSweep w = SweepOf(a, si, SpanOf(si, t, C::kBlockM, C::kBlockN), h, C::kBlockM);
    for (int j = 0; j < w.n_tiles; ++j, ++it) {
      const int st = it % C::kStages;
      const uint32_t empty_parity = ((it / C::kStages) + 1) & 1;  // the stage's previous use
      const int n0 = w.Start(j, C::kBlockN);
#pragma unroll 1
      for (int which = 0; which < 2; ++which) {
        if (it >= C::kStages) MbarWait(which ? bars.VEmpty(st) : bars.KEmpty(st), empty_parity);
        const bf16* cache = which ? a.v_cache : a.k_cache;
        const uint32_t dst = sbase + (which ? C::kVOff : C::kKOff) + st * C::kKvBytes;
#pragma unroll 4
        for (int i = 0; i < C::kBlockN / 16; ++i) {
          const int r = r_lo + 16 * i;
          const int token = n0 + r;
          const bool valid = token < si.kv_len;
          const bf16* src = valid ? cache + KvRowOffset<D>(a, pages, token, kv_head) + u * 8 : cache;
#pragma unroll
          for (int at = 0; at < C::kAtoms; ++at) {
            CpAsync16(dst + Sw128Offset(C::kBlockN, r, at * 8 + u), src + (valid ? at * 64 : 0),
                      valid);
          }
        }
        MbarArriveOnCpAsync(which ? bars.VFull(st) : bars.KFull(st));
      }
    }
  }
  CpAsyncWaitAll();
}

// Online softmax of one consumer thread's share of a 64 x 128 tile of raw scores Q K^T: value
// 4 nb + e sits in row pos0 if e < 2 else pos1, at key n0 + 8 nb + 2 (lane % 4) + e % 2. Keys
// past a row's position are masked (only tiles crossing the diagonal need it). m is kept in the
// exp2 domain (scaled by scale_log2 > 0, so the max of raw scores scales with it), and the scale
// is folded into the exponent's FFMA. Updates m and l, leaves the probabilities in s and returns
// in alpha the factor by which the output so far must be rescaled (applied by WgRescale).
__device__ __forceinline__ void WgSoftmax(float (&s)[64], float scale_log2, bool mask, int n0,
                                          int pos0, int pos1, float (&m)[2], float (&l)[2],
                                          float (&alpha)[2]) {
  if (mask) {
    const int c0 = n0 + 2 * (threadIdx.x % 4);
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (c0 + (i / 4) * 8 + (i & 1) > ((i & 2) ? pos1 : pos0)) s[i] = -INFINITY;
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < 16; ++nb) {
      mx = fmaxf(mx, fmaxf(s[4 * nb + 2 * half], s[4 * nb + 2 * half + 1]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[half], mx * scale_log2);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen no key yet
    alpha[half] = FastExp2(m[half] - m_use);
    m[half] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int nb = 0; nb < 16; ++nb) {
      const int i = 4 * nb + 2 * half;
      s[i] = FastExp2(fmaf(s[i], scale_log2, -m_use));
      s[i + 1] = FastExp2(fmaf(s[i + 1], scale_log2, -m_use));
      sum += s[i] + s[i + 1];
    }
    l[half] = l[half] * alpha[half] + sum;
  }
}

// o *= alpha row by row (o value 4 nb + e belongs to row half e / 2). Skipped when no row of the
// warp saw its maximum grow (alpha == 1 exactly), as on most tiles once the running maxima have
// settled: the result is bit-identical and 64 multiplies per thread are saved.
template <int D>
__device__ __forceinline__ void WgRescale(float (&o)[D / 2], const float (&alpha)[2]) {
  if (__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) return;
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    o[4 * nb] *= alpha[0];
    o[4 * nb + 1] *= alpha[0];
    o[4 * nb + 2] *= alpha[1];
    o[4 * nb + 3] *= alpha[1];
  }
}

// P (bf16) in the wgmma A-register layout: k-step kk takes score columns [16 kk, 16 kk + 16),
// which are accumulator values 8 kk .. 8 kk + 7 in the same rows.
__device__ __forceinline__ void WgPackP(const float (&s)[64], uint32_t (&p)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
    for (int q = 0; q < 4; ++q) p[kk][q] = PackBf16(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
  }
}

// Issues S (64 x 128) = Q (64 x D, at sq) K^T (K tile at kt) and commits it as one wgmma group.
template <int D>
__device__ __forceinline__ void WgIssueS(float (&s)[64], uint32_t sq, uint32_t kt) {
  WgmmaFence();
  // Descriptor low words step by offset / 16 (shared addresses stay below 256 KiB: no carry).
  const uint32_t q_lo = Sw128DescLo(sq, 16), k_lo = Sw128DescLo(kt, 16);
  WgmmaSS_N128_Overwrite(s, q_lo, k_lo);
#pragma unroll
  for (int kk = 1; kk < D / 16; ++kk) {
    const uint32_t koff = (kk / 4) * (WgCfg<D>::kBlockN * 128) + (kk % 4) * 32;
    const uint32_t qoff = (kk / 4) * (64 * 128) + (kk % 4) * 32;
    WgmmaSS_N128(s, q_lo + (qoff >> 4), k_lo + (koff >> 4), 1u);
  }
  WgmmaCommit();
}

// Issues O (64 x D) += P (64 x 128, registers) V (128 x D, tile at vt, read N-major) and commits
// it as one wgmma group.
template <int D>
__device__ __forceinline__ void WgIssuePv(float (&o)[D / 2], uint32_t (&p)[8][4], uint32_t vt) {
  FenceRegs(o);
  WgmmaFence();
  const uint32_t v_lo = Sw128DescLo(vt, WgCfg<D>::kBlockN * 128);
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint32_t desc = v_lo + ((kk * 16 * 128) >> 4);
    if constexpr (D == 128) {
      WgmmaRS_N128(o, p[kk], desc);
    } else {
      WgmmaRS_N64(o, p[kk], desc);
    }
  }
  WgmmaCommit();
}

// Writes one consumer's 64 normalized output rows: staged through its Q buffer (each warp its own
// 16 rows, same swizzle), then 16-byte stores of the rows inside the sequence.
template <int D>
__device__ __forceinline__ void WgStoreOutput(const PrefillArgs& a, const SeqInfo& si, int h,
                                              int row0, int rows, const float (&o)[D / 2],
                                              const float (&l)[2], uint8_t* stage) {
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = l[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  FenceProxyAsync();  // the wgmma reads of this buffer are complete; order our writes after them
  const int r0 = 16 * warp + lane / 4;
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    *reinterpret_cast<uint32_t*>(stage + Sw128Offset(64, r0, nb) + 4 * (lane % 4)) =
        PackBf16(o[4 * nb] * inv[0], o[4 * nb + 1] * inv[0]);
    *reinterpret_cast<uint32_t*>(stage + Sw128Offset(64, r0 + 8, nb) + 4 * (lane % 4)) =
        PackBf16(o[4 * nb + 2] * inv[1], o[4 * nb + 3] * inv[1]);
  }
  __syncwarp();
  const int64_t stride = static_cast<int64_t>(a.num_q_heads) * D;
  bf16* out0 = a.out + (static_cast<int64_t>(si.q_begin + row0) * a.num_q_heads + h) * D;
#pragma unroll
  for (int i = 0; i < 16 * (D / 8) / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = 16 * warp + idx / (D / 8), c = idx % (D / 8);
    if (r < rows) {
      *reinterpret_cast<uint4*>(out0 + r * stride + c * 8) =
          *reinterpret_cast<const uint4*>(stage + Sw128Offset(64, r, c));
    }
  }
}

// Where one consumer warpgroup stands in a query tile.
struct WgRows {
  int row0;     // first query row of the group within the sequence
  int rows;     // rows of the group inside the sequence (0..64)
  int min_pos;  // position of the group's first row
  int max_pos;  // position of its last valid row, -1 if none: tiles past it are skipped
  int pos0;     // positions of this thread's two accumulator rows
  int pos1;
};

// Loads the group's 64 Q rows (zero past the sequence) into its swizzled buffer; the buffer's
// previous use (the last tile's output staging) is finished by every warp of the group first.
template <int D>
__device__ __forceinline__ void WgLoadQ(const PrefillArgs& a, const SeqInfo& si, int h,
                                        const WgRows& g, uint32_t sq, int wg) {
  const int tid = threadIdx.x % 128;
  const int64_t q_stride = static_cast<int64_t>(a.num_q_heads) * D;
  NamedBarrierSync(1 + wg, 128);
  const bf16* q0 = a.q + (static_cast<int64_t>(si.q_begin + g.row0) * a.num_q_heads + h) * D;
#pragma unroll
  for (int i = 0; i < 64 * (D / 8) / 128; ++i) {
    const int idx = tid + 128 * i, r = idx / (D / 8), c = idx % (D / 8);
    const bool valid = r < g.rows;
    CpAsync16(sq + Sw128Offset(64, r, c), valid ? q0 + r * q_stride + c * 8 : q0, valid);
  }
  CpAsyncCommit();
  CpAsyncWait<0>();
  FenceProxyAsync();
  NamedBarrierSync(1 + wg, 128);
}

// One query tile, plain order: per K/V tile, S, softmax, then P V, each waited for at once.
template <int D>
__device__ __forceinline__ void WgTilePlain(const PrefillArgs& a, const WgRows& g, const WgSweep& w,
                                            uint32_t sq, uint32_t sbase, uint32_t& it,
                                            float (&o)[D / 2], float (&m)[2], float (&l)[2]) {
  using C = WgCfg<D>;
  const WgBarriers<D> bars{sbase};
  float s[64];
  uint32_t p[8][4];
  for (int j = 0; j < w.n_tiles; ++j, ++it) {
    const int st = it % C::kStages;
    const uint32_t parity = (it / C::kStages) & 1;
    const int n0 = w.Start(j, C::kBlockN);
    const bool active = n0 <= g.max_pos;  // some row of this group sees a key of the tile
    MbarWait(bars.KFull(st), parity);
    if (active) {
      FenceProxyAsync();
      WgIssueS<D>(s, sq, sbase + C::kKOff + st * C::kKvBytes);
      WgmmaWait<0>();
      FenceRegs(s);
    }
    MbarArrive(bars.KEmpty(st));
    if (active) {
      float alpha[2];
      WgSoftmax(s, a.scale_log2, n0 + C::kBlockN - 1 > g.min_pos, n0, g.pos0, g.pos1, m, l, alpha);
      WgRescale<D>(o, alpha);
      WgPackP(s, p);
    }
    MbarWait(bars.VFull(st), parity);
    if (active) {
      FenceProxyAsync();
      WgIssuePv<D>(o, p, sbase + C::kVOff + st * C::kKvBytes);
      WgmmaWait<0>();
      FenceRegs(o);
      FenceRegs(p);
    }
    MbarArrive(bars.VEmpty(st));
  }
}

// Ping-pong between the two consumer warpgroups (FlashAttention-3's inter-warpgroup schedule):
// a group issues its wgmmas only while it holds the token, and passes the token on right after
// issuing, so one group's wgmmas run on the tensor cores while the other group does its softmax.
// Named barriers 3 + wg (256 threads: the waiting group syncs, the other group arrives).
template <bool kPingPong>
__device__ __forceinline__ void TakeToken(int wg) {
  if constexpr (kPingPong) NamedBarrierSync(3 + wg, 256);
}
template <bool kPingPong>
__device__ __forceinline__ void PassToken(int wg) {
  if constexpr (kPingPong) NamedBarrierArrive(3 + (wg ^ 1), 256);
}

// One query tile, overlapped (FlashAttention-3's intra-warpgroup pipelining): S of tile j is
// issued before P V of tile j - 1, so the softmax of tile j runs while the tensor cores do that
// P V; O is rescaled once the P V has landed. The loop body has no branch around a wgmma (ptxas
// would serialize them), so the group's active tiles [0, n_active) run first and the tiles past
// its last row are only consumed (block-sparse: every listed tile is computed, masked where it
// reaches past a row). With kPingPong every group spends exactly n_tiles + 1 token turns per
// query tile, active or not, so the two groups never wait for a turn that will not come.
template <int D, bool kPingPong>
__device__ __forceinline__ void WgTileOverlap(const PrefillArgs& a, const WgRows& g, const WgSweep& w,
                                              uint32_t sq, uint32_t sbase, uint32_t& it, int wg,
                                              float (&o)[D / 2], float (&m)[2], float (&l)[2]) {
  using C = WgCfg<D>;
  constexpr int S = C::kStages;
  const WgBarriers<D> bars{sbase};
  const int n_tiles = w.n_tiles;
  const int n_active = g.max_pos < 0              ? 0
                       : w.key_blocks != nullptr ? n_tiles
                                                 : min(n_tiles, g.max_pos / C::kBlockN + 1);
  float s[64];
  uint32_t p[8][4];
  float alpha[2];
  if (n_active > 0) {
    MbarWait(bars.KFull(it % S), (it / S) & 1);
    FenceProxyAsync();
    TakeToken<kPingPong>(wg);
    WgIssueS<D>(s, sq, sbase + C::kKOff + (it % S) * C::kKvBytes);
    PassToken<kPingPong>(wg);
    WgmmaWait<0>();
    FenceRegs(s);
    MbarArrive(bars.KEmpty(it % S));
    const int first = w.Start(0, C::kBlockN);
    WgSoftmax(s, a.scale_log2, first + C::kBlockN - 1 > g.min_pos, first, g.pos0, g.pos1, m, l,
              alpha);
    WgPackP(s, p);  // o is still zero: nothing to rescale
    for (int j = 1; j < n_active; ++j) {
      const uint32_t cur = it + j, prv = cur - 1;
      MbarWait(bars.KFull(cur % S), (cur / S) & 1);
      MbarWait(bars.VFull(prv % S), (prv / S) & 1);
      FenceProxyAsync();
      TakeToken<kPingPong>(wg);
      WgIssueS<D>(s, sq, sbase + C::kKOff + (cur % S) * C::kKvBytes);
      WgIssuePv<D>(o, p, sbase + C::kVOff + (prv % S) * C::kKvBytes);
      PassToken<kPingPong>(wg);
      WgmmaWait<1>();  // S of tile j has landed; P V of tile j - 1 may still run
      FenceRegs(s);
      MbarArrive(bars.KEmpty(cur % S));
      const int n0 = w.Start(j, C::kBlockN);
      WgSoftmax(s, a.scale_log2, n0 + C::kBlockN - 1 > g.min_pos, n0, g.pos0, g.pos1, m, l,
                alpha);
      WgmmaWait<0>();  // ptxas schedules this wait early (see PREFILL_NOTES.md)
      FenceRegs(o);
      FenceRegs(p);
      MbarArrive(bars.VEmpty(prv % S));
      WgRescale<D>(o, alpha);
      WgPackP(s, p);
    }
    const uint32_t last = it + n_active - 1;
    MbarWait(bars.VFull(last % S), (last / S) & 1);
    FenceProxyAsync();
    TakeToken<kPingPong>(wg);
    WgIssuePv<D>(o, p, sbase + C::kVOff + (last % S) * C::kKvBytes);
    PassToken<kPingPong>(wg);
    WgmmaWait<0>();
    FenceRegs(o);
    FenceRegs(p);
    MbarArrive(bars.VEmpty(last % S));
  } else {
    TakeToken<kPingPong>(wg);  // the turn an active group spends on its last P V
    PassToken<kPingPong>(wg);
  }
  // Tiles wholly above this group's rows: wait until they are full (so that this group's release
  // cannot count toward the stage's previous use) and release them.
  for (int j = n_active; j < n_tiles; ++j) {
    const uint32_t cur = it + j;
    MbarWait(bars.KFull(cur % S), (cur / S) & 1);
    MbarArrive(bars.KEmpty(cur % S));
    MbarWait(bars.VFull(cur % S), (cur / S) & 1);
    MbarArrive(bars.VEmpty(cur % S));
    TakeToken<kPingPong>(wg);
    PassToken<kPingPong>(wg);
  }
  it += n_tiles;
}

// Consumer warpgroup wg (0 or 1): query rows [64 wg, 64 wg + 64) of each of the block's tiles.
// kSchedule: 0 plain, 1 overlapped, 2 overlapped with ping-pong between the groups.
template <int D, int kSchedule>
__device__ __forceinline__ void WgConsumer(const PrefillArgs& a, const SeqInfo& si, int h,
                                           uint8_t* base, uint32_t sbase, int wg) {
  using C = WgCfg<D>;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const uint32_t sq = sbase + wg * C::kQBytes;
  uint32_t it = 0;
  if (kSchedule == 2 && wg == 1) PassToken<true>(wg);  // group 0 issues first
  for (int t = blockIdx.x; t < si.m_tiles; t += gridDim.x) {
    const TileSpan sp = SpanOf(si, t, C::kBlockM, C::kBlockN);
    WgRows g;
    g.row0 = sp.m0 + 64 * wg;
    g.rows = max(0, min(64, sp.rows_valid - 64 * wg));
    g.min_pos = si.q_off + g.row0;
    g.max_pos = g.rows > 0 ? g.min_pos + g.rows - 1 : -1;
    g.pos0 = g.min_pos + 16 * warp + lane / 4;
    g.pos1 = g.pos0 + 8;
    const WgSweep w = SweepOf(a, si, sp, h, C::kBlockM);
    WgLoadQ<D>(a, si, h, g, sq, wg);
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    if constexpr (kSchedule == 0) {
      WgTilePlain<D>(a, g, w, sq, sbase, it, o, m, l);
    } else {
      WgTileOverlap<D, kSchedule == 2>(a, g, w, sq, sbase, it, wg, o, m, l);
    }
    WgStoreOutput<D>(a, si, h, g.row0, g.rows, o, l, base + wg * C::kQBytes);
  }
  if (kSchedule == 2 && wg == 0) TakeToken<true>(wg);  // group 1's last pass: leave none pending
}

// Grid: (query-tile slots, query heads, sequences); 384 threads; WgCfg<D>::kSmemBytes of dynamic
// shared memory. Block x takes tiles x, x + gridDim.x, ... of its sequence, longest sweep first.
template <int D, int kSchedule>
__global__ void __launch_bounds__(384, 1) PrefillWgmmaKernel(const __grid_constant__ PrefillArgs a) {
#if SIEVE_PREFILL_HAVE_WGMMA
  using C = WgCfg<D>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  uint8_t* base = smem_raw + pad;
  const uint32_t sbase = raw + pad;
  const int s = blockIdx.z, h = blockIdx.y;
  const SeqInfo si = LoadSeqInfo(a, s, C::kBlockM);
  if (static_cast<int>(blockIdx.x) >= si.m_tiles) return;
  if (threadIdx.x == 0) {
    const WgBarriers<D> bars{sbase};
    for (int st = 0; st < C::kStages; ++st) {
      MbarInit(bars.KFull(st), 128);
      MbarInit(bars.VFull(st), 128);
      MbarInit(bars.KEmpty(st), 256);
      MbarInit(bars.VEmpty(st), 256);
    }
  }
  __syncthreads();
  const int32_t* pages = a.page_table + static_cast<int64_t>(s) * a.page_table_stride;
  // The warpgroup index through a shuffle from lane 0: ptxas then knows it is warp-uniform, so
  // the addresses and wgmma descriptors derived from it live in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  if (wg == 0) {
    SetMaxNRegDec<40>();
    WgProducer<D>(a, si, pages, h, sbase);
  } else {
    SetMaxNRegInc<232>();
    WgConsumer<D, kSchedule>(a, si, h, base, sbase, wg - 1);
  }
#endif
}

}  // namespace sieve::kernels::prefill_detail

#endif  // SIEVE_KERNELS_ATTENTION_PAGED_PREFILL_WGMMA_CUH_
