#include "engine/model/model_config.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// meta-llama/Llama-3.1-8B-Instruct config.json (transformers 4 form).
constexpr char kLlama31[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// A small Llama as transformers 5 writes it: "rope_parameters" and "dtype".
constexpr char kTransformers5[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": true,
  "bos_token_id": 1,
  "dtype": "float32",
  "eos_token_id": 2,
  "head_dim": 32,
  "hidden_act": "silu",
  "hidden_size": 256,
  "intermediate_size": 512,
  "max_position_embeddings": 4096,
  "mlp_bias": true,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "factor": 4.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 1024,
    "rope_theta": 250000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": true,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "vocab_size": 1000
})";

// Qwen/Qwen2.5-7B config.json.
constexpr char kQwen25[] = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "max_position_embeddings": 131072,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 152064
})";

// mistralai/Mistral-7B-v0.1 config.json.
constexpr char kMistral01[] = R"({
  "architectures": ["MistralForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.34.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

// A minimal valid config. `extra` ("key": value, with a trailing comma) is spliced in after the
// defaults; a key given twice keeps its last value (nlohmann behaviour), so `extra` overrides.
std::string Minimal(const std::string& extra = "") {
  return absl::StrCat(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "max_position_embeddings": 512, )",
                      extra, R"( "_end": 0})");
}

absl::Status Error(const std::string& json) { return ModelConfig::FromJsonString(json).status(); }

TEST(ModelConfigTest, Llama31) {
  auto c = ModelConfig::FromJsonString(kLlama31);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kLlama);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 14336);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_FALSE(c->head_dim_explicit);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->qkv_bias || c->o_bias || c->mlp_bias);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(c->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_THAT(c->DebugString(), HasSubstr("llama vocab=128256 hidden=4096"));
  EXPECT_THAT(c->DebugString(), HasSubstr("rope=llama3(factor=8"));
  EXPECT_THAT(c->DebugString(), HasSubstr("eos=[128001,128008,128009]"));
  EXPECT_TRUE(c->Validate().ok());
}

TEST(ModelConfigTest, Transformers5RopeParameters) {
  auto c = ModelConfig::FromJsonString(kTransformers5);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 250000.0f);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 1024);
  EXPECT_EQ(c->torch_dtype, "float32");
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_TRUE(c->head_dim_explicit);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_TRUE(c->qkv_bias && c->o_bias && c->mlp_bias);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));

  // The plain form: only a theta inside rope_parameters.
  auto d = ModelConfig::FromJsonString(
      Minimal(R"("rope_parameters": {"rope_type": "default", "rope_theta": 123.0},)"));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->rope_theta, 123.0f);
  EXPECT_EQ(d->rope_scaling.type, RopeScaling::Type::kNone);
  d = ModelConfig::FromJsonString(Minimal(R"("rope_parameters": {"rope_theta": 77},)"));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->rope_theta, 77.0f);
  // Per-layer-type parameters (Gemma style) are not supported.
  EXPECT_EQ(Error(Minimal(R"("rope_parameters": {"full_attention": {"rope_theta": 1}},)")).code(),
            absl::StatusCode::kUnimplemented);
}

TEST(ModelConfigTest, Qwen25) {
  auto c = ModelConfig::FromJsonString(kQwen25);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kQwen2);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_FALSE(c->o_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->rope_theta, 1e6f);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(151643));

  std::string sliding = absl::StrReplaceAll(
      kQwen25, {{R"("use_sliding_window": false)", R"("use_sliding_window": true)"},
                {R"("sliding_window": 131072)", R"("sliding_window": 4096)"}});
  absl::Status s = Error(sliding);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.message(), HasSubstr("sliding_window"));
  // A small window is ignored while use_sliding_window is false.
  EXPECT_TRUE(ModelConfig::FromJsonString(
                  absl::StrReplaceAll(
                      kQwen25, {{R"("sliding_window": 131072)", R"("sliding_window": 4096)"}}))
                  .ok());
}

TEST(ModelConfigTest, MistralSlidingWindow) {
  absl::Status s = Error(kMistral01);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.message(), HasSubstr("'sliding_window' is 4096"));

  auto c = ModelConfig::FromJsonString(absl::StrReplaceAll(
      kMistral01, {{R"("sliding_window": 4096)", R"("sliding_window": null)"}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kMistral);
  EXPECT_FALSE(c->qkv_bias || c->o_bias || c->mlp_bias);
  EXPECT_THAT(c->DebugString(), HasSubstr("mistral "));
  // A window as long as the context is full attention.
  EXPECT_TRUE(ModelConfig::FromJsonString(
                  absl::StrReplaceAll(
                      kMistral01, {{R"("sliding_window": 4096)", R"("sliding_window": 32768)"}}))
                  .ok());
}

TEST(ModelConfigTest, YarnAndLinear) {
  auto c = ModelConfig::FromJsonString(Minimal(
      R"("rope_scaling": {"type": "yarn", "factor": 4.0,
          "original_max_position_embeddings": 128},)"));
  ASSERT_TRUE(c.ok()) << c.status();
  const RopeScaling& y = c->rope_scaling;
  EXPECT_EQ(y.type, RopeScaling::Type::kYarn);
  EXPECT_EQ(y.factor, 4.0f);
  EXPECT_EQ(y.original_max_position_embeddings, 128);
  EXPECT_EQ(y.beta_fast, 32.0f);
  EXPECT_EQ(y.beta_slow, 1.0f);
  EXPECT_TRUE(y.truncate);
  EXPECT_FALSE(y.attention_factor.has_value());
  EXPECT_NEAR(y.YarnAttentionFactor(), 0.1f * std::log(4.0f) + 1.0f, 1e-6f);

  c = ModelConfig::FromJsonString(Minimal(
      R"("rope_scaling": {"rope_type": "yarn", "factor": 8, "beta_fast": 16, "beta_slow": 2,
          "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": false},)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 512);  // max_position_embeddings.
  EXPECT_EQ(c->rope_scaling.beta_fast, 16.0f);
  EXPECT_FALSE(c->rope_scaling.truncate);
  float m1 = 0.1f * std::log(8.0f) + 1.0f, m2 = 0.05f * std::log(8.0f) + 1.0f;
  EXPECT_NEAR(c->rope_scaling.YarnAttentionFactor(), m1 / m2, 1e-6f);
  c = ModelConfig::FromJsonString(
      Minimal(R"("rope_scaling": {"rope_type": "yarn", "factor": 2, "attention_factor": 0.75},)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.YarnAttentionFactor(), 0.75f);

  c = ModelConfig::FromJsonString(Minimal(R"("rope_scaling": {"type": "linear", "factor": 2},)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 2.0f);
  EXPECT_EQ(c->rope_theta, 10000.0f);  // Default.
  EXPECT_TRUE(ModelConfig::FromJsonString(Minimal(R"("rope_scaling": null,)")).ok());
}

TEST(ModelConfigTest, BadRopeScaling) {
  struct Case {
    std::string extra;
    absl::StatusCode code;
    std::string expected;
  };
  const Case cases[] = {
      {R"("rope_scaling": {"type": "dynamic", "factor": 2},)", absl::StatusCode::kUnimplemented,
       "'rope_scaling.rope_type' is 'dynamic'"},
      {R"("rope_scaling": {"factor": 2},)", absl::StatusCode::kInvalidArgument,
       "'rope_scaling.rope_type' is missing"},
      {R"("rope_scaling": {"type": "linear", "factor": 0.5},)", absl::StatusCode::kInvalidArgument,
       "'rope_scaling.factor' must be >= 1"},
      {R"("rope_scaling": {"type": "linear"},)", absl::StatusCode::kInvalidArgument,
       "'rope_scaling.factor' is missing"},
      {R"("rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
          "high_freq_factor": 1, "original_max_position_embeddings": 8192},)",
       absl::StatusCode::kInvalidArgument, "high_freq_factor"},
      {R"("rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
          "high_freq_factor": 4},)",
       absl::StatusCode::kInvalidArgument, "original_max_position_embeddings' is missing"},
      {R"("rope_scaling": {"rope_type": "yarn", "factor": 2, "beta_fast": 1, "beta_slow": 4},)",
       absl::StatusCode::kInvalidArgument, "beta_fast"},
      {R"("rope_scaling": {"rope_type": "yarn", "factor": "2"},)",
       absl::StatusCode::kInvalidArgument, "'rope_scaling.factor' must be a number, got string"},
      {R"("rope_scaling": {"rope_type": "yarn", "factor": 2, "truncate": 1},)",
       absl::StatusCode::kInvalidArgument, "'rope_scaling.truncate' must be a boolean"},
      {R"("rope_scaling": [1],)", absl::StatusCode::kInvalidArgument,
       "'rope_scaling' must be an object"},
      {R"("rope_theta": -1,)", absl::StatusCode::kInvalidArgument, "'rope_theta' must be positive"},
      {R"("partial_rotary_factor": 0.5,)", absl::StatusCode::kUnimplemented,
       "partial_rotary_factor"},
  };
  for (const Case& c : cases) {
    absl::Status s = Error(Minimal(c.extra));
    EXPECT_EQ(s.code(), c.code) << c.extra << " -> " << s;
    EXPECT_THAT(s.message(), HasSubstr(c.expected)) << c.extra;
  }
}

TEST(ModelConfigTest, Architectures) {
  absl::Status s = Error(absl::StrReplaceAll(kLlama31, {{"LlamaForCausalLM", "GPT2LMHeadModel"}}));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(s.message(),
            "unsupported architecture 'GPT2LMHeadModel' (supported: llama, mistral, qwen2)");
  s = Error(R"({"model_type": "gemma", "vocab_size": 1})");
  EXPECT_THAT(s.message(), HasSubstr("unsupported architecture 'gemma'"));
  // model_type alone is enough.
  auto c = ModelConfig::FromJsonString(
      absl::StrReplaceAll(Minimal(), {{R"("model_type": "llama")", R"("model_type": "qwen2")"}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kQwen2);
  EXPECT_THAT(Error(R"({"vocab_size": 1})").message(), HasSubstr("'architectures'"));
  EXPECT_THAT(Error(Minimal(R"("architectures": "LlamaForCausalLM",)")).message(),
              HasSubstr("'architectures' must be a list of strings"));
  EXPECT_EQ(Error(Minimal(R"("hidden_act": "gelu",)")).code(), absl::StatusCode::kUnimplemented);
}

TEST(ModelConfigTest, TypeErrorsAndMissingKeys) {
  struct Case {
    std::string json;
    std::string expected;
  };
  const Case cases[] = {
      {Minimal(R"("hidden_size": "4096",)"), "'hidden_size' must be an integer, got string"},
      {Minimal(R"("num_key_value_heads": 2.5,)"),
       "'num_key_value_heads' must be an integer, got float"},
      {Minimal(R"("rms_norm_eps": "1e-5",)"), "'rms_norm_eps' must be a number, got string"},
      {Minimal(R"("tie_word_embeddings": "yes",)"), "'tie_word_embeddings' must be a boolean"},
      {Minimal(R"("attention_bias": 0,)"), "'attention_bias' must be a boolean"},
      {Minimal(R"("torch_dtype": 16,)"), "'torch_dtype' must be a string"},
      {Minimal(R"("bos_token_id": [1],)"), "'bos_token_id' must be an integer, got array"},
      {Minimal(R"("eos_token_id": "2",)"), "'eos_token_id' must be an integer or a list"},
      {Minimal(R"("eos_token_id": [2, "x"],)"), "'eos_token_id' must be a list of integers"},
      {Minimal(R"("max_position_embeddings": 1e400,)"), "not valid JSON"},
      {Minimal(R"("hidden_size": 18446744073709551615,)"), "'hidden_size' is out of range"},
      {R"({"model_type": "llama", "vocab_size": 10})", "'hidden_size' is missing"},
      {R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2})",
       "'max_position_embeddings' is missing"},
      {"[1, 2]", "must be a JSON object"},
      {"{", "not valid JSON"},
      {"", "not valid JSON"},
  };
  for (const Case& c : cases) {
    absl::Status s = Error(c.json);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.json << " -> " << s;
    EXPECT_THAT(s.message(), HasSubstr(c.expected)) << c.json;
  }
}

TEST(ModelConfigTest, ValidateChecksConsistency) {
  struct Case {
    std::string extra;
    std::string expected;
  };
  const Case cases[] = {
      {R"("hidden_size": 66,)", "'hidden_size' (66) must be divisible by num_attention_heads"},
      {R"("num_key_value_heads": 3,)", "'num_key_value_heads' (3) must divide"},
      {R"("num_key_value_heads": 0,)", "'num_key_value_heads' must be positive"},
      {R"("head_dim": 15,)", "'head_dim' must be even"},
      {R"("rms_norm_eps": 0,)", "'rms_norm_eps' must be positive"},
      {R"("num_hidden_layers": -1,)", "'num_hidden_layers' must be positive"},
      {R"("intermediate_size": 99999999999,)", "'intermediate_size' is too large"},
      {R"("eos_token_id": -1,)", "'eos_token_id' must be non-negative"},
  };
  for (const Case& c : cases) {
    std::string json = Minimal(c.extra);
    absl::Status s = Error(json);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << json << " -> " << s;
    EXPECT_THAT(s.message(), HasSubstr(c.expected)) << json;
  }
  // An explicit head_dim may differ from hidden_size / heads (e.g. Mistral-Nemo).
  auto c = ModelConfig::FromJsonString(Minimal(R"("head_dim": 24,)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 24);
  EXPECT_TRUE(ModelConfig::FromJsonString(Minimal(R"("hidden_size": 66, "head_dim": 16,)")).ok());

  ModelConfig bad = *ModelConfig::FromJsonString(Minimal());
  EXPECT_EQ(bad.num_key_value_heads, 4);  // Defaults to num_attention_heads.
  EXPECT_EQ(bad.rms_norm_eps, 1e-6f);
  EXPECT_TRUE(bad.eos_token_ids.empty());
  EXPECT_FALSE(bad.bos_token_id.has_value());
  bad.vocab_size = 0;
  EXPECT_THAT(bad.Validate().message(), HasSubstr("'vocab_size' must be positive"));
}

TEST(ModelConfigTest, FromFile) {
  std::string path = absl::StrCat(::testing::TempDir(), "/model_config_test_", getpid(), ".json");
  std::ofstream(path) << kQwen25;
  auto c = ModelConfig::FromFile(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 152064);
  std::ofstream(path) << "{\"model_type\": \"llama\"}";
  absl::Status s = ModelConfig::FromFile(path).status();
  EXPECT_THAT(s.message(), HasSubstr(path));
  EXPECT_THAT(s.message(), HasSubstr("'vocab_size' is missing"));
  std::filesystem::remove(path);
  EXPECT_EQ(ModelConfig::FromFile(path).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sieve::engine
