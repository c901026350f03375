#include "engine/tokenizer/decoder.h"

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/tokenizer_json.h"
#include "engine/tokenizer/unicode.h"

namespace sieve::engine {
namespace {

using tokenizer_json::FieldError;
using tokenizer_json::FieldPath;
using tokenizer_json::Json;

constexpr int kMaxSequenceDepth = 8;
constexpr std::string_view kReplacementUtf8 = "\xEF\xBF\xBD";  // U+FFFD

// Byte-level decoding of one token as Hugging Face's ByteLevel decoder does it: each character
// becomes its byte; if any character is outside the alphabet, the token's UTF-8 is kept.
std::string ByteLevelDecodeToken(std::string_view token) {
  std::string bytes;
  bytes.reserve(token.size());
  size_t pos = 0;
  while (pos < token.size()) {
    const int b = ByteLevelByte(unicode::DecodeNext(token, &pos));
    if (b < 0) return std::string(token);
    bytes.push_back(static_cast<char>(b));
  }
  return bytes;
}

// Returns the single code point of `s`, or an error naming `path`.
absl::StatusOr<char32_t> SingleChar(const std::string& s, const std::string& path) {
  if (s.empty() || unicode::FindInvalidUtf8(s).has_value()) {
    return FieldError(path, "expected one character");
  }
  size_t pos = 0;
  const char32_t cp = unicode::DecodeNext(s, &pos);
  if (pos != s.size()) return FieldError(path, "expected one character");
  return cp;
}

// Returns a non-negative int member `key` of `obj` (default 0).
absl::StatusOr<int> CountField(const Json& obj, std::string_view key, std::string_view path) {
  const Json* v = tokenizer_json::FindField(obj, key);
  if (v == nullptr) return 0;
  if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() > (1 << 20)) {
    return FieldError(FieldPath(path, key), "expected a non-negative integer");
  }
  return static_cast<int>(v->get<int64_t>());
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

absl::StatusOr<TokenDecoder> TokenDecoder::FromJson(const Json& config, std::string_view path) {
  TokenDecoder decoder;
  if (config.is_null()) return decoder;
  decoder.none_ = false;
  SIEVE_RETURN_IF_ERROR(decoder.AppendSteps(config, path, 0));
  if (decoder.byte_level_ && (!decoder.local_.empty() || decoder.byte_fallback_ ||
                              decoder.fused_ || decoder.strip_start_ > 0)) {
    return absl::UnimplementedError(absl::StrCat(
        "tokenizer: ", tokenizer_json::AbslView(path),
        ": a ByteLevel decoder combined with other decoders is unsupported"));
  }
  for (const LocalStep& step : decoder.local_) {
    if (step.kind == LocalStep::Kind::kMetaspace && step.first_drops) decoder.first_differs_ = true;
  }
  return decoder;
}

absl::Status TokenDecoder::AppendSteps(const Json& config, std::string_view path, int depth) {
  if (depth > kMaxSequenceDepth) return FieldError(path, "Sequence nested too deeply");
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(config, path));
  SIEVE_ASSIGN_OR_RETURN(std::string type, tokenizer_json::RequiredString(config, "type", path));
  const std::string type_path = FieldPath(path, "type");
  auto misplaced = [&](std::string_view after) {
    return absl::UnimplementedError(absl::StrCat("tokenizer: ", type_path, ": a ", type,
                                                 " decoder after ", tokenizer_json::AbslView(after),
                                                 " is unsupported"));
  };
  const bool local_phase = !byte_fallback_ && !fused_;
  if (type == "Sequence") {
    SIEVE_ASSIGN_OR_RETURN(const Json* list, tokenizer_json::RequiredField(config, "decoders", path));
    const std::string list_path = FieldPath(path, "decoders");
    if (!list->is_array()) return FieldError(list_path, "expected an array");
    for (size_t i = 0; i < list->size(); ++i) {
      SIEVE_RETURN_IF_ERROR(
          AppendSteps((*list)[i], tokenizer_json::IndexPath(list_path, i), depth + 1));
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    byte_level_ = true;
    return absl::OkStatus();
  }
  if (type == "ByteFallback") {
    if (fused_) return misplaced("Fuse");
    byte_fallback_ = true;
    return absl::OkStatus();
  }
  if (type == "Fuse") {
    fused_ = true;
    return absl::OkStatus();
  }
  LocalStep step;
  if (type == "Replace") {
    if (!local_phase) return misplaced(fused_ ? "Fuse" : "ByteFallback");
    step.kind = LocalStep::Kind::kReplace;
    SIEVE_ASSIGN_OR_RETURN(step.to, tokenizer_json::RequiredString(config, "content", path));
    SIEVE_ASSIGN_OR_RETURN(const Json* pattern, tokenizer_json::RequiredField(config, "pattern", path));
    SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> literal,
                           tokenizer_json::OptionalString(*pattern, "String", FieldPath(path, "pattern")));
    if (!literal.has_value() || literal->empty()) {
      return absl::UnimplementedError(absl::StrCat(
          "tokenizer: ", FieldPath(path, "pattern"),
          ": only a non-empty {\"String\": ...} pattern is supported in a Replace decoder"));
    }
    step.from = *literal;
  } else if (type == "Metaspace") {
    if (!local_phase) return misplaced(fused_ ? "Fuse" : "ByteFallback");
    step.kind = LocalStep::Kind::kMetaspace;
    SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> replacement,
                           tokenizer_json::OptionalString(config, "replacement", path));
    step.from = replacement.value_or("\xE2\x96\x81");  // U+2581
    SIEVE_RETURN_IF_ERROR(SingleChar(step.from, FieldPath(path, "replacement")).status());
    SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> scheme,
                           tokenizer_json::OptionalString(config, "prepend_scheme", path));
    SIEVE_ASSIGN_OR_RETURN(bool add_prefix_space,
                           tokenizer_json::OptionalBool(config, "add_prefix_space", true, path));
    if (scheme.has_value() && *scheme != "always" && *scheme != "first" && *scheme != "never") {
      return FieldError(FieldPath(path, "prepend_scheme"),
                        "expected \"always\", \"first\" or \"never\"");
    }
    step.first_drops = scheme.has_value() ? *scheme != "never" : add_prefix_space;
  } else if (type == "Strip") {
    SIEVE_ASSIGN_OR_RETURN(std::string content,
                           tokenizer_json::RequiredString(config, "content", path));
    SIEVE_ASSIGN_OR_RETURN(step.content, SingleChar(content, FieldPath(path, "content")));
    SIEVE_ASSIGN_OR_RETURN(step.start, CountField(config, "start", path));
    SIEVE_ASSIGN_OR_RETURN(step.stop, CountField(config, "stop", path));
    if (fused_) {
      if (step.stop != 0 || strip_start_ != 0) {
        return absl::UnimplementedError(
            absl::StrCat("tokenizer: ", tokenizer_json::AbslView(path),
                         ": after Fuse only one Strip with \"stop\": 0 is supported"));
      }
      strip_content_ = step.content;
      strip_start_ = step.start;
      return absl::OkStatus();
    }
    if (!local_phase) return misplaced("ByteFallback");
    step.kind = LocalStep::Kind::kStrip;
  } else {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer: ", type_path, ": unsupported decoder type '", type, "'"));
  }
  local_.push_back(std::move(step));
  return absl::OkStatus();
}

std::string TokenDecoder::Piece(std::string_view token, bool first) const {
  if (byte_level_) return ByteLevelDecodeToken(token);
  std::string s(token);
  for (const LocalStep& step : local_) {
    switch (step.kind) {
      case LocalStep::Kind::kReplace:
      case LocalStep::Kind::kMetaspace: {
        const std::string_view to = step.kind == LocalStep::Kind::kReplace
                                        ? std::string_view(step.to)
                                        : (first && step.first_drops ? "" : " ");
        std::string out;
        size_t pos = 0;
        for (size_t hit; (hit = s.find(step.from, pos)) != std::string::npos;) {
          out.append(s, pos, hit - pos);
          out.append(to);
          pos = hit + step.from.size();
        }
        out.append(s, pos);
        s = std::move(out);
        break;
      }
      case LocalStep::Kind::kStrip: {
        const std::vector<char32_t> cps = unicode::DecodeUtf8(s);
        size_t begin = 0, end = cps.size();
        while (begin < end && begin < static_cast<size_t>(step.start) &&
               cps[begin] == step.content) {
          ++begin;
        }
        for (int k = 0; k < step.stop && end > begin && cps[end - 1] == step.content; ++k) --end;
        std::string out;
        for (size_t k = begin; k < end; ++k) unicode::AppendUtf8(cps[k], &out);
        s = std::move(out);
        break;
      }
    }
  }
  return s;
}

int TokenDecoder::FallbackByte(std::string_view piece) const {
  if (!byte_fallback_ || piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') {
    return -1;
  }
  // As Rust's u8::from_str_radix(.., 16): an optional '+', then hexadecimal digits.
  std::string_view digits = piece.substr(3, 2);
  if (digits[0] == '+') digits.remove_prefix(1);
  int value = 0;
  for (char c : digits) {
    const int d = HexDigit(c);
    if (d < 0) return -1;
    value = value * 16 + d;
  }
  return value;
}

DecodeStream::DecodeStream(const TokenDecoder& decoder, bool eager)
    : decoder_(decoder), eager_(eager), strip_left_(decoder.strip_start_) {}

void DecodeStream::Emit(std::string_view text, std::string* out) {
  while (strip_left_ > 0 && !text.empty()) {
    size_t pos = 0;
    if (unicode::DecodeNext(text, &pos) != decoder_.strip_content_) {
      strip_left_ = 0;
      break;
    }
    text.remove_prefix(pos);
    --strip_left_;
  }
  out->append(text);
}

void DecodeStream::EndRun(std::string* out) {
  if (!pending_.empty()) {
    if (!eager_ && !unicode::FindInvalidUtf8(pending_).has_value()) {
      Emit(pending_, out);
    } else {
      std::string replacement;
      for (size_t i = 0; i < pending_.size(); ++i) replacement.append(kReplacementUtf8);
      Emit(replacement, out);
    }
    pending_.clear();
  }
  run_invalid_ = false;
}

void DecodeStream::Push(std::string_view piece, int fallback_byte, std::string* out) {
  const bool first = !started_;
  started_ = true;
  if (decoder_.bytes_mode()) {
    if (decoder_.none_ && !first) pending_.push_back(' ');
    pending_.append(piece);
    if (eager_) {
      const size_t hold = unicode::IncompleteUtf8Suffix(pending_);
      out->append(unicode::Utf8Lossy(std::string_view(pending_).substr(0, pending_.size() - hold)));
      pending_.erase(0, pending_.size() - hold);
    }
    return;
  }
  if (fallback_byte < 0) {
    EndRun(out);
    Emit(piece, out);
    return;
  }
  pending_.push_back(static_cast<char>(fallback_byte));
  if (!eager_) return;
  if (!run_invalid_) {
    const size_t hold = unicode::IncompleteUtf8Suffix(pending_);
    const std::string_view head = std::string_view(pending_).substr(0, pending_.size() - hold);
    if (!unicode::FindInvalidUtf8(head).has_value()) {
      Emit(head, out);
      pending_.erase(0, head.size());
      return;
    }
    run_invalid_ = true;  // Every byte of this run, from here on, is one U+FFFD.
  }
  for (size_t i = 0; i < pending_.size(); ++i) Emit(kReplacementUtf8, out);
  pending_.clear();
}

void DecodeStream::Finish(std::string* out) {
  if (decoder_.bytes_mode()) {
    out->append(unicode::Utf8Lossy(pending_));
    pending_.clear();
  } else {
    EndRun(out);
  }
  started_ = false;
  run_invalid_ = false;
  strip_left_ = decoder_.strip_start_;
}

}  // namespace sieve::engine
