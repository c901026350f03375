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
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

class DecodeObserver : public EngineObserver {
 public:
  void OnDecodeAttention(double fraction, double seconds) override {
    std::lock_guard<std::mutex> lock(mu);
    fractions.push_back(fraction);
    selection_seconds += seconds;
  }
  std::mutex mu;
  std::vector<double> fractions;
  double selection_seconds = 0;
};

EngineConfig Config(const std::string& method, int32_t budget) {
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.name = "embedded";
  c.model.cpu_threads = 2;
  c.kv_cache.page_size_tokens = 16;
  c.kv_cache.num_pages = 128;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 100;  // chunks start mid-page
  c.attention.decode.method = method;
  c.attention.decode.sparse_min_tokens = 0;
  c.attention.decode.dense_layers = 1;
  c.attention.decode.token_budget = budget;
  return c;
}

std::vector<int32_t> Generate(const EngineConfig& c, const std::vector<int32_t>& prompt,
                              int32_t max_tokens, EngineObserver* observer = nullptr) {
  auto engine = Engine::Create(c, observer);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  auto sink = std::make_shared<testing::RecordingSink>();
  RequestSpec s;
  s.prompt = prompt;
  s.sampling.temperature = 0;
  s.stop.max_tokens = max_tokens;
  s.stop.ignore_eos = true;
  s.sink = sink;
  EXPECT_TRUE((*engine)->Submit(std::move(s)).ok());
  EXPECT_TRUE(sink->WaitFinished(absl::Seconds(120)));
  return sink->tokens();
}

std::vector<int32_t> Prompt(int n) {
  std::mt19937 rng(5);
  std::vector<int32_t> p(n);
  for (int32_t& t : p) t = std::uniform_int_distribution<int32_t>(10, 200)(rng);
  return p;
}

TEST(QuestEngineTest, CoveringBudgetDecodesLikeDense) {
  const std::vector<int32_t> prompt = Prompt(350);
  const std::vector<int32_t> dense = Generate(Config("dense", 4096), prompt, 24);
  ASSERT_EQ(dense.size(), 24u);
  DecodeObserver obs;
  EXPECT_EQ(Generate(Config("quest", 4096), prompt, 24, &obs), dense);
  std::lock_guard<std::mutex> lock(obs.mu);
  ASSERT_FALSE(obs.fractions.empty());
  for (double f : obs.fractions) EXPECT_EQ(f, 1.0);
}

TEST(QuestEngineTest, SmallBudgetReadsAFraction) {
  DecodeObserver obs;
  const std::vector<int32_t> out = Generate(Config("quest", 32), Prompt(350), 16, &obs);
  EXPECT_EQ(out.size(), 16u);
  std::lock_guard<std::mutex> lock(obs.mu);
  ASSERT_FALSE(obs.fractions.empty());
  // Layer 0 of 4 dense (~351 keys a head), layers 1..3 read 2 pages (<= 32 keys): the fraction
  // is at most (351 + 3 * 32) / (4 * 351) ~ 0.32.
  for (double f : obs.fractions) EXPECT_LT(f, 0.33);
  EXPECT_GT(obs.selection_seconds, 0);
}

TEST(QuestEngineTest, BadDecodeSettingsNameTheirKey) {
  EngineConfig c = Config("quest", 31);
  absl::Status st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.token_budget"), std::string::npos) << st;
  c = Config("quest", 64);
  c.attention.decode.dense_layers = -1;
  st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.dense_layers"), std::string::npos) << st;
  c = Config("quest", 64);
  c.attention.decode.sparse_min_tokens = -5;
  st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.sparse_min_tokens"), std::string::npos) << st;
  c = Config("sparse", 64);
  st = c.Validate();
  EXPECT_NE(st.message().find("attention.decode.method"), std::string::npos) << st;
}

}  // namespace
}  // namespace sieve::engine
