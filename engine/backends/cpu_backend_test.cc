#include "engine/backends/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/sparse/double_sparsity.h"
#include "kernels/sparse/quest.h"

namespace sieve::engine {
namespace {

TensorView View(const std::vector<float>& v, std::vector<int64_t> shape) {
  return TensorView{"t", DType::kF32, std::move(shape),
                    absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(v.data()),
                                        v.size() * sizeof(float))};
}

// Logits is the final projection straight to the host: the same numbers as Linear followed by
// CopyToHost, with its sizes checked.
TEST(CpuBackendTest, LogitsEqualLinearThenCopy) {
  CpuBackend b(2);
  std::mt19937 rng(4);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(3 * 24), w(37 * 24);
  for (float& v : x) v = d(rng);
  for (float& v : w) v = d(rng);
  auto tx = b.UploadWeight({View(x, {3, 24})}, 24);
  auto tw = b.UploadWeight({View(w, {37, 24})}, 24);
  ASSERT_TRUE(tx.ok() && tw.ok());
  auto out = b.Allocate(3, 37);
  ASSERT_TRUE(out.ok());
  auto stream = b.CreateStream({});
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(b.Linear(**stream, *tx, *tw, Tensor{}, *out).ok());
  std::vector<float> want(3 * 37), got(3 * 37, NAN);
  ASSERT_TRUE(b.CopyToHost(**stream, *out, absl::MakeSpan(want)).ok());
  ASSERT_TRUE(b.Logits(**stream, *tx, *tw, absl::MakeSpan(got)).ok());
  EXPECT_EQ(got, want);
  double dot = 0;
  for (int c = 0; c < 24; ++c) dot += double{x[2 * 24 + c]} * w[36 * 24 + c];
  EXPECT_NEAR(got[2 * 37 + 36], dot, 1e-4);

  std::vector<float> small(3 * 37 - 1);
  EXPECT_EQ(b.Logits(**stream, *tx, *tw, absl::MakeSpan(small)).code(), absl::StatusCode::kInternal);
  auto narrow = b.Allocate(3, 23);
  ASSERT_TRUE(narrow.ok());
  EXPECT_EQ(b.Logits(**stream, *narrow, *tw, absl::MakeSpan(got)).code(),
            absl::StatusCode::kInternal);
  // No step graphs on the CPU.
  EXPECT_FALSE(b.SupportsStepGraphs());
  BatchLayout l;
  EXPECT_EQ(b.BeginGraphStep(**stream, l, {}).status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(b.EndGraphStep(**stream, {}).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(b.GraphLogits(**stream, *tx, *tw).code(), absl::StatusCode::kUnimplemented);
}

// Pages written by WriteKvPages (an import) get their side data rebuilt from the written keys:
// Quest bounds equal the reference recomputation over the page's 16 keys, with nothing left of
// what the page held before; DoubleSparsity labels hold each token's outlier channels (fp16).
TEST(CpuBackendTest, RebuildSideDataOfWrittenPages) {
  constexpr int32_t kLayers = 2, kPages = 6, kPs = 16, kHkv = 2, kHq = 4, kD = 64, kR = 8;
  const AttentionShape shape{kHq, kHkv, kD};
  CpuBackend b(2);
  ASSERT_TRUE(b.AllocateKvCache(kLayers, kPages, kPs, shape).ok());
  // Nothing allocated yet: a clear refusal.
  const std::vector<int32_t> pages = {3, 1};
  EXPECT_EQ(b.RebuildPageBounds(pages, shape).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b.RebuildDsLabels(pages).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(b.AllocatePageBounds(kLayers, shape).ok());
  kernels::DoubleSparsityShape ds;
  ds.num_q_heads = kHq;
  ds.num_kv_heads = kHkv;
  ds.head_dim = kD;
  ds.channels = kR;
  ASSERT_TRUE(b.AllocateDsLabels(kLayers, ds).ok());
  std::mt19937 rng(11);
  for (int32_t l = 0; l < kLayers; ++l) {
    std::vector<int32_t> channels(kHq * kR);
    for (int32_t h = 0; h < kHq; ++h) {
      std::vector<int32_t> perm(kD);
      for (int32_t c = 0; c < kD; ++c) perm[c] = c;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::copy(perm.begin(), perm.begin() + kR, channels.begin() + h * kR);
    }
    ASSERT_TRUE(b.SetDsChannels(l, channels).ok());
  }
  const int64_t page_bytes = b.KvPageBytes(kLayers, kPs, shape);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fresh = [&](float offset) {
    std::vector<float> v(pages.size() * page_bytes / sizeof(float));
    for (float& x : v) x = normal(rng) + offset;
    std::vector<uint8_t> bytes(v.size() * sizeof(float));
    std::memcpy(bytes.data(), v.data(), bytes.size());
    return bytes;
  };
  // Stale side data first (keys far above the second write's), then the write that counts.
  for (const float offset : {50.0f, 0.0f}) {
    ASSERT_TRUE(b.WriteKvPages(pages, fresh(offset)).ok());
    ASSERT_TRUE(b.RebuildPageBounds(pages, shape).ok());
    ASSERT_TRUE(b.RebuildDsLabels(pages).ok());
  }
  const kernels::DoubleSparsityShape& s = b.ds_labels()->shape();
  for (int32_t l = 0; l < kLayers; ++l) {
    absl::Span<const float> k = b.k_cache(l), bounds = b.page_bounds(l);
    for (const int32_t p : pages) {
      for (int32_t g = 0; g < kHkv; ++g) {
        std::vector<float> want(2 * kD);
        kernels::QuestBoundsRef(k.data(), p, g, kPs, kHkv, kD, kPs, want.data());
        const float* got = bounds.data() + (int64_t{p} * kHkv + g) * 2 * kD;
        EXPECT_EQ(std::vector<float>(got, got + 2 * kD), want) << "layer " << l << " page " << p;
        EXPECT_LT(want[0], 20.0f);  // the stale write's keys (~50) are gone
      }
      const uint8_t* labels = b.ds_labels()->labels(l) + p * kernels::DsLabelPageBytes(s);
      const std::vector<int32_t>& ch = b.ds_labels()->channels(l);
      for (int32_t h = 0; h < kHq; ++h) {
        for (int32_t i = 0; i < kR; ++i) {
          for (int32_t t = 0; t < kPs; ++t) {
            const float key =
                k[((int64_t{p} * kPs + t) * kHkv + h / (kHq / kHkv)) * kD + ch[h * kR + i]];
            // fp16 rounding: relative error at most 2^-11 (11 significand bits), absolute 2^-25
            // for subnormals.
            EXPECT_NEAR(kernels::DsReadLabel(s, labels, h, i, t), key,
                        std::ldexp(std::fabs(key), -11) + std::ldexp(1.0f, -24));
          }
        }
      }
    }
  }
  // Pages outside the pool are refused.
  const std::vector<int32_t> outside = {kPages};
  EXPECT_EQ(b.RebuildPageBounds(outside, shape).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(b.RebuildDsLabels(outside).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine
