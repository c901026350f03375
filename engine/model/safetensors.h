// Reading Hugging Face safetensors checkpoints: a pure header parser (fuzzable, no I/O), a
// read-only memory-mapped file, and conversions of tensor payloads to fp32 / bf16.
//
// File layout (https://huggingface.co/docs/safetensors): 8 bytes little-endian u64 N, then N
// bytes of UTF-8 JSON (an object; may be padded with spaces), then the data section. Each JSON
// entry other than "__metadata__" describes one tensor:
//   "name": {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
// where [begin, end) are byte offsets relative to the start of the data section, row-major.
//
// Thread-safety: every type here is immutable after construction and safe to share for reading.
#ifndef SIEVE_ENGINE_MODEL_SAFETENSORS_H_
#define SIEVE_ENGINE_MODEL_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace sieve::engine {

// Element type of a stored tensor, as named by the safetensors "dtype" field.
enum class DType {
  kF64,
  kF32,
  kF16,
  kBF16,
  kF8E4M3,  // "F8_E4M3": 1 byte; readable as raw bytes only.
  kF8E5M2,  // "F8_E5M2": 1 byte; readable as raw bytes only.
  kI64,
  kI32,
  kI16,
  kI8,
  kU64,
  kU32,
  kU16,
  kU8,
  kBool,
};

// Returns the safetensors spelling of `dtype`, e.g. "BF16".
std::string_view DTypeName(DType dtype);

// Returns the size of one element of `dtype` in bytes (1, 2, 4 or 8).
size_t DTypeSize(DType dtype);

// Returns the DType whose safetensors spelling is `name` (case-sensitive), or nullopt if none.
std::optional<DType> DTypeFromName(std::string_view name);

// Formats a shape as "[512, 256]" (a scalar is "[]"), for error messages.
std::string ShapeToString(absl::Span<const int64_t> shape);

// The largest header the parser accepts, in bytes (the safetensors reference limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// One tensor's entry in a safetensors header.
struct SafetensorsTensorInfo {
  // Tensor name, e.g. "model.layers.0.self_attn.q_proj.weight". Never empty.
  std::string name;
  // Element type.
  DType dtype = DType::kF32;
  // Dimensions, outermost first; every entry >= 0. Empty for a scalar.
  std::vector<int64_t> shape;
  // Number of elements: the product of `shape` (1 for a scalar, 0 if any dimension is 0).
  uint64_t numel = 0;
  // Byte range [data_begin, data_end) relative to the start of the data section;
  // data_end - data_begin == numel * DTypeSize(dtype).
  uint64_t data_begin = 0;
  uint64_t data_end = 0;
};

// A validated safetensors header. Offsets are bytes.
struct SafetensorsHeader {
  // N: the length of the JSON header in bytes.
  uint64_t header_bytes = 0;
  // Offset of the data section from the start of the file (8 + N).
  uint64_t data_offset = 0;
  // Size of the data section in bytes (file size - 8 - N).
  uint64_t data_bytes = 0;
  // Tensors sorted by name; names are unique and byte ranges do not overlap.
  std::vector<SafetensorsTensorInfo> tensors;
  // The optional "__metadata__" object (string keys to string values).
  std::map<std::string, std::string> metadata;
};

// Parses and validates the header of a whole safetensors file held in `file_bytes`. Touches
// only the 8-byte prefix and the JSON header; the data section is checked only for size.
// Checks: at least 8 bytes; 2 <= N <= min(kMaxSafetensorsHeaderBytes, size - 8); the header is a
// JSON object without duplicate keys (at any depth); "__metadata__", if present, maps strings
// to strings; every tensor has a known "dtype", a "shape" of non-negative integers whose
// element count and byte size do not overflow, and "data_offsets" [begin, end] with
// begin <= end <= data size and end - begin == numel * dtype size; non-empty ranges of
// different tensors do not overlap. Gaps between tensors are allowed. Unknown fields inside a
// tensor entry are ignored. Never throws or crashes; errors are InvalidArgument and name the
// file (`file_name`, when not empty), the tensor and the field.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::Span<const uint8_t> file_bytes,
                                                         std::string_view file_name = {});

// A borrowed view of one tensor's bytes, valid while the file that owns them is alive.
struct TensorView {
  // Tensor name.
  std::string name;
  // Element type of `bytes`.
  DType dtype = DType::kF32;
  // Dimensions, outermost first (row-major layout).
  std::vector<int64_t> shape;
  // The raw little-endian payload: numel() * DTypeSize(dtype) bytes, with no alignment
  // guarantee (read it with memcpy or the Copy* functions below).
  absl::Span<const uint8_t> bytes;

  // Returns the number of elements (the product of `shape`; 1 for a scalar), or -1 if the
  // shape has a negative dimension or its product overflows int64.
  int64_t numel() const;
};

// Returns the view of `info` inside `file_bytes`, the bytes that `header` was parsed from.
TensorView MakeTensorView(const SafetensorsHeader& header, const SafetensorsTensorInfo& info,
                          absl::Span<const uint8_t> file_bytes);

// Converts `t` (F32, F16 or BF16) to fp32 exactly, element by element, into `out`, which must
// hold exactly t.numel() elements. Errors: InvalidArgument on a size mismatch (between `out`,
// the shape and the byte count), Unimplemented for any other dtype. Both name the tensor.
absl::Status CopyToFloat32(const TensorView& t, absl::Span<float> out);

// Converts `t` to bf16 bit patterns in `out` (exactly t.numel() elements): F32 is rounded to
// nearest even, F16 goes through fp32 (then rounded), BF16 is copied. Errors as CopyToFloat32.
absl::Status CopyToBf16(const TensorView& t, absl::Span<uint16_t> out);

// A whole file mapped read-only into memory (RAII). Move-only.
class MappedFile {
 public:
  // Maps the regular file at `path`. Errors: NotFound if it does not exist, PermissionDenied if
  // it cannot be read, InvalidArgument if it is not a regular file or is empty; each names the
  // path.
  static absl::StatusOr<MappedFile> Open(const std::string& path);

  // Creates an empty mapping (no file).
  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  // Unmaps the file.
  ~MappedFile();

  // Returns the whole file's bytes (empty for a default-constructed MappedFile).
  absl::Span<const uint8_t> bytes() const { return absl::Span<const uint8_t>(data_, size_); }
  // Returns the path the file was opened from.
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  void Reset();

  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;  // Bytes.
};

// An opened, validated safetensors file whose tensors are views into a read-only mapping.
class SafetensorsFile {
 public:
  // Maps `path` and validates its header (see ParseSafetensorsHeader); errors name the path.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Returns the path the file was opened from.
  const std::string& path() const { return file_.path(); }
  // Returns the parsed header.
  const SafetensorsHeader& header() const { return header_; }
  // Returns the "__metadata__" entries (possibly empty).
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  // Returns every tensor, sorted by name. The views stay valid while this object is alive.
  absl::Span<const TensorView> tensors() const { return views_; }
  // Returns the tensor called `name`, or nullptr. The pointer lives as long as this object.
  const TensorView* Find(std::string_view name) const;
  // Returns the tensor called `name`, or NotFound naming the tensor and the file.
  absl::StatusOr<TensorView> Get(std::string_view name) const;

 private:
  SafetensorsFile(MappedFile file, SafetensorsHeader header);

  MappedFile file_;
  SafetensorsHeader header_;
  std::vector<TensorView> views_;                     // Same order as header_.tensors.
  absl::flat_hash_map<std::string, size_t> by_name_;  // Name -> index into views_.
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_MODEL_SAFETENSORS_H_
