// WeightStore: every tensor of a Hugging Face checkpoint directory, by name, as views into
// memory-mapped safetensors files (no copies are made; conversion happens at load time through
// CopyToFloat32 / CopyToBf16 in engine/safetensors.h).
//
// Thread-safety: read-only after Open; safe to share between threads without locking.
#ifndef SIEVE_ENGINE_MODEL_WEIGHT_STORE_H_
#define SIEVE_ENGINE_MODEL_WEIGHT_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model/safetensors.h"

namespace sieve::engine {

// The tensors of one model directory.
class WeightStore {
 public:
  // Opens the checkpoint in `model_dir`:
  //  1. If `model.safetensors.index.json` exists, its "weight_map" (tensor name -> shard file
  //     name, relative to the directory) lists the shards; each is opened once and every listed
  //     tensor must be present in the shard the index names (the error names tensor and shard).
  //  2. Else if `model.safetensors` exists, that file alone.
  //  3. Else every `*.safetensors` file in the directory.
  //  4. Else NotFound "no *.safetensors in DIR".
  // In all cases tensor names must be unique across the opened files (InvalidArgument naming
  // the tensor and both files). Tensors present in a shard but absent from the index are still
  // served. Shard names must be relative and must not contain "..".
  static absl::StatusOr<std::unique_ptr<WeightStore>> Open(const std::string& model_dir);

  WeightStore(const WeightStore&) = delete;
  WeightStore& operator=(const WeightStore&) = delete;

  // Returns the tensor called `name`, or NotFound naming the tensor and the directory.
  absl::StatusOr<TensorView> Get(std::string_view name) const;

  // Returns the tensor called `name` if its shape equals `shape`; else NotFound (as Get) or
  // InvalidArgument "tensor 'NAME' has shape [512, 256], expected [1024, 256]".
  absl::StatusOr<TensorView> GetWithShape(std::string_view name,
                                          absl::Span<const int64_t> shape) const;

  // Returns the tensor called `name`, or nullptr. The pointer lives as long as this store.
  const TensorView* Find(std::string_view name) const;

  // Returns true if a tensor called `name` exists.
  bool Has(std::string_view name) const { return Find(name) != nullptr; }

  // Returns every tensor name, sorted.
  std::vector<std::string> Names() const;

  // Returns the number of tensors.
  size_t size() const { return by_name_.size(); }

  // Returns the directory the store was opened from.
  const std::string& dir() const { return dir_; }

  // Returns the opened safetensors files, in the order they were opened.
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  explicit WeightStore(std::string dir) : dir_(std::move(dir)) {}

  // Opens `file_name` (relative to dir_) and indexes its tensors, rejecting duplicate names.
  absl::StatusOr<const SafetensorsFile*> AddFile(const std::string& file_name);

  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  // Where a tensor lives; both pointers are owned by files_ (stable: files are heap-allocated
  // and immutable).
  struct Entry {
    const TensorView* view;
    const SafetensorsFile* file;
  };
  absl::flat_hash_map<std::string, Entry> by_name_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_WEIGHT_STORE_H_
