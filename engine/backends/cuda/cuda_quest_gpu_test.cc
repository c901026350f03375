// Quest through the CUDA backend (label `gpu`): UpdatePageBounds after RopeAndCacheKv over a
// chunked prefill and decode steps, PlanQuestPages and Attention with the plan (its rows on the
// host, and kept on the device as the engine runs it), checked against the CPU reference (kernels/sparse/quest.h, PagedAttentionRef) computed from the backend's own
// bf16 KV pages (read back with ReadKvPages) and queries.
//
// Tolerances, derived as in kernels/sparse/quest_gpu_test.cc: selections must equal the fp64
// reference wherever the reference scores at the cut differ by more than 2 eps, eps = d 2^-24
// max_p sum_c |q_c| max(|Mx_pc|, |Mn_pc|) (the device's fp32 summation error); attention outputs
// within relative L2 1e-2 and max abs 2e-2 (bf16 P and output, unit-variance values).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "engine/backends/attention_plan.h"
#include "engine/backends/backend.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_test_util.h"
#include "engine/model/rope.h"
#include "engine/model/safetensors.h"
#include "engine/status_macros.h"
#include "kernels/attention/paged_attention.h"
#include "kernels/cpu/half.h"
#include "kernels/sparse/quest.h"

namespace sieve::engine {
namespace {

using cuda_test::RandomTensor;
using cuda_test::Seed;
using cuda_test::ShuffledPages;
using cuda_test::TestRope;
using cuda_test::StepLayout;

constexpr int32_t kHq = 8, kHkv = 2, kD = 128, kPage = 16, kPages = 96;

struct Fixture {
  std::unique_ptr<CudaBackend> cuda;
  std::unique_ptr<BackendStream> stream;
  RopeTables rope;
  AttentionShape shape{kHq, kHkv, kD};
  std::mt19937_64 rng{Seed()};
};

// Writes a step's K/V (and page bounds) and returns its rotated queries [tokens, Hq * D].
absl::StatusOr<Tensor> Step(Fixture& f, const BatchLayout& l) {
  SIEVE_RETURN_IF_ERROR(f.cuda->BeginStep(*f.stream, l));
  SIEVE_ASSIGN_OR_RETURN(Tensor qkv,
                         RandomTensor(*f.cuda, l.num_tokens(), (kHq + 2 * kHkv) * kD, f.rng));
  SIEVE_ASSIGN_OR_RETURN(Tensor q, f.cuda->Allocate(l.num_tokens(), kHq * kD));
  SIEVE_RETURN_IF_ERROR(f.cuda->RopeAndCacheKv(*f.stream, 0, qkv, f.shape, f.rope, q));
  SIEVE_RETURN_IF_ERROR(f.cuda->UpdatePageBounds(*f.stream, 0, f.shape));
  return q;
}

// The backend's K and V of layer 0 as float [kPages * kPage, kHkv, kD].
void ReadKv(Fixture& f, std::vector<float>& k, std::vector<float>& v) {
  std::vector<int32_t> all(kPages);
  for (int i = 0; i < kPages; ++i) all[i] = i;
  const int64_t page_bytes = f.cuda->KvPageBytes(1, kPage, f.shape);
  std::vector<uint8_t> bytes(kPages * page_bytes);
  ASSERT_TRUE(f.cuda->ReadKvPages(all, absl::MakeSpan(bytes)).ok());
  const size_t block = static_cast<size_t>(kPage) * kHkv * kD;  // elements of K (or V) per page
  k.resize(kPages * block);
  v.resize(kPages * block);
  for (int p = 0; p < kPages; ++p) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(bytes.data() + p * page_bytes);
    for (size_t i = 0; i < block; ++i) {
      k[p * block + i] = kernels::Bf16ToFloat(src[i]);
      v[p * block + i] = kernels::Bf16ToFloat(src[block + i]);
    }
  }
}

class CudaQuestTest : public ::testing::TestWithParam<bool> {};

TEST_P(CudaQuestTest, PlanAndAttentionMatchTheReference) {
  const bool per_kv_head = GetParam();
  Fixture f;
  auto created = CudaBackend::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  f.cuda = std::move(*created);
  auto rope = TestRope(kD);
  ASSERT_TRUE(rope.ok());
  f.rope = *rope;
  ASSERT_TRUE(f.cuda->AllocateKvCache(1, kPages, kPage, f.shape).ok());
  ASSERT_TRUE(f.cuda->AllocatePageBounds(1, f.shape).ok());
  auto stream = f.cuda->CreateStream({});
  ASSERT_TRUE(stream.ok());
  f.stream = std::move(*stream);
  // Three sequences on shuffled pages; a chunked prefill (the second chunk starts mid-page),
  // then decode steps.
  const std::vector<std::vector<int32_t>> pages =
      ShuffledPages({530, 300, 90}, kPages, kPage, f.rng);
  ASSERT_EQ(pages.size(), 3u);
  for (const auto& [first, count] : std::vector<std::pair<std::vector<int>, std::vector<int>>>{
           {{0, 0, 0}, {301, 170, 60}}, {{301, 170, 60}, {225, 127, 27}}}) {
    const BatchLayout l = StepLayout(pages, first, count, kPage);
    ASSERT_TRUE(Step(f, l).ok());
  }
  for (int t = 0; t < 4; ++t) {
    const std::vector<int> first = {526 + t, 297 + t, 87 + t};
    const BatchLayout l = StepLayout(pages, first, {1, 1, 1}, kPage);
    auto q = Step(f, l);
    ASSERT_TRUE(q.ok()) << q.status();
    // Budget of 8 pages; the third sequence asks for dense (every one of its pages).
    const std::vector<uint8_t> dense = {0, 0, 1};
    Backend::QuestPlanOptions o;
    o.page_budget = 8;
    o.per_kv_head = per_kv_head;
    o.dense_sequences = dense;
    o.rows_on_host = true;
    AttentionPlan plan;
    ASSERT_TRUE(f.cuda->PlanQuestPages(*f.stream, 0, *q, f.shape, o, plan).ok());
    ASSERT_FALSE(plan.on_device);
    ASSERT_TRUE(plan.Validate(l, kHq).ok()) << plan.Validate(l, kHq);
    auto out = f.cuda->Allocate(3, kHq * kD);
    ASSERT_TRUE(out.ok());
    const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
    ASSERT_TRUE(f.cuda->Attention(*f.stream, 0, *q, f.shape, scale, plan, *out).ok());
    std::vector<float> got(3 * kHq * kD), qf(3 * kHq * kD);
    ASSERT_TRUE(f.cuda->CopyToHost(*f.stream, *out, absl::MakeSpan(got)).ok());
    ASSERT_TRUE(f.cuda->CopyToHost(*f.stream, *q, absl::MakeSpan(qf)).ok());
    {
      // The same selection kept on the device (what the engine runs): the kernel writes the
      // rows' page ids and lengths where the decode kernel reads them, nothing comes back. The
      // rows, their stride (the budget: every sparse row is full), the longest row and the
      // heads per row are those of the host plan above, so the decode runs the same kernel on
      // the same tables: bitwise the same output, and the same pairs read.
      Backend::QuestPlanOptions od = o;
      od.rows_on_host = false;
      AttentionPlan dev;
      ASSERT_TRUE(f.cuda->PlanQuestPages(*f.stream, 0, *q, f.shape, od, dev).ok());
      ASSERT_TRUE(dev.on_device);
      ASSERT_TRUE(dev.Validate(l, kHq).ok()) << dev.Validate(l, kHq);
      EXPECT_TRUE(dev.key_blocks.empty());
      EXPECT_EQ(dev.ReadPairs(l, kHq), plan.ReadPairs(l, kHq));
      ASSERT_TRUE(f.cuda->Attention(*f.stream, 0, *q, f.shape, scale, dev, *out).ok());
      // A second run of the same plan is refused: its tables may be overwritten by then.
      EXPECT_EQ(f.cuda->Attention(*f.stream, 0, *q, f.shape, scale, dev, *out).code(),
                absl::StatusCode::kInternal);
      std::vector<float> on_device(got.size());
      ASSERT_TRUE(f.cuda->CopyToHost(*f.stream, *out, absl::MakeSpan(on_device)).ok());
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_EQ(on_device[i], got[i]) << "decode step " << t << " element " << i;
      }
    }
    std::vector<float> k, v;
    ReadKv(f, k, v);
    if (HasFatalFailure()) return;
    // Reference bounds from the backend's keys, and the fp64 selection.
    std::vector<float> bounds(static_cast<size_t>(kPages) * kHkv * 2 * kD, 0.0f);
    for (int s = 0; s < 3; ++s) {
      for (size_t j = 0; j * kPage < static_cast<size_t>(l.kv_lens[s]); ++j) {
        for (int g = 0; g < kHkv; ++g) {
          kernels::QuestBoundsRef(k.data(), pages[s][j], g,
                                  std::min<int>(kPage, l.kv_lens[s] - j * kPage), kHkv, kD, kPage,
                                  bounds.data() + (static_cast<size_t>(pages[s][j]) * kHkv + g) * 2 * kD);
        }
      }
    }
    for (int s = 0; s < 3; ++s) {
      const int n = (l.kv_lens[s] + kPage - 1) / kPage;
      for (int h = 0; h < kHq; ++h) {
        const int r = s * kHq + h;
        std::vector<int32_t> row(plan.key_blocks.begin() + plan.row_start[r],
                                 plan.key_blocks.begin() + plan.row_start[r + 1]);
        if (s == 2) {  // dense
          ASSERT_EQ(row.size(), static_cast<size_t>(n));
          continue;
        }
        ASSERT_EQ(row.size(), 8u);
        ASSERT_EQ(row.back(), n - 1);
        // fp64 scores (max over the group with per_kv_head) and the cut.
        const int group = kHq / kHkv, g = h / group;
        std::vector<double> score(n - 1, -INFINITY);
        double eps = 0;
        for (int hh = per_kv_head ? g * group : h; hh < (per_kv_head ? (g + 1) * group : h + 1);
             ++hh) {
          const float* qh = qf.data() + (static_cast<size_t>(s) * kHq + hh) * kD;
          for (int j = 0; j + 1 < n; ++j) {
            const float* b = bounds.data() + (static_cast<size_t>(pages[s][j]) * kHkv + g) * 2 * kD;
            score[j] = std::max(score[j], kernels::QuestUpperBound(qh, b, kD));
            double mag = 0;
            for (int c = 0; c < kD; ++c) {
              mag += std::abs(double{qh[c]}) * std::max(std::abs(b[c]), std::abs(b[kD + c]));
            }
            eps = std::max(eps, kD * std::ldexp(mag, -24));
          }
        }
        std::vector<double> sorted = score;
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        for (int i = 0; i + 1 < 8; ++i) {
          EXPECT_GE(score[row[i]], sorted[6] - 2 * eps) << "sequence " << s << " head " << h;
        }
        if (sorted[6] - sorted[7] > 2 * eps) {  // a clear cut: exactly the reference's pages
          for (int i = 0; i + 1 < 8; ++i) EXPECT_GT(score[row[i]], sorted[7] + eps);
        }
      }
    }
    // The output is attention restricted to the plan, over the backend's own K and V.
    std::vector<float> want(got.size());
    kernels::PagedAttentionParams<float> p;
    p.q = qf.data();
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.out = want.data();
    p.page_table = l.page_table.data();
    p.kv_lens = l.kv_lens.data();
    p.query_start = l.query_start.data();
    p.page_table_stride = l.page_table_stride;
    p.num_seqs = 3;
    p.num_q_heads = kHq;
    p.num_kv_heads = kHkv;
    p.head_dim = kD;
    p.page_size = kPage;
    p.scale = scale;
    const kernels::SparseAttentionIndex idx = plan.View();
    p.sparse = &idx;
    kernels::PagedAttentionRef(p, 0);
    double e2 = 0, r2 = 0, max_abs = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double e = double{got[i]} - want[i];
      e2 += e * e;
      r2 += double{want[i]} * want[i];
      max_abs = std::max(max_abs, std::abs(e));
    }
    EXPECT_LE(std::sqrt(e2 / r2), 1e-2) << "decode step " << t;
    EXPECT_LE(max_abs, 2e-2) << "decode step " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(PerQueryAndPerKvHead, CudaQuestTest, ::testing::Bool());

}  // namespace
}  // namespace sieve::engine
