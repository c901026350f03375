// The syntax tree of a parsed Jinja template (engine/tokenizer/jinja_parser.h builds it,
// engine/tokenizer/jinja_render.h walks it). Internal to the Jinja renderer.
#ifndef SIEVE_ENGINE_TOKENIZER_JINJA_AST_H_
#define SIEVE_ENGINE_TOKENIZER_JINJA_AST_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/tokenizer/jinja_value.h"

namespace sieve::engine::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

// One expression node. Which fields a node uses depends on its kind (see each kind).
struct Expr {
  enum class Kind {
    kLiteral,  // literal
    kName,     // name
    kList,     // args: items
    kTuple,    // args: items
    kDict,     // args: key0, value0, key1, value1, ...
    kAttr,     // args[0].name
    kItem,     // args[0][args[1]]
    kSlice,    // args[0][args[1]:args[2]:args[3]], each bound may be null
    kCall,     // args[0](args[1..], kwargs)
    kFilter,   // args[0] | name(args[1..], kwargs)
    kTest,     // args[0] is [not] name(args[1..])
    kNeg,      // -args[0]
    kPos,      // +args[0]
    kNot,      // not args[0]
    kBinary,   // args[0] name args[1], name one of + - * / // % ** ~
    kCompare,  // args[0] ops[0] args[1] ops[1] args[2] ... (Python's chained comparison)
    kAnd,      // args[0] and args[1]
    kOr,       // args[0] or args[1]
    kCond,     // args[0] if args[1] else args[2] (args[2] may be null)
  };
  Kind kind = Kind::kLiteral;
  int line = 0;   // Template line of the node, 1-based.
  int depth = 1;  // Height of the subtree (a leaf is 1); the parser bounds it.
  std::string name;
  Value literal;
  bool negated = false;  // kTest: `is not`.
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;  // kCompare: "==", "!=", "<", "<=", ">", ">=", "in", "not in".
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

// A parameter of a macro or call block: its name and default (null: required).
struct Param {
  std::string name;
  ExprPtr default_value;
};

// One statement node.
struct Stmt {
  enum class Kind {
    kText,       // text: literal template text
    kOutput,     // {{ expr }}
    kIf,         // branches: (condition, body)...; a null condition is the else branch
    kFor,        // for targets in expr [if filter]: body [else: else_body]
    kSet,        // set targets = expr, or set targets[0].attr = expr (attr non-empty)
    kSetBlock,   // set targets[0]: body rendered into a string
    kMacro,      // macro name(params): body
    kCallBlock,  // call(params) expr: body (the body is `caller`)
    kBreak,
    kContinue,
    kScope,      // body rendered as is (Hugging Face's {% generation %} block)
  };
  Kind kind = Kind::kText;
  int line = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr filter;
  std::vector<std::pair<ExprPtr, Body>> branches;
  std::vector<std::string> targets;
  std::string attr;
  std::string name;
  std::vector<Param> params;
  Body body;
  Body else_body;
};

}  // namespace sieve::engine::jinja

#endif  // SIEVE_ENGINE_TOKENIZER_JINJA_AST_H_
