// Seeded random weights with a checkpoint's names and shapes, for running real model shapes
// (Llama-3.1-8B, Qwen2.5-7B) where no checkpoint can be downloaded: benchmarks on the GPU
// machine, and tests of memory sizing. Values follow Hugging Face's initialisation scale
// (uniform with standard deviation 0.02; norm weights 1 +- 0.02), and each tensor's values
// depend only on the seed and the tensor's name.
#ifndef SIEVE_ENGINE_MODEL_RANDOM_WEIGHTS_H_
#define SIEVE_ENGINE_MODEL_RANDOM_WEIGHTS_H_

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/safetensors.h"

namespace sieve::engine {

class RandomWeightSource {
 public:
  explicit RandomWeightSource(uint64_t seed) : seed_(seed) {}

  // Returns an fp32 tensor of `shape` named `name`, valid until Clear(). Never fails for a
  // valid shape (InvalidArgument for a negative or overflowing one).
  absl::StatusOr<TensorView> GetWithShape(std::string_view name, absl::Span<const int64_t> shape);

  // Frees the tensors handed out so far.
  void Clear() { buffers_.clear(); }

 private:
  uint64_t seed_;
  std::deque<std::vector<float>> buffers_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_RANDOM_WEIGHTS_H_
