// libFuzzer target for the tokenizer (engine/tokenizer.h).
//
// Each input is used three ways:
//   1. as tokenizer.json: loading must fail cleanly or give a tokenizer that can encode and
//      decode without crashing;
//   2. as tokenizer_config.json next to a fixed, valid tokenizer.json;
//   3. as text for two fixed byte-level tokenizers (Llama-3 and GPT-2 style): valid UTF-8
//      must encode, and decode(encode(x)) must give x back, also when streamed through an
//      IncrementalDecoder; invalid UTF-8 must be an error. Any violation aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

namespace {

using sieve::engine::IncrementalDecoder;
using sieve::engine::Tokenizer;
using Json = nlohmann::json;

// A byte-level BPE tokenizer.json: the 256 byte symbols, a few merges, two special tokens.
std::string FixedTokenizerJson(bool llama3) {
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) {
    vocab[std::string(sieve::engine::ByteLevelChar(static_cast<uint8_t>(b)))] = b;
  }
  const char* const merges[][2] = {
      {"\u0120", "t"}, {"h", "e"},           {"\u0120t", "he"},    {"i", "n"}, {"\u0120", "a"},
      {"e", "r"},      {"\u010a", "\u010a"}, {"\u0120", "\u0120"}, {"1", "2"}, {"'", "s"}};
  Json merge_list = Json::array();
  int32_t next = 256;
  for (const auto& m : merges) {
    vocab[std::string(m[0]) + m[1]] = next++;
    merge_list.push_back(Json::array({m[0], m[1]}));
  }
  Json added = Json::array();
  for (const char* content : {"<|begin_of_text|>", "<|eot_id|>"}) {
    added.push_back({{"id", next++},
                     {"content", content},
                     {"special", true},
                     {"normalized", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"single_word", false}});
  }
  Json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", !llama3}};
  Json pre = byte_level;
  if (llama3) {
    pre = {{"type", "Sequence"},
           {"pretokenizers",
            {{{"type", "Split"},
              {"pattern", {{"Regex", std::string(sieve::engine::kLlama3Regex)}}},
              {"behavior", "Isolated"},
              {"invert", false}},
             byte_level}}};
  }
  return Json{
      {"added_tokens", added},
      {"pre_tokenizer", pre},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}, {"ignore_merges", llama3}}}}
      .dump();
}

const Tokenizer& FixedTokenizer(bool llama3) {
  static const Tokenizer* const kLlama3 =
      Tokenizer::FromJson(FixedTokenizerJson(true), "").value().release();
  static const Tokenizer* const kGpt2 =
      Tokenizer::FromJson(FixedTokenizerJson(false), "").value().release();
  return llama3 ? *kLlama3 : *kGpt2;
}

// Exercises a tokenizer built from fuzzed JSON; only crashes matter here.
void Exercise(const Tokenizer& tokenizer) {
  auto ids = tokenizer.Encode("Hello world 123 <|eot_id|> \xF0\x9F\x98\x80\n\n", true);
  if (!ids.ok()) return;
  (void)tokenizer.Decode(*ids, false);
  (void)tokenizer.Decode(*ids, true);
  IncrementalDecoder decoder(tokenizer, false);
  for (int32_t id : *ids) (void)decoder.Push(id);
  (void)decoder.Flush();
  (void)tokenizer.Decode({-1, 0, tokenizer.vocab_size()}, false);
  (void)tokenizer.TokenBytes(tokenizer.vocab_size() - 1);
}

// Checks the round trip of `text` through a fixed tokenizer; aborts on any violation.
void CheckRoundTrip(const Tokenizer& tokenizer, std::string_view text) {
  auto ids = tokenizer.Encode(text, false);
  const bool valid = !sieve::engine::unicode::FindInvalidUtf8(text).has_value();
  if (!valid) {
    if (ids.ok()) std::abort();  // Invalid UTF-8 must be rejected.
    return;
  }
  if (!ids.ok()) std::abort();
  auto decoded = tokenizer.Decode(*ids, false);
  if (!decoded.ok() || *decoded != text) std::abort();
  IncrementalDecoder decoder(tokenizer, false);
  std::string streamed;
  for (int32_t id : *ids) {
    auto piece = decoder.Push(id);
    if (!piece.ok()) std::abort();
    streamed += *piece;
  }
  streamed += decoder.Flush();
  if (streamed != text) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  if (auto tokenizer = Tokenizer::FromJson(input, ""); tokenizer.ok()) Exercise(**tokenizer);
  static const std::string kFixedJson = FixedTokenizerJson(true);
  if (auto tokenizer = Tokenizer::FromJson(kFixedJson, input); tokenizer.ok()) {
    Exercise(**tokenizer);
  }
  CheckRoundTrip(FixedTokenizer(true), input);
  CheckRoundTrip(FixedTokenizer(false), input);
  return 0;
}
