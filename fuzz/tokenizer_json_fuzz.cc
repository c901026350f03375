// libFuzzer target for the tokenizer.json / tokenizer_config.json loader
// (engine/tokenizer/tokenizer.h, Tokenizer::FromJson) with stricter checks than
// tokenizer_fuzz, which feeds the same loader among other things.
//
// The input is a tokenizer.json, optionally followed by a NUL byte and a tokenizer_config.json.
// Checked on every input (any violation traps):
//   - loading never throws or crashes; an error carries a message;
//   - a loaded tokenizer encodes a fixed multilingual text (or refuses it cleanly) into ids
//     inside its vocabulary;
//   - everything it decodes is valid UTF-8: Decode, and each piece the IncrementalDecoder
//     streams (a character split across tokens is held back, never emitted broken), for the
//     encoded text and for a run over the first ids of the vocabulary.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"

namespace {

using sieve::engine::IncrementalDecoder;
using sieve::engine::Tokenizer;

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

bool ValidUtf8(std::string_view s) { return !sieve::engine::unicode::FindInvalidUtf8(s); }

void CheckStream(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip) {
  IncrementalDecoder decoder(tokenizer, skip);
  for (int32_t id : ids) {
    absl::StatusOr<std::string> piece = decoder.Push(id);
    if (piece.ok()) Check(ValidUtf8(*piece));
  }
  Check(ValidUtf8(decoder.Flush()));
  absl::StatusOr<std::string> text = tokenizer.Decode(ids, skip);
  if (text.ok()) Check(ValidUtf8(*text));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view json = input.substr(0, nul);
  const std::string_view config =
      nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);
  absl::StatusOr<std::unique_ptr<Tokenizer>> loaded = Tokenizer::FromJson(json, config);
  if (!loaded.ok()) {
    Check(!loaded.status().message().empty());
    return 0;
  }
  const Tokenizer& tokenizer = **loaded;
  const int32_t vocab = tokenizer.vocab_size();
  Check(vocab >= 0);
  const std::string_view sample =
      "Hello, world! 123 4567 caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E "
      "\xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD \t\n\n  x";
  for (bool add_special : {false, true}) {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(sample, add_special);
    if (!ids.ok()) {
      Check(!ids.status().message().empty());
      continue;
    }
    for (int32_t id : *ids) Check(id >= 0 && id < vocab);
    CheckStream(tokenizer, *ids, false);
    CheckStream(tokenizer, *ids, true);
  }
  std::vector<int32_t> first(static_cast<size_t>(std::min(vocab, 1024)));
  for (size_t i = 0; i < first.size(); ++i) {
    first[i] = static_cast<int32_t>(i);
    (void)tokenizer.TokenBytes(first[i]);  // ids with no token (gaps) are an error, not a crash
  }
  CheckStream(tokenizer, first, false);
  return 0;
}
