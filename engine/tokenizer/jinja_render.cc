#include "engine/tokenizer/jinja_render.h"

#include <cmath>
#include <limits>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/jinja_builtins.h"
#include "engine/tokenizer/jinja_parser.h"
#include "nlohmann/json.hpp"

namespace sieve::engine::jinja {
namespace {

absl::Status TypeError(std::string_view what) {
  return absl::InvalidArgumentError(absl::string_view(what.data(), what.size()));
}

// The error of using an undefined value: what was undefined, as the value recorded it.
absl::Status UndefinedError(const Value& v) {
  return absl::InvalidArgumentError(v.str().empty() ? "an undefined value was used" : v.str());
}

bool IsNumeric(const Value& v) { return v.is_number() || v.kind() == Value::Kind::kBool; }
bool IsFloat(const Value& v) { return v.kind() == Value::Kind::kFloat; }

absl::StatusOr<bool> Contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::kString:
      if (!item.is_string()) {
        return TypeError(absl::StrCat("'in <string>' requires string as left operand, not ",
                                      item.TypeName()));
      }
      return container.str().find(item.str()) != std::string::npos;
    case Value::Kind::kList:
      for (const Value& v : container.list()) {
        if (Equal(v, item)) return true;
      }
      return false;
    case Value::Kind::kDict:
      return item.is_string() && container.dict().Find(item.str()) != nullptr;
    case Value::Kind::kUndefined:
      return false;
    default:
      return TypeError(
          absl::StrCat("argument of type '", container.TypeName(), "' is not iterable"));
  }
}

absl::StatusOr<Value> Repeat(const Value& seq, int64_t times, size_t max_bytes) {
  if (times <= 0) return seq.is_string() ? Value::String("") : Value::List({});
  if (seq.is_string()) {
    if (seq.str().size() * static_cast<uint64_t>(times) > max_bytes) {
      return absl::InvalidArgumentError("a string repetition exceeds the output limit");
    }
    std::string out;
    for (int64_t i = 0; i < times; ++i) out += seq.str();
    return Value::String(std::move(out));
  }
  if (seq.list().size() * static_cast<uint64_t>(times) > max_bytes) {
    return absl::InvalidArgumentError("a list repetition exceeds the output limit");
  }
  ValueList out;
  for (int64_t i = 0; i < times; ++i) out.insert(out.end(), seq.list().begin(), seq.list().end());
  return Value::List(std::move(out));
}

// Counts one level of nesting for as long as it lives.
struct NestingGuard {
  explicit NestingGuard(int* n) : n(n) { ++*n; }
  ~NestingGuard() { --*n; }
  int* n;
};

}  // namespace

absl::Status AtLine(const absl::Status& status, int line) {
  if (status.ok() || absl::StartsWith(status.message(), "line ") ||
      status.GetPayload(kRaisedPayload).has_value()) {
    return status;
  }
  return absl::Status(status.code(), absl::StrCat("line ", line, ": ", status.message()));
}

absl::Status Renderer::Step() {
  if (++steps_ > limits_.max_steps) {
    return absl::InvalidArgumentError(
        absl::StrCat("the template ran past its limit of ", limits_.max_steps, " steps"));
  }
  return absl::OkStatus();
}

absl::Status Renderer::CheckNesting() const {
  if (nesting_ > kMaxNesting) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the template nests statements, expressions and macro calls deeper than ", kMaxNesting,
        " levels"));
  }
  return absl::OkStatus();
}

absl::Status Renderer::CheckSize(size_t bytes) const {
  if (bytes > limits_.max_output_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the template's output passed its limit of ",
                                                   limits_.max_output_bytes, " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Renderer::RenderRoot(const Body& body, Scope* scope) {
  root_ = scope;
  std::string out;
  SIEVE_RETURN_IF_ERROR(Exec(body, scope, &out).status());
  return out;
}

absl::StatusOr<Renderer::Flow> Renderer::Exec(const Body& body, Scope* scope, std::string* out) {
  for (const StmtPtr& stmt : body) {
    SIEVE_ASSIGN_OR_RETURN(Flow flow, ExecStmt(*stmt, scope, out));
    if (flow != Flow::kNormal) return flow;
    SIEVE_RETURN_IF_ERROR(CheckSize(out->size()));
  }
  return Flow::kNormal;
}

absl::StatusOr<Renderer::Flow> Renderer::ExecStmt(const Stmt& stmt, Scope* scope,
                                                  std::string* out) {
  SIEVE_RETURN_IF_ERROR(AtLine(Step(), stmt.line));
  NestingGuard nesting(&nesting_);
  SIEVE_RETURN_IF_ERROR(AtLine(CheckNesting(), stmt.line));
  switch (stmt.kind) {
    case Stmt::Kind::kText:
      out->append(stmt.text);
      return Flow::kNormal;
    case Stmt::Kind::kOutput: {
      SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*stmt.expr, scope));
      if (v.is_string()) {
        out->append(v.str());
      } else {
        out->append(v.ToString());
      }
      return Flow::kNormal;
    }
    case Stmt::Kind::kIf:
      for (const auto& [cond, body] : stmt.branches) {
        bool taken = cond == nullptr;
        if (!taken) {
          SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*cond, scope));
          taken = v.Truthy();
        }
        if (taken) return Exec(body, scope, out);
      }
      return Flow::kNormal;
    case Stmt::Kind::kFor:
      return ExecFor(stmt, scope, out);
    case Stmt::Kind::kSet:
      SIEVE_RETURN_IF_ERROR(ExecSet(stmt, scope));
      return Flow::kNormal;
    case Stmt::Kind::kSetBlock: {
      std::string text;
      SIEVE_RETURN_IF_ERROR(Exec(stmt.body, scope, &text).status());
      scope->vars.Set(stmt.targets[0], Value::String(std::move(text)));
      return Flow::kNormal;
    }
    case Stmt::Kind::kMacro:
      scope->vars.Set(stmt.name, MakeMacro(stmt, stmt.name));
      return Flow::kNormal;
    case Stmt::Kind::kCallBlock: {
      const Expr& call = *stmt.expr;
      SIEVE_ASSIGN_OR_RETURN(Value fn, Eval(*call.args[0], scope));
      CallArgs args;
      SIEVE_RETURN_IF_ERROR(EvalArgs(call, 1, scope, &args));
      args.keyword.emplace_back("caller", MakeMacro(stmt, "caller"));
      absl::StatusOr<Value> result = Call(fn, args);
      if (!result.ok()) return AtLine(result.status(), stmt.line);
      out->append(result->ToString());
      return Flow::kNormal;
    }
    case Stmt::Kind::kBreak:
      return Flow::kBreak;
    case Stmt::Kind::kContinue:
      return Flow::kContinue;
    case Stmt::Kind::kScope:
      return Exec(stmt.body, scope, out);
  }
  return Flow::kNormal;
}

namespace {

// Binds one item to the loop's (or set's) target names, unpacking when there are several.
absl::Status BindTargets(const std::vector<std::string>& targets, const Value& item,
                         ValueDict* vars) {
  if (targets.size() == 1) {
    vars->Set(targets[0], item);
    return absl::OkStatus();
  }
  SIEVE_ASSIGN_OR_RETURN(ValueList parts, Iterate(item));
  if (parts.size() != targets.size()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot unpack ", parts.size(),
                                                   " values into ", targets.size(), " names"));
  }
  for (size_t i = 0; i < parts.size(); ++i) vars->Set(targets[i], parts[i]);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Renderer::Flow> Renderer::ExecFor(const Stmt& stmt, Scope* scope,
                                                 std::string* out) {
  SIEVE_ASSIGN_OR_RETURN(Value iterable, Eval(*stmt.expr, scope));
  absl::StatusOr<ValueList> all = Iterate(iterable);
  if (!all.ok()) return AtLine(all.status(), stmt.line);
  ValueList items;
  if (stmt.filter == nullptr) {
    items = *std::move(all);
  } else {
    for (Value& item : *all) {
      Scope probe{{}, scope};
      SIEVE_RETURN_IF_ERROR(AtLine(BindTargets(stmt.targets, item, &probe.vars), stmt.line));
      SIEVE_ASSIGN_OR_RETURN(Value keep, Eval(*stmt.filter, &probe));
      if (keep.Truthy()) items.push_back(std::move(item));
    }
  }
  if (items.empty()) return Exec(stmt.else_body, scope, out);
  auto info = std::make_shared<LoopInfo>();
  info->items = std::make_shared<const ValueList>(std::move(items));
  for (size_t i = 0; i < info->items->size(); ++i) {
    SIEVE_RETURN_IF_ERROR(AtLine(Step(), stmt.line));
    info->index0 = static_cast<int64_t>(i);
    Scope iteration{{}, scope};  // Each iteration starts from the enclosing scope afresh.
    SIEVE_RETURN_IF_ERROR(
        AtLine(BindTargets(stmt.targets, (*info->items)[i], &iteration.vars), stmt.line));
    iteration.vars.Set("loop", Value::Loop(info));
    SIEVE_ASSIGN_OR_RETURN(Flow flow, Exec(stmt.body, &iteration, out));
    if (flow == Flow::kBreak) break;
  }
  return Flow::kNormal;
}

absl::Status Renderer::ExecSet(const Stmt& stmt, Scope* scope) {
  SIEVE_ASSIGN_OR_RETURN(Value value, Eval(*stmt.expr, scope));
  if (!stmt.attr.empty()) {
    const Value* target = scope->Find(stmt.targets[0]);
    if (target == nullptr || target->kind() != Value::Kind::kNamespace) {
      return AtLine(absl::InvalidArgumentError(absl::StrCat(
                        "cannot assign attribute '", stmt.attr, "' of '", stmt.targets[0],
                        "': it is not a namespace")),
                    stmt.line);
    }
    target->namespace_attributes().Set(stmt.attr, std::move(value));
    return absl::OkStatus();
  }
  return AtLine(BindTargets(stmt.targets, value, &scope->vars), stmt.line);
}

Value Renderer::MakeMacro(const Stmt& stmt, std::string name) {
  const Stmt* def = &stmt;
  return Value::Callable(name, [def, name](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
    if (r.depth_ >= r.limits_.max_depth) {
      return absl::InvalidArgumentError(
          absl::StrCat("macro calls nest deeper than ", r.limits_.max_depth, " levels"));
    }
    // A macro sees the template's top-level names and its own arguments.
    Scope local{{}, r.root_};
    if (args.positional.size() > def->params.size()) {
      return absl::InvalidArgumentError(absl::StrCat("macro '", name, "' takes at most ",
                                                     def->params.size(), " arguments, got ",
                                                     args.positional.size()));
    }
    for (size_t i = 0; i < args.positional.size(); ++i) {
      local.vars.Set(def->params[i].name, args.positional[i]);
    }
    for (auto& [key, value] : args.keyword) {
      bool known = key == "caller";
      for (const Param& p : def->params) known = known || p.name == key;
      if (!known) {
        return absl::InvalidArgumentError(
            absl::StrCat("macro '", name, "' has no parameter named '", key, "'"));
      }
      local.vars.Set(key, value);
    }
    for (const Param& p : def->params) {
      if (local.vars.Find(p.name) != nullptr) continue;
      if (p.default_value != nullptr) {
        SIEVE_ASSIGN_OR_RETURN(Value v, r.Eval(*p.default_value, &local));
        local.vars.Set(p.name, std::move(v));
      } else {
        local.vars.Set(p.name, Value::Undefined(absl::StrCat("'", p.name, "' is undefined")));
      }
    }
    ++r.depth_;
    std::string text;
    absl::StatusOr<Flow> flow = r.Exec(def->body, &local, &text);
    --r.depth_;
    if (!flow.ok()) return flow.status();
    return Value::String(std::move(text));
  });
}

absl::StatusOr<Value> Renderer::Call(const Value& fn, CallArgs& args) {
  if (fn.is_undefined()) return UndefinedError(fn);
  if (fn.kind() != Value::Kind::kCallable) {
    return TypeError(absl::StrCat("'", fn.TypeName(), "' object is not callable"));
  }
  return fn.function()(*this, args);
}

absl::Status Renderer::EvalArgs(const Expr& expr, size_t first, Scope* scope, CallArgs* args) {
  for (size_t i = first; i < expr.args.size(); ++i) {
    SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*expr.args[i], scope));
    args->positional.push_back(std::move(v));
  }
  for (const auto& [name, value_expr] : expr.kwargs) {
    SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*value_expr, scope));
    args->keyword.emplace_back(name, std::move(v));
  }
  return absl::OkStatus();
}

absl::StatusOr<Value> Renderer::Eval(const Expr& expr, Scope* scope) {
  SIEVE_RETURN_IF_ERROR(AtLine(Step(), expr.line));
  NestingGuard nesting(&nesting_);
  SIEVE_RETURN_IF_ERROR(AtLine(CheckNesting(), expr.line));
  const auto at = [&](absl::StatusOr<Value> v) -> absl::StatusOr<Value> {
    if (!v.ok()) return AtLine(v.status(), expr.line);
    return v;
  };
  switch (expr.kind) {
    case Expr::Kind::kLiteral:
      return expr.literal;
    case Expr::Kind::kName: {
      const Value* v = scope->Find(expr.name);
      if (v != nullptr) return *v;
      return Value::Undefined(absl::StrCat("'", expr.name, "' is undefined"));
    }
    case Expr::Kind::kList:
    case Expr::Kind::kTuple: {
      ValueList items;
      for (const ExprPtr& e : expr.args) {
        SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*e, scope));
        items.push_back(std::move(v));
      }
      return expr.kind == Expr::Kind::kTuple ? Value::Tuple(std::move(items))
                                             : Value::List(std::move(items));
    }
    case Expr::Kind::kDict: {
      ValueDict dict;
      for (size_t i = 0; i + 1 < expr.args.size(); i += 2) {
        SIEVE_ASSIGN_OR_RETURN(Value key, Eval(*expr.args[i], scope));
        if (!key.is_string()) {
          return AtLine(TypeError("dict literal keys must be strings"), expr.line);
        }
        SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*expr.args[i + 1], scope));
        dict.Set(key.str(), std::move(v));
      }
      return Value::Dict(std::move(dict));
    }
    case Expr::Kind::kAttr: {
      SIEVE_ASSIGN_OR_RETURN(Value obj, Eval(*expr.args[0], scope));
      return at(GetAttr(obj, expr.name));
    }
    case Expr::Kind::kItem: {
      SIEVE_ASSIGN_OR_RETURN(Value obj, Eval(*expr.args[0], scope));
      SIEVE_ASSIGN_OR_RETURN(Value key, Eval(*expr.args[1], scope));
      return at(GetItem(obj, key));
    }
    case Expr::Kind::kSlice: {
      SIEVE_ASSIGN_OR_RETURN(Value obj, Eval(*expr.args[0], scope));
      Value bounds[3];
      for (int i = 0; i < 3; ++i) {
        if (expr.args[i + 1] != nullptr) {
          SIEVE_ASSIGN_OR_RETURN(bounds[i], Eval(*expr.args[i + 1], scope));
        } else {
          bounds[i] = Value::None();
        }
      }
      return at(GetSlice(obj, bounds[0], bounds[1], bounds[2]));
    }
    case Expr::Kind::kCall: {
      SIEVE_ASSIGN_OR_RETURN(Value fn, Eval(*expr.args[0], scope));
      CallArgs args;
      SIEVE_RETURN_IF_ERROR(EvalArgs(expr, 1, scope, &args));
      return at(Call(fn, args));
    }
    case Expr::Kind::kFilter: {
      SIEVE_ASSIGN_OR_RETURN(Value operand, Eval(*expr.args[0], scope));
      CallArgs args;
      SIEVE_RETURN_IF_ERROR(EvalArgs(expr, 1, scope, &args));
      return at(ApplyFilter(*this, expr.name, operand, args));
    }
    case Expr::Kind::kTest: {
      SIEVE_ASSIGN_OR_RETURN(Value operand, Eval(*expr.args[0], scope));
      CallArgs args;
      SIEVE_RETURN_IF_ERROR(EvalArgs(expr, 1, scope, &args));
      absl::StatusOr<bool> result = ApplyTest(*this, expr.name, operand, args);
      if (!result.ok()) return AtLine(result.status(), expr.line);
      return Value::Bool(*result != expr.negated);
    }
    case Expr::Kind::kNeg:
    case Expr::Kind::kPos: {
      SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*expr.args[0], scope));
      if (v.is_undefined()) return AtLine(UndefinedError(v), expr.line);
      if (!IsNumeric(v)) {
        return AtLine(TypeError(absl::StrCat("bad operand type for unary ",
                                             expr.kind == Expr::Kind::kNeg ? "-" : "+", ": '",
                                             v.TypeName(), "'")),
                      expr.line);
      }
      if (expr.kind == Expr::Kind::kPos) return IsFloat(v) ? v : Value::Int(v.int_value());
      if (IsFloat(v)) return Value::Float(-v.float_value());
      if (v.int_value() == std::numeric_limits<int64_t>::min()) {
        return AtLine(TypeError("integer overflow"), expr.line);
      }
      return Value::Int(-v.int_value());
    }
    case Expr::Kind::kNot: {
      SIEVE_ASSIGN_OR_RETURN(Value v, Eval(*expr.args[0], scope));
      return Value::Bool(!v.Truthy());
    }
    case Expr::Kind::kBinary: {
      SIEVE_ASSIGN_OR_RETURN(Value a, Eval(*expr.args[0], scope));
      SIEVE_ASSIGN_OR_RETURN(Value b, Eval(*expr.args[1], scope));
      return at(EvalBinary(expr, a, b));
    }
    case Expr::Kind::kCompare: {
      SIEVE_ASSIGN_OR_RETURN(Value left, Eval(*expr.args[0], scope));
      for (size_t i = 0; i < expr.ops.size(); ++i) {
        SIEVE_ASSIGN_OR_RETURN(Value right, Eval(*expr.args[i + 1], scope));
        absl::StatusOr<bool> r = EvalCompare(expr.ops[i], left, right);
        if (!r.ok()) return AtLine(r.status(), expr.line);
        if (!*r) return Value::Bool(false);
        left = std::move(right);
      }
      return Value::Bool(true);
    }
    case Expr::Kind::kAnd:
    case Expr::Kind::kOr: {
      SIEVE_ASSIGN_OR_RETURN(Value a, Eval(*expr.args[0], scope));
      if (a.Truthy() == (expr.kind == Expr::Kind::kOr)) return a;
      return Eval(*expr.args[1], scope);
    }
    case Expr::Kind::kCond: {
      SIEVE_ASSIGN_OR_RETURN(Value cond, Eval(*expr.args[1], scope));
      if (cond.Truthy()) return Eval(*expr.args[0], scope);
      if (expr.args[2] != nullptr) return Eval(*expr.args[2], scope);
      return Value::Undefined("the false branch of an 'if' expression without 'else'");
    }
  }
  return Value();
}

absl::StatusOr<Value> Renderer::EvalBinary(const Expr& expr, const Value& a, const Value& b) {
  const std::string& op = expr.name;
  if (op == "~") {
    std::string s = a.ToString() + b.ToString();
    SIEVE_RETURN_IF_ERROR(CheckSize(s.size()));
    return Value::String(std::move(s));
  }
  if (a.is_undefined()) return UndefinedError(a);
  if (b.is_undefined()) return UndefinedError(b);
  const auto unsupported = [&]() {
    return TypeError(absl::StrCat("unsupported operand type(s) for ", op, ": '", a.TypeName(),
                                  "' and '", b.TypeName(), "'"));
  };
  if (IsNumeric(a) && IsNumeric(b)) {
    const bool fl = IsFloat(a) || IsFloat(b);
    const double x = a.AsDouble(), y = b.AsDouble();
    const int64_t i = a.int_value(), j = b.int_value();
    int64_t r = 0;
    if (op == "+") {
      if (fl) return Value::Float(x + y);
      if (__builtin_add_overflow(i, j, &r)) return TypeError("integer overflow");
      return Value::Int(r);
    }
    if (op == "-") {
      if (fl) return Value::Float(x - y);
      if (__builtin_sub_overflow(i, j, &r)) return TypeError("integer overflow");
      return Value::Int(r);
    }
    if (op == "*") {
      if (fl) return Value::Float(x * y);
      if (__builtin_mul_overflow(i, j, &r)) return TypeError("integer overflow");
      return Value::Int(r);
    }
    if (op == "/") {
      if (y == 0) return TypeError("division by zero");
      return Value::Float(x / y);
    }
    if (op == "//" || op == "%") {
      if (y == 0) return TypeError(op == "//" ? "integer division or modulo by zero"
                                              : "modulo by zero");
      if (fl) {
        const double q = std::floor(x / y);
        return Value::Float(op == "//" ? q : x - q * y);
      }
      if (i == std::numeric_limits<int64_t>::min() && j == -1) {
        return TypeError("integer overflow");
      }
      int64_t q = i / j;
      if ((i % j != 0) && ((i < 0) != (j < 0))) --q;
      return Value::Int(op == "//" ? q : i - q * j);
    }
    if (op == "**") {
      if (fl || j < 0) return Value::Float(std::pow(x, y));
      int64_t result = 1;
      for (int64_t k = 0; k < j; ++k) {
        if (__builtin_mul_overflow(result, i, &result)) return TypeError("integer overflow");
        if (result == 0 || result == 1) break;
      }
      return Value::Int(result);
    }
    return unsupported();
  }
  if (op == "+") {
    if (a.is_string() && b.is_string()) {
      SIEVE_RETURN_IF_ERROR(CheckSize(a.str().size() + b.str().size()));
      return Value::String(a.str() + b.str());
    }
    if (a.is_list() && b.is_list()) {
      ValueList items = a.list();
      items.insert(items.end(), b.list().begin(), b.list().end());
      return Value::List(std::move(items));
    }
    if (a.is_string() || a.is_list()) {
      return TypeError(absl::StrCat("can only concatenate ", a.TypeName(), " (not \"",
                                    b.TypeName(), "\") to ", a.TypeName()));
    }
    return unsupported();
  }
  if (op == "*") {
    if ((a.is_string() || a.is_list()) && b.kind() == Value::Kind::kInt) {
      return Repeat(a, b.int_value(), limits_.max_output_bytes);
    }
    if ((b.is_string() || b.is_list()) && a.kind() == Value::Kind::kInt) {
      return Repeat(b, a.int_value(), limits_.max_output_bytes);
    }
  }
  if (op == "%" && a.is_string()) {
    return TypeError("printf-style string formatting ('%') is not supported");
  }
  return unsupported();
}

absl::StatusOr<bool> Renderer::EvalCompare(const std::string& op, const Value& a,
                                           const Value& b) {
  if (op == "==") return Equal(a, b);
  if (op == "!=") return !Equal(a, b);
  if (op == "in") return Contains(b, a);
  if (op == "not in") {
    SIEVE_ASSIGN_OR_RETURN(bool in, Contains(b, a));
    return !in;
  }
  if (a.is_undefined()) return UndefinedError(a);
  if (b.is_undefined()) return UndefinedError(b);
  if (op == "<") return Less(a, b);
  if (op == ">") return Less(b, a);
  SIEVE_ASSIGN_OR_RETURN(bool lt, Less(op == "<=" ? b : a, op == "<=" ? a : b));
  return !lt;
}

absl::StatusOr<std::unique_ptr<Template>> Template::Parse(std::string_view source,
                                                          const RenderLimits& limits) {
  std::unique_ptr<Template> t(new Template());
  t->limits_ = limits;
  SIEVE_ASSIGN_OR_RETURN(t->body_, jinja::Parse(source, kMaxParseDepth));
  return t;
}

absl::StatusOr<std::string> Template::Render(const ValueDict& context, absl::Time now) const {
  Scope globals{GlobalFunctions(), nullptr};
  Scope root{context, &globals};
  Renderer renderer(limits_, now);
  return renderer.RenderRoot(body_, &root);
}

namespace {

absl::StatusOr<Value> FromJson(const nlohmann::ordered_json& j, int depth) {
  if (depth > 256) return absl::InvalidArgumentError("JSON nests too deeply");
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::None();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::Int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      return Value::Int(static_cast<int64_t>(j.get<uint64_t>()));
    case nlohmann::ordered_json::value_t::number_float:
      return Value::Float(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::String(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      ValueList items;
      for (const auto& item : j) {
        SIEVE_ASSIGN_OR_RETURN(Value v, FromJson(item, depth + 1));
        items.push_back(std::move(v));
      }
      return Value::List(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      ValueDict dict;
      for (const auto& [key, item] : j.items()) {
        SIEVE_ASSIGN_OR_RETURN(Value v, FromJson(item, depth + 1));
        dict.Set(key, std::move(v));
      }
      return Value::Dict(std::move(dict));
    }
    default:
      return absl::InvalidArgumentError("unsupported JSON value");
  }
}

}  // namespace

absl::StatusOr<Value> ValueFromJson(std::string_view json) {
  nlohmann::ordered_json j =
      nlohmann::ordered_json::parse(json.begin(), json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  return FromJson(j, 0);
}

}  // namespace sieve::engine::jinja
