// The engine decodes the embedded model with Quest (attention.decode.method quest): with a
// budget covering the context its greedy tokens equal dense decoding's; with a two-page budget
// it decodes to the end and the decode observer reports the fraction of KV read below 1; bad
// decode settings are refused naming their key.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "engine/serving/engine.h"
#include "engine/testing/sparse_decode_setup.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using testing::DecodeStatsObserver;
using testing::EmbeddedModelDir;
using testing::GenerateGreedy;
using testing::SparseDecodeEngineConfig;

// The prompts of these tests: n tokens in [10, 200].
std::vector<int32_t> Prompt(int n) { return testing::RandomTokens(n, 5, 10, 200); }

TEST(QuestEngineTest, CoveringBudgetDecodesLikeDense) {
  const std::vector<int32_t> prompt = Prompt(350);
  const std::vector<int32_t> dense =
      GenerateGreedy(SparseDecodeEngineConfig("dense", 4096), prompt, 24);
  ASSERT_EQ(dense.size(), 24u);
  DecodeStatsObserver obs;
  EXPECT_EQ(GenerateGreedy(SparseDecodeEngineConfig("quest", 4096), prompt, 24, &obs), dense);
  std::lock_guard<std::mutex> lock(obs.mu);
  ASSERT_FALSE(obs.fractions.empty());
  for (double f : obs.fractions) EXPECT_EQ(f, 1.0);
}

TEST(QuestEngineTest, SmallBudgetReadsAFraction) {
  DecodeStatsObserver obs;
  const std::vector<int32_t> out =
      GenerateGreedy(SparseDecodeEngineConfig("quest", 32), Prompt(350), 16, &obs);
  EXPECT_EQ(out.size(), 16u);
  std::lock_guard<std::mutex> lock(obs.mu);
  ASSERT_FALSE(obs.fractions.empty());
  // Layer 0 of 4 dense (~351 keys a head), layers 1..3 read 2 pages (<= 32 keys): the fraction
  // is at most (351 + 3 * 32) / (4 * 351) ~ 0.32.
  for (double f : obs.fractions) EXPECT_LT(f, 0.33);
  EXPECT_GT(obs.selection_seconds, 0);
}

TEST(QuestEngineTest, BadDecodeSettingsNameTheirKey) {
  EngineConfig c = SparseDecodeEngineConfig("quest", 31);
  absl::Status st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.token_budget"), std::string::npos) << st;
  c = SparseDecodeEngineConfig("quest", 64);
  c.attention.decode.dense_layers = -1;
  st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.dense_layers"), std::string::npos) << st;
  c = SparseDecodeEngineConfig("quest", 64);
  c.attention.decode.sparse_min_tokens = -5;
  st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.sparse_min_tokens"), std::string::npos) << st;
  c = SparseDecodeEngineConfig("sparse", 64);
  st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.method"), std::string::npos) << st;
}

}  // namespace
}  // namespace sieve::engine
