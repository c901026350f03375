// Rotary position embedding tables: the inverse frequencies and attention scaling that each RoPE
// scaling type of Hugging Face Llama-family configs produces.
#ifndef SIEVE_ENGINE_MODEL_ROPE_H_
#define SIEVE_ENGINE_MODEL_ROPE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace sieve::engine {

// The RoPE settings of a model, independent of how config.json spelled them.
struct RopeParams {
  enum class Type { kDefault, kLinear, kLlama3, kYarn };
  Type type = Type::kDefault;
  double theta = 10000.0;        // base
  int32_t rotary_dim = 0;        // dims that rotate (head_dim for Llama); even
  double factor = 1.0;           // linear, llama3, yarn
  // llama3
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position = 8192;  // llama3 and yarn (tokens)
  // yarn
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;           // 0 = absent
  double mscale_all_dim = 0.0;   // 0 = absent
  double attention_factor = 0.0; // 0 = derive from factor / mscale
  bool truncate = true;
};

// What the forward pass needs: angle(position, i) = position * inv_freq[i] for i < rotary_dim/2,
// and cos/sin multiplied by attention_scaling.
struct RopeTables {
  std::vector<float> inv_freq;   // [rotary_dim / 2], radians per token
  float attention_scaling = 1.0f;
};

// Computes the tables in fp32 the way Hugging Face transformers does, so that angles at long
// positions round identically. InvalidArgument for a non-positive theta or factor or an odd
// rotary_dim.
absl::StatusOr<RopeTables> ComputeRopeTables(const RopeParams& params);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_ROPE_H_
