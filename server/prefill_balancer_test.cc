#include "server/prefill_balancer.h"

#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::server {
namespace {

using ::testing::ElementsAre;

const absl::Time kT0 = absl::FromUnixSeconds(1000000);

int AllReady(const std::string&) { return 0; }

std::map<std::string, PrefillBalancer::PeerLoad> ByPeer(const PrefillBalancer& b, absl::Time t) {
  std::map<std::string, PrefillBalancer::PeerLoad> out;
  for (const auto& l : b.Loads(t)) out[l.peer] = l;
  return out;
}

TEST(PrefillBalancerTest, NoPeerNoPick) {
  PrefillBalancer b;
  EXPECT_FALSE(b.Pick(10, AllReady, kT0).has_value());
}

TEST(PrefillBalancerTest, IdlePeersAreTakenRoundRobin) {
  PrefillBalancer b;
  b.SetPeers({"a", "b", "c"});
  std::vector<std::string> picked;
  for (int i = 0; i < 6; ++i) {
    const std::optional<std::string> p = b.Pick(100, AllReady, kT0);
    ASSERT_TRUE(p.has_value());
    picked.push_back(*p);
    b.End(*p, 100, /*reported_waiting_tokens=*/0, /*peer_fault=*/false, kT0);
  }
  EXPECT_THAT(picked, ElementsAre("a", "b", "c", "a", "b", "c"));
}

TEST(PrefillBalancerTest, InFlightTokensSteerPicksToTheLeastLoaded) {
  PrefillBalancer b;
  b.SetPeers({"a", "b"});
  // A long prompt goes to a; short ones go to b while b carries less than a (0, 300, 600 and
  // 900 < 1000 tokens), then to a (1200 > 1000).
  EXPECT_EQ(b.Pick(1000, AllReady, kT0), "a");
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b.Pick(300, AllReady, kT0), "b") << i;
  EXPECT_EQ(b.Pick(300, AllReady, kT0), "a");
  // When a's prompt ends, a carries 300 and b 1200: a again.
  b.End("a", 1000, std::nullopt, false, kT0);
  EXPECT_EQ(b.Pick(300, AllReady, kT0), "a");
  // Equal loads (600 each after b ends two) are a tie: round-robin from after the last pick.
  b.End("b", 300, std::nullopt, false, kT0);
  b.End("b", 300, std::nullopt, false, kT0);
  EXPECT_EQ(ByPeer(b, kT0)["a"].estimate, 600);
  EXPECT_EQ(ByPeer(b, kT0)["b"].estimate, 600);
  EXPECT_EQ(b.Pick(1, AllReady, kT0), "b");
}

TEST(PrefillBalancerTest, ReportedQueueCountsAndAges) {
  PrefillBalancer::Options options;
  options.report_half_life = absl::Seconds(2);
  PrefillBalancer b(options);
  b.SetPeers({"a", "b"});
  ASSERT_EQ(b.Pick(10, AllReady, kT0), "a");
  b.End("a", 10, /*reported_waiting_tokens=*/4000, false, kT0);
  // a reported 4000 queued tokens: b is chosen even with 3000 of ours in flight there.
  EXPECT_EQ(b.Pick(3000, AllReady, kT0), "b");
  EXPECT_EQ(ByPeer(b, kT0)["a"].estimate, 4000);
  EXPECT_EQ(ByPeer(b, kT0)["b"].estimate, 3000);
  // One half-life later a's report counts 2000 (< 3000): a again.
  EXPECT_EQ(ByPeer(b, kT0 + absl::Seconds(2))["a"].estimate, 2000);
  EXPECT_EQ(b.Pick(10, AllReady, kT0 + absl::Seconds(2)), "a");
  // After enough half-lives the report rounds down to nothing: a's estimate is its in flight.
  EXPECT_EQ(ByPeer(b, kT0 + absl::Seconds(2 * 13))["a"].estimate, 10);
  // A later report replaces the earlier one.
  b.End("a", 10, /*reported_waiting_tokens=*/0, false, kT0 + absl::Seconds(3));
  EXPECT_EQ(ByPeer(b, kT0 + absl::Seconds(3))["a"].estimate, 0);
}

TEST(PrefillBalancerTest, TiersComeFirstThenRecentFailures) {
  PrefillBalancer::Options options;
  options.failure_hold = absl::Seconds(2);
  PrefillBalancer b(options);
  b.SetPeers({"a", "b", "c"});
  // a connected but busy, b connecting, c failing: a, whatever its load.
  auto tier = [](const std::string& p) { return p == "a" ? 0 : p == "b" ? 1 : 2; };
  ASSERT_EQ(b.Pick(5000, tier, kT0), "a");
  EXPECT_EQ(b.Pick(10, tier, kT0), "a");
  // a fails through its own fault: within the hold, the next attempt goes to another peer of
  // the same tier if there is one, else still to a (better than a worse tier).
  b.End("a", 10, std::nullopt, /*peer_fault=*/true, kT0);
  EXPECT_EQ(b.Pick(10, AllReady, kT0 + absl::Seconds(1)), "b");
  EXPECT_EQ(b.Pick(10, tier, kT0 + absl::Seconds(1)), "a");
  // After the hold, a ranks by load again (5010 in flight there, 10 on b, 0 on c).
  EXPECT_EQ(b.Pick(10, AllReady, kT0 + absl::Seconds(3)), "c");
  // A cancellation (no peer fault) does not hold a back.
  PrefillBalancer fresh(options);
  fresh.SetPeers({"a", "b"});
  ASSERT_EQ(fresh.Pick(10, AllReady, kT0), "a");
  fresh.End("a", 10, std::nullopt, /*peer_fault=*/false, kT0);
  ASSERT_EQ(fresh.Pick(10, AllReady, kT0), "b");
  fresh.End("b", 10, std::nullopt, false, kT0);
  EXPECT_EQ(fresh.Pick(10, AllReady, kT0), "a");
}

TEST(PrefillBalancerTest, PeersThatStayKeepTheirStateAndGoneOnesEndHarmlessly) {
  PrefillBalancer b;
  b.SetPeers({"a", "b"});
  ASSERT_EQ(b.Pick(700, AllReady, kT0), "a");
  ASSERT_EQ(b.Pick(200, AllReady, kT0), "b");
  b.SetPeers({"c", "a"});  // b went away, c came
  auto loads = ByPeer(b, kT0);
  EXPECT_EQ(loads["a"].in_flight_tokens, 700);
  EXPECT_EQ(loads["a"].in_flight, 1);
  EXPECT_EQ(loads["c"].estimate, 0);
  EXPECT_THAT(b.peers(), ElementsAre("c", "a"));
  b.End("b", 200, 5, true, kT0);  // unknown now: ignored
  b.End("a", 700, 0, false, kT0);
  EXPECT_EQ(ByPeer(b, kT0)["a"].in_flight_tokens, 0);
  EXPECT_EQ(ByPeer(b, kT0)["a"].picks, 1);
}

}  // namespace
}  // namespace sieve::server
