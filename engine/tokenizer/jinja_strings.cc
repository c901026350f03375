#include "engine/tokenizer/jinja_strings.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/jinja_args.h"
#include "engine/tokenizer/jinja_builtins.h"

namespace sieve::engine::jinja {
namespace {

bool IsAsciiAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

ValueList StringsToList(const std::vector<std::string>& parts) {
  ValueList out;
  for (const std::string& p : parts) out.push_back(Value::String(p));
  return out;
}

}  // namespace

std::string AsciiMap(std::string s, int (*fn)(int)) {
  for (char& c : s) {
    if (static_cast<unsigned char>(c) < 0x80) c = static_cast<char>(fn(c));
  }
  return s;
}
int ToUpper(int c) { return (c >= 'a' && c <= 'z') ? c - 32 : c; }
int ToLower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

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


namespace {

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

int64_t CodePointIndex(const std::string& s, size_t byte_pos) {
  return static_cast<int64_t>(Characters(std::string_view(s).substr(0, byte_pos)).size());
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

}  // namespace sieve::engine::jinja
