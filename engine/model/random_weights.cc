#include "engine/model/random_weights.h"

#include <cmath>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/parallel_for.h"

namespace sieve::engine {
namespace {

// SplitMix64: a full-period 64-bit mixer; cheap enough to call once per element.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t HashName(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

}  // namespace

absl::StatusOr<TensorView> RandomWeightSource::GetWithShape(std::string_view name,
                                                            absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && n > (int64_t{1} << 40) / d)) {
      return absl::InvalidArgumentError(absl::StrCat("random weights: bad shape for ", std::string(name)));
    }
    n *= d;
  }
  std::vector<float>& buf = buffers_.emplace_back(static_cast<size_t>(n));
  const std::string owned(name);
  const bool is_norm = absl::EndsWith(owned, "norm.weight");
  // Uniform on [-a, a] has standard deviation a / sqrt(3).
  const float a = 0.02f * std::sqrt(3.0f);
  const uint64_t base = Mix(seed_ ^ HashName(owned));
  kernels::ParallelFor(n, 0, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double u = static_cast<double>(Mix(base + static_cast<uint64_t>(i)) >> 11) * 0x1.0p-53;
      const float v = static_cast<float>(2.0 * u - 1.0) * a;
      buf[i] = is_norm ? 1.0f + v : v;
    }
  });
  TensorView view;
  view.name = owned;
  view.dtype = DType::kF32;
  view.shape.assign(shape.begin(), shape.end());
  view.bytes = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(buf.data()),
                                   buf.size() * sizeof(float));
  return view;
}

}  // namespace sieve::engine
