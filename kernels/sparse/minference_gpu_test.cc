// MInference on the GPU (label `gpu`): the vertical-slash estimator (minference_cuda.h) against
// the fp64 reference VsScoresRef on the same bf16 values, the selections made from both, and
// the block-sparse prefill kernel's 64-query-row mode (paged_prefill.h) running MInference plans
// against PagedAttentionRef on the same plan. Fresh random inputs on shuffled pages (seed from
// SIEVE_TEST_SEED if set); GQA (group 4) and MHA, d 64 and 128; sequences that are fresh
// prompts, chunks over earlier keys (starting mid-block), a single query, and lengths that
// straddle tiles.
//
// Score tolerance, relative per score: 2e-4, derived as minference_test.cc's for the fp32 CPU
// path, which the GPU path follows step for step: a logit is a d-term fp32 FMA dot product times
// 1/sqrt(d) (inputs in [-1, 1]: absolute error <= sqrt(d) d u, 8.7e-5 at d 128, u = 2^-24); a
// probability's relative error is its logit's plus the normaliser's plus a few u from expf
// (<= 1.8e-4). The GPU's normaliser is a sum of per-tile partial sums, each rescaled once by
// expf(partial max - row max): one more rounding per tile, at most kv_len / 64 * 3u = 5e-6
// relative at 1500 keys. A score sums at most 64 positive probabilities (64 u); a slash score
// adds at most two tile partials (u).
//
// Attention tolerance: relative L2 error <= 1e-2 and max abs error <= 2e-2 against the fp64
// reference, as paged_prefill_sparse_gpu_test.cc (P and the output rounded to bf16, 2^-8
// relative; outputs are averages of unit-variance values).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/attention/paged_kv_test_util.h"
#include "kernels/attention/paged_prefill.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/minference.h"
#include "kernels/sparse/minference_cuda.h"

namespace sieve::kernels {
namespace {

namespace mi = minference;
using test_util::PagedBatch;
using test_util::SeqLens;

constexpr double kScoreRelTol = 2e-4;
constexpr int kPage = 16;

uint64_t Seed(uint64_t salt) {
  const char* env = std::getenv("SIEVE_TEST_SEED");
  return (env ? std::strtoull(env, nullptr, 10) : 20261205ull) + salt;
}

// Device memory freed at scope exit.
template <typename T>
struct DevBuf {
  T* ptr = nullptr;
  explicit DevBuf(size_t n) { cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)); }
  explicit DevBuf(const std::vector<T>& h) : DevBuf(h.size()) {
    cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DevBuf() { cudaFree(ptr); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

std::vector<uint16_t> ToBf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = FloatToBf16(x[i]);
  return out;
}

// A paged batch whose q, K and V are bf16-representable (so the references see the GPU's
// values), with device copies.
struct GpuBatch {
  PagedBatch b;
  DevBuf<uint16_t> q, k, v;
  DevBuf<int32_t> table, kv_lens, query_start;

  static PagedBatch Rounded(const std::vector<SeqLens>& seqs, int d, int hq, int hkv,
                            uint32_t seed) {
    PagedBatch b(seqs, kPage, d, hq, hkv, seed);
    for (auto* vec : {&b.q, &b.k, &b.v}) {
      for (float& x : *vec) x = Bf16ToFloat(FloatToBf16(x));
    }
    return b;
  }
  GpuBatch(const std::vector<SeqLens>& seqs, int d, int hq, int hkv, uint32_t seed)
      : b(Rounded(seqs, d, hq, hkv, seed)),
        q(ToBf16(b.q)),
        k(ToBf16(b.k)),
        v(ToBf16(b.v)),
        table(b.page_table),
        kv_lens(b.kv_lens),
        query_start(b.query_start) {}

  int QLen(int s) const { return b.query_start[s + 1] - b.query_start[s]; }

  // The estimate of sequence s (its queries and page-table row).
  MInferenceVsGpuParams Estimate(int s, int last_q = mi::kDefaultLastQ) const {
    MInferenceVsGpuParams p;
    const int64_t row = int64_t{b.q_heads} * b.head_dim;
    p.q = reinterpret_cast<const __nv_bfloat16*>(q.ptr) + b.query_start[s] * row;
    p.q_row_stride = row;
    p.k_cache = reinterpret_cast<const __nv_bfloat16*>(k.ptr);
    p.page_table = table.ptr + static_cast<int64_t>(s) * b.stride;
    p.page_size = b.page_size;
    p.num_q_heads = b.q_heads;
    p.num_kv_heads = b.kv_heads;
    p.head_dim = b.head_dim;
    p.q_len = QLen(s);
    p.kv_len = b.kv_lens[s];
    p.last_q = last_q;
    return p;
  }

  // GPU scores of sequence s: vertical and slash, [q_heads, kv_len] each.
  void Scores(int s, std::vector<float>* vertical, std::vector<float>* slash,
              int last_q = mi::kDefaultLastQ) const {
    const MInferenceVsGpuParams p = Estimate(s, last_q);
    ASSERT_TRUE(MInferenceVsGpuSupports(p));
    const size_t n = static_cast<size_t>(p.num_q_heads) * p.kv_len;
    const size_t ws = MInferenceVsGpuWorkspaceBytes(p);
    DevBuf<float> dv(n), ds(n);
    DevBuf<char> dws(ws);
    // Poison: every score must be written.
    cudaMemset(dv.ptr, 0xff, n * sizeof(float));
    cudaMemset(ds.ptr, 0xff, n * sizeof(float));
    ASSERT_EQ(MInferenceVsGpuWorkspaceBytes(p) > 0, true);
    ASSERT_EQ(MInferenceVsScoresGpu(p, dv.ptr, ds.ptr, dws.ptr, ws - 1, nullptr),
              cudaErrorInvalidValue);
    ASSERT_EQ(MInferenceVsScoresGpu(p, dv.ptr, ds.ptr, dws.ptr, ws, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    vertical->resize(n);
    slash->resize(n);
    cudaMemcpy(vertical->data(), dv.ptr, n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(slash->data(), ds.ptr, n * sizeof(float), cudaMemcpyDeviceToHost);
  }

  // Runs `plan` (the whole batch's, 64-query rows) with the GPU kernel; bf16 outputs as floats.
  void RunPlan(const mi::MInferencePlan* plan, std::vector<float>* out) const {
    const int tokens = b.query_start.back();
    const size_t elems = static_cast<size_t>(tokens) * b.q_heads * b.head_dim;
    DevBuf<uint16_t> dout(std::vector<uint16_t>(elems, 0x7fc0));  // NaN: every row is written
    std::vector<int32_t> empty = {0};
    DevBuf<int32_t> qbs(plan ? plan->query_block_start : empty);
    DevBuf<int32_t> rs(plan ? plan->row_start : empty), kb(plan ? plan->key_blocks : empty);
    DevBuf<int32_t> cs(plan ? plan->column_start : empty), cl(plan ? plan->columns : empty);
    SparseAttentionIndex idx;
    idx.query_block = mi::kBlock;
    idx.key_block = mi::kBlock;
    idx.query_block_start = qbs.ptr;
    idx.row_start = rs.ptr;
    idx.key_blocks = kb.ptr;
    idx.column_start = cs.ptr;
    idx.columns = cl.ptr;
    PagedAttentionParams<__nv_bfloat16> p;
    p.q = reinterpret_cast<const __nv_bfloat16*>(q.ptr);
    p.k_cache = reinterpret_cast<const __nv_bfloat16*>(k.ptr);
    p.v_cache = reinterpret_cast<const __nv_bfloat16*>(v.ptr);
    p.out = reinterpret_cast<__nv_bfloat16*>(dout.ptr);
    p.page_table = table.ptr;
    p.kv_lens = kv_lens.ptr;
    p.query_start = query_start.ptr;
    p.page_table_stride = b.stride;
    p.num_seqs = static_cast<int32_t>(b.kv_lens.size());
    p.num_q_heads = b.q_heads;
    p.num_kv_heads = b.kv_heads;
    p.head_dim = b.head_dim;
    p.page_size = b.page_size;
    p.scale = 1.0f / std::sqrt(static_cast<float>(b.head_dim));
    p.sparse = plan ? &idx : nullptr;
    int max_q = 1;
    for (int s = 0; s < p.num_seqs; ++s) max_q = std::max(max_q, QLen(s));
    const PagedPrefillShape shape{p.num_seqs, b.q_heads, b.kv_heads, b.head_dim, max_q};
    int dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (plan != nullptr) {  // the wgmma kernel refuses sparse indexes
      EXPECT_EQ(PagedPrefillRun(p, Plan(shape, sms, PagedPrefillKernel::kWgmma), nullptr, nullptr),
                cudaErrorInvalidValue);
    }
    ASSERT_EQ(PagedPrefillRun(p, Plan(shape, sms, PagedPrefillKernel::kMmaSync), nullptr, nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint16_t> got(elems);
    cudaMemcpy(got.data(), dout.ptr, elems * 2, cudaMemcpyDeviceToHost);
    out->resize(elems);
    for (size_t i = 0; i < elems; ++i) (*out)[i] = Bf16ToFloat(got[i]);
  }

  // PagedAttentionRef (fp64 accumulation) with `plan` (null: dense).
  std::vector<float> Reference(const mi::MInferencePlan* plan) const {
    std::vector<float> out;
    const SparseAttentionIndex idx = plan ? plan->View() : SparseAttentionIndex{};
    PagedAttentionRef(b.Params(out, plan ? &idx : nullptr), 0);
    return out;
  }
};

// The batch's plan from GPU scores, sequence by sequence (BuildPlanFromScores), concatenated.
mi::MInferencePlan PlanFromGpuScores(const GpuBatch& g, const std::vector<mi::HeadPattern>& pats) {
  mi::MInferencePlan all;
  all.query_block_start = {0};
  all.row_start = {0};
  all.column_start = {0};
  for (int s = 0; s < static_cast<int>(g.b.kv_lens.size()); ++s) {
    std::vector<float> v, sl;
    g.Scores(s, &v, &sl);
    const int32_t kv = g.b.kv_lens[s], qs[2] = {0, g.QLen(s)};
    PagedAttentionParams<float> lp;
    lp.kv_lens = &kv;
    lp.query_start = qs;
    lp.num_seqs = 1;
    lp.num_q_heads = g.b.q_heads;
    lp.num_kv_heads = g.b.kv_heads;
    lp.head_dim = g.b.head_dim;
    lp.page_size = g.b.page_size;
    mi::MInferencePlan one;
    EXPECT_TRUE(mi::BuildPlanFromScores(lp, pats.data(), v.data(), sl.data(), mi::Options{}, &one));
    all.query_block_start.push_back(all.query_block_start.back() + one.query_block_start[1]);
    for (size_t r = 1; r < one.row_start.size(); ++r) {
      all.row_start.push_back(static_cast<int32_t>(all.key_blocks.size()) + one.row_start[r]);
      all.column_start.push_back(static_cast<int32_t>(all.columns.size()) + one.column_start[r]);
    }
    // (the offsets above are taken before these appends)
    all.key_blocks.insert(all.key_blocks.end(), one.key_blocks.begin(), one.key_blocks.end());
    all.columns.insert(all.columns.end(), one.columns.begin(), one.columns.end());
  }
  return all;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double e2 = 0, r2 = 0, max_abs = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = double{got[i]} - want[i];
    ASSERT_TRUE(std::isfinite(e)) << what << ": output element " << i;
    e2 += e * e;
    r2 += double{want[i]} * want[i];
    max_abs = std::max(max_abs, std::abs(e));
  }
  EXPECT_LE(std::sqrt(e2 / std::max(r2, 1e-30)), 1e-2) << what;
  EXPECT_LE(max_abs, 2e-2) << what;
}

// 6.1.6: a selection from GPU scores equals the fp64 one except for items whose fp64 score lies
// within the score tolerance of the fp64 cut; sizes always match.
void ExpectSameUpToTies(const std::vector<int32_t>& gpu, const std::vector<int32_t>& ref,
                        const double* score, int forced, const std::string& what) {
  ASSERT_EQ(gpu.size(), ref.size()) << what;
  double cut = std::numeric_limits<double>::infinity();
  for (int32_t i : ref) {
    if (i >= forced) cut = std::min(cut, score[i]);
  }
  const std::set<int32_t> r(ref.begin(), ref.end());
  for (int32_t i : gpu) {
    if (r.count(i) == 0) {
      EXPECT_GE(score[i], cut * (1 - 2 * kScoreRelTol)) << what << ": item " << i;
    }
  }
}

struct Shape {
  int head_dim, group;
};

std::string Name(const ::testing::TestParamInfo<Shape>& i) {
  std::string name = "d";
  name += std::to_string(i.param.head_dim);
  name += "_g";
  name += std::to_string(i.param.group);
  return name;
}

class MInferenceGpuTest : public ::testing::TestWithParam<Shape> {};

// (kv_len, q_len): tiny, one short block, a prefill, a chunk over earlier keys starting
// mid-block, a single query, lengths that straddle tiles.
const std::vector<SeqLens> kSeqs = {{2, 2}, {63, 63}, {700, 700}, {1500, 300}, {200, 1},
                                    {129, 65}};

TEST_P(MInferenceGpuTest, ScoresMatchReferenceAndSelectTheSameIndices) {
  const Shape sh = GetParam();
  const GpuBatch g(kSeqs, sh.head_dim, 2 * sh.group, 2, Seed(sh.head_dim + sh.group));
  const auto p = g.b.Params();
  for (int s = 0; s < p.num_seqs; ++s) {
    std::vector<float> v, sl;
    g.Scores(s, &v, &sl);
    const int n = g.b.kv_lens[s];
    const int lq = std::min(mi::kDefaultLastQ, g.QLen(s));
    for (int h = 0; h < p.num_q_heads; ++h) {
      const std::string what = "seq " + std::to_string(s) + " head " + std::to_string(h);
      mi::VsScores ref;
      mi::VsScoresRef(p, s, h, mi::kDefaultLastQ, &ref);
      const float* gv = v.data() + static_cast<size_t>(h) * n;
      const float* gs = sl.data() + static_cast<size_t>(h) * n;
      // 6.2.2 on the GPU's scores: each sums to Lq (fp32 sums of n terms: n u relative).
      double sum_v = 0, sum_s = 0;
      int bad = 0;
      for (int j = 0; j < n; ++j) {
        sum_v += gv[j];
        sum_s += gs[j];
        bad += !(std::abs(gv[j] - ref.vertical[j]) <= kScoreRelTol * ref.vertical[j]);
        bad += !(std::abs(gs[j] - ref.slash[j]) <= kScoreRelTol * ref.slash[j]);
      }
      EXPECT_EQ(bad, 0) << what;
      EXPECT_NEAR(sum_v, lq, kScoreRelTol * lq) << what;
      EXPECT_NEAR(sum_s, lq, kScoreRelTol * lq) << what;
      for (const auto& [vs, ss] : {std::pair{30, 50}, {100, 150}, {300, 400}}) {
        const mi::VsIndex x = mi::SelectVs(gv, gs, n, vs, ss);
        const mi::VsIndex y = mi::SelectVs(ref.vertical.data(), ref.slash.data(), n, vs, ss);
        const std::string w = what + " sizes " + std::to_string(vs) + "/" + std::to_string(ss);
        ExpectSameUpToTies(x.vertical, y.vertical, ref.vertical.data(), mi::kForcedColumns,
                           w + " V");
        ExpectSameUpToTies(x.slash, y.slash, ref.slash.data(), mi::kForcedDiagonals, w + " D");
      }
    }
  }
}

// 6.1.1: the kernel's output on the plan made from the GPU's scores equals the reference's on
// the same plan; VS heads at two budgets, plus A-shape heads.
TEST_P(MInferenceGpuTest, AttentionMatchesReferenceOnTheSamePlan) {
  const Shape sh = GetParam();
  const GpuBatch g(kSeqs, sh.head_dim, 2 * sh.group, 2, Seed(100 + sh.head_dim + sh.group));
  const int hq = 2 * sh.group;
  for (const auto& [vs, ss] : {std::pair{30, 50}, {100, 150}}) {
    SCOPED_TRACE("sizes " + std::to_string(vs) + "/" + std::to_string(ss));
    std::vector<mi::HeadPattern> pats(hq, {mi::Pattern::kVerticalSlash, vs, ss});
    pats[hq - 1] = {mi::Pattern::kAShape, 20, 130};  // sinks 20, window 130
    const mi::MInferencePlan plan = PlanFromGpuScores(g, pats);
    // Sparse for real: the long sequences read fewer pairs than dense.
    const auto lp = g.b.Params();
    EXPECT_LT(mi::PlanPairs(lp, plan), mi::DensePairs(lp));
    std::vector<float> got;
    g.RunPlan(&plan, &got);
    ExpectClose(got, g.Reference(&plan), "plan from GPU scores");
  }
}

// 6.1.3: budgets that cover every key (vertical_size or slash_size >= kv_len) give dense
// attention: the sparse kernel's output equals the dense reference and the dense kernel's.
TEST_P(MInferenceGpuTest, BudgetsCoveringEverythingEqualDense) {
  const Shape sh = GetParam();
  const GpuBatch g(kSeqs, sh.head_dim, 2 * sh.group, 2, Seed(200 + sh.head_dim + sh.group));
  const int hq = 2 * sh.group;
  std::vector<float> dense;
  g.RunPlan(nullptr, &dense);
  const std::vector<float> want = g.Reference(nullptr);
  ExpectClose(dense, want, "dense kernel");
  for (const auto& [vs, ss] : {std::pair{30, 1500}, {1500, 50}}) {
    SCOPED_TRACE("sizes " + std::to_string(vs) + "/" + std::to_string(ss));
    std::vector<mi::HeadPattern> pats(hq, {mi::Pattern::kVerticalSlash, vs, ss});
    const mi::MInferencePlan plan = PlanFromGpuScores(g, pats);
    EXPECT_EQ(mi::PlanPairs(g.b.Params(), plan), mi::DensePairs(g.b.Params()));
    std::vector<float> got;
    g.RunPlan(&plan, &got);
    ExpectClose(got, want, "sparse kernel, covering budgets, vs dense reference");
    ExpectClose(got, dense, "sparse kernel, covering budgets, vs dense kernel");
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, MInferenceGpuTest,
                         ::testing::Values(Shape{128, 4}, Shape{64, 1}, Shape{128, 1},
                                           Shape{64, 4}),
                         Name);

// Section 1.9's chunked extension: the last chunk of a prompt (its last queries against all
// keys) gets the same GPU scores, bit for bit, and so the same selection, as the whole prompt
// in one prefill; and the estimate is deterministic (6.1.5).
TEST(MInferenceGpuChunkTest, LastChunkSelectsWhatTheWholePromptSelects) {
  const int n = 1700;
  GpuBatch g({{n, n}, {n, 333}, {n, 40}}, 128, 8, 2, Seed(300));
  // The sequences are drawn independently: give the chunks the whole prompt's keys and queries.
  GpuBatch& m = g;
  for (int s = 1; s < 3; ++s) {
    for (int t = 0; t < n; ++t) {
      for (int h = 0; h < 2; ++h) {
        std::copy(m.b.Key(0, h, t), m.b.Key(0, h, t) + 128, m.b.Key(s, h, t));
      }
    }
    for (int j = 0; j < g.QLen(s); ++j) {
      for (int h = 0; h < 8; ++h) {
        const float* src = m.b.Query(0, h, n - g.QLen(s) + j);
        std::copy(src, src + 128, m.b.Query(s, h, j));
      }
    }
  }
  const std::vector<uint16_t> qb = ToBf16(m.b.q), kb = ToBf16(m.b.k);
  cudaMemcpy(m.q.ptr, qb.data(), qb.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(m.k.ptr, kb.data(), kb.size() * 2, cudaMemcpyHostToDevice);
  std::vector<float> v0, s0, v0b, s0b;
  g.Scores(0, &v0, &s0);
  g.Scores(0, &v0b, &s0b);
  EXPECT_EQ(v0, v0b) << "vertical scores differ between two identical runs";
  EXPECT_EQ(s0, s0b) << "slash scores differ between two identical runs";
  for (int s = 1; s < 3; ++s) {
    std::vector<float> v, sl;
    g.Scores(s, &v, &sl);
    // The chunk of 40 queries estimates from 40 rows, the others from the same last 64.
    if (g.QLen(s) >= mi::kDefaultLastQ) {
      EXPECT_EQ(v, v0) << "chunk " << s;
      EXPECT_EQ(sl, s0) << "chunk " << s;
      for (int h = 0; h < 8; ++h) {
        const size_t off = static_cast<size_t>(h) * n;
        const mi::VsIndex a = mi::SelectVs(v.data() + off, sl.data() + off, n, 100, 300);
        const mi::VsIndex b = mi::SelectVs(v0.data() + off, s0.data() + off, n, 100, 300);
        EXPECT_EQ(a.vertical, b.vertical);
        EXPECT_EQ(a.slash, b.slash);
      }
    } else {
      EXPECT_NE(v, v0);
    }
  }
  // And the plan of chunk 1 runs like the whole prompt's rows over the same positions.
  std::vector<mi::HeadPattern> pats(8, {mi::Pattern::kVerticalSlash, 100, 300});
  const mi::MInferencePlan plan = PlanFromGpuScores(g, pats);
  std::vector<float> got;
  g.RunPlan(&plan, &got);
  ExpectClose(got, g.Reference(&plan), "chunked plans");
}

// The kernel's 64-query-row mode on random plans: per (query block, head) a random subset of the
// causal key blocks and random single columns outside them (including columns past a row's
// first queries, which the causal mask must cut, and rows listing nothing); several sequences
// with chunks starting mid-block. Checks the merge of the two halves' lists and the gather.
TEST(MInferenceGpuKernelTest, RandomPlansWithColumnsMatchReference) {
  for (const auto& [d, hkv, group] : {std::tuple{128, 2, 4}, {64, 4, 1}, {128, 1, 8}}) {
    SCOPED_TRACE("d " + std::to_string(d) + " group " + std::to_string(group));
    const int hq = hkv * group;
    const GpuBatch g({{700, 700}, {1280, 512}, {1000, 333}, {90, 1}, {300, 130}}, d, hq, hkv,
                     Seed(400 + d + group));
    std::mt19937_64 rng(Seed(500 + d + group));
    std::bernoulli_distribution keep(0.3), col(0.2), empty(0.05);
    mi::MInferencePlan plan;
    plan.query_block_start = {0};
    plan.row_start = {0};
    plan.column_start = {0};
    for (int s = 0; s < static_cast<int>(g.b.kv_lens.size()); ++s) {
      const int q_len = g.QLen(s), first = g.b.kv_lens[s] - q_len;
      const int qblocks = (q_len + mi::kBlock - 1) / mi::kBlock;
      plan.query_block_start.push_back(plan.query_block_start.back() + qblocks);
      for (int qb = 0; qb < qblocks; ++qb) {
        const int last = first + std::min(q_len, (qb + 1) * mi::kBlock) - 1;
        for (int h = 0; h < hq; ++h) {
          if (!empty(rng)) {
            std::vector<bool> listed(last / mi::kBlock + 1, false);
            for (int j = 0; j * mi::kBlock <= last; ++j) {
              if (keep(rng)) {
                listed[j] = true;
                plan.key_blocks.push_back(j);
              }
            }
            for (int t = 0; t <= last; ++t) {
              if (!listed[t / mi::kBlock] && col(rng)) plan.columns.push_back(t);
            }
          }
          plan.row_start.push_back(static_cast<int32_t>(plan.key_blocks.size()));
          plan.column_start.push_back(static_cast<int32_t>(plan.columns.size()));
        }
      }
    }
    std::vector<float> got;
    g.RunPlan(&plan, &got);
    ExpectClose(got, g.Reference(&plan), "random plan");
    // Bitwise deterministic.
    std::vector<float> again;
    g.RunPlan(&plan, &again);
    EXPECT_EQ(got, again);
  }
}

// The index built on the device equals BuildPlanFromScores's on the same scores, exactly: the
// same top-k (forced entries, ties to the lower index: the scores are quantized so that many
// tie) and the same section 1.6 rows, for vertical-slash and A-shape heads, sizes below the
// minimums and above n, unchunked and chunked prefills, lengths off the 64 grid. Half of the
// cases have scores that decay with the diagonal offset (contiguous slash runs, as real heads
// have), half uniform noise (scattered ranges and many single columns).
TEST(MInferenceGpuIndexTest, DevicePlanEqualsTheHostPlanOnTheSameScores) {
  std::mt19937_64 rng(Seed(71));
  struct Shape {
    int q_len, kv_len;
  };
  const Shape shapes[] = {{1000, 1000}, {700, 3000}, {64, 4096}, {1, 129}, {5000, 5000}};
  int checked = 0;
  for (const Shape& sh : shapes) {
    for (int structured = 0; structured < 2; ++structured) {
      const int heads = 6, n = sh.kv_len;
      std::vector<mi::HeadPattern> pats(heads);
      const int sizes[heads][2] = {{1000, 6096}, {10, 20}, {40, 300}, {100000, 100000},
                                   {64, 64}, {3, 500}};
      for (int h = 0; h < heads; ++h) {
        pats[h].pattern = h == 4 ? mi::Pattern::kAShape : mi::Pattern::kVerticalSlash;
        pats[h].vertical_size = sizes[h][0];
        pats[h].slash_size = sizes[h][1];
      }
      std::vector<float> v(static_cast<size_t>(heads) * n), sl(v.size());
      std::uniform_int_distribution<int> q(0, 63);
      for (int h = 0; h < heads; ++h) {
        for (int j = 0; j < n; ++j) {
          const float noise = static_cast<float>(q(rng)) / 64.0f;  // 64 levels: ties
          v[static_cast<size_t>(h) * n + j] = noise;
          sl[static_cast<size_t>(h) * n + j] =
              structured ? std::floor(64.0f * 32.0f / (32.0f + j)) / 64.0f + noise / 8 : noise;
        }
      }
      int32_t query_start[2] = {0, sh.q_len};
      PagedAttentionParams<float> lp;
      lp.kv_lens = &n;
      lp.query_start = query_start;
      lp.num_seqs = 1;
      lp.num_q_heads = heads;
      lp.num_kv_heads = heads;
      lp.head_dim = 64;
      lp.page_size = kPage;
      mi::MInferencePlan want;
      ASSERT_TRUE(mi::BuildPlanFromScores(lp, pats.data(), v.data(), sl.data(), mi::Options{},
                                          &want));

      MInferenceIndexGpuParams ip;
      DevBuf<float> dv(v), ds(sl);
      ip.vertical = dv.ptr;
      ip.slash = ds.ptr;
      ip.num_heads = heads;
      ip.q_len = sh.q_len;
      ip.kv_len = n;
      for (int h = 0; h < heads; ++h) {
        ip.pattern[h] = pats[h].pattern == mi::Pattern::kAShape ? 1 : 0;
        ip.vertical_size[h] = pats[h].vertical_size;
        ip.slash_size[h] = pats[h].slash_size;
      }
      const size_t rows = want.row_start.size() - 1;
      const size_t ws_bytes = MInferenceIndexGpuWorkspaceBytes(ip);
      DevBuf<char> ws(ws_bytes);
      DevBuf<int32_t> rs(rows + 1), cs(rows + 1);
      ASSERT_EQ(MInferenceIndexCountGpu(ip, ws.ptr, ws_bytes, rs.ptr, cs.ptr, nullptr),
                cudaSuccess);
      std::vector<int32_t> got_rs(rows + 1), got_cs(rows + 1);
      ASSERT_EQ(cudaMemcpy(got_rs.data(), rs.ptr, got_rs.size() * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(got_cs.data(), cs.ptr, got_cs.size() * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      const std::string what = "q_len " + std::to_string(sh.q_len) + " kv_len " +
                               std::to_string(n) + (structured ? " structured" : " noise");
      ASSERT_EQ(got_rs, want.row_start) << what;
      ASSERT_EQ(got_cs, want.column_start) << what;
      DevBuf<int32_t> kb(want.key_blocks.size()), cl(want.columns.size());
      ASSERT_EQ(MInferenceIndexFillGpu(ip, ws.ptr, rs.ptr, cs.ptr, kb.ptr, cl.ptr, nullptr),
                cudaSuccess);
      std::vector<int32_t> got_kb(want.key_blocks.size()), got_cl(want.columns.size());
      ASSERT_EQ(cudaMemcpy(got_kb.data(), kb.ptr, got_kb.size() * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(got_cl.data(), cl.ptr, got_cl.size() * 4, cudaMemcpyDeviceToHost),
                cudaSuccess);
      EXPECT_EQ(got_kb, want.key_blocks) << what;
      EXPECT_EQ(got_cl, want.columns) << what;
      EXPECT_FALSE(want.columns.empty()) << what;
      // The pairs the plan reads, counted on the device, against a count query by query.
      DevBuf<unsigned long long> pairs(1);
      ASSERT_EQ(MInferencePlanPairsGpu(ip, rs.ptr, kb.ptr, cs.ptr, cl.ptr, pairs.ptr, nullptr),
                cudaSuccess);
      unsigned long long got_pairs = 0;
      ASSERT_EQ(cudaMemcpy(&got_pairs, pairs.ptr, sizeof(got_pairs), cudaMemcpyDeviceToHost),
                cudaSuccess);
      int64_t want_pairs = 0;
      for (size_t r = 0; r < rows; ++r) {
        const int first = n - sh.q_len, b = static_cast<int>(r) / heads;
        for (int qp = first + 64 * b; qp < std::min(n, first + 64 * b + 64); ++qp) {
          for (int i = want.row_start[r]; i < want.row_start[r + 1]; ++i) {
            const int a = 64 * want.key_blocks[i];
            want_pairs += std::max(0, std::min(qp + 1, a + 64) - a);
          }
          for (int i = want.column_start[r]; i < want.column_start[r + 1]; ++i) {
            want_pairs += want.columns[i] <= qp ? 1 : 0;
          }
        }
      }
      EXPECT_EQ(static_cast<int64_t>(got_pairs), want_pairs) << what;
      EXPECT_GT(want_pairs, 0) << what;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 10);
  // Bad shapes: nothing launched.
  MInferenceIndexGpuParams bad;
  int32_t dummy = 0;
  EXPECT_EQ(MInferenceIndexCountGpu(bad, &dummy, 4, &dummy, &dummy, nullptr),
            cudaErrorInvalidValue);
}

TEST(MInferenceGpuKernelTest, RefusesUnsupportedShapes) {
  MInferenceVsGpuParams p;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 96;
  p.q_len = 10;
  p.kv_len = 20;
  p.page_size = 16;
  p.q_row_stride = 8 * 96;
  EXPECT_FALSE(MInferenceVsGpuSupports(p));
  EXPECT_EQ(MInferenceVsGpuWorkspaceBytes(p), 0u);
  p.head_dim = 128;
  p.q_row_stride = 8 * 128;
  EXPECT_TRUE(MInferenceVsGpuSupports(p));
  p.last_q = 65;
  EXPECT_FALSE(MInferenceVsGpuSupports(p));
  p.last_q = 64;
  p.kv_len = 5;  // fewer keys than queries
  EXPECT_FALSE(MInferenceVsGpuSupports(p));
}

}  // namespace
}  // namespace sieve::kernels
