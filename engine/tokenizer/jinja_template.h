// A small Jinja renderer for chat templates: the subset of Jinja2 that the chat templates of
// Llama 3.x, Qwen2.5/3, Mistral, Gemma 2/3 and DeepSeek-V3 use, with the environment Hugging
// Face's transformers renders them in (an immutable sandbox with trim_blocks, lstrip_blocks and
// the loop controls; `raise_exception`, `strftime_now` and a `tojson` without key sorting or
// HTML escaping).
//
// Supported (see engine/tokenizer/jinja_parser.h for the grammar): {{ }}, {% %}, {# #} with
// `-` / `+` whitespace control; if / elif / else; for with loop.index, index0, revindex,
// revindex0, first, last, length, previtem, nextitem, cycle(), an `if` filter and else; set
// (also tuples, namespace attributes and block set); macros (defaults, keyword arguments,
// caller() from a call block); break / continue; the filters and tests listed in
// engine/tokenizer/jinja_builtins.h; string, dict and list methods; the globals namespace(),
// range(), dict(), raise_exception() and strftime_now().
// Scoping is Jinja's: a for-loop iteration and a macro call get a fresh scope, so `set` inside
// them is not seen outside (a namespace carries values out).
//
// Not supported (a parse error names them): extends / block / include / import, recursive
// loops, filter blocks, `*args` / `**kwargs`. Differences from Jinja2: select / reject /
// selectattr / rejectattr / map return lists rather than generators (so `|length` works on them
// directly); upper / lower / title / capitalize change ASCII letters only.
//
// Errors are absl statuses naming the template line: InvalidArgument for syntax (at parse) and
// for what fails while rendering (an undefined value used, a type error, a limit); a template's
// raise_exception("msg") is InvalidArgument with message "msg" (see ChatTemplate for the
// prefix it gets on the way to a client).
//
// Thread-safety: a Template is immutable after Parse; Render may be called from any number of
// threads at once.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_TEMPLATE_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_TEMPLATE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/tokenizer/jinja_ast.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {

// The payload key that marks a status raised by the template's raise_exception().
inline constexpr char kRaisedPayload[] = "sieve.jinja/raise_exception";

// Deepest nesting of statements, and height of an expression, that Parse accepts.
inline constexpr int kMaxParseDepth = 256;

// Bounds on what a (possibly hostile) template may do.
struct RenderLimits {
  // Most bytes of output, and of any one string a render builds.
  size_t max_output_bytes = size_t{64} << 20;
  // Deepest nesting of macro calls. (Independently, a template's statements and expressions
  // may nest at most kMaxParseDepth deep, and a render's statements, expressions and macro
  // calls together at most 1024 deep.)
  int max_depth = 64;
  // Most evaluation steps (statements, expressions and loop iterations) of one render.
  int64_t max_steps = 20'000'000;
};

class Template {
 public:
  // Parses `source`; InvalidArgument ("line N: ...") on a syntax error or unsupported construct.
  static absl::StatusOr<std::unique_ptr<Template>> Parse(std::string_view source,
                                                         const RenderLimits& limits = {});

  // Renders with the variables `context` (a template's top-level names); `now` is what
  // strftime_now() formats.
  absl::StatusOr<std::string> Render(const ValueDict& context, absl::Time now) const;

  const RenderLimits& limits() const { return limits_; }

 private:
  Template() = default;

  Body body_;
  RenderLimits limits_;
};

// Converts JSON text into a Value (objects keep their key order); InvalidArgument if it is
// not JSON. For tests and for callers that hold messages as JSON.
absl::StatusOr<Value> ValueFromJson(std::string_view json);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_TEMPLATE_H_
