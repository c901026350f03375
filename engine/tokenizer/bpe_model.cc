#include "engine/tokenizer/bpe_model.h"

#include <queue>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"
#include "engine/tokenizer/tokenizer_json.h"
#include "engine/tokenizer/unicode.h"

#if defined(__SANITIZE_THREAD__)
#define SIEVE_BPE_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIEVE_BPE_TSAN 1
#endif
#endif
#ifdef SIEVE_BPE_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace sieve::engine {
namespace {

using tokenizer_json::FieldError;
using tokenizer_json::FieldPath;
using tokenizer_json::IndexPath;
using tokenizer_json::Json;

// Ids may leave gaps, but a vocabulary this sparse is rejected rather than allocated.
constexpr int64_t kMaxIdSlack = 1 << 16;

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Returns the two halves of merge entry `entry` ("a b" or ["a", "b"]).
absl::StatusOr<std::pair<std::string, std::string>> MergePair(const Json& entry,
                                                              const std::string& path) {
  if (entry.is_string()) {
    const std::string& s = entry.get_ref<const std::string&>();
    const size_t space = s.find(' ');
    if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
      return FieldError(path,
                        absl::StrCat("merge '", s, "' is not two tokens separated by one space"));
    }
    return std::make_pair(s.substr(0, space), s.substr(space + 1));
  }
  if (entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string()) {
    return std::make_pair(entry[0].get<std::string>(), entry[1].get<std::string>());
  }
  return FieldError(path, "expected a merge \"a b\" or a pair [\"a\", \"b\"]");
}

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const Json& model,
                                                             std::string_view path) {
  SIEVE_RETURN_IF_ERROR(tokenizer_json::ExpectObject(model, path));
  std::unique_ptr<BpeModel> bpe(new BpeModel());
  if (const Json* dropout = tokenizer_json::FindField(model, "dropout")) {
    if (!dropout->is_number()) return FieldError(FieldPath(path, "dropout"), "expected a number");
    if (dropout->get<double>() != 0.0) {
      return absl::UnimplementedError(
          absl::StrCat("tokenizer: ", FieldPath(path, "dropout"), ": BPE dropout is unsupported"));
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    SIEVE_ASSIGN_OR_RETURN(std::optional<std::string> affix,
                           tokenizer_json::OptionalString(model, key, path));
    if (affix.has_value() && !affix->empty()) {
      return absl::UnimplementedError(
          absl::StrCat("tokenizer: ", FieldPath(path, key), ": unsupported (must be null)"));
    }
  }
  SIEVE_ASSIGN_OR_RETURN(bpe->ignore_merges_,
                         tokenizer_json::OptionalBool(model, "ignore_merges", false, path));
  SIEVE_ASSIGN_OR_RETURN(bpe->byte_fallback_,
                         tokenizer_json::OptionalBool(model, "byte_fallback", false, path));
  SIEVE_ASSIGN_OR_RETURN(bpe->fuse_unk_,
                         tokenizer_json::OptionalBool(model, "fuse_unk", false, path));
  SIEVE_ASSIGN_OR_RETURN(bpe->unk_token_, tokenizer_json::OptionalString(model, "unk_token", path));
  SIEVE_ASSIGN_OR_RETURN(const Json* vocab, tokenizer_json::RequiredField(model, "vocab", path));
  SIEVE_RETURN_IF_ERROR(bpe->ParseVocab(*vocab, FieldPath(path, "vocab")));
  if (const Json* merges = tokenizer_json::FindField(model, "merges")) {
    SIEVE_RETURN_IF_ERROR(bpe->ParseMerges(*merges, FieldPath(path, "merges")));
  }
  return bpe;
}

absl::Status BpeModel::ParseVocab(const Json& vocab, std::string_view path) {
  if (!vocab.is_object()) return FieldError(path, "expected an object {token: id}");
  vocab_.reserve(vocab.size());
  int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    SIEVE_ASSIGN_OR_RETURN(int32_t id,
                           tokenizer_json::AsTokenId(it.value(), FieldPath(path, it.key())));
    vocab_.emplace(it.key(), id);
    max_id = std::max(max_id, id);
  }
  if (max_id >= static_cast<int64_t>(vocab_.size()) * 4 + kMaxIdSlack) {
    return FieldError(path, absl::StrCat("token id ", max_id, " is far beyond the ", vocab_.size(),
                                         " entries (ids must be dense)"));
  }
  tokens_.resize(max_id + 1);
  has_token_.assign(max_id + 1, false);
  for (const auto& [token, id] : vocab_) {
    if (has_token_[id]) {
      return FieldError(
          path, absl::StrCat("duplicate id ", id, " for '", tokens_[id], "' and '", token, "'"));
    }
    has_token_[id] = true;
    tokens_[id] = token;
  }
  small_char_ids_.fill(-1);
  for (char32_t cp = 0; cp < small_char_ids_.size(); ++cp) {
    std::string s;
    unicode::AppendUtf8(cp, &s);
    if (auto it = vocab_.find(s); it != vocab_.end()) small_char_ids_[cp] = it->second;
  }
  byte_fallback_ids_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    if (auto it = vocab_.find(absl::StrFormat("<0x%02X>", b)); it != vocab_.end()) {
      byte_fallback_ids_[b] = it->second;
    }
  }
  return absl::OkStatus();
}

absl::Status BpeModel::ParseMerges(const Json& merges, std::string_view path) {
  if (!merges.is_array()) return FieldError(path, "expected an array");
  merges_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string entry_path = IndexPath(path, i);
    SIEVE_ASSIGN_OR_RETURN(auto pair, MergePair(merges[i], entry_path));
    const auto left = vocab_.find(pair.first);
    const auto right = vocab_.find(pair.second);
    std::string merged = pair.first + pair.second;
    const auto result = vocab_.find(merged);
    for (const auto& [found, name] : {std::make_pair(left != vocab_.end(), &pair.first),
                                      std::make_pair(right != vocab_.end(), &pair.second),
                                      std::make_pair(result != vocab_.end(), &merged)}) {
      if (!found) {
        return FieldError(entry_path, absl::StrCat("merge names token '", *name,
                                                   "' that is not in the vocabulary"));
      }
    }
    // As in Hugging Face tokenizers, a repeated pair keeps the rank of its last occurrence.
    merges_.insert_or_assign(PairKey(left->second, right->second),
                             Merge{static_cast<int32_t>(i), result->second});
  }
  return absl::OkStatus();
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(tokenizer_json::AbslView(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_limit() || !has_token_[id]) return nullptr;
  return &tokens_[id];
}

const BpeModel::Merge* BpeModel::FindMerge(int32_t left, int32_t right) const {
  auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

absl::Status BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const {
  int32_t pending_unk = -1;  // An unknown character waiting to be emitted, or -1.
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    const char32_t cp = unicode::DecodeNext(word, &pos);
    const std::string_view ch = word.substr(start, pos - start);
    int32_t id = -1;
    if (cp < small_char_ids_.size()) {
      id = small_char_ids_[cp];
    } else if (auto it = vocab_.find(tokenizer_json::AbslView(ch)); it != vocab_.end()) {
      id = it->second;
    }
    if (id >= 0) {
      if (pending_unk >= 0) symbols->push_back(pending_unk);
      pending_unk = -1;
      symbols->push_back(id);
      continue;
    }
    if (byte_fallback_) {
      bool all_bytes = true;
      for (char c : ch) all_bytes = all_bytes && byte_fallback_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all_bytes) {
        // Hugging Face emits these before a pending unk token; so do we.
        for (char c : ch) symbols->push_back(byte_fallback_ids_[static_cast<uint8_t>(c)]);
        continue;
      }
    }
    if (!unk_token_.has_value()) continue;  // No unk token: the character is dropped.
    if (pending_unk >= 0 && fuse_unk_) continue;
    auto unk = vocab_.find(*unk_token_);
    if (unk == vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: unk_token '", *unk_token_, "' is not in the vocabulary"));
    }
    if (pending_unk >= 0) symbols->push_back(pending_unk);
    pending_unk = unk->second;
  }
  if (pending_unk >= 0) symbols->push_back(pending_unk);
  return absl::OkStatus();
}

void BpeModel::MergeAll(std::vector<int32_t>* symbols) const {
  std::vector<int32_t>& ids = *symbols;
  const int n = static_cast<int>(ids.size());
  if (n < 2) return;
  // A doubly linked list over the symbols; merged-away symbols get id -1.
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int pos;  // Index of the left symbol.
    int32_t new_id;
    bool operator<(const Candidate& o) const {  // Lowest rank, then leftmost, on top.
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate> queue;
  for (int i = 0; i + 1 < n; ++i) {
    if (const Merge* m = FindMerge(ids[i], ids[i + 1])) queue.push({m->rank, i, m->new_id});
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    const int left = top.pos;
    const int right = next[left];
    if (ids[left] < 0 || right < 0) continue;
    const Merge* m = FindMerge(ids[left], ids[right]);
    if (m == nullptr || m->new_id != top.new_id) continue;  // Stale candidate.
    ids[left] = top.new_id;
    ids[right] = -1;
    next[left] = next[right];
    if (next[left] >= 0) prev[next[left]] = left;
    if (prev[left] >= 0) {
      if (const Merge* pm = FindMerge(ids[prev[left]], ids[left])) {
        queue.push({pm->rank, prev[left], pm->new_id});
      }
    }
    if (next[left] >= 0) {
      if (const Merge* nm = FindMerge(ids[left], ids[next[left]])) {
        queue.push({nm->rank, left, nm->new_id});
      }
    }
  }
  int out = 0;
  for (int i = 0; i < n; ++i) {
    if (ids[i] >= 0) ids[out++] = ids[i];
  }
  ids.resize(out);
}

absl::Status BpeModel::TokenizeUncached(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return absl::OkStatus();
  if (ignore_merges_) {
    if (auto it = vocab_.find(tokenizer_json::AbslView(word)); it != vocab_.end()) {
      ids->push_back(it->second);
      return absl::OkStatus();
    }
  }
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  SIEVE_RETURN_IF_ERROR(InitialSymbols(word, &symbols));
  MergeAll(&symbols);
  ids->insert(ids->end(), symbols.begin(), symbols.end());
  return absl::OkStatus();
}

namespace {

// Debian's Abseil is not built with ThreadSanitizer, so TSan cannot see cache_mu_'s locking and
// reports the cache's accesses from two threads (gRPC handlers tokenizing at once) as races
// (scripts/sanitize.sh). Under TSan, a holder of the lock declares the ordering the lock gives:
// acquire once locked, release before unlocking. Compiles to nothing in other builds.
class TsanLockOrder {
 public:
  explicit TsanLockOrder(const void* lock) : lock_(const_cast<void*>(lock)) {
#ifdef SIEVE_BPE_TSAN
    __tsan_acquire(lock_);
#endif
  }
  ~TsanLockOrder() {
#ifdef SIEVE_BPE_TSAN
    __tsan_release(lock_);
#endif
  }
  TsanLockOrder(const TsanLockOrder&) = delete;
  TsanLockOrder& operator=(const TsanLockOrder&) = delete;

 private:
  [[maybe_unused]] void* const lock_;
};

}  // namespace

absl::Status BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    absl::ReaderMutexLock lock(&cache_mu_);
    TsanLockOrder order(&cache_mu_);
    if (auto it = cache_.find(tokenizer_json::AbslView(word)); it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  const size_t before = ids->size();
  SIEVE_RETURN_IF_ERROR(TokenizeUncached(word, ids));
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    TsanLockOrder order(&cache_mu_);
    if (cache_.size() >= kCacheCapacity) cache_.clear();
    cache_.emplace(word, std::vector<int32_t>(ids->begin() + before, ids->end()));
  }
  return absl::OkStatus();
}

}  // namespace sieve::engine
