// DoubleSparsity on the GPU (double_sparsity_cuda.h, and PagedDecodeTokenRun of paged_decode.h)
// against the CPU side of double_sparsity.h and PagedAttentionRef (label `gpu`). Every case draws
// fresh seeded random bf16 inputs (SIEVE_TEST_SEED overrides the base seed) over shuffled pages.
//
// Tolerances, derived:
//   - labels: exact, every byte of the label pool. The GPU reads bf16 keys and the CPU the same
//     values as floats; fp16 / bf16 conversion is round-to-nearest-even on both sides, and the
//     4-bit quantisation is the same IEEE fp32 operations (double_sparsity_cuda.h).
//   - scores: a row's fp32 score sums n = channels * terms products q_c * label_c (a bf16 times
//     an fp16 / bf16 / dequantised value: exact in fp32 for 16-bit labels) with fused
//     multiply-adds, plus for per-KV-head shared selection the group's query sum per channel
//     (group more roundings), plus one rounding of a dequantised 4-bit label. Each rounding errs
//     by at most u = 2^-24 of a partial sum bounded by sum |q_c label_c|, so the error against
//     the fp64 reference is at most (n + group + 2) u sum |q_c label_c|: each GPU score (read
//     from the selection's workspace) is checked against DsReferenceScores with that bound, and
//     with eps = (n + group + 2) u max_t sum |q_c label_c| over the row: selections
//     must equal the reference wherever the fp64 scores at the cut differ by more than 2 eps
//     (SPARSE_ATTENTION.md 6.1.6); otherwise every GPU token scores within 2 eps of the cut.
//   - attention outputs: relative L2 error <= 1e-2 and max abs error <= 2e-2, as the dense and
//     Quest decode tests (P and the output rounded to bf16, 2^-8 relative, on averages of
//     unit-variance values: about 3e-3 relative).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_decode.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/double_sparsity_cuda.h"

namespace sieve::kernels {
namespace {

uint64_t BaseSeed() {
  const char* env = std::getenv("SIEVE_TEST_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 20261205ull;
}

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// A device buffer freed on destruction.
template <typename T>
struct Dev {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T)); }
  Dev(const Dev&) = delete;
  ~Dev() {
    if (ptr) cudaFree(ptr);
  }
  template <typename H>
  void Put(const std::vector<H>& h) {
    static_assert(sizeof(H) == sizeof(T));
    cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename H>
  std::vector<H> Get() const {
    static_assert(sizeof(H) == sizeof(T));
    std::vector<H> h(n);
    cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

std::vector<float> Upcast(const std::vector<uint16_t>& bits) {
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) f[i] = Bf16ToFloat(bits[i]);
  return f;
}

int NumSms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

const char* FormatName(DsLabelFormat f) {
  return f == DsLabelFormat::kF16 ? "f16" : f == DsLabelFormat::kBf16 ? "bf16" : "int4";
}

// A paged decode batch: sequences over shuffled pages, random bf16 K, V and queries, and each
// label head's channels (a random prefix of a permutation).
struct Batch {
  DoubleSparsityShape shape;
  int stride = 0, num_pages = 0;
  std::vector<int32_t> kv_lens, page_table, channels;
  std::vector<uint16_t> q, k, v;  // bf16 bits
};

Batch MakeBatch(const DoubleSparsityShape& shape, const std::vector<int>& lens, uint64_t seed,
                float key_range = 1.7f) {
  Batch b;
  b.shape = shape;
  const int P = shape.page_size, d = shape.head_dim;
  b.kv_lens.assign(lens.begin(), lens.end());
  int total = 0;
  for (int len : lens) {
    const int pages = (len + P - 1) / P;
    b.stride = std::max(b.stride, pages);
    total += pages;
  }
  b.num_pages = total + 3;
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(b.num_pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  b.page_table.assign(lens.size() * b.stride, 0);
  int next = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    for (int j = 0; j < (lens[s] + P - 1) / P; ++j) b.page_table[s * b.stride + j] = ids[next++];
  }
  std::uniform_real_distribution<float> key(-key_range, key_range), val(-1.7f, 1.7f);
  const size_t elems = static_cast<size_t>(b.num_pages) * P * shape.num_kv_heads * d;
  b.k.resize(elems);
  b.v.resize(elems);
  for (size_t i = 0; i < elems; ++i) {
    b.k[i] = FloatToBf16(key(rng));
    b.v[i] = FloatToBf16(val(rng));
  }
  b.q.resize(lens.size() * shape.num_q_heads * d);
  for (auto& x : b.q) x = FloatToBf16(val(rng));
  for (int lh = 0; lh < DsLabelHeads(shape); ++lh) {
    std::vector<int32_t> perm(d);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    b.channels.insert(b.channels.end(), perm.begin(), perm.begin() + shape.channels);
  }
  return b;
}

// Label pool bytes of the batch (one layer).
size_t LabelBytes(const Batch& b) {
  return static_cast<size_t>(b.num_pages) * DsLabelPageBytes(b.shape);
}

// The KV slots of positions [first, first + count) of sequence s.
void AppendSlots(const Batch& b, int s, int first, int count, std::vector<int64_t>& slots) {
  const int P = b.shape.page_size;
  for (int t = first; t < first + count; ++t) {
    slots.push_back(int64_t{b.page_table[s * b.stride + t / P]} * P + t % P);
  }
}

// Writes labels of `slots` on the GPU into `labels`.
void WriteLabelsGpu(const Batch& b, const Dev<__nv_bfloat16>& k, const Dev<int32_t>& channels,
                    const std::vector<int64_t>& slots, Dev<uint8_t>& labels) {
  Dev<int64_t> dslots(slots.size());
  dslots.Put(slots);
  DsLabelsUpdateGpu u;
  u.shape = b.shape;
  u.k_cache = k.ptr;
  u.labels = labels.ptr;
  u.slots = dslots.ptr;
  u.num_tokens = static_cast<int32_t>(slots.size());
  u.channels = channels.ptr;
  ASSERT_CUDA(DsWriteLabelsGpu(u, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
}

// --- Labels --------------------------------------------------------------------------------------

struct LabelCase {
  int d;
  DsLabelFormat format;
  bool per_kv_head_labels;
};

void PrintTo(const LabelCase& c, std::ostream* os) {
  *os << "d" << c.d << "_" << FormatName(c.format) << (c.per_kv_head_labels ? "_kv" : "_q");
}

class DsLabelsGpuTest : public ::testing::TestWithParam<LabelCase> {};

// Steps of two sequences: a first chunk, a chunk starting mid-page, then decode tokens, over a
// label pool holding random bytes from "earlier owners". After every step the GPU's pool must
// equal the CPU's (DsWriteLabels over the same keys from the same starting bytes), byte for byte.
TEST_P(DsLabelsGpuTest, EqualCpuLabelsAfterEveryAppend) {
  const LabelCase& c = GetParam();
  DoubleSparsityShape shape{8, 2, c.d, 16, 24, c.format, c.per_kv_head_labels, false};
  ASSERT_EQ(DsValidateShape(shape), "");
  const std::vector<int> final_lens = {70, 41};
  Batch b = MakeBatch(shape, final_lens, BaseSeed() + c.d + 3 * static_cast<int>(c.format));
  const std::vector<float> kf = Upcast(b.k);
  std::vector<uint8_t> cpu(LabelBytes(b));
  std::mt19937_64 rng(BaseSeed() + 11);
  for (auto& x : cpu) x = static_cast<uint8_t>(rng());
  Dev<__nv_bfloat16> k(b.k.size());
  k.Put(b.k);
  Dev<int32_t> channels(b.channels.size());
  channels.Put(b.channels);
  Dev<uint8_t> labels(cpu.size());
  labels.Put(cpu);
  // (sequence, first position, tokens) per step.
  const std::vector<std::vector<std::array<int, 3>>> steps = {
      {{0, 0, 37}, {1, 0, 5}},  {{0, 37, 23}, {1, 5, 1}}, {{0, 60, 1}, {1, 6, 30}},
      {{0, 61, 1}, {1, 36, 1}}, {{0, 62, 8}, {1, 37, 4}}};
  for (size_t st = 0; st < steps.size(); ++st) {
    std::vector<int64_t> slots;
    std::vector<int32_t> kv_lens = {0, 0}, query_start = {0, 0, 0};
    for (const auto& [s, first, count] : steps[st]) {
      AppendSlots(b, s, first, count, slots);
      kv_lens[s] = first + count;
      query_start[s + 1] = count;
    }
    query_start[2] += query_start[1];
    WriteLabelsGpu(b, k, channels, slots, labels);
    if (HasFatalFailure()) return;
    DsAppendParams ap;
    ap.k_cache = kf.data();
    ap.page_table = b.page_table.data();
    ap.page_table_stride = b.stride;
    ap.kv_lens = kv_lens.data();
    ap.query_start = query_start.data();
    ap.num_seqs = 2;
    ap.channels = b.channels.data();
    ap.labels = cpu.data();
    DsWriteLabels(shape, ap);
    const std::vector<uint8_t> got = labels.Get<uint8_t>();
    for (size_t i = 0; i < cpu.size(); ++i) {
      ASSERT_EQ(got[i], cpu[i]) << "step " << st << " byte " << i << " (page "
                                << i / DsLabelPageBytes(shape) << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Formats, DsLabelsGpuTest,
    ::testing::Values(LabelCase{128, DsLabelFormat::kF16, false},
                      LabelCase{128, DsLabelFormat::kBf16, true},
                      LabelCase{64, DsLabelFormat::kInt4, false},
                      LabelCase{128, DsLabelFormat::kInt4, true}));

// --- Selection and sparse decode -----------------------------------------------------------------

struct SelectCase {
  std::string name;
  DoubleSparsityShape shape;
  int budget;
  std::vector<int> lens;
};

void PrintTo(const SelectCase& c, std::ostream* os) { *os << c.name; }

// The device side of one selection and its sparse decode.
struct GpuRun {
  std::vector<int32_t> positions, slots, counts;
  std::vector<float> scores;  // the workspace's scores [rows, stride * page_size]
  std::vector<uint8_t> labels;
  std::vector<uint16_t> out;  // sparse decode output, bf16 bits
};

// Writes every token's labels, selects and runs the token-list decode on the GPU. blocks_per_row
// forces the selection's cluster size (0: the launcher's choice).
void RunGpu(const Batch& b, int budget, int forced_kv_len, GpuRun& r, int blocks_per_row = 0) {
  const DoubleSparsityShape& s = b.shape;
  Dev<__nv_bfloat16> q(b.q.size()), k(b.k.size()), v(b.v.size()), out(b.q.size());
  q.Put(b.q);
  k.Put(b.k);
  v.Put(b.v);
  Dev<int32_t> table(b.page_table.size()), kv_lens(b.kv_lens.size()), channels(b.channels.size());
  table.Put(b.page_table);
  kv_lens.Put(b.kv_lens);
  channels.Put(b.channels);
  Dev<uint8_t> labels(LabelBytes(b));
  cudaMemset(labels.ptr, 0, labels.n);
  std::vector<int64_t> slots;
  for (size_t i = 0; i < b.kv_lens.size(); ++i) {
    AppendSlots(b, static_cast<int>(i), 0, b.kv_lens[i], slots);
  }
  WriteLabelsGpu(b, k, channels, slots, labels);
  if (::testing::Test::HasFatalFailure()) return;
  DsSelectGpuParams p;
  p.shape = s;
  p.q = q.ptr;
  p.labels = labels.ptr;
  p.channels = channels.ptr;
  p.page_table = table.ptr;
  p.kv_lens = kv_lens.ptr;
  p.page_table_stride = b.stride;
  p.num_seqs = static_cast<int32_t>(b.kv_lens.size());
  p.token_budget = budget;
  p.select_blocks_per_row = blocks_per_row;
  const size_t rows = static_cast<size_t>(p.num_seqs) * DsSelectRowsPerSeq(p);
  Dev<int32_t> positions(rows * budget), sel_slots(rows * budget), counts(rows);
  cudaMemset(positions.ptr, 0xff, positions.n * sizeof(int32_t));
  const size_t ws_bytes = DsSelectWorkspaceBytes(p);
  Dev<char> ws(ws_bytes);
  ASSERT_CUDA(DsSelectGpu(p, DsSelectGpuOutput{positions.ptr, sel_slots.ptr, counts.ptr}, ws.ptr,
                          ws_bytes, nullptr));
  const int group = s.num_q_heads / s.num_kv_heads;
  PagedDecodeShape shape;
  shape.num_seqs = p.num_seqs;
  shape.num_q_heads = s.num_q_heads;
  shape.num_kv_heads = s.num_kv_heads;
  shape.head_dim = s.head_dim;
  shape.heads_per_block = s.shared_selection ? group : 1;
  shape.max_kv_len = forced_kv_len > 0 ? forced_kv_len : budget;
  const PagedDecodePlan plan = Plan(shape, NumSms());
  ASSERT_GT(plan.num_splits, 0);
  Dev<char> dws(plan.workspace_bytes);
  PagedAttentionParams<__nv_bfloat16> a;
  a.q = q.ptr;
  a.k_cache = k.ptr;
  a.v_cache = v.ptr;
  a.out = out.ptr;
  a.page_table = table.ptr;  // ignored by the token run
  a.kv_lens = kv_lens.ptr;
  a.page_table_stride = b.stride;
  a.num_seqs = p.num_seqs;
  a.num_q_heads = s.num_q_heads;
  a.num_kv_heads = s.num_kv_heads;
  a.head_dim = s.head_dim;
  a.page_size = s.page_size;
  a.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const PagedDecodeTokenLists lists{sel_slots.ptr, counts.ptr, budget, shape.heads_per_block};
  ASSERT_CUDA(PagedDecodeTokenRun(a, plan, lists, plan.workspace_bytes ? dws.ptr : nullptr, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  r.scores.resize(rows * static_cast<size_t>(b.stride) * s.page_size);
  cudaMemcpy(r.scores.data(), ws.ptr, r.scores.size() * sizeof(float), cudaMemcpyDeviceToHost);
  r.positions = positions.Get<int32_t>();
  r.slots = sel_slots.Get<int32_t>();
  r.counts = counts.Get<int32_t>();
  r.labels = labels.Get<uint8_t>();
  r.out = out.Get<uint16_t>();
}

// PagedAttentionRef over the columns `rows` lists per (sequence, query head), or dense.
std::vector<float> RestrictedRef(const Batch& b, const std::vector<std::vector<int32_t>>* rows) {
  const DoubleSparsityShape& s = b.shape;
  const std::vector<float> qf = Upcast(b.q), kf = Upcast(b.k), vf = Upcast(b.v);
  std::vector<float> out(b.q.size());
  const int seqs = static_cast<int>(b.kv_lens.size());
  std::vector<int32_t> query_start(seqs + 1), qbs(seqs + 1), row_start, column_start(1, 0), cols;
  std::iota(query_start.begin(), query_start.end(), 0);
  std::iota(qbs.begin(), qbs.end(), 0);
  SparseAttentionIndex idx;
  int32_t none = 0;
  if (rows) {
    for (const auto& r : *rows) {
      cols.insert(cols.end(), r.begin(), r.end());
      column_start.push_back(static_cast<int32_t>(cols.size()));
    }
    row_start.assign(rows->size() + 1, 0);
    idx.query_block = 1;
    idx.key_block = s.page_size;
    idx.query_block_start = qbs.data();
    idx.row_start = row_start.data();
    idx.key_blocks = &none;
    idx.column_start = column_start.data();
    idx.columns = cols.data();
  }
  PagedAttentionParams<float> p;
  p.q = qf.data();
  p.k_cache = kf.data();
  p.v_cache = vf.data();
  p.out = out.data();
  p.page_table = b.page_table.data();
  p.kv_lens = b.kv_lens.data();
  p.query_start = query_start.data();
  p.page_table_stride = b.stride;
  p.num_seqs = seqs;
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.page_size = s.page_size;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  p.sparse = rows ? &idx : nullptr;
  PagedAttentionRef(p, 0);
  return out;
}

void ExpectClose(const std::vector<uint16_t>& got, const std::vector<float>& want) {
  double err2 = 0, ref2 = 0, max_abs = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = Bf16ToFloat(got[i]) - double{want[i]};
    err2 += e * e;
    ref2 += double{want[i]} * want[i];
    max_abs = std::max(max_abs, std::abs(e));
  }
  EXPECT_LE(std::sqrt(err2 / std::max(ref2, 1e-30)), 1e-2);
  EXPECT_LE(max_abs, 2e-2);
}

// Checks the GPU's selection against DsSelectRef row by row (see the file comment for eps) and
// returns the GPU's token lists per (sequence, query head) for the restricted reference.
std::vector<std::vector<int32_t>> CheckSelection(const Batch& b, int budget, const GpuRun& r) {
  const DoubleSparsityShape& s = b.shape;
  const std::vector<float> qf = Upcast(b.q);
  DsSelectParams rp;
  rp.q = qf.data();
  rp.page_table = b.page_table.data();
  rp.page_table_stride = b.stride;
  rp.kv_lens = b.kv_lens.data();
  rp.num_seqs = static_cast<int32_t>(b.kv_lens.size());
  rp.channels = b.channels.data();
  rp.labels = r.labels.data();
  rp.token_budget = budget;
  DsSelection ref;
  DsSelectRef(s, rp, ref);
  const int group = s.num_q_heads / s.num_kv_heads;
  const int rows_per_seq = s.shared_selection ? s.num_kv_heads : s.num_q_heads;
  const int heads_per_row = s.shared_selection ? group : 1;
  const int64_t page_bytes = DsLabelPageBytes(s);
  std::vector<std::vector<int32_t>> per_head(rp.num_seqs * s.num_q_heads);
  for (int seq = 0; seq < rp.num_seqs; ++seq) {
    const int L = b.kv_lens[seq], count = std::min(budget, L);
    for (int rr = 0; rr < rows_per_seq; ++rr) {
      SCOPED_TRACE("sequence " + std::to_string(seq) + " row " + std::to_string(rr));
      const size_t row = static_cast<size_t>(seq) * rows_per_seq + rr;
      EXPECT_EQ(r.counts[row], count);
      std::vector<int32_t> got(r.positions.begin() + row * budget,
                               r.positions.begin() + row * budget + count);
      for (int i = 0; i < count; ++i) {
        EXPECT_TRUE(got[i] >= 0 && got[i] < L) << got[i];
        if (i > 0) {
          EXPECT_LT(got[i - 1], got[i]);
        }
        if (got[i] < 0 || got[i] >= L) return per_head;
        const int P = s.page_size;
        EXPECT_EQ(r.slots[row * budget + i], b.page_table[seq * b.stride + got[i] / P] * P + got[i] % P);
      }
      const int head0 = s.shared_selection ? rr * group : rr;
      for (int h = 0; h < heads_per_row; ++h) per_head[seq * s.num_q_heads + head0 + h] = got;
      const size_t ref_row = static_cast<size_t>(seq) * s.num_q_heads + head0;
      const std::vector<int32_t> want(ref.columns.begin() + ref.column_start[ref_row],
                                      ref.columns.begin() + ref.column_start[ref_row + 1]);
      if (L <= budget) {
        EXPECT_EQ(got, want);
        continue;
      }
      const std::vector<double> score = DsReferenceScores(s, rp, seq, rr);
      // eps: the largest sum |q_c label_c| over the row's tokens (file comment); each GPU score
      // must be within its own token's eps of the fp64 one.
      const int n = s.channels * heads_per_row;
      const float* gpu_scores = r.scores.data() + row * static_cast<size_t>(b.stride) * s.page_size;
      double mag_max = 0;
      for (int t = 0; t < L; ++t) {
        const uint8_t* page = r.labels.data() + b.page_table[seq * b.stride + t / s.page_size] * page_bytes;
        double mag = 0;
        for (int h = head0; h < head0 + heads_per_row; ++h) {
          const int lh = s.per_kv_head_labels ? h / group : h;
          for (int c = 0; c < s.channels; ++c) {
            mag += std::abs(double{qf[(static_cast<size_t>(seq) * s.num_q_heads + h) * s.head_dim +
                                      b.channels[lh * s.channels + c]]} *
                            DsReadLabel(s, page, lh, c, t % s.page_size));
          }
        }
        mag_max = std::max(mag_max, mag);
        EXPECT_NEAR(gpu_scores[t], score[t], (n + group + 2) * std::ldexp(mag, -24))
            << "score of token " << t;
      }
      const double eps = (n + group + 2) * std::ldexp(mag_max, -24);
      std::vector<double> sorted = score;
      std::sort(sorted.begin(), sorted.end(), std::greater<>());
      const double cut = sorted[budget - 1];
      if (cut - sorted[budget] > 2 * eps) {
        EXPECT_EQ(got, want);
      } else {
        for (int t : got) EXPECT_GE(score[t], cut - 2 * eps) << "token " << t;
      }
    }
  }
  return per_head;
}

class DsSelectGpuTest : public ::testing::TestWithParam<SelectCase> {};

TEST_P(DsSelectGpuTest, MatchesReferenceAndRestrictedAttention) {
  const SelectCase& c = GetParam();
  ASSERT_EQ(DsValidateShape(c.shape), "");
  const Batch b = MakeBatch(c.shape, c.lens, BaseSeed() + c.shape.head_dim * 31 + c.budget);
  // Planned for the budget, then for 64K tokens (many splits, most of them empty).
  for (int forced : {0, 64 * 1024}) {
    SCOPED_TRACE(forced ? "planned for 64K tokens" : "planned for the budget");
    GpuRun r;
    RunGpu(b, c.budget, forced, r);
    if (HasFatalFailure()) return;
    const std::vector<std::vector<int32_t>> rows = CheckSelection(b, c.budget, r);
    ExpectClose(r.out, RestrictedRef(b, &rows));
  }
}

DoubleSparsityShape Shape(int hq, int hkv, int d, int channels, DsLabelFormat f, bool kv_labels,
                          bool shared) {
  return DoubleSparsityShape{hq, hkv, d, 16, channels, f, kv_labels, shared};
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DsSelectGpuTest,
    ::testing::Values(
        SelectCase{"d128_gqa4_f16", Shape(8, 2, 128, 16, DsLabelFormat::kF16, false, false), 64,
                   {70, 1000, 2049, 3001}},
        SelectCase{"d128_gqa4_f16_shared", Shape(8, 2, 128, 16, DsLabelFormat::kF16, false, true),
                   128, {1000, 4099}},
        SelectCase{"d128_gqa4_kvlabels_shared",
                   Shape(8, 2, 128, 32, DsLabelFormat::kF16, true, true), 100, {33, 2500}},
        SelectCase{"d64_mha_bf16", Shape(3, 3, 64, 8, DsLabelFormat::kBf16, false, false), 40,
                   {129, 700, 1601}},
        SelectCase{"d128_gqa8_int4", Shape(8, 1, 128, 16, DsLabelFormat::kInt4, false, false), 256,
                   {5000, 300}},
        SelectCase{"d64_gqa16_int4_kvlabels",
                   Shape(16, 1, 64, 16, DsLabelFormat::kInt4, true, false), 17, {1200}}),
    [](const ::testing::TestParamInfo<SelectCase>& i) { return i.param.name; });

// 6.5.3: with every channel and 16-bit labels of bf16 keys (bf16 labels: exact copies), the
// approximate score is q . k itself, so the selection is the exact top-k of q . k, checked
// against fp64 dot products of the full keys: equal wherever the cut's gap exceeds 2 eps (file
// comment; most rows of random keys), else every token within 2 eps of the cut. At least one
// row must have been compared exactly. The output is attention over the selected tokens.
TEST(DsGpuTest, AllChannelsSelectExactTopK) {
  int exact_rows = 0;
  for (bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "shared per KV head" : "per query head");
    const DoubleSparsityShape shape = Shape(8, 2, 128, 128, DsLabelFormat::kBf16, false, shared);
    const int budget = 200;
    const Batch b = MakeBatch(shape, {3000, 1777}, BaseSeed() + 404);
    GpuRun r;
    RunGpu(b, budget, 0, r);
    if (HasFatalFailure()) return;
    const std::vector<float> qf = Upcast(b.q), kf = Upcast(b.k);
    const int group = 4, d = 128, P = 16, rows_per_seq = shared ? 2 : 8;
    std::vector<std::vector<int32_t>> selected(2 * 8);
    for (int seq = 0; seq < 2; ++seq) {
      const int L = b.kv_lens[seq];
      for (int rr = 0; rr < rows_per_seq; ++rr) {
        const int head0 = shared ? rr * group : rr, heads = shared ? group : 1;
        std::vector<double> score(L, 0.0);
        double mag_max = 0;
        for (int t = 0; t < L; ++t) {
          const int page = b.page_table[seq * b.stride + t / P];
          double mag = 0;
          for (int h = head0; h < head0 + heads; ++h) {
            const float* qh = qf.data() + (static_cast<size_t>(seq) * 8 + h) * d;
            const float* kt = kf.data() + ((static_cast<size_t>(page) * P + t % P) * 2 + h / group) * d;
            for (int c = 0; c < d; ++c) {
              score[t] += double{qh[c]} * kt[c];
              mag += std::abs(double{qh[c]} * kt[c]);
            }
          }
          mag_max = std::max(mag_max, mag);
        }
        std::vector<int32_t> order(L);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t a, int32_t c) { return score[a] > score[c]; });
        const double eps = (d * heads + group + 2) * std::ldexp(mag_max, -24);
        std::vector<int32_t> want(order.begin(), order.begin() + budget);
        std::sort(want.begin(), want.end());
        const size_t row = static_cast<size_t>(seq) * rows_per_seq + rr;
        const std::vector<int32_t> got(r.positions.begin() + row * budget,
                                       r.positions.begin() + (row + 1) * budget);
        const double cut = score[order[budget - 1]];
        if (cut - score[order[budget]] > 2 * eps) {
          EXPECT_EQ(got, want) << "sequence " << seq << " row " << rr;
          ++exact_rows;
        } else {
          for (int t : got) EXPECT_GE(score[t], cut - 2 * eps) << "token " << t;
        }
        for (int h = head0; h < head0 + heads; ++h) selected[seq * 8 + h] = got;
      }
    }
    ExpectClose(r.out, RestrictedRef(b, &selected));
  }
  EXPECT_GT(exact_rows, 0) << "every row had a near-tie at the cut: pick another SIEVE_TEST_SEED";
}

// 6.1.3 / 6.5.4: k >= L reads every token: positions 0 .. L - 1 and the dense output.
TEST(DsGpuTest, BudgetCoveringContextEqualsDense) {
  for (bool shared : {false, true}) {
    const DoubleSparsityShape shape = Shape(8, 2, 128, 16, DsLabelFormat::kF16, false, shared);
    const Batch b = MakeBatch(shape, {100, 1000, 1024}, BaseSeed() + 99);
    GpuRun r;
    RunGpu(b, 1024, 0, r);
    if (HasFatalFailure()) return;
    const int rows_per_seq = shared ? 2 : 8;
    for (int seq = 0; seq < 3; ++seq) {
      for (int rr = 0; rr < rows_per_seq; ++rr) {
        const size_t row = static_cast<size_t>(seq) * rows_per_seq + rr;
        ASSERT_EQ(r.counts[row], b.kv_lens[seq]);
        for (int t = 0; t < b.kv_lens[seq]; ++t) ASSERT_EQ(r.positions[row * 1024 + t], t);
      }
    }
    ExpectClose(r.out, RestrictedRef(b, nullptr));
  }
}

// Ties: with every key zero, every score is 0 and the top k are the lowest k positions (the
// CPU's rule), for every cluster size of the selection: the tied keys span the cluster's blocks,
// so the lower-ranked blocks' ties must be taken first.
TEST(DsGpuTest, TiedScoresKeepTheLowestPositions) {
  for (DsLabelFormat f : {DsLabelFormat::kF16, DsLabelFormat::kInt4}) {
    const DoubleSparsityShape shape = Shape(8, 2, 128, 16, f, false, false);
    Batch b = MakeBatch(shape, {3000, 40000}, BaseSeed() + 77);
    std::fill(b.k.begin(), b.k.end(), uint16_t{0});
    for (int blocks : {1, 2, 8}) {
      SCOPED_TRACE(std::string(FormatName(f)) + ", blocks per row " + std::to_string(blocks));
      const int budget = 300;
      GpuRun r;
      RunGpu(b, budget, 0, r, blocks);
      if (HasFatalFailure()) return;
      for (size_t row = 0; row < 2 * 8; ++row) {
        ASSERT_EQ(r.counts[row], budget);
        for (int i = 0; i < budget; ++i) {
          ASSERT_EQ(r.positions[row * budget + i], i) << "row " << row;
        }
      }
      std::vector<std::vector<int32_t>> rows(2 * 8);
      for (auto& x : rows) {
        x.resize(budget);
        std::iota(x.begin(), x.end(), 0);
      }
      ExpectClose(r.out, RestrictedRef(b, &rows));
    }
  }
}

// Every cluster size of the selection (1, 2, 4, 8 blocks per row) keeps exactly the k best of the
// GPU's own fp32 scores, ties to the lowest positions, in increasing order. Every token's keys
// copy one of 48 tokens' (slot * 7919 mod 48), so scores come in large groups of exact ties and
// the cut falls inside one, spread over the blocks' slices.
TEST(DsGpuTest, EveryClusterSizeKeepsTheTopKOfItsScores) {
  const DoubleSparsityShape shape = Shape(8, 2, 128, 16, DsLabelFormat::kF16, false, true);
  Batch b = MakeBatch(shape, {777, 9001, 70000}, BaseSeed() + 91);
  const size_t token = static_cast<size_t>(shape.num_kv_heads) * shape.head_dim;
  const std::vector<uint16_t> protos(b.k.begin(), b.k.begin() + 48 * token);
  for (size_t t = 0; t < b.k.size() / token; ++t) {
    std::copy_n(protos.begin() + (t * 7919) % 48 * token, token, b.k.begin() + t * token);
  }
  const int budget = 512;
  std::vector<int32_t> first;
  for (int blocks : {1, 2, 4, 8}) {
    SCOPED_TRACE("blocks per row " + std::to_string(blocks));
    GpuRun r;
    RunGpu(b, budget, 0, r, blocks);
    if (HasFatalFailure()) return;
    const int rows_per_seq = shape.num_kv_heads;  // shared selection
    const size_t stride = static_cast<size_t>(b.stride) * shape.page_size;
    for (size_t seq = 0; seq < b.kv_lens.size(); ++seq) {
      const int len = b.kv_lens[seq];
      for (int h = 0; h < rows_per_seq; ++h) {
        const size_t row = seq * rows_per_seq + h;
        const int count = std::min(len, budget);
        ASSERT_EQ(r.counts[row], count);
        std::vector<int32_t> want(len);
        std::iota(want.begin(), want.end(), 0);
        if (len > budget) {
          const float* sc = r.scores.data() + row * stride;
          std::stable_sort(want.begin(), want.end(),
                           [sc](int32_t x, int32_t y) { return sc[x] > sc[y]; });
          want.resize(budget);
          std::sort(want.begin(), want.end());
        }
        const std::vector<int32_t> got(r.positions.begin() + row * budget,
                                       r.positions.begin() + row * budget + count);
        ASSERT_EQ(got, want) << "sequence " << seq << " row " << h;
      }
    }
    if (first.empty()) {
      first = r.positions;
    } else {
      EXPECT_EQ(r.positions, first);
    }
  }
}

// 6.5.5: keys uniform in [-0.1, 0.1] except one, t*, carrying 10 sign(q_c) on each head's
// outlier channels: t* is selected for every head and the output is close to v_t*.
TEST(DsGpuTest, PlantedNeedleIsSelected) {
  for (DsLabelFormat f : {DsLabelFormat::kF16, DsLabelFormat::kInt4}) {
    SCOPED_TRACE(FormatName(f));
    const DoubleSparsityShape shape = Shape(4, 4, 128, 16, f, false, false);  // MHA
    Batch b = MakeBatch(shape, {2000}, BaseSeed() + 5, 0.1f);
    const int d = 128, t_star = 777, P = 16, budget = 64;
    const size_t tok = static_cast<size_t>(b.page_table[t_star / P]) * P + t_star % P;
    for (int h = 0; h < 4; ++h) {
      for (int c = 0; c < shape.channels; ++c) {
        const int ch = b.channels[h * shape.channels + c];
        b.k[(tok * 4 + h) * d + ch] = FloatToBf16(Bf16ToFloat(b.q[h * d + ch]) >= 0 ? 10.0f : -10.0f);
      }
    }
    GpuRun r;
    RunGpu(b, budget, 0, r);
    if (HasFatalFailure()) return;
    const std::vector<float> vf = Upcast(b.v);
    for (int h = 0; h < 4; ++h) {
      const auto first = r.positions.begin() + h * budget;
      EXPECT_TRUE(std::binary_search(first, first + budget, t_star)) << "head " << h;
      // The needle's logit is about 10 sum_C |q_c| / sqrt(d) (12 with 16 channels of mean |q|
      // 0.85), the 63 others' |q . k| / sqrt(d) < 1 (keys <= 0.1): they carry about 63 e^-10 of
      // the mass, which moves the output by < 1e-2 (|v| <= 1.7) before bf16 rounding.
      for (int c = 0; c < d; ++c) {
        EXPECT_NEAR(Bf16ToFloat(r.out[h * d + c]), vf[(tok * 4 + h) * d + c], 2e-2) << "head " << h;
      }
    }
  }
}

}  // namespace
}  // namespace sieve::kernels
