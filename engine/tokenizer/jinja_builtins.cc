#include "engine/tokenizer/jinja_builtins.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/jinja_render.h"
#include "engine/tokenizer/jinja_template.h"

namespace sieve::engine::jinja {
namespace {

absl::Status Error(std::string_view what) {
  return absl::InvalidArgumentError(absl::string_view(what.data(), what.size()));
}

absl::Status UndefinedError(const Value& v) {
  return Error(v.str().empty() ? "an undefined value was used" : v.str());
}

// Argument `index` (positional) or `name` (keyword) of a call, or nullptr.
const Value* Arg(const CallArgs& args, size_t index, std::string_view name) {
  if (index < args.positional.size()) return &args.positional[index];
  for (const auto& [key, value] : args.keyword) {
    if (key == name) return &value;
  }
  return nullptr;
}

bool ArgTruthy(const CallArgs& args, size_t index, std::string_view name) {
  const Value* v = Arg(args, index, name);
  return v != nullptr && v->Truthy();
}

absl::StatusOr<std::string> StringArg(const CallArgs& args, size_t index, std::string_view name,
                                      std::string_view what) {
  const Value* v = Arg(args, index, name);
  if (v == nullptr || !v->is_string()) {
    return Error(absl::StrCat(absl::string_view(what.data(), what.size()), ": argument '",
                              absl::string_view(name.data(), name.size()),
                              "' must be a string"));
  }
  return v->str();
}

std::string AsciiMap(std::string s, int (*fn)(int)) {
  for (char& c : s) {
    if (static_cast<unsigned char>(c) < 0x80) c = static_cast<char>(fn(c));
  }
  return s;
}
int ToUpper(int c) { return (c >= 'a' && c <= 'z') ? c - 32 : c; }
int ToLower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }
bool IsAsciiAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

std::string Title(const std::string& s) {
  std::string out = s;
  bool prev_cased = false;
  for (char& c : out) {
    if (IsAsciiAlpha(c)) {
      c = static_cast<char>(prev_cased ? ToLower(c) : ToUpper(c));
      prev_cased = true;
    } else {
      prev_cased = static_cast<unsigned char>(c) >= 0x80 && prev_cased;
    }
  }
  return out;
}

std::string Capitalize(const std::string& s) {
  std::string out = AsciiMap(s, ToLower);
  if (!out.empty()) out[0] = static_cast<char>(ToUpper(out[0]));
  return out;
}

// Python's str.strip family: `chars` null strips whitespace.
std::string Strip(const std::string& s, const Value* chars, bool left, bool right) {
  std::vector<std::string> set;
  const bool custom = chars != nullptr && chars->is_string();
  if (custom) set = Characters(chars->str());
  const auto strip_char = [&](std::string_view ch) {
    if (!custom) {
      size_t pos = 0;
      return IsPythonSpace(NextCodePoint(ch, &pos));
    }
    return std::find(set.begin(), set.end(), ch) != set.end();
  };
  std::vector<std::string> chs = Characters(s);
  size_t begin = 0, end = chs.size();
  while (left && begin < end && strip_char(chs[begin])) ++begin;
  while (right && end > begin && strip_char(chs[end - 1])) --end;
  std::string out;
  for (size_t i = begin; i < end; ++i) out += chs[i];
  return out;
}

ValueList StringsToList(const std::vector<std::string>& parts) {
  ValueList out;
  for (const std::string& p : parts) out.push_back(Value::String(p));
  return out;
}

// Python's str.split / rsplit.
absl::StatusOr<ValueList> Split(const std::string& s, const Value* sep, int64_t maxsplit,
                                bool from_right) {
  std::vector<std::string> parts;
  if (sep == nullptr || sep->is_none()) {
    std::vector<std::string> chs = Characters(s);
    const auto space = [](const std::string& c) {
      size_t pos = 0;
      return IsPythonSpace(NextCodePoint(c, &pos));
    };
    if (from_right) std::reverse(chs.begin(), chs.end());
    std::string word;
    size_t i = 0;
    while (i < chs.size()) {
      while (i < chs.size() && space(chs[i])) ++i;
      if (i >= chs.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
        std::string rest;
        size_t end = chs.size();
        while (end > i && space(chs[end - 1])) --end;
        for (size_t k = i; k < end; ++k) rest += chs[k];
        parts.push_back(rest);
        break;
      }
      word.clear();
      while (i < chs.size() && !space(chs[i])) word += chs[i++];
      parts.push_back(word);
    }
    if (from_right) {
      std::reverse(parts.begin(), parts.end());
      for (std::string& p : parts) {
        std::vector<std::string> c = Characters(p);
        std::reverse(c.begin(), c.end());
        p.clear();
        for (const std::string& x : c) p += x;
      }
    }
    return StringsToList(parts);
  }
  if (!sep->is_string()) return Error("split: the separator must be a string");
  const std::string& d = sep->str();
  if (d.empty()) return Error("split: empty separator");
  if (!from_right) {
    size_t start = 0;
    while (true) {
      const size_t at = s.find(d, start);
      if (at == std::string::npos ||
          (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit)) {
        parts.push_back(s.substr(start));
        break;
      }
      parts.push_back(s.substr(start, at - start));
      start = at + d.size();
    }
    return StringsToList(parts);
  }
  size_t end = s.size();
  while (true) {
    const size_t at = end >= d.size() ? s.rfind(d, end - d.size()) : std::string::npos;
    if (at == std::string::npos ||
        (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit)) {
      parts.push_back(s.substr(0, end));
      break;
    }
    parts.push_back(s.substr(at + d.size(), end - at - d.size()));
    end = at;
  }
  std::reverse(parts.begin(), parts.end());
  return StringsToList(parts);
}

std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                    int64_t count) {
  std::string out;
  if (from.empty()) {
    std::vector<std::string> chs = Characters(s);
    int64_t done = 0;
    for (const std::string& c : chs) {
      if (count < 0 || done < count) {
        out += to;
        ++done;
      }
      out += c;
    }
    if (count < 0 || done < count) out += to;
    return out;
  }
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t at = s.find(from, start);
    if (at == std::string::npos) break;
    out.append(s, start, at - start);
    out += to;
    start = at + from.size();
    ++done;
  }
  out.append(s, start, std::string::npos);
  return out;
}

int64_t CodePointIndex(const std::string& s, size_t byte_pos) {
  return static_cast<int64_t>(Characters(std::string_view(s).substr(0, byte_pos)).size());
}

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

Value BoundMethod(const Value& self, std::string name);

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

std::vector<std::string> Characters(std::string_view s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t start = pos;
    NextCodePoint(s, &pos);
    out.emplace_back(s.substr(start, pos - start));
  }
  return out;
}

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
      return StringsToList(Characters(value.str()));
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

bool IsStringMethod(std::string_view n) {
  static constexpr std::string_view kNames[] = {
      "startswith", "endswith", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines",
      "upper", "lower", "title", "capitalize", "replace", "find", "rfind", "count", "join",
      "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}

absl::StatusOr<Value> StringMethod(const std::string& s, const std::string& name,
                                   CallArgs& args) {
  if (name == "startswith" || name == "endswith") {
    const Value* p = Arg(args, 0, "prefix");
    if (p == nullptr) return Error(absl::StrCat(name, "() takes at least 1 argument"));
    std::vector<std::string> options;
    if (p->is_string()) {
      options.push_back(p->str());
    } else if (p->is_list()) {
      for (const Value& v : p->list()) {
        if (!v.is_string()) return Error(absl::StrCat(name, "(): tuple items must be strings"));
        options.push_back(v.str());
      }
    } else {
      return Error(absl::StrCat(name, "() argument must be str or a tuple of str"));
    }
    for (const std::string& o : options) {
      const bool hit = o.size() <= s.size() &&
                       (name == "startswith" ? s.compare(0, o.size(), o) == 0
                                             : s.compare(s.size() - o.size(), o.size(), o) == 0);
      if (hit) return Value::Bool(true);
    }
    return Value::Bool(false);
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    return Value::String(Strip(s, Arg(args, 0, "chars"), name != "rstrip", name != "lstrip"));
  }
  if (name == "split" || name == "rsplit") {
    const Value* maxsplit = Arg(args, 1, "maxsplit");
    SIEVE_ASSIGN_OR_RETURN(
        ValueList parts,
        Split(s, Arg(args, 0, "sep"), maxsplit != nullptr ? maxsplit->int_value() : -1,
              name == "rsplit"));
    return Value::List(std::move(parts));
  }
  if (name == "splitlines") {
    std::vector<std::string> lines;
    std::string line;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '\n' || s[i] == '\r') {
        lines.push_back(line);
        line.clear();
        if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
      } else {
        line.push_back(s[i]);
      }
    }
    if (!line.empty()) lines.push_back(line);
    return Value::List(StringsToList(lines));
  }
  if (name == "upper") return Value::String(AsciiMap(s, ToUpper));
  if (name == "lower") return Value::String(AsciiMap(s, ToLower));
  if (name == "title") return Value::String(Title(s));
  if (name == "capitalize") return Value::String(Capitalize(s));
  if (name == "replace") {
    SIEVE_ASSIGN_OR_RETURN(std::string from, StringArg(args, 0, "old", "replace"));
    SIEVE_ASSIGN_OR_RETURN(std::string to, StringArg(args, 1, "new", "replace"));
    const Value* count = Arg(args, 2, "count");
    return Value::String(Replace(s, from, to, count != nullptr ? count->int_value() : -1));
  }
  if (name == "find" || name == "rfind" || name == "count") {
    SIEVE_ASSIGN_OR_RETURN(std::string sub, StringArg(args, 0, "sub", name));
    if (name == "count") {
      if (sub.empty()) return Value::Int(static_cast<int64_t>(Characters(s).size()) + 1);
      int64_t n = 0;
      for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) {
        ++n;
      }
      return Value::Int(n);
    }
    const size_t at = name == "find" ? s.find(sub) : s.rfind(sub);
    return Value::Int(at == std::string::npos ? -1 : CodePointIndex(s, at));
  }
  if (name == "join") {
    const Value* items = Arg(args, 0, "iterable");
    if (items == nullptr) return Error("join() takes exactly one argument");
    SIEVE_ASSIGN_OR_RETURN(ValueList list, Iterate(*items));
    std::string out;
    for (size_t i = 0; i < list.size(); ++i) {
      if (!list[i].is_string()) {
        return Error(absl::StrCat("sequence item ", i, ": expected str instance, ",
                                  list[i].TypeName(), " found"));
      }
      if (i > 0) out += s;
      out += list[i].str();
    }
    return Value::String(std::move(out));
  }
  // is* predicates (ASCII classes; an empty string is false).
  bool result = !s.empty();
  bool any_cased = false;
  for (char c : s) {
    const bool digit = c >= '0' && c <= '9';
    const bool alpha = IsAsciiAlpha(c);
    if (name == "isdigit") result = result && digit;
    if (name == "isalpha") result = result && alpha;
    if (name == "isalnum") result = result && (alpha || digit);
    if (name == "isspace") result = result && IsPythonSpace(static_cast<unsigned char>(c));
    if (name == "islower") result = result && !(c >= 'A' && c <= 'Z');
    if (name == "isupper") result = result && !(c >= 'a' && c <= 'z');
    any_cased = any_cased || alpha;
  }
  if (name == "islower" || name == "isupper") result = result && any_cased;
  return Value::Bool(result);
}

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
        if (name == "items") out.push_back(Value::List({Value::String(k), v}));
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

bool IsFilter(std::string_view name) {
  static constexpr std::string_view kNames[] = {
      "abs", "capitalize", "count", "d", "default", "first", "float", "indent", "int",
      "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
      "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr", "sort",
      "string", "sum", "title", "tojson", "trim", "unique", "upper"};
  return std::find(std::begin(kNames), std::end(kNames), name) != std::end(kNames);
}

bool IsTest(std::string_view name) {
  static constexpr std::string_view kNames[] = {
      "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even",
      "false", "filter", "float", "ge", "gt", "in", "integer", "iterable", "le", "lower", "lt",
      "mapping", "ne", "none", "number", "odd", "sameas", "sequence", "string", "test", "true",
      "undefined", "upper", "==", "!=", "<", "<=", ">", ">="};
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
    return BoundMethod(v, "items").function()(r, none);
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
