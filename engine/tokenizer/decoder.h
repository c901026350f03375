// The decoder of a Hugging Face tokenizer.json: how token strings become text again.
//
// Supported "decoder" values (anything else is an Unimplemented error naming it):
//   null: the token strings joined with spaces, as Hugging Face does without a decoder;
//   {"type": "ByteLevel"} alone: each character is the byte it stands for (GPT-2's alphabet),
//     the bytes of all tokens decoded as UTF-8 with U+FFFD for invalid sequences;
//   a SentencePiece-style chain (a Sequence, or one of them alone), in this order:
//     token-local steps: Replace ({"String": s} pattern), Metaspace, Strip;
//     then optionally ByteFallback, then optionally Fuse, then Strip (only after Fuse, and
//     with "stop": 0).
// Semantics follow Hugging Face tokenizers:
//   * Replace replaces every occurrence in each token; Strip before Fuse strips each token.
//   * Metaspace turns its replacement character into a space; in the first token, when its
//     prepend_scheme is not "never", the replacement characters are dropped instead.
//   * ByteFallback turns consecutive tokens "<0xNN>" into bytes: a run that is valid UTF-8
//     becomes its text, any other run one U+FFFD per byte.
//   * Strip after Fuse removes up to `start` leading `content` characters of the whole text.
//
// DecodeStream applies a decoder token by token. In eager mode (streaming) it returns text as
// soon as it is complete: a byte-fallback run is emitted character by character, so that where
// such a run is invalid UTF-8 past a complete character, the characters already emitted stay
// (the whole-sequence decode, not eager, gives U+FFFD for every byte of the run as Hugging
// Face does). For valid runs, eager and whole-sequence decoding give the same text.
//
// Thread-safety: TokenDecoder is immutable; a DecodeStream belongs to one thread.
#ifndef SIEVE_ENGINE_TOKENIZER_DECODER_H_
#define SIEVE_ENGINE_TOKENIZER_DECODER_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace sieve::engine {

class TokenDecoder {
 public:
  // No decoder: tokens joined with spaces.
  TokenDecoder() = default;

  // Builds the decoder from the tokenizer.json "decoder" value (null: none); `path` names it
  // in error messages.
  static absl::StatusOr<TokenDecoder> FromJson(const nlohmann::json& config,
                                               std::string_view path);

  // Returns what token string `token` contributes before the run / fuse / strip steps:
  // for ByteLevel its bytes, otherwise its text after the token-local steps. `first`: it is
  // the first token decoded.
  std::string Piece(std::string_view token, bool first) const;

  // Returns the byte that `piece` stands for ("<0xNN>" with ByteFallback), or -1.
  int FallbackByte(std::string_view piece) const;

  // Returns true if Piece depends on `first` (a Metaspace step).
  bool first_differs() const { return first_differs_; }

  // Returns true for ByteLevel and no decoder: pieces are bytes (UTF-8 decoded lossily over
  // all tokens); false: pieces are text.
  bool bytes_mode() const { return byte_level_ || none_; }

 private:
  friend class DecodeStream;

  struct LocalStep {
    enum class Kind { kReplace, kMetaspace, kStrip };
    Kind kind = Kind::kReplace;
    std::string from, to;        // kReplace; kMetaspace: from = the replacement character.
    bool first_drops = false;    // kMetaspace: drop the replacement in the first token.
    char32_t content = ' ';      // kStrip.
    int start = 0, stop = 0;     // kStrip.
  };

  absl::Status AppendSteps(const nlohmann::json& config, std::string_view path, int depth);

  bool none_ = true;         // No decoder: join with spaces.
  bool byte_level_ = false;  // ByteLevel.
  std::vector<LocalStep> local_;
  bool byte_fallback_ = false;
  bool fused_ = false;
  char32_t strip_content_ = ' ';  // Strip after Fuse.
  int strip_start_ = 0;
  bool first_differs_ = false;
};

// Decodes a sequence of tokens piece by piece (see the header comment for eager mode).
class DecodeStream {
 public:
  DecodeStream(const TokenDecoder& decoder, bool eager);

  // Returns true until the first Push: the next token is the first one.
  bool at_first() const { return !started_; }

  // Adds a token's piece (TokenDecoder::Piece) and its fallback byte (or -1); appends the text
  // that became complete to `out`.
  void Push(std::string_view piece, int fallback_byte, std::string* out);

  // Appends what is held back (an incomplete character becomes U+FFFD) and starts over.
  void Finish(std::string* out);

 private:
  void Emit(std::string_view text, std::string* out);
  void EndRun(std::string* out);

  const TokenDecoder& decoder_;
  bool eager_;
  bool started_ = false;
  std::string pending_;       // Bytes mode: an incomplete trailing character; else the run.
  bool run_invalid_ = false;  // Eager: the current byte run can no longer be valid.
  int strip_left_;            // Leading strip characters still to remove.
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_DECODER_H_
