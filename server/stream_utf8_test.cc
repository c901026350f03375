// Streamed output never carries a broken UTF-8 character: a character whose bytes arrive in
// several tokens is held back until it is complete. The output path is the engine's
// (engine_loop.cc HandleToken: IncrementalDecoder, then StopChecker, both flushed at the end)
// followed by the service's AppendDelta, driven here with the embedded model's tokenizer and
// token sequences that cut multi-byte characters byte by byte.
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "engine/serving/stop_checker.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/convert.h"

namespace sieve::server {
namespace {

using engine::FinishReason;

const engine::Tokenizer& EmbeddedTokenizer() {
  static const engine::Tokenizer* const tokenizer = [] {
    const char* root = std::getenv("SIEVE_SOURCE_DIR");
    auto loaded = engine::Tokenizer::FromDirectory(std::string(root ? root : ".") +
                                                   "/models/embedded");
    if (!loaded.ok()) std::abort();
    return loaded->release();
  }();
  return *tokenizer;
}

// The id of the token that decodes to exactly the byte `b` (the byte-level vocabulary has one
// for each of the 256 bytes).
int32_t ByteToken(unsigned char b) {
  static const std::map<unsigned char, int32_t> ids = [] {
    std::map<unsigned char, int32_t> out;
    const engine::Tokenizer& t = EmbeddedTokenizer();
    for (int32_t id = 0; id < t.vocab_size(); ++id) {
      absl::StatusOr<std::string> bytes = t.TokenBytes(id);
      if (bytes.ok() && bytes->size() == 1 && !out.count(bytes->at(0))) {
        out[static_cast<unsigned char>(bytes->at(0))] = id;
      }
    }
    return out;
  }();
  auto it = ids.find(b);
  if (it == ids.end()) std::abort();
  return it->second;
}

std::vector<int32_t> ByteTokens(const std::string& text) {
  std::vector<int32_t> out;
  for (char c : text) out.push_back(ByteToken(static_cast<unsigned char>(c)));
  return out;
}

bool ValidUtf8(const std::string& s) { return !engine::unicode::FindInvalidUtf8(s); }

struct Streamed {
  std::vector<std::string> texts;  // the text of each stream message, one per token
  FinishReason finish = FinishReason::kNone;
};

// Streams `ids` as generated tokens, one stream message per token.
Streamed Stream(const std::vector<int32_t>& ids, const engine::StopCriteria& stop) {
  const engine::Tokenizer& tokenizer = EmbeddedTokenizer();
  engine::IncrementalDecoder decoder(tokenizer, /*skip_special_tokens=*/true);
  const std::vector<int32_t> eos = tokenizer.eos_ids();
  engine::StopChecker checker(stop, eos);
  Streamed out;
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = decoder.Push(id);
    EXPECT_TRUE(piece.ok()) << piece.status();
    engine::StopChecker::Step step = checker.Push(id, piece.ok() ? *piece : "");
    if (step.finish != FinishReason::kNone) {
      step.emit += checker.Flush();
      if (step.finish == FinishReason::kLength) step.emit += decoder.Flush();
    }
    engine::TokenDelta delta;
    delta.token_ids.push_back(id);
    delta.text = step.emit;
    v1::GenerateResponse message;
    AppendDelta(delta, tokenizer, &message);
    out.texts.push_back(message.text());
    if (step.finish != FinishReason::kNone) {
      out.finish = step.finish;
      break;
    }
  }
  return out;
}

engine::StopCriteria MaxTokens(int32_t n) {
  engine::StopCriteria stop;
  stop.max_tokens = n;
  return stop;
}

TEST(StreamUtf8Test, ACharacterCutAcrossTokensIsSentWholeWithItsLastByte) {
  // "a€b😀": € is 3 bytes, 😀 4; one token per byte.
  const std::string text = "a\xE2\x82\xAC" "b\xF0\x9F\x98\x80";
  Streamed s = Stream(ByteTokens(text), MaxTokens(100));
  EXPECT_THAT(s.texts, testing::ElementsAre("a", "", "", "\xE2\x82\xAC", "b", "", "", "",
                                            "\xF0\x9F\x98\x80"));
  for (const std::string& t : s.texts) EXPECT_TRUE(ValidUtf8(t)) << t;
}

TEST(StreamUtf8Test, MaxTokensInsideACharacterEndsWithAReplacementNotBrokenBytes) {
  // The stream ends after 2 of €'s 3 bytes: the held bytes become U+FFFD, never sent raw.
  Streamed s = Stream(ByteTokens("a\xE2\x82\xAC"), MaxTokens(3));
  EXPECT_EQ(s.finish, FinishReason::kLength);
  ASSERT_EQ(s.texts.size(), 3u);
  EXPECT_EQ(s.texts[0], "a");
  EXPECT_EQ(s.texts[1], "");
  EXPECT_EQ(s.texts[2], "\xEF\xBF\xBD");
}

TEST(StreamUtf8Test, AStopTokenInsideACharacterDropsTheHeldBytes) {
  engine::StopCriteria stop = MaxTokens(100);
  const int32_t stop_id = ByteToken('!');
  stop.stop_token_ids = {stop_id};
  std::vector<int32_t> ids = ByteTokens("x\xF0\x9F");
  ids.push_back(stop_id);
  Streamed s = Stream(ids, stop);
  EXPECT_EQ(s.finish, FinishReason::kStop);
  EXPECT_THAT(s.texts, testing::ElementsAre("x", "", "", ""));
}

TEST(StreamUtf8Test, AStopStringAfterACutCharacterReleasesOnlyWholeCharacters) {
  engine::StopCriteria stop = MaxTokens(100);
  stop.stop_strings = {"\xC3\xA9!"};  // "é!"
  // "é" arrives in two tokens, could begin the stop string, and is released when "?" rules
  // that out; the second "é!" stops the stream.
  Streamed s = Stream(ByteTokens("\xC3\xA9?\xC3\xA9!"), stop);
  EXPECT_EQ(s.finish, FinishReason::kStop);
  EXPECT_THAT(s.texts, testing::ElementsAre("", "", "\xC3\xA9?", "", "", ""));
  for (const std::string& t : s.texts) EXPECT_TRUE(ValidUtf8(t)) << t;
}

}  // namespace
}  // namespace sieve::server
