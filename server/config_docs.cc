#include "server/config_docs.h"

#include <map>
#include <variant>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "server/config_keys.h"

namespace sieve::server {
namespace {

using config_keys::FormatValue;
using config_keys::KeySpec;
using config_keys::Keys;
using config_keys::Read;
using config_keys::Value;
using config_keys::kString;

constexpr char kYamlHeader[] =
    R"(# Sieve daemon configuration: every key, its doc and accepted values, and its value. This is
# what `sieved --print-config` prints; configs/default.yaml is the defaults (no --config, no
# --set), written by scripts/gen-config-docs.sh and checked against the key table by a test.
#
#   sieved --config FILE [--set section.key=value ...]
#   sieve generate --model DIR [--config FILE] [--set section.key=value ...] PROMPT
#
# A missing key keeps its default. Unknown keys and bad values are errors that name the key
# and the line. Lists are written [0] or, with --set, 0. Durations are in seconds, sizes in
# bytes, token counts in tokens; relative paths are resolved against the working directory.
)";

// Greedy word wrap of `text` to `width` columns, each line prefixed by `indent`.
std::string Wrap(absl::string_view text, absl::string_view indent, size_t width) {
  std::string out;
  std::string line;
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!line.empty() && indent.size() + line.size() + 1 + word.size() > width) {
      absl::StrAppend(&out, indent, line, "\n");
      line.clear();
    }
    absl::StrAppend(&line, line.empty() ? "" : " ", word);
  }
  if (!line.empty()) absl::StrAppend(&out, indent, line, "\n");
  return out;
}

// `s` as a YAML double-quoted scalar.
std::string YamlQuote(absl::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      absl::StrAppend(&out, "\\", std::string(1, ch));
    } else if (c < 0x20 || c == 0x7f) {
      constexpr char kHex[] = "0123456789abcdef";
      absl::StrAppend(&out, "\\x", std::string(1, kHex[c >> 4]), std::string(1, kHex[c & 15]));
    } else {
      out.push_back(ch);
    }
  }
  out.push_back('"');
  return out;
}

// `text` for a Markdown table cell.
std::string Cell(absl::string_view text) { return absl::StrReplaceAll(text, {{"|", "\\|"}}); }

}  // namespace

std::string FormatConfigHelp() {
  std::string out;
  for (const ConfigKeyInfo& key : ListConfigKeys()) {
    std::string shown_default =
        key.type == "string" ? absl::StrCat("\"", key.default_value, "\"") : key.default_value;
    absl::StrAppend(&out, "  ", key.path, " (", key.type, ", default ", shown_default, ")\n");
    absl::StrAppend(&out,
                    Wrap(absl::StrCat(key.doc, " Accepts ", key.accepted, "."), "      ", 96));
  }
  return out;
}

std::string ConfigToYaml(const ServerConfig& config) {
  std::string out = kYamlHeader;
  std::vector<absl::string_view> open;  // Sections currently open, outermost first.
  for (const KeySpec& key : Keys()) {
    std::vector<absl::string_view> parts = absl::StrSplit(key.path, '.');
    absl::string_view leaf = parts.back();
    parts.pop_back();
    size_t common = 0;
    while (common < open.size() && common < parts.size() && open[common] == parts[common]) {
      ++common;
    }
    open.resize(common);
    for (size_t i = common; i < parts.size(); ++i) {
      if (i == 0) out.push_back('\n');
      absl::StrAppend(&out, std::string(2 * i, ' '), parts[i], ":\n");
      open.push_back(parts[i]);
    }
    std::string indent(2 * parts.size(), ' ');
    absl::StrAppend(&out, Wrap(absl::StrCat(key.doc, " Accepts ", config_keys::Expectation(key),
                                            "."),
                               absl::StrCat(indent, "# "), 96));
    Value v = Read(key, config);
    std::string text = v.index() == kString ? YamlQuote(std::get<std::string>(v)) : FormatValue(v);
    absl::StrAppend(&out, indent, leaf, ": ", text, "\n");
  }
  return out;
}

std::string FormatConfigMarkdown() {
  std::string out;
  std::string section;
  for (const ConfigKeyInfo& key : ListConfigKeys()) {
    const std::string first = key.path.substr(0, key.path.find('.'));
    if (first != section) {
      section = first;
      absl::StrAppend(&out, out.empty() ? "" : "\n", "### `", section, "`\n\n",
                      "| Key | Type | Default | Accepts | What it does |\n",
                      "|-----|------|---------|---------|--------------|\n");
    }
    const std::string shown_default =
        key.type == "string" ? absl::StrCat("\"", key.default_value, "\"") : key.default_value;
    absl::StrAppend(&out, "| `", key.path, "` | ", key.type, " | `", Cell(shown_default), "` | ",
                    Cell(key.accepted), " | ", Cell(key.doc), " |\n");
  }
  absl::StrAppend(&out, "\n### Retired keys\n\nLoading one is an error that says what became of "
                        "it.\n\n| Key | What became of it |\n|-----|-------------------|\n");
  for (const RetiredConfigKey& key : ListRetiredConfigKeys()) {
    absl::StrAppend(&out, "| `", key.path, "` | ", Cell(key.note), " |\n");
  }
  return out;
}

absl::StatusOr<std::string> ReplaceGeneratedSection(std::string_view document,
                                                    std::string_view generated) {
  const std::string_view begin_marker = kGeneratedBegin;
  const size_t begin = document.find(begin_marker);
  const size_t end = document.find(kGeneratedEnd);
  if (begin == std::string_view::npos || end == std::string_view::npos || end < begin) {
    return absl::InvalidArgumentError(absl::StrCat("the document lacks the lines '",
                                                   kGeneratedBegin, "' and '", kGeneratedEnd,
                                                   "', in that order"));
  }
  const size_t body = begin + begin_marker.size();
  std::string out(document.substr(0, body));
  out += "\n\n";
  out += generated;
  out += "\n";
  out += document.substr(end);
  return out;
}

}  // namespace sieve::server
