#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/jinja_args.h"
#include "engine/tokenizer/jinja_builtins.h"
#include "engine/tokenizer/jinja_render.h"
#include "engine/tokenizer/jinja_strings.h"

namespace sieve::engine::jinja {
namespace {

// Follows a dotted attribute path ("function.name", "0") as Jinja's attrgetter does.
absl::StatusOr<Value> AttrPath(const Value& item, const std::string& path) {
  Value v = item;
  for (absl::string_view part : absl::StrSplit(path, '.')) {
    std::string key(part);
    char* end = nullptr;
    const long long index = std::strtoll(key.c_str(), &end, 10);
    if (!key.empty() && end != nullptr && *end == '\0') {
      SIEVE_ASSIGN_OR_RETURN(v, GetItem(v, Value::Int(index)));
    } else {
      SIEVE_ASSIGN_OR_RETURN(v, GetItem(v, Value::String(key)));
    }
  }
  return v;
}


// select / reject / selectattr / rejectattr.
absl::StatusOr<Value> SelectFilter(Renderer& r, const Value& seq, CallArgs& args, bool by_attr,
                                   bool keep) {
  SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(seq));
  size_t next = 0;
  std::string attr;
  if (by_attr) {
    if (args.positional.empty() || !args.positional[0].is_string()) {
      return Error("selectattr/rejectattr: the attribute name must be a string");
    }
    attr = args.positional[0].str();
    next = 1;
  }
  std::string test;
  if (next < args.positional.size()) {
    if (!args.positional[next].is_string()) return Error("select: the test name must be a string");
    test = args.positional[next].str();
    if (!IsTest(test)) return Error(absl::StrCat("no test named '", test, "'"));
    ++next;
  }
  CallArgs test_args;
  test_args.positional.assign(args.positional.begin() + static_cast<std::ptrdiff_t>(next),
                              args.positional.end());
  ValueList out;
  for (const Value& item : items) {
    Value probe = item;
    if (by_attr) {
      SIEVE_ASSIGN_OR_RETURN(probe, AttrPath(item, attr));
    }
    bool pass = probe.Truthy();
    if (!test.empty()) {
      CallArgs a = test_args;
      SIEVE_ASSIGN_OR_RETURN(pass, ApplyTest(r, test, probe, a));
    }
    if (pass == keep) out.push_back(item);
  }
  return Value::List(std::move(out));
}

absl::StatusOr<Value> MapFilter(Renderer& r, const Value& seq, CallArgs& args) {
  SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(seq));
  ValueList out;
  const Value* attribute = Arg(args, 99, "attribute");
  if (attribute != nullptr) {
    if (!attribute->is_string()) return Error("map: attribute must be a string");
    const Value* fallback = Arg(args, 99, "default");
    for (const Value& item : items) {
      SIEVE_ASSIGN_OR_RETURN(Value v, AttrPath(item, attribute->str()));
      out.push_back(v.is_undefined() && fallback != nullptr ? *fallback : v);
    }
    return Value::List(std::move(out));
  }
  if (args.positional.empty() || !args.positional[0].is_string()) {
    return Error("map: give a filter name or attribute=");
  }
  const std::string filter = args.positional[0].str();
  if (!IsFilter(filter)) return Error(absl::StrCat("no filter named '", filter, "'"));
  for (const Value& item : items) {
    CallArgs a;
    a.positional.assign(args.positional.begin() + 1, args.positional.end());
    SIEVE_ASSIGN_OR_RETURN(Value v, ApplyFilter(r, filter, item, a));
    out.push_back(std::move(v));
  }
  return Value::List(std::move(out));
}

// The key sort / unique / min / max compare items by.
absl::StatusOr<Value> SortKey(const Value& item, const CallArgs& args, size_t case_index) {
  Value key = item;
  if (const Value* attr = Arg(args, 99, "attribute"); attr != nullptr && attr->is_string()) {
    SIEVE_ASSIGN_OR_RETURN(key, AttrPath(item, attr->str()));
  }
  if (key.is_string() && !ArgTruthy(args, case_index, "case_sensitive")) {
    key = Value::String(AsciiMap(key.str(), ToLower));
  }
  return key;
}

absl::StatusOr<Value> SortFilter(const Value& seq, const CallArgs& args) {
  SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(seq));
  std::vector<std::pair<Value, Value>> keyed;
  for (Value& item : items) {
    SIEVE_ASSIGN_OR_RETURN(Value key, SortKey(item, args, 1));
    keyed.emplace_back(std::move(key), std::move(item));
  }
  absl::Status error;
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& a, const auto& b) {
    absl::StatusOr<bool> lt = Less(a.first, b.first);
    if (!lt.ok()) error = lt.status();
    return lt.ok() && *lt;
  });
  SIEVE_RETURN_IF_ERROR(error);
  if (ArgTruthy(args, 0, "reverse")) std::reverse(keyed.begin(), keyed.end());
  ValueList out;
  for (auto& [key, item] : keyed) out.push_back(std::move(item));
  return Value::List(std::move(out));
}

absl::StatusOr<Value> Indent(const Value& v, const CallArgs& args) {
  std::string indention = "    ";
  if (const Value* w = Arg(args, 0, "width")) {
    if (w->is_string()) {
      indention = w->str();
    } else if (w->kind() == Value::Kind::kInt) {
      indention = std::string(static_cast<size_t>(std::clamp<int64_t>(w->int_value(), 0, 4096)),
                              ' ');
    }
  }
  const std::string s = v.ToString() + "\n";
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < s.size()) {
    size_t at = s.find('\n', start);
    lines.push_back(s.substr(start, at - start));
    start = at + 1;
  }
  std::string out;
  if (ArgTruthy(args, 2, "blank")) {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (i > 0) absl::StrAppend(&out, "\n", indention);
      out += lines[i];
    }
  } else {
    out = lines.empty() ? "" : lines[0];
    for (size_t i = 1; i < lines.size(); ++i) {
      out.push_back('\n');
      if (!lines[i].empty()) absl::StrAppend(&out, indention, lines[i]);
    }
  }
  if (ArgTruthy(args, 1, "first")) out.insert(0, indention);
  return Value::String(std::move(out));
}

absl::StatusOr<Value> ToInt(const Value& v, const CallArgs& args) {
  const Value* fallback = Arg(args, 0, "default");
  const Value def = fallback != nullptr ? *fallback : Value::Int(0);
  switch (v.kind()) {
    case Value::Kind::kInt:
    case Value::Kind::kBool:
      return Value::Int(v.int_value());
    case Value::Kind::kFloat:
      if (!std::isfinite(v.float_value())) return def;
      return Value::Int(static_cast<int64_t>(v.float_value()));
    case Value::Kind::kString: {
      const std::string s = Strip(v.str(), nullptr, true, true);
      char* end = nullptr;
      const long long i = std::strtoll(s.c_str(), &end, 10);
      if (!s.empty() && *end == '\0') return Value::Int(i);
      const double f = std::strtod(s.c_str(), &end);
      if (!s.empty() && *end == '\0' && std::isfinite(f)) return Value::Int(static_cast<int64_t>(f));
      return def;
    }
    default:
      return def;
  }
}

absl::StatusOr<Value> ToFloat(const Value& v, const CallArgs& args) {
  const Value* fallback = Arg(args, 0, "default");
  const Value def = fallback != nullptr ? *fallback : Value::Float(0);
  if (v.is_number() || v.kind() == Value::Kind::kBool) return Value::Float(v.AsDouble());
  if (v.is_string()) {
    const std::string s = Strip(v.str(), nullptr, true, true);
    char* end = nullptr;
    const double f = std::strtod(s.c_str(), &end);
    if (!s.empty() && *end == '\0') return Value::Float(f);
  }
  return def;
}

}  // namespace

bool IsFilter(std::string_view name) {
  static constexpr std::string_view kNames[] = {
      "abs", "capitalize", "count", "d", "default", "first", "float", "indent", "int",
      "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
      "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr", "sort",
      "string", "sum", "title", "tojson", "trim", "unique", "upper"};
  return std::find(std::begin(kNames), std::end(kNames), name) != std::end(kNames);
}

absl::StatusOr<Value> ApplyFilter(Renderer& r, std::string_view name, const Value& v,
                                  CallArgs& args) {
  const std::string n(name);
  if (n == "length" || n == "count") {
    SIEVE_ASSIGN_OR_RETURN(int64_t len, Length(v));
    return Value::Int(len);
  }
  if (n == "default" || n == "d") {
    const bool use = v.is_undefined() || (ArgTruthy(args, 1, "boolean") && !v.Truthy());
    if (!use) return v;
    const Value* fallback = Arg(args, 0, "default_value");
    return fallback != nullptr ? *fallback : Value::String("");
  }
  if (n == "trim") return Value::String(Strip(v.ToString(), Arg(args, 0, "chars"), true, true));
  if (n == "upper") return Value::String(AsciiMap(v.ToString(), ToUpper));
  if (n == "lower") return Value::String(AsciiMap(v.ToString(), ToLower));
  if (n == "title") return Value::String(Title(v.ToString()));
  if (n == "capitalize") return Value::String(Capitalize(v.ToString()));
  if (n == "string" || n == "safe") return v.is_string() ? v : Value::String(v.ToString());
  if (n == "tojson") {
    std::optional<int> indent;
    if (const Value* i = Arg(args, 0, "indent"); i != nullptr && !i->is_none()) {
      if (i->kind() != Value::Kind::kInt || i->int_value() < 0 || i->int_value() > 64) {
        return Error("tojson: indent must be an integer in [0, 64]");
      }
      indent = static_cast<int>(i->int_value());
    }
    SIEVE_ASSIGN_OR_RETURN(std::string json, ToJson(v, indent));
    SIEVE_RETURN_IF_ERROR(r.CheckSize(json.size()));
    return Value::String(std::move(json));
  }
  if (n == "first" || n == "last") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    if (items.empty()) return Value::Undefined(absl::StrCat("no ", n, " item, sequence was empty"));
    return n == "first" ? items.front() : items.back();
  }
  if (n == "join") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    const Value* sep = Arg(args, 0, "d");
    const Value* attr = Arg(args, 1, "attribute");
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (i > 0 && sep != nullptr) out += sep->ToString();
      Value item = items[i];
      if (attr != nullptr && attr->is_string()) {
        SIEVE_ASSIGN_OR_RETURN(item, AttrPath(item, attr->str()));
      }
      out += item.ToString();
      SIEVE_RETURN_IF_ERROR(r.CheckSize(out.size()));
    }
    return Value::String(std::move(out));
  }
  if (n == "replace") {
    SIEVE_ASSIGN_OR_RETURN(std::string from, StringArg(args, 0, "old", "replace"));
    SIEVE_ASSIGN_OR_RETURN(std::string to, StringArg(args, 1, "new", "replace"));
    const Value* count = Arg(args, 2, "count");
    std::string out = Replace(v.ToString(), from, to,
                              count != nullptr && !count->is_none() ? count->int_value() : -1);
    SIEVE_RETURN_IF_ERROR(r.CheckSize(out.size()));
    return Value::String(std::move(out));
  }
  if (n == "items") {
    if (v.is_undefined()) return Value::List({});
    if (!v.is_dict()) return Error(absl::StrCat("items: a ", v.TypeName(), " is not a mapping"));
    CallArgs none;
    SIEVE_ASSIGN_OR_RETURN(Value items, GetAttr(v, "items"));
    return items.function()(r, none);
  }
  if (n == "list") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    return Value::List(std::move(items));
  }
  if (n == "reverse") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    std::reverse(items.begin(), items.end());
    if (!v.is_string()) return Value::List(std::move(items));
    std::string out;
    for (const Value& c : items) out += c.str();
    return Value::String(std::move(out));
  }
  if (n == "select" || n == "reject") return SelectFilter(r, v, args, false, n == "select");
  if (n == "selectattr" || n == "rejectattr") {
    return SelectFilter(r, v, args, true, n == "selectattr");
  }
  if (n == "map") return MapFilter(r, v, args);
  if (n == "int") return ToInt(v, args);
  if (n == "float") return ToFloat(v, args);
  if (n == "abs") {
    if (v.kind() == Value::Kind::kFloat) return Value::Float(std::fabs(v.float_value()));
    if (v.kind() == Value::Kind::kInt || v.kind() == Value::Kind::kBool) {
      return Value::Int(v.int_value() < 0 ? -v.int_value() : v.int_value());
    }
    return Error(absl::StrCat("bad operand type for abs(): '", v.TypeName(), "'"));
  }
  if (n == "round") {
    if (!v.is_number() && v.kind() != Value::Kind::kBool) return Error("round: not a number");
    const Value* p = Arg(args, 0, "precision");
    const int64_t precision = p != nullptr ? p->int_value() : 0;
    const double scale = std::pow(10.0, static_cast<double>(precision));
    const Value* method = Arg(args, 1, "method");
    const std::string how = method != nullptr && method->is_string() ? method->str() : "common";
    const double x = v.AsDouble() * scale;
    const double y = how == "ceil" ? std::ceil(x) : how == "floor" ? std::floor(x)
                                                                  : std::nearbyint(x);
    return Value::Float(y / scale);
  }
  if (n == "sort") return SortFilter(v, args);
  if (n == "unique") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    ValueList out, seen;
    for (const Value& item : items) {
      SIEVE_ASSIGN_OR_RETURN(Value key, SortKey(item, args, 0));
      bool dup = false;
      for (const Value& s : seen) dup = dup || Equal(s, key);
      if (dup) continue;
      seen.push_back(key);
      out.push_back(item);
    }
    return Value::List(std::move(out));
  }
  if (n == "min" || n == "max") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    if (items.empty()) return Value::Undefined(absl::StrCat("no ", n, " item, sequence was empty"));
    Value best = items[0];
    SIEVE_ASSIGN_OR_RETURN(Value best_key, SortKey(best, args, 0));
    for (size_t i = 1; i < items.size(); ++i) {
      SIEVE_ASSIGN_OR_RETURN(Value key, SortKey(items[i], args, 0));
      SIEVE_ASSIGN_OR_RETURN(bool lt, n == "min" ? Less(key, best_key) : Less(best_key, key));
      if (lt) {
        best = items[i];
        best_key = key;
      }
    }
    return best;
  }
  if (n == "sum") {
    SIEVE_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
    const Value* start = Arg(args, 1, "start");
    Value total = start != nullptr ? *start : Value::Int(0);
    const Value* attr = Arg(args, 0, "attribute");
    for (const Value& item : items) {
      Value x = item;
      if (attr != nullptr && attr->is_string()) {
        SIEVE_ASSIGN_OR_RETURN(x, AttrPath(item, attr->str()));
      }
      if (!(x.is_number() || x.kind() == Value::Kind::kBool) || !total.is_number()) {
        return Error("sum: items must be numbers");
      }
      total = total.kind() == Value::Kind::kFloat || x.kind() == Value::Kind::kFloat
                  ? Value::Float(total.AsDouble() + x.AsDouble())
                  : Value::Int(total.int_value() + x.int_value());
    }
    return total;
  }
  if (n == "indent") return Indent(v, args);
  return Error(absl::StrCat("no filter named '", n, "'"));
}


}  // namespace sieve::engine::jinja
