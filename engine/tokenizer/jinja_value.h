// The values a Jinja chat template computes with, with Python's semantics where templates can
// observe them (engine/tokenizer/jinja_template.h renders with these).
//
// A Value is undefined, none, a bool, an int (64-bit), a float (double), a string (UTF-8), a
// list, a dict (string keys, insertion order kept), a namespace (mutable attributes), a loop
// object (`loop.*`) or a callable (macro, global function, bound method). Lists and dicts are
// shared, as Python references are; templates cannot modify them (Jinja's immutable sandbox, the
// environment Hugging Face renders chat templates in), only namespaces.
//
// Printing follows Python's str(): None, True, 1.5, 1e+20, ['a', 1], {'k': 'v'}; ToJson follows
// Hugging Face's `tojson` filter (json.dumps with ensure_ascii=False, keys unsorted).
//
// Thread-safety: values are not synchronized; a render owns the values it creates.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_VALUE_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_VALUE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace sieve::engine::jinja {

class Value;
class Renderer;

using ValueList = std::vector<Value>;

// A dict (also a namespace's attributes): string keys in insertion order. Chat-template dicts
// are small (a message's role and content), so lookup is a linear scan.
struct ValueDict {
  std::vector<std::pair<std::string, Value>> items;

  // Returns the value of `key`, or nullptr.
  const Value* Find(std::string_view key) const;
  // Sets `key` to `value` (keeps its position when present, else appends).
  void Set(std::string_view key, Value value);
};

// Arguments of a call: positional, then keyword in call order.
struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

// A callable's body; `renderer` gives access to the render in progress (limits, output).
using Function = std::function<absl::StatusOr<Value>(Renderer& renderer, CallArgs& args)>;

// The state behind `loop`: the iterated items and the current position.
struct LoopInfo {
  std::shared_ptr<const ValueList> items;
  int64_t index0 = 0;
  int64_t depth0 = 0;
};

class Value {
 public:
  enum class Kind : uint8_t {
    kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace, kLoop, kCallable
  };

  // An undefined value; `name` says what was undefined (for error messages).
  Value() = default;
  static Value Undefined(std::string name);
  static Value None();
  static Value Bool(bool b);
  static Value Int(int64_t i);
  static Value Float(double f);
  static Value String(std::string s);
  static Value List(ValueList items);
  // A tuple: a list that prints as Python prints tuples, "(1, 2)" and "(1,)".
  static Value Tuple(ValueList items);
  static Value Dict(ValueDict dict);
  static Value Namespace(ValueDict attributes);
  static Value Loop(std::shared_ptr<LoopInfo> loop);
  static Value Callable(std::string name, Function fn);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_tuple() const { return kind_ == Kind::kList && tuple_; }

  bool bool_value() const { return b_; }
  int64_t int_value() const { return i_; }
  double float_value() const { return f_; }
  // The number as a double (ints and bools too).
  double AsDouble() const;
  // The string of a kString; the undefined name of a kUndefined; the name of a kCallable.
  const std::string& str() const { return s_; }
  const ValueList& list() const { return *list_; }
  const ValueDict& dict() const { return *dict_; }
  // A namespace's attributes, which `set ns.attr = ...` changes.
  ValueDict& namespace_attributes() const { return *dict_; }
  const LoopInfo& loop() const { return *loop_; }
  const Function& function() const { return *fn_; }
  const std::shared_ptr<const ValueList>& shared_list() const { return list_; }

  // Python's truthiness: undefined, none, false, 0, "", [] and {} are false.
  bool Truthy() const;
  // Python's str() of the value, as `{{ value }}` prints it (undefined prints nothing).
  std::string ToString() const;
  // Python's repr() (strings quoted), as str() of a list shows its items.
  std::string Repr() const;
  // Python's type name, for error messages ("str", "int", "list", "dict", "NoneType").
  std::string TypeName() const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool b_ = false;
  bool tuple_ = false;
  int64_t i_ = 0;
  double f_ = 0;
  std::string s_;
  std::shared_ptr<const ValueList> list_;
  std::shared_ptr<ValueDict> dict_;
  std::shared_ptr<LoopInfo> loop_;
  std::shared_ptr<const Function> fn_;
};

// Python's ==: numbers by value (True == 1), strings, lists and dicts by content, none == none,
// undefined == undefined; other kinds are unequal.
bool Equal(const Value& a, const Value& b);

// Python's <: numbers, strings (by code point, which is UTF-8 byte order) and lists; other kinds
// are a TypeError, returned as InvalidArgument.
absl::StatusOr<bool> Less(const Value& a, const Value& b);

// Python's repr() of a float (shortest round trip: 1.0, 0.1, 1e+20, 1e-05, inf, nan).
std::string FormatFloat(double f);

// Python's repr() of a string: single quotes unless the text has ' and no ", escapes.
std::string ReprString(std::string_view s);

// Hugging Face's tojson: json.dumps(value, ensure_ascii=False, indent=indent) (no indent: ", "
// and ": " separators; with an indent: "," and ": ", each level `indent` spaces deeper).
// Undefined values, callables and loops are not JSON: InvalidArgument.
absl::StatusOr<std::string> ToJson(const Value& value, std::optional<int> indent);

// Python's str.isspace() for one code point (the characters str.strip() removes).
bool IsPythonSpace(char32_t c);

// Decodes the UTF-8 code point at `*pos` (advancing it); an invalid byte decodes as itself.
char32_t NextCodePoint(std::string_view s, size_t* pos);

// Appends `c` to `out` as UTF-8.
void AppendUtf8(char32_t c, std::string* out);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_VALUE_H_
