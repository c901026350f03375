#include "engine/attention/minference_patterns.h"

#include <cstdio>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using kernels::minference::Pattern;

const MInferenceHeadPattern kDefault{Pattern::kVerticalSlash, 1000, 6096};

TEST(MInferencePatternsTest, RoundTripsThroughTheWrittenFile) {
  MInferencePatterns p(2, std::vector<MInferenceHeadPattern>(3, kDefault));
  p[0][1] = {Pattern::kAShape, 100, 800};
  p[1][0] = {Pattern::kBlockSparse, 100, 0};
  p[1][2] = {Pattern::kVerticalSlash, 30, 800};
  const std::string text =
      MInferencePatternsToJson(p, {{1, 2, 3}, {4, 5, 6}}, R"({"text_tokens": 123})");
  const nlohmann::json doc = nlohmann::json::parse(text);
  EXPECT_EQ(doc["layers"][1]["0"], nlohmann::json::parse(R"(["block_sparse", 100, 0, 4])"));
  EXPECT_EQ(doc["calibration"]["text_tokens"], 123);
  auto back = ParseMInferencePatterns(text, "t", 2, 3, kDefault);
  ASSERT_TRUE(back.ok()) << back.status();
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 3; ++h) {
      EXPECT_EQ((*back)[l][h].pattern, p[l][h].pattern);
      EXPECT_EQ((*back)[l][h].vertical_size, p[l][h].vertical_size);
      EXPECT_EQ((*back)[l][h].slash_size, p[l][h].slash_size);
    }
  }
}

TEST(MInferencePatternsTest, ReadsMInferencesListFormAndDefaultsMissingHeads) {
  auto p = ParseMInferencePatterns(
      R"([{"1": ["stream_llm", 100, 800, 0]}, {"0": ["vertical_and_slash", 30, 800]}])", "t", 2, 2,
      kDefault);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ((*p)[0][0].pattern, Pattern::kVerticalSlash);
  EXPECT_EQ((*p)[0][0].slash_size, 6096);
  EXPECT_EQ((*p)[0][1].pattern, Pattern::kAShape);
  EXPECT_EQ((*p)[1][0].vertical_size, 30);
  EXPECT_EQ((*p)[1][1].vertical_size, 1000);
}

TEST(MInferencePatternsTest, BadFilesGetErrorsThatSayWhere) {
  const struct {
    const char* text;
    const char* want;
  } cases[] = {
      {"[{", "not valid JSON"},
      {R"([{}])", "has 1 layers; the model has 2"},
      {R"({"layers": [{}, {}], "num_q_heads": 8})", "written for 8 query heads"},
      {R"({"layers": [{}, {}], "format": "x"})", "\"format\""},
      {R"({"layers": [{}, {}], "version": 2})", "version"},
      {R"({"heads": []})", "no \"layers\""},
      {R"("x")", "expected a list of layers"},
      {R"([[], {}])", "layer 0 is not an object"},
      {R"([{}, {"2": ["vertical_and_slash", 1, 1]}])", "layer 1 head \"2\": not a query head"},
      {R"([{}, {"x": ["vertical_and_slash", 1, 1]}])", "head \"x\""},
      {R"([{"0": ["diagonal", 1, 1]}, {}])", "unknown pattern \"diagonal\""},
      {R"([{"0": ["vertical_and_slash", 0, 1]}, {}])", "size 0 must be an integer >= 1"},
      {R"([{"0": ["stream_llm", 10, 1.5]}, {}])", "size 1.5"},
      {R"([{"0": ["stream_llm", 10]}, {}])", "expected [pattern, size, size]"},
      {R"([{"0": ["stream_llm", 10, 10, "a"]}, {}])", "score \"a\""},
  };
  for (const auto& c : cases) {
    auto p = ParseMInferencePatterns(c.text, "f.json", 2, 2, kDefault);
    ASSERT_FALSE(p.ok()) << c.text;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(p.status().message().find("f.json"), std::string_view::npos) << p.status();
    EXPECT_NE(p.status().message().find(c.want), std::string_view::npos)
        << c.text << " -> " << p.status();
  }
  // block_sparse ignores its second size (0 allowed).
  EXPECT_TRUE(ParseMInferencePatterns(R"([{"0": ["block_sparse", 5, 0]}, {}])", "f", 2, 2, kDefault).ok());
}

TEST(MInferencePatternsTest, LoadNamesAMissingFile) {
  auto p = LoadMInferencePatterns("/nonexistent/patterns.json", 1, 1, kDefault);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(p.status().message().find("/nonexistent/patterns.json"), std::string_view::npos);
}

}  // namespace
}  // namespace sieve::engine
