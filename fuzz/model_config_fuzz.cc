// libFuzzer target for the config.json loader (engine/model/model_config.h), on its own with
// real configs as seeds (safetensors_fuzz also feeds it, mixed with checkpoint headers).
//
// Checked on every input (any violation traps):
//   - FromJsonString never throws or crashes; an error is INVALID_ARGUMENT or UNIMPLEMENTED
//     with a message;
//   - an accepted config passes Validate(), is deterministic (parsing it again gives the same
//     summary), and the RoPE tables the model runner derives from it (RopeParamsFromConfig,
//     ComputeRopeTables) are finite or refused cleanly.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "engine/model/model_config.h"
#include "engine/model/rope.h"
#include "engine/runner/model_runner.h"

namespace {

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

// Widest head the RoPE check computes tables for: wider heads are accepted by the config (up to
// 2^31 - 1) and would make the fuzzer measure an allocation rather than the arithmetic; no
// Llama-family model has a head near it.
constexpr int64_t kMaxRopeHeadDim = 1 << 16;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<sieve::engine::ModelConfig> config =
      sieve::engine::ModelConfig::FromJsonString(text);
  if (!config.ok()) {
    const absl::StatusCode code = config.status().code();
    Check(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kUnimplemented);
    Check(!config.status().message().empty());
    return 0;
  }
  Check(config->Validate().ok());
  Check(config->head_dim > 0 && config->head_dim % 2 == 0);
  Check(config->num_attention_heads % config->num_key_value_heads == 0);
  const std::string summary = config->DebugString();
  Check(!summary.empty());
  absl::StatusOr<sieve::engine::ModelConfig> again =
      sieve::engine::ModelConfig::FromJsonString(text);
  Check(again.ok() && again->DebugString() == summary);
  if (config->head_dim <= kMaxRopeHeadDim) {
    absl::StatusOr<sieve::engine::RopeTables> rope =
        sieve::engine::ComputeRopeTables(sieve::engine::RopeParamsFromConfig(*config));
    if (rope.ok()) {
      Check(rope->inv_freq.size() == static_cast<size_t>(config->head_dim / 2));
      for (float f : rope->inv_freq) Check(std::isfinite(f));
      Check(std::isfinite(rope->attention_scaling));
    } else {
      Check(rope.status().code() == absl::StatusCode::kInvalidArgument);
    }
  }
  return 0;
}
