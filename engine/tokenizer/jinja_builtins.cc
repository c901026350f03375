#include "engine/tokenizer/jinja_builtins.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/jinja_args.h"
#include "engine/tokenizer/jinja_render.h"
#include "engine/tokenizer/jinja_strings.h"
#include "engine/tokenizer/jinja_template.h"

namespace sieve::engine::jinja {

absl::StatusOr<ValueList> Iterate(const Value& value) {
  switch (value.kind()) {
    case Value::Kind::kList:
      return value.list();
    case Value::Kind::kDict: {
      ValueList keys;
      for (const auto& [key, v] : value.dict().items) keys.push_back(Value::String(key));
      return keys;
    }
    case Value::Kind::kString:
    {
      ValueList chars;
      for (std::string& c : Characters(value.str())) chars.push_back(Value::String(std::move(c)));
      return chars;
    }
    case Value::Kind::kUndefined:
      return ValueList{};
    default:
      return Error(absl::StrCat("'", value.TypeName(), "' object is not iterable"));
  }
}

absl::StatusOr<int64_t> Length(const Value& value) {
  switch (value.kind()) {
    case Value::Kind::kString:
      return static_cast<int64_t>(Characters(value.str()).size());
    case Value::Kind::kList:
      return static_cast<int64_t>(value.list().size());
    case Value::Kind::kDict:
      return static_cast<int64_t>(value.dict().items.size());
    case Value::Kind::kUndefined:
      return 0;
    default:
      return Error(absl::StrCat("object of type '", value.TypeName(), "' has no len()"));
  }
}


namespace {

Value BoundMethod(const Value& self, std::string name) {
  return Value::Callable(name, [self, name](Renderer&, CallArgs& args) -> absl::StatusOr<Value> {
    if (self.is_string()) return StringMethod(self.str(), name, args);
    if (self.is_dict()) {
      const ValueDict& d = self.dict();
      if (name == "get") {
        const Value* key = Arg(args, 0, "key");
        if (key == nullptr) return Error("get() takes at least 1 argument");
        const Value* v = key->is_string() ? d.Find(key->str()) : nullptr;
        if (v != nullptr) return *v;
        const Value* fallback = Arg(args, 1, "default");
        return fallback != nullptr ? *fallback : Value::None();
      }
      ValueList out;
      for (const auto& [k, v] : d.items) {
        if (name == "keys") out.push_back(Value::String(k));
        if (name == "values") out.push_back(v);
        if (name == "items") out.push_back(Value::Tuple({Value::String(k), v}));
      }
      return Value::List(std::move(out));
    }
    // List methods.
    const Value* x = Arg(args, 0, "value");
    if (x == nullptr) return Error(absl::StrCat(name, "() takes exactly one argument"));
    int64_t count = 0;
    for (size_t i = 0; i < self.list().size(); ++i) {
      if (!Equal(self.list()[i], *x)) continue;
      if (name == "index") return Value::Int(static_cast<int64_t>(i));
      ++count;
    }
    if (name == "index") return Error(absl::StrCat(x->Repr(), " is not in list"));
    return Value::Int(count);
  });
}

absl::StatusOr<Value> LoopAttr(const Value& obj, std::string_view name) {
  const LoopInfo& loop = obj.loop();
  const int64_t n = static_cast<int64_t>(loop.items->size());
  const int64_t i = loop.index0;
  if (name == "index") return Value::Int(i + 1);
  if (name == "index0") return Value::Int(i);
  if (name == "revindex") return Value::Int(n - i);
  if (name == "revindex0") return Value::Int(n - i - 1);
  if (name == "first") return Value::Bool(i == 0);
  if (name == "last") return Value::Bool(i == n - 1);
  if (name == "length") return Value::Int(n);
  if (name == "depth") return Value::Int(1);
  if (name == "depth0") return Value::Int(0);
  if (name == "previtem") {
    return i > 0 ? (*loop.items)[i - 1] : Value::Undefined("there is no previous item");
  }
  if (name == "nextitem") {
    return i + 1 < n ? (*loop.items)[i + 1] : Value::Undefined("there is no next item");
  }
  if (name == "cycle") {
    const std::shared_ptr<const ValueList> items = loop.items;
    return Value::Callable("cycle", [i](Renderer&, CallArgs& args) -> absl::StatusOr<Value> {
      if (args.positional.empty()) return Error("loop.cycle() needs at least one argument");
      return args.positional[static_cast<size_t>(i) % args.positional.size()];
    });
  }
  return Value::Undefined(absl::StrCat("'LoopContext' has no attribute '",
                                       absl::string_view(name.data(), name.size()), "'"));
}

}  // namespace

absl::StatusOr<Value> GetAttr(const Value& obj, std::string_view name) {
  const std::string key(name);
  switch (obj.kind()) {
    case Value::Kind::kUndefined:
      return UndefinedError(obj);
    case Value::Kind::kDict:
      if (name == "items" || name == "keys" || name == "values" || name == "get") {
        return BoundMethod(obj, key);
      }
      if (const Value* v = obj.dict().Find(name)) return *v;
      return Value::Undefined(absl::StrCat("'dict object' has no attribute '", key, "'"));
    case Value::Kind::kString:
      if (IsStringMethod(name)) return BoundMethod(obj, key);
      break;
    case Value::Kind::kList:
      if (name == "index" || name == "count") return BoundMethod(obj, key);
      break;
    case Value::Kind::kNamespace:
      if (const Value* v = obj.namespace_attributes().Find(name)) return *v;
      break;
    case Value::Kind::kLoop:
      return LoopAttr(obj, name);
    default:
      break;
  }
  return Value::Undefined(absl::StrCat("'", obj.TypeName(), " object' has no attribute '", key,
                                       "'"));
}

absl::StatusOr<Value> GetItem(const Value& obj, const Value& key) {
  if (obj.is_undefined()) return UndefinedError(obj);
  const bool int_key = key.kind() == Value::Kind::kInt || key.kind() == Value::Kind::kBool;
  if (int_key && (obj.is_list() || obj.is_string())) {
    std::vector<std::string> chars;
    if (obj.is_string()) chars = Characters(obj.str());
    const int64_t n = obj.is_list() ? static_cast<int64_t>(obj.list().size())
                                    : static_cast<int64_t>(chars.size());
    int64_t i = key.int_value();
    if (i < 0) i += n;
    if (i < 0 || i >= n) {
      return Value::Undefined(
          absl::StrCat(obj.TypeName(), " object has no element ", key.int_value()));
    }
    if (obj.is_list()) return obj.list()[static_cast<size_t>(i)];
    return Value::String(chars[static_cast<size_t>(i)]);
  }
  if (obj.is_dict() && key.is_string()) {
    if (const Value* v = obj.dict().Find(key.str())) return *v;
  }
  if (key.is_string()) return GetAttr(obj, key.str());
  return Value::Undefined(
      absl::StrCat("'", obj.TypeName(), " object' has no element ", key.Repr()));
}

absl::StatusOr<Value> GetSlice(const Value& obj, const Value& start, const Value& stop,
                               const Value& step) {
  if (obj.is_undefined()) return UndefinedError(obj);
  if (!obj.is_list() && !obj.is_string()) {
    return Error(absl::StrCat("'", obj.TypeName(), "' object is not subscriptable"));
  }
  const auto bound = [](const Value& v) -> absl::StatusOr<std::optional<int64_t>> {
    if (v.is_none() || v.is_undefined()) return std::optional<int64_t>();
    if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool) {
      return Error("slice indices must be integers or None");
    }
    return std::optional<int64_t>(v.int_value());
  };
  std::vector<std::string> chars;
  if (obj.is_string()) chars = Characters(obj.str());
  const int64_t n = obj.is_list() ? static_cast<int64_t>(obj.list().size())
                                  : static_cast<int64_t>(chars.size());
  SIEVE_ASSIGN_OR_RETURN(std::optional<int64_t> a, bound(start));
  SIEVE_ASSIGN_OR_RETURN(std::optional<int64_t> b, bound(stop));
  SIEVE_ASSIGN_OR_RETURN(std::optional<int64_t> c, bound(step));
  const int64_t st = c.value_or(1);
  if (st == 0) return Error("slice step cannot be zero");
  // Python's PySlice_AdjustIndices.
  const auto adjust = [&](std::optional<int64_t> v, int64_t def) {
    if (!v.has_value()) return def;
    int64_t x = *v;
    if (x < 0) {
      x += n;
      if (x < 0) x = st < 0 ? -1 : 0;
    } else if (x >= n) {
      x = st < 0 ? n - 1 : n;
    }
    return x;
  };
  const int64_t from = adjust(a, st < 0 ? n - 1 : 0);
  const int64_t to = adjust(b, st < 0 ? -1 : n);
  ValueList items;
  std::string text;
  for (int64_t i = from; st > 0 ? i < to : i > to; i += st) {
    if (obj.is_list()) {
      items.push_back(obj.list()[static_cast<size_t>(i)]);
    } else {
      text += chars[static_cast<size_t>(i)];
    }
  }
  return obj.is_list() ? Value::List(std::move(items)) : Value::String(std::move(text));
}

bool IsTest(std::string_view name) {
  static constexpr std::string_view kNames[] = {
      "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even",
      "false", "filter", "float", "ge", "gt", "in", "integer", "iterable", "le", "lower", "lt",
      "mapping", "ne", "none", "number", "odd", "sameas", "sequence", "string", "test", "true",
      "undefined", "upper", "==", "!=", "<", "<=", ">", ">="};
  return std::find(std::begin(kNames), std::end(kNames), name) != std::end(kNames);
}

absl::StatusOr<bool> ApplyTest(Renderer& r, std::string_view name, const Value& v,
                               CallArgs& args) {
  using Kind = Value::Kind;
  const std::string n(name);
  const Value* other = Arg(args, 0, "other");
  const auto need_other = [&]() -> absl::Status {
    if (other == nullptr) return Error(absl::StrCat("test '", n, "' needs an argument"));
    return absl::OkStatus();
  };
  if (n == "defined") return !v.is_undefined();
  if (n == "undefined") return v.is_undefined();
  if (n == "none") return v.is_none();
  if (n == "boolean") return v.kind() == Kind::kBool;
  if (n == "true") return v.kind() == Kind::kBool && v.bool_value();
  if (n == "false") return v.kind() == Kind::kBool && !v.bool_value();
  if (n == "integer") return v.kind() == Kind::kInt;
  if (n == "float") return v.kind() == Kind::kFloat;
  if (n == "number") return v.is_number() || v.kind() == Kind::kBool;
  if (n == "string") return v.is_string();
  if (n == "mapping") return v.is_dict();
  if (n == "iterable") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
  if (n == "sequence") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
  if (n == "callable") return v.kind() == Kind::kCallable;
  if (n == "escaped") return false;
  if (n == "lower" || n == "upper") {
    if (!v.is_string()) return false;
    CallArgs none;
    SIEVE_ASSIGN_OR_RETURN(Value is, StringMethod(v.str(), "is" + n, none));
    return is.bool_value();
  }
  if (n == "filter" || n == "test") return v.is_string() && (n == "filter" ? IsFilter(v.str())
                                                                         : IsTest(v.str()));
  if (n == "even" || n == "odd" || n == "divisibleby") {
    if (v.kind() != Kind::kInt && v.kind() != Kind::kBool) {
      return Error(absl::StrCat("test '", n, "' needs an integer"));
    }
    if (n == "divisibleby") {
      SIEVE_RETURN_IF_ERROR(need_other());
      if (other->kind() != Kind::kInt || other->int_value() == 0) {
        return Error("divisibleby needs a non-zero integer");
      }
      return v.int_value() % other->int_value() == 0;
    }
    return (v.int_value() % 2 == 0) == (n == "even");
  }
  SIEVE_RETURN_IF_ERROR(need_other());
  if (n == "eq" || n == "equalto" || n == "==") return Equal(v, *other);
  if (n == "ne" || n == "!=") return !Equal(v, *other);
  if (n == "sameas") {
    if (v.kind() != other->kind()) return false;
    if (v.is_none() || v.kind() == Kind::kBool) return Equal(v, *other);
    if (v.is_list()) return &v.list() == &other->list();
    if (v.is_dict() || v.kind() == Kind::kNamespace) {
      return &v.namespace_attributes() == &other->namespace_attributes();
    }
    return false;
  }
  if (n == "in") {
    CallArgs none;
    if (other->is_string()) {
      if (!v.is_string()) return Error("'in <string>' requires string as left operand");
      return other->str().find(v.str()) != std::string::npos;
    }
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(*other));
    for (const Value& item : items) {
      if (Equal(item, v)) return true;
    }
    return false;
  }
  if (n == "lt" || n == "<") return Less(v, *other);
  if (n == "gt" || n == ">") return Less(*other, v);
  if (n == "le" || n == "<=") {
    SIEVE_ASSIGN_OR_RETURN(bool lt, Less(*other, v));
    return !lt;
  }
  if (n == "ge" || n == ">=") {
    SIEVE_ASSIGN_OR_RETURN(bool lt, Less(v, *other));
    return !lt;
  }
  (void)r;
  return Error(absl::StrCat("no test named '", n, "'"));
}

ValueDict GlobalFunctions() {
  ValueDict g;
  g.Set("raise_exception",
        Value::Callable("raise_exception", [](Renderer&, CallArgs& args) -> absl::StatusOr<Value> {
          const Value* msg = Arg(args, 0, "message");
          absl::Status s = absl::InvalidArgumentError(msg != nullptr ? msg->ToString() : "");
          s.SetPayload(kRaisedPayload, absl::Cord("1"));
          return s;
        }));
  g.Set("namespace",
        Value::Callable("namespace", [](Renderer&, CallArgs& args) -> absl::StatusOr<Value> {
          ValueDict attrs;
          for (const Value& p : args.positional) {
            if (!p.is_dict()) return Error("namespace() takes a dict or keyword arguments");
            for (const auto& [k, v] : p.dict().items) attrs.Set(k, v);
          }
          for (const auto& [k, v] : args.keyword) attrs.Set(k, v);
          return Value::Namespace(std::move(attrs));
        }));
  g.Set("dict", Value::Callable("dict", [](Renderer&, CallArgs& args) -> absl::StatusOr<Value> {
          ValueDict d;
          for (const Value& p : args.positional) {
            if (!p.is_dict()) return Error("dict() takes a dict or keyword arguments");
            for (const auto& [k, v] : p.dict().items) d.Set(k, v);
          }
          for (const auto& [k, v] : args.keyword) d.Set(k, v);
          return Value::Dict(std::move(d));
        }));
  g.Set("range", Value::Callable("range", [](Renderer&, CallArgs& args) -> absl::StatusOr<Value> {
          std::vector<int64_t> p;
          for (const Value& v : args.positional) {
            if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool) {
              return Error("range() arguments must be integers");
            }
            p.push_back(v.int_value());
          }
          if (p.empty() || p.size() > 3) return Error("range() takes 1 to 3 arguments");
          const int64_t start = p.size() == 1 ? 0 : p[0];
          const int64_t stop = p.size() == 1 ? p[0] : p[1];
          const int64_t step = p.size() == 3 ? p[2] : 1;
          if (step == 0) return Error("range() arg 3 must not be zero");
          constexpr int64_t kMaxRange = 100000;  // As Jinja's sandbox (MAX_RANGE).
          ValueList out;
          for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
            if (static_cast<int64_t>(out.size()) >= kMaxRange) {
              return Error("range() too big: more than 100000 items");
            }
            out.push_back(Value::Int(i));
          }
          return Value::List(std::move(out));
        }));
  g.Set("strftime_now",
        Value::Callable("strftime_now", [](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
          const Value* fmt = Arg(args, 0, "format");
          if (fmt == nullptr || !fmt->is_string()) return Error("strftime_now() needs a format");
          return Value::String(absl::FormatTime(fmt->str(), r.now(), absl::UTCTimeZone()));
        }));
  return g;
}

}  // namespace sieve::engine::jinja
