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
#include "engine/testing/sparse_decode_setup.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

namespace fs = std::filesystem;

using testing::DecodeStatsObserver;
using testing::EmbeddedModelDir;
using testing::GenerateGreedy;
using testing::SparseDecodeEngineConfig;

// The prompts of these tests: n tokens in [10, 200].
std::vector<int32_t> Prompt(int n) { return testing::RandomTokens(n, 5, 10, 200); }

TEST(DoubleSparsityEngineTest, CoveringBudgetDecodesLikeDense) {
  const std::vector<int32_t> prompt = Prompt(350);
  const std::vector<int32_t> dense =
      GenerateGreedy(SparseDecodeEngineConfig("dense", 4096), prompt, 24);
  ASSERT_EQ(dense.size(), 24u);
  EXPECT_EQ(GenerateGreedy(SparseDecodeEngineConfig("double_sparsity", 4096), prompt, 24), dense);
}

TEST(DoubleSparsityEngineTest, SmallBudgetReadsAFraction) {
  for (bool per_kv_head : {false, true}) {
    EngineConfig c = SparseDecodeEngineConfig("double_sparsity", 48);
    c.attention.decode.double_sparsity.channels = 8;
    c.attention.decode.double_sparsity.per_kv_head = per_kv_head;
    c.attention.decode.double_sparsity.label_bits = per_kv_head ? 4 : 16;
    DecodeStatsObserver observer;
    EXPECT_EQ(GenerateGreedy(c, Prompt(400), 16, &observer).size(), 16u);
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
  EngineConfig c = SparseDecodeEngineConfig("double_sparsity", 48);
  c.attention.decode.double_sparsity.calibration_file = (dir / "cal.json").string();
  EXPECT_EQ(GenerateGreedy(c, Prompt(200), 4).size(), 4u);
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
  for (const auto& e : fs::directory_iterator(EmbeddedModelDir())) {
    if (e.path().filename() != "calibration.txt") fs::copy(e.path(), model / e.path().filename());
  }
  EngineConfig bare = SparseDecodeEngineConfig("double_sparsity", 48);
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
