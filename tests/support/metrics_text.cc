#include "tests/support/metrics_text.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sieve::test_support {
namespace {

bool IsNameStart(char c) { return absl::ascii_isalpha(c) || c == '_' || c == ':'; }
bool IsNameChar(char c) { return IsNameStart(c) || absl::ascii_isdigit(c); }

// Consumes a metric or label name from the front of `s`; empty when there is none.
absl::string_view TakeName(absl::string_view& s) {
  size_t n = 0;
  if (!s.empty() && IsNameStart(s[0])) {
    n = 1;
    while (n < s.size() && IsNameChar(s[n])) ++n;
  }
  absl::string_view name = s.substr(0, n);
  s.remove_prefix(n);
  return name;
}

// Parses a sample value: a float, "+Inf", "-Inf" or "NaN".
bool ParseValue(absl::string_view text, double* value) {
  if (text == "+Inf" || text == "Inf") {
    *value = std::numeric_limits<double>::infinity();
    return true;
  }
  if (text == "-Inf") {
    *value = -std::numeric_limits<double>::infinity();
    return true;
  }
  if (text == "NaN" || text == "Nan") {  // prometheus-cpp 1.0 writes "Nan"
    *value = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  return absl::SimpleAtod(text, value) && !std::isnan(*value);
}

// Parses `{a="x",b="y"}` (the braces included) from the front of `s` into `labels`.
bool ParseLabels(absl::string_view& s, std::map<std::string, std::string>* labels) {
  s.remove_prefix(1);  // '{'
  for (;;) {
    s = absl::StripLeadingAsciiWhitespace(s);
    if (!s.empty() && s[0] == '}') {
      s.remove_prefix(1);
      return true;
    }
    absl::string_view name = TakeName(s);
    if (name.empty() || s.size() < 2 || s[0] != '=' || s[1] != '"') return false;
    s.remove_prefix(2);
    std::string value;
    for (;;) {
      if (s.empty()) return false;
      const char c = s[0];
      s.remove_prefix(1);
      if (c == '"') break;
      if (c != '\\') {
        value.push_back(c);
        continue;
      }
      if (s.empty()) return false;
      const char e = s[0];
      s.remove_prefix(1);
      if (e == 'n') {
        value.push_back('\n');
      } else if (e == '\\' || e == '"') {
        value.push_back(e);
      } else {
        return false;
      }
    }
    (*labels)[std::string(name)] = std::move(value);
    s = absl::StripLeadingAsciiWhitespace(s);
    if (!s.empty() && s[0] == ',') s.remove_prefix(1);
  }
}

bool Includes(const std::map<std::string, std::string>& have,
              const std::map<std::string, std::string>& want) {
  for (const auto& [k, v] : want) {
    auto it = have.find(k);
    if (it == have.end() || it->second != v) return false;
  }
  return true;
}

}  // namespace

std::optional<double> ParsedMetrics::Find(absl::string_view name,
                                          const std::map<std::string, std::string>& labels) const {
  for (const MetricSample& s : samples) {
    if (s.name == name && Includes(s.labels, labels)) return s.value;
  }
  return std::nullopt;
}

double ParsedMetrics::Sum(absl::string_view name,
                          const std::map<std::string, std::string>& labels) const {
  double sum = 0;
  for (const MetricSample& s : samples) {
    if (s.name == name && Includes(s.labels, labels)) sum += s.value;
  }
  return sum;
}

std::vector<MetricSample> ParsedMetrics::All(
    absl::string_view name, const std::map<std::string, std::string>& labels) const {
  std::vector<MetricSample> out;
  for (const MetricSample& s : samples) {
    if (s.name == name && Includes(s.labels, labels)) out.push_back(s);
  }
  return out;
}

absl::StatusOr<ParsedMetrics> ParseMetricsText(absl::string_view text) {
  ParsedMetrics out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics text line ", line_no, ": ", why, ": \"", line.substr(0, 120),
                       "\""));
    };
    if (line[0] == '#') {
      std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(' ', 3));
      if (parts.size() >= 3 && (parts[1] == "TYPE" || parts[1] == "HELP")) {
        const std::string rest = parts.size() == 4 ? std::string(parts[3]) : "";
        if (parts[1] == "TYPE") {
          if (rest.empty()) return bad("TYPE without a type");
          out.types[std::string(parts[2])] = rest;
        } else {
          out.help[std::string(parts[2])] = rest;
        }
      }
      continue;  // other comments are ignored
    }
    MetricSample sample;
    absl::string_view s = line;
    sample.name = std::string(TakeName(s));
    if (sample.name.empty()) return bad("missing metric name");
    if (!s.empty() && s[0] == '{' && !ParseLabels(s, &sample.labels)) {
      return bad("malformed labels");
    }
    if (s.empty() || (s[0] != ' ' && s[0] != '\t')) return bad("expected a space and a value");
    std::vector<absl::string_view> fields =
        absl::StrSplit(absl::StripAsciiWhitespace(s), absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.empty() || fields.size() > 2) return bad("expected a value and optional timestamp");
    if (!ParseValue(fields[0], &sample.value)) return bad("malformed value");
    out.samples.push_back(std::move(sample));
  }
  return out;
}

}  // namespace sieve::test_support
