// Token sampling on the GPU (contract and method in sampling.h): one block per row.
#include "kernels/cuda/sampling.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda_check.h"

namespace sieve::kernels {
namespace {

constexpr int kThreads = kSampleThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;  // one radix digit of 8 bits
// Fixed point of q in (0, 1] for the top-p histogram: 2^44, so that 2^20 tokens sum below 2^64
// and each token's rounding (2^-45) is far below the fp32 q it stands for.
constexpr double kMassScale = 17592186044416.0;
constexpr long long kNone = LLONG_MAX;

// The block's shared scratch.
struct Shared {
  unsigned long long bin_mass[kBins];
  unsigned int bin_count[kBins];
  double red_d[kWarps];
  unsigned long long red_u[kWarps];
  long long red_l[kWarps];
  int chosen;            // the radix digit a pass chose (-1: none reached the target)
  double above;          // weight of the tokens above the chosen digit
  unsigned int n_above;  // count of the tokens above the chosen digit
  unsigned int n_equal;  // count of the tokens in the chosen digit
  unsigned int rank;     // the 1-based rank among equal keys that ends the top-p set
  int32_t k_pick;        // the top-k boundary's id
  int32_t p_pick;        // the top-p boundary's id
  int num_top;
  int32_t top_ids[kSampleMaxTop];
  float top_vals[kSampleMaxTop];
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

// The contiguous ids a thread owns: id-ordered scans are scans over threads.
struct Range {
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ Range MyRange(int64_t vocab) {
  const int64_t chunk = (vocab + kThreads - 1) / kThreads;
  const int64_t begin = min(static_cast<int64_t>(threadIdx.x) * chunk, vocab);
  return {begin, min(begin + chunk, vocab)};
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

struct SumD {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct SumL {
  __device__ long long operator()(long long a, long long b) const { return a + b; }
};
struct MinL {
  __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};
struct MaxL {
  __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};
struct MaxU {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};

// A radix select's answer: the key at which the running weight (from the highest key down)
// first reaches the target, the weight and count of the tokens above it, and how many tokens
// have that key. found is false when the whole set's weight stays below the target.
struct Select {
  uint32_t key = 0;
  double above = 0.0;
  uint32_t n_above = 0;
  uint32_t n_equal = 0;
  bool found = false;
};

// Over the tokens `in_set(i, x, key)` accepts, weighted by 1 (kMass false) or weight(x) (true),
// finds the highest key K such that weight(keys > K) < target <= weight(keys >= K). Only keys
// that occur count, so target <= 0 gives the highest key of the set.
template <bool kMass, typename InSet, typename Weight>
__device__ Select RadixSelect(const float* row, Range r, InSet in_set, Weight weight,
                              double target, Shared& sm) {
  uint32_t prefix = 0, mask = 0;
  Select s;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    __syncthreads();  // the previous pass's readers of the bins are done
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      sm.bin_count[b] = 0;
      sm.bin_mass[b] = 0;
    }
    __syncthreads();
    for (int64_t i = r.begin; i < r.end; ++i) {
      const float x = Canonical(row[i]);
      const uint32_t key = OrderKey(x);
      if ((key & mask) != prefix || !in_set(i, x, key)) continue;
      const uint32_t d = (key >> shift) & 0xffu;
      atomicAdd(&sm.bin_count[d], 1u);
      if (kMass) {
        atomicAdd(&sm.bin_mass[d],
                  static_cast<unsigned long long>(static_cast<double>(weight(x)) * kMassScale + 0.5));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double cum = s.above;
      uint32_t n = s.n_above;
      int chosen = -1;
      for (int d = kBins - 1; d >= 0; --d) {
        const uint32_t c = sm.bin_count[d];
        if (c == 0) continue;
        const double w = kMass ? static_cast<double>(sm.bin_mass[d]) / kMassScale : c;
        if (cum + w >= target) {
          chosen = d;
          break;
        }
        cum += w;
        n += c;
      }
      sm.chosen = chosen;
      sm.above = cum;
      sm.n_above = n;
      sm.n_equal = chosen >= 0 ? sm.bin_count[chosen] : 0;
    }
    __syncthreads();
    if (sm.chosen < 0) return s;  // the same for every thread
    prefix |= static_cast<uint32_t>(sm.chosen) << shift;
    mask |= 0xffu << shift;
    s.above = sm.above;
    s.n_above = sm.n_above;
    s.n_equal = sm.n_equal;
  }
  s.key = prefix;
  s.found = true;
  return s;
}

// Calls fn(i, x, rank) for the tokens of key `key` that in_set accepts, in id order, while their
// 0-based rank among them is below `limit`. The caller syncs before reading what fn wrote.
template <typename InSet, typename Fn>
__device__ void ForEachEqualInIdOrder(const float* row, Range r, uint32_t key, uint32_t limit,
                                      InSet in_set, Fn fn, Shared& sm) {
  long long mine = 0;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float x = Canonical(row[i]);
    const uint32_t k = OrderKey(x);
    if (k == key && in_set(i, x, k)) ++mine;
  }
  long long total = 0;
  long long rank = BlockExclusiveScan<long long>(mine, sm.red_l, &total);
  if (mine == 0 || rank >= limit) return;
  for (int64_t i = r.begin; i < r.end && rank < limit; ++i) {
    const float x = Canonical(row[i]);
    const uint32_t k = OrderKey(x);
    if (k == key && in_set(i, x, k)) fn(i, x, rank++);
  }
}

__global__ void __launch_bounds__(kThreads, 1) SampleKernel(SampleParams p) {
  __shared__ Shared sm;
  const SampleRowParams P = p.rows[blockIdx.x];
  SampleRowResult* out = p.results + blockIdx.x;
  float* row = p.logits + P.logits_row * p.vocab;
  const int64_t vocab = p.vocab;
  const Range r = MyRange(vocab);
  const bool lead = threadIdx.x == 0;

  // 1. Penalties, in place (the host lists each id once).
  for (int e = threadIdx.x; e < P.penalty_count; e += kThreads) {
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
  __syncthreads();  // the block's global writes are visible to the block after this

  // 2. Scan: the first bad logit, the finite count, the maximum and the lowest id holding it.
  long long bad = kNone, finite = 0;
  unsigned long long best = 0;
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float x = Canonical(row[i]);
    if (isnan(x) || x == INFINITY) {
      if (bad == kNone) bad = i;
    } else if (x != -INFINITY) {
      ++finite;
      const unsigned long long k = (static_cast<unsigned long long>(OrderKey(x)) << 32) |
                                   (0xffffffffu - static_cast<uint32_t>(i));
      best = best > k ? best : k;
    }
  }
  bad = BlockReduce(bad, MinL(), sm.red_l);
  if (bad != kNone) {
    if (lead) {
      out->status = kSampleBadLogit;
      out->id = -1;
      out->error_index = static_cast<int32_t>(bad);
      out->error_value = row[bad];
      out->num_top = 0;
    }
    return;
  }
  finite = BlockReduce(finite, SumL(), sm.red_l);
  if (finite == 0) {
    if (lead) {
      out->status = kSampleAllNegInf;
      out->id = -1;
      out->num_top = 0;
    }
    return;
  }
  best = BlockReduce(best, MaxU(), sm.red_u);
  const int32_t argmax = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(best));
  const float max_logit = Canonical(row[argmax]);
  auto is_finite = [](int64_t, float x, uint32_t) { return x != -INFINITY; };
  auto no_weight = [](float) { return 0.0f; };

  // 3. log Z of the penalized logits, for the logprobs.
  const bool want_lp = P.want_logprob != 0 || P.top_logprobs > 0;
  double log_z = 0.0;
  if (want_lp) {
    double sum = 0.0;
    for (int64_t i = r.begin; i < r.end; ++i) sum += expf(__fsub_rn(row[i], max_logit));
    sum = BlockReduce(sum, SumD(), sm.red_d);
    log_z = static_cast<double>(max_logit) + log(sum);
  }

  // 4. The top_logprobs best finite tokens: those above the k-th key, then the first of its ties.
  if (P.top_logprobs > 0) {
    const uint32_t k = static_cast<uint32_t>(min(static_cast<long long>(P.top_logprobs), finite));
    const Select s = RadixSelect<false>(row, r, is_finite, no_weight, k, sm);
    if (lead) sm.num_top = 0;
    __syncthreads();
    for (int64_t i = r.begin; i < r.end; ++i) {
      const float x = Canonical(row[i]);
      if (OrderKey(x) > s.key) {
        const int slot = atomicAdd(&sm.num_top, 1);
        sm.top_ids[slot] = static_cast<int32_t>(i);
        sm.top_vals[slot] = x;
      }
    }
    ForEachEqualInIdOrder(
        row, r, s.key, k - s.n_above, is_finite,
        [&](int64_t i, float x, long long) {
          const int slot = atomicAdd(&sm.num_top, 1);
          sm.top_ids[slot] = static_cast<int32_t>(i);
          sm.top_vals[slot] = x;
        },
        sm);
    __syncthreads();
    if (lead) {
      const int n = sm.num_top;
      // Insertion sort, best first: higher logit, then lower id.
      for (int a = 1; a < n; ++a) {
        const int32_t id = sm.top_ids[a];
        const float x = sm.top_vals[a];
        int b = a - 1;
        while (b >= 0 && (sm.top_vals[b] < x || (sm.top_vals[b] == x && sm.top_ids[b] > id))) {
          sm.top_ids[b + 1] = sm.top_ids[b];
          sm.top_vals[b + 1] = sm.top_vals[b];
          --b;
        }
        sm.top_ids[b + 1] = id;
        sm.top_vals[b + 1] = x;
      }
      for (int a = 0; a < n; ++a) {
        out->top_ids[a] = sm.top_ids[a];
        out->top_logprobs[a] = static_cast<float>(static_cast<double>(sm.top_vals[a]) - log_z);
      }
      out->num_top = n;
    }
  } else if (lead) {
    out->num_top = 0;
  }

  // 5. The token.
  int32_t id = argmax;
  if (P.temperature != 0.0f) {
    const float temp = P.temperature;
    auto q_of = [max_logit, temp](float x) {
      return expf(__fdiv_rn(__fsub_rn(x, max_logit), temp));
    };
    // Tokens at or above the boundary (b_key, b_id) in best-first order are kept.
    bool has_b = false;
    uint32_t b_key = 0;
    int64_t b_id = 0;
    if (P.top_k > 0 && P.top_k < vocab && P.top_k < finite) {
      const uint32_t k = static_cast<uint32_t>(P.top_k);
      const Select s = RadixSelect<false>(row, r, is_finite, no_weight, k, sm);
      ForEachEqualInIdOrder(
          row, r, s.key, k - s.n_above, is_finite,
          [&, limit = k - s.n_above](int64_t i, float, long long rank) {
            if (rank == limit - 1) sm.k_pick = static_cast<int32_t>(i);
          },
          sm);
      __syncthreads();
      has_b = true;
      b_key = s.key;
      b_id = sm.k_pick;
    }
    if (P.top_p < 1.0f) {
      auto in_k = [has_b, b_key, b_id](int64_t i, float, uint32_t key) {
        return !has_b || key > b_key || (key == b_key && i <= b_id);
      };
      double total = 0.0;
      for (int64_t i = r.begin; i < r.end; ++i) {
        const float x = Canonical(row[i]);
        if (in_k(i, x, OrderKey(x))) total += q_of(x);
      }
      total = BlockReduce(total, SumD(), sm.red_d);
      const double target = (static_cast<double>(P.top_p) - 1e-6) * total;
      auto in_p = [in_k, q_of](int64_t i, float x, uint32_t key) {
        return in_k(i, x, key) && q_of(x) > 0.0f;
      };
      const Select s = RadixSelect<true>(row, r, in_p, q_of, target, sm);
      if (s.found) {  // else rounding kept the mass below target: keep the whole top-k set
        if (lead) {
          // The first tie (id order) at which the running mass reaches the target.
          const double q = q_of(KeyToFloat(s.key));
          uint32_t j = 1;
          if (q > 0.0 && target > s.above) {
            j = static_cast<uint32_t>(fmax(1.0, ceil((target - s.above) / q)));
            while (j > 1 && s.above + (j - 1) * q >= target) --j;
            while (j < s.n_equal && s.above + j * q < target) ++j;
          }
          sm.rank = min(j, s.n_equal);
        }
        __syncthreads();
        const uint32_t j = sm.rank;
        ForEachEqualInIdOrder(
            row, r, s.key, j, in_p,
            [&](int64_t i, float, long long rank) {
              if (rank == j - 1) sm.p_pick = static_cast<int32_t>(i);
            },
            sm);
        __syncthreads();
        has_b = true;
        b_key = s.key;
        b_id = sm.p_pick;
      }
    }
    // Inverse CDF over the kept tokens in id order: per-thread sums, a block scan, then the
    // thread whose range holds the crossing finds it.
    const float min_p = P.min_p;
    auto kept_q = [has_b, b_key, b_id, min_p, q_of](int64_t i, float x) {
      const uint32_t key = OrderKey(x);
      if (has_b && !(key > b_key || (key == b_key && i <= b_id))) return 0.0f;
      const float q = q_of(x);
      return (q <= 0.0f || q < min_p) ? 0.0f : q;
    };
    double mine = 0.0;
    for (int64_t i = r.begin; i < r.end; ++i) mine += kept_q(i, Canonical(row[i]));
    double total = 0.0;
    double cum = BlockExclusiveScan(mine, sm.red_d, &total);
    const double target = P.uniform * total;
    long long found = kNone, last = -1;
    for (int64_t i = r.begin; i < r.end; ++i) {
      const float q = kept_q(i, Canonical(row[i]));
      if (q == 0.0f) continue;
      cum += q;
      last = i;
      if (target < cum) {
        found = i;
        break;
      }
    }
    found = BlockReduce(found, MinL(), sm.red_l);
    if (found != kNone) {
      id = static_cast<int32_t>(found);
    } else {  // rounding left the draw past the last sum
      last = BlockReduce(last, MaxL(), sm.red_l);
      id = last >= 0 ? static_cast<int32_t>(last) : argmax;
    }
  }
  if (lead) {
    out->status = kSampleOk;
    out->id = id;
    out->error_index = -1;
    out->logprob =
        want_lp ? static_cast<float>(static_cast<double>(Canonical(row[id])) - log_z) : 0.0f;
  }
}

}  // namespace

cudaError_t SampleRun(const SampleParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.vocab < 1 || p.vocab >= INT32_MAX) return cudaErrorInvalidValue;
  if (p.num_rows == 0) return cudaSuccess;
  if (p.logits == nullptr || p.rows == nullptr || p.results == nullptr) {
    return cudaErrorInvalidValue;
  }
  SampleKernel<<<p.num_rows, kThreads, 0, stream>>>(p);
  SIEVE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace sieve::kernels
