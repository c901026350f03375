#include "engine/serving/kv_cache.h"

#include <cstdint>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// ---------------------------------------------------------------------------------------------
// PageAllocator

TEST(PageAllocatorTest, AllocatesLowestIdsFirstUntilExhausted) {
  PageAllocator alloc(5);
  EXPECT_EQ(alloc.num_pages(), 5);
  EXPECT_EQ(alloc.num_free(), 5);
  EXPECT_EQ(alloc.num_used(), 0);

  absl::StatusOr<std::vector<int32_t>> a = alloc.Allocate(3);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(*a, ElementsAre(0, 1, 2));
  absl::StatusOr<std::vector<int32_t>> b = alloc.Allocate(2);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_THAT(*b, ElementsAre(3, 4));
  EXPECT_EQ(alloc.num_free(), 0);
  EXPECT_EQ(alloc.num_used(), 5);
  for (int32_t p = 0; p < 5; ++p) EXPECT_EQ(alloc.ref_count(p), 1);

  absl::StatusOr<std::vector<int32_t>> c = alloc.Allocate(1);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(c.status().message(), HasSubstr("need 1 pages, 0 free"));

  for (int32_t p = 0; p < 5; ++p) alloc.DecRef(p);
  EXPECT_EQ(alloc.num_free(), 5);
}

TEST(PageAllocatorTest, AllocateIsAllOrNothing) {
  PageAllocator alloc(4);
  ASSERT_TRUE(alloc.Allocate(3).ok());
  absl::StatusOr<std::vector<int32_t>> big = alloc.Allocate(2);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("need 2 pages, 1 free"));
  EXPECT_EQ(alloc.num_free(), 1);  // nothing was taken by the failed call
  EXPECT_EQ(alloc.ref_count(3), 0);
  absl::StatusOr<std::vector<int32_t>> one = alloc.Allocate(1);
  ASSERT_TRUE(one.ok());
  EXPECT_THAT(*one, ElementsAre(3));
  for (int32_t p = 0; p < 4; ++p) alloc.DecRef(p);
  EXPECT_EQ(alloc.num_free(), 4);
}

TEST(PageAllocatorTest, ZeroAndNegativeCounts) {
  PageAllocator alloc(2);
  absl::StatusOr<std::vector<int32_t>> none = alloc.Allocate(0);
  ASSERT_TRUE(none.ok());
  EXPECT_THAT(*none, IsEmpty());
  EXPECT_EQ(alloc.Allocate(-1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(alloc.num_free(), 2);

  PageAllocator empty(0);
  EXPECT_EQ(empty.num_pages(), 0);
  EXPECT_TRUE(empty.Allocate(0).ok());
  EXPECT_EQ(empty.Allocate(1).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(PageAllocatorTest, FreedPagesAreReusedLowestFirst) {
  PageAllocator alloc(6);
  ASSERT_TRUE(alloc.Allocate(6).ok());
  alloc.DecRef(4);
  alloc.DecRef(1);
  alloc.DecRef(5);
  EXPECT_EQ(alloc.num_free(), 3);
  absl::StatusOr<std::vector<int32_t>> again = alloc.Allocate(2);
  ASSERT_TRUE(again.ok());
  EXPECT_THAT(*again, ElementsAre(1, 4));
  absl::StatusOr<std::vector<int32_t>> last = alloc.Allocate(1);
  ASSERT_TRUE(last.ok());
  EXPECT_THAT(*last, ElementsAre(5));
  for (int32_t p = 0; p < 6; ++p) alloc.DecRef(p);
  EXPECT_EQ(alloc.num_free(), 6);
}

TEST(PageAllocatorTest, ReferenceCountsKeepSharedPagesAlive) {
  PageAllocator alloc(3);
  std::vector<int32_t> pages = *alloc.Allocate(1);
  const int32_t p = pages[0];
  alloc.IncRef(p);
  alloc.IncRef(p);
  EXPECT_EQ(alloc.ref_count(p), 3);
  alloc.DecRef(p);
  alloc.DecRef(p);
  EXPECT_EQ(alloc.ref_count(p), 1);
  EXPECT_EQ(alloc.num_free(), 2);  // still held once
  alloc.DecRef(p);
  EXPECT_EQ(alloc.ref_count(p), 0);
  EXPECT_EQ(alloc.num_free(), 3);
}

class RecordingObserver : public PageRefObserver {
 public:
  void OnRefCountChanged(int32_t page, int32_t new_count) override {
    events.push_back({page, new_count});
  }
  std::vector<std::pair<int32_t, int32_t>> events;
};

TEST(PageAllocatorTest, ObserverSeesIncRefAndDecRefButNotAllocate) {
  PageAllocator alloc(2);
  RecordingObserver observer;
  alloc.set_observer(&observer);
  const int32_t p = (*alloc.Allocate(1))[0];
  EXPECT_THAT(observer.events, IsEmpty());
  alloc.IncRef(p);
  alloc.DecRef(p);
  alloc.DecRef(p);
  EXPECT_THAT(observer.events, ElementsAre(std::pair(p, 2), std::pair(p, 1), std::pair(p, 0)));
  alloc.set_observer(nullptr);
  EXPECT_EQ(alloc.num_free(), 2);
}

TEST(PageAllocatorDeathTest, DoubleFreeDies) {
  PageAllocator alloc(2);
  const int32_t p = (*alloc.Allocate(1))[0];
  alloc.DecRef(p);
  EXPECT_DEATH(alloc.DecRef(p), "DecRef of free page 0 \\(double free\\)");
}

TEST(PageAllocatorDeathTest, MisuseDies) {
  PageAllocator alloc(2);
  EXPECT_DEATH(alloc.IncRef(1), "IncRef of free page 1");
  EXPECT_DEATH(alloc.DecRef(7), "outside the pool");
  EXPECT_DEATH(alloc.ref_count(-1), "outside the pool");
  RecordingObserver a, b;
  alloc.set_observer(&a);
  EXPECT_DEATH(alloc.set_observer(&b), "already has an observer");
  alloc.set_observer(nullptr);
}

// ---------------------------------------------------------------------------------------------
// PageTable

// Checks that `slots` are the slots of positions [first, first + slots.size()) of `table`.
void ExpectSlotsMatchTable(const PageTable& table, int32_t first,
                           const std::vector<int64_t>& slots) {
  for (size_t i = 0; i < slots.size(); ++i) {
    const int32_t pos = first + static_cast<int32_t>(i);
    const int64_t expected = static_cast<int64_t>(table.pages()[pos / table.page_size()]) *
                                 table.page_size() + pos % table.page_size();
    ASSERT_EQ(slots[i], expected) << "position " << pos;
    ASSERT_EQ(table.SlotOf(pos), expected);
  }
}

TEST(PageTableTest, SlotIndicesCrossPageBoundaries) {
  PageAllocator alloc(10);
  const int32_t blocker = (*alloc.Allocate(1))[0];  // page 0 in use, so the table starts at 1
  PageTable table(4);
  absl::StatusOr<std::vector<int64_t>> s = table.Append(6, alloc);
  ASSERT_TRUE(s.ok()) << s.status();
  // Pages 1 and 2: slots 4..7 then 8..9.
  EXPECT_THAT(*s, ElementsAre(4, 5, 6, 7, 8, 9));
  EXPECT_THAT(table.pages(), ElementsAre(1, 2));
  EXPECT_EQ(table.num_tokens(), 6);
  absl::StatusOr<std::vector<int64_t>> t = table.Append(3, alloc);
  ASSERT_TRUE(t.ok());
  EXPECT_THAT(*t, ElementsAre(10, 11, 12));  // fills page 2, then page 3 offset 0
  EXPECT_THAT(table.pages(), ElementsAre(1, 2, 3));
  table.Release(alloc);
  alloc.DecRef(blocker);
  EXPECT_EQ(alloc.num_free(), 10);
}

class PageTableSizeTest : public ::testing::TestWithParam<int32_t> {};

TEST_P(PageTableSizeTest, AppendsOfOneAndManyTokens) {
  const int32_t page_size = GetParam();
  PageAllocator alloc(200);
  PageTable table(page_size);
  int32_t expected_tokens = 0;
  // Mix single-token decode steps with bulk prefill chunks of awkward lengths.
  for (int32_t n : {1, 1, page_size, 1, 2 * page_size + 1, 3, 1, page_size - 1, 0, 17}) {
    EXPECT_EQ(table.PagesNeededFor(n),
              (expected_tokens + n + page_size - 1) / page_size -
                  static_cast<int32_t>(table.pages().size()));
    absl::StatusOr<std::vector<int64_t>> slots = table.Append(n, alloc);
    ASSERT_TRUE(slots.ok()) << slots.status();
    ASSERT_EQ(slots->size(), static_cast<size_t>(n));
    ExpectSlotsMatchTable(table, expected_tokens, *slots);
    expected_tokens += n;
    EXPECT_EQ(table.num_tokens(), expected_tokens);
    EXPECT_EQ(table.pages().size(),
              static_cast<size_t>((expected_tokens + page_size - 1) / page_size));
  }
  // Every slot of the sequence is distinct.
  std::set<int64_t> unique;
  for (int32_t pos = 0; pos < table.num_tokens(); ++pos) unique.insert(table.SlotOf(pos));
  EXPECT_EQ(unique.size(), static_cast<size_t>(table.num_tokens()));
  EXPECT_EQ(alloc.num_used(), static_cast<int32_t>(table.pages().size()));
  table.Release(alloc);
  EXPECT_EQ(table.num_tokens(), 0);
  EXPECT_THAT(table.pages(), IsEmpty());
  EXPECT_EQ(alloc.num_free(), 200);
}

INSTANTIATE_TEST_SUITE_P(PageSizes, PageTableSizeTest, ::testing::Values(1, 3, 7, 16, 64));

TEST(PageTableTest, FailedAppendLeavesEverythingUnchanged) {
  PageAllocator alloc(3);
  PageTable table(4);
  ASSERT_TRUE(table.Append(5, alloc).ok());  // 2 pages, 3 slots left in page 1
  const std::vector<int32_t> pages_before(table.pages().begin(), table.pages().end());
  absl::StatusOr<std::vector<int64_t>> too_many = table.Append(3 + 4 + 1, alloc);  // needs 2
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(too_many.status().message(), HasSubstr("need 2 pages, 1 free"));
  EXPECT_EQ(table.num_tokens(), 5);
  EXPECT_THAT(table.pages(), ::testing::ElementsAreArray(pages_before));
  EXPECT_EQ(alloc.num_free(), 1);
  // Filling the partly used page needs no allocation, so it still works.
  EXPECT_EQ(table.PagesNeededFor(3), 0);
  absl::StatusOr<std::vector<int64_t>> fill = table.Append(3, alloc);
  ASSERT_TRUE(fill.ok());
  EXPECT_EQ(alloc.num_free(), 1);
  EXPECT_EQ(table.Append(-2, alloc).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(table.num_tokens(), 8);
  table.Release(alloc);
  EXPECT_EQ(alloc.num_free(), 3);
}

TEST(PageTableTest, ReleaseKeepsPagesOthersStillReference) {
  PageAllocator alloc(4);
  PageTable table(2);
  ASSERT_TRUE(table.Append(4, alloc).ok());
  const int32_t shared = table.pages()[0];
  alloc.IncRef(shared);  // someone else holds the first page too
  table.Release(alloc);
  EXPECT_TRUE(table.empty());
  EXPECT_EQ(alloc.ref_count(shared), 1);
  EXPECT_EQ(alloc.num_free(), 3);
  alloc.DecRef(shared);
  EXPECT_EQ(alloc.num_free(), 4);
}

TEST(PageTableTest, TruncateDropsWholePagesPastTheNewLength) {
  PageAllocator alloc(8);
  PageTable table(4);
  ASSERT_TRUE(table.Append(14, alloc).ok());  // pages 0..3, last one holds 2 tokens
  EXPECT_EQ(alloc.num_used(), 4);
  EXPECT_EQ(table.Truncate(9, alloc), 9);  // keeps pages 0..2, page 2 holds 1 token
  EXPECT_THAT(table.pages(), ElementsAre(0, 1, 2));
  EXPECT_EQ(alloc.num_used(), 3);
  EXPECT_EQ(table.Truncate(8, alloc), 8);  // exact page boundary
  EXPECT_THAT(table.pages(), ElementsAre(0, 1));
  EXPECT_EQ(table.Truncate(8, alloc), 8);  // no-op
  // Appending after a rollback reuses the freed slots in order.
  absl::StatusOr<std::vector<int64_t>> s = table.Append(2, alloc);
  ASSERT_TRUE(s.ok());
  EXPECT_THAT(*s, ElementsAre(8, 9));
  EXPECT_EQ(table.Truncate(0, alloc), 0);
  EXPECT_TRUE(table.empty());
  EXPECT_EQ(alloc.num_free(), 8);
}

TEST(PageTableTest, TruncateIntoASharedPageRoundsDown) {
  PageAllocator alloc(8);
  PageTable table(4);
  ASSERT_TRUE(table.Append(12, alloc).ok());
  const int32_t shared = table.pages()[1];
  alloc.IncRef(shared);  // e.g. the prefix cache holds page 1
  // Keeping 2 tokens of the shared page would let a later append overwrite it.
  EXPECT_EQ(table.Truncate(6, alloc), 4);
  EXPECT_EQ(table.num_tokens(), 4);
  EXPECT_EQ(table.pages().size(), 1u);
  EXPECT_EQ(alloc.ref_count(shared), 1);
  table.Release(alloc);
  alloc.DecRef(shared);
  EXPECT_EQ(alloc.num_free(), 8);
}

TEST(PageTableTest, AdoptSharedPrefixThenAppend) {
  PageAllocator alloc(6);
  PageTable owner(4);
  ASSERT_TRUE(owner.Append(8, alloc).ok());  // pages 0, 1
  // A second sequence shares both full pages: it takes its own reference on each.
  for (int32_t p : owner.pages()) alloc.IncRef(p);
  PageTable reader(4);
  reader.AdoptSharedPrefix(owner.pages(), 8);
  EXPECT_EQ(reader.num_tokens(), 8);
  EXPECT_EQ(reader.PagesNeededFor(1), 1);
  absl::StatusOr<std::vector<int64_t>> s = reader.Append(1, alloc);
  ASSERT_TRUE(s.ok());
  EXPECT_THAT(*s, ElementsAre(8));  // fresh page 2, never the shared ones
  EXPECT_THAT(reader.pages(), ElementsAre(0, 1, 2));
  EXPECT_EQ(alloc.ref_count(0), 2);
  reader.Release(alloc);
  EXPECT_EQ(alloc.ref_count(0), 1);
  owner.Release(alloc);
  EXPECT_EQ(alloc.num_free(), 6);
}

TEST(PageTableTest, MoveTransfersOwnership) {
  PageAllocator alloc(4);
  PageTable a(2);
  ASSERT_TRUE(a.Append(3, alloc).ok());
  PageTable b(std::move(a));
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(b.num_tokens(), 3);
  PageTable c(2);
  c = std::move(b);
  EXPECT_EQ(c.num_tokens(), 3);
  EXPECT_TRUE(b.empty());  // NOLINT(bugprone-use-after-move)
  c.Release(alloc);
  EXPECT_EQ(alloc.num_free(), 4);
}

TEST(PageTableDeathTest, MisuseDies) {
  PageAllocator alloc(4);
  PageTable table(4);
  ASSERT_TRUE(table.Append(2, alloc).ok());
  EXPECT_DEATH(table.AdoptSharedPrefix({3}, 4), "not empty");
  EXPECT_DEATH(table.Truncate(3, alloc), "Truncate\\(3\\) outside");
  EXPECT_DEATH(table.SlotOf(2), "SlotOf\\(2\\)");
  alloc.IncRef(table.pages()[0]);  // the partly filled page is now shared
  EXPECT_DEATH((void)table.Append(1, alloc), "append into shared partial page");
  alloc.DecRef(table.pages()[0]);
  PageTable other(4);
  EXPECT_DEATH(other.AdoptSharedPrefix({1}, 3), "only full pages are shared");
  EXPECT_DEATH(PageTable(0), "page_size >= 1");
  table.Release(alloc);
  EXPECT_EQ(alloc.num_free(), 4);
}

}  // namespace
}  // namespace sieve::engine
