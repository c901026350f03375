// The BPE model of a Hugging Face tokenizer.json ("model": {"type": "BPE", ...}): it turns one
// pre-token ("word", already in the byte-level alphabet for byte-level tokenizers) into token
// ids by applying merges in rank order, exactly as Hugging Face tokenizers does:
//   * the word is split into characters, each looked up in the vocabulary; a character that is
//     not there becomes byte-fallback tokens <0xXX> (byte_fallback), else unk_token (fused
//     when fuse_unk), else it is dropped;
//   * the adjacent pair with the lowest merge rank is merged, the leftmost first among equal
//     ranks, until no adjacent pair has a merge;
//   * with ignore_merges, a word that is itself in the vocabulary is emitted as one token.
// Supported fields: vocab, merges (["a b", ...] or [["a", "b"], ...]), ignore_merges,
// byte_fallback, unk_token, fuse_unk; dropout must be null or 0 and continuing_subword_prefix /
// end_of_word_suffix null or empty (else Unimplemented).
//
// Thread-safety: immutable after FromJson except for an internal, mutex-guarded cache of
// recent words, so Tokenize may be called from several threads at once.
#ifndef SIEVE_ENGINE_TOKENIZER_BPE_MODEL_H_
#define SIEVE_ENGINE_TOKENIZER_BPE_MODEL_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json_fwd.hpp"

namespace sieve::engine {

class BpeModel {
 public:
  // Words longer than this (bytes) are not cached.
  static constexpr size_t kMaxCachedWordBytes = 256;
  // At most this many words are cached; the cache is cleared when full.
  static constexpr size_t kCacheCapacity = 16384;

  // Builds the model from the tokenizer.json "model" value; `path` names it in errors.
  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const nlohmann::json& model,
                                                            std::string_view path);

  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one pre-token `word` (valid UTF-8) to `ids`. Fails only when a
  // character needs unk_token and unk_token is not in the vocabulary.
  absl::Status Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  // Same, without the cache (used by tests to check the cache changes nothing).
  absl::Status TokenizeUncached(std::string_view word, std::vector<int32_t>* ids) const;

  // Returns the id of vocabulary entry `token`, if any.
  std::optional<int32_t> TokenToId(std::string_view token) const;

  // Returns the vocabulary entry with id `id`, or nullptr if no entry has that id.
  const std::string* IdToToken(int32_t id) const;

  // Returns the largest id in the vocabulary plus one (0 for an empty vocabulary).
  int32_t id_limit() const { return static_cast<int32_t>(tokens_.size()); }

  // Returns the number of vocabulary entries (Hugging Face's get_vocab_size()).
  int64_t num_entries() const { return static_cast<int64_t>(vocab_.size()); }

  // Returns the number of merges.
  size_t num_merges() const { return merges_.size(); }

 private:
  // The result of merging a pair: its rank (lower merges first) and the merged token's id.
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };

  BpeModel() = default;

  absl::Status ParseVocab(const nlohmann::json& vocab, std::string_view path);
  absl::Status ParseMerges(const nlohmann::json& merges, std::string_view path);
  // Appends the initial symbols of `word` (before any merge).
  absl::Status InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const;
  // Merges `symbols` in place by rank.
  void MergeAll(std::vector<int32_t>* symbols) const;
  const Merge* FindMerge(int32_t left, int32_t right) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> tokens_;  // Index: id. Entries with has_token_[id] false are gaps.
  std::vector<bool> has_token_;
  absl::flat_hash_map<uint64_t, Merge> merges_;   // Key: left id << 32 | right id.
  std::array<int32_t, 0x180> small_char_ids_{};   // Id of single-code-point tokens, or -1.
  std::array<int32_t, 256> byte_fallback_ids_{};  // Id of <0xXX>, or -1.
  bool ignore_merges_ = false;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  std::optional<std::string> unk_token_;

  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_TOKENIZER_BPE_MODEL_H_
