// Small helpers shared by the Jinja builtins (engine/tokenizer/jinja_builtins.cc,
// jinja_filters.cc, jinja_strings.cc): error statuses and call-argument lookup. Internal.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_ARGS_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_ARGS_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {

// InvalidArgument with message `what`.
inline absl::Status Error(std::string_view what) {
  return absl::InvalidArgumentError(absl::string_view(what.data(), what.size()));
}

// The error of using an undefined value (its recorded description).
inline absl::Status UndefinedError(const Value& v) {
  return Error(v.str().empty() ? "an undefined value was used" : v.str());
}

// Argument `index` (positional) or `name` (keyword) of a call, or nullptr.
inline const Value* Arg(const CallArgs& args, size_t index, std::string_view name) {
  if (index < args.positional.size()) return &args.positional[index];
  for (const auto& [key, value] : args.keyword) {
    if (key == name) return &value;
  }
  return nullptr;
}

// True if the argument is given and truthy.
inline bool ArgTruthy(const CallArgs& args, size_t index, std::string_view name) {
  const Value* v = Arg(args, index, name);
  return v != nullptr && v->Truthy();
}

// The argument as a string; InvalidArgument naming `what` and `name` when it is not one.
inline absl::StatusOr<std::string> StringArg(const CallArgs& args, size_t index, std::string_view name,
                                      std::string_view what) {
  const Value* v = Arg(args, index, name);
  if (v == nullptr || !v->is_string()) {
    return Error(absl::StrCat(absl::string_view(what.data(), what.size()), ": argument '",
                              absl::string_view(name.data(), name.size()),
                              "' must be a string"));
  }
  return v->str();
}

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_ARGS_H_
