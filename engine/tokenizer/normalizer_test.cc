#include "engine/tokenizer/normalizer.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

std::string Normalize(const std::string& config, const std::string& text) {
  auto normalizer = Normalizer::FromJson(nlohmann::json::parse(config), "normalizer");
  EXPECT_TRUE(normalizer.ok()) << normalizer.status();
  if (!normalizer.ok()) return "<error>";
  auto out = normalizer->Normalize(text);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.value_or("<error>");
}

TEST(NormalizerTest, LegacySentencePieceSpaces) {
  const std::string legacy = R"({"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "▁"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})";
  EXPECT_EQ(Normalize(legacy, "Hello  world"), "▁Hello▁▁world");
  EXPECT_EQ(Normalize(legacy, ""), "");  // Prepend leaves an empty text empty.
  EXPECT_EQ(Normalize(R"({"type": "Append", "append": "!"})", "a"), "a!");
}

TEST(NormalizerTest, ReplaceRegexAndStrip) {
  EXPECT_EQ(Normalize(R"({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "})",
                      "a \t\n b\u3000c"),
            "a b c");
  EXPECT_EQ(Normalize(R"({"type": "Strip", "strip_left": true, "strip_right": true})",
                      "\u3000 x y \n"),
            "x y");
  EXPECT_EQ(Normalize(R"({"type": "Strip", "strip_left": false, "strip_right": true})", " x "),
            " x");
}

// The compatibility and canonical forms use Unicode 9.0 data, as Hugging Face's normalizer:
// code points assigned later stay as they are.
TEST(NormalizerTest, UnicodeFormsWithUnicode9Data) {
  EXPECT_EQ(Normalize(R"({"type": "NFKC"})", "ﬁ①ｶﾞ㌀Å"), "fi1ガアパート\u00c5");
  EXPECT_EQ(Normalize(R"({"type": "NFKD"})", "ﬁé"), "fie\u0301");
  EXPECT_EQ(Normalize(R"({"type": "NFD"})", "é①"), "e\u0301①");
  // U+1FBF0 SEGMENTED DIGIT ZERO (Unicode 13, <font> 0) and U+11938 (Unicode 13, canonical).
  EXPECT_EQ(Normalize(R"({"type": "NFKC"})", "\U0001FBF0"), "\U0001FBF0");
  EXPECT_EQ(Normalize(R"({"type": "NFD"})", "\U00011938"), "\U00011938");
  EXPECT_EQ(unicode::IcuNormalize9("NFKC", "x\u00b2"), "x2");
}

TEST(NormalizerTest, RejectsUnsupportedAndMalformed) {
  for (const auto& [json, message] : std::vector<std::pair<std::string, std::string>>{
           {R"({"type": "Lowercase"})", "Lowercase"},
           {R"({"type": "Prepend"})", "normalizer.prepend"},
           {R"({"type": "Replace", "pattern": {"String": ""}, "content": "x"})",
            "normalizer.pattern"},
           {R"({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Bert"}]})",
            "normalizer.normalizers[1].type"}}) {
    auto normalizer = Normalizer::FromJson(nlohmann::json::parse(json), "normalizer");
    ASSERT_FALSE(normalizer.ok()) << json;
    EXPECT_THAT(normalizer.status().message(), HasSubstr(message)) << json;
  }
}

}  // namespace
}  // namespace sieve::engine
