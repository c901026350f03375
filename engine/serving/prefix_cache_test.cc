#include "engine/serving/prefix_cache.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <set>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// Returns `n` tokens start, start + 1, ...: distinct runs make distinct pages.
std::vector<int32_t> Iota(int32_t n, int32_t start) {
  std::vector<int32_t> v(n);
  for (int32_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

// A sequence as the scheduler would hold it: its tokens and its page table.
struct Sequence {
  explicit Sequence(int32_t page_size) : table(page_size) {}
  PageTable table;
  std::vector<int32_t> tokens;
};

class PrefixCacheTest : public ::testing::Test {
 protected:
  static constexpr int32_t kPageSize = 4;

  explicit PrefixCacheTest(int32_t num_pages = 32) : alloc_(num_pages), cache_(kPageSize, alloc_) {}

  // Prefills `prompt` as the scheduler does: reuse the cached prefix, reserve the rest (evicting
  // if short), then register the full pages. Returns nullopt, holding nothing, when out of pages.
  std::optional<Sequence> Prefill(const std::vector<int32_t>& prompt) {
    Sequence seq(kPageSize);
    PrefixMatch hit = cache_.Match(prompt);
    seq.table.AdoptSharedPrefix(hit.pages, hit.num_tokens);
    const int32_t rest = static_cast<int32_t>(prompt.size()) - hit.num_tokens;
    if (!AppendWithEviction(seq.table, rest, alloc_, cache_).ok()) {
      seq.table.Release(alloc_);
      return std::nullopt;
    }
    seq.tokens = prompt;
    absl::StatusOr<int32_t> inserted = cache_.Insert(seq.tokens, seq.table.pages());
    EXPECT_TRUE(inserted.ok()) << inserted.status();
    return seq;
  }

  std::vector<int32_t> PagesOf(const Sequence& seq) const {
    return {seq.table.pages().begin(), seq.table.pages().end()};
  }

  void ExpectConsistent() {
    absl::Status s = cache_.CheckInvariants();
    EXPECT_TRUE(s.ok()) << s;
  }

  PageAllocator alloc_;
  PrefixCache cache_;
};

TEST_F(PrefixCacheTest, SharedTwoAndAHalfPagesMatchesExactlyTwo) {
  const std::vector<int32_t> a = Iota(16, 100);
  std::optional<Sequence> first = Prefill(a);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(cache_.stats().cached_pages, 4);

  std::vector<int32_t> b(a.begin(), a.begin() + 10);  // 2.5 pages in common
  for (int32_t t : Iota(6, 900)) b.push_back(t);
  PrefixMatch hit = cache_.Match(b);
  EXPECT_EQ(hit.num_tokens, 8);
  EXPECT_THAT(hit.pages, ElementsAre(first->table.pages()[0], first->table.pages()[1]));
  // Each matched page is held by the first sequence, the cache and now the caller.
  EXPECT_EQ(alloc_.ref_count(hit.pages[0]), 3);
  EXPECT_EQ(alloc_.ref_count(hit.pages[1]), 3);
  EXPECT_EQ(alloc_.ref_count(first->table.pages()[2]), 2);
  for (int32_t p : hit.pages) alloc_.DecRef(p);
  ExpectConsistent();
  first->table.Release(alloc_);
}

TEST_F(PrefixCacheTest, EqualPromptStillLeavesATokenToCompute) {
  const std::vector<int32_t> a = Iota(12, 0);  // exactly 3 pages
  std::optional<Sequence> first = Prefill(a);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(cache_.stats().cached_pages, 3);

  PrefixMatch same = cache_.Match(a);
  EXPECT_EQ(same.num_tokens, 8);  // the last page is recomputed for its logits
  EXPECT_EQ(same.pages.size(), 2u);
  for (int32_t p : same.pages) alloc_.DecRef(p);

  std::vector<int32_t> longer = a;
  longer.push_back(77);
  PrefixMatch more = cache_.Match(longer);
  EXPECT_EQ(more.num_tokens, 12);
  EXPECT_THAT(more.pages, ElementsAreArray(PagesOf(*first)));
  for (int32_t p : more.pages) alloc_.DecRef(p);

  EXPECT_THAT(cache_.Match({}).pages, IsEmpty());
  EXPECT_THAT(cache_.Match({0}).pages, IsEmpty());
  EXPECT_THAT(cache_.Match(Iota(4, 0)).pages, IsEmpty());  // one page: nothing left otherwise
  ExpectConsistent();
  first->table.Release(alloc_);
}

TEST_F(PrefixCacheTest, DivergenceMidChainBranchesTheTree) {
  const std::vector<int32_t> a = Iota(13, 0);
  std::optional<Sequence> first = Prefill(a);
  ASSERT_TRUE(first.has_value());

  std::vector<int32_t> b = a;
  b[6] = 999;  // differs inside page 1
  std::optional<Sequence> second = Prefill(b);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->table.pages()[0], first->table.pages()[0]);  // page 0 shared
  EXPECT_NE(second->table.pages()[1], first->table.pages()[1]);
  EXPECT_EQ(cache_.stats().cached_pages, 5);  // 3 from a, 2 new branch pages from b

  std::vector<int32_t> c = a;
  c[3] = 555;  // differs at the last token of page 0
  PrefixMatch none = cache_.Match(c);
  EXPECT_THAT(none.pages, IsEmpty());

  // Each branch is found again by its own prompt.
  PrefixMatch hit_b = cache_.Match(b);
  EXPECT_THAT(hit_b.pages, ElementsAreArray(PagesOf(*second).data(), 3));
  for (int32_t p : hit_b.pages) alloc_.DecRef(p);
  ExpectConsistent();
  first->table.Release(alloc_);
  second->table.Release(alloc_);
}

TEST_F(PrefixCacheTest, EvictsLeastRecentlyUsedLeavesFirst) {
  std::vector<std::vector<int32_t>> prompts = {Iota(8, 0), Iota(8, 100), Iota(8, 200)};
  std::vector<std::vector<int32_t>> pages;
  for (const auto& prompt : prompts) {
    std::optional<Sequence> seq = Prefill(prompt);
    ASSERT_TRUE(seq.has_value());
    pages.push_back(PagesOf(*seq));
    seq->table.Release(alloc_);
  }
  // Touch the oldest chain so that B (prompts[1]) becomes the least recently used.
  std::vector<int32_t> a_again = prompts[0];
  a_again.push_back(1);
  PrefixMatch hit = cache_.Match(a_again);
  ASSERT_EQ(hit.num_tokens, 8);
  for (int32_t p : hit.pages) alloc_.DecRef(p);
  EXPECT_EQ(cache_.stats().evictable_pages, 3);  // only the leaves

  std::vector<int32_t> order;
  while (cache_.stats().cached_pages > 0) {
    const int32_t free_before = alloc_.num_free();
    ASSERT_EQ(cache_.EvictUntilFree(free_before + 1), 1);
    for (const auto& chain : pages) {
      for (int32_t p : chain) {
        if (!cache_.IsCached(p) && alloc_.ref_count(p) == 0 &&
            std::find(order.begin(), order.end(), p) == order.end()) {
          order.push_back(p);
        }
      }
    }
    ExpectConsistent();
  }
  // Leaves before parents; B, then C, then the recently used A.
  EXPECT_THAT(order, ElementsAre(pages[1][1], pages[1][0], pages[2][1], pages[2][0], pages[0][1],
                                 pages[0][0]));
  EXPECT_EQ(alloc_.num_free(), alloc_.num_pages());
}

TEST_F(PrefixCacheTest, PagesInUseAreNeverEvicted) {
  std::optional<Sequence> running = Prefill(Iota(12, 0));
  ASSERT_TRUE(running.has_value());
  EXPECT_EQ(cache_.stats().evictable_pages, 0);
  EXPECT_EQ(cache_.EvictUntilFree(alloc_.num_pages()), 0);
  for (int32_t p : running->table.pages()) EXPECT_TRUE(cache_.IsCached(p));

  // A cached page whose child is in use stays too: b's second page chains below a's first page.
  std::optional<Sequence> a = Prefill(Iota(8, 500));
  ASSERT_TRUE(a.has_value());
  const std::vector<int32_t> a_pages = PagesOf(*a);
  a->table.Release(alloc_);
  Sequence b(kPageSize);  // computed without a cache hit, e.g. admitted in the same step
  ASSERT_TRUE(b.table.Append(12, alloc_).ok());
  b.tokens = Iota(4, 500);
  for (int32_t t : Iota(8, 800)) b.tokens.push_back(t);
  absl::StatusOr<int32_t> inserted = cache_.Insert(b.tokens, b.table.pages());
  ASSERT_TRUE(inserted.ok()) << inserted.status();
  EXPECT_EQ(*inserted, 2);  // page 0 already cached as a_pages[0]; pages 1 and 2 are new
  EXPECT_FALSE(cache_.IsCached(b.table.pages()[0]));

  EXPECT_EQ(cache_.EvictUntilFree(alloc_.num_pages()), 1);  // only a's second page
  EXPECT_FALSE(cache_.IsCached(a_pages[1]));
  EXPECT_TRUE(cache_.IsCached(a_pages[0]));  // its cached child is in use by b
  ExpectConsistent();

  running->table.Release(alloc_);
  b.table.Release(alloc_);
  EXPECT_EQ(cache_.EvictUntilFree(alloc_.num_pages()), 6);
  EXPECT_EQ(alloc_.num_free(), alloc_.num_pages());
  ExpectConsistent();
}

class SmallPoolPrefixCacheTest : public PrefixCacheTest {
 protected:
  SmallPoolPrefixCacheTest() : PrefixCacheTest(6) {}
};

TEST_F(SmallPoolPrefixCacheTest, EvictsUnderPressureThenReinserts) {
  const std::vector<int32_t> a = Iota(12, 0);
  std::optional<Sequence> first = Prefill(a);
  ASSERT_TRUE(first.has_value());
  const std::vector<int32_t> a_pages = PagesOf(*first);
  first->table.Release(alloc_);
  EXPECT_EQ(alloc_.num_free(), 3);
  EXPECT_EQ(cache_.stats().cached_pages, 3);

  // 5 pages needed, 3 free: two cached pages go, the leaf first, then its parent.
  std::optional<Sequence> big = Prefill(Iota(20, 1000));
  ASSERT_TRUE(big.has_value());
  EXPECT_EQ(cache_.stats().evictions, 2);
  EXPECT_TRUE(cache_.IsCached(a_pages[0]));
  // The two freed pages were reused by big (lowest ids first) and now cache big's prefix.
  EXPECT_THAT(PagesOf(*big), ElementsAre(a_pages[1], a_pages[2], 3, 4, 5));
  PrefixMatch a_hit = cache_.Match(Iota(13, 0));
  EXPECT_THAT(a_hit.pages, ElementsAre(a_pages[0]));
  for (int32_t p : a_hit.pages) alloc_.DecRef(p);
  EXPECT_EQ(alloc_.num_free(), 0);
  // A third sequence needs 2 pages but only a's root is evictable: it fails cleanly and holds
  // nothing (the root was evicted on the way).
  EXPECT_FALSE(Prefill(Iota(8, 5000)).has_value());
  EXPECT_EQ(cache_.stats().evictions, 3);
  EXPECT_FALSE(cache_.IsCached(a_pages[0]));
  EXPECT_EQ(alloc_.num_free(), 1);
  ExpectConsistent();
  big->table.Release(alloc_);  // its 5 pages stay cached, evictable from the leaf up

  // Re-running a finds nothing, evicts two of big's pages and re-inserts its own chain.
  std::optional<Sequence> again = Prefill(a);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(cache_.stats().evictions, 5);
  EXPECT_EQ(cache_.stats().cached_pages, 6);
  PrefixMatch hit = cache_.Match(Iota(13, 0));
  EXPECT_EQ(hit.num_tokens, 12);
  EXPECT_THAT(hit.pages, ElementsAreArray(PagesOf(*again)));
  for (int32_t p : hit.pages) alloc_.DecRef(p);
  // big's first 3 pages survived and still serve its prefix.
  PrefixMatch big_hit = cache_.Match(Iota(20, 1000));
  EXPECT_EQ(big_hit.num_tokens, 12);
  for (int32_t p : big_hit.pages) alloc_.DecRef(p);
  again->table.Release(alloc_);
  ExpectConsistent();
  cache_.Clear();
  EXPECT_EQ(alloc_.num_free(), alloc_.num_pages());
}

// A hash that ignores everything but the first token, so unrelated pages collide.
uint64_t FirstTokenHash(uint64_t parent_hash, absl::Span<const int32_t> tokens) {
  return parent_hash * 31 + static_cast<uint64_t>(tokens[0]);
}

// A hash under which every page of every prefix collides.
uint64_t ConstantHash(uint64_t, absl::Span<const int32_t>) { return 42; }

TEST(PrefixCacheCollisionTest, CollidingHashNeverReturnsWrongPages) {
  PageAllocator alloc(16);
  PrefixCache cache(4, alloc, &FirstTokenHash);
  PageTable a(4);
  ASSERT_TRUE(a.Append(8, alloc).ok());
  const std::vector<int32_t> tokens_a = {1, 2, 3, 4, 5, 6, 7, 8};
  ASSERT_EQ(*cache.Insert(tokens_a, a.pages()), 2);

  // Same first token in each page, same hashes, different tokens: no hit.
  PrefixMatch miss = cache.Match({1, 9, 9, 9, 5, 6, 7, 8, 0});
  EXPECT_THAT(miss.pages, IsEmpty());
  // Page 0 right, page 1 collides: only page 0.
  PrefixMatch half = cache.Match({1, 2, 3, 4, 5, 0, 0, 0, 0});
  EXPECT_THAT(half.pages, ElementsAre(a.pages()[0]));
  for (int32_t p : half.pages) alloc.DecRef(p);

  // Inserting the colliding prefix keeps the first owner and caches nothing under that hash.
  PageTable b(4);
  ASSERT_TRUE(b.Append(8, alloc).ok());
  EXPECT_EQ(*cache.Insert({1, 9, 9, 9, 5, 6, 7, 8}, b.pages()), 0);
  EXPECT_TRUE(cache.CheckInvariants().ok());
  a.Release(alloc);
  b.Release(alloc);
  cache.Clear();
  EXPECT_EQ(alloc.num_free(), 16);
}

TEST(PrefixCacheCollisionTest, ConstantHashCachesOnlyOneCorrectPage) {
  PageAllocator alloc(8);
  PrefixCache cache(2, alloc, &ConstantHash);
  PageTable a(2);
  ASSERT_TRUE(a.Append(6, alloc).ok());
  // Page 1's hash collides with page 0's entry, so the chain stops after page 0.
  EXPECT_EQ(*cache.Insert({1, 2, 3, 4, 5, 6}, a.pages()), 1);
  PrefixMatch hit = cache.Match({1, 2, 3, 4, 5, 6, 7});
  EXPECT_THAT(hit.pages, ElementsAre(a.pages()[0]));
  for (int32_t p : hit.pages) alloc.DecRef(p);
  EXPECT_THAT(cache.Match({3, 4, 1, 2, 5}).pages, IsEmpty());
  EXPECT_THAT(cache.Match({1, 3, 1, 2, 5}).pages, IsEmpty());
  EXPECT_TRUE(cache.CheckInvariants().ok());
  a.Release(alloc);
}

TEST_F(PrefixCacheTest, CountersTrackLookupsHitsInsertsAndEvictions) {
  std::optional<Sequence> a = Prefill(Iota(10, 0));  // lookup 1: 10 query tokens, 0 hits
  ASSERT_TRUE(a.has_value());
  std::optional<Sequence> b = Prefill(Iota(9, 0));   // lookup 2: 9 tokens, 8 hit
  ASSERT_TRUE(b.has_value());
  PrefixCacheStats s = cache_.stats();
  EXPECT_EQ(s.lookups, 2);
  EXPECT_EQ(s.query_tokens, 19);
  EXPECT_EQ(s.hit_tokens, 8);
  EXPECT_EQ(s.inserted_pages, 2);
  EXPECT_EQ(s.cached_pages, 2);
  EXPECT_EQ(s.evictable_pages, 0);
  EXPECT_EQ(s.evictions, 0);
  a->table.Release(alloc_);
  b->table.Release(alloc_);
  EXPECT_EQ(cache_.stats().evictable_pages, 1);  // the leaf; the root has a child
  EXPECT_EQ(cache_.EvictUntilFree(alloc_.num_pages()), 2);
  s = cache_.stats();
  EXPECT_EQ(s.evictions, 2);
  EXPECT_EQ(s.cached_pages, 0);
  EXPECT_EQ(s.evictable_pages, 0);
  EXPECT_EQ(s.lookups, 2);
}

TEST_F(PrefixCacheTest, MalformedInsertIsRejectedWithoutChange) {
  Sequence seq(kPageSize);
  ASSERT_TRUE(seq.table.Append(8, alloc_).ok());
  const std::vector<int32_t> tokens = Iota(8, 0);
  const std::vector<int32_t> pages = PagesOf(seq);

  int32_t cached_now = 0;
  auto expect_invalid = [&](absl::Span<const int32_t> t, absl::Span<const int32_t> p,
                            const char* what) {
    absl::StatusOr<int32_t> r = cache_.Insert(t, p);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(r.status().message(), HasSubstr(what));
    EXPECT_EQ(cache_.stats().cached_pages, cached_now);
    ExpectConsistent();
  };
  expect_invalid(tokens, {pages[0]}, "needs 2 pages, got 1");
  expect_invalid(tokens, {pages[0], 99}, "outside");
  expect_invalid(tokens, {pages[0], -1}, "outside");
  expect_invalid(tokens, {pages[0], 20}, "is free");
  expect_invalid(tokens, {pages[0], pages[0]}, "appears twice");

  ASSERT_EQ(*cache_.Insert(tokens, pages), 2);
  cached_now = 2;
  // The same pages cannot be cached again under other tokens.
  expect_invalid(Iota(8, 50), pages, "already cached for a different prefix");
  expect_invalid(tokens, {pages[1], pages[0]}, "already cached for a different prefix");
  // Re-inserting the same chain is a no-op; a short token list inserts nothing.
  EXPECT_EQ(*cache_.Insert(tokens, pages), 0);
  EXPECT_EQ(*cache_.Insert(Iota(3, 0), {}), 0);
  seq.table.Release(alloc_);
}

TEST(PrefixCacheLifetimeTest, DestructorReturnsEveryCachedPage) {
  PageAllocator alloc(10);
  PageTable seq(4);
  {
    PrefixCache cache(4, alloc);
    ASSERT_TRUE(seq.Append(16, alloc).ok());
    ASSERT_EQ(*cache.Insert(Iota(16, 0), seq.pages()), 4);
    EXPECT_EQ(alloc.ref_count(seq.pages()[0]), 2);
  }
  // The sequence keeps its pages; only the cache's references are gone.
  EXPECT_EQ(alloc.ref_count(seq.pages()[0]), 1);
  seq.Release(alloc);
  EXPECT_EQ(alloc.num_free(), 10);
  PrefixCache second(4, alloc);  // the observer slot was given back
  EXPECT_EQ(second.stats().cached_pages, 0);
}

TEST(PrefixCacheHashTest, ChainHashDependsOnParentAndEveryToken) {
  const std::vector<int32_t> t = {1, 2, 3, 4};
  const uint64_t h = HashPageTokens(kRootPageHash, t);
  EXPECT_EQ(h, HashPageTokens(kRootPageHash, t));  // deterministic
  EXPECT_NE(h, HashPageTokens(h, t));
  for (size_t i = 0; i < t.size(); ++i) {
    std::vector<int32_t> u = t;
    u[i] += 1;
    EXPECT_NE(h, HashPageTokens(kRootPageHash, u)) << i;
  }
  EXPECT_NE(HashPageTokens(kRootPageHash, {1, 2}), HashPageTokens(kRootPageHash, {2, 1}));
  EXPECT_NE(HashPageTokens(kRootPageHash, {0}), HashPageTokens(kRootPageHash, {0, 0}));
}

// ---------------------------------------------------------------------------------------------
// Randomized stress: many sequences prefilling, decoding, truncating, releasing and evicting
// over a small pool, with the whole bookkeeping checked after every step.

// Drives one scheduler-like workload and keeps a model of what each page must hold.
class StressHarness {
 public:
  static constexpr int32_t kNumPages = 48;

  StressHarness(int32_t page_size, uint32_t seed)
      : page_size_(page_size), alloc_(kNumPages), cache_(page_size, alloc_), rng_(seed),
        written_(kNumPages) {
    // A few long shared stems over a tiny vocabulary give hits, branches and look-alike pages.
    stems_.resize(4);
    for (auto& stem : stems_) {
      for (int32_t i = 0; i < 6 * page_size + 3; ++i) stem.push_back(Uniform(0, 2));
    }
  }

  // Runs one random operation.
  void Step() {
    const int32_t op = Uniform(0, 99);
    if (op < 35 && live_.size() < 10) {
      Admit();
    } else if (op < 65 && !live_.empty()) {
      Decode(live_[Uniform(0, static_cast<int32_t>(live_.size()) - 1)]);
    } else if (op < 80 && !live_.empty()) {  // finish
      const int32_t i = Uniform(0, static_cast<int32_t>(live_.size()) - 1);
      live_[i].table.Release(alloc_);
      live_.erase(live_.begin() + i);
    } else if (op < 90 && !live_.empty()) {  // roll back
      Sequence& seq = live_[Uniform(0, static_cast<int32_t>(live_.size()) - 1)];
      seq.tokens.resize(seq.table.Truncate(Uniform(0, seq.table.num_tokens()), alloc_));
    } else {
      cache_.EvictUntilFree(Uniform(0, kNumPages));
    }
  }

  // Checks that every page is free, held by live sequences or cached, with matching counts.
  void CheckAll(int step) const {
    std::vector<int32_t> expected(kNumPages, 0);
    for (const Sequence& seq : live_) {
      ASSERT_EQ(seq.tokens.size(), static_cast<size_t>(seq.table.num_tokens()));
      std::set<int32_t> own(seq.table.pages().begin(), seq.table.pages().end());
      ASSERT_EQ(own.size(), seq.table.pages().size()) << "page twice in one table";
      for (int32_t p : seq.table.pages()) ++expected[p];
    }
    int32_t free = 0, cached = 0;
    for (int32_t p = 0; p < kNumPages; ++p) {
      if (cache_.IsCached(p)) {
        ++expected[p];
        ++cached;
      }
      ASSERT_EQ(alloc_.ref_count(p), expected[p]) << "page " << p << " at step " << step;
      if (expected[p] == 0) ++free;
    }
    ASSERT_EQ(alloc_.num_free(), free);
    ASSERT_EQ(alloc_.num_free() + alloc_.num_used(), kNumPages);
    ASSERT_EQ(cache_.stats().cached_pages, cached);
    absl::Status s = cache_.CheckInvariants();
    ASSERT_TRUE(s.ok()) << s << " at step " << step;
  }

  // Releases every sequence and empties the cache.
  void Drain() {
    for (Sequence& seq : live_) seq.table.Release(alloc_);
    live_.clear();
    CheckAll(-1);
    cache_.Clear();
  }

  const PageAllocator& alloc() const { return alloc_; }
  const PrefixCache& cache() const { return cache_; }

 private:
  int32_t Uniform(int32_t lo, int32_t hi) {  // inclusive
    return std::uniform_int_distribution<int32_t>(lo, hi)(rng_);
  }

  // Records, for every page filled by positions [from, num_tokens), the prefix it holds.
  void RecordFill(const Sequence& seq, int32_t from) {
    for (int32_t pos = from; pos < seq.table.num_tokens(); ++pos) {
      if (pos % page_size_ == page_size_ - 1) {
        written_[seq.table.pages()[pos / page_size_]].assign(seq.tokens.begin(),
                                                             seq.tokens.begin() + pos + 1);
      }
    }
  }

  void Admit() {
    std::vector<int32_t> prompt = stems_[Uniform(0, 3)];
    prompt.resize(Uniform(1, static_cast<int32_t>(prompt.size())));
    for (int32_t i = Uniform(0, 2 * page_size_); i > 0; --i) prompt.push_back(Uniform(0, 2));
    Sequence seq(page_size_);
    PrefixMatch hit = cache_.Match(prompt);
    ASSERT_LT(hit.num_tokens, static_cast<int32_t>(prompt.size()));
    for (size_t j = 0; j < hit.pages.size(); ++j) {  // the KV really is this prefix's
      const std::vector<int32_t> prefix(prompt.begin(), prompt.begin() + (j + 1) * page_size_);
      ASSERT_EQ(written_[hit.pages[j]], prefix) << "wrong KV served";
    }
    seq.table.AdoptSharedPrefix(hit.pages, hit.num_tokens);
    seq.tokens = prompt;
    const int32_t rest = static_cast<int32_t>(prompt.size()) - hit.num_tokens;
    if (!AppendWithEviction(seq.table, rest, alloc_, cache_).ok()) {
      seq.table.Release(alloc_);  // cannot admit: give the shared prefix back
      return;
    }
    RecordFill(seq, hit.num_tokens);
    ASSERT_TRUE(cache_.Insert(seq.tokens, seq.table.pages()).ok());
    live_.push_back(std::move(seq));
  }

  void Decode(Sequence& seq) {
    const int32_t from = seq.table.num_tokens();
    const int32_t n = Uniform(1, page_size_ + 1);
    if (!AppendWithEviction(seq.table, n, alloc_, cache_).ok()) {
      seq.table.Release(alloc_);  // preempted; it restarts from nothing
      seq.tokens.clear();
      return;
    }
    for (int32_t i = 0; i < n; ++i) seq.tokens.push_back(Uniform(0, 2));
    RecordFill(seq, from);
    if (Uniform(0, 1) == 0) {
      ASSERT_TRUE(cache_.Insert(seq.tokens, seq.table.pages()).ok());
    }
  }

  int32_t page_size_;
  PageAllocator alloc_;
  PrefixCache cache_;
  std::mt19937 rng_;
  std::vector<std::vector<int32_t>> stems_;
  std::vector<std::vector<int32_t>> written_;  // [num_pages] token prefix whose KV the page holds
  std::vector<Sequence> live_;
};

class PrefixCacheStressTest : public ::testing::TestWithParam<std::tuple<int32_t, uint32_t>> {};

TEST_P(PrefixCacheStressTest, EveryPageIsFreeLiveOrCached) {
  const auto [page_size, seed] = GetParam();
  StressHarness harness(page_size, seed);
  for (int step = 0; step < 3000; ++step) {
    harness.Step();
    if (HasFatalFailure()) return;
    harness.CheckAll(step);
    if (HasFatalFailure()) return;
  }
  const PrefixCacheStats s = harness.cache().stats();
  EXPECT_GT(s.hit_tokens, 0);
  EXPECT_GT(s.evictions, 0);
  EXPECT_GT(s.inserted_pages, 0);
  harness.Drain();
  EXPECT_EQ(harness.alloc().num_free(), StressHarness::kNumPages);
}

INSTANTIATE_TEST_SUITE_P(Seeds, PrefixCacheStressTest,
                         ::testing::Combine(::testing::Values(1, 3, 4, 16),
                                            ::testing::Values(1u, 2u, 3u)));

}  // namespace
}  // namespace sieve::engine
