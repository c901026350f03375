#include "engine/serving/prefix_cache.h"

#include <algorithm>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace sieve::engine {

namespace {

// The splitmix64 finalizer: a bijective 64-bit mix with full avalanche.
uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

uint64_t HashPageTokens(uint64_t parent_hash, absl::Span<const int32_t> tokens) {
  uint64_t h = Mix64(parent_hash ^ (0x9e3779b97f4a7c15ULL * (tokens.size() + 1)));
  for (const int32_t token : tokens) {
    h = Mix64(h + 0x9e3779b97f4a7c15ULL + static_cast<uint32_t>(token));
  }
  return h;
}

PrefixCache::PrefixCache(int32_t page_size, PageAllocator& alloc, PageHashFn hash)
    : page_size_(page_size), alloc_(alloc), hash_fn_(hash) {
  if (page_size < 1) {
    internal::KvInvariantFailure(absl::StrCat("PrefixCache needs page_size >= 1, got ", page_size));
  }
  if (hash_fn_ == nullptr) internal::KvInvariantFailure("PrefixCache needs a hash function");
  entries_.resize(alloc.num_pages());
  tokens_.resize(static_cast<size_t>(alloc.num_pages()) * page_size);
  alloc_.set_observer(this);
}

PrefixCache::~PrefixCache() {
  Clear();
  alloc_.set_observer(nullptr);
}

absl::Span<const int32_t> PrefixCache::TokensOf(int32_t page) const {
  return absl::MakeConstSpan(tokens_).subspan(static_cast<size_t>(page) * page_size_, page_size_);
}

int32_t PrefixCache::Lookup(uint64_t hash, int32_t parent,
                            absl::Span<const int32_t> tokens) const {
  const auto it = index_.find(hash);
  if (it == index_.end()) return kNoParent;
  const int32_t page = it->second;
  const Entry& e = entries_[page];
  // The hash is only a hint: the page must continue the same cached parent with the same tokens.
  if (e.parent != parent || TokensOf(page) != tokens) return kNoParent;
  return page;
}

void PrefixCache::RemoveFromEvictable(int32_t page) {
  Entry& e = entries_[page];
  if (!e.in_evictable) return;
  evictable_.erase({e.last_use, page});
  e.in_evictable = false;
}

void PrefixCache::UpdateEvictable(int32_t page) {
  Entry& e = entries_[page];
  const bool evictable = e.cached && e.num_children == 0 && alloc_.ref_count(page) == 1;
  if (evictable == e.in_evictable) return;
  if (evictable) {
    evictable_.insert({e.last_use, page});
    e.in_evictable = true;
  } else {
    RemoveFromEvictable(page);
  }
}

void PrefixCache::Touch(int32_t page, uint64_t tick) {
  RemoveFromEvictable(page);
  entries_[page].last_use = tick;
  UpdateEvictable(page);
}

void PrefixCache::OnRefCountChanged(int32_t page, int32_t new_count) {
  if (entries_[page].cached) UpdateEvictable(page);
}

PrefixMatch PrefixCache::Match(absl::Span<const int32_t> prompt) {
  ++stats_.lookups;
  stats_.query_tokens += static_cast<int64_t>(prompt.size());
  if (prompt.empty()) return PrefixMatch{};
  // Leave at least one prompt token to compute.
  PrefixMatch match = MatchPages(prompt, (prompt.size() - 1) / page_size_);
  stats_.hit_tokens += match.num_tokens;
  return match;
}

PrefixMatch PrefixCache::MatchFullPages(absl::Span<const int32_t> tokens) {
  return MatchPages(tokens, tokens.size() / page_size_);
}

PrefixMatch PrefixCache::MatchPages(absl::Span<const int32_t> tokens, size_t max_pages) {
  PrefixMatch match;
  uint64_t parent_hash = kRootPageHash;
  int32_t parent = kNoParent;
  for (size_t i = 0; i < max_pages; ++i) {
    const absl::Span<const int32_t> page_tokens = tokens.subspan(i * page_size_, page_size_);
    const uint64_t hash = hash_fn_(parent_hash, page_tokens);
    const int32_t page = Lookup(hash, parent, page_tokens);
    if (page == kNoParent) break;
    match.pages.push_back(page);
    parent = page;
    parent_hash = hash;
  }
  const uint64_t tick = ++tick_;
  for (const int32_t page : match.pages) {
    alloc_.IncRef(page);  // the caller's reference; also takes the page out of the evictable set
    Touch(page, tick);
  }
  match.num_tokens = static_cast<int32_t>(match.pages.size()) * page_size_;
  return match;
}

absl::StatusOr<int32_t> PrefixCache::Insert(absl::Span<const int32_t> tokens,
                                            absl::Span<const int32_t> pages) {
  const size_t num_full = tokens.size() / page_size_;
  if (pages.size() < num_full) {
    return absl::InvalidArgumentError(absl::StrCat("Insert of ", tokens.size(), " tokens needs ",
                                                   num_full, " pages, got ", pages.size()));
  }
  // Validate everything first, so that an error changes nothing.
  absl::flat_hash_set<int32_t> seen;
  uint64_t parent_hash = kRootPageHash;
  for (size_t i = 0; i < num_full; ++i) {
    const int32_t page = pages[i];
    if (page < 0 || page >= alloc_.num_pages()) {
      return absl::InvalidArgumentError(absl::StrCat("Insert: page id ", page, " outside [0, ",
                                                     alloc_.num_pages(), ")"));
    }
    if (alloc_.ref_count(page) < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("Insert: page ", page, " is free; the caller must hold its pages"));
    }
    if (!seen.insert(page).second) {
      return absl::InvalidArgumentError(absl::StrCat("Insert: page ", page, " appears twice"));
    }
    const absl::Span<const int32_t> page_tokens = tokens.subspan(i * page_size_, page_size_);
    const uint64_t hash = hash_fn_(parent_hash, page_tokens);
    const Entry& e = entries_[page];
    if (e.cached && (e.hash != hash || TokensOf(page) != page_tokens)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Insert: page ", page, " is already cached for a different prefix than position ", i));
    }
    parent_hash = hash;
  }

  const uint64_t tick = ++tick_;
  int32_t inserted = 0;
  parent_hash = kRootPageHash;
  int32_t parent = kNoParent;
  for (size_t i = 0; i < num_full; ++i) {
    const absl::Span<const int32_t> page_tokens = tokens.subspan(i * page_size_, page_size_);
    const uint64_t hash = hash_fn_(parent_hash, page_tokens);
    int32_t page = Lookup(hash, parent, page_tokens);
    if (page == kNoParent) {
      // Either new, or the hash names a different prefix (a collision): then stop, since the
      // pages after this one could never be reached by Match.
      if (index_.contains(hash) || entries_[pages[i]].cached) break;
      page = pages[i];
      Entry& e = entries_[page];
      e.cached = true;
      e.hash = hash;
      e.parent = parent;
      e.num_children = 0;
      e.last_use = tick;
      std::copy(page_tokens.begin(), page_tokens.end(),
                tokens_.begin() + static_cast<size_t>(page) * page_size_);
      index_[hash] = page;
      if (parent != kNoParent) {
        ++entries_[parent].num_children;
        UpdateEvictable(parent);  // a parent with a child is no longer a leaf
      }
      ++stats_.cached_pages;
      ++stats_.inserted_pages;
      ++inserted;
      alloc_.IncRef(page);  // the cache's own reference
    }
    Touch(page, tick);
    parent = page;
    parent_hash = hash;
  }
  return inserted;
}

void PrefixCache::EvictPage(int32_t page) {
  Entry& e = entries_[page];
  RemoveFromEvictable(page);
  index_.erase(e.hash);
  const int32_t parent = e.parent;
  e = Entry{};
  --stats_.cached_pages;
  ++stats_.evictions;
  if (parent != kNoParent) {
    --entries_[parent].num_children;
    UpdateEvictable(parent);  // it may just have become an evictable leaf
  }
  alloc_.DecRef(page);  // no longer cached, so the observer call ignores it
}

int32_t PrefixCache::EvictUntilFree(int32_t num_free) {
  int32_t evicted = 0;
  while (alloc_.num_free() < num_free && !evictable_.empty()) {
    EvictPage(evictable_.begin()->second);
    ++evicted;
  }
  return evicted;
}

void PrefixCache::Clear() {
  std::vector<int32_t> dropped;
  for (int32_t page = 0; page < static_cast<int32_t>(entries_.size()); ++page) {
    if (entries_[page].cached) dropped.push_back(page);
    entries_[page] = Entry{};
  }
  index_.clear();
  evictable_.clear();
  stats_.cached_pages = 0;
  stats_.evictions += static_cast<int64_t>(dropped.size());
  for (const int32_t page : dropped) alloc_.DecRef(page);
}

bool PrefixCache::IsCached(int32_t page) const {
  if (page < 0 || page >= static_cast<int32_t>(entries_.size())) {
    internal::KvInvariantFailure(absl::StrCat("IsCached of page ", page, " outside the pool"));
  }
  return entries_[page].cached;
}

PrefixCacheStats PrefixCache::stats() const {
  PrefixCacheStats s = stats_;
  s.evictable_pages = static_cast<int32_t>(evictable_.size());
  return s;
}

absl::Status PrefixCache::CheckInvariants() const {
  const int32_t n = static_cast<int32_t>(entries_.size());
  std::vector<int32_t> children(n, 0);
  int32_t cached = 0;
  int32_t in_evictable = 0;
  for (int32_t page = 0; page < n; ++page) {
    const Entry& e = entries_[page];
    if (e.in_evictable) ++in_evictable;
    if (!e.cached) {
      if (e.in_evictable || e.num_children != 0) {
        return absl::InternalError(absl::StrCat("uncached page ", page, " has cache state"));
      }
      continue;
    }
    ++cached;
    const auto it = index_.find(e.hash);
    if (it == index_.end() || it->second != page) {
      return absl::InternalError(absl::StrCat("cached page ", page, " missing from the index"));
    }
    uint64_t parent_hash = kRootPageHash;
    if (e.parent != kNoParent) {
      const Entry& p = entries_[e.parent];
      if (!p.cached) return absl::InternalError(absl::StrCat("page ", page, " is orphaned"));
      if (p.last_use < e.last_use) {
        return absl::InternalError(absl::StrCat("page ", page, " used after its parent"));
      }
      parent_hash = p.hash;
      ++children[e.parent];
    }
    if (hash_fn_(parent_hash, TokensOf(page)) != e.hash) {
      return absl::InternalError(absl::StrCat("page ", page, " hash does not match its tokens"));
    }
    if (alloc_.ref_count(page) < 1) {
      return absl::InternalError(absl::StrCat("cached page ", page, " is free"));
    }
  }
  for (int32_t page = 0; page < n; ++page) {
    const Entry& e = entries_[page];
    if (e.num_children != children[page]) {
      return absl::InternalError(absl::StrCat("page ", page, " child count ", e.num_children,
                                              " != ", children[page]));
    }
    const bool should = e.cached && children[page] == 0 && alloc_.ref_count(page) == 1;
    if (should != e.in_evictable || (should && !evictable_.contains({e.last_use, page}))) {
      return absl::InternalError(absl::StrCat("page ", page, " evictable state is stale"));
    }
  }
  if (cached != stats_.cached_pages || cached != static_cast<int32_t>(index_.size()) ||
      in_evictable != static_cast<int32_t>(evictable_.size())) {
    return absl::InternalError(absl::StrCat("counts disagree: cached ", cached, ", counter ",
                                            stats_.cached_pages, ", index ", index_.size(),
                                            ", evictable ", in_evictable, " vs ",
                                            evictable_.size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> AppendWithEviction(PageTable& table, int32_t n,
                                                        PageAllocator& alloc,
                                                        PrefixCache& cache) {
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot append a negative token count: ", n));
  }
  const int32_t needed = table.PagesNeededFor(n);
  if (alloc.num_free() < needed) cache.EvictUntilFree(needed);
  return table.Append(n, alloc);
}

}  // namespace sieve::engine
