#include "tests/support/metrics_text.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::test_support {
namespace {

using ::testing::HasSubstr;

TEST(ParseMetricsTextTest, ParsesTypesHelpLabelsAndValues) {
  constexpr char kText[] = R"(# HELP sieve_x_total Things that happened.
# TYPE sieve_x_total counter
sieve_x_total{model="m",outcome="stop"} 3
sieve_x_total{model="m",outcome="eos"} 4 1700000000000
# a free comment
# TYPE sieve_h_seconds histogram
sieve_h_seconds_bucket{le="0.5"} 1
sieve_h_seconds_bucket{le="+Inf"} 2
sieve_h_seconds_sum 1.25e0
sieve_h_seconds_count 2
sieve_g{path="a\"b\\c\nd", empty=""} -Inf
sieve_nan NaN
sieve_nan2 Nan
)";
  absl::StatusOr<ParsedMetrics> p = ParseMetricsText(kText);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->types.at("sieve_x_total"), "counter");
  EXPECT_EQ(p->types.at("sieve_h_seconds"), "histogram");
  EXPECT_EQ(p->help.at("sieve_x_total"), "Things that happened.");
  ASSERT_EQ(p->samples.size(), 9u);
  EXPECT_EQ(p->Find("sieve_x_total", {{"outcome", "stop"}}), 3.0);
  EXPECT_EQ(p->Find("sieve_x_total", {{"outcome", "eos"}, {"model", "m"}}), 4.0);
  EXPECT_EQ(p->Find("sieve_x_total", {{"outcome", "length"}}), std::nullopt);
  EXPECT_EQ(p->Find("sieve_missing"), std::nullopt);
  EXPECT_EQ(p->Sum("sieve_x_total"), 7.0);
  EXPECT_EQ(p->Sum("sieve_missing"), 0.0);
  EXPECT_EQ(p->All("sieve_h_seconds_bucket").size(), 2u);
  EXPECT_EQ(p->Find("sieve_h_seconds_bucket", {{"le", "+Inf"}}), 2.0);
  EXPECT_EQ(p->Find("sieve_h_seconds_sum"), 1.25);
  const std::vector<MetricSample> g = p->All("sieve_g");
  ASSERT_EQ(g.size(), 1u);
  EXPECT_EQ(g[0].labels.at("path"), "a\"b\\c\nd");
  EXPECT_EQ(g[0].labels.at("empty"), "");
  EXPECT_TRUE(std::isinf(g[0].value) && g[0].value < 0);
  EXPECT_TRUE(std::isnan(*p->Find("sieve_nan")));
  EXPECT_TRUE(std::isnan(*p->Find("sieve_nan2")));
}

TEST(ParseMetricsTextTest, EmptyTextHasNoSamples) {
  absl::StatusOr<ParsedMetrics> p = ParseMetricsText("");
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->samples.empty());
}

TEST(ParseMetricsTextTest, MalformedLinesNameTheLine) {
  for (const char* text : {
           "ok 1\n9bad 1\n",                  // name starts with a digit
           "ok 1\nx{a=\"1\" 2\n",             // unterminated labels
           "ok 1\nx{a=\"1} 2\n",              // unterminated label value
           "ok 1\nx{a=1} 2\n",                // unquoted label value
           "ok 1\nx{a=\"\\t\"} 2\n",          // bad escape
           "ok 1\nx\n",                       // no value
           "ok 1\nx one\n",                   // bad value
           "ok 1\nx 1 2 3\n",                 // too many fields
           "ok 1\nx1.5\n",                    // no space before the value
           "ok 1\n# TYPE x\n",                // TYPE without a type
       }) {
    absl::StatusOr<ParsedMetrics> p = ParseMetricsText(text);
    ASSERT_FALSE(p.ok()) << text;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(p.status().message(), HasSubstr("line 2")) << text;
  }
}

}  // namespace
}  // namespace sieve::test_support
