// Device code of the sampling kernels (internal to sampling.cu; contract and method in sampling.h):
// the constants, the block's shared scratch and the multi-block workspace layout, what a block
// knows of its row, reductions and scans over the block, the histogram bins, the row barrier and
// the exchange of per-block partial results, the radix select and the ranking of its ties.
#ifndef SIEVE_KERNELS_CUDA_SAMPLING_DEVICE_CUH_
#define SIEVE_KERNELS_CUDA_SAMPLING_DEVICE_CUH_

#include <cuda/atomic>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/sampling.h"

namespace sieve::kernels::sampling_detail {

using u64 = unsigned long long;

constexpr int kThreads = kSampleThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;    // one radix digit of 8 bits
constexpr int kMaxVals = 4;   // scalars one exchange combines
constexpr long long kNone = LLONG_MAX;
constexpr size_t kBarrierStride = 128;  // bytes per row's barrier words (own cache line)

// The block's shared scratch.
struct Shared {
  unsigned int count[2][kBins];  // histograms: [0] the count selects, [1] the top-p select
  unsigned int mass_lo[kBins];   // the block's fixed-point mass of [1], as two 32-bit halves
  unsigned int mass_hi[kBins];
  u64 mass[kBins];               // the row's mass of [1] after an exchange
  unsigned int count0[kBins];    // pass 0 of the count selects (finite tokens), kept for both
  u64 val[kMaxVals];             // an exchange's scalars: the block's in, the row's out
  u64 pre[kMaxVals];             // an exchange's sums over the row's earlier blocks
  u64 red_u[kWarps];
  long long red_l[kWarps];
  u64 scan_c[kBins / 32];        // ChooseBin's warp totals
  u64 scan_m[kBins / 32];
  int chosen_t;                  // ChooseBin: the lowest thread whose bin qualifies
  u64 sel_above;
  u64 sel_n_above;
  u64 sel_n_equal;
  long long tie_prefix;
  int top_count;                 // the one-block kernel's top list
  int32_t top_ids[kSampleMaxTop];
  float top_vals[kSampleMaxTop];
};

// The multi-block workspace of one row (after the barrier words of all rows): three histogram
// slots used in turn by successive exchanges, the top list, then (sized by the blocks per row)
// three slots of per-block scalars and three of per-block histograms of the last radix pass.
struct HistSlot {
  unsigned int count[2][kBins];
  u64 mass[kBins];
};
struct RowWork {
  HistSlot hist[3];
  int top_count;
  int32_t top_ids[kSampleMaxTop];
  float top_vals[kSampleMaxTop];
};
constexpr size_t kPerBlockBytes = 3 * kMaxVals * sizeof(u64) + 3 * kBins * sizeof(unsigned int);

inline size_t Align256(size_t n) { return (n + 255) / 256 * 256; }
inline size_t RowBytes(int blocks) { return Align256(sizeof(RowWork) + blocks * kPerBlockBytes); }

// Where a multi-block launch finds its row's workspace.
struct MultiLayout {
  unsigned int* barriers;  // per row: [0] arrived, [1] generation, kBarrierStride apart
  char* rows;              // per row: RowBytes(blocks) bytes
  size_t row_bytes;
  int blocks;              // per row
};

// What one block knows of its row.
struct Row {
  int g = 0;              // this block's index within the row
  int blocks = 1;         // blocks of the row
  int64_t begin = 0;      // the block's ids: [begin, end)
  int64_t end = 0;
  unsigned int* bar = nullptr;  // multi: the row's barrier words
  RowWork* work = nullptr;      // multi: the row's workspace
  u64* parts = nullptr;         // multi: [3][blocks][kMaxVals]
  unsigned int* bins = nullptr; // multi: [3][blocks][kBins]
  int exchanges = 0;            // multi: exchanges so far (picks the slot)
  long long tie_prefix = 0;     // ties of the last select's key in earlier blocks
};

// -0 compares equal to +0, as on the host: give both the key of +0.
__device__ __forceinline__ float Canonical(float x) { return x == 0.0f ? 0.0f : x; }

// The order-preserving integer image of a (non-NaN) float: a > b as floats iff key(a) > key(b).
__device__ __forceinline__ uint32_t OrderKey(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float KeyToFloat(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The contiguous ids a thread owns within its block's range; `steps`, the same for all threads of
// the block, bounds them, for loops whose every step all lanes of a warp take together.
struct Range {
  int64_t begin;
  int64_t end;
  int64_t steps;
};

__device__ __forceinline__ Range MyRange(const Row& rw) {
  const int64_t n = rw.end - rw.begin;
  const int64_t chunk = (n + kThreads - 1) / kThreads;
  const int64_t begin = rw.begin + min(static_cast<int64_t>(threadIdx.x) * chunk, n);
  return {begin, min(begin + chunk, rw.end), chunk};
}

// Fixed-point units per unit of q for a vocabulary: 2^(63 - ceil(log2 vocab)).
__device__ inline double MassScale(int64_t vocab) {
  int bits = 0;
  while ((int64_t{1} << bits) < vocab) ++bits;
  return ldexp(1.0, 63 - bits);
}

// Reduces `v` over the block with `op`; every thread gets the result (the same order for all).
template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* red) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // earlier readers of `red` are done
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = red[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, red[w]);
  return r;
}

// Exclusive prefix sum of `v` over threads in order; `total` receives the sum of all.
template <typename T>
__device__ T BlockExclusiveScan(T v, T* red, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  T excl = __shfl_up_sync(0xffffffffu, x, 1);
  if (lane == 0) excl = T(0);
  __syncthreads();
  if (lane == 31) red[warp] = x;
  __syncthreads();
  T before = T(0), all = T(0);
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += red[w];
    all += red[w];
  }
  *total = all;
  return before + excl;
}

struct SumU {
  __device__ u64 operator()(u64 a, u64 b) const { return a + b; }
};
struct MaxU {
  __device__ u64 operator()(u64 a, u64 b) const { return a > b ? a : b; }
};

// Adds w to bin d of the block's mass histogram: two 32-bit atomics, the carry of the low half
// detected by the one addition that wraps it, so the sum is exact.
__device__ __forceinline__ void AddMass(Shared& sm, uint32_t d, u64 w) {
  const unsigned int lo = static_cast<unsigned int>(w);
  const unsigned int hi = static_cast<unsigned int>(w >> 32);
  const unsigned int old = lo != 0 ? atomicAdd(&sm.mass_lo[d], lo) : 0u;
  const unsigned int carry = old + lo < old ? 1u : 0u;
  if (hi + carry != 0) atomicAdd(&sm.mass_hi[d], hi + carry);
}

// Adds this lane's token, when `on`, to bin d of the block's histogram h (and w to its mass when
// kMass). All 32 lanes of the warp call it together. Lanes with the same digit are combined
// first, one atomic per digit and warp: most tokens share a handful of top digits, and atomics on
// one shared address serialize.
template <bool kMass>
__device__ __forceinline__ void AddToBin(Shared& sm, int h, bool on, uint32_t d, u64 w) {
  const int lane = threadIdx.x & 31;
  const unsigned int peers = __match_any_sync(0xffffffffu, on ? d : 0xffffffffu);
  const bool first = on && __ffs(peers) - 1 == lane;
  if (first) atomicAdd(&sm.count[h][d], static_cast<unsigned int>(__popc(peers)));
  if constexpr (kMass) {
    unsigned int todo = __ballot_sync(0xffffffffu, first);  // the same in every lane
    if (__popc(todo) > 4) {  // many digits (later passes): an atomic per lane
      if (on) AddMass(sm, d, w);
      return;
    }
    while (todo != 0) {
      const int leader = __ffs(todo) - 1;
      todo &= todo - 1;
      const unsigned int group = __shfl_sync(0xffffffffu, peers, leader);
      u64 v = ((group >> lane) & 1u) ? w : 0;
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == leader) AddMass(sm, d, v);
    }
  }
}

// Zeroes the block's histogram h (and its mass for h == 1); the caller syncs before adding.
__device__ __forceinline__ void ClearBins(Shared& sm, int h) {
  if (threadIdx.x < kBins) {
    sm.count[h][threadIdx.x] = 0;
    if (h == 1) {
      sm.mass_lo[threadIdx.x] = 0;
      sm.mass_hi[threadIdx.x] = 0;
    }
  }
}

// Waits until every block of the row has arrived: a counter the last arriver resets, and a
// generation word it then advances, for which the others spin. All blocks of the row are resident
// (cooperative launch). The row's writes before the barrier are visible to the row after it.
__device__ inline void RowBarrier(Row& rw) {
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> arrived(rw.bar[0]);
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> generation(rw.bar[1]);
    // Cannot advance before this block arrives, so this is the generation to wait out.
    const unsigned int gen = generation.load(cuda::memory_order_relaxed);
    __threadfence();
    const unsigned int last = static_cast<unsigned int>(rw.blocks) - 1;
    if (arrived.fetch_add(1u, cuda::memory_order_acq_rel) == last) {
      arrived.store(0u, cuda::memory_order_relaxed);
      generation.store(gen + 1u, cuda::memory_order_release);
    } else {
      while (generation.load(cuda::memory_order_acquire) == gen) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// Makes the row's writes so far (penalties, the top list) visible to all its blocks.
template <bool kMulti>
__device__ void RowSync(Row& rw) {
  if constexpr (kMulti) {
    RowBarrier(rw);
  } else {
    __syncthreads();
  }
}

// Turns the block's partial results into the row's. In: sm.val[0, n_vals) (the block's scalars,
// combined by max where bit k of max_mask is set, else summed) and the block's histograms named
// by bits of `hists` (1: count[0], 2: count[1] with its mass). Out: sm.val the row's scalars,
// sm.pre the sums over the row's earlier blocks, the histograms the row's (sm.mass for [1]).
// `publish` (0 or 1, or -1) also leaves histogram `publish` of each block, for the tie prefix
// of RadixSelect.
template <bool kMulti>
__device__ void Exchange(Row& rw, Shared& sm, int n_vals, unsigned int max_mask, int hists,
                         int publish) {
  const int t = threadIdx.x;
  __syncthreads();  // the block's values and histograms are complete
  if constexpr (!kMulti) {
    if (t < kBins && (hists & 2)) {
      sm.mass[t] = (static_cast<u64>(sm.mass_hi[t]) << 32) | sm.mass_lo[t];
    }
    if (t < kMaxVals) sm.pre[t] = 0;
  } else {
    const int slot = rw.exchanges % 3;
    HistSlot& hs = rw.work->hist[slot];
    HistSlot& next = rw.work->hist[(slot + 1) % 3];
    ++rw.exchanges;
    u64* parts = rw.parts + static_cast<size_t>(slot) * rw.blocks * kMaxVals;
    unsigned int* bins = rw.bins + static_cast<size_t>(slot) * rw.blocks * kBins;
    if (t < n_vals) __stcg(&parts[rw.g * kMaxVals + t], sm.val[t]);
    if (t < kBins) {
      if (hists & 1) {
        const unsigned int c = sm.count[0][t];
        if (c != 0) atomicAdd(&hs.count[0][t], c);
      }
      if (hists & 2) {
        const unsigned int c = sm.count[1][t];
        if (c != 0) {
          atomicAdd(&hs.count[1][t], c);
          const u64 m = (static_cast<u64>(sm.mass_hi[t]) << 32) | sm.mass_lo[t];
          if (m != 0) atomicAdd(&hs.mass[t], m);
        }
      }
      if (publish >= 0) __stcg(&bins[rw.g * kBins + t], sm.count[publish][t]);
    }
    // The slot after this one is next used by the next exchange; its last readers (the exchange
    // before this one) are past the previous barrier, so the first block clears it now.
    if (rw.g == 0) {
      u64* z = reinterpret_cast<u64*>(&next);
      for (int i = t; i < static_cast<int>(sizeof(HistSlot) / sizeof(u64)); i += kThreads) z[i] = 0;
    }
    RowBarrier(rw);
    if (t < kBins) {
      if (hists & 1) sm.count[0][t] = __ldcg(&hs.count[0][t]);
      if (hists & 2) {
        sm.count[1][t] = __ldcg(&hs.count[1][t]);
        sm.mass[t] = __ldcg(&hs.mass[t]);
      }
    }
    const int warp = t >> 5, lane = t & 31;
    if (warp < n_vals) {
      const bool is_max = (max_mask >> warp) & 1u;
      u64 acc = 0, pre = 0;
      for (int b = lane; b < rw.blocks; b += 32) {
        const u64 v = __ldcg(&parts[b * kMaxVals + warp]);
        acc = is_max ? (acc > v ? acc : v) : acc + v;
        if (b < rw.g) pre += v;
      }
      for (int o = 16; o > 0; o >>= 1) {
        const u64 a = __shfl_xor_sync(0xffffffffu, acc, o);
        acc = is_max ? (acc > a ? acc : a) : acc + a;
        pre += __shfl_xor_sync(0xffffffffu, pre, o);
      }
      if (lane == 0) {
        sm.val[warp] = acc;
        sm.pre[warp] = pre;
      }
    }
  }
  __syncthreads();
}

// A radix select's answer: the key at which the running weight (from the highest key down) first
// reaches the target, the weight and count of the tokens above it, and how many tokens have that
// key. Weights are counts, or fixed-point masses. found is false when the set's weight stays
// below the target.
struct Select {
  uint32_t key = 0;
  u64 above = 0;
  u64 n_above = 0;
  u64 n_equal = 0;
  bool found = false;
};

// One radix pass's choice: the highest non-empty bin b with above + weight(bins >= b) >= target.
// Updates s (above, n_above, n_equal) and returns b, or -1 (the same for every thread). count and
// mass hold the row's histogram (mass: kMass only).
template <bool kMass>
__device__ int ChooseBin(const unsigned int* count, const u64* mass, double target, Select& s,
                         Shared& sm) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  // Thread t takes bin 255 - t, so an inclusive scan over threads sums the bins from the top.
  u64 c = 0, m = 0;
  if (t < kBins) {
    c = count[kBins - 1 - t];
    m = kMass ? mass[kBins - 1 - t] : c;
  }
  const u64 own_c = c, own_m = m;
  for (int o = 1; o < 32; o <<= 1) {
    const u64 yc = __shfl_up_sync(0xffffffffu, c, o);
    const u64 ym = __shfl_up_sync(0xffffffffu, m, o);
    if (lane >= o) {
      c += yc;
      m += ym;
    }
  }
  __syncthreads();  // earlier readers of the scratch are done
  if (t == 0) sm.chosen_t = kBins;
  if (t < kBins && lane == 31) {
    sm.scan_c[warp] = c;
    sm.scan_m[warp] = m;
  }
  __syncthreads();
  if (t < kBins) {
    for (int w = 0; w < warp; ++w) {
      c += sm.scan_c[w];
      m += sm.scan_m[w];
    }
    if (own_c != 0 && static_cast<double>(s.above + m) >= target) atomicMin(&sm.chosen_t, t);
  }
  __syncthreads();
  const int chosen_t = sm.chosen_t;
  if (chosen_t == kBins) return -1;
  if (t == chosen_t) {
    sm.sel_above = s.above + m - own_m;
    sm.sel_n_above = s.n_above + c - own_c;
    sm.sel_n_equal = own_c;
  }
  __syncthreads();
  s.above = sm.sel_above;
  s.n_above = sm.sel_n_above;
  s.n_equal = sm.sel_n_equal;
  return kBins - 1 - chosen_t;
}

// Over the tokens `in_set(i, x, key)` accepts, weighted by 1 (kMass false) or weight(x) (true),
// finds the highest key K such that weight(keys > K) < target <= weight(keys >= K). Only keys
// that occur count, so target <= 0 gives the highest key of the set. Pass 0 (the top 8 bits) was
// histogrammed and exchanged by the caller into count0 (and mass0); the last pass publishes each
// block's histogram so that rw.tie_prefix becomes the count of set tokens of key K in the row's
// earlier blocks.
template <bool kMulti, bool kMass, typename InSet, typename Weight>
__device__ Select RadixSelect(const float* row, Range r, InSet in_set, Weight weight, double target,
                              const unsigned int* count0, const u64* mass0, Row& rw, Shared& sm) {
  constexpr int h = kMass ? 1 : 0;
  Select s;
  int d = ChooseBin<kMass>(count0, mass0, target, s, sm);
  if (d < 0) return s;
  uint32_t prefix = static_cast<uint32_t>(d) << 24, mask = 0xff000000u;
  for (int pass = 1; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    ClearBins(sm, h);
    __syncthreads();
    for (int64_t j = 0; j < r.steps; ++j) {  // every lane every step (AddToBin)
      const int64_t i = r.begin + j;
      const float x = i < r.end ? Canonical(row[i]) : 0.0f;
      const uint32_t key = OrderKey(x);
      const bool on = i < r.end && (key & mask) == prefix && in_set(i, x, key);
      AddToBin<kMass>(sm, h, on, (key >> shift) & 0xffu, kMass && on ? weight(x) : 0);
    }
    Exchange<kMulti>(rw, sm, 0, 0u, 1 << h, pass == 3 ? h : -1);
    d = ChooseBin<kMass>(sm.count[h], sm.mass, target, s, sm);
    if (d < 0) return s;
    prefix |= static_cast<uint32_t>(d) << shift;
    mask |= 0xffu << shift;
  }
  rw.tie_prefix = 0;
  if constexpr (kMulti) {
    const unsigned int* bins =
        rw.bins + static_cast<size_t>((rw.exchanges - 1) % 3) * rw.blocks * kBins;
    if (threadIdx.x < 32) {
      long long n = 0;
      for (int b = threadIdx.x; b < rw.g; b += 32) n += __ldcg(&bins[b * kBins + d]);
      for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
      if (threadIdx.x == 0) sm.tie_prefix = n;
    }
    __syncthreads();
    rw.tie_prefix = sm.tie_prefix;
  }
  s.key = prefix;
  s.found = true;
  return s;
}

// The count of set tokens of key `key` before this thread's range, in the row's id order.
template <typename InSet>
__device__ long long TiesBefore(const float* row, Range r, uint32_t key, InSet in_set,
                                const Row& rw, Shared& sm) {
  long long mine = 0;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float x = Canonical(row[i]);
    const uint32_t k = OrderKey(x);
    if (k == key && in_set(i, x, k)) ++mine;
  }
  long long total = 0;
  return rw.tie_prefix + BlockExclusiveScan<long long>(mine, sm.red_l, &total);
}

// The highest id in this thread's range among the set tokens of key `key` whose rank (id order,
// `before` of them before the range) is below `limit`; -1 if none.
template <typename InSet>
__device__ int64_t LastKeptTie(const float* row, Range r, uint32_t key, InSet in_set,
                               long long before, long long limit) {
  int64_t cut = -1;
  for (int64_t i = r.begin; i < r.end && before < limit; ++i) {
    const float x = Canonical(row[i]);
    const uint32_t k = OrderKey(x);
    if (k == key && in_set(i, x, k)) {
      cut = i;
      ++before;
    }
  }
  return cut;
}

}  // namespace sieve::kernels::sampling_detail

#endif  // SIEVE_KERNELS_CUDA_SAMPLING_DEVICE_CUH_
