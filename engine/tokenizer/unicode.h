// Unicode helpers for the tokenizer: UTF-8 decoding and validation, lossy decoding as Rust's
// `String::from_utf8_lossy` does it, the character classes that the pre-tokenizer regexes use
// (\p{L}, \p{N}, \s, \w) and NFC normalization.
//
// The tables come from scripts/gen_unicode_tables.py (engine/unicode_tables.inc). Letters,
// numbers and whitespace follow Oniguruma's classes as Hugging Face tokenizers uses them
// (Unicode 16.0). NFC reproduces Hugging Face's normalizer, which has Unicode 9.0 data: marks
// and decompositions added since then are starters that stay as they are.
//
// Everything here is stateless and thread-safe.
#ifndef SIEVE_ENGINE_TOKENIZER_UNICODE_H_
#define SIEVE_ENGINE_TOKENIZER_UNICODE_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace sieve::engine::unicode {

// The replacement character U+FFFD, used for invalid UTF-8 in lossy decoding.
inline constexpr char32_t kReplacementChar = 0xFFFD;

// Class bits of a code point (several may be set).
enum CodePointClass : uint8_t {
  kLetter = 1,      // General category L* (regex \p{L}).
  kNumber = 2,      // General category N* (regex \p{N}).
  kWhitespace = 4,  // The White_Space property (regex \s).
  kWord = 8,        // Rust regex \w: Alphabetic, marks, Nd, Pc, Join_Control.
};

// A closed range [first, last] of code points.
struct CodePointRange {
  char32_t first;
  char32_t last;
};

// Returns the code points of general category `category` ('L', 'N', 'P', 'S' or 'M'; else none)
// assigned in Unicode 15.0 - 16.0, as Oniguruma 6.9.10 classifies them: a regex engine with
// Unicode 14 data adds them to its \p{L} / \p{N} / \p{P} / \p{S} / \p{M}.
std::vector<CodePointRange> AssignedAfterUnicode14(char category);

// Returns the CodePointClass bits of `cp` (0 for anything else, including invalid values).
uint8_t ClassesOf(char32_t cp);

// Returns true if `cp` is a letter (\p{L}).
inline bool IsLetter(char32_t cp) { return ClassesOf(cp) & kLetter; }
// Returns true if `cp` is a number (\p{N}).
inline bool IsNumber(char32_t cp) { return ClassesOf(cp) & kNumber; }
// Returns true if `cp` is whitespace (\s, the White_Space property).
inline bool IsWhitespace(char32_t cp) { return ClassesOf(cp) & kWhitespace; }
// Returns true if `cp` is a word character (Rust regex \w).
inline bool IsWordChar(char32_t cp) { return ClassesOf(cp) & kWord; }

// Returns the canonical combining class of `cp` (0 for starters).
int CombiningClass(char32_t cp);

// Returns the Unicode version of the normalization tables ("14.0.0").
const char* UnicodeDataVersion();

// Returns the byte offset of the first invalid UTF-8 sequence in `bytes` (overlong forms,
// surrogates, values above U+10FFFF and truncated sequences are invalid), or nullopt if
// `bytes` is valid UTF-8.
std::optional<size_t> FindInvalidUtf8(std::string_view bytes);

// Decodes the code point that starts at `text[*pos]` and advances `*pos` past it. `text` must
// be valid UTF-8 and `*pos` < text.size() must be at a character boundary.
inline char32_t DecodeNext(std::string_view text, size_t* pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + *pos;
  if (s[0] < 0x80) {
    *pos += 1;
    return s[0];
  }
  if (s[0] < 0xE0) {
    *pos += 2;
    return ((s[0] & 0x1F) << 6) | (s[1] & 0x3F);
  }
  if (s[0] < 0xF0) {
    *pos += 3;
    return ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
  }
  *pos += 4;
  return ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

// Appends the UTF-8 encoding of `cp` (a Unicode scalar value) to `out`.
void AppendUtf8(char32_t cp, std::string* out);

// Decodes valid UTF-8 `text` into code points.
std::vector<char32_t> DecodeUtf8(std::string_view text);

// Decodes `bytes` as Rust's `String::from_utf8_lossy` does: each maximal invalid subpart (the
// longest prefix of a well-formed sequence, or one byte) becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes);

// Returns how many bytes at the end of `bytes` are an incomplete but so far well-formed UTF-8
// sequence (0 to 3): the bytes a streaming decoder must hold back until more arrive.
size_t IncompleteUtf8Suffix(std::string_view bytes);

// Returns the NFC (canonical composition) form of valid UTF-8 `text`.
std::string NfcNormalize(std::string_view text);

}  // namespace sieve::engine::unicode

#endif  // SIEVE_ENGINE_TOKENIZER_UNICODE_H_
