#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors payloads are little-endian; a big-endian host needs byte swapping");

using Json = nlohmann::json;

// The Debian Abseil has its own string_view type, which StrCat and the hash maps expect.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

struct DTypeEntry {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::kF64, "F64", 8},   {DType::kF32, "F32", 4},        {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
    {DType::kI64, "I64", 8},   {DType::kI32, "I32", 4},        {DType::kI16, "I16", 2},
    {DType::kI8, "I8", 1},     {DType::kU64, "U64", 8},        {DType::kU32, "U32", 4},
    {DType::kU16, "U16", 2},   {DType::kU8, "U8", 1},          {DType::kBool, "BOOL", 1},
};

const DTypeEntry& Entry(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  return kDTypes[1];  // Unreachable for valid enumerators.
}

// Describes a JSON value's type for error messages ("integer", "float", "string", ...).
const char* JsonTypeName(const Json& j) {
  if (j.is_number_integer()) return "integer";
  if (j.is_number_float()) return "float";
  return j.type_name();
}

// Parses `text` as JSON, rejecting duplicate object keys at any depth (nlohmann would otherwise
// keep the last value silently). Exceptions never leave this function.
absl::StatusOr<Json> ParseJsonRejectingDuplicates(std::string_view text,
                                                  const std::string& prefix) {
  std::vector<absl::flat_hash_set<std::string>> open_objects;
  std::string duplicate;
  auto callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string() && duplicate.empty() &&
            !open_objects.back().insert(parsed.get_ref<const std::string&>()).second) {
          duplicate = parsed.get_ref<const std::string&>();
        }
        break;
      default:
        break;
    }
    return true;
  };
  Json j;
  try {
    j = Json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, ": header is not valid JSON: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, ": cannot parse header: ", e.what()));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, ": header has duplicate key '", duplicate, "'"));
  }
  return j;
}

// Product of `shape` as an element count, or nullopt on a negative dimension or on overflow
// (the count must also fit in int64 so that TensorView::numel() is exact).
std::optional<uint64_t> CheckedNumel(absl::Span<const int64_t> shape) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return n;
}

absl::Status ParseMetadata(const Json& value, const std::string& prefix,
                           std::map<std::string, std::string>* metadata) {
  if (!value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, ": field '__metadata__' must be an object, got ", JsonTypeName(value)));
  }
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, ": field '__metadata__': value of '",
                                                     it.key(), "' must be a string, got ",
                                                     JsonTypeName(it.value())));
    }
    (*metadata)[it.key()] = it.value().get<std::string>();
  }
  return absl::OkStatus();
}

absl::Status ParseShape(const Json& shape, const std::string& where, SafetensorsTensorInfo* info) {
  if (!shape.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "field 'shape' must be an array, got ", JsonTypeName(shape)));
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    const Json& d = shape[i];
    if (!d.is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(where, "field 'shape': dimension ", i,
                                                     " must be an integer, got ", JsonTypeName(d)));
    }
    if (d.is_number_unsigned()) {
      uint64_t u = d.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "field 'shape': dimension ", i, " is too large (", u, ")"));
      }
      info->shape.push_back(static_cast<int64_t>(u));
    } else {
      int64_t v = d.get<int64_t>();
      if (v < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "field 'shape': dimension ", i, " is negative (", v, ")"));
      }
      info->shape.push_back(v);
    }
  }
  std::optional<uint64_t> numel = CheckedNumel(info->shape);
  if (!numel.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "field 'shape': element count of ",
                                                   ShapeToString(info->shape), " overflows"));
  }
  info->numel = *numel;
  return absl::OkStatus();
}

absl::Status ParseOffsets(const Json& offsets, const std::string& where, uint64_t data_bytes,
                          SafetensorsTensorInfo* info) {
  if (!offsets.is_array() || offsets.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "field 'data_offsets' must be an array [begin, end], got ",
        offsets.is_array() ? absl::StrCat("an array of ", offsets.size()) : JsonTypeName(offsets)));
  }
  uint64_t v[2];
  for (int i = 0; i < 2; ++i) {
    if (!offsets[i].is_number_unsigned()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "field 'data_offsets': ", i == 0 ? "begin" : "end",
          " must be a non-negative integer, got ",
          offsets[i].is_number_integer() ? "a negative integer" : JsonTypeName(offsets[i])));
    }
    v[i] = offsets[i].get<uint64_t>();
  }
  info->data_begin = v[0];
  info->data_end = v[1];
  if (v[0] > v[1]) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "field 'data_offsets': begin ", v[0], " is after end ", v[1]));
  }
  if (v[1] > data_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, "field 'data_offsets': end ", v[1],
                                                   " is beyond the data section (", data_bytes,
                                                   " bytes; file truncated?)"));
  }
  uint64_t expected;
  if (__builtin_mul_overflow(info->numel, DTypeSize(info->dtype), &expected)) {
    return absl::InvalidArgumentError(absl::StrCat(where, "field 'shape': byte size of ",
                                                   ShapeToString(info->shape), " overflows"));
  }
  if (v[1] - v[0] != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "field 'data_offsets': range [", v[0], ", ", v[1], ") holds ",
                     v[1] - v[0], " bytes but dtype ", Av(DTypeName(info->dtype)), " with shape ",
                     ShapeToString(info->shape), " needs ", expected));
  }
  return absl::OkStatus();
}

absl::StatusOr<SafetensorsTensorInfo> ParseTensorEntry(const std::string& name, const Json& entry,
                                                       const std::string& prefix,
                                                       uint64_t data_bytes) {
  const std::string where = absl::StrCat(prefix, ": tensor '", name, "': ");
  if (name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, ": a tensor has an empty name"));
  }
  if (!entry.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "entry must be an object, got ", JsonTypeName(entry)));
  }
  SafetensorsTensorInfo info;
  info.name = name;
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(field)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "missing field '", field, "'"));
    }
  }
  const Json& dtype = entry["dtype"];
  if (!dtype.is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "field 'dtype' must be a string, got ", JsonTypeName(dtype)));
  }
  std::optional<DType> parsed = DTypeFromName(dtype.get_ref<const std::string&>());
  if (!parsed.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(where, "field 'dtype': unknown dtype '",
                                                   dtype.get_ref<const std::string&>(), "'"));
  }
  info.dtype = *parsed;
  SIEVE_RETURN_IF_ERROR(ParseShape(entry["shape"], where, &info));
  SIEVE_RETURN_IF_ERROR(ParseOffsets(entry["data_offsets"], where, data_bytes, &info));
  return info;
}

// Non-empty byte ranges must be pairwise disjoint.
absl::Status CheckNoOverlap(const std::vector<SafetensorsTensorInfo>& tensors,
                            const std::string& prefix) {
  std::vector<const SafetensorsTensorInfo*> sorted;
  for (const auto& t : tensors) {
    if (t.data_end > t.data_begin) sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const auto* a, const auto* b) { return a->data_begin < b->data_begin; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    const SafetensorsTensorInfo& a = *sorted[i - 1];
    const SafetensorsTensorInfo& b = *sorted[i];
    if (b.data_begin < a.data_end) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, ": field 'data_offsets' of tensors '", a.name, "' [", a.data_begin, ", ",
          a.data_end, ") and '", b.name, "' [", b.data_begin, ", ", b.data_end, ") overlap"));
    }
  }
  return absl::OkStatus();
}

// Checks that `t` is self-consistent and `out_size` elements are expected; returns numel.
absl::StatusOr<uint64_t> CheckConvertible(const TensorView& t, size_t out_size,
                                          const char* target) {
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
    return absl::UnimplementedError(absl::StrCat("tensor '", t.name, "': cannot convert dtype ",
                                                 Av(DTypeName(t.dtype)), " to ", target,
                                                 " (supported: F32, F16, BF16)"));
  }
  std::optional<uint64_t> numel = CheckedNumel(t.shape);
  if (!numel.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", t.name, "': invalid shape ", ShapeToString(t.shape)));
  }
  uint64_t need = 0;
  if (__builtin_mul_overflow(*numel, DTypeSize(t.dtype), &need) || need != t.bytes.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", t.name, "': shape ", ShapeToString(t.shape), " of ",
                     Av(DTypeName(t.dtype)), " does not match its ", t.bytes.size(), " bytes"));
  }
  if (*numel != out_size) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': has ", *numel,
                                                   " elements but the ", target, " output holds ",
                                                   out_size));
  }
  return *numel;
}

uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace

std::string_view DTypeName(DType dtype) { return Entry(dtype).name; }

size_t DTypeSize(DType dtype) { return Entry(dtype).size; }

std::optional<DType> DTypeFromName(std::string_view name) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.name == name) return e.dtype;
  }
  return std::nullopt;
}

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::Span<const uint8_t> file_bytes,
                                                         std::string_view file_name) {
  const std::string prefix = file_name.empty()
                                 ? std::string("safetensors")
                                 : absl::StrCat("safetensors file '", Av(file_name), "'");
  const uint64_t size = file_bytes.size();
  if (size < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, ": ", size, " bytes is shorter than the 8-byte header length prefix"));
  }
  uint64_t n;
  std::memcpy(&n, file_bytes.data(), sizeof n);  // Little-endian host (static_assert above).
  if (n < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, ": header length ", n, " is too small (minimum 2)"));
  }
  if (n > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, ": header length ", n,
                                                   " exceeds the limit of ",
                                                   kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (n > size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, ": header length ", n, " exceeds the ",
                                                   size - 8, " bytes after the length prefix"));
  }
  std::string_view text(reinterpret_cast<const char*>(file_bytes.data()) + 8, n);
  SIEVE_ASSIGN_OR_RETURN(Json json, ParseJsonRejectingDuplicates(text, prefix));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, ": header must be a JSON object, got ", JsonTypeName(json)));
  }
  SafetensorsHeader header;
  header.header_bytes = n;
  header.data_offset = 8 + n;
  header.data_bytes = size - 8 - n;
  for (auto it = json.begin(); it != json.end(); ++it) {  // Sorted by key.
    if (it.key() == "__metadata__") {
      SIEVE_RETURN_IF_ERROR(ParseMetadata(it.value(), prefix, &header.metadata));
      continue;
    }
    SIEVE_ASSIGN_OR_RETURN(SafetensorsTensorInfo info,
                           ParseTensorEntry(it.key(), it.value(), prefix, header.data_bytes));
    header.tensors.push_back(std::move(info));
  }
  SIEVE_RETURN_IF_ERROR(CheckNoOverlap(header.tensors, prefix));
  return header;
}

int64_t TensorView::numel() const {
  std::optional<uint64_t> n = CheckedNumel(shape);
  return n.has_value() ? static_cast<int64_t>(*n) : -1;
}

TensorView MakeTensorView(const SafetensorsHeader& header, const SafetensorsTensorInfo& info,
                          absl::Span<const uint8_t> file_bytes) {
  TensorView view;
  view.name = info.name;
  view.dtype = info.dtype;
  view.shape = info.shape;
  view.bytes =
      file_bytes.subspan(header.data_offset + info.data_begin, info.data_end - info.data_begin);
  return view;
}

absl::Status CopyToFloat32(const TensorView& t, absl::Span<float> out) {
  SIEVE_ASSIGN_OR_RETURN(uint64_t n, CheckConvertible(t, out.size(), "F32"));
  const uint8_t* src = t.bytes.data();
  switch (t.dtype) {
    case DType::kF32:
      if (n > 0) std::memcpy(out.data(), src, n * sizeof(float));
      break;
    case DType::kF16:
      for (uint64_t i = 0; i < n; ++i) out[i] = kernels::F16ToFloat(LoadU16(src + 2 * i));
      break;
    default:  // kBF16; CheckConvertible rejected the rest.
      for (uint64_t i = 0; i < n; ++i) out[i] = kernels::Bf16ToFloat(LoadU16(src + 2 * i));
      break;
  }
  return absl::OkStatus();
}

absl::Status CopyToBf16(const TensorView& t, absl::Span<uint16_t> out) {
  SIEVE_ASSIGN_OR_RETURN(uint64_t n, CheckConvertible(t, out.size(), "BF16"));
  const uint8_t* src = t.bytes.data();
  switch (t.dtype) {
    case DType::kF32:
      for (uint64_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, src + 4 * i, sizeof f);
        out[i] = kernels::FloatToBf16(f);
      }
      break;
    case DType::kF16:
      for (uint64_t i = 0; i < n; ++i) {
        out[i] = kernels::FloatToBf16(kernels::F16ToFloat(LoadU16(src + 2 * i)));
      }
      break;
    default:  // kBF16.
      if (n > 0) std::memcpy(out.data(), src, n * sizeof(uint16_t));
      break;
  }
  return absl::OkStatus();
}

// ---- MappedFile -------------------------------------------------------------------------------

absl::StatusOr<MappedFile> MappedFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat("cannot open '", path, "'"));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return absl::ErrnoToStatus(err, absl::StrCat("cannot stat '", path, "'"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a regular file"));
  }
  if (st.st_size == 0) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is empty (0 bytes)"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // The mapping keeps the file alive.
  if (data == MAP_FAILED) {
    return absl::ErrnoToStatus(err, absl::StrCat("cannot mmap '", path, "'"));
  }
  return MappedFile(path, static_cast<const uint8_t*>(data), size);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)), data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    Reset();
    path_ = std::move(other.path_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

MappedFile::~MappedFile() { Reset(); }

void MappedFile::Reset() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

// ---- SafetensorsFile --------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  SIEVE_ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
  SIEVE_ASSIGN_OR_RETURN(SafetensorsHeader header, ParseSafetensorsHeader(file.bytes(), path));
  return std::unique_ptr<SafetensorsFile>(new SafetensorsFile(std::move(file), std::move(header)));
}

SafetensorsFile::SafetensorsFile(MappedFile file, SafetensorsHeader header)
    : file_(std::move(file)), header_(std::move(header)) {
  views_.reserve(header_.tensors.size());
  for (const SafetensorsTensorInfo& info : header_.tensors) {
    by_name_.emplace(info.name, views_.size());
    views_.push_back(MakeTensorView(header_, info, file_.bytes()));
  }
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = by_name_.find(Av(name));
  return it == by_name_.end() ? nullptr : &views_[it->second];
}

absl::StatusOr<TensorView> SafetensorsFile::Get(std::string_view name) const {
  const TensorView* view = Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", Av(name), "' not found in safetensors file '", path(), "'"));
  }
  return *view;
}

}  // namespace sieve::engine
