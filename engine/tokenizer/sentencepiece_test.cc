// SentencePiece-style BPE on the real Mistral 7B v0.1 tokenizer.json (tests/data/tokenizers):
// legacy spacing (Prepend + Replace normalizers) against non-legacy (Metaspace "first"), byte
// fallback, and streaming. Expected ids are Hugging Face tokenizers' (the golden test checks
// thousands more strings; these name the behaviours).
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;

nlohmann::json MistralJson() {
  const char* source = std::getenv("SIEVE_SOURCE_DIR");
  std::ifstream in(std::string(source ? source : ".") +
                   "/tests/data/tokenizers/mistral7b.tokenizer.json");
  std::ostringstream contents;
  contents << in.rdbuf();
  return nlohmann::json::parse(contents.str(), nullptr, false);
}

std::unique_ptr<Tokenizer> Load(const nlohmann::json& json) {
  auto tok = Tokenizer::FromJson(json.dump(), "");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

std::unique_ptr<Tokenizer> NonLegacy() {
  nlohmann::json json = MistralJson();
  json["normalizer"] = nullptr;
  json["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", false}};
  return Load(json);
}

std::vector<int32_t> Ids(const Tokenizer& tok, std::string_view text) {
  return tok.Encode(text, false).value_or(std::vector<int32_t>{-1});
}

TEST(SentencePieceTest, LegacyPrependsAfterEverySpecialToken) {
  auto tok = Load(MistralJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Ids(*tok, "<s>Hello</s> there"), ElementsAre(1, 22557, 2, 28705, 736));
  EXPECT_THAT(Ids(*tok, "Hello<s>world"), ElementsAre(22557, 1, 1526));
  EXPECT_THAT(Ids(*tok, " Hello"), ElementsAre(28705, 22557));
  EXPECT_EQ(tok->Decode({1, 22557, 2, 28705, 736}).value_or(""), "<s> Hello</s>  there");
  EXPECT_THAT(tok->Encode("Hi", true).value_or(std::vector<int32_t>{}), ElementsAre(1, 15359));
}

TEST(SentencePieceTest, NonLegacyPrependsOnlyAtTheStart) {
  auto tok = NonLegacy();
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Ids(*tok, "<s>Hello</s> there"), ElementsAre(1, 16230, 2, 736));
  EXPECT_THAT(Ids(*tok, "Hello<s>world"), ElementsAre(22557, 1, 9471));
  EXPECT_THAT(Ids(*tok, " Hello"), ElementsAre(22557));
  EXPECT_EQ(tok->Decode({1, 16230, 2, 736}).value_or(""), "<s>Hello</s> there");
}

TEST(SentencePieceTest, ByteFallbackEncodesAndStreams) {
  auto tok = Load(MistralJson());
  ASSERT_NE(tok, nullptr);
  // U+10FFFF is not in the vocabulary: four <0xNN> tokens.
  EXPECT_THAT(Ids(*tok, "\U0010FFFFx"), ElementsAre(28705, 247, 146, 194, 194, 28744));
  EXPECT_EQ(tok->TokenBytes(247).value_or(""), "\xF4");
  IncrementalDecoder stream(*tok, /*skip_special_tokens=*/false);
  std::vector<std::string> out;
  for (int32_t id : {28705, 247, 146, 194, 194, 28744}) out.push_back(stream.Push(id).value_or("?"));
  out.push_back(stream.Flush());
  // The leading ▁ is stripped; the character appears with its last byte.
  EXPECT_THAT(out, ElementsAre("", "", "", "", "\U0010FFFF", "x", ""));
}

}  // namespace
}  // namespace sieve::engine
