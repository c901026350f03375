// ModelConfig: the shape and hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2),
// read from a Hugging Face `config.json`. Both the transformers-4 form ("rope_theta" +
// "rope_scaling") and the transformers-5 form ("rope_parameters") of RoPE settings are read.
// Unknown keys are ignored (HF configs carry many); known keys with the wrong type are errors.
#ifndef SIEVE_ENGINE_MODEL_MODEL_CONFIG_H_
#define SIEVE_ENGINE_MODEL_MODEL_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sieve::engine {

// The decoder families Sieve runs. They share one forward pass and differ in biases and
// defaults.
enum class Architecture {
  kLlama,    // LlamaForCausalLM / model_type "llama".
  kMistral,  // MistralForCausalLM / model_type "mistral".
  kQwen2,    // Qwen2ForCausalLM / model_type "qwen2".
};

// Returns the model_type spelling of `arch`: "llama", "mistral" or "qwen2".
std::string_view ArchitectureName(Architecture arch);

// RoPE frequency scaling, as in transformers' modeling_rope_utils. Fields not used by `type`
// keep their defaults.
struct RopeScaling {
  // The scaling scheme. "dynamic" (NTK) and others are rejected as Unimplemented when parsed.
  enum class Type {
    kNone,    // "default" or absent: plain RoPE.
    kLinear,  // Positions divided by `factor`.
    kLlama3,  // Llama 3.1: per-frequency blend between scaled and unscaled.
    kYarn,    // YaRN: ramp between interpolation and extrapolation, plus attention scaling.
  };

  // Returns "default", "linear", "llama3" or "yarn".
  static std::string_view TypeName(Type type);

  Type type = Type::kNone;
  // Context extension factor (>= 1); 1 for kNone.
  float factor = 1.0f;
  // Llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are
  // fully scaled; shorter than ... / high_freq_factor are unscaled; linear blend between.
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  // Llama3 and YaRN: the pre-extension context length, in tokens. For YaRN it defaults to the
  // model's max_position_embeddings when absent; for llama3 it is required.
  int64_t original_max_position_embeddings = 0;
  // YaRN: rotation counts bounding the ramp (defaults 32 and 1).
  float beta_fast = 32.0f;
  float beta_slow = 1.0f;
  // YaRN: optional "mscale" / "mscale_all_dim" (DeepSeek style), used only when
  // attention_factor is absent.
  std::optional<float> mscale;
  std::optional<float> mscale_all_dim;
  // YaRN: explicit scale applied to cos/sin; when absent see YarnAttentionFactor().
  std::optional<float> attention_factor;
  // YaRN: whether correction-range bounds are rounded to integers (floor/ceil); default true.
  bool truncate = true;

  // Returns the scale YaRN applies to cos and sin: attention_factor if given, else
  // get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when both are non-zero,
  // else get_mscale(factor), where get_mscale(s, m) = s <= 1 ? 1 : 0.1 * m * ln(s) + 1.
  // Returns 1 for other types.
  float YarnAttentionFactor() const;

  // Checks ranges (factor >= 1, low_freq_factor < high_freq_factor, positive original length,
  // beta_fast > beta_slow > 0, ...). Errors are InvalidArgument naming the key.
  absl::Status Validate() const;

  // Returns e.g. "llama3(factor=8, low_freq_factor=1, high_freq_factor=4, original_max=8192)".
  std::string DebugString() const;
};

// A Llama-family decoder's configuration. Sizes are element counts; lengths are tokens.
struct ModelConfig {
  // Parses a config.json document, then Validate()s it. Errors: InvalidArgument for malformed
  // JSON, missing required keys, wrong types or bad values (naming the key); Unimplemented for
  // an unsupported architecture, activation, RoPE type or sliding-window attention.
  static absl::StatusOr<ModelConfig> FromJsonString(std::string_view json);

  // Reads and parses the file at `path` (errors also name the path).
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);

  // Checks internal consistency: positive sizes, hidden_size % num_attention_heads == 0 when
  // head_dim was not given, num_attention_heads % num_key_value_heads == 0, even head_dim,
  // rms_norm_eps > 0, rope_theta > 0, valid rope_scaling. Errors name the key.
  absl::Status Validate() const;

  // Returns a one-line summary, e.g. "llama vocab=128256 hidden=4096 ... rope=llama3(...)".
  std::string DebugString() const;

  Architecture architecture = Architecture::kLlama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  // Width of the SwiGLU MLP's gate/up projections.
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  // Grouped-query attention: query heads per KV head = num_attention_heads / this.
  int64_t num_key_value_heads = 0;
  // Per-head width; hidden_size / num_attention_heads unless the config gives "head_dim".
  int64_t head_dim = 0;
  // True if "head_dim" was present (it may differ from hidden_size / num_attention_heads).
  bool head_dim_explicit = false;
  float rms_norm_eps = 1e-6f;
  // Longest context the model supports, in tokens.
  int64_t max_position_embeddings = 0;
  // True if lm_head reuses embed_tokens (no separate "lm_head.weight").
  bool tie_word_embeddings = false;
  // Biases: q/k/v projections, o projection, and the MLP's gate/up/down projections.
  // Llama: "attention_bias" sets both qkv_bias and o_bias; "mlp_bias" sets mlp_bias.
  // Qwen2: qkv_bias is always true, o_bias and mlp_bias false. Mistral: none.
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  std::optional<int64_t> bos_token_id;
  // "eos_token_id" as a list (an int becomes a one-element list; null or absent is empty).
  std::vector<int64_t> eos_token_ids;
  // The checkpoint's dtype as written ("torch_dtype" or transformers-5 "dtype"), e.g.
  // "bfloat16"; empty if absent.
  std::string torch_dtype;
  // RoPE base frequency.
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_MODEL_CONFIG_H_
