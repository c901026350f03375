// A Hugging Face `tokenizer.json` byte-level BPE tokenizer (GPT-2, Llama-3, Qwen2 and kin)
// whose token ids are identical to those of Hugging Face `tokenizers` / `transformers`.
//
// Encoding follows the Hugging Face pipeline:
//   1. added tokens whose "normalized" is false are split out of the raw text (leftmost-longest,
//      honouring single_word / lstrip / rstrip; see engine/added_vocabulary.h);
//   2. each remaining piece is normalized (null or NFC) and added tokens with "normalized":
//      true are split out of the normalized text;
//   3. the pre-tokenizer cuts the rest into words (engine/pretokenizer.h) and maps them to the
//      byte-level alphabet;
//   4. the BPE model merges each word (engine/bpe_model.h);
//   5. with add_special_tokens, the post-processor's prefix/suffix ids are added (e.g. BOS).
// Decoding maps tokens back through the ByteLevel decoder and decodes the bytes as UTF-8,
// replacing invalid sequences with U+FFFD as Rust's from_utf8_lossy does.
//
// Supported tokenizer.json parts (anything else is an Unimplemented error naming it):
//   model: BPE (see engine/bpe_model.h);  normalizer: null, NFC, Sequence of NFC;
//   pre_tokenizer: see engine/pretokenizer.h;  decoder: null or ByteLevel;
//   post_processor: null, ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing,
//   Sequence of those (only the single-sequence template is used).
// tokenizer_config.json (optional): bos_token, eos_token (string or {"content": ...}),
// add_bos_token / add_eos_token (added when true and the post-processor does not add them).
//
// Hugging Face behaviours reproduced on purpose:
//   * Added token ids are assigned as Hugging Face assigns them on load (the stored "id" is
//     ignored, as it is there): a content in the vocabulary keeps its vocabulary id, others get
//     consecutive ids after the vocabulary. For well-formed files these are the stored ids.
//   * NFC uses Unicode 9.0 normalization data, as Hugging Face's normalizer does, while the
//     \p{L} / \p{N} / \s classes follow Unicode 16.0, as its regex engine (Oniguruma) does.
//   * A ByteLevel-decoded token with a character outside the byte alphabet decodes to its raw
//     UTF-8; a normalized added token decodes from its normalized content.
// Known differences from transformers:
//   * Decode does not apply transformers' clean_up_tokenization_spaces.
//   * Decode rejects unknown ids (Hugging Face skips them silently).
//   * single_word's \w treats Alphabetic as letters, marks, Nl and circled letters.
//   * tokenizer_config.json's add_bos_token / add_eos_token only add tokens; they never remove
//     a token that the post-processor adds (transformers' LlamaTokenizerFast would).
//
// Thread-safety: a Tokenizer is immutable after construction (its word cache is internally
// synchronized): Encode, Decode and the accessors may be called from any number of threads.
#ifndef SIEVE_ENGINE_TOKENIZER_TOKENIZER_H_
#define SIEVE_ENGINE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/tokenizer/added_vocabulary.h"
#include "engine/tokenizer/bpe_model.h"
#include "engine/tokenizer/pretokenizer.h"
#include "nlohmann/json_fwd.hpp"

namespace sieve::engine {

class Tokenizer {
 public:
  // Loads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDirectory(const std::string& dir);

  // Same from the files' contents; `tokenizer_config_json` may be empty (no config).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view tokenizer_json, std::string_view tokenizer_config_json);

  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encodes UTF-8 `text` into token ids. Added/special tokens that appear literally in the
  // text are matched first, as Hugging Face does by default. `add_special_tokens` applies the
  // post-processor (e.g. BOS for Llama-3) and add_bos_token / add_eos_token. Invalid UTF-8 is
  // an InvalidArgument error.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens = true) const;

  // Decodes `ids` to text; invalid UTF-8 byte sequences become U+FFFD (from_utf8_lossy).
  // `skip_special_tokens` leaves out added tokens marked special. An id with no token is an
  // InvalidArgument error.
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids,
                                     bool skip_special_tokens = false) const;

  // Returns the largest token id plus one, over the model vocabulary and added tokens.
  int32_t vocab_size() const { return vocab_size_; }

  // Returns the BOS id: tokenizer_config.json's bos_token, else the first id the
  // post-processor puts before the text, else nullopt.
  std::optional<int32_t> bos_id() const { return bos_id_; }

  // Returns the EOS ids from tokenizer_config.json's eos_token (empty if none).
  std::vector<int32_t> eos_ids() const { return eos_ids_; }

  // Returns the id of `token` (an added token's content, or a vocabulary entry in its
  // byte-level spelling such as "Ġhello"), if any.
  std::optional<int32_t> TokenToId(std::string_view token) const;

  // Returns true if `id` is an added token marked special.
  bool IsSpecial(int32_t id) const;

  // Returns the raw bytes token `id` decodes to (byte-level decoded; added tokens: their
  // content). The bytes may be an incomplete or invalid UTF-8 sequence.
  absl::StatusOr<std::string> TokenBytes(int32_t id) const;

  // Returns the ids the post-processor puts before / after the text (add_special_tokens).
  const std::vector<int32_t>& special_prefix() const { return prefix_ids_; }
  const std::vector<int32_t>& special_suffix() const { return suffix_ids_; }

 private:
  friend class IncrementalDecoder;

  // What a token id decodes to.
  struct TokenInfo {
    std::string bytes;     // Decoded bytes (see TokenBytes).
    bool exists = false;   // False for gaps in the id space.
    bool special = false;  // An added token marked special.
  };

  Tokenizer() = default;

  absl::Status Init(const nlohmann::json& tokenizer, const nlohmann::json* config);
  absl::Status ParseAddedTokens(const nlohmann::json& root);
  absl::Status ParseNormalizer(const nlohmann::json& config, std::string_view path, int depth);
  absl::Status ParsePostProcessor(const nlohmann::json& config, std::string_view path, int depth);
  absl::Status ParseDecoder(const nlohmann::json& root);
  absl::Status ApplyConfig(const nlohmann::json& config);
  void BuildTokenTable();
  // Encodes text that contains no raw-matched added tokens.
  absl::Status EncodeSegment(std::string_view segment, std::vector<int32_t>* ids) const;
  // Returns the token for `id`, or an InvalidArgument error.
  absl::StatusOr<const TokenInfo*> Lookup(int32_t id) const;

  std::unique_ptr<BpeModel> model_;
  std::optional<PreTokenizer> pre_tokenizer_;
  bool nfc_ = false;
  bool byte_level_decoder_ = false;  // Else tokens are joined with spaces, as HF does.
  std::vector<AddedToken> added_tokens_;
  absl::flat_hash_map<std::string, int32_t> added_ids_;  // Content -> id.
  AddedTokenMatcher raw_matcher_;         // normalized == false tokens, on the raw text.
  AddedTokenMatcher normalized_matcher_;  // normalized == true tokens, on normalized text.
  std::vector<int32_t> prefix_ids_;
  std::vector<int32_t> suffix_ids_;
  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;
  int32_t vocab_size_ = 0;
  std::vector<TokenInfo> tokens_;  // Index: id, size vocab_size_.
};

// Streams the text of tokens as they arrive without ever splitting a UTF-8 character: Push
// returns the text that became complete (possibly empty) and Flush what is left, incomplete
// bytes becoming U+FFFD. The concatenated outputs equal Tokenizer::Decode of all the ids.
// Ids at or past the tokenizer's vocabulary (a model's padded embedding rows, e.g. Qwen2.5's
// 152064 rows for about 151.7K tokens) decode to nothing, as Hugging Face does; negative ids are
// an error. Not thread-safe; `tokenizer` must outlive it.
class IncrementalDecoder {
 public:
  IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens);

  // Adds token `id`; returns the newly completed text. An id with no token is an error and
  // leaves the state unchanged.
  absl::StatusOr<std::string> Push(int32_t id);

  // Returns the held-back bytes (an incomplete character becomes U+FFFD) and resets.
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  bool emitted_any_ = false;  // For the space between tokens when there is no decoder.
  std::string pending_;       // Bytes of an incomplete trailing character (at most 3).
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_TOKENIZER_H_
