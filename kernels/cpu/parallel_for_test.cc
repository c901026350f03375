// ParallelFor and its pool: every index once, nested calls, many callers at once, and calls that
// come back to back (spinning pool threads) or far apart (sleeping ones), with spinning on and off.
#include "kernels/cpu/parallel_for.h"

#include <unistd.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace sieve::kernels {
namespace {

class ParallelForTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { parallel_for_internal::SetSpinMicrosForTesting(GetParam()); }
  void TearDown() override { parallel_for_internal::SetSpinMicrosForTesting(100); }
};

// Runs ParallelFor over n and checks each index was visited exactly once and the ranges were
// contiguous and disjoint.
void ExpectEveryIndexOnce(int64_t n, int threads, int64_t min_per_thread) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  std::atomic<int64_t> calls{0};
  ParallelFor(n, threads, min_per_thread, [&](int64_t b, int64_t e) {
    ASSERT_LE(0, b);
    ASSERT_LT(b, e);
    ASSERT_LE(e, n);
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
    calls.fetch_add(1);
  });
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << "index " << i;
  EXPECT_LE(calls.load(), std::max(1, threads));
}

TEST_P(ParallelForTest, VisitsEveryIndexOnce) {
  for (int64_t n : {1, 2, 3, 7, 64, 1000, 4097}) {
    for (int threads : {1, 2, 3, 8, 33}) {
      ExpectEveryIndexOnce(n, threads, 1);
      ExpectEveryIndexOnce(n, threads, 100);
    }
  }
}

TEST_P(ParallelForTest, BackToBackAndSpacedCallsAllComplete) {
  // Back to back: pool threads are still spinning from the previous call when the next one is
  // posted; spaced: they have gone to sleep and must be woken.
  int64_t total = 0;
  for (int call = 0; call < 2000; ++call) {
    std::atomic<int64_t> sum{0};
    ParallelFor(256, 4, 1, [&](int64_t b, int64_t e) {
      int64_t s = 0;
      for (int64_t i = b; i < e; ++i) s += i;
      sum.fetch_add(s);
    });
    ASSERT_EQ(sum.load(), 255 * 256 / 2);
    total += sum.load();
    if (call % 500 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(total, int64_t{2000} * (255 * 256 / 2));
}

TEST_P(ParallelForTest, NestedCallsComplete) {
  std::atomic<int64_t> inner{0};
  ParallelFor(8, 4, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      ParallelFor(100, 4, 1, [&](int64_t ib, int64_t ie) { inner.fetch_add(ie - ib); });
    }
  });
  EXPECT_EQ(inner.load(), 800);
}

TEST_P(ParallelForTest, ManyCallersAtOnce) {
  constexpr int kCallers = 8;
  std::vector<int64_t> sums(kCallers, 0);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&sums, c] {
      for (int rep = 0; rep < 200; ++rep) {
        std::atomic<int64_t> s{0};
        ParallelFor(1000 + c, 3, 1, [&](int64_t b, int64_t e) { s.fetch_add(e - b); });
        sums[c] += s.load();
      }
    });
  }
  for (auto& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) EXPECT_EQ(sums[c], int64_t{200} * (1000 + c)) << "caller " << c;
}

TEST_P(ParallelForTest, CompletesInAForkedChild) {
  // Start the pool's threads, then fork: the child has none of them and must still finish.
  ExpectEveryIndexOnce(1000, 4, 1);
  // Past the spin time, so that no pool thread holds the pool's lock when the process forks.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::atomic<int64_t> n{0};
    ParallelFor(1000, 4, 1, [&](int64_t b, int64_t e) { n.fetch_add(e - b); });
    _exit(n.load() == 1000 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

INSTANTIATE_TEST_SUITE_P(Spin, ParallelForTest, ::testing::Values(int64_t{0}, int64_t{100}),
                         [](const auto& info) { return info.param == 0 ? "Sleep" : "Spin100us"; });

}  // namespace
}  // namespace sieve::kernels
