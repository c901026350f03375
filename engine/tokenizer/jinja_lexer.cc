#include "engine/tokenizer/jinja_lexer.h"

#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {
namespace {

absl::Status LexError(int line, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("line ", line, ": ", absl::string_view(what.data(), what.size())));
}

int CountNewlines(std::string_view s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// Removes trailing Python whitespace from `text`.
void RStripSpace(std::string* text) {
  size_t end = text->size();
  size_t pos = 0;
  size_t keep = 0;
  while (pos < end) {
    const char32_t c = NextCodePoint(*text, &pos);
    if (!IsPythonSpace(c)) keep = pos;
  }
  text->resize(keep);
}

// Returns the position after the Python whitespace that starts at `pos`.
size_t SkipSpace(std::string_view s, size_t pos) {
  while (pos < s.size()) {
    size_t next = pos;
    if (!IsPythonSpace(NextCodePoint(s, &next))) break;
    pos = next;
  }
  return pos;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Unescapes a string literal's body as Python's "unicode-escape" codec does (what Jinja uses):
// \\ \' \" \n \t \r \b \f \v \a, octal \ooo, \xhh, \uhhhh, \Uhhhhhhhh, backslash-newline;
// any other backslash stays.
std::string Unescape(std::string_view body) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 >= body.size()) {
      out.push_back(body[i]);
      continue;
    }
    const char e = body[i + 1];
    const auto simple = [&](char c) {
      out.push_back(c);
      ++i;
    };
    switch (e) {
      case '\\': simple('\\'); continue;
      case '\'': simple('\''); continue;
      case '"': simple('"'); continue;
      case 'n': simple('\n'); continue;
      case 't': simple('\t'); continue;
      case 'r': simple('\r'); continue;
      case 'b': simple('\b'); continue;
      case 'f': simple('\f'); continue;
      case 'v': simple('\v'); continue;
      case 'a': simple('\a'); continue;
      case '\n': ++i; continue;
      default: break;
    }
    if (e >= '0' && e <= '7') {
      int value = 0;
      size_t j = i + 1;
      for (; j < body.size() && j < i + 4 && body[j] >= '0' && body[j] <= '7'; ++j) {
        value = value * 8 + (body[j] - '0');
      }
      AppendUtf8(static_cast<char32_t>(value), &out);
      i = j - 1;
      continue;
    }
    const int digits = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
    if (digits > 0 && i + 2 + digits <= body.size()) {
      char32_t value = 0;
      bool ok = true;
      for (int k = 0; k < digits; ++k) {
        const int h = HexValue(body[i + 2 + k]);
        if (h < 0) ok = false;
        value = value * 16 + static_cast<char32_t>(h < 0 ? 0 : h);
      }
      if (ok && value <= 0x10ffff) {
        AppendUtf8(value, &out);
        i += 1 + digits;
        continue;
      }
    }
    out.push_back('\\');  // Unknown escape: kept as written.
  }
  return out;
}

bool IsNameStart(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// Like SIEVE_ASSIGN_OR_RETURN for the lexer's one use.
#define SIEVE_LEX_ASSIGN(lhs, expr)                       \
  {                                                       \
    auto lex_result_ = (expr);                            \
    if (!lex_result_.ok()) return lex_result_.status();   \
    lhs = *lex_result_;                                   \
  }

class Lexer {
 public:
  explicit Lexer(std::string source) : src_(std::move(source)) {}

  absl::StatusOr<std::vector<Token>> Run() {
    size_t pos = 0;
    bool line_starting = true;
    while (pos < src_.size()) {
      size_t tag = FindTag(pos);
      std::string text = src_.substr(pos, (tag == std::string::npos ? src_.size() : tag) - pos);
      if (tag == std::string::npos) {
        EmitText(std::move(text));
        break;
      }
      const char kind = src_[tag + 1];
      const char mod = tag + 2 < src_.size() ? src_[tag + 2] : '\0';
      if (mod == '-') {
        RStripSpace(&text);
      } else if (mod != '+' && kind != '{') {
        // lstrip_blocks: drop the spaces and tabs that open the tag's line.
        const size_t line_start = text.rfind('\n') + 1;  // npos + 1 == 0.
        if (line_start > 0 || line_starting) {
          if (text.find_first_not_of(" \t", line_start) == std::string::npos) {
            text.resize(line_start);
          }
        }
      }
      EmitText(std::move(text));
      line_ += CountNewlines(std::string_view(src_).substr(pos, tag - pos));
      size_t body = tag + 2 + (mod == '-' || mod == '+' ? 1 : 0);
      size_t end = 0;
      if (kind == '#') {
        const size_t close = src_.find("#}", body);
        if (close == std::string::npos) return LexError(line_, "unclosed comment");
        const char before = close > body ? src_[close - 1] : '\0';
        end = close + 2;
        if (before == '-') {
          end = SkipSpace(src_, end);
        } else if (before != '+' && end < src_.size() && src_[end] == '\n') {
          ++end;
        }
      } else {
        SIEVE_LEX_ASSIGN(end, LexTag(kind, body));
      }
      line_ += CountNewlines(std::string_view(src_).substr(tag, end - tag));
      line_starting = end > 0 && src_[end - 1] == '\n';
      pos = end;
    }
    tokens_.push_back(Token{Token::Type::kEnd, "", 0, 0, line_});
    return std::move(tokens_);
  }

 private:
  size_t FindTag(size_t pos) const {
    while (true) {
      pos = src_.find('{', pos);
      if (pos == std::string::npos || pos + 1 >= src_.size()) return std::string::npos;
      const char next = src_[pos + 1];
      if (next == '{' || next == '%' || next == '#') return pos;
      ++pos;
    }
  }

  void EmitText(std::string text) {
    if (text.empty()) return;
    Token t;
    t.type = Token::Type::kText;
    t.line = line_;
    t.text = std::move(text);
    tokens_.push_back(std::move(t));
  }

  void Emit(Token::Type type, std::string text, int line) {
    Token t;
    t.type = type;
    t.text = std::move(text);
    t.line = line;
    tokens_.push_back(std::move(t));
  }

  // Lexes the inside of a {{ }} or {% %} tag from `pos`; returns the position after its end
  // (and the whitespace its `-` or trim_blocks removes).
  absl::StatusOr<size_t> LexTag(char kind, size_t pos) {
    const bool block = kind == '%';
    Emit(block ? Token::Type::kBlockBegin : Token::Type::kVarBegin, "", line_);
    const char closer = block ? '%' : '}';
    int line = line_;
    std::vector<char> brackets;
    while (true) {
      while (pos < src_.size() && (src_[pos] == ' ' || src_[pos] == '\t' || src_[pos] == '\n' ||
                                   src_[pos] == '\r')) {
        line += src_[pos] == '\n';
        ++pos;
      }
      if (pos >= src_.size()) {
        return LexError(line_, block ? "unclosed block tag '{%'" : "unclosed tag '{{'");
      }
      const std::string_view rest = std::string_view(src_).substr(pos);
      const bool at_end = rest.size() >= 2 && rest[0] == closer && rest[1] == '}';
      const bool at_strip_end = rest.size() >= 3 && (rest[0] == '-' || rest[0] == '+') &&
                                rest[1] == closer && rest[2] == '}';
      if (brackets.empty() && (at_end || at_strip_end)) {
        Emit(block ? Token::Type::kBlockEnd : Token::Type::kVarEnd, "", line);
        size_t end = pos + (at_end ? 2 : 3);
        if (at_strip_end && rest[0] == '-') {
          end = SkipSpace(src_, end);
        } else if (block && at_end && end < src_.size() && src_[end] == '\n') {
          ++end;  // trim_blocks.
        }
        return end;
      }
      const char c = src_[pos];
      if (IsNameStart(c)) {
        size_t end = pos;
        while (end < src_.size() && (IsNameStart(src_[end]) || IsDigit(src_[end]))) ++end;
        Emit(Token::Type::kName, src_.substr(pos, end - pos), line);
        pos = end;
      } else if (IsDigit(c)) {
        pos = LexNumber(pos, line);
      } else if (c == '\'' || c == '"') {
        size_t end = pos + 1;
        while (end < src_.size() && src_[end] != c) end += src_[end] == '\\' ? 2 : 1;
        if (end >= src_.size()) return LexError(line, "unclosed string literal");
        const std::string raw = src_.substr(pos + 1, end - pos - 1);
        Emit(Token::Type::kString, Unescape(raw), line);
        line += CountNewlines(raw);
        pos = end + 1;
      } else {
        static constexpr std::string_view kTwo[] = {"//", "**", "==", "!=", "<=", ">="};
        std::string op(1, c);
        for (std::string_view two : kTwo) {
          if (rest.substr(0, 2) == two) op = std::string(two);
        }
        if (op.size() == 1 && std::string_view("+-*/%~|.,:=()[]{}<>").find(c) ==
                                  std::string_view::npos) {
          return LexError(line, absl::StrCat("unexpected character '", op, "' in tag"));
        }
        if (c == '(' || c == '[' || c == '{') brackets.push_back(c);
        if (c == ')' || c == ']' || c == '}') {
          const char open = c == ')' ? '(' : c == ']' ? '[' : '{';
          if (brackets.empty() || brackets.back() != open) {
            return LexError(line, absl::StrCat("unbalanced '", op, "'"));
          }
          brackets.pop_back();
        }
        Emit(Token::Type::kOp, op, line);
        pos += op.size();
      }
    }
  }

  size_t LexNumber(size_t pos, int line) {
    size_t end = pos;
    while (end < src_.size() && (IsDigit(src_[end]) || src_[end] == '_')) ++end;
    bool is_float = false;
    // After a '.', digits are an index (`x.0`), never a float's fraction.
    const bool after_dot = !tokens_.empty() && tokens_.back().type == Token::Type::kOp &&
                           tokens_.back().text == ".";
    if (!after_dot && end + 1 < src_.size() && src_[end] == '.' && IsDigit(src_[end + 1])) {
      is_float = true;
      ++end;
      while (end < src_.size() && (IsDigit(src_[end]) || src_[end] == '_')) ++end;
    }
    if (!after_dot && end < src_.size() && (src_[end] == 'e' || src_[end] == 'E')) {
      size_t e = end + 1;
      if (e < src_.size() && (src_[e] == '+' || src_[e] == '-')) ++e;
      if (e < src_.size() && IsDigit(src_[e])) {
        is_float = true;
        end = e;
        while (end < src_.size() && IsDigit(src_[end])) ++end;
      }
    }
    std::string text;
    for (size_t i = pos; i < end; ++i) {
      if (src_[i] != '_') text.push_back(src_[i]);
    }
    Token t;
    t.line = line;
    t.text = text;
    if (is_float) {
      t.type = Token::Type::kFloat;
      t.float_value = std::strtod(text.c_str(), nullptr);
    } else {
      t.type = Token::Type::kInt;
      t.int_value = std::strtoll(text.c_str(), nullptr, 10);
    }
    tokens_.push_back(std::move(t));
    return end;
  }
#undef SIEVE_LEX_ASSIGN

  std::string src_;
  std::vector<Token> tokens_;
  int line_ = 1;  // Line of the position being lexed.
};

}  // namespace

absl::StatusOr<std::vector<Token>> Lex(std::string_view source) {
  // Jinja reads "\r\n" and "\r" as "\n" and drops one trailing newline (keep_trailing_newline
  // is off).
  std::string normalized;
  normalized.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      normalized.push_back('\n');
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      normalized.push_back(source[i]);
    }
  }
  if (!normalized.empty() && normalized.back() == '\n') normalized.pop_back();
  return Lexer(std::move(normalized)).Run();
}

}  // namespace sieve::engine::jinja
