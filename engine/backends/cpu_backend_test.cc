#include "engine/backends/cpu_backend.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

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

}  // namespace
}  // namespace sieve::engine
