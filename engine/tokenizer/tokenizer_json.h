// Small helpers for reading tokenizer.json / tokenizer_config.json with nlohmann::json without
// exceptions: every accessor checks the JSON type first and returns an InvalidArgument status
// whose message names the field path (e.g. "model.merges[3]").
//
// Internal to the tokenizer (engine/tokenizer.cc, engine/bpe_model.cc, engine/pretokenizer.cc).
#ifndef SIEVE_ENGINE_TOKENIZER_TOKENIZER_JSON_H_
#define SIEVE_ENGINE_TOKENIZER_TOKENIZER_JSON_H_

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace sieve::engine::tokenizer_json {

using Json = nlohmann::json;

// This Abseil is built with its own string_view type; converts for StrCat and map lookups.
inline absl::string_view AbslView(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}

// Returns "`parent`.`key`" (or `key` when `parent` is empty): the path used in messages.
inline std::string FieldPath(std::string_view parent, std::string_view key) {
  return parent.empty() ? std::string(key) : absl::StrCat(AbslView(parent), ".", AbslView(key));
}

// Returns "`parent`[`index`]".
inline std::string IndexPath(std::string_view parent, size_t index) {
  return absl::StrCat(AbslView(parent), "[", index, "]");
}

// Returns an InvalidArgument error "`path`: `what`".
inline absl::Status FieldError(std::string_view path, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer: ", AbslView(path), ": ", AbslView(what)));
}

// Returns the member `key` of object `obj`, or nullptr when it is absent or JSON null.
inline const Json* FindField(const Json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(std::string(key));
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

// Returns OK if `value` is an object, else an error naming `path`.
inline absl::Status ExpectObject(const Json& value, std::string_view path) {
  if (!value.is_object()) return FieldError(path, "expected an object");
  return absl::OkStatus();
}

// Returns the required member `key` of `obj` (absent or null is an error).
inline absl::StatusOr<const Json*> RequiredField(const Json& obj, std::string_view key,
                                                 std::string_view path) {
  const Json* v = FindField(obj, key);
  if (v == nullptr) return FieldError(FieldPath(path, key), "missing required field");
  return v;
}

// Returns the string member `key` of `obj`; absent or null is an error.
inline absl::StatusOr<std::string> RequiredString(const Json& obj, std::string_view key,
                                                  std::string_view path) {
  const Json* v = FindField(obj, key);
  if (v == nullptr) return FieldError(FieldPath(path, key), "missing required string");
  if (!v->is_string()) return FieldError(FieldPath(path, key), "expected a string");
  return v->get<std::string>();
}

// Returns the string member `key` of `obj`, or nullopt when it is absent or null.
inline absl::StatusOr<std::optional<std::string>> OptionalString(const Json& obj,
                                                                 std::string_view key,
                                                                 std::string_view path) {
  const Json* v = FindField(obj, key);
  if (v == nullptr) return std::optional<std::string>();
  if (!v->is_string()) return FieldError(FieldPath(path, key), "expected a string or null");
  return std::optional<std::string>(v->get<std::string>());
}

// Returns the boolean member `key` of `obj`, or `fallback` when it is absent or null.
inline absl::StatusOr<bool> OptionalBool(const Json& obj, std::string_view key, bool fallback,
                                         std::string_view path) {
  const Json* v = FindField(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return FieldError(FieldPath(path, key), "expected a boolean");
  return v->get<bool>();
}

// Returns `value` as a token id: an integer in [0, 2^31 - 1].
inline absl::StatusOr<int32_t> AsTokenId(const Json& value, std::string_view path) {
  if (value.is_number_unsigned()) {
    const uint64_t id = value.get<uint64_t>();
    if (id <= static_cast<uint64_t>(INT32_MAX)) return static_cast<int32_t>(id);
  } else if (value.is_number_integer()) {
    const int64_t id = value.get<int64_t>();
    if (id >= 0 && id <= INT32_MAX) return static_cast<int32_t>(id);
  } else {
    return FieldError(path, "expected an integer token id");
  }
  return FieldError(path, absl::StrCat("token id ", value.dump(), " is out of range"));
}

// Parses `text` as JSON without exceptions; `what` names the document in the error.
inline absl::StatusOr<Json> ParseJson(std::string_view text, std::string_view what) {
  Json parsed = Json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", AbslView(what), " is not valid JSON"));
  }
  return parsed;
}

}  // namespace sieve::engine::tokenizer_json

#endif  // SIEVE_ENGINE_TOKENIZER_TOKENIZER_JSON_H_
