// The pre-tokenizer of a Hugging Face tokenizer.json: it cuts text into the pieces ("words")
// that the BPE model then tokenizes one by one, and maps bytes to GPT-2's byte-level alphabet.
//
// Supported pre_tokenizer configurations:
//   {"type": "ByteLevel", "add_prefix_space": b, "use_regex": b}    (GPT-2 regex when use_regex)
//   {"type": "Split", "pattern": {"Regex": R} | {"String": s}, "behavior": B, "invert": b}
//     with B one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous
//   {"type": "Metaspace", "replacement": c, "prepend_scheme": "always" | "first" | "never",
//     "split": b}   (or the older "add_prefix_space": b for always / never)
//   {"type": "Sequence", "pretokenizers": [...]}                      of the above
// Regexes run on PCRE2 with Oniguruma's semantics (engine/tokenizer/regex.h), except the
// GPT-2, Llama-3 and Qwen2 patterns (see PretokenizerRegex): each has a hand-written scanner
// over code points that follows the regex's leftmost-alternative, greedy, backtracking
// semantics exactly (tests check it against PCRE2) and is several times faster.
// Metaspace replaces ' ' by its replacement, prepends one (always; first: only to the piece
// that starts the original text) unless the piece starts with it, and with split cuts before
// every replacement character, as Hugging Face tokenizers does.
#ifndef SIEVE_ENGINE_TOKENIZER_PRETOKENIZER_H_
#define SIEVE_ENGINE_TOKENIZER_PRETOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/regex.h"
#include "nlohmann/json_fwd.hpp"

namespace sieve::engine {

// A pre-tokenizer regex that has a hand-written scanner.
enum class PretokenizerRegex {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // As kLlama3 with \p{N} (one digit per piece) instead of \p{N}{1,3}.
  kQwen2,
};

// The GPT-2 regex as ByteLevel uses it when use_regex is true.
inline constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// The Llama-3 Split regex.
inline constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// The Qwen2 Split regex.
inline constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Returns the scanner for regex source `pattern`, or an Unimplemented error quoting it.
absl::StatusOr<PretokenizerRegex> RecognizePretokenizerRegex(std::string_view pattern);

// Appends to `pieces` the successive matches of `regex` in valid UTF-8 `text`, as a regex
// engine's find-all would return them. With these patterns the matches cover all of `text`.
void SplitByRegex(PretokenizerRegex regex, std::string_view text,
                  std::vector<std::string_view>* pieces);

// Returns the UTF-8 of the character that byte `b` maps to in GPT-2's byte-level alphabet
// (printable bytes map to themselves, the others to U+0100 upwards).
std::string_view ByteLevelChar(uint8_t b);

// Returns the byte that code point `cp` stands for in the byte-level alphabet, or -1 if `cp`
// is not in the alphabet.
int ByteLevelByte(char32_t cp);

// Appends the byte-level form of `bytes` (each byte as its alphabet character) to `out`.
void AppendByteLevel(std::string_view bytes, std::string* out);

// How a Split pre-tokenizer treats the matches of its pattern (Hugging Face's
// SplitDelimiterBehavior): dropped, kept alone, glued to the piece before / after, or runs of
// matches and of non-matches each kept as one piece.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Cuts [0, size) at `matches` (sorted, non-overlapping spans, empty ones allowed) as Hugging
// Face's NormalizedString::split does; with `invert` the non-matches are the delimiters.
// Appends the non-empty pieces to `pieces`.
void SplitAtMatches(size_t size, const std::vector<Regex::Span>& matches, bool invert,
                    SplitBehavior behavior, std::vector<Regex::Span>* pieces);

// A configured pre-tokenizer (immutable, thread-safe).
class PreTokenizer {
 public:
  // Builds the pre-tokenizer from the tokenizer.json "pre_tokenizer" value (null: none).
  // `path` names the value in error messages.
  static absl::StatusOr<PreTokenizer> FromJson(const nlohmann::json& config, std::string_view path);

  // Replaces `pieces` with the pre-tokens of `text` (valid UTF-8; byte-level mapped when a
  // ByteLevel step is configured). Empty pieces are dropped. `at_start`: `text` begins the
  // original input (Metaspace's "first" scheme). Fails only when a regex hits a PCRE2 limit.
  absl::Status Split(std::string_view text, bool at_start, std::vector<std::string>* pieces) const;

  // Returns true if a ByteLevel step maps pieces to the byte-level alphabet.
  bool byte_level() const { return byte_level_; }

 private:
  // One step of a Sequence.
  struct Step {
    enum class Kind { kSplit, kByteLevel, kMetaspace } kind = Kind::kSplit;
    // kSplit: a scanner (regex == nullptr and literal empty), a PCRE2 regex, or a literal.
    PretokenizerRegex scanner = PretokenizerRegex::kGpt2;  // Also kByteLevel with use_regex.
    std::shared_ptr<const Regex> regex;
    std::string literal;
    SplitBehavior behavior = SplitBehavior::kIsolated;
    bool invert = false;
    bool use_regex = false;         // kByteLevel only.
    bool add_prefix_space = false;  // kByteLevel only.
    std::string replacement;        // kMetaspace only.
    enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;  // kMetaspace.
    bool split = true;                                                        // kMetaspace.
  };

  static absl::Status AppendSteps(const nlohmann::json& config, std::string_view path, int depth,
                                  std::vector<Step>* steps);
  static absl::Status ParseSplit(const nlohmann::json& config, std::string_view path, Step* step);
  static absl::Status ParseMetaspace(const nlohmann::json& config, std::string_view path,
                                     Step* step);
  // Buffers reused across the pieces of one Split.
  struct Scratch {
    std::vector<std::string_view> views;
    std::vector<Regex::Span> matches, spans;
    std::string storage;
  };
  // Appends the pieces of non-empty `piece` after `step` to `out`. `at_start`: `piece` begins
  // the original input; `*first_at_start` is set to whether the first piece appended does.
  static absl::Status ApplyStep(const Step& step, std::string_view piece, bool at_start,
                                Scratch* scratch, std::vector<std::string>* out,
                                bool* first_at_start);

  std::vector<Step> steps_;
  bool byte_level_ = false;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_PRETOKENIZER_H_
