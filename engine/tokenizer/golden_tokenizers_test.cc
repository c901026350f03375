// Differential test against Hugging Face tokenizers: tests/data/tokenizers holds real
// tokenizer.json files of several families (whole or cut down, see
// scripts/tokenizer_goldens/gen_goldens.js) and, per tokenizer, the reference's ids and decodes
// of every string of corpus.json (scripts, digits, whitespace runs, emoji, combining marks,
// special-token text, edge cases) and of random id sequences. Every one must match exactly.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sieve::engine {
namespace {

using Json = nlohmann::json;

std::string DataDir() {
  const char* source = std::getenv("SIEVE_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/data/tokenizers/";
}

Json ReadJson(const std::string& name) {
  std::ifstream in(DataDir() + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << DataDir() + name;
  std::ostringstream contents;
  contents << in.rdbuf();
  return Json::parse(contents.str(), nullptr, /*allow_exceptions=*/false);
}

std::string Quote(const std::string& s) { return Json(s).dump(); }

class GoldenTokenizerTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTokenizerTest, EncodeAndDecodeMatchTheReference) {
  const Json golden = ReadJson(GetParam() + ".golden.json");
  const Json corpus = ReadJson("corpus.json");
  ASSERT_TRUE(golden.is_object() && corpus.is_array());
  Json file = ReadJson(golden["tokenizer"].get<std::string>());
  ASSERT_TRUE(file.is_object());
  for (const auto& [key, value] : golden["replace"].items()) file[key] = value;
  auto loaded = Tokenizer::FromJson(file.dump(), "");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Tokenizer& tok = **loaded;

  const Json& cases = golden["cases"];
  ASSERT_EQ(cases.size(), corpus.size());
  int failures = 0;
  auto fail = [&failures](const std::string& what) {
    if (++failures <= 12) ADD_FAILURE() << what;
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string text = corpus[i].get<std::string>();
    const Json& c = cases[i];
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    const auto ids_special = c.contains("ids_special")
                                 ? c["ids_special"].get<std::vector<int32_t>>()
                                 : ids;
    const std::string decoded = c.contains("decoded") ? c["decoded"].get<std::string>() : text;
    const std::string decoded_skip =
        c.contains("decoded_skip") ? c["decoded_skip"].get<std::string>() : decoded;
    auto got = tok.Encode(text, /*add_special_tokens=*/false);
    if (!got.ok() || *got != ids) {
      fail("encode " + Quote(text) + ": got " +
           (got.ok() ? Json(*got).dump() : std::string(got.status().message())) + ", want " +
           Json(ids).dump());
      continue;
    }
    auto got_special = tok.Encode(text, /*add_special_tokens=*/true);
    if (!got_special.ok() || *got_special != ids_special) {
      fail("encode with special tokens " + Quote(text) + ": want " + Json(ids_special).dump());
    }
    auto text_back = tok.Decode(ids, /*skip_special_tokens=*/false);
    if (!text_back.ok() || *text_back != decoded) {
      fail("decode of " + Quote(text) + ": got " + Quote(text_back.value_or("<error>")) +
           ", want " + Quote(decoded));
    }
    auto text_skip = tok.Decode(ids_special, /*skip_special_tokens=*/true);
    if (!text_skip.ok() || *text_skip != decoded_skip) {
      fail("decode skipping specials of " + Quote(text) + ": got " +
           Quote(text_skip.value_or("<error>")) + ", want " + Quote(decoded_skip));
    }
    // Streaming gives the same text (the byte runs of encoded text are valid UTF-8).
    IncrementalDecoder stream(tok, /*skip_special_tokens=*/false);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.Push(id).value_or("<error>");
    streamed += stream.Flush();
    if (streamed != decoded) {
      fail("streamed decode of " + Quote(text) + ": got " + Quote(streamed));
    }
  }
  for (const Json& d : golden["decodes"]) {
    const auto ids = d["ids"].get<std::vector<int32_t>>();
    for (bool skip : {false, true}) {
      const std::string want = d[skip ? "skip" : "text"].get<std::string>();
      auto got = tok.Decode(ids, skip);
      if (!got.ok() || *got != want) {
        fail("decode " + Json(ids).dump() + (skip ? " skipping specials" : "") + ": got " +
             Quote(got.value_or(std::string(got.status().message()))) + ", want " + Quote(want));
      }
    }
  }
  EXPECT_EQ(failures, 0) << GetParam() << ": " << failures << " mismatches in "
                         << cases.size() << " strings and " << golden["decodes"].size()
                         << " decodes";
}

INSTANTIATE_TEST_SUITE_P(
    Families, GoldenTokenizerTest,
    ::testing::Values("mistral7b_legacy", "mistral7b_metaspace_first",
                      "mistral7b_metaspace_always_split", "mistral7b_nfkc", "gemma3",
                      "gemma2_style", "deepseek_v3", "qwen3", "llama3_1", "llama3_1_pcre2"));

}  // namespace
}  // namespace sieve::engine
