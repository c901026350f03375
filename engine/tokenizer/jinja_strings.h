// Python's str behaviour for the Jinja renderer: characters (code points), strip / split /
// replace, ASCII case mapping, and the str methods templates call (engine/tokenizer/
// jinja_builtins.h lists them). Internal to the renderer.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_STRINGS_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_STRINGS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {

// Applies `fn` to each ASCII byte (upper / lower case; other bytes are kept).
std::string AsciiMap(std::string s, int (*fn)(int));
int ToUpper(int c);
int ToLower(int c);

// Python's str.title() and str.capitalize() on ASCII letters.
std::string Title(const std::string& s);
std::string Capitalize(const std::string& s);

// Python's strip / lstrip / rstrip: `chars` (a string value) or, when null, whitespace.
std::string Strip(const std::string& s, const Value* chars, bool left, bool right);

// Python's str.replace (count < 0: all).
std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                    int64_t count);

// True if `name` is a str method StringMethod implements.
bool IsStringMethod(std::string_view name);

// Calls str method `name` on `s`.
absl::StatusOr<Value> StringMethod(const std::string& s, const std::string& name,
                                   CallArgs& args);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_STRINGS_H_
