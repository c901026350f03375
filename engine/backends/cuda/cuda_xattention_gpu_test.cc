// XAttention through the CUDA backend (label `gpu`): XAttentionSelect (estimate, threshold
// selection and compact index on the device, only the index copied back) against the rule of
// kernels::XAttentionSelectBlocks on the masses of a second estimate (XAttentionBlockMass), row
// by row. The estimator sums block masses with shared-memory float atomics, so two estimates may
// differ in their last bits and a set may differ where the rule's cut falls on a near-tie; the
// test therefore checks the rule itself with a slack eps = 1e-5 of the row's total (float sums
// of at most ~1e4 terms carry a relative error under 1e-5): blocks increasing and causal, blocks
// 0 and m selected, the selected mass >= tau * total - eps, dropping the lightest optional
// selected block leaves < tau * total + eps, and no unselected block outweighs a selected
// optional one by more than eps. Where the two estimates agree, most rows are identical to the
// host's set; the count of rows that differ is printed. Three sequences prefilled in two chunks
// on shuffled pages (the second chunk starts mid-page and mid-block), one threshold for every
// head and then one per head; a threshold above 1 selects every causal block exactly.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "engine/backends/backend.h"
#include "engine/backends/cuda/cuda_backend.h"
#include "engine/backends/cuda/cuda_test_util.h"
#include "engine/model/rope.h"
#include "kernels/sparse/xattention.h"

namespace sieve::engine {
namespace {

using cuda_test::BeginStepWithRandomQkv;
using cuda_test::RandomTensor;
using cuda_test::Seed;
using cuda_test::ShuffledPages;
using cuda_test::TestRope;
using cuda_test::StepLayout;

constexpr int32_t kHq = 8, kHkv = 2, kD = 128, kPage = 16, kPages = 400, kBlock = 128;

// Sequence `seq`'s selection both ways; expects identical rows.
void ExpectDeviceSelectionEqualsHost(CudaBackend& cuda, BackendStream& stream, const Tensor& q,
                                     const BatchLayout& l, const AttentionShape& shape, int seq,
                                     const std::vector<double>& thresholds,
                                     const std::string& what) {
  XAttentionEstimate e{.seq = seq, .stride = 16, .block_size = kBlock};
  std::vector<int32_t> row_start, blocks;
  const absl::Status st =
      cuda.XAttentionSelect(stream, 0, q, shape, e, thresholds, row_start, blocks);
  ASSERT_TRUE(st.ok()) << what << ": " << st;
  std::vector<float> mass;
  ASSERT_TRUE(cuda.XAttentionBlockMass(stream, 0, q, shape, e, mass).ok()) << what;
  const int32_t kv_len = l.kv_lens[seq];
  const int32_t q_len = l.query_start[seq + 1] - l.query_start[seq];
  const int32_t m0 = (kv_len - q_len) / kBlock, q_blocks = (kv_len - 1) / kBlock - m0 + 1;
  const int32_t k_blocks = (kv_len + kBlock - 1) / kBlock;
  ASSERT_EQ(mass.size(), static_cast<size_t>(kHq) * q_blocks * k_blocks) << what;
  ASSERT_EQ(row_start.size(), static_cast<size_t>(q_blocks) * kHq + 1) << what;
  ASSERT_EQ(static_cast<size_t>(row_start.back()), blocks.size()) << what;
  std::vector<double> row;
  std::vector<int32_t> want, order;
  int64_t listed = 0, causal = 0, differ = 0;
  for (int32_t mi = 0; mi < q_blocks; ++mi) {
    const int32_t m = m0 + mi;
    for (int32_t h = 0; h < kHq; ++h) {
      const float* r = mass.data() + (int64_t{h} * q_blocks + mi) * k_blocks;
      row.assign(r, r + m + 1);
      const double tau = thresholds.size() == 1 ? thresholds[0] : thresholds[h];
      kernels::XAttentionSelectBlocks(row.data(), m, tau, want, order);
      const int64_t i = int64_t{mi} * kHq + h;
      const std::vector<int32_t> got(blocks.begin() + row_start[i],
                                     blocks.begin() + row_start[i + 1]);
      differ += got != want;
      const std::string at = what + ": query block " + std::to_string(m) + ", head " +
                             std::to_string(h);
      ASSERT_FALSE(got.empty()) << at;
      ASSERT_TRUE(std::is_sorted(got.begin(), got.end()) &&
                  std::adjacent_find(got.begin(), got.end()) == got.end()) << at;
      ASSERT_TRUE(got.front() == 0 && got.back() == m) << at << ": blocks 0 and m are forced";
      double total = 0, kept = 0, lightest = 1e300, heaviest_out = -1;
      std::vector<char> in(m + 1, 0);
      for (int32_t b : got) in[b] = 1;
      for (int32_t b = 0; b <= m; ++b) {
        total += row[b];
        if (in[b]) kept += row[b];
        const bool optional = b != 0 && b != m;
        if (optional && in[b]) lightest = std::min(lightest, row[b]);
        if (optional && !in[b]) heaviest_out = std::max(heaviest_out, row[b]);
      }
      const double eps = 1e-5 * total;
      if (tau <= 1.0) {
        EXPECT_GE(kept, tau * total - eps) << at;
        if (lightest < 1e300) {
          EXPECT_LT(kept - lightest, tau * total + eps) << at;
          EXPECT_LE(heaviest_out, lightest + eps) << at;
        }
      } else {
        EXPECT_EQ(got, want) << at;
      }
      listed += static_cast<int64_t>(got.size());
      causal += m + 1;
    }
  }
  std::printf("[measure] %s: %lld of %d rows differ from the host set on the second estimate\n",
              what.c_str(), static_cast<long long>(differ), q_blocks * kHq);
  if (thresholds.size() == 1 && thresholds[0] > 1.0) {
    EXPECT_EQ(listed, causal) << what << ": a threshold above 1 keeps every causal block";
  }
}

TEST(CudaXAttentionTest, DeviceSelectionEqualsTheHostSelection) {
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
  const std::vector<std::vector<int32_t>> pages =
      ShuffledPages({3000, 2100, 700}, kPages, kPage, rng);
  ASSERT_EQ(pages.size(), 3u);
  std::vector<double> per_head(kHq);
  for (int h = 0; h < kHq; ++h) per_head[h] = 0.5 + 0.06 * h;
  for (const auto& [first, count] : std::vector<std::pair<std::vector<int>, std::vector<int>>>{
           {{0, 0, 0}, {1536, 1000, 300}}, {{1536, 1000, 300}, {1464, 1100, 400}}}) {
    const std::string step = "chunk at " + std::to_string(first[0]);
    const BatchLayout l = StepLayout(pages, first, count, kPage);
    auto q = BeginStepWithRandomQkv(cuda, **stream, l, shape, *rope, rng);
    ASSERT_TRUE(q.ok()) << q.status();
    for (int s = 0; s < 3; ++s) {
      const std::string what = step + ", sequence " + std::to_string(s);
      ExpectDeviceSelectionEqualsHost(cuda, **stream, *q, l, shape, s, {0.9}, what + ", tau 0.9");
      ExpectDeviceSelectionEqualsHost(cuda, **stream, *q, l, shape, s, per_head,
                                      what + ", per-head tau");
      ExpectDeviceSelectionEqualsHost(cuda, **stream, *q, l, shape, s, {1.01}, what + ", tau 1.01");
    }
  }
  // Thresholds of the wrong count: a clear error.
  const BatchLayout l = StepLayout(pages, {0, 0, 0}, {256, 256, 256}, kPage);
  ASSERT_TRUE(cuda.BeginStep(**stream, l).ok());
  auto q = cuda.Allocate(l.num_tokens(), kHq * kD);
  ASSERT_TRUE(q.ok());
  std::vector<int32_t> rs, blocks;
  XAttentionEstimate e{.seq = 0, .stride = 16, .block_size = kBlock};
  EXPECT_EQ(cuda.XAttentionSelect(**stream, 0, *q, shape, e, {0.9, 0.9}, rs, blocks).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine
