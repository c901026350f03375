#include "engine/tokenizer/normalizer.h"

#include <unicode/normalizer2.h>
#include <unicode/uniset.h>
#include <unicode/unistr.h>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/tokenizer_json.h"
#include "engine/tokenizer/unicode.h"

namespace sieve::engine {
namespace {

using tokenizer_json::FieldError;
using tokenizer_json::FieldPath;
using tokenizer_json::Json;

constexpr int kMaxSequenceDepth = 8;

// ICU's normalizer of `form`, restricted to the code points of Unicode 9.0 (nullptr if ICU
// has no data, which a Debian ICU always has).
const icu::Normalizer2* Unicode9Normalizer(std::string_view form) {
  struct Normalizers {
    const icu::Normalizer2* nfd = nullptr;
    const icu::Normalizer2* nfkc = nullptr;
    const icu::Normalizer2* nfkd = nullptr;
  };
  static const Normalizers* normalizers = [] {
    auto* n = new Normalizers();
    UErrorCode status = U_ZERO_ERROR;
    auto* assigned = new icu::UnicodeSet(icu::UnicodeString(u"[:age=9.0:]"), status);
    if (U_FAILURE(status)) return n;
    assigned->freeze();
    const icu::Normalizer2* nfd = icu::Normalizer2::getNFDInstance(status);
    const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(status);
    const icu::Normalizer2* nfkd = icu::Normalizer2::getNFKDInstance(status);
    if (U_FAILURE(status)) return n;
    n->nfd = new icu::FilteredNormalizer2(*nfd, *assigned);
    n->nfkc = new icu::FilteredNormalizer2(*nfkc, *assigned);
    n->nfkd = new icu::FilteredNormalizer2(*nfkd, *assigned);
    return n;
  }();
  if (form == "NFD") return normalizers->nfd;
  if (form == "NFKC") return normalizers->nfkc;
  return normalizers->nfkd;
}

// Replaces every occurrence of `from` (non-empty) in `text` by `to`.
std::string ReplaceLiteral(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(text.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(text.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(text.substr(pos));
  return out;
}

// Removes leading / trailing White_Space.
std::string_view StripSpaces(std::string_view text, bool left, bool right) {
  size_t begin = 0, end = text.size();
  if (left) {
    while (begin < end) {
      size_t next = begin;
      if (!unicode::IsWhitespace(unicode::DecodeNext(text, &next))) break;
      begin = next;
    }
  }
  if (right) {
    while (end > begin) {
      size_t start = end - 1;
      while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
      size_t next = start;
      if (!unicode::IsWhitespace(unicode::DecodeNext(text, &next))) break;
      end = start;
    }
  }
  return text.substr(begin, end - begin);
}

}  // namespace

namespace unicode {
std::string IcuNormalize9(std::string_view form, std::string_view text) {
  const icu::Normalizer2* normalizer = Unicode9Normalizer(form);
  if (normalizer == nullptr) return std::string(text);
  UErrorCode status = U_ZERO_ERROR;
  const icu::UnicodeString in =
      icu::UnicodeString::fromUTF8(icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
  const icu::UnicodeString normalized = normalizer->normalize(in, status);
  if (U_FAILURE(status)) return std::string(text);
  std::string out;
  normalized.toUTF8String(out);
  return out;
}
}  // namespace unicode

absl::StatusOr<Normalizer> Normalizer::FromJson(const Json& config, std::string_view path) {
  Normalizer normalizer;
  if (config.is_null()) return normalizer;
  SIEVE_RETURN_IF_ERROR(normalizer.AppendSteps(config, path, 0));
  for (const Step& step : normalizer.steps_) {
    if (step.kind == Step::Kind::kNfc) normalizer.has_nfc_ = true;
  }
  return normalizer;
}

absl::Status Normalizer::AppendSteps(const Json& config, std::string_view path, int depth) {
  if (config.is_null()) return absl::OkStatus();
  if (depth > kMaxSequenceDepth) return FieldError(path, "Sequence nested too deeply");
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(config, path));
  SIEVE_ASSIGN_OR_RETURN(std::string type, tokenizer_json::RequiredString(config, "type", path));
  if (type == "Sequence") {
    SIEVE_ASSIGN_OR_RETURN(const Json* list,
                           tokenizer_json::RequiredField(config, "normalizers", path));
    const std::string list_path = FieldPath(path, "normalizers");
    if (!list->is_array()) return FieldError(list_path, "expected an array");
    for (size_t i = 0; i < list->size(); ++i) {
      SIEVE_RETURN_IF_ERROR(
          AppendSteps((*list)[i], tokenizer_json::IndexPath(list_path, i), depth + 1));
    }
    return absl::OkStatus();
  }
  Step step;
  if (type == "NFC") {
    step.kind = Step::Kind::kNfc;
  } else if (type == "NFD" || type == "NFKC" || type == "NFKD") {
    step.kind = type == "NFD" ? Step::Kind::kNfd
                              : (type == "NFKC" ? Step::Kind::kNfkc : Step::Kind::kNfkd);
    if (Unicode9Normalizer(type) == nullptr) {
      return absl::InternalError(absl::StrCat("tokenizer: ", FieldPath(path, "type"),
                                              ": ICU has no ", type, " data"));
    }
  } else if (type == "Prepend" || type == "Append") {
    step.kind = type == "Prepend" ? Step::Kind::kPrepend : Step::Kind::kAppend;
    SIEVE_ASSIGN_OR_RETURN(step.text, tokenizer_json::RequiredString(
                                          config, type == "Prepend" ? "prepend" : "append", path));
  } else if (type == "Replace") {
    step.kind = Step::Kind::kReplace;
    SIEVE_ASSIGN_OR_RETURN(step.text, tokenizer_json::RequiredString(config, "content", path));
    SIEVE_ASSIGN_OR_RETURN(const Json* pattern,
                           tokenizer_json::RequiredField(config, "pattern", path));
    const std::string pattern_path = FieldPath(path, "pattern");
    SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> literal,
                           tokenizer_json::OptionalString(*pattern, "String", pattern_path));
    SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> regex,
                           tokenizer_json::OptionalString(*pattern, "Regex", pattern_path));
    if (literal.has_value() && !literal->empty()) {
      step.literal = *literal;
    } else if (regex.has_value()) {
      SIEVE_ASSIGN_OR_RETURN(std::unique_ptr<Regex> compiled, Regex::Compile(*regex));
      step.regex = std::move(compiled);
    } else {
      return FieldError(pattern_path, "expected {\"String\": non-empty} or {\"Regex\": ...}");
    }
  } else if (type == "Strip") {
    step.kind = Step::Kind::kStrip;
    SIEVE_ASSIGN_OR_RETURN(step.left,
                           tokenizer_json::OptionalBool(config, "strip_left", false, path));
    SIEVE_ASSIGN_OR_RETURN(step.right,
                           tokenizer_json::OptionalBool(config, "strip_right", false, path));
  } else {
    return absl::UnimplementedError(absl::StrCat("tokenizer: ", FieldPath(path, "type"),
                                                 ": unsupported normalizer type '", type, "'"));
  }
  steps_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::StatusOr<std::string> Normalizer::Normalize(std::string_view text) const {
  std::string current(text);
  std::vector<Regex::Span> matches;
  for (const Step& step : steps_) {
    switch (step.kind) {
      case Step::Kind::kNfc:
        current = unicode::NfcNormalize(current);
        break;
      case Step::Kind::kNfd:
        current = unicode::IcuNormalize9("NFD", current);
        break;
      case Step::Kind::kNfkc:
        current = unicode::IcuNormalize9("NFKC", current);
        break;
      case Step::Kind::kNfkd:
        current = unicode::IcuNormalize9("NFKD", current);
        break;
      case Step::Kind::kPrepend:
        if (!current.empty()) current.insert(0, step.text);
        break;
      case Step::Kind::kAppend:
        if (!current.empty()) current.append(step.text);
        break;
      case Step::Kind::kReplace:
        if (!step.literal.empty()) {
          current = ReplaceLiteral(current, step.literal, step.text);
        } else {
          matches.clear();
          SIEVE_RETURN_IF_ERROR(step.regex->FindAll(current, &matches));
          std::string out;
          size_t pos = 0;
          for (const auto& [begin, end] : matches) {
            out.append(current, pos, begin - pos);
            out.append(step.text);
            pos = end;
          }
          out.append(current, pos);
          current = std::move(out);
        }
        break;
      case Step::Kind::kStrip:
        current = std::string(StripSpaces(current, step.left, step.right));
        break;
    }
  }
  return current;
}

}  // namespace sieve::engine
