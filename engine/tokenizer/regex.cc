#include "engine/tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer/unicode.h"

namespace sieve::engine {
namespace {

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// The White_Space property, as Oniguruma's \s.
constexpr unicode::CodePointRange kWhiteSpace[] = {
    {0x09, 0x0D}, {0x20, 0x20},     {0x85, 0x85},     {0xA0, 0xA0},     {0x1680, 0x1680},
    {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000}};

template <typename Ranges>
std::string ClassItems(const Ranges& ranges) {
  std::string out;
  for (const unicode::CodePointRange& r : ranges) {
    absl::StrAppend(&out, absl::StrFormat("\\x{%X}", static_cast<uint32_t>(r.first)));
    if (r.last != r.first) {
      absl::StrAppend(&out, absl::StrFormat("-\\x{%X}", static_cast<uint32_t>(r.last)));
    }
  }
  return out;
}

// The items that stand for \p{X} (X a general category that gained code points in Unicode
// 15.0 - 16.0) and \s inside a character class.
struct ClassTexts {
  std::string categories[5];  // L, N, P, S, M.
  std::string space = ClassItems(kWhiteSpace);
  ClassTexts() {
    for (int i = 0; i < 5; ++i) {
      const char c = "LNPSM"[i];
      categories[i] = absl::StrCat("\\p{", std::string(1, c), "}",
                                   ClassItems(unicode::AssignedAfterUnicode14(c)));
    }
  }
  // Returns the items of category `name` (short or long name), or nullptr.
  const std::string* Find(std::string_view name) const {
    static constexpr std::string_view kNames[5][2] = {{"L", "Letter"},
                                                       {"N", "Number"},
                                                       {"P", "Punctuation"},
                                                       {"S", "Symbol"},
                                                       {"M", "Mark"}};
    for (int i = 0; i < 5; ++i) {
      if (name == kNames[i][0] || name == kNames[i][1]) return &categories[i];
    }
    return nullptr;
  }
};

const ClassTexts& GetClassTexts() {
  static const ClassTexts* texts = new ClassTexts();
  return *texts;
}

bool IsHex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

// Rewrites Oniguruma syntax into PCRE2 syntax with the class semantics of regex.h.
absl::StatusOr<std::string> Translate(std::string_view p) {
  const ClassTexts& texts = GetClassTexts();
  std::string out;
  out.reserve(p.size() * 2);
  bool in_class = false;
  size_t i = 0;
  auto unsupported = [&](std::string_view what) {
    return absl::UnimplementedError(absl::StrCat("tokenizer: regex ", AbslView(p), ": ",
                                                 AbslView(what), " are not supported"));
  };
  while (i < p.size()) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      if ((e == 'p' || e == 'P') && i + 2 < p.size()) {
        // \p{Name}, \pX.
        std::string_view name;
        size_t end;
        if (p[i + 2] == '{') {
          const size_t close = p.find('}', i + 3);
          if (close == std::string_view::npos) {
            return absl::InvalidArgumentError(
                absl::StrCat("tokenizer: regex ", AbslView(p), ": unterminated \\p{"));
          }
          name = p.substr(i + 3, close - i - 3);
          end = close + 1;
        } else {
          name = p.substr(i + 2, 1);
          end = i + 3;
        }
        const std::string* items = texts.Find(name);
        if (items != nullptr && e == 'p') {
          absl::StrAppend(&out, in_class ? "" : "[", *items, in_class ? "" : "]");
        } else if (items != nullptr && !in_class) {
          absl::StrAppend(&out, "[^", *items, "]");
        } else {
          out.append(p.substr(i, end - i));
        }
        i = end;
        continue;
      }
      if (e == 's' || (e == 'S' && !in_class)) {
        absl::StrAppend(&out, in_class ? "" : (e == 's' ? "[" : "[^"), texts.space,
                        in_class ? "" : "]");
        i += 2;
        continue;
      }
      if (e == 'h' || (e == 'H' && !in_class)) {  // Oniguruma: a hexadecimal digit.
        absl::StrAppend(&out, in_class ? "" : (e == 'h' ? "[" : "[^"), "0-9a-fA-F",
                        in_class ? "" : "]");
        i += 2;
        continue;
      }
      if (e == 'u' && i + 5 < p.size() && IsHex(p[i + 2]) && IsHex(p[i + 3]) &&
          IsHex(p[i + 4]) && IsHex(p[i + 5])) {
        absl::StrAppend(&out, "\\x{", AbslView(p.substr(i + 2, 4)), "}");
        i += 6;
        continue;
      }
      // Any other escape, with the whole (possibly multi-byte) character escaped.
      size_t next = i + 1;
      unicode::DecodeNext(p, &next);
      out.append(p.substr(i, next - i));
      i = next;
      continue;
    }
    if (in_class) {
      if (c == '[') {
        if (i + 1 < p.size() && p[i + 1] == ':') {  // POSIX bracket [:alpha:].
          const size_t close = p.find(":]", i + 2);
          if (close == std::string_view::npos) return unsupported("unterminated POSIX classes");
          out.append(p.substr(i, close + 2 - i));
          i = close + 2;
          continue;
        }
        return unsupported("nested character classes");
      }
      if (c == '&' && i + 1 < p.size() && p[i + 1] == '&') {
        return unsupported("class intersections (&&)");
      }
      if (c == ']') in_class = false;
      out.push_back(c);
      ++i;
      continue;
    }
    out.push_back(c);
    ++i;
    if (c == '[') {
      in_class = true;
      // A leading ^ and a leading ] are part of the class.
      if (i < p.size() && p[i] == '^') out.push_back(p[i++]);
      if (i < p.size() && p[i] == ']') out.push_back(p[i++]);
    }
  }
  return out;
}

// Per-thread PCRE2 match state: one ovector pair (enough: only the whole match is read) and
// a JIT stack larger than the default 32 KiB.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* jit_stack = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, nullptr);
  MatchScratch() {
    if (context != nullptr && jit_stack != nullptr) {
      pcre2_jit_stack_assign(context, nullptr, jit_stack);
    }
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(std::string_view pattern) {
  std::unique_ptr<Regex> regex(new Regex());
  regex->pattern_ = std::string(pattern);
  auto translated = Translate(pattern);
  if (!translated.ok()) return translated.status();
  regex->translated_ = std::move(*translated);
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(regex->translated_.data()),
                    regex->translated_.size(), PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error,
                    &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: invalid regex ", AbslView(pattern),
                                                   ": ", reinterpret_cast<const char*>(message)));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // Without a JIT, PCRE2 interprets.
  regex->code_ = code;
  return regex;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

absl::Status Regex::FindAll(std::string_view text, std::vector<Span>* matches) const {
  thread_local MatchScratch scratch;
  if (scratch.data == nullptr || scratch.context == nullptr) {
    return absl::ResourceExhaustedError("tokenizer: cannot allocate PCRE2 match data");
  }
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const auto* code = static_cast<const pcre2_code*>(code_);
  size_t start = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (start <= text.size()) {
    const int rc = pcre2_match(code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, scratch.data,
                               scratch.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      return absl::ResourceExhaustedError(absl::StrCat("tokenizer: regex ", pattern_, ": ",
                                                       reinterpret_cast<const char*>(message)));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
    const size_t begin = ovector[0], end = ovector[1];
    if (begin == end && have_last && last_end == end) {
      // An empty match where the previous one ended: move on by one character.
      if (start >= text.size()) break;
      unicode::DecodeNext(text, &start);
      continue;
    }
    start = end;
    have_last = true;
    last_end = end;
    matches->emplace_back(static_cast<uint32_t>(begin), static_cast<uint32_t>(end));
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
