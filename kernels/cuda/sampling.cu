// Token sampling on the GPU (contract and method in sampling.h). One templated body samples a row;
// two kernels run it: one block per row (kMulti false), or several blocks per row that exchange
// partial results through a workspace (kMulti true, a cooperative launch).
#include "kernels/cuda/sampling.h"

#include <cuda/atomic>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

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

size_t Align256(size_t n) { return (n + 255) / 256 * 256; }
size_t RowBytes(int blocks) { return Align256(sizeof(RowWork) + blocks * kPerBlockBytes); }

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
__device__ void RowBarrier(Row& rw) {
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

__device__ void WriteToken(SampleRowResult* out, const float* row, int64_t id, bool want_lp,
                           double log_z) {
  out->status = kSampleOk;
  out->id = static_cast<int32_t>(id);
  out->error_index = -1;
  out->logprob =
      want_lp ? static_cast<float>(static_cast<double>(Canonical(row[id])) - log_z) : 0.0f;
}

// Samples row `index` of the batch; every block of the row calls it (rw says which part).
template <bool kMulti>
__device__ void SampleRowBody(const SampleParams& p, int index, Row& rw, Shared& sm) {
  const SampleRowParams P = p.rows[index];
  SampleRowResult* out = p.results + index;
  float* row = p.logits + P.logits_row * p.vocab;
  const int64_t vocab = p.vocab;
  const Range r = MyRange(rw);
  const bool lead = rw.g == 0 && threadIdx.x == 0;
  int* top_count = kMulti ? &rw.work->top_count : &sm.top_count;
  int32_t* top_ids = kMulti ? rw.work->top_ids : sm.top_ids;
  float* top_vals = kMulti ? rw.work->top_vals : sm.top_vals;
  if (lead) *top_count = 0;  // used after the scan's exchange

  // 1. Penalties, in place (the host lists each id once).
  if (P.penalty_count > 0) {
    for (int e = rw.g * kThreads + threadIdx.x; e < P.penalty_count; e += rw.blocks * kThreads) {
      const PenaltyEntry pe = p.penalties[P.penalty_begin + e];
      if (pe.id < 0 || pe.id >= vocab) continue;
      float x = row[pe.id];
      if (P.repetition_penalty != 1.0f) {
        x = x > 0.0f ? __fdiv_rn(x, P.repetition_penalty) : __fmul_rn(x, P.repetition_penalty);
      }
      if ((P.presence_penalty != 0.0f || P.frequency_penalty != 0.0f) && pe.generated_count > 0) {
        x = __fsub_rn(x, __fmul_rn(P.frequency_penalty, static_cast<float>(pe.generated_count)));
        x = __fsub_rn(x, P.presence_penalty);
      }
      row[pe.id] = x;
    }
    RowSync<kMulti>(rw);
  }

  // 2. Scan: the first bad logit, the finite count, the maximum and the lowest id holding it.
  long long bad = kNone;
  u64 finite = 0, best = 0;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float x = Canonical(row[i]);
    if (isnan(x) || x == INFINITY) {
      if (bad == kNone) bad = i;
    } else if (x != -INFINITY) {
      ++finite;
      const u64 k =
          (static_cast<u64>(OrderKey(x)) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
      best = best > k ? best : k;
    }
  }
  // The lowest bad id as a maximum: 0xffffffff - id (ids < 2^31), 0 for none.
  u64 bad_key = bad == kNone ? 0 : 0xffffffffull - static_cast<u64>(bad);
  bad_key = BlockReduce(bad_key, MaxU(), sm.red_u);
  finite = BlockReduce(finite, SumU(), sm.red_u);
  best = BlockReduce(best, MaxU(), sm.red_u);
  if (threadIdx.x == 0) {
    sm.val[0] = bad_key;
    sm.val[1] = finite;
    sm.val[2] = best;
  }
  Exchange<kMulti>(rw, sm, 3, 0b101u, 0, -1);
  bad_key = sm.val[0];
  finite = sm.val[1];
  best = sm.val[2];
  if (bad_key != 0 || finite == 0) {
    if (lead) {
      out->status = bad_key != 0 ? kSampleBadLogit : kSampleAllNegInf;
      out->id = -1;
      out->num_top = 0;
      if (bad_key != 0) {
        out->error_index = static_cast<int32_t>(0xffffffffull - bad_key);
        out->error_value = row[out->error_index];
      }
    }
    return;
  }
  const int32_t argmax = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(best));
  const float max_logit = Canonical(row[argmax]);
  const double scale = MassScale(vocab);
  auto weight = [scale](float q) { return static_cast<u64>(static_cast<double>(q) * scale + 0.5); };
  const float temp = P.temperature;
  auto q_of = [max_logit, temp](float x) {
    return expf(__fdiv_rn(__fsub_rn(x, max_logit), temp));
  };
  auto is_finite = [](int64_t, float x, uint32_t) { return x != -INFINITY; };
  auto no_weight = [](float) { return u64{0}; };
  const bool want_lp = P.want_logprob != 0 || P.top_logprobs > 0;
  const bool sampled = P.temperature != 0.0f;
  const bool top_k_on =
      sampled && P.top_k > 0 && P.top_k < vocab && static_cast<u64>(P.top_k) < finite;
  const bool top_p_on = sampled && P.top_p < 1.0f;
  const bool count_select = P.top_logprobs > 0 || top_k_on;
  // Without top-k the top-p set's mass and its pass-0 histogram come with log Z.
  const bool top_p_early = top_p_on && !top_k_on;
  // Adds a token of the top-p set (when `on`) to its mass and pass-0 histogram; all lanes call.
  auto add_top_p = [&sm, q_of, weight](bool on, float x, uint32_t key, u64& mass) {
    const float q = on ? q_of(x) : 0.0f;
    const u64 w = weight(q);
    mass += w;
    AddToBin<true>(sm, 1, q > 0.0f, key >> 24, w);
  };

  // 3. One pass for what needs only the maximum: log Z of the penalized logits (logprobs), pass 0
  // of the count selects over the finite tokens, and (top_p_early) the top-p mass and pass 0.
  double log_z = 0.0;
  u64 top_p_mass = 0;
  if (want_lp || count_select || top_p_early) {
    ClearBins(sm, 0);
    ClearBins(sm, 1);
    __syncthreads();
    u64 z = 0, mass = 0;
    for (int64_t j = 0; j < r.steps; ++j) {  // every lane every step (AddToBin)
      const int64_t i = r.begin + j;
      const bool on = i < r.end;
      const float x = on ? Canonical(row[i]) : -INFINITY;
      const uint32_t key = OrderKey(x);
      if (want_lp && on) z += weight(expf(__fsub_rn(x, max_logit)));
      if (count_select) AddToBin<false>(sm, 0, x != -INFINITY, key >> 24, 0);
      if (top_p_early) add_top_p(on, x, key, mass);
    }
    z = BlockReduce(z, SumU(), sm.red_u);
    mass = BlockReduce(mass, SumU(), sm.red_u);
    if (threadIdx.x == 0) {
      sm.val[0] = z;
      sm.val[1] = mass;
    }
    Exchange<kMulti>(rw, sm, 2, 0u, (count_select ? 1 : 0) | (top_p_early ? 2 : 0), -1);
    // z >= scale: the argmax adds exp(0) = 1.
    if (want_lp) {
      log_z = static_cast<double>(max_logit) + log(static_cast<double>(sm.val[0]) / scale);
    }
    top_p_mass = sm.val[1];
    if (threadIdx.x < kBins) sm.count0[threadIdx.x] = sm.count[0][threadIdx.x];
    __syncthreads();
  }

  // 4. The top_logprobs best finite tokens: those above the k-th key, then the first of its ties
  // in id order. The list is complete after the next barrier of the row.
  int k_top = 0;
  if (P.top_logprobs > 0) {
    k_top = static_cast<int>(min(static_cast<u64>(P.top_logprobs), finite));
    const Select s = RadixSelect<kMulti, false>(row, r, is_finite, no_weight, k_top, sm.count0,
                                                nullptr, rw, sm);
    long long rank = TiesBefore(row, r, s.key, is_finite, rw, sm);
    const long long limit = k_top - static_cast<long long>(s.n_above);
    for (int64_t i = r.begin; i < r.end; ++i) {
      const float x = Canonical(row[i]);
      const uint32_t key = OrderKey(x);
      int slot = -1;
      if (key > s.key) {
        slot = atomicAdd(top_count, 1);  // the n_above tokens above, in any order
      } else if (key == s.key && x != -INFINITY) {
        if (rank < limit) slot = static_cast<int>(s.n_above + rank);
        ++rank;
      }
      if (slot >= 0) {
        top_ids[slot] = static_cast<int32_t>(i);
        top_vals[slot] = x;
      }
    }
  }
  const bool list_pending = k_top > 0;

  // 5. The token.
  if (!sampled) {
    if (lead) WriteToken(out, row, argmax, want_lp, log_z);
  } else {
    // Kept in best-first order: key > b_key, or key == b_key and id <= cut (cut: this thread's
    // last kept tie, so the boundary's id never has to be broadcast).
    bool has_b = false;
    uint32_t b_key = 0;
    int64_t cut = -1;
    if (top_k_on) {
      const uint32_t k = static_cast<uint32_t>(P.top_k);
      const Select s = RadixSelect<kMulti, false>(row, r, is_finite, no_weight, k, sm.count0,
                                                  nullptr, rw, sm);
      const long long before = TiesBefore(row, r, s.key, is_finite, rw, sm);
      cut = LastKeptTie(row, r, s.key, is_finite, before, k - static_cast<long long>(s.n_above));
      has_b = true;
      b_key = s.key;
    }
    auto in_k = [&has_b, &b_key, &cut](int64_t i, uint32_t key) {
      return !has_b || key > b_key || (key == b_key && i <= cut);
    };
    if (top_p_on) {
      auto in_p = [in_k, q_of](int64_t i, float x, uint32_t key) {
        return in_k(i, key) && q_of(x) > 0.0f;
      };
      if (!top_p_early) {  // the top-k set's mass and pass 0
        ClearBins(sm, 1);
        __syncthreads();
        u64 mass = 0;
        for (int64_t j = 0; j < r.steps; ++j) {  // every lane every step (AddToBin)
          const int64_t i = r.begin + j;
          const float x = i < r.end ? Canonical(row[i]) : -INFINITY;
          const uint32_t key = OrderKey(x);
          add_top_p(i < r.end && in_k(i, key), x, key, mass);
        }
        mass = BlockReduce(mass, SumU(), sm.red_u);
        if (threadIdx.x == 0) sm.val[0] = mass;
        Exchange<kMulti>(rw, sm, 1, 0u, 2, -1);
        top_p_mass = sm.val[0];
      }
      const double target =
          (static_cast<double>(P.top_p) - 1e-6) * static_cast<double>(top_p_mass);
      auto w_of = [weight, q_of](float x) { return weight(q_of(x)); };
      const Select s = RadixSelect<kMulti, true>(row, r, in_p, w_of, target, sm.count[1], sm.mass,
                                                 rw, sm);
      if (s.found) {  // else rounding kept the mass below target: keep the whole top-k set
        // The first tie (id order) at which the running mass reaches the target; ties weigh the
        // same, and all of them together reach it.
        const u64 wq = w_of(KeyToFloat(s.key));
        u64 j = 1;
        if (wq > 0 && target > static_cast<double>(s.above)) {
          const double jd = ceil((target - static_cast<double>(s.above)) / static_cast<double>(wq));
          j = jd >= static_cast<double>(s.n_equal) ? s.n_equal : static_cast<u64>(fmax(1.0, jd));
          while (j > 1 && static_cast<double>(s.above + (j - 1) * wq) >= target) --j;
          while (j < s.n_equal && static_cast<double>(s.above + j * wq) < target) ++j;
        }
        j = min(j, s.n_equal);
        const long long before = TiesBefore(row, r, s.key, in_p, rw, sm);
        const int64_t p_cut = LastKeptTie(row, r, s.key, in_p, before, static_cast<long long>(j));
        has_b = true;
        b_key = s.key;
        cut = p_cut;
      }
    }
    // Inverse CDF over the kept tokens in id order: per-thread sums, id-ordered scans of the
    // weight and the count; the thread whose range holds the crossing writes the token.
    const float min_p = P.min_p;
    auto kept_w = [in_k, q_of, weight, min_p](int64_t i, float x, bool* kept) -> u64 {
      *kept = false;
      if (!in_k(i, OrderKey(x))) return 0;
      const float q = q_of(x);
      if (q <= 0.0f || q < min_p) return 0;
      *kept = true;
      return weight(q);
    };
    u64 mine_w = 0, mine_n = 0;
    for (int64_t i = r.begin; i < r.end; ++i) {
      bool kept;
      mine_w += kept_w(i, Canonical(row[i]), &kept);
      mine_n += kept;
    }
    u64 block_w = 0, block_n = 0;
    const u64 excl_w = BlockExclusiveScan(mine_w, sm.red_u, &block_w);
    const u64 excl_n = BlockExclusiveScan(mine_n, sm.red_u, &block_n);
    if (threadIdx.x == 0) {
      sm.val[0] = block_w;
      sm.val[1] = block_n;
    }
    Exchange<kMulti>(rw, sm, 2, 0u, 0, -1);
    const u64 total_w = sm.val[0], total_n = sm.val[1];
    u64 cum = sm.pre[0] + excl_w;
    const u64 before_n = sm.pre[1] + excl_n;
    const double target = P.uniform * static_cast<double>(total_w);
    if (total_n == 0) {  // cannot happen (the argmax is kept); as the reference would: argmax
      if (lead) WriteToken(out, row, argmax, want_lp, log_z);
    } else if (target < static_cast<double>(total_w)) {
      // The first kept token whose cumulative weight exceeds target; in this range unless an
      // earlier one already exceeds it.
      if (!(target < static_cast<double>(cum))) {
        for (int64_t i = r.begin; i < r.end; ++i) {
          bool kept;
          cum += kept_w(i, Canonical(row[i]), &kept);
          if (kept && target < static_cast<double>(cum)) {
            WriteToken(out, row, i, want_lp, log_z);
            break;
          }
        }
      }
    } else if (mine_n > 0 && before_n + mine_n == total_n) {
      // Rounding left the draw at the total: the last kept token, which is in this range.
      int64_t last = -1;
      for (int64_t i = r.begin; i < r.end; ++i) {
        bool kept;
        kept_w(i, Canonical(row[i]), &kept);
        if (kept) last = i;
      }
      WriteToken(out, row, last, want_lp, log_z);
    }
  }

  // 6. The alternatives, best first (higher logit, then lower id).
  if (list_pending) {
    // The list's writes are visible after a barrier of the row; one has passed if step 5
    // exchanged anything, else make one.
    if (!sampled) RowSync<kMulti>(rw);
    if (lead) {
      int32_t ids[kSampleMaxTop];
      float vals[kSampleMaxTop];
      for (int a = 0; a < k_top; ++a) {  // insertion sort of the list as it is read
        // Written by other blocks (kMulti): read from L2.
        const int32_t id = kMulti ? __ldcg(&top_ids[a]) : top_ids[a];
        const float x = kMulti ? __ldcg(&top_vals[a]) : top_vals[a];
        int b = a - 1;
        while (b >= 0 && (vals[b] < x || (vals[b] == x && ids[b] > id))) {
          ids[b + 1] = ids[b];
          vals[b + 1] = vals[b];
          --b;
        }
        ids[b + 1] = id;
        vals[b + 1] = x;
      }
      for (int a = 0; a < k_top; ++a) {
        out->top_ids[a] = ids[a];
        out->top_logprobs[a] = static_cast<float>(static_cast<double>(vals[a]) - log_z);
      }
      out->num_top = k_top;
    }
  } else if (lead) {
    out->num_top = 0;
  }
}

__global__ void __launch_bounds__(kThreads, 1) SampleKernel(SampleParams p) {
  __shared__ Shared sm;
  Row rw;
  rw.end = p.vocab;
  SampleRowBody<false>(p, blockIdx.x, rw, sm);
}

__global__ void __launch_bounds__(kThreads, 1) SampleMultiKernel(SampleParams p, MultiLayout l) {
  __shared__ Shared sm;
  const int index = blockIdx.x / l.blocks;
  Row rw;
  rw.g = blockIdx.x % l.blocks;
  rw.blocks = l.blocks;
  const int64_t slice = (p.vocab + l.blocks - 1) / l.blocks;
  rw.begin = min(rw.g * slice, p.vocab);
  rw.end = min(rw.begin + slice, p.vocab);
  rw.bar = l.barriers + index * (kBarrierStride / sizeof(unsigned int));
  char* base = l.rows + index * l.row_bytes;
  rw.work = reinterpret_cast<RowWork*>(base);
  rw.parts = reinterpret_cast<u64*>(base + sizeof(RowWork));
  rw.bins = reinterpret_cast<unsigned int*>(base + sizeof(RowWork) +
                                            3 * l.blocks * kMaxVals * sizeof(u64));
  SampleRowBody<true>(p, index, rw, sm);
}

}  // namespace

SamplePlan MakeSamplePlan(int num_sms, int blocks_per_sm, bool cooperative,
                          const SamplePlanOptions& options) {
  SamplePlan plan;
  const int coresident = std::max(0, num_sms) * std::max(0, blocks_per_sm);
  int cap = options.max_blocks_per_row > 0 ? options.max_blocks_per_row : kSampleMaxBlocksPerRow;
  cap = std::min({cap, kSampleMaxBlocksPerRow, coresident});
  if (!cooperative || cap < 2) return plan;
  plan.max_rows = std::min(kSampleMaxMultiRows, coresident / 2);
  plan.max_blocks_per_row = cap;
  plan.coresident_blocks = coresident;
  // Barrier words, then per row RowBytes(g) with rows * g <= coresident.
  plan.workspace_bytes = Align256(plan.max_rows * kBarrierStride) +
                         plan.max_rows * (Align256(sizeof(RowWork)) + 256) +
                         Align256(coresident * kPerBlockBytes);
  return plan;
}

cudaError_t SamplePlanForCurrentDevice(const SamplePlanOptions& options, SamplePlan* plan) {
  if (plan == nullptr) return cudaErrorInvalidValue;
  int device = 0, sms = 0, coop = 0, per_sm = 0;
  SIEVE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  SIEVE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SIEVE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  SIEVE_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, SampleMultiKernel, kThreads, 0));
  *plan = MakeSamplePlan(sms, per_sm, coop != 0, options);
  return cudaSuccess;
}

int32_t SampleBlocksPerRow(const SamplePlan& plan, int32_t num_rows, int64_t vocab) {
  if (plan.max_blocks_per_row < 2 || num_rows < 1 || num_rows > plan.max_rows) return 1;
  int64_t g = std::min<int64_t>(plan.max_blocks_per_row, plan.coresident_blocks / num_rows);
  g = std::min<int64_t>(g, (vocab + kThreads - 1) / kThreads);
  return g >= 2 ? static_cast<int32_t>(g) : 1;
}

cudaError_t SampleRun(const SampleParams& p, const SamplePlan& plan, void* workspace,
                      cudaStream_t stream) {
  if (p.num_rows < 0 || p.vocab < 1 || p.vocab >= INT32_MAX) return cudaErrorInvalidValue;
  if (p.num_rows == 0) return cudaSuccess;
  if (p.logits == nullptr || p.rows == nullptr || p.results == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int32_t blocks = SampleBlocksPerRow(plan, p.num_rows, p.vocab);
  if (blocks >= 2) {
    const size_t barrier_bytes = Align256(plan.max_rows * kBarrierStride);
    const size_t row_bytes = RowBytes(blocks);
    if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0 ||
        barrier_bytes + p.num_rows * row_bytes > plan.workspace_bytes) {
      return cudaErrorInvalidValue;
    }
    MultiLayout l;
    l.barriers = static_cast<unsigned int*>(workspace);
    l.rows = static_cast<char*>(workspace) + barrier_bytes;
    l.row_bytes = row_bytes;
    l.blocks = blocks;
    SampleParams params = p;
    void* args[] = {&params, &l};
    const cudaError_t e = cudaLaunchCooperativeKernel(
        reinterpret_cast<const void*>(SampleMultiKernel), dim3(p.num_rows * blocks),
        dim3(kThreads), args, 0, stream);
    if (e != cudaErrorCooperativeLaunchTooLarge) {
      SIEVE_CUDA_RETURN_IF_ERROR(e);
      return cudaSuccess;
    }
    // Fewer blocks fit than the plan counted (e.g. the device is shared): one block per row.
    (void)cudaGetLastError();
  }
  SampleKernel<<<p.num_rows, kThreads, 0, stream>>>(p);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t SampleRun(const SampleParams& p, cudaStream_t stream) {
  return SampleRun(p, SamplePlan(), nullptr, stream);
}

}  // namespace sieve::kernels
