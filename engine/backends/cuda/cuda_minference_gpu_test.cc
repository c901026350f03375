// MInference through the CUDA backend (label `gpu`): MInferenceIndex after RopeAndCacheKv over a
// chunked prefill (the second chunk starts mid-page and mid-block), the sequences' plans joined
// into one AttentionPlan of 64-query rows with single columns, and Attention with it, checked
// against PagedAttentionRef on the same plan over the backend's own bf16 K, V and queries (read
// back). Vertical-slash heads at a sparse budget and one A-shape head; then budgets that cover
// every key, whose plan must read every causal pair and whose output must equal dense attention.
//
// Tolerance: relative L2 1e-2 and max abs 2e-2 (bf16 P and output, unit-variance values), as
// kernels/sparse/minference_gpu_test.cc.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
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
#include "kernels/sparse/minference.h"

namespace sieve::engine {
namespace {

using cuda_test::BeginStepWithRandomQkv;
using cuda_test::RandomTensor;
using cuda_test::Seed;
using cuda_test::ShuffledPages;
using cuda_test::TestRope;
using cuda_test::StepLayout;

namespace mi = kernels::minference;

constexpr int32_t kHq = 8, kHkv = 2, kD = 128, kPage = 16, kPages = 160;

// Every sequence's MInference index for `patterns`, joined into one step plan.
absl::StatusOr<AttentionPlan> StepPlan(CudaBackend& cuda, BackendStream& stream, const Tensor& q,
                                       const BatchLayout& l, const AttentionShape& shape,
                                       const std::vector<mi::HeadPattern>& patterns) {
  AttentionPlan plan;
  plan.dense = false;
  plan.query_block = mi::kBlock;
  plan.key_block = mi::kBlock;
  plan.query_block_start = {0};
  plan.row_start = {0};
  plan.column_start = {0};
  for (int32_t s = 0; s < l.num_seqs(); ++s) {
    MInferenceEstimate e;
    e.seq = s;
    e.patterns = patterns;
    mi::MInferencePlan one;
    SIEVE_RETURN_IF_ERROR(cuda.MInferenceIndex(stream, 0, q, shape, e, one));
    plan.query_block_start.push_back(plan.query_block_start.back() + one.query_block_start[1]);
    const int32_t kb0 = static_cast<int32_t>(plan.key_blocks.size());
    const int32_t c0 = static_cast<int32_t>(plan.columns.size());
    for (size_t r = 1; r < one.row_start.size(); ++r) {
      plan.row_start.push_back(kb0 + one.row_start[r]);
      plan.column_start.push_back(c0 + one.column_start[r]);
    }
    plan.key_blocks.insert(plan.key_blocks.end(), one.key_blocks.begin(), one.key_blocks.end());
    plan.columns.insert(plan.columns.end(), one.columns.begin(), one.columns.end());
  }
  return plan;
}

// Attention of layer 0 with `plan` on the GPU against PagedAttentionRef with the same plan
// (null: dense) over the backend's own queries, keys and values.
void ExpectAttentionMatches(CudaBackend& cuda, BackendStream& stream, const Tensor& q,
                            const BatchLayout& l, const AttentionShape& shape,
                            const AttentionPlan& plan, const std::string& what) {
  const int64_t tokens = l.num_tokens();
  auto out = cuda.Allocate(tokens, kHq * kD);
  ASSERT_TRUE(out.ok());
  const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
  const absl::Status st = cuda.Attention(stream, 0, q, shape, scale, plan, *out);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  std::vector<float> got(tokens * kHq * kD), qf(got.size());
  ASSERT_TRUE(cuda.CopyToHost(stream, *out, absl::MakeSpan(got)).ok());
  ASSERT_TRUE(cuda.CopyToHost(stream, q, absl::MakeSpan(qf)).ok());
  // The backend's K and V of layer 0 as float [kPages * kPage, kHkv, kD].
  std::vector<int32_t> all(kPages);
  for (int i = 0; i < kPages; ++i) all[i] = i;
  const int64_t page_bytes = cuda.KvPageBytes(1, kPage, shape);
  std::vector<uint8_t> bytes(kPages * page_bytes);
  ASSERT_TRUE(cuda.ReadKvPages(all, absl::MakeSpan(bytes)).ok());
  const size_t block = static_cast<size_t>(kPage) * kHkv * kD;
  std::vector<float> k(kPages * block), v(kPages * block);
  for (int p = 0; p < kPages; ++p) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(bytes.data() + p * page_bytes);
    for (size_t i = 0; i < block; ++i) {
      k[p * block + i] = kernels::Bf16ToFloat(src[i]);
      v[p * block + i] = kernels::Bf16ToFloat(src[block + i]);
    }
  }
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
  p.num_seqs = l.num_seqs();
  p.num_q_heads = kHq;
  p.num_kv_heads = kHkv;
  p.head_dim = kD;
  p.page_size = kPage;
  p.scale = scale;
  const kernels::SparseAttentionIndex idx = plan.View();
  p.sparse = plan.dense ? nullptr : &idx;
  kernels::PagedAttentionRef(p, 0);
  double e2 = 0, r2 = 0, max_abs = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = double{got[i]} - want[i];
    ASSERT_TRUE(std::isfinite(e)) << what << ": output element " << i;
    e2 += e * e;
    r2 += double{want[i]} * want[i];
    max_abs = std::max(max_abs, std::abs(e));
  }
  EXPECT_LE(std::sqrt(e2 / r2), 1e-2) << what;
  EXPECT_LE(max_abs, 2e-2) << what;
}

TEST(CudaMInferenceTest, ChunkedPrefillPlansRunAndMatchTheReference) {
  auto created = CudaBackend::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  CudaBackend& cuda = **created;
  const AttentionShape shape{kHq, kHkv, kD};
  std::mt19937_64 rng(Seed());
  auto rope = TestRope(kD);
  ASSERT_TRUE(rope.ok());
  ASSERT_TRUE(cuda.AllocateKvCache(1, kPages, kPage, shape).ok());
  auto stream = cuda.CreateStream({});
  ASSERT_TRUE(stream.ok());
  // Three sequences on shuffled pages, prefilled in two chunks; the second chunk starts
  // mid-page and (but for the first sequence) mid-block.
  const std::vector<std::vector<int32_t>> pages =
      ShuffledPages({1280, 900, 333}, kPages, kPage, rng);
  ASSERT_EQ(pages.size(), 3u);
  std::vector<mi::HeadPattern> sparse(kHq, {mi::Pattern::kVerticalSlash, 40, 120});
  sparse[kHq - 1] = {mi::Pattern::kAShape, 16, 200};
  const std::vector<mi::HeadPattern> covering(kHq, {mi::Pattern::kVerticalSlash, 30, 2000});
  for (const auto& [first, count] : std::vector<std::pair<std::vector<int>, std::vector<int>>>{
           {{0, 0, 0}, {640, 500, 200}}, {{640, 500, 200}, {640, 400, 133}}}) {
    const std::string step = "chunk at " + std::to_string(first[0]);
    const BatchLayout l = StepLayout(pages, first, count, kPage);
    auto q = BeginStepWithRandomQkv(cuda, **stream, l, shape, *rope, rng);
    ASSERT_TRUE(q.ok()) << q.status();
    auto plan = StepPlan(cuda, **stream, *q, l, shape, sparse);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_TRUE(plan->Validate(l, kHq).ok()) << plan->Validate(l, kHq);
    EXPECT_LT(plan->ReadPairs(l, kHq), DensePairs(l, kHq)) << step;
    ExpectAttentionMatches(cuda, **stream, *q, l, shape, *plan, step + ", sparse budgets");
    auto dense_plan = StepPlan(cuda, **stream, *q, l, shape, covering);
    ASSERT_TRUE(dense_plan.ok()) << dense_plan.status();
    EXPECT_EQ(dense_plan->ReadPairs(l, kHq), DensePairs(l, kHq)) << step;
    ExpectAttentionMatches(cuda, **stream, *q, l, shape, *dense_plan,
                           step + ", covering budgets");
    AttentionPlan dense;
    ExpectAttentionMatches(cuda, **stream, *q, l, shape, dense, step + ", dense");
  }
  // Block-sparse heads have no GPU estimator: a clear error, not a crash.
  const BatchLayout l = StepLayout(pages, {0, 0, 0}, {64, 64, 64}, kPage);
  ASSERT_TRUE(cuda.BeginStep(**stream, l).ok());
  auto q = cuda.Allocate(l.num_tokens(), kHq * kD);
  ASSERT_TRUE(q.ok());
  std::vector<mi::HeadPattern> block(kHq, {mi::Pattern::kBlockSparse, 8, 0});
  auto refused = StepPlan(cuda, **stream, *q, l, shape, block);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnimplemented) << refused.status();
}

// A step of one sequence keeps its index on the device (MInferenceEstimate::device_plan): the
// on-device plan reads the pairs the host plan reads (counted on the device), and Attention with
// it gives the host plan's output bit for bit (the same kernel over the same index); it runs
// once. A step of two sequences gets a host plan even when asked.
TEST(CudaMInferenceTest, OnDevicePlanEqualsTheHostPlan) {
  auto created = CudaBackend::Create();
  ASSERT_TRUE(created.ok()) << created.status();
  CudaBackend& cuda = **created;
  const AttentionShape shape{kHq, kHkv, kD};
  std::mt19937_64 rng(Seed() + 1);
  auto rope = TestRope(kD);
  ASSERT_TRUE(rope.ok());
  ASSERT_TRUE(cuda.AllocateKvCache(1, kPages, kPage, shape).ok());
  auto stream = cuda.CreateStream({});
  ASSERT_TRUE(stream.ok());
  const std::vector<std::vector<int32_t>> pages = ShuffledPages({2000, 300}, kPages, kPage, rng);
  std::vector<mi::HeadPattern> sparse(kHq, {mi::Pattern::kVerticalSlash, 40, 120});
  sparse[0] = {mi::Pattern::kAShape, 16, 200};
  const float scale = 1.0f / std::sqrt(static_cast<float>(kD));
  for (const auto& [first, count] :
       std::vector<std::pair<int, int>>{{0, 1200}, {1200, 800}}) {
    const std::string step = "chunk at " + std::to_string(first);
    const BatchLayout l = StepLayout({pages[0]}, {first}, {count}, kPage);
    auto q = BeginStepWithRandomQkv(cuda, **stream, l, shape, *rope, rng);
    ASSERT_TRUE(q.ok()) << q.status();
    auto host = StepPlan(cuda, **stream, *q, l, shape, sparse);
    ASSERT_TRUE(host.ok()) << host.status();
    auto host_out = cuda.Allocate(l.num_tokens(), kHq * kD);
    ASSERT_TRUE(host_out.ok());
    ASSERT_TRUE(cuda.Attention(**stream, 0, *q, shape, scale, *host, *host_out).ok()) << step;
    MInferenceEstimate e;
    e.seq = 0;
    e.patterns = sparse;
    AttentionPlan dev;
    e.device_plan = &dev;
    mi::MInferencePlan untouched;
    ASSERT_TRUE(cuda.MInferenceIndex(**stream, 0, *q, shape, e, untouched).ok()) << step;
    ASSERT_TRUE(dev.on_device) << step;
    EXPECT_TRUE(untouched.row_start.empty()) << step;
    ASSERT_TRUE(dev.Validate(l, kHq).ok()) << dev.Validate(l, kHq);
    EXPECT_EQ(dev.ReadPairs(l, kHq), host->ReadPairs(l, kHq)) << step;
    EXPECT_LT(dev.ReadPairs(l, kHq), DensePairs(l, kHq)) << step;
    auto dev_out = cuda.Allocate(l.num_tokens(), kHq * kD);
    ASSERT_TRUE(dev_out.ok());
    ASSERT_TRUE(cuda.Attention(**stream, 0, *q, shape, scale, dev, *dev_out).ok()) << step;
    std::vector<float> want(l.num_tokens() * kHq * kD), got(want.size());
    ASSERT_TRUE(cuda.CopyToHost(**stream, *host_out, absl::MakeSpan(want)).ok());
    ASSERT_TRUE(cuda.CopyToHost(**stream, *dev_out, absl::MakeSpan(got)).ok());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i], want[i]) << step << ", element " << i;
    }
    // Run once: a second Attention with it is refused.
    EXPECT_EQ(cuda.Attention(**stream, 0, *q, shape, scale, dev, *dev_out).code(),
              absl::StatusCode::kInternal);
  }
  const BatchLayout two = StepLayout(pages, {0, 0}, {700, 300}, kPage);
  auto q = BeginStepWithRandomQkv(cuda, **stream, two, shape, *rope, rng);
  ASSERT_TRUE(q.ok()) << q.status();
  MInferenceEstimate e;
  e.seq = 1;
  e.patterns = sparse;
  AttentionPlan dev;
  e.device_plan = &dev;
  mi::MInferencePlan host;
  ASSERT_TRUE(cuda.MInferenceIndex(**stream, 0, *q, shape, e, host).ok());
  EXPECT_FALSE(dev.on_device);
  EXPECT_EQ(host.row_start.size(), static_cast<size_t>((300 + 63) / 64 * kHq + 1));
}

}  // namespace
}  // namespace sieve::engine
