#include "engine/model/model_config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using Json = nlohmann::json;

// Sizes above this are rejected so that products of two sizes cannot overflow int64.
constexpr int64_t kMaxSize = std::numeric_limits<int32_t>::max();

const char* JsonTypeName(const Json& j) {
  if (j.is_number_integer()) return "integer";
  if (j.is_number_float()) return "float";
  return j.type_name();
}

absl::Status Invalid(absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config key '", key, "' ", what));
}

// Typed access to the keys of one JSON object. A key whose value is null counts as absent.
// `scope` ("" or e.g. "rope_scaling") prefixes key names in error messages.
class KeyReader {
 public:
  KeyReader(const Json& object, std::string scope) : object_(object), scope_(std::move(scope)) {}

  std::string Name(absl::string_view key) const {
    return scope_.empty() ? std::string(key) : absl::StrCat(scope_, ".", key);
  }

  const Json* Find(absl::string_view key) const {
    auto it = object_.find(std::string(key));
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::Status Int(absl::string_view key, bool required, int64_t* out) const {
    const Json* j = Find(key);
    if (j == nullptr)
      return required ? Invalid(Name(key), "is missing (required)") : absl::OkStatus();
    if (!j->is_number_integer()) {
      return Invalid(Name(key), absl::StrCat("must be an integer, got ", JsonTypeName(*j)));
    }
    if (j->is_number_unsigned() &&
        j->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Invalid(Name(key), "is out of range");
    }
    *out = j->get<int64_t>();
    return absl::OkStatus();
  }

  absl::Status OptInt(absl::string_view key, std::optional<int64_t>* out) const {
    if (Find(key) == nullptr) return absl::OkStatus();
    int64_t v = 0;
    SIEVE_RETURN_IF_ERROR(Int(key, true, &v));
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Float(absl::string_view key, bool required, float* out) const {
    const Json* j = Find(key);
    if (j == nullptr)
      return required ? Invalid(Name(key), "is missing (required)") : absl::OkStatus();
    if (!j->is_number()) {
      return Invalid(Name(key), absl::StrCat("must be a number, got ", JsonTypeName(*j)));
    }
    double v = j->get<double>();
    if (!std::isfinite(v) || std::fabs(v) > std::numeric_limits<float>::max()) {
      return Invalid(Name(key), absl::StrCat("is out of range for float (", v, ")"));
    }
    *out = static_cast<float>(v);
    return absl::OkStatus();
  }

  absl::Status OptFloat(absl::string_view key, std::optional<float>* out) const {
    if (Find(key) == nullptr) return absl::OkStatus();
    float v = 0;
    SIEVE_RETURN_IF_ERROR(Float(key, true, &v));
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Bool(absl::string_view key, bool* out) const {
    const Json* j = Find(key);
    if (j == nullptr) return absl::OkStatus();
    if (!j->is_boolean()) {
      return Invalid(Name(key), absl::StrCat("must be a boolean, got ", JsonTypeName(*j)));
    }
    *out = j->get<bool>();
    return absl::OkStatus();
  }

  absl::Status String(absl::string_view key, std::string* out) const {
    const Json* j = Find(key);
    if (j == nullptr) return absl::OkStatus();
    if (!j->is_string()) {
      return Invalid(Name(key), absl::StrCat("must be a string, got ", JsonTypeName(*j)));
    }
    *out = j->get<std::string>();
    return absl::OkStatus();
  }

 private:
  const Json& object_;
  std::string scope_;
};

absl::StatusOr<Architecture> ArchitectureFromName(absl::string_view name) {
  if (name == "LlamaForCausalLM" || name == "llama") return Architecture::kLlama;
  if (name == "MistralForCausalLM" || name == "mistral") return Architecture::kMistral;
  if (name == "Qwen2ForCausalLM" || name == "qwen2") return Architecture::kQwen2;
  return absl::UnimplementedError(
      absl::StrCat("unsupported architecture '", name, "' (supported: llama, mistral, qwen2)"));
}

// "architectures"[0] decides when present; else "model_type".
absl::StatusOr<Architecture> ParseArchitecture(const KeyReader& r) {
  if (const Json* archs = r.Find("architectures")) {
    if (!archs->is_array()) {
      return Invalid("architectures",
                     absl::StrCat("must be a list of strings, got ", JsonTypeName(*archs)));
    }
    if (!archs->empty()) {
      if (!(*archs)[0].is_string()) {
        return Invalid("architectures", absl::StrCat("must be a list of strings, got a list of ",
                                                     JsonTypeName((*archs)[0])));
      }
      return ArchitectureFromName((*archs)[0].get_ref<const std::string&>());
    }
  }
  std::string model_type;
  SIEVE_RETURN_IF_ERROR(r.String("model_type", &model_type));
  if (model_type.empty()) {
    return Invalid("architectures", "and 'model_type' are both missing");
  }
  return ArchitectureFromName(model_type);
}

absl::Status ParseSizes(const KeyReader& r, ModelConfig* c) {
  SIEVE_RETURN_IF_ERROR(r.Int("vocab_size", true, &c->vocab_size));
  SIEVE_RETURN_IF_ERROR(r.Int("hidden_size", true, &c->hidden_size));
  SIEVE_RETURN_IF_ERROR(r.Int("intermediate_size", true, &c->intermediate_size));
  SIEVE_RETURN_IF_ERROR(r.Int("num_hidden_layers", true, &c->num_hidden_layers));
  SIEVE_RETURN_IF_ERROR(r.Int("num_attention_heads", true, &c->num_attention_heads));
  SIEVE_RETURN_IF_ERROR(r.Int("max_position_embeddings", true, &c->max_position_embeddings));
  c->num_key_value_heads = c->num_attention_heads;
  SIEVE_RETURN_IF_ERROR(r.Int("num_key_value_heads", false, &c->num_key_value_heads));
  std::optional<int64_t> head_dim;
  SIEVE_RETURN_IF_ERROR(r.OptInt("head_dim", &head_dim));
  c->head_dim_explicit = head_dim.has_value();
  if (head_dim.has_value()) {
    c->head_dim = *head_dim;
  } else if (c->num_attention_heads > 0) {
    c->head_dim = c->hidden_size / c->num_attention_heads;
  }
  SIEVE_RETURN_IF_ERROR(r.Float("rms_norm_eps", false, &c->rms_norm_eps));
  SIEVE_RETURN_IF_ERROR(r.Bool("tie_word_embeddings", &c->tie_word_embeddings));
  std::string act = "silu";
  SIEVE_RETURN_IF_ERROR(r.String("hidden_act", &act));
  if (act != "silu") {
    return absl::UnimplementedError(
        absl::StrCat("config key 'hidden_act' is '", act, "'; only 'silu' is supported"));
  }
  return absl::OkStatus();
}

absl::Status ParseBiasesAndWindow(const KeyReader& r, ModelConfig* c) {
  std::optional<int64_t> window;
  SIEVE_RETURN_IF_ERROR(r.OptInt("sliding_window", &window));
  bool window_used = false;
  switch (c->architecture) {
    case Architecture::kLlama: {
      bool attention_bias = false;
      SIEVE_RETURN_IF_ERROR(r.Bool("attention_bias", &attention_bias));
      c->qkv_bias = c->o_bias = attention_bias;
      SIEVE_RETURN_IF_ERROR(r.Bool("mlp_bias", &c->mlp_bias));
      break;
    }
    case Architecture::kMistral:
      window_used = window.has_value();
      break;
    case Architecture::kQwen2: {
      c->qkv_bias = true;
      bool use_sliding_window = false;
      SIEVE_RETURN_IF_ERROR(r.Bool("use_sliding_window", &use_sliding_window));
      window_used = use_sliding_window && window.has_value();
      break;
    }
  }
  if (window_used && *window < c->max_position_embeddings) {
    return absl::UnimplementedError(
        absl::StrCat("config key 'sliding_window' is ", *window, " (< max_position_embeddings ",
                     c->max_position_embeddings, "): sliding-window attention is not implemented"));
  }
  return absl::OkStatus();
}

absl::Status ParseTokensAndDtype(const KeyReader& r, ModelConfig* c) {
  SIEVE_RETURN_IF_ERROR(r.OptInt("bos_token_id", &c->bos_token_id));
  if (const Json* eos = r.Find("eos_token_id")) {
    if (eos->is_number_integer()) {
      int64_t id = 0;
      SIEVE_RETURN_IF_ERROR(r.Int("eos_token_id", true, &id));
      c->eos_token_ids.push_back(id);
    } else if (eos->is_array()) {
      for (const Json& e : *eos) {
        if (!e.is_number_integer()) {
          return Invalid(
              "eos_token_id",
              absl::StrCat("must be a list of integers, got a list containing ", JsonTypeName(e)));
        }
        c->eos_token_ids.push_back(e.get<int64_t>());
      }
    } else {
      return Invalid("eos_token_id", absl::StrCat("must be an integer or a list of integers, got ",
                                                  JsonTypeName(*eos)));
    }
  }
  SIEVE_RETURN_IF_ERROR(r.String("torch_dtype", &c->torch_dtype));
  SIEVE_RETURN_IF_ERROR(r.String("dtype", &c->torch_dtype));  // transformers 5 spelling.
  return absl::OkStatus();
}

// Reads one scaling object (transformers-4 "rope_scaling" or transformers-5 "rope_parameters";
// the rope_theta inside the latter is read by the caller).
absl::Status ParseRopeScaling(const KeyReader& r, int64_t max_position_embeddings, RopeScaling* s) {
  std::string type;
  SIEVE_RETURN_IF_ERROR(r.String("type", &type));  // Legacy spelling.
  SIEVE_RETURN_IF_ERROR(r.String("rope_type", &type));
  if (type.empty()) return Invalid(r.Name("rope_type"), "is missing (required)");
  if (type == "default") {
    s->type = RopeScaling::Type::kNone;
    return absl::OkStatus();
  }
  if (type == "linear") {
    s->type = RopeScaling::Type::kLinear;
    return r.Float("factor", true, &s->factor);
  }
  if (type == "llama3") {
    s->type = RopeScaling::Type::kLlama3;
    SIEVE_RETURN_IF_ERROR(r.Float("factor", true, &s->factor));
    SIEVE_RETURN_IF_ERROR(r.Float("low_freq_factor", true, &s->low_freq_factor));
    SIEVE_RETURN_IF_ERROR(r.Float("high_freq_factor", true, &s->high_freq_factor));
    return r.Int("original_max_position_embeddings", true, &s->original_max_position_embeddings);
  }
  if (type == "yarn") {
    s->type = RopeScaling::Type::kYarn;
    SIEVE_RETURN_IF_ERROR(r.Float("factor", true, &s->factor));
    s->original_max_position_embeddings = max_position_embeddings;
    SIEVE_RETURN_IF_ERROR(
        r.Int("original_max_position_embeddings", false, &s->original_max_position_embeddings));
    SIEVE_RETURN_IF_ERROR(r.Float("beta_fast", false, &s->beta_fast));
    SIEVE_RETURN_IF_ERROR(r.Float("beta_slow", false, &s->beta_slow));
    SIEVE_RETURN_IF_ERROR(r.OptFloat("mscale", &s->mscale));
    SIEVE_RETURN_IF_ERROR(r.OptFloat("mscale_all_dim", &s->mscale_all_dim));
    SIEVE_RETURN_IF_ERROR(r.OptFloat("attention_factor", &s->attention_factor));
    return r.Bool("truncate", &s->truncate);
  }
  return absl::UnimplementedError(
      absl::StrCat("config key '", r.Name("rope_type"), "' is '", type,
                   "'; supported RoPE types: default, linear, llama3, yarn"));
}

absl::Status ParseRope(const KeyReader& r, ModelConfig* c) {
  SIEVE_RETURN_IF_ERROR(r.Float("rope_theta", false, &c->rope_theta));
  float partial_rotary_factor = 1.0f;
  SIEVE_RETURN_IF_ERROR(r.Float("partial_rotary_factor", false, &partial_rotary_factor));
  const Json* params = r.Find("rope_parameters");  // transformers >= 5.
  const char* key = "rope_parameters";
  if (params == nullptr) {
    params = r.Find("rope_scaling");  // transformers 4.
    key = "rope_scaling";
  }
  if (params != nullptr) {
    if (!params->is_object()) {
      return Invalid(key, absl::StrCat("must be an object, got ", JsonTypeName(*params)));
    }
    KeyReader sr(*params, key);
    if (absl::string_view(key) == "rope_parameters") {
      if (sr.Find("rope_type") == nullptr && sr.Find("type") == nullptr &&
          sr.Find("rope_theta") == nullptr) {
        return absl::UnimplementedError(
            "config key 'rope_parameters' has no 'rope_type' or 'rope_theta' (per-layer-type "
            "RoPE parameters are not supported)");
      }
      SIEVE_RETURN_IF_ERROR(sr.Float("rope_theta", false, &c->rope_theta));
      SIEVE_RETURN_IF_ERROR(sr.Float("partial_rotary_factor", false, &partial_rotary_factor));
      if (sr.Find("rope_type") == nullptr && sr.Find("type") == nullptr) {
        c->rope_scaling = RopeScaling{};  // Only a theta: plain RoPE.
        params = nullptr;
      }
    }
    if (params != nullptr) {
      SIEVE_RETURN_IF_ERROR(ParseRopeScaling(sr, c->max_position_embeddings, &c->rope_scaling));
    }
  }
  if (partial_rotary_factor != 1.0f) {
    return absl::UnimplementedError(absl::StrCat("config key 'partial_rotary_factor' is ",
                                                 partial_rotary_factor, "; only 1 is supported"));
  }
  return absl::OkStatus();
}

absl::Status CheckSize(absl::string_view key, int64_t v) {
  if (v <= 0) return Invalid(key, absl::StrCat("must be positive, got ", v));
  if (v > kMaxSize) return Invalid(key, absl::StrCat("is too large (", v, ")"));
  return absl::OkStatus();
}

float GetMscale(float scale, float m) {
  return scale <= 1.0f ? 1.0f : 0.1f * m * std::log(scale) + 1.0f;
}

}  // namespace

std::string_view ArchitectureName(Architecture arch) {
  switch (arch) {
    case Architecture::kLlama:
      return "llama";
    case Architecture::kMistral:
      return "mistral";
    case Architecture::kQwen2:
      return "qwen2";
  }
  return "unknown";
}

std::string_view RopeScaling::TypeName(Type type) {
  switch (type) {
    case Type::kNone:
      return "default";
    case Type::kLinear:
      return "linear";
    case Type::kLlama3:
      return "llama3";
    case Type::kYarn:
      return "yarn";
  }
  return "unknown";
}

float RopeScaling::YarnAttentionFactor() const {
  if (type != Type::kYarn) return 1.0f;
  if (attention_factor.has_value()) return *attention_factor;
  if (mscale.value_or(0.0f) != 0.0f && mscale_all_dim.value_or(0.0f) != 0.0f) {
    return GetMscale(factor, *mscale) / GetMscale(factor, *mscale_all_dim);
  }
  return GetMscale(factor, 1.0f);
}

absl::Status RopeScaling::Validate() const {
  if (type == Type::kNone) return absl::OkStatus();
  if (!(factor >= 1.0f) || !std::isfinite(factor)) {
    return Invalid("rope_scaling.factor", absl::StrCat("must be >= 1, got ", factor));
  }
  if (type == Type::kLlama3) {
    if (!(low_freq_factor > 0.0f) || !(high_freq_factor > low_freq_factor)) {
      return Invalid("rope_scaling.high_freq_factor",
                     absl::StrCat("must exceed low_freq_factor > 0, got low ", low_freq_factor,
                                  ", high ", high_freq_factor));
    }
  }
  if (type == Type::kLlama3 || type == Type::kYarn) {
    SIEVE_RETURN_IF_ERROR(CheckSize("rope_scaling.original_max_position_embeddings",
                                    original_max_position_embeddings));
  }
  if (type == Type::kYarn) {
    if (!(beta_slow > 0.0f) || !(beta_fast >= beta_slow)) {
      return Invalid("rope_scaling.beta_fast",
                     absl::StrCat("must be >= beta_slow > 0, got beta_fast ", beta_fast,
                                  ", beta_slow ", beta_slow));
    }
    if (attention_factor.has_value() && !(*attention_factor > 0.0f)) {
      return Invalid("rope_scaling.attention_factor",
                     absl::StrCat("must be positive, got ", *attention_factor));
    }
  }
  return absl::OkStatus();
}

std::string RopeScaling::DebugString() const {
  switch (type) {
    case Type::kNone:
      return "default";
    case Type::kLinear:
      return absl::StrCat("linear(factor=", factor, ")");
    case Type::kLlama3:
      return absl::StrCat("llama3(factor=", factor, ", low_freq_factor=", low_freq_factor,
                          ", high_freq_factor=", high_freq_factor,
                          ", original_max=", original_max_position_embeddings, ")");
    case Type::kYarn:
      return absl::StrCat("yarn(factor=", factor,
                          ", original_max=", original_max_position_embeddings,
                          ", beta_fast=", beta_fast, ", beta_slow=", beta_slow,
                          ", attention_factor=", YarnAttentionFactor(),
                          ", truncate=", truncate ? "true" : "false", ")");
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ModelConfig::FromJsonString(std::string_view json_text) {
  Json json;
  try {
    json = Json::parse(json_text.begin(), json_text.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config is not valid JSON: ", e.what()));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config must be a JSON object, got ", JsonTypeName(json)));
  }
  KeyReader r(json, "");
  ModelConfig c;
  SIEVE_ASSIGN_OR_RETURN(c.architecture, ParseArchitecture(r));
  SIEVE_RETURN_IF_ERROR(ParseSizes(r, &c));
  SIEVE_RETURN_IF_ERROR(ParseBiasesAndWindow(r, &c));
  SIEVE_RETURN_IF_ERROR(ParseTokensAndDtype(r, &c));
  SIEVE_RETURN_IF_ERROR(ParseRope(r, &c));
  SIEVE_RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read model config '", path, "'"));
  std::ostringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<ModelConfig> config = FromJsonString(ss.str());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat("'", path, "': ", config.status().message()));
  }
  return config;
}

absl::Status ModelConfig::Validate() const {
  SIEVE_RETURN_IF_ERROR(CheckSize("vocab_size", vocab_size));
  SIEVE_RETURN_IF_ERROR(CheckSize("hidden_size", hidden_size));
  SIEVE_RETURN_IF_ERROR(CheckSize("intermediate_size", intermediate_size));
  SIEVE_RETURN_IF_ERROR(CheckSize("num_hidden_layers", num_hidden_layers));
  SIEVE_RETURN_IF_ERROR(CheckSize("num_attention_heads", num_attention_heads));
  SIEVE_RETURN_IF_ERROR(CheckSize("num_key_value_heads", num_key_value_heads));
  SIEVE_RETURN_IF_ERROR(CheckSize("max_position_embeddings", max_position_embeddings));
  if (!head_dim_explicit && hidden_size % num_attention_heads != 0) {
    return Invalid("hidden_size",
                   absl::StrCat("(", hidden_size, ") must be divisible by num_attention_heads (",
                                num_attention_heads, ") when head_dim is absent"));
  }
  SIEVE_RETURN_IF_ERROR(CheckSize("head_dim", head_dim));
  if (head_dim % 2 != 0) return Invalid("head_dim", absl::StrCat("must be even, got ", head_dim));
  if (num_attention_heads % num_key_value_heads != 0) {
    return Invalid("num_key_value_heads",
                   absl::StrCat("(", num_key_value_heads, ") must divide num_attention_heads (",
                                num_attention_heads, ")"));
  }
  if (!(rms_norm_eps > 0.0f) || !std::isfinite(rms_norm_eps)) {
    return Invalid("rms_norm_eps", absl::StrCat("must be positive, got ", rms_norm_eps));
  }
  if (!(rope_theta > 0.0f) || !std::isfinite(rope_theta)) {
    return Invalid("rope_theta", absl::StrCat("must be positive, got ", rope_theta));
  }
  if (bos_token_id.has_value() && *bos_token_id < 0) {
    return Invalid("bos_token_id", absl::StrCat("must be non-negative, got ", *bos_token_id));
  }
  for (int64_t id : eos_token_ids) {
    if (id < 0) return Invalid("eos_token_id", absl::StrCat("must be non-negative, got ", id));
  }
  return rope_scaling.Validate();
}

std::string ModelConfig::DebugString() const {
  return absl::StrCat(
      absl::string_view(ArchitectureName(architecture).data(),
                        ArchitectureName(architecture).size()),
      " vocab=", vocab_size, " hidden=", hidden_size, " intermediate=", intermediate_size,
      " layers=", num_hidden_layers, " heads=", num_attention_heads,
      " kv_heads=", num_key_value_heads, " head_dim=", head_dim, " eps=", rms_norm_eps,
      " max_pos=", max_position_embeddings, " rope_theta=", rope_theta,
      " rope=", rope_scaling.DebugString(), " tie=", tie_word_embeddings ? "true" : "false",
      " bias(qkv=", qkv_bias ? 1 : 0, " o=", o_bias ? 1 : 0, " mlp=", mlp_bias ? 1 : 0, ")",
      " dtype=", torch_dtype.empty() ? "?" : torch_dtype,
      " bos=", bos_token_id.has_value() ? absl::StrCat(*bos_token_id) : "none", " eos=[",
      absl::StrJoin(eos_token_ids, ","), "]");
}

}  // namespace sieve::engine
