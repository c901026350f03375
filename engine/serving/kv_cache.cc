#include "engine/serving/kv_cache.h"

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sieve::engine {

namespace internal {

void KvInvariantFailure(absl::string_view message) {
  std::fprintf(stderr, "sieve KV cache invariant broken: %.*s\n",
               static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
  std::abort();
}

}  // namespace internal

// ---------------------------------------------------------------------------------------------
// PageAllocator

PageAllocator::PageAllocator(int32_t num_pages) {
  if (num_pages < 0) {
    internal::KvInvariantFailure(absl::StrCat("PageAllocator needs num_pages >= 0, got ", num_pages));
  }
  ref_counts_.assign(num_pages, 0);
  std::vector<int32_t> ids(num_pages);
  for (int32_t i = 0; i < num_pages; ++i) ids[i] = i;
  // Ascending ids already form a valid min-heap, so this is O(num_pages).
  free_ = decltype(free_)(std::greater<int32_t>(), std::move(ids));
}

void PageAllocator::CheckPage(int32_t page, absl::string_view op) const {
  if (page < 0 || page >= num_pages()) {
    internal::KvInvariantFailure(
        absl::StrCat(op, " of page ", page, " outside the pool [0, ", num_pages(), ")"));
  }
}

absl::StatusOr<std::vector<int32_t>> PageAllocator::Allocate(int32_t n) {
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot allocate a negative page count: ", n));
  }
  if (n > num_free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: need ", n, " pages, ", num_free(), " free"));
  }
  std::vector<int32_t> pages;
  pages.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t page = free_.top();
    free_.pop();
    ref_counts_[page] = 1;
    pages.push_back(page);
  }
  return pages;
}

void PageAllocator::IncRef(int32_t page) {
  CheckPage(page, "IncRef");
  if (ref_counts_[page] == 0) {
    internal::KvInvariantFailure(absl::StrCat("IncRef of free page ", page,
                                              ": only a page someone holds can be shared"));
  }
  const int32_t count = ++ref_counts_[page];
  if (observer_ != nullptr) observer_->OnRefCountChanged(page, count);
}

void PageAllocator::DecRef(int32_t page) {
  CheckPage(page, "DecRef");
  if (ref_counts_[page] == 0) {
    internal::KvInvariantFailure(
        absl::StrCat("DecRef of free page ", page, " (double free)"));
  }
  const int32_t count = --ref_counts_[page];
  if (count == 0) free_.push(page);
  if (observer_ != nullptr) observer_->OnRefCountChanged(page, count);
}

int32_t PageAllocator::ref_count(int32_t page) const {
  CheckPage(page, "ref_count");
  return ref_counts_[page];
}

void PageAllocator::set_observer(PageRefObserver* observer) {
  if (observer != nullptr && observer_ != nullptr && observer != observer_) {
    internal::KvInvariantFailure("PageAllocator already has an observer (one prefix cache per pool)");
  }
  observer_ = observer;
}

// ---------------------------------------------------------------------------------------------
// PageTable

PageTable::PageTable(int32_t page_size) : page_size_(page_size) {
  if (page_size < 1) {
    internal::KvInvariantFailure(absl::StrCat("PageTable needs page_size >= 1, got ", page_size));
  }
}

PageTable::PageTable(PageTable&& other) noexcept
    : page_size_(other.page_size_),
      num_tokens_(std::exchange(other.num_tokens_, 0)),
      pages_(std::exchange(other.pages_, {})) {}

PageTable& PageTable::operator=(PageTable&& other) noexcept {
  if (this == &other) return *this;
  if (!pages_.empty()) {
    internal::KvInvariantFailure("move-assigning into a PageTable that still holds pages");
  }
  page_size_ = other.page_size_;
  num_tokens_ = std::exchange(other.num_tokens_, 0);
  pages_ = std::exchange(other.pages_, {});
  return *this;
}

int64_t PageTable::SlotOf(int32_t position) const {
  if (position < 0 || position >= num_tokens_) {
    internal::KvInvariantFailure(
        absl::StrCat("SlotOf(", position, ") outside [0, ", num_tokens_, ")"));
  }
  return static_cast<int64_t>(pages_[position / page_size_]) * page_size_ + position % page_size_;
}

int32_t PageTable::PagesNeededFor(int32_t n_more) const {
  if (n_more < 0) {
    internal::KvInvariantFailure(absl::StrCat("PagesNeededFor(", n_more, ") is negative"));
  }
  const int64_t total = static_cast<int64_t>(num_tokens_) + n_more;
  const int64_t pages_total = (total + page_size_ - 1) / page_size_;
  return static_cast<int32_t>(pages_total - static_cast<int64_t>(pages_.size()));
}

absl::StatusOr<std::vector<int64_t>> PageTable::Append(int32_t n, PageAllocator& alloc) {
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot append a negative token count: ", n));
  }
  if (static_cast<int64_t>(num_tokens_) + n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("sequence too long: ", num_tokens_, " + ", n, " tokens"));
  }
  if (n > 0 && num_tokens_ % page_size_ != 0 && alloc.ref_count(pages_.back()) > 1) {
    internal::KvInvariantFailure(absl::StrCat("append into shared partial page ", pages_.back(),
                                              " would overwrite another holder's KV"));
  }
  const int32_t needed = PagesNeededFor(n);
  absl::StatusOr<std::vector<int32_t>> fresh = alloc.Allocate(needed);
  if (!fresh.ok()) return fresh.status();
  pages_.insert(pages_.end(), fresh->begin(), fresh->end());

  std::vector<int64_t> slots;
  slots.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t position = num_tokens_ + i;
    slots.push_back(static_cast<int64_t>(pages_[position / page_size_]) * page_size_ +
                    position % page_size_);
  }
  num_tokens_ += n;
  return slots;
}

void PageTable::Release(PageAllocator& alloc) {
  for (const int32_t page : pages_) alloc.DecRef(page);
  pages_.clear();
  num_tokens_ = 0;
}

void PageTable::AdoptSharedPrefix(absl::Span<const int32_t> pages, int32_t num_tokens) {
  if (!pages_.empty() || num_tokens_ != 0) {
    internal::KvInvariantFailure("AdoptSharedPrefix on a PageTable that is not empty");
  }
  if (static_cast<int64_t>(pages.size()) * page_size_ != num_tokens) {
    internal::KvInvariantFailure(absl::StrCat("AdoptSharedPrefix of ", pages.size(),
                                              " pages of ", page_size_, " tokens claims ",
                                              num_tokens, " tokens; only full pages are shared"));
  }
  pages_.assign(pages.begin(), pages.end());
  num_tokens_ = num_tokens;
}

int32_t PageTable::Truncate(int32_t num_tokens, PageAllocator& alloc) {
  if (num_tokens < 0 || num_tokens > num_tokens_) {
    internal::KvInvariantFailure(
        absl::StrCat("Truncate(", num_tokens, ") outside [0, ", num_tokens_, "]"));
  }
  size_t keep = (static_cast<size_t>(num_tokens) + page_size_ - 1) / page_size_;
  if (num_tokens % page_size_ != 0 && alloc.ref_count(pages_[keep - 1]) > 1) {
    // The kept partial page is shared: appending into it later would corrupt the other holder.
    --keep;
    num_tokens = static_cast<int32_t>(keep) * page_size_;
  }
  for (size_t i = keep; i < pages_.size(); ++i) alloc.DecRef(pages_[i]);
  pages_.resize(keep);
  num_tokens_ = num_tokens;
  return num_tokens_;
}

}  // namespace sieve::engine
