// The normalizer of a Hugging Face tokenizer.json: rewrites the text before pre-tokenization.
//
// Supported "normalizer" values (anything else is an Unimplemented error naming the type):
//   null;  {"type": "NFC" | "NFD" | "NFKC" | "NFKD"};  {"type": "Prepend", "prepend": s};
//   {"type": "Append", "append": s};  {"type": "Replace", "pattern": {"String": s} |
//   {"Regex": r}, "content": c};  {"type": "Strip", "strip_left": b, "strip_right": b};
//   {"type": "Sequence", "normalizers": [...]}.
// As in Hugging Face tokenizers: Prepend / Append leave an empty text empty; Replace replaces
// every match, left to right (regexes as engine/tokenizer/regex.h); Strip removes White_Space.
// The Unicode normal forms use Unicode 9.0 data as Hugging Face's normalizer does: NFC is
// engine/tokenizer/unicode.h's; NFD / NFKC / NFKD are ICU's, restricted to the code points
// assigned in Unicode 9.0 (later ones are left as they are and act as starters).
//
// Thread-safety: immutable after FromJson; Normalize may be called from any number of threads.
#ifndef SIEVE_ENGINE_TOKENIZER_NORMALIZER_H_
#define SIEVE_ENGINE_TOKENIZER_NORMALIZER_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/regex.h"
#include "nlohmann/json_fwd.hpp"

namespace sieve::engine {

class Normalizer {
 public:
  // The identity.
  Normalizer() = default;

  // Builds the normalizer from the tokenizer.json "normalizer" value (null: the identity);
  // `path` names the value in error messages.
  static absl::StatusOr<Normalizer> FromJson(const nlohmann::json& config, std::string_view path);

  // Returns true if Normalize changes nothing.
  bool empty() const { return steps_.empty(); }

  // Returns true if the only step is NFC (then added tokens decode from their NFC form).
  bool has_nfc() const { return has_nfc_; }

  // Returns the normalized form of valid UTF-8 `text`. Fails only when a Replace regex hits a
  // PCRE2 resource limit.
  absl::StatusOr<std::string> Normalize(std::string_view text) const;

 private:
  struct Step {
    enum class Kind { kNfc, kNfd, kNfkc, kNfkd, kPrepend, kAppend, kReplace, kStrip };
    Kind kind = Kind::kNfc;
    std::string text;                    // kPrepend / kAppend: the affix; kReplace: content.
    std::string literal;                 // kReplace with a String pattern.
    std::shared_ptr<const Regex> regex;  // kReplace with a Regex pattern.
    bool left = false, right = false;    // kStrip.
  };

  absl::Status AppendSteps(const nlohmann::json& config, std::string_view path, int depth);

  std::vector<Step> steps_;
  bool has_nfc_ = false;
};

namespace unicode {
// The Unicode 9.0 normal forms that Normalizer uses ("NFD", "NFKC" or "NFKD"); exposed for tests.
std::string IcuNormalize9(std::string_view form, std::string_view text);
}  // namespace unicode

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_NORMALIZER_H_
