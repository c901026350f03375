// DoubleSparsity through the CUDA backend (label `gpu`): UpdateDsLabels after RopeAndCacheKv over
// a chunked prefill (the second chunk starting mid-page) and decode steps, PlanDsTokens and
// Attention with the plan, checked against the CPU side (DsWriteLabels, DsSelectRef,
// PagedAttentionRef) computed from the backend's own bf16 KV pages (read back with ReadKvPages)
// and queries; then RebuildDsLabels of pages whose labels were overwritten restores the plan.
//
// Tolerances, derived as in kernels/sparse/double_sparsity_gpu_test.cc: selections equal the
// fp64 reference wherever its scores at the cut differ by more than 2 eps, eps = (n + group + 2)
// 2^-24 max_t sum |q_c label_c| (n products per score); attention outputs within relative L2
// 1e-2 and max abs 2e-2 (bf16 P and output, unit-variance values).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
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
#include "kernels/sparse/double_sparsity.h"

namespace sieve::engine {
namespace {

using cuda_test::RandomTensor;
using cuda_test::Seed;
using cuda_test::ShuffledPages;
using cuda_test::TestRope;
using cuda_test::StepLayout;

constexpr int32_t kHq = 8, kHkv = 2, kD = 128, kPage = 16, kPages = 96, kChannels = 16;
constexpr int32_t kBudget = 64;

struct Fixture {
  std::unique_ptr<CudaBackend> cuda;
  std::unique_ptr<BackendStream> stream;
  RopeTables rope;
  AttentionShape shape{kHq, kHkv, kD};
  std::mt19937_64 rng{Seed()};
};

// Writes a step's K/V and labels and returns its rotated queries [tokens, Hq * D].
absl::StatusOr<Tensor> Step(Fixture& f, const BatchLayout& l) {
  SIEVE_RETURN_IF_ERROR(f.cuda->BeginStep(*f.stream, l));
  SIEVE_ASSIGN_OR_RETURN(Tensor qkv,
                         RandomTensor(*f.cuda, l.num_tokens(), (kHq + 2 * kHkv) * kD, f.rng));
  SIEVE_ASSIGN_OR_RETURN(Tensor q, f.cuda->Allocate(l.num_tokens(), kHq * kD));
  SIEVE_RETURN_IF_ERROR(f.cuda->RopeAndCacheKv(*f.stream, 0, qkv, f.shape, f.rope, q));
  SIEVE_RETURN_IF_ERROR(f.cuda->UpdateDsLabels(*f.stream, 0));
  return q;
}

// The backend's K and V of layer 0 as float [kPages * kPage, kHkv, kD].
void ReadKv(Fixture& f, std::vector<float>& k, std::vector<float>& v) {
  std::vector<int32_t> all(kPages);
  std::iota(all.begin(), all.end(), 0);
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

struct DsCase {
  kernels::DsLabelFormat format;
  bool per_kv_head;  // labels and selection per KV head (the engine's per_kv_head option)
};

class CudaDsTest : public ::testing::TestWithParam<DsCase> {};

TEST_P(CudaDsTest, PlanAndAttentionMatchTheReference) {
  const DsCase c = GetParam();
  Fixture f;
  auto created = CudaBackend::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  f.cuda = std::move(*created);
  auto rope = TestRope(kD);
  ASSERT_TRUE(rope.ok());
  f.rope = *rope;
  ASSERT_TRUE(f.cuda->AllocateKvCache(1, kPages, kPage, f.shape).ok());
  const kernels::DoubleSparsityShape ds{kHq,     kHkv,          kD,           kPage,
                                        kChannels, c.format, c.per_kv_head, c.per_kv_head};
  ASSERT_EQ(f.cuda->DsLabelBytes(1, ds), kernels::DsLabelPageBytes(ds));
  ASSERT_TRUE(f.cuda->AllocateDsLabels(1, ds).ok());
  std::vector<int32_t> channels;
  for (int lh = 0; lh < kernels::DsLabelHeads(ds); ++lh) {
    std::vector<int32_t> perm(kD);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), f.rng);
    channels.insert(channels.end(), perm.begin(), perm.begin() + kChannels);
  }
  std::vector<int32_t> bad = channels;
  bad[1] = bad[0];
  EXPECT_EQ(f.cuda->SetDsChannels(0, bad).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(f.cuda->SetDsChannels(0, channels).ok());
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
  const int group = kHq / kHkv;
  const int heads_per_row = c.per_kv_head ? group : 1;
  // Plans layer 0 of step `l` (queries q) and runs attention with it; checks the selection
  // against DsSelectRef over labels recomputed from the backend's keys and the output against
  // PagedAttentionRef restricted to the plan.
  auto check = [&](const BatchLayout& l, const Tensor& q, const char* what) {
    SCOPED_TRACE(what);
    // The third sequence asks for dense (every one of its pages).
    const std::vector<uint8_t> dense = {0, 0, 1};
    DsPlanOptions o;
    o.token_budget = kBudget;
    o.dense_sequences = dense;
    AttentionPlan plan;
    ASSERT_TRUE(f.cuda->PlanDsTokens(*f.stream, 0, q, o, plan).ok());
    ASSERT_TRUE(plan.Validate(l, kHq).ok()) << plan.Validate(l, kHq);
    auto out = f.cuda->Allocate(3, kHq * kD);
    ASSERT_TRUE(out.ok());
    const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
    ASSERT_TRUE(f.cuda->Attention(*f.stream, 0, q, f.shape, scale, plan, *out).ok());
    std::vector<float> got(3 * kHq * kD), qf(3 * kHq * kD);
    ASSERT_TRUE(f.cuda->CopyToHost(*f.stream, *out, absl::MakeSpan(got)).ok());
    ASSERT_TRUE(f.cuda->CopyToHost(*f.stream, q, absl::MakeSpan(qf)).ok());
    std::vector<float> k, v;
    ReadKv(f, k, v);
    if (HasFatalFailure()) return;
    // Reference labels from the backend's keys (equal to the device's: the kernel test checks
    // that byte for byte), then the fp64 selection of the two sparse sequences.
    std::vector<uint8_t> labels(static_cast<size_t>(kPages) * kernels::DsLabelPageBytes(ds));
    std::vector<int32_t> query_start = {0, l.kv_lens[0], l.kv_lens[0] + l.kv_lens[1],
                                        l.kv_lens[0] + l.kv_lens[1] + l.kv_lens[2]};
    kernels::DsAppendParams ap;
    ap.k_cache = k.data();
    ap.page_table = l.page_table.data();
    ap.page_table_stride = l.page_table_stride;
    ap.kv_lens = l.kv_lens.data();
    ap.query_start = query_start.data();
    ap.num_seqs = 3;
    ap.channels = channels.data();
    ap.labels = labels.data();
    kernels::DsWriteLabels(ds, ap);
    kernels::DsSelectParams sp;
    sp.q = qf.data();
    sp.page_table = l.page_table.data();
    sp.page_table_stride = l.page_table_stride;
    sp.kv_lens = l.kv_lens.data();
    sp.num_seqs = 2;
    sp.channels = channels.data();
    sp.labels = labels.data();
    sp.token_budget = kBudget;
    kernels::DsSelection ref;
    kernels::DsSelectRef(ds, sp, ref);
    const int64_t page_bytes = kernels::DsLabelPageBytes(ds);
    for (int s = 0; s < 3; ++s) {
      for (int h = 0; h < kHq; ++h) {
        const int r = s * kHq + h;
        if (s == 2) {  // dense: every page, no columns
          EXPECT_EQ(plan.row_start[r + 1] - plan.row_start[r], (l.kv_lens[s] + kPage - 1) / kPage);
          EXPECT_EQ(plan.column_start[r + 1], plan.column_start[r]);
          continue;
        }
        EXPECT_EQ(plan.row_start[r + 1], plan.row_start[r]);
        const std::vector<int32_t> row(plan.columns.begin() + plan.column_start[r],
                                       plan.columns.begin() + plan.column_start[r + 1]);
        ASSERT_EQ(row.size(), static_cast<size_t>(kBudget));
        const std::vector<int32_t> want(ref.columns.begin() + ref.column_start[r],
                                        ref.columns.begin() + ref.column_start[r + 1]);
        const int sel = c.per_kv_head ? h / group : h;
        const std::vector<double> score = kernels::DsReferenceScores(ds, sp, s, sel);
        double mag_max = 0;
        const int h0 = c.per_kv_head ? sel * group : h;
        for (int tok = 0; tok < l.kv_lens[s]; ++tok) {
          const uint8_t* page =
              labels.data() + l.page_table[s * l.page_table_stride + tok / kPage] * page_bytes;
          double mag = 0;
          for (int hh = h0; hh < h0 + heads_per_row; ++hh) {
            const int lh = c.per_kv_head ? hh / group : hh;
            for (int ch = 0; ch < kChannels; ++ch) {
              mag += std::abs(double{qf[(static_cast<size_t>(s) * kHq + hh) * kD +
                                        channels[lh * kChannels + ch]]} *
                              kernels::DsReadLabel(ds, page, lh, ch, tok % kPage));
            }
          }
          mag_max = std::max(mag_max, mag);
        }
        const double eps = (kChannels * heads_per_row + group + 2) * std::ldexp(mag_max, -24);
        std::vector<double> sorted = score;
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        const double cut = sorted[kBudget - 1];
        if (cut - sorted[kBudget] > 2 * eps) {
          EXPECT_EQ(row, want) << "sequence " << s << " head " << h;
        } else {
          for (int x : row) EXPECT_GE(score[x], cut - 2 * eps) << "sequence " << s << " head " << h;
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
    EXPECT_LE(std::sqrt(e2 / r2), 1e-2);
    EXPECT_LE(max_abs, 2e-2);
  };
  for (int t = 0; t < 4; ++t) {
    const std::vector<int> first = {526 + t, 297 + t, 87 + t};
    const BatchLayout l = StepLayout(pages, first, {1, 1, 1}, kPage);
    auto q = Step(f, l);
    ASSERT_TRUE(q.ok()) << q.status();
    check(l, *q, "decode step");
    if (HasFatalFailure()) return;
    if (t < 3) continue;
    // An import refills the first sequence's pages with other keys (WriteKvPages writes no
    // labels); RebuildDsLabels makes their labels those of the new keys again.
    const int64_t page_bytes = f.cuda->KvPageBytes(1, kPage, f.shape);
    std::vector<uint8_t> bytes(pages[0].size() * page_bytes);
    std::uniform_real_distribution<float> u(-1.7f, 1.7f);
    for (size_t i = 0; i + 1 < bytes.size(); i += 2) {
      const uint16_t b = kernels::FloatToBf16(u(f.rng));
      bytes[i] = static_cast<uint8_t>(b & 0xff);
      bytes[i + 1] = static_cast<uint8_t>(b >> 8);
    }
    ASSERT_TRUE(f.cuda->WriteKvPages(pages[0], bytes).ok());
    ASSERT_TRUE(f.cuda->RebuildDsLabels(pages[0]).ok());
    ASSERT_TRUE(f.cuda->BeginStep(*f.stream, l).ok());
    check(l, *q, "after RebuildDsLabels");
    const std::vector<int32_t> outside = {kPages};
    EXPECT_EQ(f.cuda->RebuildDsLabels(outside).code(), absl::StatusCode::kInvalidArgument);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Formats, CudaDsTest,
    ::testing::Values(DsCase{kernels::DsLabelFormat::kF16, false},
                      DsCase{kernels::DsLabelFormat::kF16, true},
                      DsCase{kernels::DsLabelFormat::kInt4, false}));

}  // namespace
}  // namespace sieve::engine
