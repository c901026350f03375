// MInferencePolicy (minference_policy.h) through the factory and on the embedded model: settings
// and pattern-file errors name their key; on a ModelWorker, budgets that cover the prompt read
// every causal key (density 1) and give the dense logits; small budgets read fewer keys; pattern
// files with every kind of head run; chunked prefill with small budgets runs.
#include "engine/attention/minference_policy.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "engine/attention/attention_policy.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine.h"
#include "engine/serving/engine_config.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using kernels::minference::Pattern;

std::string EmbeddedDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

AttentionConfig MInference(int32_t vertical, int32_t slash, int32_t min_tokens = 32) {
  AttentionConfig c;
  c.prefill.method = "minference";
  c.prefill.sparse_min_tokens = min_tokens;
  c.prefill.minference.vertical_size = vertical;
  c.prefill.minference.slash_size = slash;
  return c;
}

TEST(MInferencePolicyTest, FactoryAndSettingErrorsNameTheKey) {
  const AttentionModelShape model{4, 4};
  auto p = MakeAttentionPolicy(MInference(1000, 6096), AttentionPhase::kPrefill, model);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ((*p)->method(), "minference");
  EXPECT_EQ(MInference(1000, 6096).Describe(),
            "prefill=minference(vertical=1000,slash=6096,last_q=64,patterns=none,min_tokens=32,"
            "dense_layers=0,max_density=0) decode=dense");

  AttentionConfig bad = MInference(0, 6096);
  bad.prefill.minference.last_q = 0;
  p = MakeAttentionPolicy(bad, AttentionPhase::kPrefill, model);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("attention.prefill.minference.vertical_size"), std::string::npos);
  EXPECT_NE(p.status().message().find("attention.prefill.minference.last_q"), std::string::npos);

  AttentionConfig file = MInference(1000, 6096);
  file.prefill.minference.pattern_file = WriteTemp("three_layers.json", "[{}, {}, {}]");
  p = MakeAttentionPolicy(file, AttentionPhase::kPrefill, model);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("attention.prefill.minference.pattern_file"), std::string::npos);
  EXPECT_NE(p.status().message().find("has 3 layers; the model has 4"), std::string::npos);
  file.prefill.minference.pattern_file = "/nonexistent/p.json";
  p = MakeAttentionPolicy(file, AttentionPhase::kPrefill, model);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("/nonexistent/p.json"), std::string::npos);
  p = MakeAttentionPolicy(file, AttentionPhase::kPrefill, AttentionModelShape{});
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("pattern_file"), std::string::npos);
}

TEST(MInferencePolicyTest, PatternFileHeadsAndDefaults) {
  AttentionConfig c = MInference(123, 456);
  c.prefill.minference.pattern_file = WriteTemp(
      "two_heads.json",
      R"([{"1": ["stream_llm", 64, 128]}, {}, {"3": ["block_sparse", 2, 0]}, {}])");
  auto p = MakeMInferencePolicy(c.prefill, AttentionModelShape{4, 4});
  ASSERT_TRUE(p.ok()) << p.status();
  const auto& policy = static_cast<const MInferencePolicy&>(**p);
  EXPECT_EQ(policy.Pattern(0, 1).pattern, Pattern::kAShape);
  EXPECT_EQ(policy.Pattern(0, 1).slash_size, 128);
  EXPECT_EQ(policy.Pattern(2, 3).pattern, Pattern::kBlockSparse);
  EXPECT_EQ(policy.Pattern(0, 0).pattern, Pattern::kVerticalSlash);  // omitted: the sizes above
  EXPECT_EQ(policy.Pattern(0, 0).vertical_size, 123);
  EXPECT_EQ(policy.Pattern(1, 2).slash_size, 456);
}

class MInferenceWorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
    o.num_threads = 2;
    o.num_pages = 40;
    o.max_step_tokens = 600;
    o.max_step_logits = 4;
    auto r = ModelRunner::Load(EmbeddedDir(), o);
    ASSERT_TRUE(r.ok()) << r.status();
    runner_ = std::move(*r);
    tokens_.resize(600);
    for (int i = 0; i < 600; ++i) tokens_[i] = (i * 53 + 7) % 4096;
    for (int i = 0; i < 40; ++i) pages_.push_back(i);
  }

  // Prefills tokens_ in chunks of `chunk` on `w`; the logits after the last token.
  std::vector<float> Prefill(ModelWorker& w, int chunk = 600) {
    std::vector<float> logits;
    for (int s = 0; s < 600; s += chunk) {
      const int n = std::min(chunk, 600 - s);
      SequenceStep step{absl::MakeConstSpan(tokens_).subspan(s, n), s, pages_, s + n == 600};
      EXPECT_TRUE(w.Forward({step}, logits).ok());
    }
    return logits;
  }

  std::unique_ptr<ModelWorker> Worker(const AttentionConfig& c) {
    auto p = MakeAttentionPolicy(c, AttentionPhase::kPrefill, AttentionModelShape{4, 4});
    EXPECT_TRUE(p.ok()) << p.status();
    auto w = runner_->CreateWorker({}, std::move(*p));
    EXPECT_TRUE(w.ok()) << w.status();
    return std::move(*w);
  }

  std::unique_ptr<ModelRunner> runner_;
  std::vector<int32_t> tokens_, pages_;
};

TEST_F(MInferenceWorkerTest, CoveringBudgetsGiveDenseLogitsAndSmallOnesReadLess) {
  auto dense = runner_->CreateWorker();
  ASSERT_TRUE(dense.ok());
  const std::vector<float> want = Prefill(**dense);

  // slash_size >= N: every diagonal, so every causal key (6.1.3). The same keys as dense in
  // another summation order: the tolerance of SparsePrefillPolicyTest (fp32 reassociation over
  // <= 600 terms, ~600 * 2^-24 = 3.6e-5 relative per attention output, amplified by far less
  // than 3x through four layers): 1e-4 relative plus 1e-4 absolute.
  for (const AttentionConfig& c : {MInference(30, 600), MInference(600, 50)}) {
    auto all = Worker(c);
    const std::vector<float> got = Prefill(*all);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(got[i], want[i], 1e-4 * (1 + std::abs(want[i]))) << i;
    }
    const PrefillAttentionStats stats = all->TakePrefillStats();
    EXPECT_EQ(stats.sparse_layers, 4);
    EXPECT_EQ(stats.read_pairs, stats.dense_pairs);
  }

  auto small = Worker(MInference(30, 50));
  const std::vector<float> sparse = Prefill(*small);
  const PrefillAttentionStats stats = small->TakePrefillStats();
  EXPECT_EQ(stats.sparse_layers, 4);
  EXPECT_LT(stats.density(), 0.8);  // 30 columns + 100 diagonals as tiles, of 600 keys
  EXPECT_NE(sparse, want);
}

TEST_F(MInferenceWorkerTest, EveryKindOfHeadAndChunkedPrefillRun) {
  AttentionConfig c = MInference(30, 100);
  c.prefill.minference.pattern_file = WriteTemp(
      "mixed.json",
      R"([{"0": ["stream_llm", 16, 128], "1": ["block_sparse", 3, 0]},
          {"2": ["stream_llm", 4, 64]}, {"3": ["block_sparse", 1, 0]}, {}])");
  auto w = Worker(c);
  const std::vector<float> whole = Prefill(*w);
  EXPECT_LT(w->TakePrefillStats().density(), 0.9);
  // In chunks of 200: each chunk over all earlier keys (the plans validate against the step).
  const std::vector<float> chunked = Prefill(*w, 200);
  ASSERT_EQ(chunked.size(), whole.size());
  const PrefillAttentionStats stats = w->TakePrefillStats();
  EXPECT_EQ(stats.sparse_layers, 12);  // 3 chunks x 4 layers (all above 32 KV tokens)
  EXPECT_LT(stats.density(), 0.9);
  for (float x : chunked) ASSERT_TRUE(std::isfinite(x));
}

// The engine with attention.prefill.method minference, prompts prefilled in chunks of 128 over
// earlier pages: with budgets covering the prompt (slash_size >= its length) greedy decoding
// gives the dense engine's tokens; a request asking for dense gets them whatever the budgets.
TEST(MInferenceEngineTest, CoveringBudgetsGiveTheDenseEnginesTokens) {
  std::vector<int32_t> prompt(500);
  for (int i = 0; i < 500; ++i) prompt[i] = (i * 97 + 13) % 4096;
  auto tokens = [&](const AttentionConfig& a, bool dense_request) {
    EngineConfig c;
    c.model.directory = EmbeddedDir();
    c.model.name = "embedded";
    c.model.cpu_threads = 2;
    c.kv_cache.page_size_tokens = 16;
    c.kv_cache.num_pages = 64;
    c.scheduler.max_batch_tokens = 256;
    c.scheduler.prefill_chunk_tokens = 128;
    c.attention = a;
    auto engine = Engine::Create(c, nullptr);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return std::vector<int32_t>{};
    auto sink = std::make_shared<testing::RecordingSink>();
    RequestSpec s;
    s.prompt = prompt;
    s.sampling.temperature = 0;
    s.stop.max_tokens = 12;
    s.dense_prefill = dense_request;
    s.sink = sink;
    EXPECT_TRUE((*engine)->Submit(std::move(s)).ok());
    EXPECT_TRUE(sink->WaitFinished(absl::Seconds(300)));
    return sink->tokens();
  };
  const std::vector<int32_t> want = tokens(AttentionConfig(), false);
  ASSERT_EQ(want.size(), 12u);
  EXPECT_EQ(tokens(MInference(30, 500), false), want);
  EXPECT_EQ(tokens(MInference(30, 50), true), want);
}

}  // namespace
}  // namespace sieve::engine
