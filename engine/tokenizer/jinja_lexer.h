// Splits a Jinja template into tokens: literal text and the tokens of `{{ }}` / `{% %}` tags
// (comments `{# #}` are dropped), applying whitespace control as Hugging Face's chat-template
// environment does: trim_blocks (the first newline after a block or comment tag is removed),
// lstrip_blocks (spaces and tabs before a block or comment tag on its line are removed, unless
// the tag opens with `+`), `-` on either side of a tag (all whitespace on that side removed), and
// Jinja's defaults: "\r\n" and "\r" read as "\n", one trailing newline of the template dropped.
// Internal to the Jinja renderer.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_LEXER_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_LEXER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace sieve::engine::jinja {

struct Token {
  enum class Type {
    kText,        // text: template text to print as is
    kVarBegin,    // {{
    kVarEnd,      // }}
    kBlockBegin,  // {%
    kBlockEnd,    // %}
    kName,        // text: identifier (also keywords: if, for, and, not, ...)
    kString,      // text: the unescaped string literal
    kInt,         // int_value
    kFloat,       // float_value
    kOp,          // text: operator or punctuation (+ - * / // % ** ~ | . , : = ( ) [ ] { } == ...)
    kEnd,         // end of the template
  };
  Type type = Type::kEnd;
  std::string text;
  int64_t int_value = 0;
  double float_value = 0;
  int line = 0;  // 1-based line where the token starts.
};

// Tokenizes `source`. InvalidArgument ("line N: ...") for an unclosed tag, comment or string, a
// character that starts no token, or unbalanced brackets inside a tag.
absl::StatusOr<std::vector<Token>> Lex(std::string_view source);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_LEXER_H_
