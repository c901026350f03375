// Host-side bookkeeping of the paged KV cache: which page each token of each sequence lives in.
//
// The device memory is owned by a Backend: per layer, a K pool and a V pool of num_pages pages,
// each page_size * num_kv_heads * head_dim elements (rows ordered token-major on CUDA, head-major
// on the cpu backend: kernels/attention/paged_attention.h KvLayout). Token t of a sequence lives in page
// pages()[t / page_size] at offset t % page_size, i.e. at the flat slot index
// page * page_size + t % page_size (the layout of kernels/attention/paged_attention.h).
// This file only decides page ids; it never touches device memory.
//
// Ownership model (reference counting):
//   - PageAllocator hands out page ids with a reference count of 1 and keeps a count per page.
//     A page returns to the free list when its count drops to 0.
//   - A PageTable owns exactly one reference on each page it lists and drops them in Release()
//     or Truncate().
//   - The PrefixCache (prefix_cache.h) owns one more reference on each page it has cached, so a
//     cached page is never free; it is "evictable" when that is its only reference.
//   - Only FULL pages are ever shared between sequences (through the prefix cache), and a
//     sequence only appends, so no page is ever written while shared: no copy-on-write.
//
// Thread safety: none. One scheduler thread owns the allocator, every page table and the
// prefix cache; callers on other threads must go through that thread.
#ifndef SIEVE_ENGINE_SERVING_KV_CACHE_H_
#define SIEVE_ENGINE_SERVING_KV_CACHE_H_

#include <cstdint>
#include <functional>
#include <queue>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace sieve::engine {

namespace internal {
// Reports a broken invariant of the KV bookkeeping (a double free, a write into a shared page,
// a misuse by the scheduler) on stderr and aborts. Never used for bad client input.
[[noreturn]] void KvInvariantFailure(absl::string_view message);
}  // namespace internal

// Receives every reference-count change made through PageAllocator::IncRef / DecRef. The prefix
// cache uses it to learn when a cached page stops being used by any sequence (count back to 1)
// and so becomes evictable, without scanning.
class PageRefObserver {
 public:
  virtual ~PageRefObserver() = default;

  // Called after the reference count of `page` changed to `new_count` (>= 0) by IncRef or
  // DecRef. Not called by Allocate (a fresh page is never of interest to the cache). The
  // observer may call back into the allocator.
  virtual void OnRefCountChanged(int32_t page, int32_t new_count) = 0;
};

// Hands out KV page ids in [0, num_pages) and counts references to each.
//
// Allocation order is deterministic: the lowest free page id first (a min-heap of free ids),
// which keeps the used pages packed at the low end of the pool. Allocate, IncRef and DecRef
// cost O(log num_pages) per page at most. Not thread-safe.
class PageAllocator {
 public:
  // Creates a pool of `num_pages` pages (>= 0), all free.
  explicit PageAllocator(int32_t num_pages);

  PageAllocator(const PageAllocator&) = delete;
  PageAllocator& operator=(const PageAllocator&) = delete;

  // Takes `n` free pages, each with a reference count of 1, lowest ids first, and returns them
  // in increasing order. All or nothing: when fewer than `n` pages are free nothing changes and
  // the result is ResourceExhausted ("need N pages, M free"). `n` < 0 is InvalidArgument; `n` = 0
  // returns an empty vector.
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t n);

  // Adds a reference to `page`, which must be in use (count >= 1): sharing a page that nobody
  // holds is a broken invariant and aborts, as does an out-of-range id.
  void IncRef(int32_t page);

  // Drops a reference to `page`; at count 0 the page becomes free. Dropping a reference to a
  // free page means a double free: it aborts with a message naming the page.
  void DecRef(int32_t page);

  // Returns the reference count of `page` (0 when free). Aborts on an out-of-range id.
  int32_t ref_count(int32_t page) const;

  // Returns the number of free pages.
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }

  // Returns the size of the pool in pages.
  int32_t num_pages() const { return static_cast<int32_t>(ref_counts_.size()); }

  // Returns the number of pages with a reference count >= 1.
  int32_t num_used() const { return num_pages() - num_free(); }

  // Installs the observer told about IncRef / DecRef (nullptr removes it). At most one observer
  // at a time: installing a second one without removing the first aborts. The observer must
  // outlive the allocator or remove itself first.
  void set_observer(PageRefObserver* observer);

 private:
  void CheckPage(int32_t page, absl::string_view op) const;

  std::vector<int32_t> ref_counts_;  // [num_pages] references per page
  // Free page ids, smallest on top.
  std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>> free_;
  PageRefObserver* observer_ = nullptr;
};

// The pages of one sequence, in token order: token t lives in pages()[t / page_size].
//
// Invariant: pages().size() == ceil(num_tokens() / page_size). The table owns one reference on
// each listed page; it must be emptied with Release() before it is destroyed, or those pages
// leak (they stay in use in the allocator). Move-only, since a copy would own references it never
// took. Not thread-safe.
class PageTable {
 public:
  // Creates an empty table for pages of `page_size` tokens (>= 1).
  explicit PageTable(int32_t page_size);

  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;
  // Moves the pages and their references; `other` is left empty.
  PageTable(PageTable&& other) noexcept;
  // Moves the pages and their references into this table, which must be empty (else it would
  // leak its own references: aborts); `other` is left empty.
  PageTable& operator=(PageTable&& other) noexcept;
  ~PageTable() = default;

  // Returns the number of tokens whose slots are reserved.
  int32_t num_tokens() const { return num_tokens_; }

  // Returns the tokens per page.
  int32_t page_size() const { return page_size_; }

  // Returns the page ids, in token order. Valid until the next mutating call.
  absl::Span<const int32_t> pages() const { return pages_; }

  // Returns true when no token is reserved (and so no page is held).
  bool empty() const { return num_tokens_ == 0; }

  // Returns the flat slot index (page * page_size + offset) of token `position`, which must be
  // in [0, num_tokens()) (aborts otherwise).
  int64_t SlotOf(int32_t position) const;

  // Returns how many new pages Append(n_more) would allocate (0 when the last page has room).
  // `n_more` must be >= 0.
  int32_t PagesNeededFor(int32_t n_more) const;

  // Reserves slots for `n` new tokens at positions [num_tokens(), num_tokens() + n), allocating
  // PagesNeededFor(n) pages from `alloc`, and returns the flat slot index of each new token in
  // order. All or nothing: when the allocator is short, the result is its ResourceExhausted and
  // neither the table nor the allocator changes. `n` < 0, or a length past INT32_MAX, is
  // InvalidArgument. Writing into a partly filled last page that someone else also references is
  // a broken invariant (it would corrupt their KV) and aborts.
  absl::StatusOr<std::vector<int64_t>> Append(int32_t n, PageAllocator& alloc);

  // Drops the table's reference on every page and empties it.
  void Release(PageAllocator& alloc);

  // Starts an empty table with a prefix shared through the prefix cache: `pages` hold the KV of
  // the first `num_tokens` tokens, which must be exactly pages.size() * page_size (only full pages
  // are shared). Ownership: the table takes over ONE reference per page that the caller already
  // holds (PrefixCache::Match takes it); it does not IncRef. Calling it on a non-empty table, or
  // with a token count that does not fill the pages exactly, aborts.
  void AdoptSharedPrefix(absl::Span<const int32_t> pages, int32_t num_tokens);

  // Shortens the sequence to `num_tokens` (0 <= num_tokens <= num_tokens(), else aborts) for
  // preemption or rollback, dropping the references on whole pages past the new length. If the
  // page that would keep a partial fill is shared (its reference count is above 1, e.g. it is
  // cached), it is dropped too, since appending into it would overwrite shared KV: the length then
  // rounds down to a page boundary and the caller recomputes those tokens. Returns the new
  // num_tokens().
  int32_t Truncate(int32_t num_tokens, PageAllocator& alloc);

 private:
  int32_t page_size_;
  int32_t num_tokens_ = 0;
  std::vector<int32_t> pages_;  // [ceil(num_tokens_ / page_size_)] page ids
};

}  // namespace sieve::engine

#endif  // SIEVE_ENGINE_SERVING_KV_CACHE_H_
