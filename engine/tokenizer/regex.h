// A regular expression of a tokenizer.json (Split pre-tokenizer, Replace normalizer / decoder),
// run by PCRE2 (UTF + UCP, JIT-compiled where the platform has a JIT) with the semantics of
// Oniguruma as Hugging Face tokenizers uses it:
//   * Ruby syntax: `^` / `$` match at line starts / ends (PCRE2_MULTILINE), `.` no newline;
//     `\uHHHH` is a code point.
//   * \p{L}, \p{N}, \p{P}, \p{S}, \p{M} (also inside classes) and \s, \S outside classes follow
//     Oniguruma's Unicode 16.0 (engine/tokenizer/unicode.h): \s is the White_Space property
//     (PCRE2's also has U+180E) and the code points of those categories assigned after Unicode
//     14 are added to PCRE2's classes. Other properties (\p{Lu}, \p{Han}, ...) and \P{..} inside
//     a class are PCRE2's (Unicode 14 in 10.42).
//   * Find-all as Rust's onig::Regex::find_iter: matches left to right, each search starting
//     where the last match ended; an empty match right where the previous match ended is
//     skipped by advancing one character.
//
// Thread-safety: immutable after Compile; FindAll may run on any number of threads at once
// (each thread has its own match data).
#ifndef SIEVE_ENGINE_TOKENIZER_REGEX_H_
#define SIEVE_ENGINE_TOKENIZER_REGEX_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sieve::engine {

class Regex {
 public:
  // A match: byte offsets [begin, end) into the searched text.
  using Span = std::pair<uint32_t, uint32_t>;

  // Compiles `pattern` (Oniguruma syntax as far as tokenizer.json files use it). A pattern
  // PCRE2 rejects is an InvalidArgument error that quotes it and PCRE2's message.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern);

  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends to `matches` the successive matches in valid UTF-8 `text` (find_iter semantics
  // above). A PCRE2 resource limit (pathological backtracking) is a ResourceExhausted error.
  absl::Status FindAll(std::string_view text, std::vector<Span>* matches) const;

  // Returns the pattern as written in tokenizer.json / as given to PCRE2.
  const std::string& pattern() const { return pattern_; }
  const std::string& pcre2_pattern() const { return translated_; }

 private:
  Regex() = default;

  std::string pattern_;
  std::string translated_;
  void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_REGEX_H_
