// Parses a Jinja template into a syntax tree (engine/tokenizer/jinja_ast.h). Internal to the Jinja
// renderer; engine/tokenizer/jinja_template.h is the public face.
//
// Statements: if / elif / else, for (tuple targets, `if` filter, else), set (names, tuples,
// `ns.attr`, block set), macro, call, break, continue, Hugging Face's generation block.
// Expressions: literals (strings, ints, floats, true/false/none, lists, tuples, dicts), names,
// attributes, subscripts and slices, calls with keyword arguments, filters, tests (`is [not]`),
// arithmetic (+ - * / // % **), `~`, comparisons (chained), in / not in, and / or / not, and
// conditional expressions, with Jinja's precedence.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_PARSER_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_PARSER_H_

#include <string_view>

#include "absl/status/statusor.h"
#include "engine/tokenizer/jinja_ast.h"

namespace sieve::engine::jinja {

// Parses `source`. InvalidArgument ("line N: ...") for a syntax error, an unknown tag, filter or
// test, a block left open, or nesting deeper than `max_depth` (statements plus expressions).
absl::StatusOr<Body> Parse(std::string_view source, int max_depth);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_PARSER_H_
