#include "engine/tokenizer/decoder.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

TokenDecoder Llama2Decoder() {
  auto decoder = TokenDecoder::FromJson(nlohmann::json::parse(R"({"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})"),
                                        "decoder");
  EXPECT_TRUE(decoder.ok()) << decoder.status();
  return *decoder;
}

std::string Decode(const TokenDecoder& decoder, const std::vector<std::string>& tokens,
                   bool eager) {
  DecodeStream stream(decoder, eager);
  std::string out;
  for (const std::string& token : tokens) {
    const std::string piece = decoder.Piece(token, stream.at_first());
    stream.Push(piece, decoder.FallbackByte(piece), &out);
  }
  stream.Finish(&out);
  return out;
}

TEST(DecoderTest, SentencePieceChain) {
  const TokenDecoder d = Llama2Decoder();
  EXPECT_EQ(Decode(d, {"▁Hello", "▁world"}, false), "Hello world");
  EXPECT_EQ(Decode(d, {"▁", "▁Hi"}, false), " Hi");  // Strip removes one space only.
  EXPECT_EQ(Decode(d, {"<s>", "▁Hi"}, false), "<s> Hi");
  EXPECT_EQ(Decode(d, {"<0xE4>", "<0xBD>", "<0xA0>", "▁x"}, false), "\u4f60 x");
  EXPECT_EQ(Decode(d, {"<0x20>", "a"}, false), "a");  // The fused text is stripped.
  EXPECT_EQ(d.FallbackByte("<0x4a>"), 0x4A);
  EXPECT_EQ(d.FallbackByte("<0x+F>"), 0x0F);  // As Rust's u8::from_str_radix.
  EXPECT_EQ(d.FallbackByte("<0xG1>"), -1);
}

// An invalid byte run is one U+FFFD per byte when decoded whole; streamed, the complete
// character before the invalid byte has already been emitted.
TEST(DecoderTest, InvalidByteRunsWholeAndStreamed) {
  const TokenDecoder d = Llama2Decoder();
  const std::vector<std::string> run = {"<0xE4>", "<0xBD>", "<0xA0>", "<0xE4>", "▁x"};
  EXPECT_EQ(Decode(d, run, false), "\ufffd\ufffd\ufffd\ufffd x");
  EXPECT_EQ(Decode(d, run, true), "\u4f60\ufffd x");
  EXPECT_EQ(Decode(d, {"<0xFF>", "<0x41>"}, true), "\ufffd\ufffd");
  EXPECT_EQ(Decode(d, {"<0xFF>", "<0x41>"}, false), "\ufffd\ufffd");
  EXPECT_EQ(Decode(d, {"<0xE4>", "<0xBD>"}, true), "\ufffd\ufffd");  // Incomplete at the end.
}

TEST(DecoderTest, MetaspaceDropsReplacementsOfTheFirstToken) {
  auto d = TokenDecoder::FromJson(
      nlohmann::json::parse(R"({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"})"),
      "decoder");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->first_differs());
  EXPECT_EQ(Decode(*d, {"▁▁Hey", "▁friend▁"}, false), "Hey friend ");
  auto never = TokenDecoder::FromJson(
      nlohmann::json::parse(R"({"type": "Metaspace", "prepend_scheme": "never"})"), "decoder");
  ASSERT_TRUE(never.ok());
  EXPECT_EQ(Decode(*never, {"▁Hey"}, false), " Hey");
}

TEST(DecoderTest, NoDecoderJoinsWithSpaces) {
  EXPECT_EQ(Decode(TokenDecoder(), {"a", "b", "c"}, true), "a b c");
}

TEST(DecoderTest, RejectsUnsupportedChains) {
  for (const auto& [json, message] : std::vector<std::pair<std::string, std::string>>{
           {R"({"type": "WordPiece"})", "WordPiece"},
           {R"({"type": "Sequence", "decoders": [{"type": "ByteLevel"}, {"type": "Fuse"}]})",
            "ByteLevel"},
           {R"({"type": "Sequence", "decoders": [{"type": "Fuse"},
               {"type": "Strip", "content": " ", "start": 0, "stop": 1}]})", "stop"},
           {R"({"type": "Replace", "pattern": {"Regex": "x"}, "content": "y"})", "decoder.pattern"},
           {R"({"type": "Strip", "content": "ab", "start": 1})", "decoder.content"}}) {
    auto d = TokenDecoder::FromJson(nlohmann::json::parse(json), "decoder");
    ASSERT_FALSE(d.ok()) << json;
    EXPECT_THAT(d.status().message(), HasSubstr(message)) << json;
  }
}

}  // namespace
}  // namespace sieve::engine
