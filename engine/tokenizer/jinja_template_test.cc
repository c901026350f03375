// Unit tests of the Jinja renderer: one template per construct, checked against Python's Jinja2
// (tests/data/chat_templates/constructs.golden.json, written by
// scripts/chat_template_goldens/gen_goldens.py from constructs.py), plus what only this renderer
// promises: errors that name the line, limits against hostile templates, parse-time refusals.
#include "engine/tokenizer/jinja_template.h"

#include <pthread.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine::jinja {
namespace {

using ::testing::HasSubstr;

std::string DataDir() {
  const char* source = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/data/chat_templates/";
}

const absl::Time kGoldenNow =
    absl::FromCivil(absl::CivilSecond(2026, 12, 5, 12, 0, 0), absl::UTCTimeZone());

absl::StatusOr<std::string> Render(std::string_view source, const ValueDict& context = {},
                                   const RenderLimits& limits = {}) {
  absl::StatusOr<std::unique_ptr<Template>> t = Template::Parse(source, limits);
  if (!t.ok()) return t.status();
  return (*t)->Render(context, kGoldenNow);
}

TEST(JinjaConstructsTest, EveryConstructRendersAsJinja2Does) {
  std::ifstream in(DataDir() + "constructs.golden.json", std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  ASSERT_FALSE(ss.str().empty()) << "missing constructs.golden.json";
  const nlohmann::ordered_json cases = nlohmann::ordered_json::parse(ss.str());
  ASSERT_GT(cases.size(), 80u);
  int errors = 0;
  for (const auto& c : cases) {
    const std::string name = c["name"].get<std::string>();
    SCOPED_TRACE(name + ": " + c["template"].get<std::string>());
    absl::StatusOr<Value> context = ValueFromJson(c["context"].dump());
    ASSERT_TRUE(context.ok());
    absl::StatusOr<std::string> got = Render(c["template"].get<std::string>(), context->dict());
    if (c.contains("output")) {
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, c["output"].get<std::string>());
    } else {
      ++errors;
      EXPECT_FALSE(got.ok()) << "Jinja2: " << c["error"] << "; we rendered: " << *got;
      if (!got.ok() && c["raised"].get<bool>()) {
        EXPECT_EQ(got.status().message(), c["error"].get<std::string>());
        EXPECT_TRUE(got.status().GetPayload(kRaisedPayload).has_value());
      }
    }
  }
  EXPECT_GE(errors, 10);
}

TEST(JinjaTemplateTest, RenderErrorsNameTheLineAndWhatFailed) {
  absl::StatusOr<std::string> r = Render("line one\n{{ 'a' }}\n{{ 'x' + 1 }}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("line 3: can only concatenate str"));
  ValueDict context;
  context.Set("messages", *ValueFromJson(R"([{"role": "user"}])"));
  r = Render("{% for m in messages %}\n{{ m.nope.deeper }}{% endfor %}", context);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("line 2: 'dict object' has no attribute 'nope'"));
}

TEST(JinjaTemplateTest, ParseErrorsNameTheLine) {
  struct Case {
    const char* source;
    const char* error;
  };
  const Case cases[] = {
      {"{% if x %}\nno end", "line 2: missing '{% endif %}'"},
      {"a\n{{ x + }}", "line 2: unexpected '}}' in expression"},
      {"{% include 'other.jinja' %}", "line 1: unknown or unsupported tag '{% include %}'"},
      {"{{ x | nosuchfilter }}", "line 1: no filter named 'nosuchfilter'"},
      {"{{ x is nosuchtest }}", "line 1: no test named 'nosuchtest'"},
      {"\n\n{{ 'unclosed }}", "line 3: unclosed string literal"},
      {"{{ x ", "line 1: unclosed tag '{{'"},
      {"{# never closed", "line 1: unclosed comment"},
      {"{{ (1, 2] }}", "line 1: unbalanced ']'"},
      {"{% endfor %}", "unknown or unsupported tag '{% endfor %}'"},
      {"{% for x in y recursive %}{% endfor %}", "recursive for loops are not supported"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<Template>> t = Template::Parse(c.source);
    ASSERT_FALSE(t.ok()) << c.source;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << c.source;
    EXPECT_THAT(std::string(t.status().message()), HasSubstr(c.error)) << c.source;
  }
}

TEST(JinjaTemplateTest, HostileTemplatesHitTheirLimits) {
  RenderLimits limits;
  limits.max_output_bytes = 1 << 16;
  limits.max_steps = 100000;
  limits.max_depth = 16;
  // Output growing without end.
  absl::StatusOr<std::string> r =
      Render("{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxx' }}{% endfor %}", {}, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("output passed its limit of 65536 bytes"));
  // One huge string.
  r = Render("{{ 'x' * 100000000 }}", {}, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("exceeds the output limit"));
  // Nested loops doing nothing for a long time.
  r = Render("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", {},
             limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("limit of 100000 steps"));
  // Unbounded recursion.
  r = Render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", {}, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("macro calls nest deeper than 16 levels"));
  // Deeply nested expressions are refused at parse time, before any recursion runs deep.
  std::string deep = "{{ ";
  for (int i = 0; i < 500; ++i) deep += "(";
  deep += "1";
  for (int i = 0; i < 500; ++i) deep += ")";
  deep += " }}";
  r = Render(deep, {}, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("nests deeper than"));
  // Long operator and filter chains would build trees as deep as they are long.
  std::string chain = "{{ 1";
  for (int i = 0; i < 5000; ++i) chain += " + 1";
  r = Render(chain + " }}", {}, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("expression nests deeper than"));
  chain = "{{ 'x'";
  for (int i = 0; i < 5000; ++i) chain += " | trim";
  r = Render(chain + " }}", {}, limits);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("expression nests deeper than"));
  // Whatever the macro limit, the render's own nesting stays bounded.
  RenderLimits deep_macros;
  deep_macros.max_depth = 100000;
  const std::string recursion =
      "{% macro f(n) %}{% if true %}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}";
  r = Render(recursion, {}, deep_macros);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("deeper than 256 levels"));
  // And so on a thread with a small stack (1 MB; 8 MB in sanitizer builds, whose frames are about
  // 10x larger): the limit's error, not a stack overflow.
  {
    size_t stack = size_t{1} << 20;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    stack = size_t{8} << 20;
#endif
    struct Arg {
      const std::string* source;
      const RenderLimits* limits;
      absl::Status status;
    } arg{&recursion, &deep_macros, absl::OkStatus()};
    pthread_attr_t attr;
    ASSERT_EQ(pthread_attr_init(&attr), 0);
    ASSERT_EQ(pthread_attr_setstacksize(&attr, stack), 0);
    pthread_t thread;
    ASSERT_EQ(pthread_create(
                  &thread, &attr,
                  [](void* p) -> void* {
                    auto* a = static_cast<Arg*>(p);
                    a->status = Render(*a->source, {}, *a->limits).status();
                    return nullptr;
                  },
                  &arg),
              0);
    ASSERT_EQ(pthread_join(thread, nullptr), 0);
    pthread_attr_destroy(&attr);
    EXPECT_THAT(std::string(arg.status.message()), HasSubstr("deeper than 256 levels"));
  }
  // range() is capped as in Jinja's sandbox.
  r = Render("{{ range(1000000) | length }}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("range() too big"));
}

TEST(JinjaTemplateTest, ARenderIsIndependentOfTheOneBefore) {
  absl::StatusOr<std::unique_ptr<Template>> t = Template::Parse(
      "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
      "{{ ns.n }}");
  ASSERT_TRUE(t.ok());
  ValueDict context;
  context.Set("messages", *ValueFromJson("[1, 2, 3]"));
  EXPECT_EQ(*(*t)->Render(context, kGoldenNow), "3");
  EXPECT_EQ(*(*t)->Render(context, kGoldenNow), "3");
}

TEST(JinjaValueTest, FloatsPrintAsPythonReprDoes) {
  EXPECT_EQ(FormatFloat(1.0), "1.0");
  EXPECT_EQ(FormatFloat(0.1), "0.1");
  EXPECT_EQ(FormatFloat(-2.5), "-2.5");
  EXPECT_EQ(FormatFloat(1e16), "1e+16");
  EXPECT_EQ(FormatFloat(123456789012345.0), "123456789012345.0");
  EXPECT_EQ(FormatFloat(1e-5), "1e-05");
  EXPECT_EQ(FormatFloat(0.0001), "0.0001");
  EXPECT_EQ(FormatFloat(1.5e300), "1.5e+300");
  EXPECT_EQ(FormatFloat(0.0), "0.0");
}

TEST(JinjaValueTest, StringsReprAsPythonDoes) {
  EXPECT_EQ(ReprString("a"), "'a'");
  EXPECT_EQ(ReprString("it's"), "\"it's\"");
  EXPECT_EQ(ReprString("'\""), "'\\'\"'");
  EXPECT_EQ(ReprString("a\nb\\"), "'a\\nb\\\\'");
  EXPECT_EQ(ReprString("\x01\x7f\xc2\xa0"), "'\\x01\\x7f\\xa0'");
  EXPECT_EQ(ReprString("é日本"), "'é日本'");
}

}  // namespace
}  // namespace sieve::engine::jinja
