// Automatic prefix caching of full KV pages.
//
// A full page is named by a chained 64-bit hash of the token prefix that ends with it:
//   hash(page i) = HashPageTokens(hash(page i - 1), tokens of page i),   hash(page -1) = kRootPageHash
// so two sequences whose first k pages hold the same tokens name those pages alike, and the cache
// is a tree of pages (a page's parent is the page before it). A hash is only a hint: each entry
// stores the page's token ids and its parent page, and a lookup compares both, so a hash
// collision can cost a hit but never returns KV computed for other tokens.
//
// Cooperation with the PageAllocator (kv_cache.h):
//   - The cache holds ONE reference on each page it has cached, so a cached page is never free.
//   - A cached page is "evictable" when that reference is its only one (ref_count == 1: no live
//     sequence reads it) and no cached child hangs below it (leaves go before their parents, so
//     every cached page's parent is cached too and no entry is ever orphaned).
//   - The cache installs itself as the allocator's PageRefObserver to see a page fall back to
//     one reference when the last sequence using it releases it; evictable pages sit in an
//     ordered set keyed by last use, so finding the least recently used one is O(log n).
//   - Eviction is explicit: before allocating, the scheduler calls EvictUntilFree(n) (or uses
//     AppendWithEviction below), which drops the cache's reference on LRU evictable pages until
//     the allocator has n free pages.
// Ownership of a hit: Match takes one reference per returned page on the caller's behalf; the
// caller hands them to PageTable::AdoptSharedPrefix (which takes them over) or DecRefs them.
//
// Thread safety: none; the scheduler thread owns the cache together with the allocator.
#ifndef SIEVE_ENGINE_SERVING_PREFIX_CACHE_H_
#define SIEVE_ENGINE_SERVING_PREFIX_CACHE_H_

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/serving/kv_cache.h"

namespace sieve::engine {

// The chain hash of the empty prefix (the "parent" of a sequence's first page).
inline constexpr uint64_t kRootPageHash = 0x5eed5eed5eed5eedULL;

// Returns the chain hash of a page holding `tokens` whose prefix hashes to `parent_hash`.
// Deterministic across processes and builds (a fixed 64-bit mix, not absl::Hash), so hashes can
// later be compared between replicas.
uint64_t HashPageTokens(uint64_t parent_hash, absl::Span<const int32_t> tokens);

// Signature of the page hash; tests inject a degenerate one to force collisions.
using PageHashFn = uint64_t (*)(uint64_t parent_hash, absl::Span<const int32_t> tokens);

// The result of PrefixCache::Match: the cached pages that hold the KV of the prompt's first
// num_tokens tokens (num_tokens == pages.size() * page_size).
struct PrefixMatch {
  std::vector<int32_t> pages;  // page ids, in token order; one reference each owned by the caller
  int32_t num_tokens = 0;      // tokens covered by `pages`
};

// Counters of the prefix cache since construction (for a hit-ratio metric:
// hit_tokens / query_tokens), plus the current sizes.
struct PrefixCacheStats {
  int64_t lookups = 0;         // Match calls
  int64_t query_tokens = 0;    // prompt tokens passed to Match
  int64_t hit_tokens = 0;      // prompt tokens served from the cache
  int64_t inserted_pages = 0;  // pages newly cached by Insert
  int64_t evictions = 0;       // pages evicted (EvictUntilFree and Clear)
  int32_t cached_pages = 0;    // pages cached now
  int32_t evictable_pages = 0; // cached pages evictable right now
};

// Caches the KV pages of full-page token prefixes and hands them to later sequences with the
// same prefix. Memory: page_size int32 token ids per page of the pool, plus O(1) per page.
// Not thread-safe.
class PrefixCache : private PageRefObserver {
 public:
  // Creates an empty cache over `alloc`, whose pages hold `page_size` (>= 1) tokens. Installs the
  // cache as `alloc`'s observer (aborts if another is installed). `alloc` must outlive the cache.
  // `hash` names pages; leave the default except in tests.
  PrefixCache(int32_t page_size, PageAllocator& alloc, PageHashFn hash = &HashPageTokens);

  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // Drops every cached page (Clear) and detaches from the allocator.
  ~PrefixCache() override;

  // Finds the longest chain of cached full pages that prefixes `prompt`, takes one reference on
  // each for the caller and marks them most recently used. The match never covers the whole
  // prompt: at least one token is left to compute so the model produces logits to sample from,
  // so at most (prompt.size() - 1) / page_size pages are returned (a prompt of exactly k pages
  // gets at most k - 1). Always succeeds; an empty prompt matches nothing.
  PrefixMatch Match(absl::Span<const int32_t> prompt);

  // Like Match, for KV that arrives from elsewhere rather than for a prompt to compute: the
  // match may cover every full page of `tokens` (a trailing partial page is ignored), and the
  // lookup counters (lookups, query_tokens, hit_tokens) are left alone, so imports do not skew
  // the hit ratio. Takes one reference per returned page for the caller, as Match does.
  PrefixMatch MatchFullPages(absl::Span<const int32_t> tokens);

  // Registers the full pages of a sequence after its KV was written: `tokens` are the sequence's
  // tokens and `pages` its page table, covering at least tokens.size() / page_size pages (only
  // those full pages are considered; a trailing partial page is ignored). Pages whose prefix is
  // already cached are left alone (the existing page stays canonical and later pages chain
  // below it); new ones get a cache reference. Stops at a hash collision with a different prefix
  // (later pages could not be reached anyway). Every considered page must be held by the caller
  // (ref_count >= 1) and appear once. Returns the number of pages newly cached; InvalidArgument
  // (and no change) for too few pages, out-of-range, free or repeated page ids, or a page that is
  // already cached under a different prefix.
  absl::StatusOr<int32_t> Insert(absl::Span<const int32_t> tokens,
                                 absl::Span<const int32_t> pages);

  // Evicts least-recently-used evictable pages until the allocator has at least `num_free`
  // free pages or nothing evictable remains. Returns the number of pages evicted; the caller
  // compares alloc.num_free() with what it needs. A page still referenced by a sequence, or with
  // a cached child, is never evicted.
  int32_t EvictUntilFree(int32_t num_free);

  // Forgets every cached page and drops the cache's references; pages still used by sequences
  // stay allocated to them. Counts each dropped page as an eviction.
  void Clear();

  // Returns true if `page` (a valid page id) is cached.
  bool IsCached(int32_t page) const;

  // Returns the counters and current sizes.
  PrefixCacheStats stats() const;

  // Returns the tokens per page.
  int32_t page_size() const { return page_size_; }

  // Recomputes every internal invariant from scratch (entries vs. hash index, child counts,
  // the evictable set, one cache reference per cached page) and returns Internal naming the
  // first violation. O(num_pages * page_size); for tests.
  absl::Status CheckInvariants() const;

 private:
  static constexpr int32_t kNoParent = -1;

  // State of one page of the pool, indexed by page id.
  struct Entry {
    bool cached = false;
    bool in_evictable = false;
    uint64_t hash = 0;            // chain hash of the prefix ending with this page
    int32_t parent = kNoParent;   // cached page holding the previous page_size tokens
    int32_t num_children = 0;     // cached pages whose parent is this one
    uint64_t last_use = 0;        // tick of the last Match / Insert that touched it
  };

  // Key of the evictable set: least recently used first, ties by page id.
  using LruKey = std::pair<uint64_t, int32_t>;

  void OnRefCountChanged(int32_t page, int32_t new_count) override;

  // Finds up to `max_pages` leading cached pages of `tokens`, references and touches them.
  PrefixMatch MatchPages(absl::Span<const int32_t> tokens, size_t max_pages);
  // Returns the cached page holding `tokens` (one page) after `parent` with chain hash `hash`,
  // or kNoParent when absent (including when a different prefix owns the hash).
  int32_t Lookup(uint64_t hash, int32_t parent, absl::Span<const int32_t> tokens) const;
  // Sets the last use of a cached page, keeping the evictable set ordered.
  void Touch(int32_t page, uint64_t tick);
  // Puts `page` into or out of the evictable set according to its current state.
  void UpdateEvictable(int32_t page);
  void RemoveFromEvictable(int32_t page);
  // Forgets the cached leaf `page` and drops the cache's reference on it.
  void EvictPage(int32_t page);
  absl::Span<const int32_t> TokensOf(int32_t page) const;

  int32_t page_size_;
  PageAllocator& alloc_;
  PageHashFn hash_fn_;
  std::vector<Entry> entries_;                     // [num_pages]
  std::vector<int32_t> tokens_;                    // [num_pages, page_size] ids of cached pages
  absl::flat_hash_map<uint64_t, int32_t> index_;   // chain hash -> cached page
  std::set<LruKey> evictable_;                     // evictable pages by last use
  uint64_t tick_ = 0;                              // advances once per Match / Insert
  PrefixCacheStats stats_;
};

// Reserves `n` more tokens in `table` like PageTable::Append, first evicting cached pages from
// `cache` if `alloc` has fewer free pages than the append needs. On failure (still too few pages
// after evicting all it can) the table is unchanged and the result is ResourceExhausted.
absl::StatusOr<std::vector<int64_t>> AppendWithEviction(PageTable& table, int32_t n,
                                                        PageAllocator& alloc,
                                                        PrefixCache& cache);

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_PREFIX_CACHE_H_
