#include "engine/tokenizer/pretokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::string> Pieces(PretokenizerRegex regex, std::string_view text) {
  std::vector<std::string_view> views;
  SplitByRegex(regex, text, &views);
  return std::vector<std::string>(views.begin(), views.end());
}

struct SplitCase {
  PretokenizerRegex regex;
  std::string text;
  std::vector<std::string> pieces;
};

// Every expectation here was checked against Hugging Face tokenizers' Split pre-tokenizer.
const SplitCase kSplitCases[] = {
    // Llama-3: contractions are case-insensitive (and ſ folds to s).
    {PretokenizerRegex::kLlama3, "Hello world", {"Hello", " world"}},
    {PretokenizerRegex::kLlama3, "don't", {"don", "'t"}},
    {PretokenizerRegex::kLlama3, "DON'T", {"DON", "'T"}},
    {PretokenizerRegex::kLlama3, "I'M", {"I", "'M"}},
    {PretokenizerRegex::kLlama3, "we'LL", {"we", "'LL"}},
    {PretokenizerRegex::kLlama3, "'S", {"'S"}},
    {PretokenizerRegex::kLlama3, "'sup", {"'s", "up"}},
    {PretokenizerRegex::kLlama3, "'\u017f", {"'\u017f"}},
    {PretokenizerRegex::kLlama3, "it's 'tis", {"it", "'s", " '", "tis"}},
    // Numbers in runs of at most three digits.
    {PretokenizerRegex::kLlama3, "12345678", {"123", "456", "78"}},
    {PretokenizerRegex::kLlama3, " 123", {" ", "123"}},
    {PretokenizerRegex::kLlama3, "\u0663\u0664\u0665\u0666", {"\u0663\u0664\u0665", "\u0666"}},
    {PretokenizerRegex::kLlama3, "1a", {"1", "a"}},
    // Whitespace: the last space of a run goes to the next word; a run at the end stays whole.
    {PretokenizerRegex::kLlama3, "a  b", {"a", " ", " b"}},
    {PretokenizerRegex::kLlama3, "abc   ", {"abc", "   "}},
    {PretokenizerRegex::kLlama3, "\t\tword", {"\t", "\tword"}},
    {PretokenizerRegex::kLlama3, "\u3000\u3000a", {"\u3000", "\u3000a"}},
    // `\s*[\r\n]+` takes the run up to its last newline.
    {PretokenizerRegex::kLlama3, "a\n\n\nb", {"a", "\n\n\n", "b"}},
    {PretokenizerRegex::kLlama3, "   \n   x", {"   \n", "  ", " x"}},
    {PretokenizerRegex::kLlama3, "x \r\ny", {"x", " \r\n", "y"}},
    {PretokenizerRegex::kLlama3, "x\n \n", {"x", "\n \n"}},
    // One non-letter may prefix a word; punctuation takes its trailing newlines.
    {PretokenizerRegex::kLlama3, "(hello)", {"(hello", ")"}},
    {PretokenizerRegex::kLlama3, "a,b", {"a", ",b"}},
    {PretokenizerRegex::kLlama3, " !!!\n\nabc", {" !!!\n\n", "abc"}},
    {PretokenizerRegex::kLlama3,
     "\xF0\x9F\x98\x80\xF0\x9F\x98\x80 ok",
     {"\xF0\x9F\x98\x80\xF0\x9F\x98\x80", " ok"}},
    {PretokenizerRegex::kLlama3, "\u65e5\u672c\u8a9e", {"\u65e5\u672c\u8a9e"}},
    {PretokenizerRegex::kLlama3, "e\u0301x", {"e", "\u0301x"}},
    // Qwen2: one digit per piece.
    {PretokenizerRegex::kQwen2, "12345", {"1", "2", "3", "4", "5"}},
    {PretokenizerRegex::kQwen2, "a1b", {"a", "1", "b"}},
    {PretokenizerRegex::kQwen2, "DON'T", {"DON", "'T"}},
    // GPT-2: case-sensitive contractions, whole digit runs, no prefix character for words.
    {PretokenizerRegex::kGpt2, "Hello world", {"Hello", " world"}},
    {PretokenizerRegex::kGpt2, "DON'T", {"DON", "'", "T"}},
    {PretokenizerRegex::kGpt2, "I'm", {"I", "'m"}},
    {PretokenizerRegex::kGpt2, "'\u017f", {"'", "\u017f"}},
    {PretokenizerRegex::kGpt2, "12345 6", {"12345", " 6"}},
    {PretokenizerRegex::kGpt2, "a  b", {"a", " ", " b"}},
    {PretokenizerRegex::kGpt2, "abc   ", {"abc", "   "}},
    {PretokenizerRegex::kGpt2, "\t\tword", {"\t", "\t", "word"}},
    {PretokenizerRegex::kGpt2, " !!!\n\nabc", {" !!!", "\n", "\n", "abc"}},
    {PretokenizerRegex::kGpt2, "a,b", {"a", ",", "b"}},
    {PretokenizerRegex::kGpt2, "\xF0\x9F\x98\x80 ok", {"\xF0\x9F\x98\x80", " ok"}},
};

TEST(SplitByRegexTest, MatchesHuggingFacePieces) {
  for (const SplitCase& c : kSplitCases) {
    EXPECT_EQ(Pieces(c.regex, c.text), c.pieces)
        << "regex " << static_cast<int>(c.regex) << " text '" << c.text << "'";
  }
}

TEST(SplitByRegexTest, PiecesCoverTheText) {
  const std::string text = "Mixed: 123,456 \u00e9t\u00e9's \n\n  end\t\r\n \xF0\x9F\x91\x8D!! ";
  for (PretokenizerRegex regex :
       {PretokenizerRegex::kGpt2, PretokenizerRegex::kLlama3, PretokenizerRegex::kQwen2}) {
    std::string joined;
    for (const std::string& piece : Pieces(regex, text)) {
      EXPECT_FALSE(piece.empty());
      joined += piece;
    }
    EXPECT_EQ(joined, text);
  }
  EXPECT_TRUE(Pieces(PretokenizerRegex::kLlama3, "").empty());
}

TEST(RecognizePretokenizerRegexTest, KnownAndUnknownPatterns) {
  EXPECT_EQ(*RecognizePretokenizerRegex(kGpt2Regex), PretokenizerRegex::kGpt2);
  EXPECT_EQ(*RecognizePretokenizerRegex(kLlama3Regex), PretokenizerRegex::kLlama3);
  EXPECT_EQ(*RecognizePretokenizerRegex(kQwen2Regex), PretokenizerRegex::kQwen2);
  const auto unknown = RecognizePretokenizerRegex(R"(\w+|\s+)");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(unknown.status().message(), HasSubstr(R"(\w+|\s+)"));
}

TEST(ByteLevelTest, AlphabetMatchesGpt2) {
  EXPECT_EQ(ByteLevelChar('A'), "A");
  EXPECT_EQ(ByteLevelChar(' '), "\u0120");   // Ġ
  EXPECT_EQ(ByteLevelChar('\n'), "\u010a");  // Ċ
  EXPECT_EQ(ByteLevelChar(0x00), "\u0100");
  EXPECT_EQ(ByteLevelChar(0x7F), "\u0121");
  EXPECT_EQ(ByteLevelChar(0xAD), "\u0143");
  EXPECT_EQ(ByteLevelChar(0xE9), "\u00e9");
  for (int b = 0; b < 256; ++b) {
    std::string_view ch = ByteLevelChar(static_cast<uint8_t>(b));
    char32_t cp = static_cast<unsigned char>(ch[0]);
    if (ch.size() == 2) cp = ((ch[0] & 0x1F) << 6) | (ch[1] & 0x3F);
    EXPECT_EQ(ByteLevelByte(cp), b);
  }
  EXPECT_EQ(ByteLevelByte(' '), -1);
  EXPECT_EQ(ByteLevelByte(0x144), -1);
  EXPECT_EQ(ByteLevelByte(0x4E2D), -1);
  std::string mapped;
  AppendByteLevel("a b\n", &mapped);
  EXPECT_EQ(mapped, "a\u0120b\u010a");
}

absl::StatusOr<PreTokenizer> Parse(const std::string& json) {
  return PreTokenizer::FromJson(nlohmann::json::parse(json), "pre_tokenizer");
}

// A Split step with `regex`, as tokenizer.json spells it.
nlohmann::json SplitStep(std::string_view regex, const std::string& behavior = "Isolated",
                         bool invert = false) {
  return {{"type", "Split"},
          {"pattern", {{"Regex", std::string(regex)}}},
          {"behavior", behavior},
          {"invert", invert}};
}

std::vector<std::string> PreTokenize(const PreTokenizer& pre, std::string_view text) {
  std::vector<std::string> pieces;
  EXPECT_TRUE(pre.Split(text, /*at_start=*/true, &pieces).ok());
  return pieces;
}

TEST(PreTokenizerTest, Llama3Sequence) {
  const nlohmann::json json = {
      {"type", "Sequence"},
      {"pretokenizers",
       {SplitStep(kLlama3Regex),
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  auto pre = PreTokenizer::FromJson(json, "pre_tokenizer");
  ASSERT_TRUE(pre.ok()) << pre.status();
  EXPECT_TRUE(pre->byte_level());
  EXPECT_THAT(PreTokenize(*pre, "Hi  there\n"),
              ElementsAre("Hi", "\u0120", "\u0120there", "\u010a"));
}

TEST(PreTokenizerTest, ByteLevelPrefixSpaceAndRegex) {
  auto pre = Parse(R"({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true})");
  ASSERT_TRUE(pre.ok()) << pre.status();
  EXPECT_THAT(PreTokenize(*pre, "hello world"), ElementsAre("\u0120hello", "\u0120world"));
  EXPECT_THAT(PreTokenize(*pre, " x"), ElementsAre("\u0120x"));  // Already starts with a space.
  auto no_regex = Parse(R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": false})");
  ASSERT_TRUE(no_regex.ok());
  EXPECT_THAT(PreTokenize(*no_regex, "a b"), ElementsAre("a\u0120b"));
  EXPECT_TRUE(PreTokenize(*no_regex, "").empty());
}

TEST(PreTokenizerTest, NullConfigKeepsTextWhole) {
  auto pre = PreTokenizer::FromJson(nlohmann::json(), "pre_tokenizer");
  ASSERT_TRUE(pre.ok());
  EXPECT_FALSE(pre->byte_level());
  EXPECT_THAT(PreTokenize(*pre, "a b"), ElementsAre("a b"));
}

TEST(PreTokenizerTest, RejectsUnsupportedConfigs) {
  struct Bad {
    std::string json;
    absl::StatusCode code;
    std::string message;
  };
  const Bad cases[] = {
      {R"({"type": "Whitespace"})", absl::StatusCode::kUnimplemented, "Whitespace"},
      {R"({"type": "Split", "pattern": {"Regex": "(\\w+"}, "behavior": "Isolated"})",
       absl::StatusCode::kInvalidArgument, "(\\w+"},
      {R"({"type": "Split", "pattern": {"Regex": "[a-z[b]]"}, "behavior": "Isolated"})",
       absl::StatusCode::kUnimplemented, "nested character classes"},
      {R"({"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated"})",
       absl::StatusCode::kInvalidArgument, "pre_tokenizer.pattern"},
      {R"({"type": "Split", "pattern": {"Glob": "*"}, "behavior": "Isolated"})",
       absl::StatusCode::kInvalidArgument, "pre_tokenizer.pattern"},
      {SplitStep(kGpt2Regex, "Shuffled").dump(), absl::StatusCode::kInvalidArgument,
       "pre_tokenizer.behavior"},
      {R"({"type": "Metaspace", "prepend_scheme": "sometimes"})",
       absl::StatusCode::kInvalidArgument, "pre_tokenizer.prepend_scheme"},
      {R"({"type": "Metaspace", "replacement": "ab"})", absl::StatusCode::kInvalidArgument,
       "pre_tokenizer.replacement"},
      {R"({"pretokenizers": []})", absl::StatusCode::kInvalidArgument, "pre_tokenizer.type"},
      {R"({"type": 3})", absl::StatusCode::kInvalidArgument, "pre_tokenizer.type"},
      {R"([1, 2])", absl::StatusCode::kInvalidArgument, "expected an object"},
      {R"({"type": "Sequence", "pretokenizers": {}})", absl::StatusCode::kInvalidArgument,
       "pre_tokenizer.pretokenizers"},
      {R"({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "use_regex": "yes"}]})",
       absl::StatusCode::kInvalidArgument, "pre_tokenizer.pretokenizers[0].use_regex"},
      {R"({"type": "Split", "behavior": "Isolated"})", absl::StatusCode::kInvalidArgument,
       "pre_tokenizer.pattern"},
  };
  for (const Bad& bad : cases) {
    auto pre = Parse(bad.json);
    ASSERT_FALSE(pre.ok()) << bad.json;
    EXPECT_EQ(pre.status().code(), bad.code) << bad.json << " " << pre.status();
    EXPECT_THAT(pre.status().message(), HasSubstr(bad.message)) << bad.json;
  }
}

TEST(PreTokenizerTest, RejectsDeepNesting) {
  nlohmann::json config = {{"type", "ByteLevel"}};
  for (int i = 0; i < 20; ++i) {
    config = {{"type", "Sequence"}, {"pretokenizers", nlohmann::json::array({config})}};
  }
  auto pre = PreTokenizer::FromJson(config, "pre_tokenizer");
  ASSERT_FALSE(pre.ok());
  EXPECT_THAT(pre.status().message(), HasSubstr("nested too deeply"));
}

}  // namespace
}  // namespace sieve::engine
