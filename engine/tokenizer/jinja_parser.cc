#include "engine/tokenizer/jinja_parser.h"

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/jinja_builtins.h"
#include "engine/tokenizer/jinja_lexer.h"

namespace sieve::engine::jinja {
namespace {

using Type = Token::Type;

class Parser {
 public:
  Parser(std::vector<Token> tokens, int max_depth)
      : tokens_(std::move(tokens)), max_depth_(max_depth) {}

  absl::StatusOr<Body> ParseTemplate() {
    SIEVE_ASSIGN_OR_RETURN(Body body, ParseBody({}));
    if (Cur().type != Type::kEnd) {
      return Error(absl::StrCat("unexpected '{% ", Peek(1).text, " %}'"));
    }
    return body;
  }

 private:
  const Token& Cur() const { return tokens_[pos_]; }
  const Token& Peek(size_t ahead) const {
    return tokens_[std::min(pos_ + ahead, tokens_.size() - 1)];
  }
  void Advance() {
    if (pos_ + 1 < tokens_.size()) ++pos_;
  }
  bool IsOp(std::string_view op) const { return Cur().type == Type::kOp && Cur().text == op; }
  bool IsName(std::string_view name) const {
    return Cur().type == Type::kName && Cur().text == name;
  }
  bool SkipOp(std::string_view op) {
    if (!IsOp(op)) return false;
    Advance();
    return true;
  }
  bool SkipName(std::string_view name) {
    if (!IsName(name)) return false;
    Advance();
    return true;
  }

  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("line ", Cur().line, ": ", absl::string_view(what.data(), what.size())));
  }

  std::string Describe(const Token& t) const {
    switch (t.type) {
      case Type::kText: return "text";
      case Type::kVarBegin: return "'{{'";
      case Type::kVarEnd: return "'}}'";
      case Type::kBlockBegin: return "'{%'";
      case Type::kBlockEnd: return "'%}'";
      case Type::kEnd: return "end of template";
      case Type::kString: return "a string";
      default: return absl::StrCat("'", t.text, "'");
    }
  }

  absl::Status Expect(Type type, std::string_view what) {
    if (Cur().type != type) {
      return Error(absl::StrCat("expected ", absl::string_view(what.data(), what.size()),
                                ", found ", Describe(Cur())));
    }
    Advance();
    return absl::OkStatus();
  }
  absl::Status ExpectOp(std::string_view op) {
    if (!SkipOp(op)) {
      return Error(absl::StrCat("expected '", absl::string_view(op.data(), op.size()),
                                "', found ", Describe(Cur())));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Cur().type != Type::kName) return Error(absl::StrCat("expected a name, found ",
                                                             Describe(Cur())));
    std::string name = Cur().text;
    Advance();
    return name;
  }

  // Counts nesting; the guard fails the parse past max_depth_.
  struct DepthGuard {
    explicit DepthGuard(int* depth) : depth(depth) { ++*depth; }
    ~DepthGuard() { --*depth; }
    int* depth;
  };
  absl::Status CheckDepth() const {
    if (depth_ > max_depth_) {
      return Error(absl::StrCat("template nests deeper than ", max_depth_, " levels"));
    }
    return absl::OkStatus();
  }

  // Parses statements until a block tag whose keyword is in `ends` (left unconsumed: the
  // current token is then that keyword) or the end of the template.
  absl::StatusOr<Body> ParseBody(std::initializer_list<std::string_view> ends) {
    DepthGuard guard(&depth_);
    SIEVE_RETURN_IF_ERROR(CheckDepth());
    Body body;
    while (Cur().type != Type::kEnd) {
      if (Cur().type == Type::kText) {
        auto stmt = NewStmt(Stmt::Kind::kText);
        stmt->text = Cur().text;
        body.push_back(std::move(stmt));
        Advance();
      } else if (Cur().type == Type::kVarBegin) {
        auto stmt = NewStmt(Stmt::Kind::kOutput);
        Advance();
        SIEVE_ASSIGN_OR_RETURN(stmt->expr, ParseTuple(true));
        SIEVE_RETURN_IF_ERROR(Expect(Type::kVarEnd, "'}}'"));
        body.push_back(std::move(stmt));
      } else if (Cur().type == Type::kBlockBegin) {
        const Token& keyword = Peek(1);
        for (std::string_view end : ends) {
          if (keyword.type == Type::kName && keyword.text == end) {
            Advance();
            return body;
          }
        }
        Advance();
        SIEVE_ASSIGN_OR_RETURN(StmtPtr stmt, ParseStatement());
        body.push_back(std::move(stmt));
      } else {
        return Error(absl::StrCat("unexpected ", Describe(Cur())));
      }
    }
    if (ends.size() > 0) {
      return Error(absl::StrCat("missing '{% ", std::string(*(ends.end() - 1)), " %}': a block is left open"));
    }
    return body;
  }

  StmtPtr NewStmt(Stmt::Kind kind) const {
    auto stmt = std::make_unique<Stmt>();
    stmt->kind = kind;
    stmt->line = Cur().line;
    return stmt;
  }

  absl::Status EndTag(std::string_view keyword) {
    // The current token is `keyword` (ParseBody stopped on it).
    if (!SkipName(keyword)) return Error(absl::StrCat("expected '", std::string(keyword), "'"));
    return Expect(Type::kBlockEnd, "'%}'");
  }

  absl::StatusOr<StmtPtr> ParseStatement() {
    if (Cur().type != Type::kName) return Error("expected a statement keyword after '{%'");
    const std::string keyword = Cur().text;
    if (keyword == "if") return ParseIf();
    if (keyword == "for") return ParseFor();
    if (keyword == "set") return ParseSet();
    if (keyword == "macro") return ParseMacro();
    if (keyword == "call") return ParseCallBlock();
    if (keyword == "break" || keyword == "continue") {
      auto stmt = NewStmt(keyword == "break" ? Stmt::Kind::kBreak : Stmt::Kind::kContinue);
      Advance();
      SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
      return stmt;
    }
    if (keyword == "generation") {
      auto stmt = NewStmt(Stmt::Kind::kScope);
      Advance();
      SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
      SIEVE_ASSIGN_OR_RETURN(stmt->body, ParseBody({"endgeneration"}));
      SIEVE_RETURN_IF_ERROR(EndTag("endgeneration"));
      return stmt;
    }
    return Error(absl::StrCat("unknown or unsupported tag '{% ", keyword, " %}'"));
  }

  absl::StatusOr<StmtPtr> ParseIf() {
    auto stmt = NewStmt(Stmt::Kind::kIf);
    Advance();  // if
    while (true) {
      SIEVE_ASSIGN_OR_RETURN(ExprPtr cond, ParseTuple(true));
      SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
      SIEVE_ASSIGN_OR_RETURN(Body body, ParseBody({"elif", "else", "endif"}));
      stmt->branches.emplace_back(std::move(cond), std::move(body));
      if (SkipName("elif")) continue;
      if (SkipName("else")) {
        SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
        SIEVE_ASSIGN_OR_RETURN(Body body, ParseBody({"endif"}));
        stmt->branches.emplace_back(nullptr, std::move(body));
      }
      SIEVE_RETURN_IF_ERROR(EndTag("endif"));
      return stmt;
    }
  }

  // Names separated by commas, optionally in parentheses (for targets, set targets).
  absl::StatusOr<std::vector<std::string>> ParseTargets() {
    std::vector<std::string> names;
    const bool paren = SkipOp("(");
    do {
      SIEVE_ASSIGN_OR_RETURN(std::string name, ExpectName());
      names.push_back(std::move(name));
    } while (SkipOp(","));
    if (paren) SIEVE_RETURN_IF_ERROR(ExpectOp(")"));
    return names;
  }

  absl::StatusOr<StmtPtr> ParseFor() {
    auto stmt = NewStmt(Stmt::Kind::kFor);
    Advance();  // for
    SIEVE_ASSIGN_OR_RETURN(stmt->targets, ParseTargets());
    if (!SkipName("in")) return Error("expected 'in' in for loop");
    SIEVE_ASSIGN_OR_RETURN(stmt->expr, ParseTuple(false));
    if (SkipName("if")) {
      SIEVE_ASSIGN_OR_RETURN(stmt->filter, ParseExpression(true));
    }
    if (IsName("recursive")) return Error("recursive for loops are not supported");
    SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
    SIEVE_ASSIGN_OR_RETURN(stmt->body, ParseBody({"else", "endfor"}));
    if (SkipName("else")) {
      SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
      SIEVE_ASSIGN_OR_RETURN(stmt->else_body, ParseBody({"endfor"}));
    }
    SIEVE_RETURN_IF_ERROR(EndTag("endfor"));
    return stmt;
  }

  absl::StatusOr<StmtPtr> ParseSet() {
    auto stmt = NewStmt(Stmt::Kind::kSet);
    Advance();  // set
    SIEVE_ASSIGN_OR_RETURN(std::string first, ExpectName());
    stmt->targets.push_back(first);
    if (SkipOp(".")) {
      SIEVE_ASSIGN_OR_RETURN(stmt->attr, ExpectName());
    } else {
      while (SkipOp(",")) {
        SIEVE_ASSIGN_OR_RETURN(std::string name, ExpectName());
        stmt->targets.push_back(std::move(name));
      }
    }
    if (Cur().type == Type::kBlockEnd && stmt->attr.empty() && stmt->targets.size() == 1) {
      stmt->kind = Stmt::Kind::kSetBlock;
      Advance();
      SIEVE_ASSIGN_OR_RETURN(stmt->body, ParseBody({"endset"}));
      SIEVE_RETURN_IF_ERROR(EndTag("endset"));
      return stmt;
    }
    SIEVE_RETURN_IF_ERROR(ExpectOp("="));
    SIEVE_ASSIGN_OR_RETURN(stmt->expr, ParseTuple(true));
    SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
    return stmt;
  }

  absl::StatusOr<std::vector<Param>> ParseParams() {
    std::vector<Param> params;
    SIEVE_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (!params.empty()) SIEVE_RETURN_IF_ERROR(ExpectOp(","));
      if (IsOp(")")) break;
      Param p;
      SIEVE_ASSIGN_OR_RETURN(p.name, ExpectName());
      if (SkipOp("=")) {
        SIEVE_ASSIGN_OR_RETURN(p.default_value, ParseExpression(true));
      } else if (!params.empty() && params.back().default_value != nullptr) {
        return Error("a parameter without a default follows one with a default");
      }
      params.push_back(std::move(p));
    }
    Advance();  // )
    return params;
  }

  absl::StatusOr<StmtPtr> ParseMacro() {
    auto stmt = NewStmt(Stmt::Kind::kMacro);
    Advance();  // macro
    SIEVE_ASSIGN_OR_RETURN(stmt->name, ExpectName());
    SIEVE_ASSIGN_OR_RETURN(stmt->params, ParseParams());
    SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
    SIEVE_ASSIGN_OR_RETURN(stmt->body, ParseBody({"endmacro"}));
    SIEVE_RETURN_IF_ERROR(EndTag("endmacro"));
    return stmt;
  }

  absl::StatusOr<StmtPtr> ParseCallBlock() {
    auto stmt = NewStmt(Stmt::Kind::kCallBlock);
    Advance();  // call
    if (IsOp("(")) {
      SIEVE_ASSIGN_OR_RETURN(stmt->params, ParseParams());
    }
    SIEVE_ASSIGN_OR_RETURN(stmt->expr, ParseExpression(true));
    if (stmt->expr->kind != Expr::Kind::kCall) return Error("'{% call %}' needs a call");
    SIEVE_RETURN_IF_ERROR(Expect(Type::kBlockEnd, "'%}'"));
    SIEVE_ASSIGN_OR_RETURN(stmt->body, ParseBody({"endcall"}));
    SIEVE_RETURN_IF_ERROR(EndTag("endcall"));
    return stmt;
  }

  ExprPtr NewExpr(Expr::Kind kind, int line) const {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }
  // Sets `e`'s depth from its children's; fails past the expression depth limit (a deep tree
  // would recurse deeply when evaluated and when destroyed).
  absl::Status Seal(Expr* e) const {
    int depth = 0;
    for (const ExprPtr& a : e->args) {
      if (a != nullptr) depth = std::max(depth, a->depth);
    }
    for (const auto& [name, value] : e->kwargs) depth = std::max(depth, value->depth);
    e->depth = depth + 1;
    if (e->depth > max_depth_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "line ", e->line, ": expression nests deeper than ", max_depth_, " levels"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> Wrap(Expr::Kind kind, std::string name, ExprPtr a, ExprPtr b,
                               int line) const {
    auto e = NewExpr(kind, line);
    e->name = std::move(name);
    e->args.push_back(std::move(a));
    if (b != nullptr) e->args.push_back(std::move(b));
    SIEVE_RETURN_IF_ERROR(Seal(e.get()));
    return e;
  }

  // An expression, or several separated by commas (a tuple without parentheses).
  absl::StatusOr<ExprPtr> ParseTuple(bool with_cond) {
    const int line = Cur().line;
    SIEVE_ASSIGN_OR_RETURN(ExprPtr first, ParseExpression(with_cond));
    if (!IsOp(",")) return first;
    auto tuple = NewExpr(Expr::Kind::kTuple, line);
    tuple->args.push_back(std::move(first));
    while (SkipOp(",")) {
      if (Cur().type == Type::kBlockEnd || Cur().type == Type::kVarEnd || IsName("if")) break;
      SIEVE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(with_cond));
      tuple->args.push_back(std::move(item));
    }
    SIEVE_RETURN_IF_ERROR(Seal(tuple.get()));
    return tuple;
  }

  absl::StatusOr<ExprPtr> ParseExpression(bool with_cond) {
    DepthGuard guard(&depth_);
    SIEVE_RETURN_IF_ERROR(CheckDepth());
    SIEVE_ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    while (with_cond && IsName("if")) {
      const int line = Cur().line;
      Advance();
      SIEVE_ASSIGN_OR_RETURN(ExprPtr cond, ParseOr());
      ExprPtr otherwise;
      if (SkipName("else")) {
        SIEVE_ASSIGN_OR_RETURN(otherwise, ParseExpression(true));
      }
      auto node = NewExpr(Expr::Kind::kCond, line);
      node->args.push_back(std::move(expr));
      node->args.push_back(std::move(cond));
      node->args.push_back(std::move(otherwise));
      SIEVE_RETURN_IF_ERROR(Seal(node.get()));
      expr = std::move(node);
    }
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    SIEVE_ASSIGN_OR_RETURN(ExprPtr left, ParseAnd());
    while (IsName("or")) {
      const int line = Cur().line;
      Advance();
      SIEVE_ASSIGN_OR_RETURN(ExprPtr right, ParseAnd());
      SIEVE_ASSIGN_OR_RETURN(left, Wrap(Expr::Kind::kOr, "", std::move(left), std::move(right), line));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseAnd() {
    SIEVE_ASSIGN_OR_RETURN(ExprPtr left, ParseNot());
    while (IsName("and")) {
      const int line = Cur().line;
      Advance();
      SIEVE_ASSIGN_OR_RETURN(ExprPtr right, ParseNot());
      SIEVE_ASSIGN_OR_RETURN(left, Wrap(Expr::Kind::kAnd, "", std::move(left), std::move(right), line));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      const int line = Cur().line;
      Advance();
      DepthGuard guard(&depth_);
      SIEVE_RETURN_IF_ERROR(CheckDepth());
      SIEVE_ASSIGN_OR_RETURN(ExprPtr operand, ParseNot());
      return Wrap(Expr::Kind::kNot, "", std::move(operand), nullptr, line);
    }
    return ParseCompare();
  }

  absl::StatusOr<ExprPtr> ParseCompare() {
    const int line = Cur().line;
    SIEVE_ASSIGN_OR_RETURN(ExprPtr first, ParseMath1());
    ExprPtr node;
    while (true) {
      std::string op;
      if (Cur().type == Type::kOp && (Cur().text == "==" || Cur().text == "!=" ||
                                      Cur().text == "<" || Cur().text == ">" ||
                                      Cur().text == "<=" || Cur().text == ">=")) {
        op = Cur().text;
        Advance();
      } else if (IsName("in")) {
        op = "in";
        Advance();
      } else if (IsName("not") && Peek(1).type == Type::kName && Peek(1).text == "in") {
        op = "not in";
        Advance();
        Advance();
      } else {
        break;
      }
      if (node == nullptr) {
        node = NewExpr(Expr::Kind::kCompare, line);
        node->args.push_back(std::move(first));
      }
      SIEVE_ASSIGN_OR_RETURN(ExprPtr operand, ParseMath1());
      node->ops.push_back(op);
      node->args.push_back(std::move(operand));
      SIEVE_RETURN_IF_ERROR(Seal(node.get()));
    }
    return node != nullptr ? std::move(node) : std::move(first);
  }

  // One binary precedence level: operands from `next`, operators `ops`.
  template <typename Next>
  absl::StatusOr<ExprPtr> ParseBinary(std::initializer_list<std::string_view> ops, Next next) {
    SIEVE_ASSIGN_OR_RETURN(ExprPtr left, (this->*next)());
    while (Cur().type == Type::kOp) {
      bool matched = false;
      for (std::string_view op : ops) matched = matched || Cur().text == op;
      if (!matched) break;
      const std::string op = Cur().text;
      const int line = Cur().line;
      Advance();
      SIEVE_ASSIGN_OR_RETURN(ExprPtr right, (this->*next)());
      SIEVE_ASSIGN_OR_RETURN(left, Wrap(Expr::Kind::kBinary, op, std::move(left), std::move(right), line));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseMath1() { return ParseBinary({"+", "-"}, &Parser::ParseConcat); }
  absl::StatusOr<ExprPtr> ParseConcat() { return ParseBinary({"~"}, &Parser::ParseMath2); }
  absl::StatusOr<ExprPtr> ParseMath2() {
    return ParseBinary({"*", "/", "//", "%"}, &Parser::ParsePow);
  }
  absl::StatusOr<ExprPtr> ParsePow() { return ParseBinary({"**"}, &Parser::ParseUnaryFiltered); }
  absl::StatusOr<ExprPtr> ParseUnaryFiltered() { return ParseUnary(true); }

  absl::StatusOr<ExprPtr> ParseUnary(bool with_filter) {
    DepthGuard guard(&depth_);
    SIEVE_RETURN_IF_ERROR(CheckDepth());
    const int line = Cur().line;
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      const bool neg = IsOp("-");
      Advance();
      SIEVE_ASSIGN_OR_RETURN(ExprPtr operand, ParseUnary(false));
      SIEVE_ASSIGN_OR_RETURN(node, Wrap(neg ? Expr::Kind::kNeg : Expr::Kind::kPos, "", std::move(operand), nullptr,
                  line));
    } else {
      SIEVE_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    SIEVE_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      SIEVE_ASSIGN_OR_RETURN(node, ParseFilters(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Token& t = Cur();
    auto node = NewExpr(Expr::Kind::kLiteral, t.line);
    switch (t.type) {
      case Type::kName:
        if (t.text == "true" || t.text == "True") {
          node->literal = Value::Bool(true);
        } else if (t.text == "false" || t.text == "False") {
          node->literal = Value::Bool(false);
        } else if (t.text == "none" || t.text == "None") {
          node->literal = Value::None();
        } else {
          node->kind = Expr::Kind::kName;
          node->name = t.text;
        }
        Advance();
        return node;
      case Type::kString: {
        std::string text;
        while (Cur().type == Type::kString) {  // Adjacent literals concatenate.
          text += Cur().text;
          Advance();
        }
        node->literal = Value::String(std::move(text));
        return node;
      }
      case Type::kInt:
        node->literal = Value::Int(t.int_value);
        Advance();
        return node;
      case Type::kFloat:
        node->literal = Value::Float(t.float_value);
        Advance();
        return node;
      default:
        break;
    }
    if (SkipOp("(")) {
      if (SkipOp(")")) {
        node->kind = Expr::Kind::kTuple;
        return node;
      }
      SIEVE_ASSIGN_OR_RETURN(ExprPtr inner, ParseExpression(true));
      if (IsOp(",")) {
        auto tuple = NewExpr(Expr::Kind::kTuple, t.line);
        tuple->args.push_back(std::move(inner));
        while (SkipOp(",")) {
          if (IsOp(")")) break;
          SIEVE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(true));
          tuple->args.push_back(std::move(item));
        }
        SIEVE_RETURN_IF_ERROR(Seal(tuple.get()));
        inner = std::move(tuple);
      }
      SIEVE_RETURN_IF_ERROR(ExpectOp(")"));
      return inner;
    }
    if (SkipOp("[")) {
      node->kind = Expr::Kind::kList;
      while (!IsOp("]")) {
        if (!node->args.empty()) SIEVE_RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp("]")) break;
        SIEVE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression(true));
        node->args.push_back(std::move(item));
      }
      Advance();
      SIEVE_RETURN_IF_ERROR(Seal(node.get()));
      return node;
    }
    if (SkipOp("{")) {
      node->kind = Expr::Kind::kDict;
      while (!IsOp("}")) {
        if (!node->args.empty()) SIEVE_RETURN_IF_ERROR(ExpectOp(","));
        if (IsOp("}")) break;
        SIEVE_ASSIGN_OR_RETURN(ExprPtr key, ParseExpression(true));
        SIEVE_RETURN_IF_ERROR(ExpectOp(":"));
        SIEVE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        node->args.push_back(std::move(key));
        node->args.push_back(std::move(value));
      }
      Advance();
      SIEVE_RETURN_IF_ERROR(Seal(node.get()));
      return node;
    }
    return Error(absl::StrCat("unexpected ", Describe(t), " in expression"));
  }

  absl::Status ParseCallArgs(Expr* call) {
    // The current token is '('.
    Advance();
    bool first = true;
    while (!IsOp(")")) {
      if (!first) SIEVE_RETURN_IF_ERROR(ExpectOp(","));
      first = false;
      if (IsOp(")")) break;
      if (Cur().type == Type::kName && Peek(1).type == Type::kOp && Peek(1).text == "=") {
        std::string name = Cur().text;
        Advance();
        Advance();
        SIEVE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        call->kwargs.emplace_back(std::move(name), std::move(value));
      } else {
        if (!call->kwargs.empty()) return Error("a positional argument follows a keyword one");
        SIEVE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression(true));
        call->args.push_back(std::move(value));
      }
    }
    Advance();  // )
    return Seal(call);
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      const int line = Cur().line;
      if (SkipOp(".")) {
        if (Cur().type == Type::kInt) {
          auto index = NewExpr(Expr::Kind::kLiteral, line);
          index->literal = Value::Int(Cur().int_value);
          Advance();
          SIEVE_ASSIGN_OR_RETURN(node, Wrap(Expr::Kind::kItem, "", std::move(node), std::move(index), line));
        } else {
          SIEVE_ASSIGN_OR_RETURN(std::string name, ExpectName());
          SIEVE_ASSIGN_OR_RETURN(node, Wrap(Expr::Kind::kAttr, std::move(name), std::move(node), nullptr, line));
        }
      } else if (SkipOp("[")) {
        SIEVE_ASSIGN_OR_RETURN(node, ParseSubscript(std::move(node), line));
      } else if (IsOp("(")) {
        SIEVE_ASSIGN_OR_RETURN(ExprPtr call, Wrap(Expr::Kind::kCall, "", std::move(node), nullptr, line));
        SIEVE_RETURN_IF_ERROR(ParseCallArgs(call.get()));
        node = std::move(call);
      } else {
        return node;
      }
    }
  }

  // After '[': an index, or a slice [start:stop:step] with any part left out.
  absl::StatusOr<ExprPtr> ParseSubscript(ExprPtr target, int line) {
    ExprPtr parts[3];
    int part = 0;
    bool is_slice = false;
    while (true) {
      if (IsOp(":")) {
        is_slice = true;
        if (++part > 2) return Error("a slice has at most three parts");
        Advance();
        continue;
      }
      if (IsOp("]")) break;
      if (parts[part] != nullptr) return Error("expected ':' or ']' in subscript");
      SIEVE_ASSIGN_OR_RETURN(parts[part], ParseExpression(true));
    }
    Advance();  // ]
    if (!is_slice) {
      if (parts[0] == nullptr) return Error("empty subscript");
      return Wrap(Expr::Kind::kItem, "", std::move(target), std::move(parts[0]), line);
    }
    auto node = NewExpr(Expr::Kind::kSlice, line);
    node->args.push_back(std::move(target));
    for (ExprPtr& p : parts) node->args.push_back(std::move(p));
    SIEVE_RETURN_IF_ERROR(Seal(node.get()));
    return node;
  }

  absl::StatusOr<ExprPtr> ParseFilters(ExprPtr node) {
    while (true) {
      const int line = Cur().line;
      if (SkipOp("|")) {
        SIEVE_ASSIGN_OR_RETURN(std::string name, ExpectName());
        if (!IsFilter(name)) return Error(absl::StrCat("no filter named '", name, "'"));
        SIEVE_ASSIGN_OR_RETURN(ExprPtr filter, Wrap(Expr::Kind::kFilter, std::move(name), std::move(node), nullptr, line));
        if (IsOp("(")) SIEVE_RETURN_IF_ERROR(ParseCallArgs(filter.get()));
        node = std::move(filter);
      } else if (SkipName("is")) {
        const bool negated = SkipName("not");
        SIEVE_ASSIGN_OR_RETURN(std::string name, ExpectName());
        if (!IsTest(name)) return Error(absl::StrCat("no test named '", name, "'"));
        SIEVE_ASSIGN_OR_RETURN(ExprPtr test, Wrap(Expr::Kind::kTest, std::move(name), std::move(node), nullptr, line));
        test->negated = negated;
        if (IsOp("(")) {
          SIEVE_RETURN_IF_ERROR(ParseCallArgs(test.get()));
        } else if ((Cur().type == Type::kName && !IsName("else") && !IsName("or") &&
                    !IsName("and") && !IsName("if") && !IsName("is") && !IsName("in") &&
                    !IsName("not")) ||
                   Cur().type == Type::kString || Cur().type == Type::kInt ||
                   Cur().type == Type::kFloat || IsOp("[") || IsOp("{")) {
          SIEVE_ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
          SIEVE_ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
          test->args.push_back(std::move(arg));
          SIEVE_RETURN_IF_ERROR(Seal(test.get()));
        }
        node = std::move(test);
      } else if (IsOp("(")) {
        SIEVE_ASSIGN_OR_RETURN(ExprPtr call, Wrap(Expr::Kind::kCall, "", std::move(node), nullptr, line));
        SIEVE_RETURN_IF_ERROR(ParseCallArgs(call.get()));
        node = std::move(call);
      } else {
        return node;
      }
    }
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int depth_ = 0;
  int max_depth_;
};

}  // namespace

absl::StatusOr<Body> Parse(std::string_view source, int max_depth) {
  SIEVE_ASSIGN_OR_RETURN(std::vector<Token> tokens, Lex(source));
  return Parser(std::move(tokens), max_depth).ParseTemplate();
}

}  // namespace sieve::engine::jinja
