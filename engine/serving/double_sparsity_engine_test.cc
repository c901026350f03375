// The engine decodes the embedded model with DoubleSparsity (attention.decode.method
// double_sparsity), calibrated at start-up on the model's bundled calibration.txt: with a budget
// covering the context its greedy tokens equal dense decoding's; with a budget of 1/8 of the
// context it decodes to the end reading a fraction of the KV (decode observer); a calibration
// file from `sieve calibrate` is used as given; without a file or bundled text the engine refuses
// and says how to calibrate; a file for another model is refused naming the key.
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "engine/attention/double_sparsity_calibration.h"
#include "engine/serving/engine.h"
#include "engine/testing/recording_sink.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

namespace fs = std::filesystem;

std::string ModelDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

class DecodeObserver : public EngineObserver {
 public:
  void OnDecodeAttention(double fraction, double) override {
    std::lock_guard<std::mutex> lock(mu);
    fractions.push_back(fraction);
  }
  std::mutex mu;
  std::vector<double> fractions;
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

TEST(DoubleSparsityEngineTest, CoveringBudgetDecodesLikeDense) {
  const std::vector<int32_t> prompt = Prompt(350);
  const std::vector<int32_t> dense = Generate(Config("dense", 4096), prompt, 24);
  ASSERT_EQ(dense.size(), 24u);
  EXPECT_EQ(Generate(Config("double_sparsity", 4096), prompt, 24), dense);
}

TEST(DoubleSparsityEngineTest, SmallBudgetReadsAFraction) {
  for (bool per_kv_head : {false, true}) {
    EngineConfig c = Config("double_sparsity", 48);
    c.attention.decode.double_sparsity.channels = 8;
    c.attention.decode.double_sparsity.per_kv_head = per_kv_head;
    c.attention.decode.double_sparsity.label_bits = per_kv_head ? 4 : 16;
    DecodeObserver observer;
    EXPECT_EQ(Generate(c, Prompt(400), 16, &observer).size(), 16u);
    std::lock_guard<std::mutex> lock(observer.mu);
    ASSERT_FALSE(observer.fractions.empty());
    // 3 of 4 layers read 48 of ~400 keys per head: well below 1 (1 dense layer of 4).
    for (double f : observer.fractions) EXPECT_LT(f, 0.5) << "per_kv_head " << per_kv_head;
  }
}

TEST(DoubleSparsityEngineTest, CalibrationFileAndRefusals) {
  const fs::path dir = fs::temp_directory_path() / ("ds_engine_test_" + std::to_string(getpid()));
  fs::create_directories(dir);
  // A calibration file of the model: used as given.
  DsCalibration cal;
  cal.statistic = kernels::DsStatistic::kQ;
  cal.num_layers = 4;
  cal.num_q_heads = 4;
  cal.num_kv_heads = 2;
  cal.head_dim = 64;
  cal.calibration_tokens = 1;
  for (int l = 0; l < 4; ++l) {
    cal.channels.emplace_back();
    cal.means.emplace_back();
    for (int h = 0; h < 4; ++h) {
      std::vector<int32_t> perm(64);
      for (int c = 0; c < 64; ++c) perm[c] = (c * 7 + h + l) % 64;
      cal.channels.back().push_back(perm);
      cal.means.back().push_back(std::vector<double>(64, 1.0));
    }
  }
  ASSERT_TRUE(WriteDsCalibration(cal, (dir / "cal.json").string()).ok());
  EngineConfig c = Config("double_sparsity", 48);
  c.attention.decode.double_sparsity.calibration_file = (dir / "cal.json").string();
  EXPECT_EQ(Generate(c, Prompt(200), 4).size(), 4u);
  // Another model's file: refused, naming the key.
  cal.head_dim = 128;
  ASSERT_TRUE(WriteDsCalibration(cal, (dir / "other.json").string()).ok());
  c.attention.decode.double_sparsity.calibration_file = (dir / "other.json").string();
  auto other = Engine::Create(c, nullptr);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.status().message().find("calibration_file"), std::string::npos) << other.status();
  // A model without calibration.txt and no file: refused, saying how to calibrate.
  const fs::path model = dir / "model";
  fs::create_directories(model);
  for (const auto& e : fs::directory_iterator(ModelDir())) {
    if (e.path().filename() != "calibration.txt") fs::copy(e.path(), model / e.path().filename());
  }
  EngineConfig bare = Config("double_sparsity", 48);
  bare.model.directory = model.string();
  auto refused = Engine::Create(bare, nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("sieve calibrate --method double-sparsity"),
            std::string::npos)
      << refused.status();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sieve::engine
