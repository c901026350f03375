// Tiny random checkpoints of the other supported architectures and storage forms (Qwen2 with
// q/k/v bias and YaRN, fp16 and sharded; Mistral with linear RoPE scaling, an explicit head_dim
// and fp32; Llama with attention bias, tied embeddings and bf16), made by
// scripts/make_test_models.py: the engine's fp32 logits match transformers' within 1e-4.
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/model/safetensors.h"
#include "engine/runner/model_runner.h"
#include "engine/serving/engine_config.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

std::string DataDir(const std::string& name) {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/tests/data/" + name;
}

class ArchitectureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ArchitectureTest, LogitsMatchTransformers) {
  const std::string dir = DataDir(GetParam());
  std::ifstream in(dir + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json golden = nlohmann::json::parse(ss.str());
  const std::vector<int32_t> ids = golden["ids"].get<std::vector<int32_t>>();
  const int k = golden["last_positions"];

  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.page_size = 8;
  o.num_pages = 16;
  o.max_step_tokens = 64;
  auto runner = ModelRunner::Load(dir, o);
  ASSERT_TRUE(runner.ok()) << runner.status();
  const int64_t vocab = (*runner)->config().vocab_size;

  auto file = SafetensorsFile::Open(dir + "/golden_logits.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto view = (*file)->Get("logits");
  ASSERT_TRUE(view.ok()) << view.status();
  std::vector<float> want(view->numel());
  ASSERT_TRUE(CopyToFloat32(*view, absl::MakeSpan(want)).ok());
  ASSERT_EQ(static_cast<int64_t>(want.size()), k * vocab);

  // Prefill all but the last k tokens in one step, then one decode step per token.
  std::vector<int32_t> pages = {3, 0, 7, 1, 12, 5};  // scattered on purpose
  const int n = static_cast<int>(ids.size());
  std::vector<float> logits;
  SequenceStep prefill{absl::MakeConstSpan(ids).subspan(0, n - k), 0, pages, false};
  ASSERT_TRUE((*runner)->Forward({prefill}, logits).ok());
  for (int p = 0; p < k; ++p) {
    logits.clear();
    SequenceStep step{absl::MakeConstSpan(ids).subspan(n - k + p, 1), n - k + p, pages, true};
    ASSERT_TRUE((*runner)->Forward({step}, logits).ok());
    double num = 0, den = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double w = want[p * vocab + v], d = logits[v] - w;
      num += d * d;
      den += w * w;
    }
    EXPECT_LT(std::sqrt(num / den), 1e-4) << GetParam() << " position " << n - k + p;
  }
}

INSTANTIATE_TEST_SUITE_P(Checkpoints, ArchitectureTest,
                         ::testing::Values("qwen2_yarn_f16_sharded", "mistral_linear_f32",
                                           "llama_default_bf16_bias"));

}  // namespace
}  // namespace sieve::engine
