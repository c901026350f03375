// The templated body that samples one row (internal to sampling.cu): penalties, the scan, log Z
// with pass 0 of the selects, the top alternatives, the token, the sorted alternatives. The
// one-block kernel runs it with kMulti false, the multi-block kernel with kMulti true.
#ifndef SIEVE_KERNELS_CUDA_SAMPLING_ROW_CUH_
#define SIEVE_KERNELS_CUDA_SAMPLING_ROW_CUH_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/sampling.h"
#include "kernels/cuda/sampling_device.cuh"

namespace sieve::kernels::sampling_detail {

__device__ inline void WriteToken(SampleRowResult* out, const float* row, int64_t id, bool want_lp,
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

}  // namespace sieve::kernels::sampling_detail

#endif  // SIEVE_KERNELS_CUDA_SAMPLING_ROW_CUH_
