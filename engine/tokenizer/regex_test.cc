#include "engine/tokenizer/regex.h"

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Spans = std::vector<Regex::Span>;

Spans FindAll(std::string_view pattern, std::string_view text) {
  auto regex = Regex::Compile(pattern);
  EXPECT_TRUE(regex.ok()) << regex.status();
  Spans spans;
  if (regex.ok()) {
    EXPECT_TRUE((*regex)->FindAll(text, &spans).ok());
  }
  return spans;
}

std::vector<std::string> Pieces(std::string_view text, const Spans& spans) {
  std::vector<std::string> out;
  for (const auto& [b, e] : spans) out.emplace_back(text.substr(b, e - b));
  return out;
}

// Every code point (but surrogates) once, and its byte offset.
struct AllCodePoints {
  std::string text;
  std::vector<uint32_t> offsets;
  std::vector<char32_t> cps;
  AllCodePoints() {
    for (char32_t cp = 0; cp <= 0x10FFFF; ++cp) {
      if (cp >= 0xD800 && cp <= 0xDFFF) continue;
      offsets.push_back(static_cast<uint32_t>(text.size()));
      cps.push_back(cp);
      unicode::AppendUtf8(cp, &text);
    }
  }
};

// The classes the rewritten patterns match are exactly the tokenizer's Unicode 16.0 tables
// (Oniguruma's), on every code point, outside and inside character classes.
TEST(RegexTest, ClassesMatchTheTokenizerTablesOnEveryCodePoint) {
  const AllCodePoints all;
  struct Check {
    const char* pattern;
    bool (*want)(char32_t);
  };
  const Check checks[] = {
      {R"(\p{L})", [](char32_t c) { return unicode::IsLetter(c); }},
      {R"([\p{L}])", [](char32_t c) { return unicode::IsLetter(c); }},
      {R"(\p{N})", [](char32_t c) { return unicode::IsNumber(c); }},
      {R"(\s)", [](char32_t c) { return unicode::IsWhitespace(c); }},
      {R"([\s])", [](char32_t c) { return unicode::IsWhitespace(c); }},
      {R"(\S)", [](char32_t c) { return !unicode::IsWhitespace(c); }},
      {R"(\P{L})", [](char32_t c) { return !unicode::IsLetter(c); }},
      {R"([^\s\p{L}\p{N}])",
       [](char32_t c) {
         return !unicode::IsWhitespace(c) && !unicode::IsLetter(c) && !unicode::IsNumber(c);
       }},
  };
  for (const Check& check : checks) {
    const Spans spans = FindAll(check.pattern, all.text);
    size_t next = 0;
    int mismatches = 0;
    for (size_t i = 0; i < all.cps.size(); ++i) {
      const bool matched = next < spans.size() && spans[next].first == all.offsets[i];
      if (matched) ++next;
      if (matched != check.want(all.cps[i]) && ++mismatches <= 5) {
        ADD_FAILURE() << check.pattern << " at U+" << std::hex << static_cast<uint32_t>(all.cps[i])
                      << ": matched " << matched;
      }
    }
    EXPECT_EQ(mismatches, 0) << check.pattern;
  }
}

// Find-all follows Rust's onig find_iter: an empty match right after a match is skipped.
TEST(RegexTest, FindAllEmptyMatchesAsOniguruma) {
  EXPECT_THAT(FindAll("a*", "baaac"),
              ElementsAre(Regex::Span(0, 0), Regex::Span(1, 4), Regex::Span(5, 5)));
  EXPECT_THAT(FindAll("x*", "é"), ElementsAre(Regex::Span(0, 0), Regex::Span(2, 2)));
  EXPECT_TRUE(FindAll("a", "").empty());
  EXPECT_THAT(FindAll("", "ab"),
              ElementsAre(Regex::Span(0, 0), Regex::Span(1, 1), Regex::Span(2, 2)));
}

TEST(RegexTest, OnigurumaSyntax) {
  // Ruby's ^ and $ match at every line; \uHHHH is a code point; \h a hexadecimal digit.
  EXPECT_THAT(Pieces("ab\ncd", FindAll("^.", "ab\ncd")), ElementsAre("a", "c"));
  EXPECT_THAT(Pieces("ab\ncd", FindAll(".$", "ab\ncd")), ElementsAre("b", "d"));
  EXPECT_THAT(Pieces("x\u00e9y", FindAll("\\u00e9", "x\u00e9y")), ElementsAre("\u00e9"));
  EXPECT_THAT(Pieces("xA1g", FindAll("\\h+", "xA1g")), ElementsAre("A1"));
  // Case-insensitive contractions include U+017F, which folds to 's'.
  EXPECT_THAT(Pieces("'\u017f'S", FindAll("(?i:'s)", "'\u017f'S")), ElementsAre("'\u017f", "'S"));
  // Categories that gained code points in Unicode 15 - 16 include them, as in Oniguruma 6.9.10.
  EXPECT_EQ(FindAll("\\p{S}", "\U0001CE1A").size(), 1u);
  EXPECT_EQ(FindAll("[\\p{P}\\p{S}]", "\u1B4E").size(), 1u);
  EXPECT_EQ(FindAll("\\p{Mark}", "\u0897").size(), 1u);
  EXPECT_EQ(FindAll("\\P{S}", "\U0001CE1A").size(), 0u);
  // DeepSeek-V3's pieces.
  const std::string cjk = "\u4e2d\u6587abc\u3072\u30ab";
  EXPECT_THAT(Pieces(cjk, FindAll("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", cjk)),
              ElementsAre("\u4e2d\u6587", "\u3072\u30ab"));
  EXPECT_THAT(Pieces("1234567", FindAll("\\p{N}{1,3}", "1234567")), ElementsAre("123", "456", "7"));
}

TEST(RegexTest, ErrorsQuoteThePattern) {
  auto bad = Regex::Compile("(ab");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("(ab"));
  auto nested = Regex::Compile("[a[b]]");
  ASSERT_FALSE(nested.ok());
  EXPECT_EQ(nested.status().code(), absl::StatusCode::kUnimplemented);
}

TEST(SplitAtMatchesTest, BehaviorsAsHuggingFace) {
  const std::string text = "the-final--countdown";
  const Spans dashes = FindAll("-", text);
  auto split = [&](SplitBehavior behavior, bool invert) {
    Spans pieces;
    SplitAtMatches(text.size(), dashes, invert, behavior, &pieces);
    return Pieces(text, pieces);
  };
  EXPECT_THAT(split(SplitBehavior::kRemoved, false), ElementsAre("the", "final", "countdown"));
  EXPECT_THAT(split(SplitBehavior::kIsolated, false),
              ElementsAre("the", "-", "final", "-", "-", "countdown"));
  EXPECT_THAT(split(SplitBehavior::kMergedWithPrevious, false),
              ElementsAre("the-", "final-", "-", "countdown"));
  EXPECT_THAT(split(SplitBehavior::kMergedWithNext, false),
              ElementsAre("the", "-final", "-", "-countdown"));
  EXPECT_THAT(split(SplitBehavior::kContiguous, false),
              ElementsAre("the", "-", "final", "--", "countdown"));
  EXPECT_THAT(split(SplitBehavior::kRemoved, true), ElementsAre("-", "-", "-"));
  // Inverted, the words are the delimiters: each joins the dash before it.
  EXPECT_THAT(split(SplitBehavior::kMergedWithPrevious, true),
              ElementsAre("the", "-final", "-", "-countdown"));
}

// Random text over characters that exercise every branch of the pre-tokenizer regexes.
std::string RandomText(std::mt19937& rng) {
  static const std::vector<std::string> atoms = {
      "a", "Z", "\u00e9", "\u017f", "\u0416", "\u4e2d", "\u3042", "\U0001D400", "\u1C89",
      "1", "9", "\u0663", "\u00bd", "\u2167", "\U00016130", " ", " ", "  ", "\t", "\n", "\r",
      "\r\n", "\u00a0", "\u3000", "\u2028", "\u180e", "\u200b", "'", "'s", "'S", "'ll", "'LL",
      "'re", "'ve", "'m", "'d", "'t", "!", ".", ",", "-", "\u2014", "\U0001F600", "\u0301",
      "\u093f", "_", "$", "\x01", "\x7f", "\ufffd", "\ue000"};
  std::uniform_int_distribution<size_t> len(0, 24), pick(0, atoms.size() - 1);
  std::string s;
  for (size_t n = len(rng); n > 0; --n) s += atoms[pick(rng)];
  return s;
}

// The hand-written scanners equal PCRE2 running the same patterns, on the golden corpus and on
// random text.
TEST(RegexTest, FastPathsEqualPcre2) {
  std::vector<std::string> texts;
  const char* source = std::getenv("SIEVE_SOURCE_DIR");
  std::ifstream in(std::string(source ? source : ".") + "/tests/data/tokenizers/corpus.json");
  ASSERT_TRUE(in.good());
  std::ostringstream contents;
  contents << in.rdbuf();
  for (const auto& t : nlohmann::json::parse(contents.str())) texts.push_back(t.get<std::string>());
  std::mt19937 rng(16);
  for (int i = 0; i < 20000; ++i) texts.push_back(RandomText(rng));
  const std::pair<PretokenizerRegex, std::string_view> patterns[] = {
      {PretokenizerRegex::kGpt2, kGpt2Regex},
      {PretokenizerRegex::kLlama3, kLlama3Regex},
      {PretokenizerRegex::kQwen2, kQwen2Regex}};
  for (const auto& [scanner, pattern] : patterns) {
    auto regex = Regex::Compile(pattern);
    ASSERT_TRUE(regex.ok()) << regex.status();
    int mismatches = 0;
    for (const std::string& text : texts) {
      std::vector<std::string_view> fast;
      SplitByRegex(scanner, text, &fast);
      Spans spans;
      ASSERT_TRUE((*regex)->FindAll(text, &spans).ok());
      std::vector<std::string> fast_pieces(fast.begin(), fast.end());
      if (fast_pieces != Pieces(text, spans) && ++mismatches <= 5) {
        ADD_FAILURE() << pattern << " on " << nlohmann::json(text).dump();
      }
    }
    EXPECT_EQ(mismatches, 0) << pattern << " over " << texts.size() << " texts";
  }
}

}  // namespace
}  // namespace sieve::engine
