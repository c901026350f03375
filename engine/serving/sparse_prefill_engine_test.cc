// The Engine serving with attention.prefill.method xattention on the embedded model: a long
// prompt prefilled in chunks runs sparse (the observer sees a density below 1 and index time),
// its greedy continuation is well formed, a threshold above 1 gives the dense engine's tokens, a
// request asking for dense prefill is dense, both methods serve on a bfloat16 KV cache, and the
// cuda backend refuses the method naming the key.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <vector>

#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

class DensityObserver : public EngineObserver {
 public:
  void OnPrefillAttention(double density, double index_seconds) override {
    std::lock_guard<std::mutex> lock(mu);
    densities.push_back(density);
    if (index_seconds < 0) ++bad;
    if (index_seconds > 0) ++estimated;
  }
  std::vector<double> Densities() {
    std::lock_guard<std::mutex> lock(mu);
    return densities;
  }
  std::mutex mu;
  std::vector<double> densities;
  std::atomic<int> bad{0};
  std::atomic<int> estimated{0};  // steps whose layers ran an index
};

std::vector<int32_t> LongPrompt() {
  std::ifstream in(ModelDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(ss.str(), nullptr, false);
  EXPECT_FALSE(golden.is_discarded());
  return golden["logits"].back()["ids"].get<std::vector<int32_t>>();
}

EngineConfig Config(const std::string& method, double tau) {
  EngineConfig c;
  c.model.directory = ModelDir();
  c.model.cpu_threads = 2;
  c.kv_cache.num_pages = 256;
  c.scheduler.max_batch_tokens = 256;
  c.scheduler.prefill_chunk_tokens = 256;  // chunks aligned to the 64-token blocks
  c.attention.prefill.method = method;
  c.attention.prefill.sparse_min_tokens = 256;
  c.attention.prefill.max_density = 1.0;  // the sparse path whatever the density (below: less)
  c.attention.prefill.xattention.stride = 8;
  c.attention.prefill.xattention.block_size = 64;
  c.attention.prefill.xattention.threshold = tau;
  return c;
}

// Greedy tokens of `prompt` on an engine made from `c`.
std::vector<int32_t> Generate(const EngineConfig& c, const std::vector<int32_t>& prompt,
                              EngineObserver* observer, bool dense_request = false) {
  auto engine = Engine::Create(c, observer);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  auto sink = std::make_shared<testing::RecordingSink>();
  RequestSpec s;
  s.prompt = prompt;
  s.sampling.temperature = 0;
  s.stop.max_tokens = 16;
  s.stop.ignore_eos = true;
  s.dense_prefill = dense_request;
  s.sink = sink;
  EXPECT_TRUE((*engine)->Submit(std::move(s)).ok());
  EXPECT_TRUE(sink->WaitFinished(absl::Seconds(120)));
  return sink->tokens();
}

TEST(SparsePrefillEngineTest, ServesXAttention) {
  const std::vector<int32_t> prompt = LongPrompt();
  ASSERT_GE(prompt.size(), 800u);
  const std::vector<int32_t> dense = Generate(Config("dense", 0.9), prompt, nullptr);
  ASSERT_EQ(dense.size(), 16u);

  DensityObserver sparse_obs;
  const EngineConfig sparse_config = Config("xattention", 0.9);
  const std::vector<int32_t> sparse = Generate(sparse_config, prompt, &sparse_obs);
  ASSERT_EQ(sparse.size(), 16u);
  for (int32_t t : sparse) EXPECT_TRUE(t >= 0 && t < 4096);
  std::vector<double> d = sparse_obs.Densities();
  ASSERT_FALSE(d.empty());
  // The first chunk (256 keys, not above sparse_min_tokens) is dense; later chunks sparse.
  EXPECT_EQ(d.front(), 1.0);
  EXPECT_LT(*std::min_element(d.begin(), d.end()), 1.0);
  EXPECT_EQ(sparse_obs.bad, 0);
  EXPECT_EQ(Engine::Create(sparse_config, nullptr).value()->model_info().attention_policy,
            "prefill=xattention(stride=8,threshold=0.9,block=64,min_tokens=256,dense_layers=0,"
            "max_density=1) "
            "decode=dense");

  // Everything kept: the dense engine's tokens.
  DensityObserver all_obs;
  EXPECT_EQ(Generate(Config("xattention", 1.01), prompt, &all_obs), dense);
  for (double x : all_obs.Densities()) EXPECT_EQ(x, 1.0);

  // attention.prefill.max_density below every chunk's density: each plan is estimated, then run
  // dense (the block-sparse kernel over most blocks would cost more): the dense engine's tokens
  // and densities of 1, with index time spent.
  DensityObserver fallback_obs;
  EngineConfig fallback = sparse_config;
  fallback.attention.prefill.max_density = 0.05;
  EXPECT_EQ(Generate(fallback, prompt, &fallback_obs), dense);
  for (double x : fallback_obs.Densities()) EXPECT_EQ(x, 1.0);
  EXPECT_GT(fallback_obs.estimated, 0);
  // (The precondition: every chunk of the sparse run read more than 5% of its pairs.)
  EXPECT_GT(*std::min_element(d.begin(), d.end()), 0.05);

  // A request that asks for dense prefill under xattention: dense.
  DensityObserver forced_obs;
  EXPECT_EQ(Generate(sparse_config, prompt, &forced_obs, /*dense_request=*/true), dense);
  for (double x : forced_obs.Densities()) EXPECT_EQ(x, 1.0);
}

// XAttention runs on cuda with the block-sparse prefill kernel's 128-query tiles: other block
// sizes are refused naming the key. MInference runs on cuda too (its 64-query-row mode).
TEST(SparsePrefillEngineTest, CudaTakesXAttentionWithBlocksOf128Only) {
  EngineConfig c = Config("xattention", 0.9);
  c.model.backend = "cuda";
  c.attention.prefill.xattention.block_size = 128;
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  c.attention.prefill.xattention.block_size = 256;
  EXPECT_THAT(c.Validate().message(),
              ::testing::HasSubstr("attention.prefill.xattention.block_size must be 128 on the "
                                   "cuda backend"));
  c.attention.prefill.method = "minference";
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
}

// kv_cache.dtype bfloat16: both estimators read the stored bfloat16 keys (widened exactly).
// Each method runs sparse (a density below 1, estimated, no failed request) and, with settings
// that cover every key, gives the tokens of dense prefill on the same bfloat16 cache.
TEST(SparsePrefillEngineTest, BothMethodsServeOnABfloat16KvCache) {
  const std::vector<int32_t> prompt = LongPrompt();
  auto config = [](const std::string& method, double tau) {
    EngineConfig c = Config(method, tau);
    c.kv_cache.dtype = "bfloat16";
    return c;
  };
  const std::vector<int32_t> dense = Generate(config("dense", 0.9), prompt, nullptr);
  ASSERT_EQ(dense.size(), 16u);
  for (const std::string method : {"xattention", "minference"}) {
    SCOPED_TRACE(method);
    EngineConfig sparse = config(method, 0.9);
    sparse.attention.prefill.minference.vertical_size = 30;
    sparse.attention.prefill.minference.slash_size = 60;
    DensityObserver obs;
    EXPECT_EQ(Generate(sparse, prompt, &obs).size(), 16u);
    const std::vector<double> d = obs.Densities();
    ASSERT_FALSE(d.empty());
    EXPECT_LT(*std::min_element(d.begin(), d.end()), 1.0);
    EXPECT_GT(obs.estimated, 0);
    EXPECT_EQ(obs.bad, 0);

    EngineConfig cover = config(method, 1.01);
    cover.attention.prefill.minference.vertical_size = 4096;
    cover.attention.prefill.minference.slash_size = 4096;
    DensityObserver cover_obs;
    EXPECT_EQ(Generate(cover, prompt, &cover_obs), dense);
    EXPECT_GT(cover_obs.estimated, 0);
  }
}

}  // namespace
}  // namespace sieve::engine
