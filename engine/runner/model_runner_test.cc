#include "engine/runner/model_runner.h"
#include "engine/backends/cpu_backend.h"
#include "engine/serving/engine_config.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string EmbeddedDir() {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : ".") + "/models/embedded";
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const fs::path& p, std::string_view data) {
  std::ofstream out(p, std::ios::binary);
  out << data;
}

// A copy of the embedded model in a fresh temporary directory, for breaking on purpose.
fs::path CopyOfEmbedded(const std::string& name) {
  fs::path dir = fs::path(::testing::TempDir()) / ("model_runner_test_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"config.json", "model.safetensors"}) {
    fs::copy_file(fs::path(EmbeddedDir()) / f, dir / f);
  }
  return dir;
}

ModelRunnerOptions SmallOptions() {
  ModelRunnerOptions o = RunnerOptionsFor(EngineConfig());
  o.page_size = 16;
  o.num_pages = 64;
  o.max_step_tokens = 256;
  o.max_step_logits = 8;
  return o;
}

TEST(ModelRunnerTest, LoadsTheEmbeddedModel) {
  auto r = ModelRunner::Load(EmbeddedDir(), SmallOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->config().num_hidden_layers, 4);
  EXPECT_EQ((*r)->backend_name(), "cpu");
}

// The cpu backend's KV page layout: head-major with a sparse decode method; with dense decode,
// token-major when a token's row of all KV heads is 4 KiB or more (the 8B shape's 8 x 128 fp32),
// head-major below it (the embedded model's 2 x 64 fp32 rows, or 8 x 128 in bfloat16).
TEST(ModelRunnerTest, KvLayoutFollowsTheDecodeMethodAndTheRowSize) {
  auto layout_of = [](const std::string& dir, const ModelRunnerOptions& o) {
    auto r = ModelRunner::Load(dir, o);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return kernels::KvLayout::kTokenMajor;
    return dynamic_cast<const CpuBackend&>((*r)->backend()).kv_layout();
  };
  EXPECT_EQ(layout_of(EmbeddedDir(), SmallOptions()), kernels::KvLayout::kHeadMajor);
  EngineConfig quest;
  quest.attention.decode.method = "quest";
  ASSERT_EQ(RunnerOptionsFor(quest).kv_layout, kernels::KvLayout::kHeadMajor);
  EXPECT_EQ(RunnerOptionsFor(EngineConfig()).kv_layout, std::nullopt);
  // One layer of 8 KV heads of 128 (random weights from config.json alone).
  const fs::path dir = CopyOfEmbedded("wide_rows");
  nlohmann::json cfg = nlohmann::json::parse(ReadFile(dir / "config.json"));
  cfg["num_hidden_layers"] = 1;
  cfg["hidden_size"] = 1024;
  cfg["num_attention_heads"] = 8;
  cfg["num_key_value_heads"] = 8;
  cfg["head_dim"] = 128;
  WriteFile(dir / "config.json", cfg.dump());
  ModelRunnerOptions o = SmallOptions();
  o.weights = "random";
  EXPECT_EQ(layout_of(dir.string(), o), kernels::KvLayout::kTokenMajor);
  o.kv_dtype = "bfloat16";  // 2 KiB rows
  EXPECT_EQ(layout_of(dir.string(), o), kernels::KvLayout::kHeadMajor);
  o.kv_dtype = "float32";
  o.kv_layout = kernels::KvLayout::kHeadMajor;  // a sparse method's choice stands
  EXPECT_EQ(layout_of(dir.string(), o), kernels::KvLayout::kHeadMajor);
}

TEST(ModelRunnerTest, MissingTensorIsNamed) {
  fs::path dir = CopyOfEmbedded("missing_tensor");
  nlohmann::json cfg = nlohmann::json::parse(ReadFile(dir / "config.json"));
  cfg["num_hidden_layers"] = 5;  // layer 4 does not exist in the checkpoint
  WriteFile(dir / "config.json", cfg.dump());
  auto r = ModelRunner::Load(dir.string(), SmallOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("model.layers.4."));
}

TEST(ModelRunnerTest, WrongShapeIsNamed) {
  fs::path dir = CopyOfEmbedded("wrong_shape");
  nlohmann::json cfg = nlohmann::json::parse(ReadFile(dir / "config.json"));
  cfg["intermediate_size"] = 512;
  WriteFile(dir / "config.json", cfg.dump());
  auto r = ModelRunner::Load(dir.string(), SmallOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("mlp.gate_proj.weight"));
  EXPECT_THAT(r.status().message(), HasSubstr("512"));
}

TEST(ModelRunnerTest, TruncatedWeightsAreAnError) {
  fs::path dir = CopyOfEmbedded("truncated");
  std::string data = ReadFile(dir / "model.safetensors");
  WriteFile(dir / "model.safetensors", std::string_view(data).substr(0, data.size() / 2));
  auto r = ModelRunner::Load(dir.string(), SmallOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(ModelRunnerTest, UnsupportedArchitectureAndMissingFiles) {
  fs::path dir = CopyOfEmbedded("arch");
  nlohmann::json cfg = nlohmann::json::parse(ReadFile(dir / "config.json"));
  cfg["architectures"] = {"GPT2LMHeadModel"};
  cfg["model_type"] = "gpt2";
  WriteFile(dir / "config.json", cfg.dump());
  auto r = ModelRunner::Load(dir.string(), SmallOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("GPT2LMHeadModel"));

  fs::remove(dir / "config.json");
  EXPECT_FALSE(ModelRunner::Load(dir.string(), SmallOptions()).ok());
  auto missing = ModelRunner::Load("/nonexistent/model", SmallOptions());
  EXPECT_FALSE(missing.ok());
}

TEST(ModelRunnerTest, RejectsMalformedSteps) {
  auto r = ModelRunner::Load(EmbeddedDir(), SmallOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  ModelRunner& m = **r;
  std::vector<float> logits;
  std::vector<int32_t> tokens = {1, 2, 3};
  std::vector<int32_t> pages = {0};
  SequenceStep s{tokens, 0, pages, true};
  EXPECT_TRUE(m.Forward({s}, logits).ok());
  // Positions past the pages given.
  SequenceStep past{tokens, 15, pages, true};
  EXPECT_EQ(m.Forward({past}, logits).code(), absl::StatusCode::kInvalidArgument);
  // Token outside the vocabulary.
  std::vector<int32_t> bad = {4096};
  SequenceStep oov{bad, 0, pages, true};
  EXPECT_EQ(m.Forward({oov}, logits).code(), absl::StatusCode::kInvalidArgument);
  // Page id outside the pool.
  std::vector<int32_t> far = {64};
  SequenceStep bad_page{tokens, 0, far, true};
  EXPECT_EQ(m.Forward({bad_page}, logits).code(), absl::StatusCode::kInvalidArgument);
  // More tokens than a step may carry.
  std::vector<int32_t> many(300, 5);
  std::vector<int32_t> many_pages(19);
  for (int i = 0; i < 19; ++i) many_pages[i] = i;
  SequenceStep big{many, 0, many_pages, true};
  EXPECT_EQ(m.Forward({big}, logits).code(), absl::StatusCode::kInvalidArgument);
}

// Each sequence's logits are the same whether it runs alone or batched with others of
// different lengths and phases (prefill chunk next to decode tokens).
TEST(ModelRunnerTest, BatchedEqualsAlone) {
  auto r = ModelRunner::Load(EmbeddedDir(), SmallOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  ModelRunner& m = **r;
  const int64_t vocab = m.config().vocab_size;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(2, 4095);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> v(n);
    for (int32_t& t : v) t = tok(rng);
    return v;
  };
  // Three sequences: prompts of 5, 37 and 16 tokens in disjoint pages.
  std::vector<std::vector<int32_t>> prompts = {random_tokens(5), random_tokens(37),
                                               random_tokens(16)};
  std::vector<std::vector<int32_t>> pages = {{0}, {5, 3, 9}, {7, 8}};
  std::vector<std::vector<float>> alone(3);
  for (int i = 0; i < 3; ++i) {
    SequenceStep s{prompts[i], 0, pages[i], true};
    ASSERT_TRUE(m.Forward({s}, alone[i]).ok());
  }
  std::vector<SequenceStep> batch;
  for (int i = 0; i < 3; ++i) batch.push_back({prompts[i], 0, pages[i], true});
  std::vector<float> together;
  ASSERT_TRUE(m.Forward(batch, together).ok());
  ASSERT_EQ(together.size(), 3 * vocab);
  for (int i = 0; i < 3; ++i) {
    for (int64_t v = 0; v < vocab; ++v) {
      ASSERT_NEAR(together[i * vocab + v], alone[i][v], 1e-5) << "seq " << i << " token " << v;
    }
  }
  // A decode token of sequence 1 next to a re-prefill of sequence 0: same as alone.
  std::vector<int32_t> next = {42};
  std::vector<float> decode_alone, mixed;
  ASSERT_TRUE(m.Forward({SequenceStep{next, 37, pages[1], true}}, decode_alone).ok());
  ASSERT_TRUE(m.Forward({SequenceStep{prompts[0], 0, pages[0], false},
                         SequenceStep{next, 37, pages[1], true}},
                        mixed)
                  .ok());
  ASSERT_EQ(mixed.size(), static_cast<size_t>(vocab));
  for (int64_t v = 0; v < vocab; ++v) ASSERT_NEAR(mixed[v], decode_alone[v], 1e-5);
}

// ForwardSample samples each want_logits row as SampleTokenWithUniform does on Forward's logits
// (with the row's parameters, history and draw), returns one entry per such row in batch order,
// and fails only the row whose sampling fails.
TEST(ModelRunnerTest, ForwardSampleMatchesForwardThenSampleTokenWithUniform) {
  auto r = ModelRunner::Load(EmbeddedDir(), SmallOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  ModelRunner& m = **r;
  const int64_t vocab = m.config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {{5, 77, 900, 31}, {12, 12, 400},
                                                     {8, 1000, 2000, 3000, 17}};
  const std::vector<std::vector<int32_t>> pages = {{0}, {1}, {2}};
  std::vector<SamplingParams> params(3);
  params[0].temperature = 0.0f;
  params[0].top_logprobs = 5;
  params[1].temperature = 0.8f;
  params[1].top_k = 40;
  params[1].top_p = 0.9f;
  params[1].return_logprob = true;
  params[2].repetition_penalty = 1.5f;
  params[2].frequency_penalty = 0.5f;
  params[2].min_p = 0.01f;
  std::vector<TokenHistory> history(3);
  for (int i = 0; i < 3; ++i) history[i].AddPrompt(prompts[i]);
  history[2].AddGenerated(17);
  const double uniforms[3] = {0.3, 0.71, 0.05};
  std::vector<SequenceStep> batch;
  for (int i = 0; i < 3; ++i) {
    SequenceStep s{prompts[i], 0, pages[i], true};
    s.sampling = &params[i];
    s.history = &history[i];
    s.uniform = uniforms[i];
    batch.push_back(s);
  }
  batch[0].want_logits = false;  // a prefill chunk that ends mid-prompt: no token
  std::vector<float> logits;
  ASSERT_TRUE(m.Forward(batch, logits).ok());
  ASSERT_EQ(logits.size(), 2 * vocab);
  std::vector<absl::StatusOr<SampledToken>> sampled;
  ASSERT_TRUE(m.default_worker().ForwardSample(batch, sampled).ok());
  ASSERT_EQ(sampled.size(), 2u);
  for (int row = 0; row < 2; ++row) {
    const int i = row + 1;
    std::vector<float> copy(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
    absl::StatusOr<SampledToken> want =
        SampleTokenWithUniform(absl::MakeSpan(copy), params[i], history[i], uniforms[i]);
    ASSERT_TRUE(want.ok() && sampled[row].ok()) << want.status() << sampled[row].status();
    EXPECT_EQ(sampled[row]->id, want->id) << "row " << row;
    EXPECT_EQ(sampled[row]->logprob, want->logprob);
    EXPECT_EQ(sampled[row]->top, want->top);
  }
  // Rows fail alone: a history id outside the vocabulary fails its row (InvalidArgument, as the
  // reference), the other row still gets its token.
  TokenHistory bad;
  bad.AddGenerated(static_cast<int32_t>(vocab) + 3);
  batch[1].history = &bad;
  batch[1].sampling = &params[2];  // penalties read the history
  sampled.clear();
  ASSERT_TRUE(m.default_worker().ForwardSample(batch, sampled).ok());
  ASSERT_EQ(sampled.size(), 2u);
  EXPECT_EQ(sampled[0].status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(sampled[1].ok()) << sampled[1].status();
  // A want_logits row without parameters fails the step.
  batch[2].sampling = nullptr;
  EXPECT_EQ(m.default_worker().ForwardSample(batch, sampled).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine

namespace sieve::engine {
namespace {

// Real shapes without a checkpoint: seeded random weights, reproducible per seed.
TEST(ModelRunnerTest, RandomWeightsFollowTheSeed) {
  const char* root = std::getenv("SIEVE_SOURCE_DIR");
  const std::string dir = std::string(root != nullptr ? root : ".") + "/configs/models/embedded";
  auto logits_for = [&](uint64_t seed) {
    ModelRunnerOptions o = SmallOptions();
    o.weights = "random";
    o.random_seed = seed;
    auto r = ModelRunner::Load(dir, o);
    EXPECT_TRUE(r.ok()) << r.status();
    std::vector<float> logits;
    std::vector<int32_t> tokens = {5, 17, 300, 9};
    std::vector<int32_t> pages = {0};
    if (r.ok()) {
      EXPECT_TRUE((*r)->Forward({SequenceStep{tokens, 0, pages, true}}, logits).ok());
    }
    return logits;
  };
  std::vector<float> a = logits_for(1), b = logits_for(1), c = logits_for(2);
  ASSERT_EQ(a.size(), 4096u);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  for (float v : a) ASSERT_TRUE(std::isfinite(v));

  ModelRunnerOptions bad = SmallOptions();
  bad.weights = "zeros";
  EXPECT_EQ(ModelRunner::Load(dir, bad).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine

namespace sieve::engine {
namespace {

// Step graphs are a CUDA feature: on the CPU backend the option changes nothing, decode steps
// run eagerly and no graph step is counted.
TEST(ModelRunnerTest, CudaGraphsOptionIsIgnoredOnCpu) {
  ModelRunnerOptions on = SmallOptions(), off = SmallOptions();
  on.cuda_graphs = true;
  off.cuda_graphs = false;
  auto a = ModelRunner::Load(EmbeddedDir(), on);
  auto b = ModelRunner::Load(EmbeddedDir(), off);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_FALSE((*a)->uses_step_graphs());
  (*a)->default_worker().SetStepGraphs(true);
  const std::vector<int32_t> prompt = {5, 17, 300}, next = {9}, pages = {63};
  std::vector<float> la, lb;
  for (ModelRunner* r : {a->get(), b->get()}) {
    std::vector<float>& out = r == a->get() ? la : lb;
    ASSERT_TRUE(r->Forward({SequenceStep{prompt, 0, pages, false}}, out).ok());
    ASSERT_TRUE(r->Forward({SequenceStep{next, 3, pages, true}}, out).ok());
  }
  ASSERT_EQ(la.size(), 4096u);
  EXPECT_EQ(la, lb);
  const StepGraphStats s = (*a)->graph_stats();
  EXPECT_EQ(s.eager_steps + s.recorded_steps + s.replayed_steps + s.live_recordings, 0);
  // The last page of the pool is the callers'; the one past it is not.
  const std::vector<int32_t> past = {64};
  std::vector<float> unused;
  EXPECT_EQ((*a)->Forward({SequenceStep{next, 0, past, true}}, unused).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sieve::engine
