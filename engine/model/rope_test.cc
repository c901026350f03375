#include "engine/model/rope.h"

#include <cmath>
#include <numbers>

#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

TEST(RopeTest, DefaultMatchesFormula) {
  RopeParams p;
  p.theta = 10000.0;
  p.rotary_dim = 64;
  auto t = ComputeRopeTables(p);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->inv_freq.size(), 32u);
  for (int i = 0; i < 32; ++i) {
    EXPECT_NEAR(t->inv_freq[i], 1.0 / std::pow(10000.0, 2.0 * i / 64), 1e-6 * t->inv_freq[i]);
  }
  EXPECT_EQ(t->attention_scaling, 1.0f);
}

TEST(RopeTest, LinearDividesEveryFrequency) {
  RopeParams p;
  p.rotary_dim = 128;
  p.theta = 500000.0;
  auto base = ComputeRopeTables(p);
  p.type = RopeParams::Type::kLinear;
  p.factor = 4.0;
  auto lin = ComputeRopeTables(p);
  ASSERT_TRUE(base.ok() && lin.ok());
  for (size_t i = 0; i < base->inv_freq.size(); ++i) {
    EXPECT_FLOAT_EQ(lin->inv_freq[i], base->inv_freq[i] / 4.0f);
  }
}

// Llama 3.1's scaling: wavelengths shorter than 8192/4 keep their frequency, longer than 8192
// are divided by the factor, and the band between blends smoothly.
TEST(RopeTest, Llama3KeepsHighAndScalesLowFrequencies) {
  RopeParams p;
  p.rotary_dim = 128;
  p.theta = 500000.0;
  auto base = ComputeRopeTables(p);
  p.type = RopeParams::Type::kLlama3;
  p.factor = 8.0;
  p.low_freq_factor = 1.0;
  p.high_freq_factor = 4.0;
  p.original_max_position = 8192;
  auto l3 = ComputeRopeTables(p);
  ASSERT_TRUE(base.ok() && l3.ok());
  int kept = 0, scaled = 0, blended = 0;
  for (size_t i = 0; i < base->inv_freq.size(); ++i) {
    const double wavelen = 2 * std::numbers::pi / base->inv_freq[i];
    const float f = l3->inv_freq[i], f0 = base->inv_freq[i];
    if (wavelen < 8192.0 / 4) {
      EXPECT_EQ(f, f0) << i;
      ++kept;
    } else if (wavelen > 8192.0) {
      EXPECT_FLOAT_EQ(f, f0 / 8.0f) << i;
      ++scaled;
    } else {
      EXPECT_LT(f, f0) << i;
      EXPECT_GT(f, f0 / 8.0f) << i;
      ++blended;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(scaled, 0);
  EXPECT_GT(blended, 0);
}

TEST(RopeTest, YarnRampsAndScalesAttention) {
  RopeParams p;
  p.rotary_dim = 128;
  p.theta = 1000000.0;
  p.type = RopeParams::Type::kYarn;
  p.factor = 4.0;
  p.original_max_position = 32768;
  auto t = ComputeRopeTables(p);
  ASSERT_TRUE(t.ok()) << t.status();
  // The highest frequency is extrapolated (unchanged), the lowest interpolated (divided).
  EXPECT_FLOAT_EQ(t->inv_freq.front(), 1.0f);
  const float lowest = 1.0f / std::pow(1000000.0f, 126.0f / 128.0f);
  EXPECT_NEAR(t->inv_freq.back(), lowest / 4.0f, 1e-6f * lowest);
  EXPECT_NEAR(t->attention_scaling, 0.1 * std::log(4.0) + 1.0, 1e-6);
  for (size_t i = 1; i < t->inv_freq.size(); ++i) EXPECT_LT(t->inv_freq[i], t->inv_freq[i - 1]);
}

TEST(RopeTest, RejectsBadParameters) {
  RopeParams p;
  p.rotary_dim = 63;
  EXPECT_EQ(ComputeRopeTables(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.rotary_dim = 64;
  p.theta = 0;
  EXPECT_EQ(ComputeRopeTables(p).status().code(), absl::StatusCode::kInvalidArgument);
  p.theta = 10000;
  p.type = RopeParams::Type::kLlama3;
  p.factor = 8;
  p.low_freq_factor = 4;
  p.high_freq_factor = 1;
  EXPECT_EQ(ComputeRopeTables(p).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine
