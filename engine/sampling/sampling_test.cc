#include "engine/sampling/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Returns natural-log logits whose softmax is `probs`.
std::vector<float> LogitsOf(const std::vector<double>& probs) {
  std::vector<float> out;
  for (double p : probs) out.push_back(static_cast<float>(std::log(p)));
  return out;
}

// Samples `n` tokens from fresh copies of `logits` with one seeded stream and returns the
// frequency of each token id.
std::vector<double> Frequencies(const std::vector<float>& logits, const SamplingParams& params,
                                int n, uint64_t seed = 1234) {
  SamplerRng rng(seed);
  TokenHistory history;
  std::vector<int> counts(logits.size(), 0);
  std::vector<float> row;
  for (int i = 0; i < n; ++i) {
    row = logits;
    absl::StatusOr<SampledToken> t = SampleToken(absl::MakeSpan(row), params, history, rng);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) break;
    ++counts[t->id];
  }
  std::vector<double> freq;
  for (int c : counts) freq.push_back(static_cast<double>(c) / n);
  return freq;
}

// Samples one token from a copy of `logits`.
SampledToken SampleOnce(std::vector<float> logits, const SamplingParams& params, SamplerRng& rng,
                        const TokenHistory& history = TokenHistory()) {
  absl::StatusOr<SampledToken> t = SampleToken(absl::MakeSpan(logits), params, history, rng);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : SampledToken();
}

// Returns an error message expectation helper: Validate() fails with InvalidArgument naming
// `field`.
void ExpectFieldError(const SamplingParams& p, const std::string& field) {
  absl::Status s = p.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
  EXPECT_THAT(std::string(s.message()), HasSubstr(field));
}

TEST(SamplingParamsTest, DefaultsAndBoundsAreValid) {
  EXPECT_TRUE(SamplingParams().Validate().ok());
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.presence_penalty = -2.0f;
  p.frequency_penalty = 2.0f;
  p.top_logprobs = kMaxTopLogprobs;
  p.repetition_penalty = 1e-3f;
  EXPECT_TRUE(p.Validate().ok()) << p.Validate();
}

TEST(SamplingParamsTest, EachFieldIsChecked) {
  SamplingParams p;
  p.temperature = kNaN;
  ExpectFieldError(p, "temperature");
  EXPECT_THAT(std::string(p.Validate().message()), HasSubstr("nan"));
  p.temperature = -0.1f;
  ExpectFieldError(p, "temperature");
  p.temperature = kInf;
  ExpectFieldError(p, "temperature");

  p = SamplingParams();
  p.top_k = -1;
  ExpectFieldError(p, "top_k");
  EXPECT_THAT(std::string(p.Validate().message()), HasSubstr("-1"));

  for (float bad : {0.0f, 1.5f, -0.5f, kNaN}) {
    p = SamplingParams();
    p.top_p = bad;
    ExpectFieldError(p, "top_p");
  }
  for (float bad : {1.01f, -0.1f, kNaN}) {
    p = SamplingParams();
    p.min_p = bad;
    ExpectFieldError(p, "min_p");
  }
  for (float bad : {0.0f, -1.0f, kInf, kNaN}) {
    p = SamplingParams();
    p.repetition_penalty = bad;
    ExpectFieldError(p, "repetition_penalty");
  }
  for (float bad : {2.5f, -2.01f, kNaN}) {
    p = SamplingParams();
    p.presence_penalty = bad;
    ExpectFieldError(p, "presence_penalty");
    p = SamplingParams();
    p.frequency_penalty = bad;
    ExpectFieldError(p, "frequency_penalty");
  }
  for (int bad : {21, -1}) {
    p = SamplingParams();
    p.top_logprobs = bad;
    ExpectFieldError(p, "top_logprobs");
  }
}

TEST(StopCriteriaTest, DefaultsAreValid) {
  StopCriteria c;
  c.stop_token_ids = {0, 99};
  c.stop_strings = {"\n\n", std::string(kMaxStopStringBytes, 'x'), "日本"};
  EXPECT_TRUE(c.Validate(100).ok()) << c.Validate(100);
}

TEST(StopCriteriaTest, EachFieldIsChecked) {
  auto expect_error = [](const StopCriteria& c, const std::string& field) {
    absl::Status s = c.Validate(100);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(s.message()), HasSubstr(field));
  };
  StopCriteria c;
  c.max_tokens = 0;
  expect_error(c, "max_tokens");

  c = StopCriteria();
  c.stop_token_ids = {5, 100};
  expect_error(c, "stop_token_ids[1]");
  c.stop_token_ids = {-1};
  expect_error(c, "stop_token_ids[0]");

  c = StopCriteria();
  c.stop_strings.assign(kMaxStopStrings + 1, "x");
  expect_error(c, "stop_strings");
  c.stop_strings = {"ok", ""};
  expect_error(c, "stop_strings[1]");
  c.stop_strings = {std::string(kMaxStopStringBytes + 1, 'x')};
  expect_error(c, "stop_strings[0]");
  c.stop_strings = {"bad \xC3"};  // Truncated two-byte sequence.
  expect_error(c, "UTF-8");
  c.stop_strings = {"\xED\xA0\x80"};  // A UTF-16 surrogate.
  expect_error(c, "UTF-8");

  EXPECT_EQ(StopCriteria().Validate(0).code(), absl::StatusCode::kInvalidArgument);
}

TEST(FinishReasonTest, Names) {
  EXPECT_EQ(FinishReasonToString(FinishReason::kNone), "none");
  EXPECT_EQ(FinishReasonToString(FinishReason::kLength), "length");
  EXPECT_EQ(FinishReasonToString(FinishReason::kStop), "stop");
  EXPECT_EQ(FinishReasonToString(FinishReason::kEos), "eos");
  EXPECT_EQ(FinishReasonToString(FinishReason::kCancelled), "cancelled");
  EXPECT_EQ(FinishReasonToString(FinishReason::kError), "error");
}

// The stream must never change silently: these values come from an independent implementation
// of SplitMix64-seeded xoshiro256**.
TEST(SamplerRngTest, GoldenStream) {
  SamplerRng zero(0);
  EXPECT_EQ(zero.NextU64(), 0x99ec5f36cb75f2b4ull);
  EXPECT_EQ(zero.NextU64(), 0xbf6e1f784956452aull);
  EXPECT_EQ(zero.NextU64(), 0x1a5f849d4933e6e0ull);
  EXPECT_EQ(zero.NextU64(), 0x6aa594f1262d2d2cull);
  SamplerRng rng(42);
  EXPECT_DOUBLE_EQ(rng.NextUniform(), 0.08386297105988216);
  EXPECT_DOUBLE_EQ(rng.NextUniform(), 0.3789802506626686);
  EXPECT_DOUBLE_EQ(rng.NextUniform(), 0.6800434110281394);
  EXPECT_DOUBLE_EQ(rng.NextUniform(), 0.9246929453253876);
}

TEST(SamplerRngTest, SameSeedSameStreamDifferentSeedsDiffer) {
  SamplerRng a(7), b(7), c(8);
  int differ = 0;
  double sum = 0.0;
  for (int i = 0; i < 1000; ++i) {
    const double x = a.NextUniform();
    ASSERT_EQ(x, b.NextUniform()) << i;
    if (x != c.NextUniform()) ++differ;
    ASSERT_GE(x, 0.0);
    ASSERT_LT(x, 1.0);
    sum += x;
  }
  EXPECT_GT(differ, 990);
  EXPECT_NEAR(sum / 1000, 0.5, 0.05);
  // Copying a stream copies its position.
  SamplerRng d = a;
  EXPECT_EQ(d.NextU64(), a.NextU64());
}

TEST(SamplerRngTest, NondeterministicSeedsDiffer) {
  EXPECT_NE(NondeterministicSeed(), NondeterministicSeed());
}

TEST(TokenHistoryTest, CountsDistinctTokens) {
  TokenHistory h;
  std::vector<int32_t> prompt(128 * 1024);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(i % 1000) * 150;
  h.AddPrompt(prompt);
  h.AddGenerated(150);
  h.AddGenerated(150);
  h.AddGenerated(7);
  EXPECT_EQ(h.num_distinct(), 1001u);  // Proportional to distinct ids, not to the vocabulary.
  EXPECT_EQ(h.num_generated(), 3);
  EXPECT_EQ(h.PromptCount(150), 132);  // 131072 / 1000 rounded up for the low residues.
  EXPECT_EQ(h.GeneratedCount(150), 2);
  EXPECT_EQ(h.PromptCount(7), 0);
  EXPECT_EQ(h.GeneratedCount(7), 1);
  EXPECT_EQ(h.GeneratedCount(8), 0);
}

TEST(SampleTokenTest, GreedyIsArgmaxWithTiesToLowestId) {
  SamplingParams p;
  p.temperature = 0.0f;
  SamplerRng rng(1);
  EXPECT_EQ(SampleOnce({0.1f, 3.0f, -2.0f, 2.9f}, p, rng).id, 1);
  EXPECT_EQ(SampleOnce({1.0f, 5.0f, 2.0f, 5.0f, 5.0f}, p, rng).id, 1);
  EXPECT_EQ(SampleOnce({-kInf, -kInf, -7.0f}, p, rng).id, 2);
}

TEST(SampleTokenTest, EachCallConsumesExactlyOneDraw) {
  SamplerRng rng(99), reference(99);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  SamplingParams filtered;
  filtered.top_k = 2;
  filtered.top_p = 0.5f;
  filtered.min_p = 0.1f;
  SampleOnce({1.0f, 2.0f, 3.0f}, greedy, rng);
  SampleOnce({1.0f, 2.0f, 3.0f}, filtered, rng);
  SampleOnce({1.0f, 2.0f, 3.0f}, SamplingParams(), rng);
  for (int i = 0; i < 3; ++i) reference.NextUniform();
  EXPECT_EQ(rng.NextU64(), reference.NextU64());
}

TEST(SampleTokenTest, TopKOneAndTinyTopPEqualGreedy) {
  SamplerRng data(5);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> logits(50);
    for (float& x : logits) x = static_cast<float>(data.NextUniform() * 4.0);
    logits[trial % 50] = logits[(trial * 7) % 50];  // Sometimes a tie.
    SamplingParams greedy;
    greedy.temperature = 0.0f;
    SamplerRng rng(trial);
    const int32_t want = SampleOnce(logits, greedy, rng).id;
    for (float t : {0.3f, 1.0f, 8.0f}) {
      SamplingParams k1;
      k1.temperature = t;
      k1.top_k = 1;
      EXPECT_EQ(SampleOnce(logits, k1, rng).id, want) << "trial " << trial << " T " << t;
      SamplingParams tiny_p;
      tiny_p.temperature = t;
      tiny_p.top_p = 1e-7f;
      EXPECT_EQ(SampleOnce(logits, tiny_p, rng).id, want) << "trial " << trial << " T " << t;
    }
  }
}

TEST(SampleTokenTest, FrequenciesMatchDistribution) {
  const std::vector<double> probs = {0.1, 0.2, 0.3, 0.15, 0.25};
  const std::vector<double> freq = Frequencies(LogitsOf(probs), SamplingParams(), 200000);
  for (size_t i = 0; i < probs.size(); ++i) EXPECT_NEAR(freq[i], probs[i], 0.01) << i;
}

TEST(SampleTokenTest, SameSeedSameTokens) {
  const std::vector<float> logits = LogitsOf({0.1, 0.2, 0.3, 0.15, 0.25});
  SamplerRng a(77), b(77), c(78);
  int differ = 0;
  for (int i = 0; i < 1000; ++i) {
    const int32_t x = SampleOnce(logits, SamplingParams(), a).id;
    ASSERT_EQ(x, SampleOnce(logits, SamplingParams(), b).id) << i;
    if (x != SampleOnce(logits, SamplingParams(), c).id) ++differ;
  }
  EXPECT_GT(differ, 300);
}

TEST(SampleTokenTest, TopKKeepsBestAndRenormalizes) {
  SamplingParams p;
  p.top_k = 2;
  const std::vector<double> freq =
      Frequencies(LogitsOf({0.1, 0.2, 0.3, 0.15, 0.25}), p, 200000);
  EXPECT_EQ(freq[0], 0.0);
  EXPECT_EQ(freq[1], 0.0);
  EXPECT_EQ(freq[3], 0.0);
  EXPECT_NEAR(freq[2], 0.3 / 0.55, 0.01);
  EXPECT_NEAR(freq[4], 0.25 / 0.55, 0.01);
}

TEST(SampleTokenTest, TemperatureSharpensAndFlattens) {
  const std::vector<float> logits = {0.0f, std::log(3.0f)};  // Probabilities 1/4, 3/4.
  SamplingParams p;
  p.temperature = 0.5f;  // Odds squared: 1:9.
  EXPECT_NEAR(Frequencies(logits, p, 200000)[1], 0.9, 0.01);
  p.temperature = 2.0f;  // Odds square-rooted: 1:sqrt(3).
  EXPECT_NEAR(Frequencies(logits, p, 200000)[1], std::sqrt(3.0) / (1 + std::sqrt(3.0)), 0.01);
}

TEST(SampleTokenTest, MinPDropsUnlikelyTokens) {
  SamplingParams p;
  p.min_p = 0.15f;  // Threshold 0.15 * 0.5 = 0.075: keeps 0.5, 0.3, 0.1.
  const std::vector<double> freq =
      Frequencies(LogitsOf({0.5, 0.3, 0.1, 0.06, 0.04}), p, 200000);
  EXPECT_NEAR(freq[0], 0.5 / 0.9, 0.01);
  EXPECT_NEAR(freq[1], 0.3 / 0.9, 0.01);
  EXPECT_NEAR(freq[2], 0.1 / 0.9, 0.01);
  EXPECT_EQ(freq[3], 0.0);
  EXPECT_EQ(freq[4], 0.0);
  p.min_p = 1.0f;  // Only the most likely token survives.
  EXPECT_EQ(Frequencies(LogitsOf({0.2, 0.5, 0.3}), p, 1000)[1], 1.0);
}

TEST(SampleTokenTest, TopPBoundaryIsInclusive) {
  SamplingParams p;
  p.top_p = 0.5f;  // Four equal tokens, exactly 1/4 each: two reach 0.5; ties keep lowest ids.
  std::vector<double> freq = Frequencies({0.0f, 0.0f, 0.0f, 0.0f}, p, 100000);
  EXPECT_NEAR(freq[0], 0.5, 0.01);
  EXPECT_NEAR(freq[1], 0.5, 0.01);
  EXPECT_EQ(freq[2] + freq[3], 0.0);
  p.top_p = 0.51f;
  freq = Frequencies({0.0f, 0.0f, 0.0f, 0.0f}, p, 100000);
  EXPECT_NEAR(freq[2], 1.0 / 3, 0.01);
  EXPECT_EQ(freq[3], 0.0);

  // Decimal probabilities: 0.5 + 0.3 meets top_p = 0.8 despite float rounding.
  const std::vector<float> logits = LogitsOf({0.1, 0.5, 0.06, 0.3, 0.04});
  p.top_p = 0.8f;
  freq = Frequencies(logits, p, 200000);
  EXPECT_NEAR(freq[1], 0.625, 0.01);
  EXPECT_NEAR(freq[3], 0.375, 0.01);
  EXPECT_EQ(freq[0] + freq[2] + freq[4], 0.0);
  p.top_p = 0.81f;
  freq = Frequencies(logits, p, 200000);
  EXPECT_NEAR(freq[0], 0.1 / 0.9, 0.01);
  EXPECT_EQ(freq[2] + freq[4], 0.0);
}

// A direct, sort-everything implementation of temperature -> top-k -> top-p -> min-p -> inverse
// CDF over the kept tokens in ascending id order, to check the selection shortcuts of SampleToken
// exactly on large rows.
int32_t ReferenceSample(const std::vector<float>& logits, const SamplingParams& p, double u) {
  struct C {
    int32_t id;
    float logit;
    float prob;
  };
  std::vector<C> c;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] != -kInf) c.push_back({static_cast<int32_t>(i), logits[i], 0.0f});
  }
  auto better = [](const C& a, const C& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  };
  const bool sorted = p.top_k > 0 || p.top_p < 1.0f;
  if (sorted) std::sort(c.begin(), c.end(), better);
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < c.size()) c.resize(p.top_k);
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0.0;  // Summation order differs from SampleToken's only in the last bits.
  for (C& x : c) {
    x.prob = std::exp((x.logit - max_logit) / p.temperature);
    total += x.prob;
  }
  if (p.top_p < 1.0f) {
    double cum = 0.0;
    for (size_t i = 0; i < c.size(); ++i) {
      cum += c[i].prob;
      if (cum >= p.top_p * total - 1e-6 * total) {
        c.resize(i + 1);
        break;
      }
    }
  }
  std::erase_if(c, [&](const C& x) { return x.prob < p.min_p; });
  std::sort(c.begin(), c.end(), [](const C& a, const C& b) { return a.id < b.id; });
  double kept = 0.0;
  for (const C& x : c) kept += x.prob;
  double cum = 0.0;
  for (const C& x : c) {
    cum += x.prob;
    if (u * kept < cum) return x.id;
  }
  return c.back().id;
}

TEST(SampleTokenTest, LargeRowsMatchSortEverythingReference) {
  SamplerRng data(11);
  std::vector<float> logits(8000);
  for (float& x : logits) x = static_cast<float>(data.NextUniform() * 6.0 - 3.0);
  for (int i = 0; i < 100; ++i) logits[i * 37] = -kInf;
  logits[5] = logits[6] = 3.5f;  // A tie at the top.
  struct Case {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
  };
  const Case cases[] = {{1.0f, 0, 0.9f, 0.0f},    {0.7f, 0, 0.3f, 0.0f},
                        {1.0f, 1000, 1.0f, 0.0f}, {1.3f, 1000, 0.95f, 0.05f},
                        {1.0f, 50, 0.8f, 0.0f},   {1.0f, 0, 1.0f, 0.2f}};
  for (const Case& k : cases) {
    SamplingParams p;
    p.temperature = k.temperature;
    p.top_k = k.top_k;
    p.top_p = k.top_p;
    p.min_p = k.min_p;
    SamplerRng rng(3), mirror(3);
    std::set<int32_t> seen;
    for (int i = 0; i < 200; ++i) {
      const int32_t got = SampleOnce(logits, p, rng).id;
      ASSERT_EQ(got, ReferenceSample(logits, p, mirror.NextUniform()))
          << "draw " << i << " T " << k.temperature << " k " << k.top_k << " p " << k.top_p;
      seen.insert(got);
    }
    EXPECT_GT(seen.size(), 20u);  // A real distribution, not a constant.
  }
}

// The quickselect's first pivot (median of ids 0, 50 and 99) is exactly the last token that the
// top-p set needs: it must be kept, and nothing below it.
TEST(SampleTokenTest, TopPBoundaryAtThePivot) {
  std::vector<float> logits(100, 4.9f);
  logits[99] = 10.0f;
  for (int i = 1; i <= 9; ++i) logits[i] = 6.0f;
  logits[50] = 5.0f;
  auto mass = [](float x) { return std::exp(static_cast<double>(x) - 10.0); };
  const double above = mass(10.0f) + 9 * mass(6.0f);
  const double total = above + mass(5.0f) + 89 * mass(4.9f);
  SamplingParams p;
  p.top_p = static_cast<float>((above + 0.5 * mass(5.0f)) / total);
  const std::vector<double> freq = Frequencies(logits, p, 50000);
  EXPECT_NEAR(freq[50], mass(5.0f) / (above + mass(5.0f)), 0.002);
  EXPECT_GT(freq[50], 0.0);
  EXPECT_EQ(freq[0], 0.0);
  EXPECT_EQ(freq[10], 0.0);
}

TEST(SampleTokenTest, NegativeInfinityIsNeverSampled) {
  std::vector<double> freq = Frequencies({-kInf, 0.0f, -kInf, 1.0f}, SamplingParams(), 20000);
  EXPECT_EQ(freq[0] + freq[2], 0.0);
  SamplingParams p;
  p.top_k = 3;  // Only two finite tokens exist.
  freq = Frequencies({-kInf, 0.0f, -kInf, 1.0f}, p, 20000);
  EXPECT_EQ(freq[0] + freq[2], 0.0);
}

TEST(PenaltiesTest, ExactArithmetic) {
  TokenHistory h;
  h.AddPrompt(std::vector<int32_t>{0, 1, 0});
  h.AddGenerated(2);
  h.AddGenerated(2);
  h.AddGenerated(3);
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  std::vector<float> logits = {2.0f, -2.0f, 1.0f, -1.0f, 3.0f, 0.5f};
  ASSERT_TRUE(ApplyPenalties(absl::MakeSpan(logits), p, h).ok());
  EXPECT_FLOAT_EQ(logits[0], 1.0f);                 // Prompt, positive: divided.
  EXPECT_FLOAT_EQ(logits[1], -4.0f);                // Prompt, negative: multiplied.
  EXPECT_FLOAT_EQ(logits[2], 0.5f - 0.5f - 0.5f);   // Divided, then 2 x 0.25 and 0.5 presence.
  EXPECT_FLOAT_EQ(logits[3], -2.0f - 0.25f - 0.5f); // Multiplied, then 0.25 and 0.5 presence.
  EXPECT_FLOAT_EQ(logits[4], 3.0f);                 // Unseen: untouched.
  EXPECT_FLOAT_EQ(logits[5], 0.5f);
}

TEST(PenaltiesTest, PresenceAndFrequencyIgnoreThePrompt) {
  TokenHistory h;
  h.AddPrompt(std::vector<int32_t>{0, 0, 0});
  h.AddGenerated(1);
  SamplingParams p;
  p.presence_penalty = 1.0f;
  p.frequency_penalty = -2.0f;
  std::vector<float> logits = {1.0f, 1.0f, 1.0f};
  ASSERT_TRUE(ApplyPenalties(absl::MakeSpan(logits), p, h).ok());
  EXPECT_FLOAT_EQ(logits[0], 1.0f);
  EXPECT_FLOAT_EQ(logits[1], 1.0f + 2.0f - 1.0f);
  EXPECT_FLOAT_EQ(logits[2], 1.0f);
}

TEST(PenaltiesTest, HistoryOutsideVocabularyIsAnErrorOnlyWhenPenalizing) {
  TokenHistory h;
  h.AddPrompt(std::vector<int32_t>{0, 10});
  std::vector<float> logits = {1.0f, 2.0f};
  SamplerRng rng(1);
  SamplingParams p;
  EXPECT_TRUE(SampleToken(absl::MakeSpan(logits), p, h, rng).ok());
  p.repetition_penalty = 1.2f;
  absl::StatusOr<SampledToken> t = SampleToken(absl::MakeSpan(logits), p, h, rng);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("10"));
}

TEST(PenaltiesTest, SampleTokenAppliesThemInPlaceAndBeforeGreedy) {
  TokenHistory h;
  h.AddGenerated(0);
  SamplingParams p;
  p.temperature = 0.0f;
  p.frequency_penalty = 1.0f;
  p.return_logprob = true;
  std::vector<float> logits = {2.0f, 1.5f, 0.0f};
  SamplerRng rng(1);
  absl::StatusOr<SampledToken> t = SampleToken(absl::MakeSpan(logits), p, h, rng);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->id, 1);  // 2.0 - 1.0 < 1.5.
  EXPECT_THAT(logits, ElementsAre(1.0f, 1.5f, 0.0f));
  const double log_z = std::log(std::exp(1.0) + std::exp(1.5) + std::exp(0.0));
  EXPECT_NEAR(t->logprob, 1.5 - log_z, 1e-6);  // From the penalized logits.
}

TEST(LogprobTest, ChosenAndTopMatchLogSoftmax) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, -kInf, 0.0f};
  double z = 0.0;
  for (float x : logits) z += std::exp(static_cast<double>(x));
  const double log_z = std::log(z);
  SamplingParams p;
  p.temperature = 3.0f;  // Temperature does not change the reported logprobs.
  p.top_k = 4;
  p.return_logprob = true;
  p.top_logprobs = 20;
  SamplerRng rng(8);
  for (int i = 0; i < 50; ++i) {
    const SampledToken t = SampleOnce(logits, p, rng);
    EXPECT_NEAR(t.logprob, logits[t.id] - log_z, 1e-6);
    ASSERT_EQ(t.top.size(), 6u);  // The -inf token is left out.
    EXPECT_EQ(t.top[0].first, 1);  // Tie between 1 and 3: lower id first.
    EXPECT_EQ(t.top[1].first, 3);
    EXPECT_EQ(t.top[5].first, 2);
    for (size_t j = 0; j < t.top.size(); ++j) {
      EXPECT_NEAR(t.top[j].second, logits[t.top[j].first] - log_z, 1e-6);
      if (j > 0) {
        EXPECT_GE(t.top[j - 1].second, t.top[j].second);
      }
    }
  }
}

TEST(LogprobTest, OnlyReportedWhenAsked) {
  SamplerRng rng(1);
  SamplingParams p;
  SampledToken t = SampleOnce({1.0f, 2.0f, 3.0f}, p, rng);
  EXPECT_EQ(t.logprob, 0.0f);
  EXPECT_TRUE(t.top.empty());
  p.top_logprobs = 2;
  t = SampleOnce({1.0f, 2.0f, 3.0f}, p, rng);
  EXPECT_LT(t.logprob, 0.0f);
  ASSERT_EQ(t.top.size(), 2u);
  EXPECT_EQ(t.top[0].first, 2);
  EXPECT_EQ(t.top[1].first, 1);
}

TEST(SampleTokenTest, MalformedLogitsAreErrors) {
  TokenHistory h;
  SamplerRng rng(1);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  for (const SamplingParams& p : {SamplingParams(), greedy}) {
    std::vector<float> nan_row = {1.0f, kNaN, 2.0f};
    absl::StatusOr<SampledToken> t = SampleToken(absl::MakeSpan(nan_row), p, h, rng);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInternal);
    EXPECT_THAT(std::string(t.status().message()), HasSubstr("nan"));

    std::vector<float> inf_row = {1.0f, kInf};
    EXPECT_EQ(SampleToken(absl::MakeSpan(inf_row), p, h, rng).status().code(),
              absl::StatusCode::kInternal);

    std::vector<float> masked = {-kInf, -kInf};
    t = SampleToken(absl::MakeSpan(masked), p, h, rng);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInternal);
    EXPECT_THAT(std::string(t.status().message()), HasSubstr("-inf"));

    std::vector<float> empty;
    EXPECT_EQ(SampleToken(absl::MakeSpan(empty), p, h, rng).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  SamplingParams bad;
  bad.top_p = 0.0f;
  std::vector<float> row = {1.0f, 2.0f};
  EXPECT_EQ(SampleToken(absl::MakeSpan(row), bad, h, rng).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SampleTokenTest, TinyTemperatureIsNearlyGreedyAndFinite) {
  SamplingParams p;
  p.temperature = 1e-45f;  // Denormal: 1/T overflows, so the code must divide instead.
  SamplerRng rng(4);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(SampleOnce({1.0f, 1.5f, 1.4999f}, p, rng).id, 1);
}

TEST(SampleTokenTest, FullVocabularyTopK) {
  std::vector<float> logits(150000);
  SamplerRng data(2);
  for (float& x : logits) x = static_cast<float>(data.NextUniform() * 10.0);
  std::vector<float> sorted = logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  SamplingParams p;
  p.top_k = 50;
  SamplerRng rng(9);
  for (int i = 0; i < 20; ++i) {
    const int32_t id = SampleOnce(logits, p, rng).id;
    EXPECT_GE(logits[id], sorted[49]);
  }
}

// SampleToken is SampleTokenWithUniform with the stream's next draw: the same ids and logprobs for
// every kind of parameters, and one draw per call whether it succeeds, is greedy or fails.
TEST(SampleTokenWithUniformTest, SampleTokenIsTheNextDrawOfTheStream) {
  SamplerRng data(21);
  std::vector<float> logits(3000);
  for (float& x : logits) x = static_cast<float>(data.NextUniform() * 8.0 - 4.0);
  TokenHistory history;
  history.AddPrompt({5, 6, 7, 5});
  history.AddGenerated(9);
  history.AddGenerated(5);
  std::vector<SamplingParams> kinds(5);
  kinds[1].temperature = 0.0f;
  kinds[2].top_k = 40;
  kinds[2].top_p = 0.9f;
  kinds[2].min_p = 0.02f;
  kinds[3].repetition_penalty = 1.3f;
  kinds[3].presence_penalty = 0.5f;
  kinds[3].frequency_penalty = -0.25f;
  kinds[4].top_logprobs = 5;
  kinds[4].return_logprob = true;
  kinds[4].temperature = 0.7f;
  SamplerRng rng(8), mirror(8);
  for (int round = 0; round < 20; ++round) {
    for (const SamplingParams& p : kinds) {
      std::vector<float> a = logits, b = logits;
      absl::StatusOr<SampledToken> x = SampleToken(absl::MakeSpan(a), p, history, rng);
      absl::StatusOr<SampledToken> y =
          SampleTokenWithUniform(absl::MakeSpan(b), p, history, mirror.NextUniform());
      ASSERT_TRUE(x.ok() && y.ok()) << x.status() << y.status();
      EXPECT_EQ(x->id, y->id);
      EXPECT_EQ(x->logprob, y->logprob);
      EXPECT_EQ(x->top, y->top);
      EXPECT_EQ(a, b);  // The same penalized row is left behind.
    }
  }
  // A failed call consumes its draw too.
  std::vector<float> nan_row = {1.0f, kNaN};
  EXPECT_FALSE(SampleToken(absl::MakeSpan(nan_row), SamplingParams(), history, rng).ok());
  mirror.NextUniform();
  EXPECT_EQ(rng.NextU64(), mirror.NextU64());
}

// The uniform picks the token by inverse CDF over the kept tokens in ascending id order:
// probabilities 0.1, 0.2, 0.3, 0.4 split [0, 1) at 0.1, 0.3 and 0.6.
TEST(SampleTokenWithUniformTest, UniformIsTheInverseCdfPosition) {
  const std::vector<float> logits = LogitsOf({0.1, 0.2, 0.3, 0.4});
  const TokenHistory none;
  const std::pair<double, int32_t> cases[] = {{0.0, 0},   {0.0999, 0}, {0.1001, 1}, {0.2999, 1},
                                              {0.3001, 2}, {0.5999, 2}, {0.6001, 3}, {0.99999, 3}};
  for (const auto& [u, want] : cases) {
    std::vector<float> row = logits;
    absl::StatusOr<SampledToken> t =
        SampleTokenWithUniform(absl::MakeSpan(row), SamplingParams(), none, u);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->id, want) << "u = " << u;
  }
  // Greedy ignores the uniform.
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  for (double u : {0.0, 0.5, 0.999}) {
    std::vector<float> row = logits;
    EXPECT_EQ(SampleTokenWithUniform(absl::MakeSpan(row), greedy, none, u)->id, 3);
  }
}

}  // namespace
}  // namespace sieve::engine
