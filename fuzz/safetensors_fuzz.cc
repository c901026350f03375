// libFuzzer target for checkpoint loading: the safetensors header parser, the fp32/bf16
// conversions of every tensor it accepts, and the config.json parser, all on untrusted bytes.
// Build with -fsanitize=fuzzer,address,undefined; any crash, sanitizer report or trap is a bug.
//
// Run: ./safetensors_fuzz -max_len=4096 CORPUS_DIR
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/types/span.h"
#include "engine/model/model_config.h"
#include "engine/model/safetensors.h"

namespace {

using sieve::engine::DType;

// Every tensor the parser accepts must lie inside the input and convert without error (for
// float dtypes) or fail cleanly (for the rest).
void CheckSafetensors(absl::Span<const uint8_t> bytes) {
  absl::StatusOr<sieve::engine::SafetensorsHeader> header =
      sieve::engine::ParseSafetensorsHeader(bytes, "fuzz.safetensors");
  if (!header.ok()) return;
  if (header->data_offset + header->data_bytes != bytes.size()) __builtin_trap();
  for (const sieve::engine::SafetensorsTensorInfo& info : header->tensors) {
    sieve::engine::TensorView view = sieve::engine::MakeTensorView(*header, info, bytes);
    if (view.bytes.data() < bytes.data() ||
        view.bytes.data() + view.bytes.size() > bytes.data() + bytes.size()) {
      __builtin_trap();
    }
    const int64_t numel = view.numel();
    if (numel < 0 ||
        static_cast<uint64_t>(numel) * sieve::engine::DTypeSize(view.dtype) != view.bytes.size()) {
      __builtin_trap();
    }
    std::vector<float> f32(static_cast<size_t>(numel));
    std::vector<uint16_t> bf16(static_cast<size_t>(numel));
    const bool convertible =
        view.dtype == DType::kF32 || view.dtype == DType::kF16 || view.dtype == DType::kBF16;
    if (sieve::engine::CopyToFloat32(view, absl::MakeSpan(f32)).ok() != convertible) {
      __builtin_trap();
    }
    if (sieve::engine::CopyToBf16(view, absl::MakeSpan(bf16)).ok() != convertible) {
      __builtin_trap();
    }
    // A wrong-sized output must be rejected, never written past.
    std::vector<float> short_out(f32.size() / 2);
    if (numel > 0 && sieve::engine::CopyToFloat32(view, absl::MakeSpan(short_out)).ok()) {
      __builtin_trap();
    }
  }
}

// Any config the parser accepts must also pass Validate().
void CheckModelConfig(std::string_view text) {
  absl::StatusOr<sieve::engine::ModelConfig> config =
      sieve::engine::ModelConfig::FromJsonString(text);
  if (!config.ok()) return;
  if (!config->Validate().ok()) __builtin_trap();
  if (config->DebugString().empty()) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  CheckSafetensors(absl::Span<const uint8_t>(data, size));
  CheckModelConfig(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
