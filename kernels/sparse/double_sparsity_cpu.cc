// The fast DoubleSparsity selection (DsSelectCpu, double_sparsity.h). Highway's dynamic
// dispatch: this file includes itself once per x86 target (hwy/foreach_target.h).
//
// One task per (sequence, selection head), taken from a shared counter by `num_threads` threads:
//   1. scores: page by page, each page's label block is channel-major, so the scores of a
//      vector's worth of slots are `channels` multiply-adds of broadcast query channels with
//      widened labels (fp16 / bf16 / 4-bit codes), with no horizontal sums;
//   2. threshold: the top of a strided sample of ~2048 scores (a few standard deviations above
//      the budget's expected share) gives a threshold that about 1.3 k scores pass;
//   3. candidates: one vectorised compare pass (passing lanes from the mask's bits) keeps the
//      positions (increasing) and scores at or above it; if fewer than k pass, a lower sample
//      rank is tried, then every position;
//   4. the k-th largest candidate score T (nth_element over the candidates only); a last pass
//      over the candidates emits those above T, then ties at T by lowest position, so the
//      output is already increasing.
#ifndef SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CPU_ONCE_
#define SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CPU_ONCE_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/parallel_for.h"
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/double_sparsity_internal.h"

namespace sieve::kernels {
namespace ds_cpu {

// Pages ahead whose label blocks are prefetched while one page is scored.
constexpr int kPrefetchPages = 8;
// Samples taken to place the threshold.
constexpr int kSamples = 2048;

using Scratch = DsThreadScratch;

// Exactly min(k, n) positions of s[0, n) with the largest scores (ties and NaN: see callers),
// increasing, into out: the slow path for inputs the sampled threshold cannot handle (NaN).
inline void SelectBySort(const float* s, int n, int k, int32_t* out) {
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  auto key = [&](int32_t i) { return std::isnan(s[i]) ? -std::numeric_limits<float>::infinity() : s[i]; };
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return key(a) > key(b); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  std::copy(idx.begin(), idx.end(), out);
}

}  // namespace ds_cpu
}  // namespace sieve::kernels

#endif  // SIEVE_KERNELS_SPARSE_DOUBLE_SPARSITY_CPU_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/sparse/double_sparsity_cpu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace sieve::kernels {
namespace ds_cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;

// L labels of one channel, widened to float.
HWY_INLINE hn::Vec<DF> Load16(DF df, const uint16_t* p, bool f16) {
  if (f16) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
  }
  const DU du;
  const hn::Rebind<uint16_t, DU> du16;
  return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(du16, p))));
}

// 4-bit scores of slots [0, j) and [half, half + j) with vectors of D, j the largest multiple
// of Lanes(d) <= ps - half (byte j holds slot j in its low and slot j + half in its high
// nibble). Returns j.
template <class D>
int PageScores4(D d, const DoubleSparsityShape& sh, const uint8_t* block, const float* q,
                float qsum, bool accumulate, float* s) {
  const int ps = sh.page_size, r = sh.channels, half = ds_internal::HalfOf(ps);
  const int L = static_cast<int>(hn::Lanes(d));
  const float* mins = reinterpret_cast<const float*>(block);
  const float* steps = mins + ps;
  const uint8_t* codes = block + int64_t{ps} * 8;
  const hn::RebindToSigned<D> di;
  const hn::Rebind<uint8_t, decltype(di)> du8;
  const auto low4 = hn::Set(di, 15);
  int j = 0;
  for (; j + L <= ps - half; j += L) {
    auto lo = hn::Zero(d), hi = hn::Zero(d);
    for (int c = 0; c < r; ++c) {
      const auto b = hn::PromoteTo(di, hn::LoadU(du8, codes + int64_t{c} * half + j));
      const auto qc = hn::Set(d, q[c]);
      lo = hn::MulAdd(qc, hn::ConvertTo(d, hn::And(b, low4)), lo);
      hi = hn::MulAdd(qc, hn::ConvertTo(d, hn::ShiftRight<4>(b)), hi);
    }
    const auto vq = hn::Set(d, qsum);
    auto x0 = hn::MulAdd(hn::LoadU(d, steps + j), lo, hn::Mul(hn::LoadU(d, mins + j), vq));
    auto x1 = hn::MulAdd(hn::LoadU(d, steps + j + half), hi,
                         hn::Mul(hn::LoadU(d, mins + j + half), vq));
    if (accumulate) {
      x0 = hn::Add(x0, hn::LoadU(d, s + j));
      x1 = hn::Add(x1, hn::LoadU(d, s + j + half));
    }
    hn::StoreU(x0, d, s + j);
    hn::StoreU(x1, d, s + j + half);
  }
  return j;
}

// 4-bit scores of the slots of bytes [j, half) one at a time.
void PageScores4Tail(const DoubleSparsityShape& sh, const uint8_t* block, const float* q,
                     float qsum, bool accumulate, int j, float* s) {
  const int ps = sh.page_size, r = sh.channels, half = ds_internal::HalfOf(ps);
  const float* mins = reinterpret_cast<const float*>(block);
  const float* steps = mins + ps;
  const uint8_t* codes = block + int64_t{ps} * 8;
  for (; j < half; ++j) {
    for (int slot : {j, j + half}) {
      if (slot >= ps) continue;  // odd page size: the last byte has no high slot
      float a = 0.0f;
      for (int c = 0; c < r; ++c) {
        const uint8_t b = codes[int64_t{c} * half + j];
        a += q[c] * static_cast<float>(slot < half ? (b & 0xf) : (b >> 4));
      }
      const float x = steps[slot] * a + mins[slot] * qsum;
      s[slot] = accumulate ? s[slot] + x : x;
    }
  }
}

// s[j] (+)= sum_c q[c] * label(c, j) for the page_size slots of one label head's block.
void PageScores(const DoubleSparsityShape& sh, const uint8_t* block, const float* q, float qsum,
                bool accumulate, float* s) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  const int ps = sh.page_size, r = sh.channels;
  if (sh.format != DsLabelFormat::kInt4) {
    const uint16_t* lab = reinterpret_cast<const uint16_t*>(block);
    const bool f16 = sh.format == DsLabelFormat::kF16;
    int j = 0;
    for (; j + L <= ps; j += L) {
      auto a0 = hn::Zero(df), a1 = hn::Zero(df);
      int c = 0;
      for (; c + 2 <= r; c += 2) {
        a0 = hn::MulAdd(hn::Set(df, q[c]), Load16(df, lab + int64_t{c} * ps + j, f16), a0);
        a1 = hn::MulAdd(hn::Set(df, q[c + 1]), Load16(df, lab + int64_t{c + 1} * ps + j, f16), a1);
      }
      if (c < r) a0 = hn::MulAdd(hn::Set(df, q[c]), Load16(df, lab + int64_t{c} * ps + j, f16), a0);
      auto a = hn::Add(a0, a1);
      if (accumulate) a = hn::Add(a, hn::LoadU(df, s + j));
      hn::StoreU(a, df, s + j);
    }
    for (; j < ps; ++j) {
      float a = 0.0f;
      for (int c = 0; c < r; ++c) {
        const uint16_t b = lab[int64_t{c} * ps + j];
        a += q[c] * (f16 ? F16ToFloat(b) : Bf16ToFloat(b));
      }
      s[j] = accumulate ? s[j] + a : a;
    }
    return;
  }
  // 4-bit: label = code * step + min, so s = step * sum_c q[c] code_c + min * sum_c q[c].
  // Vectors of the largest width that fits the page's code bytes (a page of 16 slots has 8
  // bytes per channel: half an AVX-512 vector).
  const int pairs = ps - ds_internal::HalfOf(ps);  // bytes holding two slots
  int j = 0;
  if (pairs >= L) {
    j = PageScores4(df, sh, block, q, qsum, accumulate, s);
  } else if (pairs >= 8 && L > 8) {
    j = PageScores4(hn::CappedTag<float, 8>(), sh, block, q, qsum, accumulate, s);
  } else if (pairs >= 4 && L > 4) {
    j = PageScores4(hn::CappedTag<float, 4>(), sh, block, q, qsum, accumulate, s);
  }
  PageScores4Tail(sh, block, q, qsum, accumulate, j, s);
}

// Scores of every position [0, len) of sequence `seq` for selection head `sel` into sc.scores,
// positions past len set to -inf up to a whole vector.
void TaskScores(const DoubleSparsityShape& sh, const DsSelectParams& p, int seq, int sel, int len,
                Scratch& sc) {
  const int group = sh.num_q_heads / sh.num_kv_heads;
  const int64_t page_bytes = DsLabelPageBytes(sh), head_bytes = DsLabelHeadBytes(sh);
  const int32_t* pages = p.page_table + int64_t{seq} * p.page_table_stride;
  const int n_pages = (len + sh.page_size - 1) / sh.page_size;
  const int L = static_cast<int>(hn::Lanes(DF()));
  sc.scores.resize(static_cast<size_t>(n_pages) * sh.page_size + L);
  sc.qsel.resize(sh.channels);
  const int h_begin = sh.shared_selection ? sel * group : sel;
  const int h_end = sh.shared_selection ? h_begin + group : sel + 1;
  // With per-KV-head labels every head of the set reads the same labels: sum the queries first.
  const bool fold = sh.per_kv_head_labels;
  bool first = true;
  for (int h = h_begin; h < h_end; ++h) {
    const int lh = sh.per_kv_head_labels ? h / group : h;
    const int32_t* ch = p.channels + lh * sh.channels;
    if (!fold || h == h_begin) std::fill(sc.qsel.begin(), sc.qsel.end(), 0.0f);
    const float* q = p.q + (int64_t{seq} * sh.num_q_heads + h) * sh.head_dim;
    for (int c = 0; c < sh.channels; ++c) sc.qsel[c] += q[ch[c]];
    if (fold && h + 1 < h_end) continue;
    const float qsum = std::accumulate(sc.qsel.begin(), sc.qsel.end(), 0.0f);
    for (int pg = 0; pg < n_pages; ++pg) {
      const uint8_t* block = p.labels + pages[pg] * page_bytes + lh * head_bytes;
      // Pages sit anywhere in the pool: fetch a later page's block ahead (the hardware
      // prefetcher cannot guess the page table), so that reads overlap instead of waiting.
      if (pg + kPrefetchPages < n_pages) {
        const uint8_t* ahead = p.labels + pages[pg + kPrefetchPages] * page_bytes + lh * head_bytes;
        for (int64_t b = 0; b < head_bytes; b += 64) hwy::Prefetch(ahead + b);
      }
      PageScores(sh, block, sc.qsel.data(), qsum, !first, sc.scores.data() + int64_t{pg} * sh.page_size);
    }
    first = false;
  }
  std::fill(sc.scores.begin() + len, sc.scores.end(), -std::numeric_limits<float>::infinity());
}

// Positions of s[0, n) (padded with -inf to a whole vector) at or above t, increasing, with their
// scores, into sc.cand / sc.cand_val. Returns how many. One compare per vector; the few lanes
// that pass (about 1.3 k of n) are taken from the mask's bits. (Highway's CompressStore on AVX2
// copied its 1 KiB index table onto the stack at every call under GCC 12: 80% of this pass's
// time, perf 2026-12-06.)
int Compress(const float* s, int n, float t, Scratch& sc) {
  const DF df;
  const int L = static_cast<int>(hn::Lanes(df));
  static_assert(HWY_MAX_BYTES / sizeof(float) <= 64, "mask bits fit 64 bits");
  sc.cand.resize(n);  // at most n pass
  sc.cand_val.resize(n);
  int32_t* cand = sc.cand.data();
  float* cand_val = sc.cand_val.data();
  const auto vt = hn::Set(df, t);
  int count = 0;
  for (int i = 0; i < n; i += L) {
    auto m = hn::Ge(hn::LoadU(df, s + i), vt);
    if (n - i < L) m = hn::And(m, hn::FirstN(df, n - i));  // the padding is never a candidate
    if (hn::AllFalse(df, m)) continue;
    uint8_t mask_bytes[8] = {};
    hn::StoreMaskBits(df, m, mask_bytes);
    uint64_t bits;
    std::memcpy(&bits, mask_bytes, sizeof(bits));
    while (bits != 0) {
      const int j = i + __builtin_ctzll(bits);
      cand[count] = j;
      cand_val[count] = s[j];
      ++count;
      bits &= bits - 1;
    }
  }
  return count;
}

// The min(k, n) top positions of sc.scores[0, n), increasing, into out.
void TopK(int n, int k, Scratch& sc, int32_t* out) {
  if (k >= n) {
    std::iota(out, out + n, 0);
    return;
  }
  const float* s = sc.scores.data();
  const int m = std::min(n, kSamples);
  const int stride = n / m;
  sc.samples.resize(m);
  for (int i = 0; i < m; ++i) sc.samples[i] = s[int64_t{i} * stride];
  // Samples expected above the k-th score, plus three standard deviations and a margin.
  const double f = static_cast<double>(k) / n;
  int rank = static_cast<int>(std::ceil(m * f + 3.0 * std::sqrt(m * f * (1.0 - f)) + 2.0));
  int count = 0;
  for (;;) {
    rank = std::min(rank, m);
    std::nth_element(sc.samples.begin(), sc.samples.begin() + (rank - 1), sc.samples.end(),
                     std::greater<float>());
    const float t = sc.samples[rank - 1];
    count = std::isnan(t) ? 0 : Compress(s, n, t, sc);
    if (count >= k || rank == m) break;
    rank *= 2;
  }
  if (count < k) {  // the threshold reached the smallest sample: every position is a candidate
    count = Compress(s, n, -std::numeric_limits<float>::infinity(), sc);
    if (count < k) {  // NaN scores
      SelectBySort(s, n, k, out);
      return;
    }
  }
  sc.work.assign(sc.cand_val.begin(), sc.cand_val.begin() + count);
  std::nth_element(sc.work.begin(), sc.work.begin() + (k - 1), sc.work.end(), std::greater<float>());
  const float t = sc.work[k - 1];
  int above = 0;
  for (int i = 0; i < count; ++i) above += sc.cand_val[i] > t;
  int ties = k - above;
  int o = 0;
  for (int i = 0; i < count; ++i) {
    const float v = sc.cand_val[i];
    if (v > t || (v == t && ties-- > 0)) out[o++] = sc.cand[i];
  }
}

void DsSelectCpuImpl(const DoubleSparsityShape& sh, const DsSelectParams& p, DsSelection& out,
                     int num_threads) {
  ds_internal::LayOutSelection(sh, p, out);
  const int group = sh.num_q_heads / sh.num_kv_heads;
  const int sel_heads = sh.shared_selection ? sh.num_kv_heads : sh.num_q_heads;
  const int64_t tasks = int64_t{p.num_seqs} * sel_heads;
  if (tasks == 0) return;
  if (num_threads <= 0) num_threads = DefaultCpuThreads();
  const int workers = static_cast<int>(std::min<int64_t>(num_threads, tasks));
  if (out.scratch.size() < static_cast<size_t>(workers)) out.scratch.resize(workers);
  std::atomic<int64_t> next{0};
  ParallelFor(workers, workers, 1, [&](int64_t w, int64_t) {
    Scratch& sc = out.scratch[w];
    for (int64_t i = next.fetch_add(1); i < tasks; i = next.fetch_add(1)) {
      const int seq = static_cast<int>(i / sel_heads), sel = static_cast<int>(i % sel_heads);
      const int len = std::max(0, p.kv_lens[seq]);
      const int k = std::min(p.token_budget, len);
      const int h_first = sh.shared_selection ? sel * group : sel;
      const int h_last = sh.shared_selection ? h_first + group : sel + 1;
      int32_t* dst = out.columns.data() + out.column_start[int64_t{seq} * sh.num_q_heads + h_first];
      if (k >= len) {
        std::iota(dst, dst + len, 0);
      } else {
        TaskScores(sh, p, seq, sel, len, sc);
        TopK(len, k, sc, dst);
      }
      for (int h = h_first + 1; h < h_last; ++h) {  // shared selection: the group's other rows
        std::copy(dst, dst + k, out.columns.data() + out.column_start[int64_t{seq} * sh.num_q_heads + h]);
      }
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace ds_cpu
}  // namespace sieve::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace sieve::kernels {
namespace ds_cpu {
HWY_EXPORT(DsSelectCpuImpl);
}  // namespace ds_cpu

void DsSelectCpu(const DoubleSparsityShape& shape, const DsSelectParams& p, DsSelection& out,
                 int num_threads) {
  HWY_DYNAMIC_DISPATCH(ds_cpu::DsSelectCpuImpl)(shape, p, out, num_threads);
}

}  // namespace sieve::kernels
#endif  // HWY_ONCE
