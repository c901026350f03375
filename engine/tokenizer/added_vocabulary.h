// Added tokens of a Hugging Face tokenizer.json ("added_tokens": [...]) and the splitting of
// input text on them, which happens before normalization and pre-tokenization.
//
// Matching follows Hugging Face tokenizers' AddedVocabulary: an Aho-Corasick search with
// leftmost-longest semantics over the token contents; a single_word token is ignored where a
// word character (Rust regex \w) touches it; lstrip / rstrip make the token swallow the
// whitespace on its left / right (it then disappears from the encoding).
#ifndef SIEVE_ENGINE_TOKENIZER_ADDED_VOCABULARY_H_
#define SIEVE_ENGINE_TOKENIZER_ADDED_VOCABULARY_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace sieve::engine {

// One entry of tokenizer.json's "added_tokens".
struct AddedToken {
  int32_t id = 0;
  std::string content;       // The literal text of the token (UTF-8, non-empty).
  bool special = false;      // Skipped by Decode(skip_special_tokens=true).
  bool single_word = false;  // Only matches when not inside a word.
  bool lstrip = false;       // Swallows the whitespace before it.
  bool rstrip = false;       // Swallows the whitespace after it.
  bool normalized = false;   // Matched in the normalized text (else in the raw text).
};

// A piece of text after splitting on added tokens: plain text (id < 0) or one added token.
struct AddedTokenSplit {
  std::string_view text;  // For a token, its match including swallowed whitespace.
  int32_t id = -1;
};

// Finds added tokens in text (immutable after construction, thread-safe).
class AddedTokenMatcher {
 public:
  // Matches the given tokens, each by `pattern` (its content, or its normalized content);
  // `tokens` must outlive the matcher. Among equal patterns the first one wins.
  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(const std::vector<std::pair<std::string, const AddedToken*>>& tokens);

  // Returns true if there is nothing to match.
  bool empty() const { return patterns_.empty(); }

  // Appends the splits of `text` (valid UTF-8) to `out`: plain text between the matched
  // tokens and the tokens themselves, in order. Empty text pieces are left out.
  void Split(std::string_view text, std::vector<AddedTokenSplit>* out) const;

 private:
  // Returns the index of the longest pattern that starts at `pos`, or -1; sets `*len`.
  int LongestMatchAt(std::string_view text, size_t pos, size_t* len) const;

  std::vector<const AddedToken*> patterns_;
  // The trie: node 0 is the root; edges keyed by node << 8 | byte.
  absl::flat_hash_map<uint64_t, int32_t> edges_;
  std::vector<int32_t> terminal_;  // Per node: pattern index ending there, or -1.
  bool first_byte_[256] = {};      // Bytes that start some pattern.
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_ADDED_VOCABULARY_H_
