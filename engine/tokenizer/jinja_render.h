// The render of one template: scopes, evaluation of the syntax tree, limits. Internal to the
// Jinja renderer (engine/tokenizer/jinja_template.h); builtins reach back into it to call
// macros and callers and to check limits.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_RENDER_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_RENDER_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/tokenizer/jinja_ast.h"
#include "engine/tokenizer/jinja_template.h"
#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {

// Variables visible at one point: this scope's, then its parent's.
struct Scope {
  ValueDict vars;
  Scope* parent = nullptr;

  const Value* Find(std::string_view name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent) {
      if (const Value* v = s->vars.Find(name)) return v;
    }
    return nullptr;
  }
};

class Renderer {
 public:
  Renderer(const RenderLimits& limits, absl::Time now) : limits_(limits), now_(now) {}

  // Renders `body` in `scope` (the root scope holds the context and globals).
  absl::StatusOr<std::string> RenderRoot(const Body& body, Scope* scope);

  // Calls `fn` with `args` (the builtins use it to call a value passed to them).
  absl::StatusOr<Value> Call(const Value& fn, CallArgs& args);

  // Fails once a string of `bytes` bytes would pass the output limit.
  absl::Status CheckSize(size_t bytes) const;

  absl::Time now() const { return now_; }

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  absl::StatusOr<Flow> Exec(const Body& body, Scope* scope, std::string* out);
  absl::StatusOr<Flow> ExecStmt(const Stmt& stmt, Scope* scope, std::string* out);
  absl::StatusOr<Flow> ExecFor(const Stmt& stmt, Scope* scope, std::string* out);
  absl::Status ExecSet(const Stmt& stmt, Scope* scope);
  // A callable that renders `stmt`'s body with its parameters bound (a macro, or a call
  // block's `caller`), in a scope under the root.
  Value MakeMacro(const Stmt& stmt, std::string name);
  absl::StatusOr<Value> Eval(const Expr& expr, Scope* scope);
  absl::StatusOr<Value> EvalBinary(const Expr& expr, const Value& a, const Value& b);
  absl::StatusOr<bool> EvalCompare(const std::string& op, const Value& a, const Value& b);
  absl::Status EvalArgs(const Expr& expr, size_t first, Scope* scope, CallArgs* args);
  absl::Status Step();
  absl::Status CheckNesting() const;

  const RenderLimits& limits_;
  absl::Time now_;
  int64_t steps_ = 0;
  int depth_ = 0;
  Scope* root_ = nullptr;  // The template's top-level scope, which macros see.
  // Statements and expressions being evaluated, one inside the other: bounds the stack a
  // render uses, whatever mix of macro recursion and nesting a template has. A level of macro
  // recursion costs 1-2 KB of stack in the release build and about 10x that under
  // AddressSanitizer (1024 levels crashed a 1 MB thread stack, and under ASan the default 8 MB
  // one; 2026-12-06), so 256 levels stay within 0.5 MB (4 MB under ASan): a render on any thread
  // ends with the limit's error, not a crash. Chat templates nest a few levels.
  int nesting_ = 0;
  static constexpr int kMaxNesting = 256;
};

// Prefixes a status message with "line N: " (unless it already names a line).
absl::Status AtLine(const absl::Status& status, int line);

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_RENDER_H_
