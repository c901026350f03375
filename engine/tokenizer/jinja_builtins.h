// The filters, tests, methods and attribute / item access of the Jinja renderer, with Python's
// and Jinja2's semantics (engine/tokenizer/jinja_template.h). Internal to the renderer.
//
// Filters: abs, capitalize, count, d, default, first, float, indent, int, items, join, last,
//   length, list, lower, map, max, min, reject, rejectattr, replace, reverse, round, safe,
//   select, selectattr, sort, string, sum, title, tojson, trim, unique, upper.
// Tests: boolean, callable, defined, divisibleby, eq, equalto, escaped, even, false, filter,
//   float, ge, gt, in, integer, iterable, le, lower, lt, mapping, ne, none, number, odd, sameas,
//   sequence, string, test, true, undefined, upper, ==, !=, <, <=, >, >=.
// Methods: str: startswith, endswith, strip, lstrip, rstrip, split, rsplit, splitlines, upper,
//   lower, title, capitalize, replace, find, rfind, count, join, isdigit, isalpha, isalnum,
//   isspace, islower, isupper; dict: items, keys, values, get; list: index, count.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_BUILTINS_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_BUILTINS_H_

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {

// True if `name` is a filter / test this renderer implements.
bool IsFilter(std::string_view name);
bool IsTest(std::string_view name);

// Applies filter `name` to `operand` with `args`. Errors are InvalidArgument without a line.
absl::StatusOr<Value> ApplyFilter(Renderer& renderer, std::string_view name, const Value& operand,
                                  CallArgs& args);

// Applies test `name` to `operand` with `args`.
absl::StatusOr<bool> ApplyTest(Renderer& renderer, std::string_view name, const Value& operand,
                               CallArgs& args);

// `obj.name` as Jinja's sandbox resolves it: a dict's methods (items, keys, values, get) else its
// key; a string's or list's methods; a namespace's or loop's attributes; else undefined. The
// attribute of an undefined value is an error.
absl::StatusOr<Value> GetAttr(const Value& obj, std::string_view name);

// `obj[key]`: list and string indices (negative from the end), dict keys, falling back to
// GetAttr for string keys; undefined when missing. An undefined `obj` is an error.
absl::StatusOr<Value> GetItem(const Value& obj, const Value& key);

// `obj[start:stop:step]` of a list or string, Python's rules (bounds may be none/undefined).
absl::StatusOr<Value> GetSlice(const Value& obj, const Value& start, const Value& stop,
                               const Value& step);

// The items a for loop visits: a list's items, a dict's keys, a string's characters, nothing
// for undefined. Other values are an error.
absl::StatusOr<ValueList> Iterate(const Value& value);

// The length of a string (in characters), list or dict; undefined is 0; else an error.
absl::StatusOr<int64_t> Length(const Value& value);

// The global functions: namespace, range, dict, raise_exception, strftime_now.
ValueDict GlobalFunctions();

// Splits UTF-8 `s` into its characters (code points; invalid bytes one each).
std::vector<std::string> Characters(std::string_view s);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_BUILTINS_H_
