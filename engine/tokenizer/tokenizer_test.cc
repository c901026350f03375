#include "engine/tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using Json = nlohmann::json;

enum class Style { kLlama3, kQwen2, kGpt2 };

// Ids of the tiny vocabulary: bytes are 0-255 (byte b has id b), then the merges below
// (256-273), then "abc" (274, reachable only through ignore_merges), then added tokens.
constexpr int32_t kBos = 275, kEos = 276, kEot = 277, kMask = 278, kRstrip = 279, kWurd = 280;
constexpr int32_t kSpace = 32, kNewline = 10;

// A small tokenizer.json in the style of Llama-3 (Split regex + ByteLevel, ignore_merges, BOS
// template), Qwen2 (NFC, one digit per number) or GPT-2 (ByteLevel regex). All expected ids
// in these tests were checked against Hugging Face tokenizers on the same JSON.
Json TinyTokenizer(Style style) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[std::string(ByteLevelChar(static_cast<uint8_t>(b)))] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"\u0120", "t"}, {"h", "e"},           {"\u0120t", "he"},    {"l", "l"}, {"e", "ll"},
      {"h", "ell"},    {"hell", "o"},        {"\u0120", "hello"},  {"'", "s"}, {"1", "2"},
      {"12", "3"},     {"\u010a", "\u010a"}, {"\u0120", "\u0120"}, {"w", "o"}, {"wo", "r"},
      {"wor", "l"},    {"worl", "d"},        {"\u0120", "world"}};
  Json merge_list = Json::array();
  int32_t next = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = next++;
    merge_list.push_back(Json::array({a, b}));
  }
  vocab["abc"] = next++;
  auto added = [](int32_t id, const std::string& content, bool special) {
    return Json{{"id", id},          {"content", content}, {"single_word", false},
                {"lstrip", false},   {"rstrip", false},    {"normalized", !special},
                {"special", special}};
  };
  Json added_tokens =
      Json::array({added(kBos, "<|begin_of_text|>", true), added(kEos, "<|end_of_text|>", true),
                   added(kEot, "<|eot_id|>", true), added(kMask, "<mask>", true),
                   added(kRstrip, "[R]", true), added(kWurd, "wurd", false)});
  added_tokens[3]["lstrip"] = true;
  added_tokens[4]["rstrip"] = true;
  added_tokens[5]["single_word"] = true;
  added_tokens[5]["normalized"] = false;
  Json byte_level = {{"type", "ByteLevel"},
                     {"add_prefix_space", false},
                     {"trim_offsets", true},
                     {"use_regex", style == Style::kGpt2}};
  Json pre_tokenizer = byte_level;
  if (style != Style::kGpt2) {
    const std::string_view regex = style == Style::kLlama3 ? kLlama3Regex : kQwen2Regex;
    pre_tokenizer = {{"type", "Sequence"},
                     {"pretokenizers",
                      {{{"type", "Split"},
                        {"pattern", {{"Regex", std::string(regex)}}},
                        {"behavior", "Isolated"},
                        {"invert", false}},
                       byte_level}}};
  }
  Json post_processor = {{"type", "ByteLevel"}, {"trim_offsets", false}};
  if (style == Style::kLlama3) {
    post_processor = {{"type", "Sequence"},
                      {"processors",
                       {post_processor,
                        {{"type", "TemplateProcessing"},
                         {"single",
                          {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                         {"pair", Json::array()},
                         {"special_tokens",
                          {{"<|begin_of_text|>",
                            {{"id", "<|begin_of_text|>"},
                             {"ids", {kBos}},
                             {"tokens", {"<|begin_of_text|>"}}}}}}}}}};
  }
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added_tokens},
          {"normalizer", style == Style::kQwen2 ? Json{{"type", "NFC"}} : Json()},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", post_processor},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", style == Style::kLlama3},
            {"vocab", vocab},
            {"merges", merge_list}}}};
}

std::unique_ptr<Tokenizer> MustLoad(const Json& tokenizer, const std::string& config = "") {
  auto loaded = Tokenizer::FromJson(tokenizer.dump(), config);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return loaded.ok() ? std::move(*loaded) : nullptr;
}

std::vector<int32_t> EncodeOrDie(const Tokenizer& tok, std::string_view text,
                                 bool special = false) {
  auto ids = tok.Encode(text, special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

struct EncodeCase {
  std::string text;
  std::vector<int32_t> ids;
};

void ExpectEncodes(Style style, const std::vector<EncodeCase>& cases) {
  auto tok = MustLoad(TinyTokenizer(style));
  ASSERT_NE(tok, nullptr);
  for (const EncodeCase& c : cases) {
    EXPECT_THAT(EncodeOrDie(*tok, c.text), ElementsAreArray(c.ids)) << "text: '" << c.text << "'";
  }
}

TEST(TokenizerTest, Llama3EncodesEveryRegexBranch) {
  ExpectEncodes(Style::kLlama3,
                {
                    {"hello world", {262, 273}},  // ignore_merges: "hello" is a vocabulary word.
                    {"Hello", {72, 260, 111}},
                    {"the", {116, 257}},
                    {" the", {258}},
                    {"it's", {105, 116, 264}},
                    {"IT'S", {73, 84, 39, 83}},  // 'S is a contraction piece, but has no merge.
                    {"1234567", {266, 52, 53, 54, 55}},  // 123 | 456 | 7
                    {"12312", {266, 265}},
                    {"a\n\nb", {97, 267, 98}},
                    {"a   b", {97, 268, kSpace, 98}},  // "  " then " b"
                    {"end  ", {101, 110, 100, 268}},
                    {"\xF0\x9F\x98\x80", {240, 159, 152, 128}},  // 4-byte emoji: its bytes.
                    {"\u65e5\u672c", {230, 151, 165, 230, 156, 172}},
                    {"e\u0301", {101, 204, 129}},  // No normalizer: the combining mark stays apart.
                    {"abc", {274}},
                    {"hello\n\n\nworld  \n", {262, 267, kNewline, 272, 268, kNewline}},
                    {"I'm  HELLO'LL world's",
                     {73, 39, 109, kSpace, kSpace, 72, 69, 76, 76, 79, 39, 76, 76, 273, 264}},
                    {"", {}},
                    {" ", {kSpace}},
                });
}

TEST(TokenizerTest, Qwen2SplitsDigitsAndNormalizes) {
  ExpectEncodes(Style::kQwen2, {
                                   {"hello world", {257, 259, 111, 273}},  // No ignore_merges.
                                   {"1234567", {49, 50, 51, 52, 53, 54, 55}},
                                   {"12312", {49, 50, 51, 49, 50}},
                                   {"e\u0301", {195, 169}},  // NFC: U+00E9.
                                   {"abc", {97, 98, 99}},
                                   {"a\n\nb", {97, 267, 98}},
                               });
}

TEST(TokenizerTest, Gpt2UsesTheByteLevelRegex) {
  ExpectEncodes(Style::kGpt2, {
                                  {"hello world", {257, 259, 111, 273}},
                                  {"1234567", {266, 52, 53, 54, 55}},  // One piece.
                                  {"a\n\nb", {97, kNewline, kNewline, 98}},
                                  {"a   b", {97, 268, kSpace, 98}},
                                  {"IT'S", {73, 84, 39, 83}},
                              });
}

TEST(TokenizerTest, AddedTokensAreMatchedFirst) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "<|begin_of_text|>hello<|eot_id|>"), ElementsAre(kBos, 262, kEot));
  EXPECT_THAT(EncodeOrDie(*tok, "<|begin_of_text"),
              ElementsAre(60, 124, 98, 101, 103, 105, 110, 95, 111, 102, 95, 116, 101, 120, 116));
  // lstrip swallows the spaces before <mask>; rstrip those after [R].
  EXPECT_THAT(EncodeOrDie(*tok, "a <mask> b"), ElementsAre(97, kMask, kSpace, 98));
  EXPECT_THAT(EncodeOrDie(*tok, "x  <mask>"), ElementsAre(120, kMask));
  EXPECT_THAT(EncodeOrDie(*tok, "<mask>x"), ElementsAre(kMask, 120));
  EXPECT_THAT(EncodeOrDie(*tok, "a [R]  b"), ElementsAre(97, kSpace, kRstrip, 98));
  // single_word: only where no word character touches it.
  EXPECT_THAT(EncodeOrDie(*tok, "a wurd b"), ElementsAre(97, kSpace, kWurd, kSpace, 98));
  EXPECT_THAT(EncodeOrDie(*tok, "wurd!"), ElementsAre(kWurd, 33));
  EXPECT_THAT(EncodeOrDie(*tok, "awurd"), ElementsAre(97, 119, 117, 114, 100));
  EXPECT_THAT(EncodeOrDie(*tok, "wurd_"), ElementsAre(119, 117, 114, 100, 95));
}

TEST(TokenizerTest, PostProcessorAddsBos) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(EncodeOrDie(*tok, "hello world", true), ElementsAre(kBos, 262, 273));
  EXPECT_THAT(EncodeOrDie(*tok, "", true), ElementsAre(kBos));
  EXPECT_THAT(EncodeOrDie(*tok, "<|begin_of_text|>hello", true), ElementsAre(kBos, kBos, 262));
  EXPECT_THAT(tok->special_prefix(), ElementsAre(kBos));
  EXPECT_TRUE(tok->special_suffix().empty());
  EXPECT_EQ(tok->bos_id(), kBos);  // From the template, without a config.
  EXPECT_TRUE(tok->eos_ids().empty());
}

TEST(TokenizerTest, ConfigNamesBosEosAndAddsThem) {
  auto qwen = MustLoad(TinyTokenizer(Style::kQwen2),
                       R"({"bos_token": "<|begin_of_text|>", "add_bos_token": true,
                           "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>"},
                           "add_eos_token": true})");
  ASSERT_NE(qwen, nullptr);
  EXPECT_EQ(qwen->bos_id(), kBos);
  EXPECT_THAT(qwen->eos_ids(), ElementsAre(kEos));
  EXPECT_THAT(EncodeOrDie(*qwen, "abc", true), ElementsAre(kBos, 97, 98, 99, kEos));
  EXPECT_THAT(EncodeOrDie(*qwen, "abc", false), ElementsAre(97, 98, 99));
  // The template already adds BOS: add_bos_token does not add a second one.
  auto llama = MustLoad(TinyTokenizer(Style::kLlama3),
                        R"({"bos_token": "<|begin_of_text|>", "add_bos_token": true,
                            "eos_token": "<|eot_id|>"})");
  ASSERT_NE(llama, nullptr);
  EXPECT_THAT(EncodeOrDie(*llama, "abc", true), ElementsAre(kBos, 274));
  EXPECT_THAT(llama->eos_ids(), ElementsAre(kEot));
  // A null bos_token leaves the BOS unknown when the post-processor adds none.
  auto none = MustLoad(TinyTokenizer(Style::kQwen2), R"({"bos_token": null, "eos_token": null})");
  ASSERT_NE(none, nullptr);
  EXPECT_EQ(none->bos_id(), std::nullopt);
  EXPECT_TRUE(none->eos_ids().empty());
}

TEST(TokenizerTest, AddedTokenIdsFollowHuggingFace) {
  // Hugging Face ignores the stored id of an added token: a content in the vocabulary keeps
  // its vocabulary id; others get consecutive ids after the vocabulary.
  Json json = TinyTokenizer(Style::kGpt2);
  json["added_tokens"] = Json::array({{{"id", 900}, {"content", "<x>"}, {"special", true}},
                                      {{"id", 7}, {"content", "abc"}, {"special", true}},
                                      {{"id", 950}, {"content", "<y>"}, {"special", false}}});
  auto tok = MustLoad(json);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->TokenToId("<x>"), 275);
  EXPECT_EQ(tok->TokenToId("abc"), 274);
  EXPECT_EQ(tok->TokenToId("<y>"), 276);
  EXPECT_EQ(tok->vocab_size(), 277);
  EXPECT_TRUE(tok->IsSpecial(274));
  EXPECT_THAT(EncodeOrDie(*tok, "<x>abc<y>"), ElementsAre(275, 274, 276));
}

TEST(TokenizerTest, VocabularyAccessors) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 281);
  EXPECT_EQ(tok->TokenToId("\u0120world"), 273);
  EXPECT_EQ(tok->TokenToId("<mask>"), kMask);
  EXPECT_EQ(tok->TokenToId(" world"), std::nullopt);
  EXPECT_TRUE(tok->IsSpecial(kBos));
  EXPECT_FALSE(tok->IsSpecial(kWurd));  // Added but not special.
  EXPECT_FALSE(tok->IsSpecial(262));
  EXPECT_FALSE(tok->IsSpecial(-1));
  EXPECT_FALSE(tok->IsSpecial(100000));
  EXPECT_EQ(*tok->TokenBytes(kSpace), " ");
  EXPECT_EQ(*tok->TokenBytes(273), " world");
  EXPECT_EQ(*tok->TokenBytes(kBos), "<|begin_of_text|>");
  EXPECT_EQ(*tok->TokenBytes(240), "\xF0");
  EXPECT_FALSE(tok->TokenBytes(281).ok());
  EXPECT_FALSE(tok->TokenBytes(-5).ok());
}

TEST(TokenizerTest, DecodeHandlesSpecialsAndInvalidBytes) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> ids = {kBos, 262, 273, kEot};
  EXPECT_EQ(*tok->Decode(ids), "<|begin_of_text|>hello world<|eot_id|>");
  EXPECT_EQ(*tok->Decode(ids, /*skip_special_tokens=*/true), "hello world");
  EXPECT_EQ(*tok->Decode({kWurd}, true), "wurd");  // Not special: kept.
  EXPECT_EQ(*tok->Decode({240, 159, 152, 128}), "\xF0\x9F\x98\x80");
  EXPECT_EQ(*tok->Decode({97, 240, 159}), "a\xEF\xBF\xBD");  // Truncated: one U+FFFD.
  EXPECT_EQ(*tok->Decode({0xED, 0xA0, 0x80}), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(*tok->Decode({}), "");
  for (int32_t bad : {-1, 281, 1 << 30}) {
    auto decoded = tok->Decode({97, bad});
    ASSERT_FALSE(decoded.ok());
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(decoded.status().message(), HasSubstr(std::to_string(bad)));
  }
}

// Returns random valid UTF-8 mixing ASCII, whitespace runs, digits and multi-byte characters.
std::string RandomText(std::mt19937& rng) {
  static const char* const kPieces[] = {"a",
                                        "e",
                                        "h",
                                        "l",
                                        "o",
                                        "w",
                                        "r",
                                        "d",
                                        "t",
                                        "s",
                                        "A",
                                        "Z",
                                        " ",
                                        "  ",
                                        "\n",
                                        "\n\n",
                                        "\r\n",
                                        "\t",
                                        "'",
                                        "'s",
                                        "'LL",
                                        "1",
                                        "23",
                                        "456",
                                        ".",
                                        ",",
                                        "!",
                                        "?",
                                        "-",
                                        "(",
                                        ")",
                                        "\u00e9",
                                        "e\u0301",
                                        "\u00df",
                                        "\u3000",
                                        "\u00a0",
                                        "\u65e5",
                                        "\u672c",
                                        "\uc548",
                                        "\u0663",
                                        "\xF0\x9F\x98\x80",
                                        "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
                                        "\u200d",
                                        "\u0000",
                                        "\x7f",
                                        "_"};
  std::string text;
  const int n = rng() % 30;
  for (int i = 0; i < n; ++i) {
    if (rng() % 5 == 0) {
      // A random code point from anywhere in Unicode (no surrogates).
      char32_t cp = rng() % 0x110000;
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0x4E00;
      unicode::AppendUtf8(cp, &text);
    } else {
      text += kPieces[rng() % std::size(kPieces)];
    }
  }
  return text;
}

TEST(TokenizerTest, DecodeInvertsEncode) {
  std::mt19937 rng(1234);
  for (Style style : {Style::kLlama3, Style::kQwen2, Style::kGpt2}) {
    auto tok = MustLoad(TinyTokenizer(style));
    ASSERT_NE(tok, nullptr);
    for (int i = 0; i < 2000; ++i) {
      const std::string text = RandomText(rng);
      const std::string expected =
          style == Style::kQwen2 ? unicode::NfcNormalize(text) : text;  // NFC is not undone.
      auto decoded = tok->Decode(EncodeOrDie(*tok, text, true), true);
      ASSERT_TRUE(decoded.ok());
      EXPECT_EQ(*decoded, expected) << "style " << static_cast<int>(style);
    }
  }
}

TEST(TokenizerTest, EncodeRejectsInvalidUtf8) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  for (const std::string bad : {"\xFF", "ok\xC3", "\xED\xA0\x80", "\xC0\xAF", "a\x80z"}) {
    auto ids = tok->Encode(bad);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ids.status().message(), HasSubstr("UTF-8"));
  }
}

TEST(IncrementalDecoderTest, EmitsCharactersOnlyWhenComplete) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  IncrementalDecoder decoder(*tok, /*skip_special_tokens=*/false);
  EXPECT_EQ(*decoder.Push(262), "hello");
  EXPECT_EQ(*decoder.Push(240), "");
  EXPECT_EQ(*decoder.Push(159), "");
  EXPECT_EQ(*decoder.Push(152), "");
  EXPECT_EQ(*decoder.Push(128), "\xF0\x9F\x98\x80");
  EXPECT_EQ(*decoder.Push(kEot), "<|eot_id|>");
  // Ids past the vocabulary (padded embedding rows) decode to nothing; negative ids are errors.
  EXPECT_EQ(*decoder.Push(tok->vocab_size() + 7), "");
  EXPECT_FALSE(decoder.Push(-1).ok());
  EXPECT_EQ(decoder.Flush(), "");
  // An incomplete tail becomes U+FFFD on Flush.
  EXPECT_EQ(*decoder.Push(240), "");
  EXPECT_EQ(*decoder.Push(159), "");
  EXPECT_EQ(decoder.Flush(), "\xEF\xBF\xBD");
  // An impossible continuation is replaced as soon as it is known.
  EXPECT_EQ(*decoder.Push(0xC3), "");
  EXPECT_EQ(*decoder.Push(97),
            "\xEF\xBF\xBD"
            "a");
  // A bad id is an error, an id past the vocabulary decodes to nothing; neither changes the
  // pending bytes.
  EXPECT_EQ(*decoder.Push(0xE6), "");
  EXPECT_FALSE(decoder.Push(-5).ok());
  EXPECT_EQ(*decoder.Push(5000), "");
  EXPECT_EQ(*decoder.Push(0x97), "");
  EXPECT_EQ(*decoder.Push(0xA5), "\u65e5");
}

TEST(IncrementalDecoderTest, SkipsSpecialTokens) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  IncrementalDecoder decoder(*tok, /*skip_special_tokens=*/true);
  EXPECT_EQ(*decoder.Push(kBos), "");
  EXPECT_EQ(*decoder.Push(0xC3), "");
  EXPECT_EQ(*decoder.Push(kEot), "");  // Skipped: the pending byte keeps waiting.
  EXPECT_EQ(*decoder.Push(0xA9), "\u00e9");
}

TEST(IncrementalDecoderTest, ConcatenationEqualsDecode) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(99);
  for (int round = 0; round < 500; ++round) {
    std::vector<int32_t> ids;
    const int n = rng() % 20;
    for (int i = 0; i < n; ++i) {
      // Mostly high bytes, to cut and break multi-byte sequences in every way.
      ids.push_back(rng() % 3 == 0 ? static_cast<int32_t>(rng() % tok->vocab_size())
                                   : static_cast<int32_t>(0x80 + rng() % 0x80));
    }
    for (bool skip : {false, true}) {
      IncrementalDecoder decoder(*tok, skip);
      std::string streamed;
      for (int32_t id : ids) {
        auto piece = decoder.Push(id);
        ASSERT_TRUE(piece.ok());
        EXPECT_EQ(unicode::FindInvalidUtf8(*piece), std::nullopt);
        streamed += *piece;
      }
      streamed += decoder.Flush();
      EXPECT_EQ(streamed, *tok->Decode(ids, skip));
    }
  }
}

TEST(TokenizerTest, FromDirectoryReadsBothFiles) {
  const std::filesystem::path dir =
      std::filesystem::path(testing::TempDir()) / "sieve_tokenizer_test_dir";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << TinyTokenizer(Style::kQwen2).dump();
  std::filesystem::remove(dir / "tokenizer_config.json");
  auto without_config = Tokenizer::FromDirectory(dir.string());
  ASSERT_TRUE(without_config.ok()) << without_config.status();
  EXPECT_EQ((*without_config)->bos_id(), std::nullopt);
  std::ofstream(dir / "tokenizer_config.json") << R"({"eos_token": "<|eot_id|>"})";
  auto with_config = Tokenizer::FromDirectory(dir.string());
  ASSERT_TRUE(with_config.ok()) << with_config.status();
  EXPECT_THAT((*with_config)->eos_ids(), ElementsAre(kEot));
  auto missing = Tokenizer::FromDirectory((dir / "nope").string());
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

TEST(TokenizerTest, ConcurrentEncodesAgree) {
  auto tok = MustLoad(TinyTokenizer(Style::kLlama3));
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(5);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(RandomText(rng));
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& t : texts) expected.push_back(EncodeOrDie(*tok, t));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          auto ids = tok->Encode(texts[i], false);
          if (!ids.ok() || *ids != expected[i]) ++mismatches[t];
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(mismatches, ElementsAre(0, 0, 0, 0));
}

struct BadTokenizer {
  std::string name;
  std::function<void(Json&)> mutate;
  absl::StatusCode code;
  std::string message;
};

TEST(TokenizerTest, RejectsMalformedTokenizerJson) {
  const BadTokenizer cases[] = {
      {"array", [](Json& j) { j = Json::array(); }, absl::StatusCode::kInvalidArgument,
       "expected an object"},
      {"no model", [](Json& j) { j.erase("model"); }, absl::StatusCode::kInvalidArgument, "model"},
      {"wordpiece", [](Json& j) { j["model"]["type"] = "WordPiece"; },
       absl::StatusCode::kUnimplemented, "WordPiece"},
      {"unigram", [](Json& j) { j["model"]["type"] = "Unigram"; }, absl::StatusCode::kUnimplemented,
       "Unigram"},
      {"vocab type", [](Json& j) { j["model"]["vocab"] = "x"; }, absl::StatusCode::kInvalidArgument,
       "model.vocab"},
      {"vocab dup id", [](Json& j) { j["model"]["vocab"]["zz"] = 5; },
       absl::StatusCode::kInvalidArgument, "duplicate id 5"},
      {"vocab negative", [](Json& j) { j["model"]["vocab"]["zz"] = -3; },
       absl::StatusCode::kInvalidArgument, "out of range"},
      {"merge unknown",
       [](Json& j) {
         j["model"]["merges"].push_back(Json::array({"q", "zz"}));
       },
       absl::StatusCode::kInvalidArgument, "'zz'"},
      {"normalizer",
       [](Json& j) {
         j["normalizer"] = {{"type", "Lowercase"}};
       },
       absl::StatusCode::kUnimplemented, "Lowercase"},
      {"normalizer seq",
       [](Json& j) {
         j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "BertNormalizer"}}}}};
       },
       absl::StatusCode::kUnimplemented, "normalizer.normalizers[0].type"},
      {"replace pattern",
       [](Json& j) {
         j["normalizer"] = {{"type", "Replace"}, {"pattern", {{"Regex", "(a"}}}, {"content", ""}};
       },
       absl::StatusCode::kInvalidArgument, "(a"},
      {"pre_tokenizer",
       [](Json& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       absl::StatusCode::kUnimplemented, "Whitespace"},
      {"regex",
       [](Json& j) {
         j["pre_tokenizer"] = {
             {"type", "Split"}, {"pattern", {{"Regex", "\\d+("}}}, {"behavior", "Isolated"}};
       },
       absl::StatusCode::kInvalidArgument, "\\d+("},
      {"decoder order",
       [](Json& j) {
         j["decoder"] = {{"type", "Sequence"},
                         {"decoders", {{{"type", "Fuse"}}, {{"type", "Replace"},
                                       {"pattern", {{"String", "x"}}}, {"content", "y"}}}}};
       },
       absl::StatusCode::kUnimplemented, "decoder.decoders[1].type"},
      {"decoder",
       [](Json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       absl::StatusCode::kUnimplemented, "WordPiece"},
      {"post type",
       [](Json& j) {
         j["post_processor"] = {{"type", "Magic"}};
       },
       absl::StatusCode::kUnimplemented, "Magic"},
      {"template missing special",
       [](Json& j) {
         j["post_processor"] = {
             {"type", "TemplateProcessing"},
             {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
             {"special_tokens", Json::object()}};
       },
       absl::StatusCode::kInvalidArgument, "<s>"},
      {"template B",
       [](Json& j) {
         j["post_processor"] = {{"type", "TemplateProcessing"},
                                {"single", {{{"Sequence", {{"id", "B"}}}}}},
                                {"special_tokens", Json::object()}};
       },
       absl::StatusCode::kInvalidArgument, "post_processor.single[0]"},
      {"template no A",
       [](Json& j) {
         j["post_processor"] = {{"type", "TemplateProcessing"},
                                {"single", Json::array()},
                                {"special_tokens", Json::object()}};
       },
       absl::StatusCode::kInvalidArgument, "no sequence A"},
      {"roberta",
       [](Json& j) {
         j["post_processor"] = {
             {"type", "RobertaProcessing"}, {"cls", {"<s>"}}, {"sep", {"</s>", 2}}};
       },
       absl::StatusCode::kInvalidArgument, "post_processor.cls"},
      {"template id out of range",
       [](Json& j) {
         j["post_processor"]["processors"][1]["special_tokens"]["<|begin_of_text|>"]["ids"] = {
             9999};
       },
       absl::StatusCode::kInvalidArgument, "9999"},
      {"added not array", [](Json& j) { j["added_tokens"] = Json::object(); },
       absl::StatusCode::kInvalidArgument, "added_tokens"},
      {"added content", [](Json& j) { j["added_tokens"][1]["content"] = 7; },
       absl::StatusCode::kInvalidArgument, "added_tokens[1].content"},
      {"added id", [](Json& j) { j["added_tokens"][2]["id"] = -1; },
       absl::StatusCode::kInvalidArgument, "added_tokens[2].id"},
      {"added no id", [](Json& j) { j["added_tokens"][0].erase("id"); },
       absl::StatusCode::kInvalidArgument, "added_tokens[0].id"},
      {"added flag", [](Json& j) { j["added_tokens"][0]["lstrip"] = "yes"; },
       absl::StatusCode::kInvalidArgument, "added_tokens[0].lstrip"},
  };
  for (const BadTokenizer& bad : cases) {
    Json json = TinyTokenizer(Style::kLlama3);
    bad.mutate(json);
    auto tok = Tokenizer::FromJson(json.dump(), "");
    ASSERT_FALSE(tok.ok()) << bad.name;
    EXPECT_EQ(tok.status().code(), bad.code) << bad.name << ": " << tok.status();
    EXPECT_THAT(tok.status().message(), HasSubstr(bad.message)) << bad.name;
  }
}

TEST(TokenizerTest, RejectsMalformedText) {
  const std::string good = TinyTokenizer(Style::kLlama3).dump();
  const std::pair<std::string, std::string> cases[] = {{"", ""},
                                                       {"{", ""},
                                                       {"{\"model\": }", ""},
                                                       {good.substr(0, good.size() / 2), ""},
                                                       {good, "{"},
                                                       {good, "[1]"},
                                                       {good, R"({"bos_token": "<nope>"})"},
                                                       {good, R"({"eos_token": 3})"},
                                                       {good, R"({"add_bos_token": "yes"})"},
                                                       {good, R"({"bos_token": {"content": 5}})"}};
  for (const auto& [tokenizer_json, config_json] : cases) {
    auto tok = Tokenizer::FromJson(tokenizer_json, config_json);
    ASSERT_FALSE(tok.ok()) << config_json;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
  }
}

}  // namespace
}  // namespace sieve::engine
