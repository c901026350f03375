// KvCacheManager without a scheduler: reservation and eviction, prefix matching and offering,
// release and truncation (shared pages included), imports, side pools, and random operation
// sequences checked against a model of the pages' contents.
#include "engine/serving/kv_cache_manager.h"

#include <algorithm>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

// Returns `n` tokens start, start + 1, ...: distinct runs make distinct pages.
std::vector<int32_t> Iota(int32_t n, int32_t start) {
  std::vector<int32_t> v(n);
  for (int32_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}

// Returns `tokens` followed by `more`.
std::vector<int32_t> Concat(std::vector<int32_t> tokens, const std::vector<int32_t>& more) {
  tokens.insert(tokens.end(), more.begin(), more.end());
  return tokens;
}

KvCacheOptions Options(int32_t page_size, int32_t num_pages, bool prefix_caching = true) {
  KvCacheOptions o;
  o.page_size = page_size;
  o.num_pages = num_pages;
  o.enable_prefix_caching = prefix_caching;
  return o;
}

std::vector<int32_t> PagesOf(const KvCacheManager& kv, RequestId id) {
  const PageTable* t = kv.Find(id);
  return t == nullptr ? std::vector<int32_t>{} : std::vector<int32_t>(t->pages().begin(),
                                                                        t->pages().end());
}

// Records every allocation the manager announces.
class RecordingListener : public PageAllocationListener {
 public:
  void OnPagesAllocated(absl::Span<const int32_t> pages) override {
    calls.emplace_back(pages.begin(), pages.end());
  }
  std::vector<std::vector<int32_t>> calls;
};

TEST(KvCacheOptionsTest, ValidateNamesTheField) {
  EXPECT_TRUE(KvCacheOptions().Validate().ok());
  EXPECT_THAT(std::string(Options(0, 4).Validate().message()), HasSubstr("page_size"));
  EXPECT_THAT(std::string(Options(4, 0).Validate().message()), HasSubstr("num_pages"));
}

TEST(KvCacheManagerTest, ReserveAllocatesPagesAndFillsTheLastPageFirst) {
  KvCacheManager kv(Options(4, 8));
  const PageTable& t = kv.AddSequence(1);
  EXPECT_EQ(kv.Find(1), &t);
  EXPECT_EQ(kv.Find(2), nullptr);
  ASSERT_TRUE(kv.Reserve(1, 5).ok());
  EXPECT_EQ(t.num_tokens(), 5);
  EXPECT_THAT(t.pages(), ElementsAre(0, 1));
  EXPECT_EQ(kv.num_used(), 2);
  EXPECT_EQ(kv.num_free(), 6);
  EXPECT_EQ(kv.held_pages(), 2);
  EXPECT_EQ(kv.cached_only_pages(), 0);
  // Three slots are left in page 1: no page is needed for them.
  EXPECT_EQ(kv.TokensThatFit(1, 3), 3);
  ASSERT_TRUE(kv.Reserve(1, 3).ok());
  EXPECT_EQ(kv.num_used(), 2);
  EXPECT_EQ(kv.TokensThatFit(1, 0), 0);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerTest, ReserveIsAllOrNothingAndTokensThatFitSaysHowMuchFits) {
  KvCacheManager kv(Options(4, 4));
  kv.AddSequence(1);
  kv.AddSequence(2);
  ASSERT_TRUE(kv.Reserve(1, 10).ok());  // 3 pages, 2 slots left in the last
  EXPECT_EQ(kv.TokensThatFit(1, 100), 2 + 4);
  EXPECT_EQ(kv.TokensThatFit(2, 9), 4);
  const absl::Status st = kv.Reserve(2, 9);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(kv.Find(2)->empty());
  EXPECT_EQ(kv.num_used(), 3);
  ASSERT_TRUE(kv.Reserve(2, 4).ok());
  EXPECT_EQ(kv.TokensThatFit(2, 1), 0);
  EXPECT_EQ(kv.TokensThatFit(1, 5), 2);
  EXPECT_EQ(kv.Reserve(2, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerTest, OfferCachesNewFullPagesOnceAndMatchSharesThem) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> prompt = Iota(10, 100);
  kv.AddSequence(1);
  EXPECT_EQ(kv.MatchPrefix(1, prompt), 0);
  ASSERT_TRUE(kv.Reserve(1, 10).ok());
  EXPECT_EQ(kv.Offer(1, absl::MakeConstSpan(prompt).first(7)), 1);
  EXPECT_EQ(kv.Offer(1, absl::MakeConstSpan(prompt).first(7)), 0);
  EXPECT_EQ(kv.Offer(1, prompt), 1);  // page 1 is full now; page 2 is partial
  EXPECT_EQ(kv.prefix_cache().stats().cached_pages, 2);

  // Another sequence with the same first 8 tokens adopts both pages.
  kv.AddSequence(2);
  EXPECT_EQ(kv.MatchPrefix(2, Concat(Iota(8, 100), {7, 7, 7})), 8);
  EXPECT_THAT(PagesOf(kv, 2), ElementsAreArray(absl::MakeConstSpan(PagesOf(kv, 1)).first(2)));
  EXPECT_EQ(kv.Find(2)->num_tokens(), 8);
  EXPECT_EQ(kv.allocator().ref_count(PagesOf(kv, 1)[0]), 3);  // two tables + the cache
  EXPECT_EQ(kv.held_pages(), 3);                               // shared pages count once
  // The adopted pages count as offered: offering them again caches nothing.
  ASSERT_TRUE(kv.Reserve(2, 3).ok());
  EXPECT_EQ(kv.Offer(2, Concat(Iota(8, 100), {7, 7, 7})), 0);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerTest, MatchLeavesOneTokenToCompute) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> prompt = Iota(8, 0);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 8).ok());
  EXPECT_EQ(kv.Offer(1, prompt), 2);
  kv.AddSequence(2);
  EXPECT_EQ(kv.MatchPrefix(2, prompt), 4);  // a prompt of exactly two pages gets one
  kv.AddSequence(3);
  EXPECT_EQ(kv.MatchPrefix(3, Concat(prompt, {9})), 8);
  EXPECT_EQ(kv.prefix_cache().stats().hit_tokens, 12);
}

TEST(KvCacheManagerTest, PrefixCachingOffMatchesAndOffersNothing) {
  KvCacheManager kv(Options(4, 16, /*prefix_caching=*/false));
  const std::vector<int32_t> prompt = Iota(9, 0);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 9).ok());
  EXPECT_EQ(kv.Offer(1, prompt), 0);
  kv.Release(1, prompt);
  EXPECT_EQ(kv.num_used(), 0);
  EXPECT_EQ(kv.MatchPrefix(1, prompt), 0);
  EXPECT_EQ(kv.prefix_cache().stats().lookups, 0);
  EXPECT_EQ(kv.BeginImport(Iota(8, 0)).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(KvCacheManagerTest, ReleaseKeepsTheComputedFullPagesCached) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> tokens = Iota(10, 50);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 10).ok());
  const std::vector<int32_t> pages = PagesOf(kv, 1);
  kv.Release(1, tokens);  // e.g. a preemption: nothing was offered yet
  EXPECT_TRUE(kv.Find(1)->empty());
  EXPECT_EQ(kv.num_sequences(), 1);
  EXPECT_EQ(kv.held_pages(), 0);
  EXPECT_EQ(kv.cached_only_pages(), 2);  // the partial third page is free again
  EXPECT_TRUE(kv.prefix_cache().IsCached(pages[0]));
  EXPECT_TRUE(kv.prefix_cache().IsCached(pages[1]));
  EXPECT_EQ(kv.allocator().ref_count(pages[2]), 0);
  // The same sequence, re-admitted, finds its pages again.
  EXPECT_EQ(kv.MatchPrefix(1, tokens), 8);
  EXPECT_THAT(PagesOf(kv, 1), ElementsAre(pages[0], pages[1]));
  kv.Release(1);  // nothing to offer: the adopted pages go back to cached-only
  EXPECT_EQ(kv.cached_only_pages(), 2);
  kv.RemoveSequence(1);
  kv.RemoveSequence(1);  // unknown ids are ignored
  kv.Release(77);
  EXPECT_EQ(kv.num_sequences(), 0);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerTest, EvictsCachedPagesLeastRecentlyUsedFirst) {
  KvCacheManager kv(Options(2, 4));
  const std::vector<int32_t> a = Iota(4, 10), b = Iota(4, 20);
  for (const auto& [id, tokens] : {std::pair{RequestId{1}, a}, std::pair{RequestId{2}, b}}) {
    kv.AddSequence(id);
    ASSERT_TRUE(kv.Reserve(id, 4).ok());
    kv.Release(id, tokens);
    kv.RemoveSequence(id);
  }
  EXPECT_EQ(kv.cached_only_pages(), 4);
  EXPECT_EQ(kv.num_free(), 0);
  // Touch a's pages: b's become the least recently used.
  kv.AddSequence(3);
  EXPECT_EQ(kv.MatchPrefix(3, Concat(a, {0})), 4);
  kv.RemoveSequence(3);
  kv.AddSequence(4);
  EXPECT_EQ(kv.TokensThatFit(4, 4), 4);  // evicts b's two pages
  ASSERT_TRUE(kv.Reserve(4, 4).ok());
  EXPECT_EQ(kv.prefix_cache().stats().evictions, 2);
  kv.AddSequence(5);
  EXPECT_EQ(kv.MatchPrefix(5, Concat(b, {0})), 0);
  kv.RemoveSequence(5);
  kv.AddSequence(6);
  EXPECT_EQ(kv.MatchPrefix(6, Concat(a, {0})), 4);
  // Pages a table holds are never evicted: nothing more fits.
  kv.AddSequence(7);
  EXPECT_EQ(kv.TokensThatFit(7, 1), 0);
  EXPECT_EQ(kv.Reserve(7, 1).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerTest, TruncateDropsPagesPastTheLengthAndSharedPartialPages) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> tokens = Iota(8, 0);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 11).ok());
  EXPECT_EQ(kv.Truncate(1, 9), 9);  // unshared: keeps a partial page
  EXPECT_EQ(PagesOf(kv, 1).size(), 3u);
  EXPECT_EQ(kv.Truncate(1, 8), 8);
  EXPECT_EQ(PagesOf(kv, 1).size(), 2u);
  EXPECT_EQ(kv.Offer(1, tokens), 2);
  const std::vector<int32_t> cached = PagesOf(kv, 1);

  // The page that would keep a partial fill is cached (shared): it is dropped and the length
  // rounds down, so a later append never writes into it.
  EXPECT_EQ(kv.Truncate(1, 6), 4);
  EXPECT_THAT(PagesOf(kv, 1), ElementsAre(cached[0]));
  ASSERT_TRUE(kv.Reserve(1, 2).ok());
  EXPECT_NE(PagesOf(kv, 1)[1], cached[1]);
  EXPECT_EQ(kv.allocator().ref_count(cached[1]), 1);  // only the cache holds it now
  // The offered count follows the truncation: the new full page can be offered later (it is a
  // different page for the same tokens, so the cache keeps its canonical one).
  ASSERT_TRUE(kv.Reserve(1, 2).ok());
  EXPECT_EQ(kv.Offer(1, tokens), 0);

  // A sequence that adopted shared pages: truncating into them keeps none of the shared page.
  kv.AddSequence(2);
  EXPECT_EQ(kv.MatchPrefix(2, Concat(tokens, {1})), 8);
  EXPECT_EQ(kv.Truncate(2, 7), 4);
  EXPECT_EQ(kv.Truncate(2, 0), 0);
  EXPECT_TRUE(kv.Find(2)->empty());
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerTest, ClearPrefixCacheFreesOnlyCachedOnlyPages) {
  KvCacheManager kv(Options(4, 16));
  kv.AddSequence(1);
  kv.AddSequence(2);
  ASSERT_TRUE(kv.Reserve(1, 8).ok());
  ASSERT_TRUE(kv.Reserve(2, 8).ok());
  EXPECT_EQ(kv.Offer(1, Iota(8, 0)), 2);
  EXPECT_EQ(kv.Offer(2, Iota(8, 100)), 2);
  kv.Release(2);
  EXPECT_EQ(kv.cached_only_pages(), 2);
  EXPECT_EQ(kv.ClearPrefixCache(), 2);
  EXPECT_EQ(kv.num_used(), 2);  // sequence 1 keeps its pages
  EXPECT_EQ(kv.prefix_cache().stats().cached_pages, 0);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerExportTest, ExportsHoldCachedPagesAgainstEviction) {
  KvCacheManager kv(Options(4, 4));
  const std::vector<int32_t> prompt = Iota(10, 300);
  EXPECT_EQ(kv.BeginExport(prompt).status().code(), absl::StatusCode::kNotFound);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 10).ok());
  kv.Release(1, prompt);  // pages 0 and 1 (8 tokens) stay cached; the partial one is freed
  kv.RemoveSequence(1);
  EXPECT_EQ(kv.cached_only_pages(), 2);
  absl::StatusOr<KvExport> exp = kv.BeginExport(prompt);
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->num_tokens, 8);
  EXPECT_EQ(exp->pages.size(), 2u);
  EXPECT_EQ(kv.num_exports(), 1);
  EXPECT_EQ(kv.held_pages(), 2);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
  // A sequence that wants the whole pool cannot evict the exported pages.
  kv.AddSequence(2);
  EXPECT_EQ(kv.Reserve(2, 16).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(kv.Reserve(2, 8).ok());
  kv.RemoveSequence(2);
  ASSERT_TRUE(kv.EndExport(exp->id).ok());
  EXPECT_EQ(kv.EndExport(exp->id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(kv.held_pages(), 0);
  EXPECT_EQ(kv.cached_only_pages(), 2);  // still cached, now evictable
  kv.AddSequence(3);
  EXPECT_TRUE(kv.Reserve(3, 16).ok());
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerImportTest, ImportedPagesServeALaterMatch) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> prompt = Iota(13, 500);
  absl::StatusOr<KvImport> imp = kv.BeginImport(absl::MakeConstSpan(prompt).first(12));
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_EQ(imp->num_tokens, 12);
  EXPECT_EQ(imp->cached_tokens, 0);
  EXPECT_EQ(imp->pages_to_fill.size(), 3u);
  EXPECT_EQ(kv.num_imports(), 1);
  EXPECT_EQ(kv.held_pages(), 3);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
  // Not cached before the transfer lands: nobody may read pages that hold no KV yet.
  kv.AddSequence(1);
  EXPECT_EQ(kv.MatchPrefix(1, prompt), 0);
  kv.Release(1);

  ASSERT_TRUE(kv.CommitImport(imp->id).ok());
  EXPECT_EQ(kv.num_imports(), 0);
  EXPECT_EQ(kv.held_pages(), 0);
  EXPECT_EQ(kv.cached_only_pages(), 3);
  EXPECT_EQ(kv.MatchPrefix(1, prompt), 12);
  EXPECT_THAT(PagesOf(kv, 1), ElementsAreArray(imp->pages_to_fill));
  // The import itself is no lookup: only the sequences' two Match calls count.
  EXPECT_EQ(kv.prefix_cache().stats().lookups, 2);
  EXPECT_EQ(kv.prefix_cache().stats().hit_tokens, 12);
  EXPECT_EQ(kv.CommitImport(imp->id).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerImportTest, ImportUsesTheChainedHashesOfALocalComputation) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> prompt = Iota(8, 40);
  absl::StatusOr<KvImport> imp = kv.BeginImport(prompt);
  ASSERT_TRUE(imp.ok());
  ASSERT_TRUE(kv.CommitImport(imp->id).ok());
  // A sequence that computes the same tokens itself names its pages alike, so the cache already
  // knows them and keeps the imported ones.
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 8).ok());
  EXPECT_EQ(kv.Offer(1, prompt), 0);
  EXPECT_EQ(kv.prefix_cache().stats().cached_pages, 2);
  for (const int32_t p : imp->pages_to_fill) EXPECT_TRUE(kv.prefix_cache().IsCached(p));
}

TEST(KvCacheManagerImportTest, LeadingCachedPagesAreReusedAndHeld) {
  KvCacheManager kv(Options(4, 5));
  const std::vector<int32_t> prompt = Iota(12, 0);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 4).ok());
  kv.Release(1, absl::MakeConstSpan(prompt).first(4));
  ASSERT_TRUE(kv.prefix_cache().IsCached(0));
  absl::StatusOr<KvImport> imp = kv.BeginImport(prompt);
  ASSERT_TRUE(imp.ok());
  EXPECT_EQ(imp->cached_tokens, 4);
  EXPECT_EQ(imp->pages_to_fill.size(), 2u);
  EXPECT_EQ(kv.allocator().ref_count(0), 2);  // held by the import: not evictable meanwhile
  ASSERT_TRUE(kv.CommitImport(imp->id).ok());
  EXPECT_EQ(kv.MatchPrefix(1, Concat(prompt, {1})), 12);
  EXPECT_THAT(PagesOf(kv, 1),
              ElementsAre(0, imp->pages_to_fill[0], imp->pages_to_fill[1]));
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerImportTest, AbortGivesThePagesBack) {
  KvCacheManager kv(Options(4, 8));
  const std::vector<int32_t> prompt = Iota(8, 0);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 4).ok());
  EXPECT_EQ(kv.Offer(1, absl::MakeConstSpan(prompt).first(4)), 1);
  kv.RemoveSequence(1);
  absl::StatusOr<KvImport> imp = kv.BeginImport(prompt);
  ASSERT_TRUE(imp.ok());
  EXPECT_EQ(kv.num_used(), 2);
  ASSERT_TRUE(kv.AbortImport(imp->id).ok());
  EXPECT_EQ(kv.num_used(), 1);  // the leading cached page stays cached
  EXPECT_EQ(kv.cached_only_pages(), 1);
  EXPECT_EQ(kv.AbortImport(imp->id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(kv.CommitImport(imp->id).code(), absl::StatusCode::kNotFound);
  kv.AddSequence(2);
  EXPECT_EQ(kv.MatchPrefix(2, Concat(prompt, {0})), 4);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerImportTest, RejectsPartialPagesAndHoldsNothingWhenShort) {
  KvCacheManager kv(Options(4, 3));
  EXPECT_EQ(kv.BeginImport({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.BeginImport(Iota(6, 0)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.BeginImport(Iota(16, 0)).status().code(), absl::StatusCode::kResourceExhausted);
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 8).ok());
  EXPECT_EQ(kv.Offer(1, Iota(8, 0)), 2);
  // Two pages needed, one free and none evictable (the sequence holds its cached pages).
  EXPECT_EQ(kv.BeginImport(Iota(8, 100)).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(kv.num_imports(), 0);
  EXPECT_EQ(kv.num_used(), 2);
  // Once the sequence lets go, its cached pages are evicted for the import.
  kv.RemoveSequence(1);
  absl::StatusOr<KvImport> imp = kv.BeginImport(Iota(8, 100));
  ASSERT_TRUE(imp.ok()) << imp.status();
  EXPECT_GE(kv.prefix_cache().stats().evictions, 1);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerImportTest, APrefixCachedLocallyMeanwhileIsNotCachedTwice) {
  KvCacheManager kv(Options(4, 16));
  const std::vector<int32_t> prompt = Iota(8, 7);
  absl::StatusOr<KvImport> imp = kv.BeginImport(prompt);
  ASSERT_TRUE(imp.ok());
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 8).ok());
  EXPECT_EQ(kv.Offer(1, prompt), 2);
  ASSERT_TRUE(kv.CommitImport(imp->id).ok());
  EXPECT_EQ(kv.prefix_cache().stats().cached_pages, 2);
  for (const int32_t p : imp->pages_to_fill) EXPECT_EQ(kv.allocator().ref_count(p), 0);
  EXPECT_EQ(kv.num_used(), 2);
  EXPECT_TRUE(kv.CheckInvariants().ok()) << kv.CheckInvariants();
}

TEST(KvCacheManagerSidePoolTest, RegistrationsAddUpPerPage) {
  KvCacheManager kv(Options(4, 8));
  EXPECT_EQ(kv.side_pool_bytes_per_page(), 0);
  // Quest: min and max keys (2 x 8 heads x 128 dims x 2 bytes) per page, 30 of 32 layers.
  ASSERT_TRUE(kv.RegisterSidePool({"quest_minmax", 2 * 8 * 128 * 2, 30}, nullptr).ok());
  ASSERT_TRUE(kv.RegisterSidePool({"ds_labels", 4 * 16 * 2, 32}, nullptr).ok());
  EXPECT_EQ(kv.side_pool_bytes_per_page(), 4096 * 30 + 128 * 32);
  ASSERT_EQ(kv.side_pools().size(), 2u);
  EXPECT_EQ(kv.side_pools()[1].name, "ds_labels");
  EXPECT_EQ(kv.RegisterSidePool({"quest_minmax", 1, 1}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.RegisterSidePool({"", 1, 1}, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.RegisterSidePool({"x", 0, 1}, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kv.RegisterSidePool({"x", 1, 0}, nullptr).code(), absl::StatusCode::kInvalidArgument);
  // Once a page is in use, a new pool could not have seen it allocated.
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 1).ok());
  EXPECT_EQ(kv.RegisterSidePool({"late", 1, 1}, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(kv.side_pools().size(), 2u);
}

TEST(KvCacheManagerSidePoolTest, ListenersHearOfEveryFreshOrRecycledPage) {
  KvCacheManager kv(Options(2, 3));
  RecordingListener a, b;
  ASSERT_TRUE(kv.RegisterSidePool({"a", 8, 1}, &a).ok());
  ASSERT_TRUE(kv.RegisterSidePool({"b", 8, 1}, &b).ok());
  kv.AddSequence(1);
  ASSERT_TRUE(kv.Reserve(1, 3).ok());
  ASSERT_TRUE(kv.Reserve(1, 1).ok());  // room in page 1: nothing allocated
  EXPECT_THAT(a.calls, ElementsAre(ElementsAre(0, 1)));
  EXPECT_EQ(b.calls, a.calls);
  EXPECT_EQ(kv.Reserve(1, 5).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a.calls.size(), 1u);  // a failed reservation allocates nothing

  // Page 0 and 1 become cached-only; a new sequence recycles them through eviction.
  kv.Release(1, Iota(4, 0));
  kv.AddSequence(2);
  ASSERT_TRUE(kv.Reserve(2, 6).ok());
  ASSERT_EQ(a.calls.size(), 2u);
  EXPECT_THAT(a.calls[1], ElementsAreArray(PagesOf(kv, 2)));
  EXPECT_THAT(a.calls[1], UnorderedElementsAre(0, 1, 2));
  kv.RemoveSequence(2);

  // Imports announce the pages to fill (not the cached ones they reuse).
  kv.AddSequence(3);
  ASSERT_TRUE(kv.Reserve(3, 2).ok());
  kv.Release(3, Iota(2, 50));
  absl::StatusOr<KvImport> imp = kv.BeginImport(Iota(4, 50));
  ASSERT_TRUE(imp.ok());
  EXPECT_THAT(a.calls.back(), ElementsAreArray(imp->pages_to_fill));
  EXPECT_EQ(imp->pages_to_fill.size(), 1u);
  EXPECT_EQ(b.calls, a.calls);
}

// Random operations against a model of what each page holds: the test "writes" each reserved
// token's id into its slot, the side-pool listener poisons announced pages, and every prefix-cache
// hit must then read back exactly the prompt's tokens. A page recycled while still cached, a hit
// on the wrong page, or an announcement of a page in use would all show up as a wrong read.
class ContentModel : public PageAllocationListener {
 public:
  ContentModel(int32_t page_size, int32_t num_pages)
      : page_size_(page_size), slots_(static_cast<size_t>(page_size) * num_pages, -1) {}

  void OnPagesAllocated(absl::Span<const int32_t> pages) override {
    last.assign(pages.begin(), pages.end());
    for (const int32_t p : pages) {
      std::fill_n(slots_.begin() + static_cast<size_t>(p) * page_size_, page_size_, kPoison);
    }
  }
  // Writes tokens[from, to) of a table's sequence into their slots.
  void Write(const PageTable& t, absl::Span<const int32_t> tokens, int32_t from, int32_t to) {
    for (int32_t i = from; i < to; ++i) slots_[t.SlotOf(i)] = tokens[i];
  }
  // Returns true when the table's first `n` slots hold tokens[0, n).
  bool Holds(const PageTable& t, absl::Span<const int32_t> tokens, int32_t n) const {
    for (int32_t i = 0; i < n; ++i) {
      if (slots_[t.SlotOf(i)] != tokens[i]) return false;
    }
    return true;
  }
  void WritePage(int32_t page, absl::Span<const int32_t> tokens) {
    std::copy(tokens.begin(), tokens.end(),
              slots_.begin() + static_cast<size_t>(page) * page_size_);
  }

  static constexpr int32_t kPoison = -2;
  std::vector<int32_t> last;  // the pages of the latest announcement

 private:
  int32_t page_size_;
  std::vector<int32_t> slots_;  // [num_pages * page_size] token id written in each slot
};

TEST(KvCacheManagerStressTest, RandomOperationsKeepThePageInvariantAndTheContents) {
  int64_t hits = 0, evictions = 0, imports = 0;
  for (uint32_t seed = 1; seed <= 30; ++seed) {
    std::mt19937 rng(seed);
    auto uniform = [&rng](int lo, int hi) {
      return std::uniform_int_distribution<int>(lo, hi)(rng);
    };
    const int32_t ps = uniform(1, 5);
    const int32_t num_pages = uniform(6, 40);
    KvCacheManager kv(Options(ps, num_pages));
    ContentModel model(ps, num_pages);
    ASSERT_TRUE(kv.RegisterSidePool({"model", 1, 1}, &model).ok());
    // A few prompt families share prefixes, so matches happen.
    auto make_tokens = [&](int32_t len) {
      const int32_t family = uniform(0, 3), shared = uniform(0, len);
      std::vector<int32_t> t(len);
      for (int32_t i = 0; i < len; ++i) t[i] = i < shared ? family * 1000 + i : uniform(0, 9);
      return t;
    };
    std::map<RequestId, std::vector<int32_t>> seqs;         // id -> tokens (all it may hold)
    std::map<int64_t, KvImport> open_imports;               // id -> import in progress
    std::map<int64_t, std::vector<int32_t>> import_tokens;  // id -> its tokens
    RequestId next_id = 1;
    for (int op = 0; op < 400; ++op) {
      const int kind = uniform(0, 9);
      if (kind == 0 || seqs.empty()) {  // a new sequence, matched against the cache
        const RequestId id = next_id++;
        seqs[id] = make_tokens(uniform(1, 3 * ps * 3));
        const PageTable& t = kv.AddSequence(id);
        const int32_t hit = kv.MatchPrefix(id, seqs[id]);
        ASSERT_EQ(hit % ps, 0);
        ASSERT_LT(hit, static_cast<int32_t>(seqs[id].size()));
        ASSERT_EQ(t.num_tokens(), hit);
        ASSERT_TRUE(model.Holds(t, seqs[id], hit)) << "seed " << seed << " op " << op;
        hits += hit;
        continue;
      }
      auto it = seqs.begin();
      std::advance(it, uniform(0, static_cast<int>(seqs.size()) - 1));
      const RequestId id = it->first;
      const std::vector<int32_t>& tokens = it->second;
      const PageTable& t = *kv.Find(id);
      const int32_t len = t.num_tokens();
      const absl::Span<const int32_t> held = absl::MakeConstSpan(tokens).first(len);
      if (kind <= 4) {  // reserve a chunk and "compute" it
        const int32_t want = uniform(0, static_cast<int32_t>(tokens.size()) - len);
        const int32_t fit = kv.TokensThatFit(id, want);
        ASSERT_LE(fit, want);
        const size_t pages_before = t.pages().size();
        model.last.clear();
        if (fit < want) {
          ASSERT_EQ(kv.Reserve(id, want).code(), absl::StatusCode::kResourceExhausted);
          ASSERT_EQ(t.num_tokens(), len);
        }
        ASSERT_TRUE(kv.Reserve(id, fit).ok());
        ASSERT_THAT(model.last,
                    ElementsAreArray(t.pages().subspan(pages_before)));  // exactly the new pages
        model.Write(t, tokens, len, len + fit);
        if (uniform(0, 1) == 0) kv.Offer(id, absl::MakeConstSpan(tokens).first(len + fit));
      } else if (kind == 5) {  // preempt or finish: release, keeping the full pages cached
        kv.Release(id, uniform(0, 1) == 0 ? held : absl::Span<const int32_t>());
        if (uniform(0, 1) == 0) {
          kv.RemoveSequence(id);
          seqs.erase(id);
        } else {
          const int32_t hit = kv.MatchPrefix(id, tokens);
          ASSERT_TRUE(model.Holds(t, tokens, hit));
        }
      } else if (kind == 6) {  // roll back
        const int32_t kept = kv.Truncate(id, uniform(0, len));
        ASSERT_EQ(t.num_tokens(), kept);
        ASSERT_TRUE(model.Holds(t, tokens, kept));
      } else if (kind == 7) {  // an import starts, and the transfer writes its pages
        std::vector<int32_t> imp_tokens = make_tokens(ps * uniform(1, 3));
        absl::StatusOr<KvImport> imp = kv.BeginImport(imp_tokens);
        if (!imp.ok()) {
          ASSERT_EQ(imp.status().code(), absl::StatusCode::kResourceExhausted);
          continue;
        }
        ASSERT_EQ(imp->cached_tokens + ps * static_cast<int32_t>(imp->pages_to_fill.size()),
                  imp->num_tokens);
        for (size_t i = 0; i < imp->pages_to_fill.size(); ++i) {
          model.WritePage(imp->pages_to_fill[i],
                          absl::MakeConstSpan(imp_tokens).subspan(imp->cached_tokens + i * ps, ps));
        }
        import_tokens[imp->id] = std::move(imp_tokens);
        open_imports[imp->id] = *std::move(imp);
      } else if (kind == 8 && !open_imports.empty()) {  // the transfer ends
        const auto first = open_imports.begin();
        const absl::Status st =
            uniform(0, 2) == 0 ? kv.AbortImport(first->first) : kv.CommitImport(first->first);
        ASSERT_TRUE(st.ok()) << st;
        open_imports.erase(first);
        ++imports;
      } else if (kind == 9 && uniform(0, 5) == 0) {
        kv.ClearPrefixCache();
      }
      const absl::Status inv = kv.CheckInvariants();
      ASSERT_TRUE(inv.ok()) << "seed " << seed << " op " << op << ": " << inv;
      // The counters agree with the tables the test can see.
      std::set<int32_t> listed;
      for (const auto& [sid, unused] : seqs) {
        for (const int32_t p : kv.Find(sid)->pages()) listed.insert(p);
      }
      int32_t import_pages = 0;
      for (const auto& [iid, imp] : open_imports) import_pages += imp.num_tokens / ps;
      ASSERT_LE(static_cast<int32_t>(listed.size()), kv.held_pages());
      ASSERT_LE(kv.held_pages(), static_cast<int32_t>(listed.size()) + import_pages);
      ASSERT_EQ(kv.num_used() + kv.num_free(), num_pages);
      ASSERT_EQ(kv.cached_only_pages(), kv.num_used() - kv.held_pages());
      ASSERT_EQ(kv.num_sequences(), static_cast<int32_t>(seqs.size()));
    }
    evictions += kv.prefix_cache().stats().evictions;
    for (const auto& [iid, imp] : open_imports) ASSERT_TRUE(kv.AbortImport(iid).ok());
    for (const auto& [id, tokens] : seqs) kv.RemoveSequence(id);
    EXPECT_EQ(kv.held_pages(), 0);
    EXPECT_EQ(kv.num_used(), kv.prefix_cache().stats().cached_pages);
    EXPECT_TRUE(kv.CheckInvariants().ok());
  }
  // The workload must exercise what it claims to.
  EXPECT_GT(hits, 0);
  EXPECT_GT(evictions, 0);
  EXPECT_GT(imports, 0);
  std::cout << "hit tokens " << hits << ", evictions " << evictions << ", imports ended "
            << imports << "\n";
}

}  // namespace
}  // namespace sieve::engine
