// KvCacheManager: the host-side owner of the paged KV cache, apart from the batching policy.
//
// It owns the PageAllocator, one PageTable per live sequence (keyed by RequestId), the
// PrefixCache, the count of live page tables listing each page, and the tables of imports in
// progress. The Scheduler (scheduler.h) decides who runs, who waits and whom to preempt; this
// class does the page mechanics those decisions need: match a new sequence's prompt against the
// prefix cache, reserve slots for more tokens (evicting cached pages least recently used first
// when the pool is short), offer newly full pages to the cache, release and truncate. vLLM splits
// its KVCacheManager from its scheduler the same way.
//
// Page invariant (CheckInvariants): every page is free, or its reference count equals the number
// of live page tables (sequences and imports) that list it plus one if the prefix cache holds it.
//
// Side pools: an attention policy may keep data per page and layer beside the KV (Quest's min/max
// keys per page, DoubleSparsity's label cache). It registers the pool here, before any page is
// used, so that sizing can count its bytes per page (side_pool_bytes_per_page) and so that it
// hears of every page taken from the free list (fresh or recycled) before KV is written into it,
// and can reset what a previous owner left there. The manager never touches device memory: the
// backend allocates the side pools' device memory later, next to the K and V pools.
//
// Imports: another process (a prefill daemon) can compute the KV of a prompt and stream it here.
// BeginImport allocates the pages, CommitImport registers them in the prefix cache under the same
// chained hashes a local computation produces (so a later prompt with that prefix hits them), and
// AbortImport gives them back if the transfer fails. Pages are cached only at commit, once their
// KV is there: registering them earlier would let a Match hand out pages with no KV yet.
//
// Exports: the other side of a transfer. BeginExport holds the cached full pages of a prompt's
// longest cached prefix (so eviction cannot recycle them while their KV is read) and EndExport
// drops that hold; the pages stay cached.
//
// Thread safety: none. One thread (the engine's scheduler thread, or a test) owns the object.
#ifndef SIEVE_ENGINE_SERVING_KV_CACHE_MANAGER_H_
#define SIEVE_ENGINE_SERVING_KV_CACHE_MANAGER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/serving/kv_cache.h"
#include "engine/serving/prefix_cache.h"
#include "engine/serving/request.h"

namespace sieve::engine {

// Size and switches of the KV cache.
struct KvCacheOptions {
  int32_t page_size = 16;    // tokens per KV page
  int32_t num_pages = 1024;  // KV pages in the pool
  bool enable_prefix_caching = true;

  // Returns InvalidArgument naming the first field that is not positive.
  absl::Status Validate() const;
};

// Receives the pages the manager takes from the free list (newly used or recycled), before any
// KV is written into them, so a side pool can reset its per-page data (e.g. Quest's bounds).
class PageAllocationListener {
 public:
  virtual ~PageAllocationListener() = default;

  // Called on the manager's thread right after `pages` were allocated to a sequence or an
  // import. Whatever the listener does on a device must be ordered before the first write of
  // KV into those pages (e.g. on the stream of the step that writes them). It must not call
  // back into the manager.
  virtual void OnPagesAllocated(absl::Span<const int32_t> pages) = 0;
};

// Per-page, per-layer data an attention policy keeps beside the KV.
struct SidePoolSpec {
  std::string name;                      // unique among the registered pools, e.g. "quest_minmax"
  int64_t bytes_per_page_per_layer = 0;  // bytes for one KV page in one layer (>= 1)
  int32_t num_layers = 0;                // layers that carry the data (>= 1)
};

// A transfer of KV computed elsewhere for the first num_tokens tokens of a prompt.
struct KvImport {
  int64_t id = 0;             // names the import in CommitImport / AbortImport
  int32_t num_tokens = 0;     // tokens covered, a whole number of pages
  int32_t cached_tokens = 0;  // leading tokens already cached here: nothing to transfer
  // The pages to fill with the KV of tokens [cached_tokens, num_tokens), in token order: token t
  // goes to pages_to_fill[(t - cached_tokens) / page_size] at offset t % page_size.
  std::vector<int32_t> pages_to_fill;
};

// Owns the KV pages of one pool and everything that lists them. Calls that name a sequence
// which was never added (or was removed) abort, being scheduler bugs, except RemoveSequence,
// Find and Release. Not thread-safe.
class KvCacheManager {
 public:
  // `options` must pass Validate() (a broken one aborts: it is a programming error).
  explicit KvCacheManager(const KvCacheOptions& options);
  // Releases every sequence's and import's pages and the prefix cache.
  ~KvCacheManager();

  KvCacheManager(const KvCacheManager&) = delete;
  KvCacheManager& operator=(const KvCacheManager&) = delete;

  // ---- Sequences --------------------------------------------------------------------------

  // Starts an empty page table for sequence `id` and returns it; the reference stays valid until
  // RemoveSequence(id). A duplicate id aborts.
  const PageTable& AddSequence(RequestId id);

  // Releases the sequence's pages (as Release with no computed tokens) and forgets it. Unknown
  // ids are ignored.
  void RemoveSequence(RequestId id);

  // Returns the page table of sequence `id`, or null.
  const PageTable* Find(RequestId id) const;

  // Starts the empty table of `id` with the longest cached prefix of `prompt` (full pages, and
  // never the whole prompt: at least one token is left to compute) and returns the tokens it
  // covers, a multiple of page_size. Those pages count as offered already. Returns 0 when prefix
  // caching is off. A non-empty table aborts.
  int32_t MatchPrefix(RequestId id, absl::Span<const int32_t> prompt);

  // Returns how many of `want` (>= 0) more tokens sequence `id` could reserve now: the room in its
  // last page plus the free pages, after evicting cached pages (least recently used first) when
  // fewer are free than `want` needs. Capped at `want`; 0 when not even one token fits.
  int32_t TokensThatFit(RequestId id, int32_t want);

  // Reserves slots for `n` (>= 0) more tokens of sequence `id`, evicting cached pages when short,
  // and tells the side-pool listeners about the new pages. All or nothing: ResourceExhausted (and
  // no change to the table) when the pages cannot be found even after evicting all it can.
  absl::Status Reserve(RequestId id, int32_t n);

  // Offers the full pages of `computed` (the sequence's leading tokens whose KV is written; at
  // most its table's tokens) that were not offered yet to the prefix cache. Returns the pages
  // newly cached; 0 when prefix caching is off.
  int32_t Offer(RequestId id, absl::Span<const int32_t> computed);

  // Ends a sequence's hold on its pages, for preemption, finish and removal alike: offers the
  // full pages of `computed` first (see Offer), so they stay in the prefix cache, then drops the
  // table's reference on every page; the table stays, empty. Unknown ids are ignored.
  void Release(RequestId id, absl::Span<const int32_t> computed = {});

  // Shortens sequence `id` to `num_tokens` (see PageTable::Truncate: when the page that would
  // keep a partial fill is shared, it is dropped too and the length rounds down to a page
  // boundary). Returns the new length. An unknown id or a length outside [0, length] aborts.
  int32_t Truncate(RequestId id, int32_t num_tokens);

  // Makes the prefix cache forget every page and drop its references; pages a live table lists
  // stay with it. For a sequence that runs alone and is still short of pages: the cache may hold
  // parents of its own pages that leaf-first eviction cannot reach. Returns the pages freed.
  int32_t ClearPrefixCache();

  // ---- Imports ----------------------------------------------------------------------------

  // Starts importing the KV of `tokens`, the first pages of a prompt (a whole number of pages,
  // at least one). Leading pages already cached are reused and held until the import ends; the
  // rest are allocated (evicting cached pages when short) and returned to be filled.
  // FailedPrecondition when prefix caching is off, InvalidArgument for a partial page or no
  // tokens, ResourceExhausted (nothing held) when the pages cannot be found.
  absl::StatusOr<KvImport> BeginImport(absl::Span<const int32_t> tokens);

  // Ends import `id` after its pages were filled: caches them under the chained hashes of its
  // tokens and drops the import's hold, so they are cached-only pages (evictable) until a
  // sequence matches them. A page whose prefix a local sequence cached meanwhile is not cached
  // twice (it is freed). NotFound for an unknown id.
  absl::Status CommitImport(int64_t id);

  // Ends import `id` without caching anything: its fresh pages return to the free list. NotFound
  // for an unknown id.
  absl::Status AbortImport(int64_t id);

  // Holds the cached full pages of the longest cached prefix of `tokens` (at most
  // tokens.size() / page_size pages) until EndExport. NotFound when no page of it is cached;
  // FailedPrecondition when prefix caching is off.
  absl::StatusOr<KvExport> BeginExport(absl::Span<const int32_t> tokens);

  // Drops export `id`'s hold; its pages stay in the prefix cache. NotFound for an unknown id.
  absl::Status EndExport(int64_t id);

  // Returns the number of exports in progress.
  int32_t num_exports() const { return static_cast<int32_t>(exports_.size()); }

  // ---- Side pools -------------------------------------------------------------------------

  // Registers a side pool and, when not null, its listener (which must outlive the manager).
  // Only while no page is in use, so the listener hears of every page before its first use.
  // InvalidArgument for an empty or duplicate name or a non-positive size; FailedPrecondition
  // when pages are in use.
  absl::Status RegisterSidePool(const SidePoolSpec& spec, PageAllocationListener* listener);

  // Returns the registered side pools, in registration order.
  absl::Span<const SidePoolSpec> side_pools() const { return side_pools_; }

  // Returns the device bytes the side pools need per KV page, over all their layers (to add to
  // the K and V bytes per page when sizing the pool).
  int64_t side_pool_bytes_per_page() const;

  // ---- Counters ---------------------------------------------------------------------------

  // Returns the options the manager was built with.
  const KvCacheOptions& options() const { return options_; }
  // Returns the allocator (page counts, reference counts).
  const PageAllocator& allocator() const { return alloc_; }
  // Returns the prefix cache (its counters).
  const PrefixCache& prefix_cache() const { return cache_; }
  // Returns the pages in the pool.
  int32_t num_pages() const { return alloc_.num_pages(); }
  // Returns the pages in use (held by a table or cached).
  int32_t num_used() const { return alloc_.num_used(); }
  // Returns the free pages.
  int32_t num_free() const { return alloc_.num_free(); }
  // Returns the pages listed by at least one live table (sequences and imports; shared pages
  // counted once).
  int32_t held_pages() const { return held_pages_; }
  // Returns the pages in use only because the prefix cache holds them (evictable or parents).
  int32_t cached_only_pages() const { return alloc_.num_used() - held_pages_; }
  // Returns the number of sequences with a table.
  int32_t num_sequences() const { return static_cast<int32_t>(sequences_.size()); }
  // Returns the number of imports in progress.
  int32_t num_imports() const { return static_cast<int32_t>(imports_.size()); }

  // Recomputes the page invariant and the bookkeeping behind held_pages() from every table, plus
  // the prefix cache's own invariants, and returns Internal naming the first violation. For
  // tests; O(pages + tables).
  absl::Status CheckInvariants() const;

 private:
  // A sequence's table and how many of its leading full pages were offered to the cache.
  struct SequenceKv {
    explicit SequenceKv(int32_t page_size) : table(page_size) {}
    PageTable table;
    int32_t offered_pages = 0;
  };
  // An import in progress: its tokens and the table holding its pages.
  struct ImportKv {
    explicit ImportKv(int32_t page_size) : table(page_size) {}
    std::vector<int32_t> tokens;
    PageTable table;
  };

  SequenceKv& Get(RequestId id);
  // Appends `n` tokens to `table` (evicting when short), tracking and announcing new pages.
  absl::Status AppendTracked(PageTable& table, int32_t n);
  // Drops every page of `table`, keeping the tracking current.
  void ReleaseTracked(PageTable& table);
  // Adds `delta` (+1 / -1) to the live-table count of each page.
  void Track(absl::Span<const int32_t> pages, int32_t delta);

  KvCacheOptions options_;
  PageAllocator alloc_;
  PrefixCache cache_;  // after alloc_: it detaches from the allocator when destroyed
  absl::flat_hash_map<RequestId, std::unique_ptr<SequenceKv>> sequences_;
  absl::flat_hash_map<int64_t, std::unique_ptr<ImportKv>> imports_;
  absl::flat_hash_map<int64_t, std::unique_ptr<ImportKv>> exports_;  // ids from next_import_id_
  int64_t next_import_id_ = 1;
  std::vector<int32_t> table_refs_;  // [num_pages] live tables listing each page
  int32_t held_pages_ = 0;           // pages with table_refs_ > 0
  std::vector<SidePoolSpec> side_pools_;
  std::vector<PageAllocationListener*> listeners_;  // not owned
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_KV_CACHE_MANAGER_H_
