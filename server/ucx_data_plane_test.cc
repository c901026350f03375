// The UCX data plane (kv_data_plane.h) in one process: the plane sends to its own worker
// address, which exercises the same tag matching, synchronous sends and endpoint closing that two
// daemons use. In a build without UCX, the factory's error is checked instead.
#include "server/kv_data_plane.h"

#include <chrono>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

using ::testing::HasSubstr;

#if SIEVE_TEST_HAVE_UCX

std::shared_ptr<const std::string> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  auto s = std::make_shared<std::string>(n, '\0');
  for (char& c : *s) c = static_cast<char>(rng());
  return s;
}

// A send's outcome, waited for with a bound.
struct SendResult {
  std::promise<absl::Status> promise;
  std::future<absl::Status> future = promise.get_future();
  std::function<void(absl::Status)> Done() {
    return [this](absl::Status st) { promise.set_value(std::move(st)); };
  }
  absl::Status Wait() {
    if (future.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
      return absl::DeadlineExceededError("the send never completed");
    }
    return future.get();
  }
};

absl::Status NoReason() { return absl::OkStatus(); }

TEST(UcxDataPlaneTest, ChunksArriveWholeByTransferAndPage) {
  absl::StatusOr<std::shared_ptr<KvDataPlane>> plane = SharedUcxDataPlane();
  ASSERT_TRUE(plane.ok()) << plane.status();
  KvDataPlane& p = **plane;
  EXPECT_TRUE(UcxBuiltIn());
  EXPECT_FALSE(p.address().empty());
  absl::StatusOr<uint64_t> ep = p.Open(p.address());
  ASSERT_TRUE(ep.ok()) << ep.status();
  const uint64_t a = p.NewTransfer(), b = p.NewTransfer();
  EXPECT_NE(a, b);
  // Two transfers' chunks, sent in an order that differs from the receives: each receive takes
  // the message of its own (transfer, page), bytes intact (1 MiB chunks: UCX's rendezvous path;
  // 100 bytes: its eager path).
  const auto big = RandomBytes(1 << 20, 1), small = RandomBytes(100, 2), other = RandomBytes(4096, 3);
  SendResult s1, s2, s3;
  p.Send(*ep, b, 7, other, s3.Done());
  p.Send(*ep, a, 0, big, s1.Done());
  p.Send(*ep, a, 16, small, s2.Done());
  absl::StatusOr<std::vector<uint8_t>> r1 = p.Receive(a, 0, big->size(), NoReason);
  absl::StatusOr<std::vector<uint8_t>> r2 = p.Receive(a, 16, small->size(), NoReason);
  absl::StatusOr<std::vector<uint8_t>> r3 = p.Receive(b, 7, other->size(), NoReason);
  ASSERT_TRUE(r1.ok() && r2.ok() && r3.ok()) << r1.status() << r2.status() << r3.status();
  EXPECT_EQ(std::string(r1->begin(), r1->end()), *big);
  EXPECT_EQ(std::string(r2->begin(), r2->end()), *small);
  EXPECT_EQ(std::string(r3->begin(), r3->end()), *other);
  EXPECT_TRUE(s1.Wait().ok());
  EXPECT_TRUE(s2.Wait().ok());
  EXPECT_TRUE(s3.Wait().ok());

  // A chunk of another size than announced is a DataLoss, not a short page.
  SendResult s4;
  p.Send(*ep, a, 32, RandomBytes(64, 4), s4.Done());
  absl::StatusOr<std::vector<uint8_t>> wrong = p.Receive(a, 32, 128, NoReason);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kDataLoss) << wrong.status();
  EXPECT_TRUE(s4.Wait().ok());
  p.Close(*ep, /*force=*/false);
}

TEST(UcxDataPlaneTest, AReceiveStopsWhenItsCheckSaysSo) {
  absl::StatusOr<std::shared_ptr<KvDataPlane>> plane = SharedUcxDataPlane();
  ASSERT_TRUE(plane.ok()) << plane.status();
  const uint64_t t = (*plane)->NewTransfer();
  const absl::Time start = absl::Now();
  int calls = 0;
  absl::StatusOr<std::vector<uint8_t>> r = (*plane)->Receive(t, 0, 4096, [&] {
    return ++calls < 5 ? absl::OkStatus() : absl::CancelledError("the request was cancelled");
  });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 5);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// A synchronous send nobody receives completes only when its endpoint is closed by force (a
// prefill daemon whose call ended); one of a transfer marked failed is received and dropped.
TEST(UcxDataPlaneTest, UnreceivedSendsEndByForceCloseOrByTheDropOfAFailedTransfer) {
  absl::StatusOr<std::shared_ptr<KvDataPlane>> plane = SharedUcxDataPlane();
  ASSERT_TRUE(plane.ok()) << plane.status();
  KvDataPlane& p = **plane;
  absl::StatusOr<uint64_t> ep = p.Open(p.address());
  ASSERT_TRUE(ep.ok());
  SendResult pending;
  p.Send(*ep, p.NewTransfer(), 0, RandomBytes(1 << 16, 5), pending.Done());
  EXPECT_EQ(pending.future.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout)
      << "a synchronous send completed with no receive posted";
  p.Close(*ep, /*force=*/true);
  EXPECT_FALSE(pending.Wait().ok());
  SendResult after;
  p.Send(*ep, 1, 0, RandomBytes(10, 6), after.Done());  // a closed endpoint fails at once
  EXPECT_FALSE(after.Wait().ok());

  absl::StatusOr<uint64_t> ep2 = p.Open(p.address());
  ASSERT_TRUE(ep2.ok());
  const uint64_t failed = p.NewTransfer();
  p.EndTransfer(failed, /*ok=*/false);
  SendResult dropped;
  p.Send(*ep2, failed, 3, RandomBytes(1 << 16, 7), dropped.Done());
  EXPECT_TRUE(dropped.Wait().ok()) << "the failed transfer's chunk was never taken off the wire";
  p.Close(*ep2, /*force=*/false);
}

#else  // !SIEVE_TEST_HAVE_UCX

TEST(UcxDataPlaneTest, WithoutUcxTheFactorySaysHowToGetIt) {
  EXPECT_FALSE(UcxBuiltIn());
  absl::StatusOr<std::shared_ptr<KvDataPlane>> plane = SharedUcxDataPlane();
  EXPECT_EQ(plane.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(plane.status().message(), HasSubstr("built without UCX"));
  EXPECT_THAT(plane.status().message(), HasSubstr("disaggregation.transport"));
}

#endif

}  // namespace
}  // namespace sieve::server
