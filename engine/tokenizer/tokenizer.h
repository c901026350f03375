// A Hugging Face `tokenizer.json` BPE tokenizer: byte-level (GPT-2, Llama-3, Qwen2, DeepSeek-V3
// and kin) or SentencePiece-style (Llama 2, Mistral, Mixtral, Gemma: the ▁ convention and
// <0xNN> byte fallback), whose token ids are identical to those of Hugging Face `tokenizers` /
// `transformers`.
//
// Encoding follows the Hugging Face pipeline:
//   1. added tokens whose "normalized" is false are split out of the raw text (leftmost-longest,
//      honouring single_word / lstrip / rstrip; see engine/added_vocabulary.h);
//   2. each remaining piece is normalized (engine/tokenizer/normalizer.h) and added tokens with
//      "normalized": true are split out of the normalized text;
//   3. the pre-tokenizer cuts the rest into words (engine/pretokenizer.h), mapping them to the
//      byte-level alphabet or to the ▁ convention (Metaspace);
//   4. the BPE model merges each word (engine/bpe_model.h), with byte fallback where set;
//   5. with add_special_tokens, the post-processor's prefix/suffix ids are added (e.g. BOS).
// Decoding runs the tokenizer.json decoder (engine/tokenizer/decoder.h): ByteLevel, or the
// SentencePiece chain Replace / Metaspace / ByteFallback / Fuse / Strip; invalid UTF-8 becomes
// U+FFFD as Hugging Face does.
//
// Supported tokenizer.json parts (anything else is an Unimplemented error naming it):
//   model: BPE (see engine/bpe_model.h);  normalizer: see engine/tokenizer/normalizer.h;
//   pre_tokenizer: see engine/pretokenizer.h;  decoder: see engine/tokenizer/decoder.h;
//   post_processor: null, ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing,
//   Sequence of those (only the single-sequence template is used).
// tokenizer_config.json (optional): chat_template (see engine/tokenizer/chat_template.h; a
// template that does not parse leaves the tokenizer usable, without a chat template),
// bos_token, eos_token (string or {"content": ...}),
// add_bos_token / add_eos_token (added when true and the post-processor does not add them).
// Its "legacy" flag needs nothing here: tokenizer.json already encodes it (legacy files use the
// Prepend + Replace normalizers, non-legacy ones a Metaspace pre-tokenizer with "first").
//
// Hugging Face behaviours reproduced on purpose:
//   * Added token ids are assigned as Hugging Face assigns them on load (the stored "id" is
//     ignored, as it is there): a content in the vocabulary keeps its vocabulary id, others get
//     consecutive ids after the vocabulary. For well-formed files these are the stored ids.
//   * NFC uses Unicode 9.0 normalization data, as Hugging Face's normalizer does, while the
//     \p{L} / \p{N} / \s classes follow Unicode 16.0, as its regex engine (Oniguruma) does.
//   * A ByteLevel-decoded token with a character outside the byte alphabet decodes to its raw
//     UTF-8; a normalized added token decodes from its NFC content.
//   * Metaspace's "first" prepend scheme prepends ▁ only to text that starts the input: not
//     after an added token (legacy files prepend after every added token instead).
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
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/decoder.h"
#include "engine/tokenizer/normalizer.h"
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

  // Returns the raw bytes token `id` decodes to (byte-level decoded; SentencePiece: ▁ as a
  // space, <0xNN> as its byte; added tokens: their content). The bytes may be an incomplete or
  // invalid UTF-8 sequence.
  absl::StatusOr<std::string> TokenBytes(int32_t id) const;

  // Returns the model's chat template (tokenizer_config.json's chat_template, or the one given
  // to SetChatTemplate), or nullptr when there is none; chat_template_status() then says why.
  const ChatTemplate* chat_template() const { return chat_template_.get(); }
  const absl::Status& chat_template_status() const { return chat_template_status_; }

  // Replaces the chat template, or records why there is none (`chat_template` not OK). Not
  // thread-safe: call it before the tokenizer is shared (the engine does, for
  // model.chat_template_file).
  void SetChatTemplate(absl::StatusOr<std::unique_ptr<ChatTemplate>> chat_template);

  // Returns the ids the post-processor puts before / after the text (add_special_tokens).
  const std::vector<int32_t>& special_prefix() const { return prefix_ids_; }
  const std::vector<int32_t>& special_suffix() const { return suffix_ids_; }

 private:
  friend class IncrementalDecoder;

  // What a token id decodes to.
  struct TokenInfo {
    std::string bytes;         // Decoded piece (TokenDecoder::Piece; see TokenBytes).
    std::string first_bytes;   // The piece as the first token, when has_first.
    int16_t fallback = -1;     // The byte of a <0xNN> byte-fallback token, else -1.
    bool has_first = false;    // The first token decodes differently (Metaspace).
    bool exists = false;       // False for gaps in the id space.
    bool special = false;      // An added token marked special.
  };

  Tokenizer() = default;

  absl::Status Init(const nlohmann::json& tokenizer, const nlohmann::json* config);
  absl::Status ParseAddedTokens(const nlohmann::json& root);
  absl::Status ParsePostProcessor(const nlohmann::json& config, std::string_view path, int depth);
  absl::Status ApplyConfig(const nlohmann::json& config);
  void BuildTokenTable();
  // Encodes text that contains no raw-matched added tokens; `at_start`: it begins the input.
  absl::Status EncodeSegment(std::string_view segment, bool at_start,
                             std::vector<int32_t>* ids) const;
  // Pushes token `info` into `stream` (its first-token form when the stream is at its start).
  static void PushToken(const TokenInfo& info, DecodeStream* stream, std::string* out);
  // Returns the token for `id`, or an InvalidArgument error.
  absl::StatusOr<const TokenInfo*> Lookup(int32_t id) const;

  std::unique_ptr<BpeModel> model_;
  std::optional<PreTokenizer> pre_tokenizer_;
  Normalizer normalizer_;
  TokenDecoder decoder_;
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
  std::unique_ptr<ChatTemplate> chat_template_;
  absl::Status chat_template_status_ =
      absl::NotFoundError("the tokenizer was loaded without a tokenizer_config.json");
};

// Streams the text of tokens as they arrive without ever splitting a UTF-8 character: Push
// returns the text that became complete (possibly empty) and Flush what is left, incomplete
// bytes becoming U+FFFD. The concatenated outputs equal Tokenizer::Decode of all the ids,
// except where a run of <0xNN> byte-fallback tokens is invalid UTF-8 after a complete
// character: the characters already streamed stay (Decode, as Hugging Face, turns every byte
// of such a run into U+FFFD; see engine/tokenizer/decoder.h).
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
  DecodeStream stream_;
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_TOKENIZER_H_
