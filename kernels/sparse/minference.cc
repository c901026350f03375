// MInference index estimation and plans (minference.h): selection, the section 1.6 conversion,
// block-sparse heads, the fp64 VS reference and the assembly of a step's BSR plan. The fp32
// Highway VS estimator is in minference_cpu.cc.
#include "kernels/sparse/minference.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>

#include "kernels/cpu/parallel_for.h"

namespace sieve::kernels::minference {
namespace {

inline int32_t QueryLen(const PagedAttentionParams<float>& p, int s) {
  return p.query_start[s + 1] - p.query_start[s];
}

// Key `pos` of (seq, kv_head) as fp32: the row itself, or (16-bit caches) widened into buf.
inline const float* KeyRow(const PagedAttentionParams<float>& p, KvDtype k_dtype, int seq,
                           int kv_head, int pos, float* buf) {
  const int64_t page = p.page_table[int64_t{seq} * p.page_table_stride + pos / p.page_size];
  return RowAsFloat(p.k_cache, k_dtype,
                    KvRowOffset(p.kv_layout, page, pos % p.page_size, kv_head, p.page_size,
                                p.num_kv_heads, p.head_dim),
                    p.head_dim, buf);
}

inline const float* QueryRow(const PagedAttentionParams<float>& p, int seq, int head, int j) {
  return p.q + ((int64_t{p.query_start[seq]} + j) * p.num_q_heads + head) * int64_t{p.head_dim};
}

// Sum over query positions qp in [q0, q1] of the keys of [a, a + 64) at positions <= qp.
int64_t CausalPairsInBlock(int64_t q0, int64_t q1, int64_t a) {
  int64_t total = 0;
  const int64_t lo = std::max(q0, a), hi = std::min(q1, a + kBlock - 1);  // inside the block
  if (lo <= hi) total += (hi - lo + 1) * (lo - a + 1 + hi - a + 1) / 2;
  const int64_t past = std::max(q0, a + kBlock);  // past it: all 64 keys
  if (past <= q1) total += (q1 - past + 1) * kBlock;
  return total;
}

// The `k` indices of the largest scores (forced ones count as +inf), smaller index first among
// equal scores, in increasing index order.
template <typename T>
std::vector<int32_t> TopK(const T* score, int32_t n, int32_t k, int32_t forced) {
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  k = std::min(k, n);
  auto better = [&](int32_t a, int32_t b) {
    const bool fa = a < forced, fb = b < forced;
    if (fa != fb) return fa;
    if (!fa && score[a] != score[b]) return score[a] > score[b];
    return a < b;
  };
  std::nth_element(idx.begin(), idx.begin() + k, idx.end(), better);
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

template <typename T>
VsIndex SelectVsImpl(const T* vertical, const T* slash, int32_t n, int32_t vertical_size,
                     int32_t slash_size) {
  const int32_t nv = std::min(n, std::max(vertical_size, kMinVertical));
  const int32_t ns = std::min(n, std::max(slash_size, kMinSlash));
  VsIndex x;
  x.vertical = TopK(vertical, n, nv, kForcedColumns);
  x.slash = TopK(slash, n, ns, kForcedDiagonals);
  std::reverse(x.slash.begin(), x.slash.end());
  return x;
}

// Appends the keys [rs, re) that block queries up to `last` may read, as aligned key blocks and
// single columns: an aligned block is listed when it lies inside [rs, re) or its keys past re
// are all after `last` (never read); the other keys become columns.
void RangeToBsr(int32_t rs, int32_t re, int32_t last, std::vector<int32_t>* blocks,
                std::vector<int32_t>* columns) {
  const int32_t e = std::min(re, last + 1);
  if (e <= rs) return;
  int32_t b = (rs + kBlock - 1) / kBlock;
  for (int32_t c = rs; c < std::min(b * kBlock, e); ++c) columns->push_back(c);
  for (; b * kBlock < e; ++b) {
    if (b * kBlock + kBlock <= e || e == last + 1) {
      blocks->push_back(b);
    } else {
      for (int32_t c = b * kBlock; c < e; ++c) columns->push_back(c);
    }
  }
}

// Ranges and isolated columns (BlockKeys) into BSR lists for a block whose last query is at
// `last`.
void BlockKeysToBsr(const BlockKeys& k, int32_t last, std::vector<int32_t>* blocks,
                    std::vector<int32_t>* columns) {
  size_t c = 0;
  for (size_t r = 0; r < k.range_start.size(); ++r) {
    for (; c < k.columns.size() && k.columns[c] < k.range_start[r]; ++c) {
      if (k.columns[c] <= last) columns->push_back(k.columns[c]);
    }
    RangeToBsr(k.range_start[r], k.range_end[r], last, blocks, columns);
  }
  for (; c < k.columns.size(); ++c) {
    if (k.columns[c] <= last) columns->push_back(k.columns[c]);
  }
}

template <typename T>
void BlockSparseImpl(const PagedAttentionParams<float>& p, KvDtype k_dtype, int seq, int head,
                     int32_t top_k, std::vector<int32_t>* offsets, std::vector<int32_t>* out) {
  const int32_t q_len = QueryLen(p, seq), kv_len = p.kv_lens[seq], d = p.head_dim;
  const int32_t first = kv_len - q_len;
  const int32_t qblocks = (q_len + kBlock - 1) / kBlock, kblocks = (kv_len + kBlock - 1) / kBlock;
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  // Mean-pooled queries and keys; the zero padding of a short last block counts in the mean.
  std::vector<T> qm(static_cast<size_t>(qblocks) * d, T(0)), km(static_cast<size_t>(kblocks) * d, T(0));
  for (int32_t j = 0; j < q_len; ++j) {
    const float* q = QueryRow(p, seq, head, j);
    T* m = qm.data() + static_cast<size_t>(j / kBlock) * d;
    for (int i = 0; i < d; ++i) m[i] += q[i];
  }
  std::vector<float> kbuf(d);
  for (int32_t t = 0; t < kv_len; ++t) {
    const float* k = KeyRow(p, k_dtype, seq, kv_head, t, kbuf.data());
    T* m = km.data() + static_cast<size_t>(t / kBlock) * d;
    for (int i = 0; i < d; ++i) m[i] += k[i];
  }
  for (T& x : qm) x /= T(kBlock);
  for (T& x : km) x /= T(kBlock);
  offsets->assign(1, 0);
  out->clear();
  std::vector<T> score(kblocks);
  for (int32_t b = 0; b < qblocks; ++b) {
    const int32_t last = std::min(first + (b + 1) * kBlock, kv_len) - 1;
    const int32_t causal = last / kBlock + 1;  // key blocks with a key <= last
    if (causal <= top_k) {
      for (int32_t n = 0; n < causal; ++n) out->push_back(n);
    } else {
      const T* qv = qm.data() + static_cast<size_t>(b) * d;
      for (int32_t n = 0; n < causal; ++n) {
        const T* kv = km.data() + static_cast<size_t>(n) * d;
        T s = 0;
        for (int i = 0; i < d; ++i) s += qv[i] * kv[i];
        score[n] = s;
      }
      const std::vector<int32_t> best = TopK(score.data(), causal, std::max(top_k, 0), 0);
      out->insert(out->end(), best.begin(), best.end());
    }
    offsets->push_back(static_cast<int32_t>(out->size()));
  }
}

// One head's rows of one sequence: per query block, key blocks and columns.
struct HeadRows {
  std::vector<int32_t> block_off, blocks, column_off, columns;
};

// VS scores computed elsewhere (BuildPlanFromScores): head h of the one sequence at
// vertical + h * kv_len and slash + h * kv_len.
struct GivenScores {
  const float* vertical = nullptr;
  const float* slash = nullptr;
};

void HeadPlan(const PagedAttentionParams<float>& p, int seq, int head, const HeadPattern& pat,
              const Options& o, bool ref, const GivenScores* given, HeadRows* rows) {
  const int32_t q_len = QueryLen(p, seq), kv_len = p.kv_lens[seq];
  const int32_t first = kv_len - q_len, qblocks = (q_len + kBlock - 1) / kBlock;
  rows->block_off.assign(1, 0);
  rows->column_off.assign(1, 0);
  rows->blocks.clear();
  rows->columns.clear();
  if (pat.pattern == Pattern::kBlockSparse) {
    if (ref) {
      BlockSparseRef(p, seq, head, pat.vertical_size, &rows->block_off, &rows->blocks,
                     o.k_dtype);
    } else {
      BlockSparseCpu(p, seq, head, pat.vertical_size, &rows->block_off, &rows->blocks,
                     o.k_dtype);
    }
    rows->column_off.assign(qblocks + 1, 0);
    return;
  }
  VsIndex x;
  if (pat.pattern == Pattern::kVerticalSlash) {
    if (given != nullptr) {
      const size_t off = static_cast<size_t>(head) * kv_len;
      x = SelectVs(given->vertical + off, given->slash + off, kv_len, pat.vertical_size,
                   pat.slash_size);
    } else if (ref) {
      VsScores s;
      VsScoresRef(p, seq, head, o.last_q, &s, o.k_dtype);
      x = SelectVs(s.vertical.data(), s.slash.data(), kv_len, pat.vertical_size, pat.slash_size);
    } else {
      std::vector<float> v(kv_len), sl(kv_len);
      VsScoresCpu(p, seq, head, o.last_q, v.data(), sl.data(), o.k_dtype);
      x = SelectVs(v.data(), sl.data(), kv_len, pat.vertical_size, pat.slash_size);
    }
  }
  BlockKeys k;
  for (int32_t b = 0; b < qblocks; ++b) {
    const int32_t start = first + b * kBlock;
    const int32_t last = std::min(start + kBlock, kv_len) - 1;
    if (pat.pattern == Pattern::kVerticalSlash) {
      ConvertVs(x, start, &k);
    } else {  // A-shape: the window of the block's queries plus the sinks before it
      const int32_t ws = std::max(0, start - std::max(pat.slash_size, 1) + 1);
      k.range_start.assign(1, ws);
      k.range_end.assign(1, last + 1);
      k.columns.clear();
      for (int32_t c = 0; c < std::min(pat.vertical_size, ws); ++c) k.columns.push_back(c);
    }
    BlockKeysToBsr(k, last, &rows->blocks, &rows->columns);
    rows->block_off.push_back(static_cast<int32_t>(rows->blocks.size()));
    rows->column_off.push_back(static_cast<int32_t>(rows->columns.size()));
  }
}

void BuildPlanImpl(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
                   const Options& o, bool ref, const GivenScores* given, MInferencePlan* plan) {
  const int hq = p.num_q_heads;
  std::vector<HeadRows> heads(static_cast<size_t>(p.num_seqs) * hq);
  plan->query_block_start.assign(1, 0);
  for (int s = 0; s < p.num_seqs; ++s) {
    plan->query_block_start.push_back(plan->query_block_start.back() +
                                      (QueryLen(p, s) + kBlock - 1) / kBlock);
  }
  // Largest sequences first, heads of one sequence in order.
  std::vector<int64_t> order(heads.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return p.kv_lens[a / hq] > p.kv_lens[b / hq];
  });
  auto run = [&](int64_t i) {
    const int s = static_cast<int>(i / hq), h = static_cast<int>(i % hq);
    if (QueryLen(p, s) > 0) HeadPlan(p, s, h, patterns[h], o, ref, given, &heads[i]);
  };
  if (ref) {
    for (int64_t i : order) run(i);
  } else {
    const int threads = o.num_threads > 0 ? o.num_threads : DefaultCpuThreads();
    const int workers = static_cast<int>(std::min<int64_t>(threads, heads.size()));
    std::atomic<int64_t> next{0};
    ParallelFor(workers, workers, 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1); i < static_cast<int64_t>(order.size()); i = next.fetch_add(1)) {
        run(order[i]);
      }
    });
  }
  const int64_t rows = int64_t{plan->query_block_start.back()} * hq;
  plan->row_start.assign(1, 0);
  plan->column_start.assign(1, 0);
  plan->row_start.reserve(rows + 1);
  plan->column_start.reserve(rows + 1);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int32_t blocks = plan->query_block_start[s + 1] - plan->query_block_start[s];
    for (int32_t b = 0; b < blocks; ++b) {
      for (int h = 0; h < hq; ++h) {
        const HeadRows& r = heads[static_cast<size_t>(s) * hq + h];
        plan->row_start.push_back(plan->row_start.back() + r.block_off[b + 1] - r.block_off[b]);
        plan->column_start.push_back(plan->column_start.back() + r.column_off[b + 1] -
                                     r.column_off[b]);
      }
    }
  }
  plan->key_blocks.resize(plan->row_start.back());
  plan->columns.resize(plan->column_start.back());
  int64_t row = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int32_t blocks = plan->query_block_start[s + 1] - plan->query_block_start[s];
    for (int32_t b = 0; b < blocks; ++b) {
      for (int h = 0; h < hq; ++h, ++row) {
        const HeadRows& r = heads[static_cast<size_t>(s) * hq + h];
        std::copy(r.blocks.begin() + r.block_off[b], r.blocks.begin() + r.block_off[b + 1],
                  plan->key_blocks.begin() + plan->row_start[row]);
        std::copy(r.columns.begin() + r.column_off[b], r.columns.begin() + r.column_off[b + 1],
                  plan->columns.begin() + plan->column_start[row]);
      }
    }
  }
}

}  // namespace

SparseAttentionIndex MInferencePlan::View() const {
  SparseAttentionIndex x;
  x.query_block = kBlock;
  x.key_block = kBlock;
  x.query_block_start = query_block_start.data();
  x.row_start = row_start.data();
  x.key_blocks = key_blocks.data();
  x.column_start = column_start.data();
  x.columns = columns.data();
  return x;
}

void VsScoresRef(const PagedAttentionParams<float>& p, int seq, int head, int last_q,
                 VsScores* out, KvDtype k_dtype) {
  const int32_t q_len = QueryLen(p, seq), n = p.kv_lens[seq], d = p.head_dim;
  const int32_t lq = std::min(std::max(last_q, 1), q_len);
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  out->vertical.assign(n, 0.0);
  out->slash.assign(n, 0.0);
  std::vector<double> logit(n);
  std::vector<float> kbuf(d);
  for (int32_t r = 0; r < lq; ++r) {
    const int32_t j = q_len - lq + r, pos = n - q_len + j;
    const float* q = QueryRow(p, seq, head, j);
    double mx = -std::numeric_limits<double>::infinity();
    for (int32_t t = 0; t <= pos; ++t) {
      const float* k = KeyRow(p, k_dtype, seq, kv_head, t, kbuf.data());
      double s = 0;
      for (int i = 0; i < d; ++i) s += double{q[i]} * double{k[i]};
      logit[t] = s * double{p.scale};
      mx = std::max(mx, logit[t]);
    }
    double sum = 0;
    for (int32_t t = 0; t <= pos; ++t) sum += (logit[t] = std::exp(logit[t] - mx));
    for (int32_t t = 0; t <= pos; ++t) {
      out->vertical[t] += logit[t] / sum;
      out->slash[pos - t] += logit[t] / sum;
    }
  }
}

VsIndex SelectVs(const double* vertical, const double* slash, int32_t n, int32_t vertical_size,
                 int32_t slash_size) {
  return SelectVsImpl(vertical, slash, n, vertical_size, slash_size);
}

VsIndex SelectVs(const float* vertical, const float* slash, int32_t n, int32_t vertical_size,
                 int32_t slash_size) {
  return SelectVsImpl(vertical, slash, n, vertical_size, slash_size);
}

void ConvertVs(const VsIndex& x, int32_t start, BlockKeys* out) {
  const int32_t end = start + kBlock;
  out->range_start.clear();
  out->range_end.clear();
  out->columns.clear();
  const std::vector<int32_t>& D = x.slash;  // descending
  const std::vector<int32_t>& V = x.vertical;  // ascending
  size_t s = 0, v = 0;
  while (s < D.size() && D[s] >= end) ++s;  // diagonals that miss the block
  if (s == D.size()) return;
  int32_t rs = std::max(end - D[s], kBlock) - kBlock, re = rs + kBlock;
  auto emit = [&]() {
    for (; v < V.size() && V[v] < re; ++v) {
      if (V[v] < rs) out->columns.push_back(V[v]);  // else inside the range
    }
    out->range_start.push_back(rs);
    out->range_end.push_back(re);
  };
  for (++s; s < D.size(); ++s) {
    const int32_t e = std::max(end - D[s], kBlock);
    if (e > re + kBlock) {
      emit();
      rs = e - kBlock;
      re = e;
    } else if (e > re) {
      re += kBlock;
    }
  }
  emit();  // columns at or past the last range's end are after the block: dropped
}

void BlockSparseRef(const PagedAttentionParams<float>& p, int seq, int head, int32_t top_k,
                    std::vector<int32_t>* offsets, std::vector<int32_t>* blocks,
                    KvDtype k_dtype) {
  BlockSparseImpl<double>(p, k_dtype, seq, head, top_k, offsets, blocks);
}

void BlockSparseCpu(const PagedAttentionParams<float>& p, int seq, int head, int32_t top_k,
                    std::vector<int32_t>* offsets, std::vector<int32_t>* blocks,
                    KvDtype k_dtype) {
  BlockSparseImpl<float>(p, k_dtype, seq, head, top_k, offsets, blocks);
}

void BuildPlan(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
               const Options& options, MInferencePlan* plan) {
  BuildPlanImpl(p, patterns, options, /*ref=*/false, /*given=*/nullptr, plan);
}

void BuildPlanRef(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
                  const Options& options, MInferencePlan* plan) {
  BuildPlanImpl(p, patterns, options, /*ref=*/true, /*given=*/nullptr, plan);
}

bool BuildPlanFromScores(const PagedAttentionParams<float>& p, const HeadPattern* patterns,
                         const float* vertical, const float* slash, const Options& options,
                         MInferencePlan* plan) {
  if (p.num_seqs != 1) return false;
  for (int h = 0; h < p.num_q_heads; ++h) {
    if (patterns[h].pattern == Pattern::kBlockSparse) return false;
  }
  const GivenScores given{vertical, slash};
  BuildPlanImpl(p, patterns, options, /*ref=*/false, &given, plan);
  return true;
}

int64_t PlanPairs(const PagedAttentionParams<float>& p, const MInferencePlan& plan) {
  int64_t pairs = 0;
  int64_t row = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int32_t q_len = QueryLen(p, s), first = p.kv_lens[s] - q_len;
    const int32_t blocks = plan.query_block_start[s + 1] - plan.query_block_start[s];
    for (int32_t b = 0; b < blocks; ++b) {
      const int32_t q0 = first + b * kBlock, q1 = std::min(q0 + kBlock, p.kv_lens[s]) - 1;
      for (int h = 0; h < p.num_q_heads; ++h, ++row) {
        for (int32_t i = plan.row_start[row]; i < plan.row_start[row + 1]; ++i) {
          pairs += CausalPairsInBlock(q0, q1, int64_t{plan.key_blocks[i]} * kBlock);
        }
        for (int32_t i = plan.column_start[row]; i < plan.column_start[row + 1]; ++i) {
          pairs += std::max(0, q1 - std::max(q0, plan.columns[i]) + 1);
        }
      }
    }
  }
  return pairs;
}

int64_t DensePairs(const PagedAttentionParams<float>& p) {
  int64_t pairs = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int64_t q_len = QueryLen(p, s), first = p.kv_lens[s] - q_len;
    pairs += q_len * (first + 1) + q_len * (q_len - 1) / 2;
  }
  return pairs * p.num_q_heads;
}

}  // namespace sieve::kernels::minference
