#include "engine/model/kv_budget.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

TEST(KvPagesForMemoryTest, TakesTheFractionOfTheFreeMemoryInWholePages) {
  EXPECT_EQ(*KvPagesForMemory(1000, 1.0, 100, 0), 10);
  EXPECT_EQ(*KvPagesForMemory(1000, 0.5, 100, 0), 5);
  EXPECT_EQ(*KvPagesForMemory(1099, 1.0, 100, 0), 10);  // whole pages only
  EXPECT_EQ(*KvPagesForMemory(int64_t{80} << 30, 0.9, int64_t{1} << 20, 0), 73728);
}

TEST(KvPagesForMemoryTest, CapsAtMaxPagesAndTheGlobalLimit) {
  EXPECT_EQ(*KvPagesForMemory(1000, 1.0, 100, 4), 4);
  EXPECT_EQ(*KvPagesForMemory(1000, 1.0, 100, 40), 10);
  EXPECT_EQ(*KvPagesForMemory(int64_t{1} << 50, 1.0, 16, 0), kMaxKvPages);
}

TEST(KvPagesForMemoryTest, FailsWhenNoPageFits) {
  absl::StatusOr<int32_t> none = KvPagesForMemory(99, 1.0, 100, 0);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("kv_cache.num_pages"));
  EXPECT_EQ(KvPagesForMemory(-5, 1.0, 100, 0).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(KvPagesForMemory(1000, 0.0, 100, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvPagesForMemory(1000, 1.5, 100, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvPagesForMemory(1000, 1.0, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CheckKvPagesFitMemoryTest, RefusesAPoolBeyondTheAvailableMemoryNamingTheKey) {
  constexpr int64_t kPage = 65536;
  EXPECT_TRUE(CheckKvPagesFitMemory(100, kPage, 100 * kPage, "cpu").ok());  // exactly fits
  const absl::Status s = CheckKvPagesFitMemory(101, kPage, 100 * kPage, "cpu");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("kv_cache.num_pages 101 needs"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("at most 100"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("cpu backend"), absl::string_view::npos) << s;
  // The cases: 16777216 pages of 64 KiB (1 TiB) on a host with 8 GiB available; a
  // product beyond int64 does not wrap around to "fits".
  EXPECT_FALSE(CheckKvPagesFitMemory(16777216, kPage, int64_t{8} << 30, "cpu").ok());
  EXPECT_FALSE(CheckKvPagesFitMemory(int64_t{1} << 40, int64_t{1} << 40, int64_t{1} << 62, "cuda")
                   .ok());
  // Nothing configured: nothing to check.
  EXPECT_TRUE(CheckKvPagesFitMemory(0, kPage, 0, "cpu").ok());
}

TEST(HostAvailableMemoryBytesTest, ReportsSomeMemory) {
  absl::StatusOr<int64_t> bytes = HostAvailableMemoryBytes();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_GT(*bytes, 0);
}

}  // namespace
}  // namespace sieve::engine
