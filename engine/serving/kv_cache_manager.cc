#include "engine/serving/kv_cache_manager.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace sieve::engine {

absl::Status KvCacheOptions::Validate() const {
  if (page_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: page_size must be > 0, got ",
                                                   page_size));
  }
  if (num_pages <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: num_pages must be > 0, got ",
                                                   num_pages));
  }
  return absl::OkStatus();
}

namespace {

// Returns `options` after checking it; a broken one aborts before any member is built from it.
const KvCacheOptions& Checked(const KvCacheOptions& options) {
  const absl::Status valid = options.Validate();
  if (!valid.ok()) internal::KvInvariantFailure(valid.message());
  return options;
}

}  // namespace

KvCacheManager::KvCacheManager(const KvCacheOptions& options)
    : options_(Checked(options)),
      alloc_(options.num_pages),
      cache_(options.page_size, alloc_),
      table_refs_(options.num_pages, 0) {}

KvCacheManager::~KvCacheManager() {
  for (auto& [id, s] : sequences_) s->table.Release(alloc_);
  for (auto& [id, imp] : imports_) imp->table.Release(alloc_);
  for (auto& [id, exp] : exports_) exp->table.Release(alloc_);
  cache_.Clear();
}

// ---------------------------------------------------------------------------------------------
// Sequences

KvCacheManager::SequenceKv& KvCacheManager::Get(RequestId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    internal::KvInvariantFailure(absl::StrCat("kv cache: no sequence ", id));
  }
  return *it->second;
}

const PageTable& KvCacheManager::AddSequence(RequestId id) {
  auto [it, inserted] = sequences_.emplace(id, nullptr);
  if (!inserted) internal::KvInvariantFailure(absl::StrCat("kv cache: duplicate sequence ", id));
  it->second = std::make_unique<SequenceKv>(options_.page_size);
  return it->second->table;
}

void KvCacheManager::RemoveSequence(RequestId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  ReleaseTracked(it->second->table);
  sequences_.erase(it);
}

const PageTable* KvCacheManager::Find(RequestId id) const {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : &it->second->table;
}

int32_t KvCacheManager::MatchPrefix(RequestId id, absl::Span<const int32_t> prompt) {
  SequenceKv& s = Get(id);
  if (!s.table.empty()) {
    internal::KvInvariantFailure(absl::StrCat("kv cache: MatchPrefix of sequence ", id,
                                              " that already holds pages"));
  }
  if (!options_.enable_prefix_caching) return 0;
  const PrefixMatch match = cache_.Match(prompt);
  s.table.AdoptSharedPrefix(match.pages, match.num_tokens);
  Track(match.pages, +1);
  s.offered_pages = static_cast<int32_t>(match.pages.size());
  return match.num_tokens;
}

int32_t KvCacheManager::TokensThatFit(RequestId id, int32_t want) {
  const PageTable& t = Get(id).table;
  const int32_t room_in_last =
      static_cast<int32_t>(t.pages().size()) * t.page_size() - t.num_tokens();
  if (want <= room_in_last) return std::max(want, 0);
  const int32_t need = t.PagesNeededFor(want);
  if (alloc_.num_free() < need) cache_.EvictUntilFree(need);
  const int64_t fit = room_in_last + int64_t{alloc_.num_free()} * t.page_size();
  return static_cast<int32_t>(std::min<int64_t>(want, fit));
}

absl::Status KvCacheManager::Reserve(RequestId id, int32_t n) {
  return AppendTracked(Get(id).table, n);
}

int32_t KvCacheManager::Offer(RequestId id, absl::Span<const int32_t> computed) {
  SequenceKv& s = Get(id);
  if (!options_.enable_prefix_caching) return 0;
  if (static_cast<int64_t>(computed.size()) > s.table.num_tokens()) {
    internal::KvInvariantFailure(absl::StrCat("kv cache: offer of ", computed.size(),
                                              " tokens of sequence ", id, " that holds ",
                                              s.table.num_tokens()));
  }
  const int32_t full = static_cast<int32_t>(computed.size()) / options_.page_size;
  if (full <= s.offered_pages) return 0;
  // Insert fails only for pages that are not this sequence's own, which would be a bug
  // elsewhere; the cache then simply does not learn these pages.
  const absl::StatusOr<int32_t> inserted = cache_.Insert(computed, s.table.pages());
  s.offered_pages = full;
  return inserted.ok() ? *inserted : 0;
}

void KvCacheManager::Release(RequestId id, absl::Span<const int32_t> computed) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  if (!computed.empty()) Offer(id, computed);
  ReleaseTracked(it->second->table);
  it->second->offered_pages = 0;
}

int32_t KvCacheManager::Truncate(RequestId id, int32_t num_tokens) {
  SequenceKv& s = Get(id);
  const std::vector<int32_t> before(s.table.pages().begin(), s.table.pages().end());
  const int32_t kept = s.table.Truncate(num_tokens, alloc_);
  Track(absl::MakeConstSpan(before).subspan(s.table.pages().size()), -1);
  s.offered_pages = std::min(s.offered_pages, kept / options_.page_size);
  return kept;
}

int32_t KvCacheManager::ClearPrefixCache() {
  const int32_t free_before = alloc_.num_free();
  cache_.Clear();
  return alloc_.num_free() - free_before;
}

// ---------------------------------------------------------------------------------------------
// Imports

absl::StatusOr<KvImport> KvCacheManager::BeginImport(absl::Span<const int32_t> tokens) {
  if (!options_.enable_prefix_caching) {
    return absl::FailedPreconditionError("kv import needs prefix caching, which is off");
  }
  const int32_t ps = options_.page_size;
  if (tokens.empty() || tokens.size() % ps != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv import of ", tokens.size(), " tokens: needs a whole number (>= 1) of ", ps,
        "-token pages"));
  }
  if (static_cast<int64_t>(tokens.size()) > int64_t{options_.num_pages} * ps) {
    return absl::ResourceExhaustedError(absl::StrCat("kv import of ", tokens.size(),
                                                     " tokens exceeds the pool"));
  }
  auto imp = std::make_unique<ImportKv>(ps);
  imp->tokens.assign(tokens.begin(), tokens.end());
  const PrefixMatch match = cache_.MatchFullPages(tokens);
  imp->table.AdoptSharedPrefix(match.pages, match.num_tokens);
  Track(match.pages, +1);
  const int32_t rest = static_cast<int32_t>(tokens.size()) - match.num_tokens;
  if (absl::Status st = AppendTracked(imp->table, rest); !st.ok()) {
    ReleaseTracked(imp->table);
    return st;
  }
  KvImport out;
  out.id = next_import_id_++;
  out.num_tokens = static_cast<int32_t>(tokens.size());
  out.cached_tokens = match.num_tokens;
  const absl::Span<const int32_t> pages = imp->table.pages();
  out.pages_to_fill.assign(pages.begin() + match.pages.size(), pages.end());
  imports_.emplace(out.id, std::move(imp));
  return out;
}

absl::Status KvCacheManager::CommitImport(int64_t id) {
  auto it = imports_.find(id);
  if (it == imports_.end()) return absl::NotFoundError(absl::StrCat("no kv import ", id));
  ImportKv& imp = *it->second;
  const absl::StatusOr<int32_t> inserted = cache_.Insert(imp.tokens, imp.table.pages());
  ReleaseTracked(imp.table);
  imports_.erase(it);
  return inserted.status();
}

absl::Status KvCacheManager::AbortImport(int64_t id) {
  auto it = imports_.find(id);
  if (it == imports_.end()) return absl::NotFoundError(absl::StrCat("no kv import ", id));
  ReleaseTracked(it->second->table);
  imports_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<KvExport> KvCacheManager::BeginExport(absl::Span<const int32_t> tokens) {
  if (!options_.enable_prefix_caching) {
    return absl::FailedPreconditionError("kv export needs prefix caching, which is off");
  }
  const int32_t ps = options_.page_size;
  const PrefixMatch match =
      cache_.MatchFullPages(tokens.first(tokens.size() - tokens.size() % ps));
  if (match.pages.empty()) {
    return absl::NotFoundError(absl::StrCat("kv export: no page of the ", tokens.size(),
                                            "-token prompt is cached"));
  }
  auto exp = std::make_unique<ImportKv>(ps);
  exp->tokens.assign(tokens.begin(), tokens.begin() + match.num_tokens);
  exp->table.AdoptSharedPrefix(match.pages, match.num_tokens);
  Track(match.pages, +1);
  KvExport out;
  out.id = next_import_id_++;
  out.num_tokens = match.num_tokens;
  out.pages.assign(match.pages.begin(), match.pages.end());
  exports_.emplace(out.id, std::move(exp));
  return out;
}

absl::Status KvCacheManager::EndExport(int64_t id) {
  auto it = exports_.find(id);
  if (it == exports_.end()) return absl::NotFoundError(absl::StrCat("no kv export ", id));
  ReleaseTracked(it->second->table);
  exports_.erase(it);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Side pools

absl::Status KvCacheManager::RegisterSidePool(const SidePoolSpec& spec,
                                              PageAllocationListener* listener) {
  if (spec.name.empty()) return absl::InvalidArgumentError("side pool needs a name");
  if (spec.bytes_per_page_per_layer <= 0 || spec.num_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "side pool ", spec.name, ": bytes_per_page_per_layer (", spec.bytes_per_page_per_layer,
        ") and num_layers (", spec.num_layers, ") must be > 0"));
  }
  for (const SidePoolSpec& p : side_pools_) {
    if (p.name == spec.name) {
      return absl::InvalidArgumentError(absl::StrCat("side pool ", spec.name, " registered twice"));
    }
  }
  if (alloc_.num_used() > 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "side pool ", spec.name, ": register before any page is used (", alloc_.num_used(),
        " are)"));
  }
  side_pools_.push_back(spec);
  if (listener != nullptr) listeners_.push_back(listener);
  return absl::OkStatus();
}

int64_t KvCacheManager::side_pool_bytes_per_page() const {
  int64_t total = 0;
  for (const SidePoolSpec& p : side_pools_) total += p.bytes_per_page_per_layer * p.num_layers;
  return total;
}

// ---------------------------------------------------------------------------------------------
// Tracking

absl::Status KvCacheManager::AppendTracked(PageTable& table, int32_t n) {
  const size_t before = table.pages().size();
  absl::Status st = AppendWithEviction(table, n, alloc_, cache_).status();
  if (!st.ok()) return st;
  const absl::Span<const int32_t> fresh = table.pages().subspan(before);
  Track(fresh, +1);
  if (!fresh.empty()) {
    for (PageAllocationListener* l : listeners_) l->OnPagesAllocated(fresh);
  }
  return absl::OkStatus();
}

void KvCacheManager::ReleaseTracked(PageTable& table) {
  Track(table.pages(), -1);
  table.Release(alloc_);
}

void KvCacheManager::Track(absl::Span<const int32_t> pages, int32_t delta) {
  for (const int32_t p : pages) {
    if (delta > 0 && table_refs_[p]++ == 0) ++held_pages_;
    if (delta < 0 && --table_refs_[p] == 0) --held_pages_;
  }
}

absl::Status KvCacheManager::CheckInvariants() const {
  std::vector<int32_t> refs(options_.num_pages, 0);
  for (const auto& [id, s] : sequences_) {
    for (const int32_t p : s->table.pages()) ++refs[p];
    if (s->offered_pages > s->table.num_tokens() / options_.page_size) {
      return absl::InternalError(absl::StrCat("sequence ", id, ": ", s->offered_pages,
                                              " pages offered, more than its full pages"));
    }
  }
  for (const auto& [id, exp] : exports_) {
    for (const int32_t p : exp->table.pages()) ++refs[p];
  }
  for (const auto& [id, imp] : imports_) {
    for (const int32_t p : imp->table.pages()) ++refs[p];
    if (imp->table.num_tokens() != static_cast<int32_t>(imp->tokens.size())) {
      return absl::InternalError(absl::StrCat("import ", id, " holds ", imp->table.num_tokens(),
                                              " tokens of ", imp->tokens.size()));
    }
  }
  int32_t held = 0;
  for (int32_t p = 0; p < options_.num_pages; ++p) {
    if (table_refs_[p] != refs[p]) {
      return absl::InternalError(absl::StrCat("page ", p, " is tracked in ", table_refs_[p],
                                              " tables but listed by ", refs[p]));
    }
    held += refs[p] > 0 ? 1 : 0;
    const int32_t want = refs[p] + (cache_.IsCached(p) ? 1 : 0);
    if (alloc_.ref_count(p) != want) {
      return absl::InternalError(absl::StrCat("page ", p, " has ", alloc_.ref_count(p),
                                              " references; tables and cache hold ", want));
    }
  }
  if (held != held_pages_) {
    return absl::InternalError(absl::StrCat("held pages ", held_pages_, " != ", held));
  }
  return cache_.CheckInvariants();
}

}  // namespace sieve::engine
